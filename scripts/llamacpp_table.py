"""One side-by-side table of llama.cpp's and hierui's corpus KLD (scripts/llamacpp_crosscheck.sh).

Usage: llamacpp_table.py WORKDIR
WORKDIR holds llama.cpp's logs (lc_base.log: the --kl-divergence-base pass; lc_<QUANT>_<BASE>.log:
--kl-divergence passes) and hierui's --out folders (hi_own/, hi_lc/) with kld_summary.parquet.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq

QUANTS = ("Q8_0", "Q4_K_M")
NUM = r"([-+0-9.eEinfa]+)"


def llamacpp_stats(log: Path) -> dict[str, float]:
    """The figures of llama-perplexity --kl-divergence's final report (tools/perplexity/perplexity.cpp)."""
    text = log.read_text(errors="replace")
    patterns = {
        "ppl_p": r"Mean PPL\(Q\)\s*:\s*" + NUM,
        "ppl_d": r"Mean PPL\(base\)\s*:\s*" + NUM,
        "ln_ppl_ratio": r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*" + NUM,
        "kl_mean": r"Mean\s+KLD:\s*" + NUM,
        "kl_p99": r"99\.0%\s+KLD:\s*" + NUM,
        "kl_p99_9": r"99\.9%\s+KLD:\s*" + NUM,
        "same_top": r"Same top p:\s*" + NUM,
    }
    out = {}
    for key, pattern in patterns.items():
        m = re.search(pattern, text)
        if m is None:
            raise SystemExit(f"{log}: no '{key}' line in llama.cpp's output (did the run fail? see the log)")
        out[key] = float(m.group(1))
    out["same_top"] /= 100.0
    return out


def llamacpp_dense_ppl(log: Path) -> float:
    m = re.search(r"Final estimate: PPL = " + NUM, log.read_text(errors="replace"))
    if m is None:
        raise SystemExit(f"{log}: no 'Final estimate: PPL' line in llama.cpp's base pass")
    return float(m.group(1))


def hierui_stats(folder: Path) -> dict[str, dict[str, float]]:
    rows = pq.read_table(folder / "kld_summary.parquet").to_pylist()
    out = {}
    for r in rows:
        quant = next((q for q in QUANTS if r["spec"].endswith(f"{q}.gguf")), r["spec"])
        out[quant] = {
            k: float(r[k]) for k in ("ppl_p", "ppl_d", "ln_ppl_ratio", "kl_mean", "kl_p99", "kl_p99_9", "same_top")
        }
    return out


def main(work: Path) -> None:
    rows: list[tuple[str, str, str, dict[str, float]]] = []
    hi_own = hierui_stats(work / "hi_own")
    hi_lc = hierui_stats(work / "hi_lc")
    for q in QUANTS:
        rows.append((q, "llama.cpp", "llama.cpp's (base-lc.kld)", llamacpp_stats(work / f"lc_{q}_lc.log")))
        rows.append((q, "llama.cpp", "hierui's (base-hi.kld)", llamacpp_stats(work / f"lc_{q}_hi.log")))
        rows.append((q, "hierui", "own dense run (wrote base-hi.kld)", hi_own[q]))
        rows.append((q, "hierui", "llama.cpp's (base-lc.kld)", hi_lc[q]))
    head = (
        "quant",
        "computed by",
        "base",
        "PPL(Q)",
        "PPL(base)",
        "ln PPL ratio",
        "mean KLD",
        "99% KLD",
        "99.9% KLD",
        "same top",
    )
    body = []
    for q, who, base, s in rows:
        body.append(
            (
                q,
                who,
                base,
                f"{s['ppl_p']:.4f}",
                f"{s['ppl_d']:.4f}",
                f"{s['ln_ppl_ratio']:.6f}",
                f"{s['kl_mean']:.6f}",
                f"{s['kl_p99']:.6f}",
                f"{s['kl_p99_9']:.6f}",
                f"{100 * s['same_top']:.3f} %",
            )
        )
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join(("-" * (w + 2)) if i < 3 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|")
    for r in body:
        print("| " + " | ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |")
    dense_lc = llamacpp_dense_ppl(work / "lc_base.log")
    dense_hi = next(iter(hi_own.values()))["ppl_d"]
    print()
    print(
        f"dense F32 PPL: llama.cpp's base pass {dense_lc:.4f}, hierui {dense_hi:.4f} "
        f"(ln ratio {math.log(dense_hi / dense_lc):+.6f})"
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
