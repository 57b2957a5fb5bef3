"""Does a layer allocation beat uniform sparsity? Corpus KLD of uniform, @owl (and any other allocation given)
against the dense model on the shipped heldout suite, which neither calibrates nor allocates anything.

    .venv/bin/python bench/allocation_quality.py [--model smollm2-135m] [--levels wanda:0.5 wanda:0.6 wanda:0.7
        sparsegpt:0.6] [--allocations owl] [--ctx 512] [--out DIR]

One `hierui kld` run scores every spec (uniform and each allocation of each level) over the same windows; the table
gives per spec the measured sparsity, mean KLD (± its uncertainty), perplexity ratio and same top-1, and for each
allocation against its uniform level the KLD change in percent with the paired 95% interval and p, and McNemar's
p on top-1 correctness (hierui kld's own paired statistics, kld_pairs.parquet). Issue 27's goal: an allocation
at least 10% lower mean KLD than uniform at 60% and 15% at 70%. For each @auto spec, its predicted total KLD (kld.json's
allocations: the additive prediction from each layer measured alone on the calibration) beside the measured one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--levels", nargs="+", default=["wanda:0.5", "wanda:0.6", "wanda:0.7", "sparsegpt:0.6"])
    parser.add_argument("--allocations", nargs="+", default=["owl"], help="what follows '@' (owl, owl:5:0.1, a file)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--out", type=Path, help="the kld output folder (default: a temporary one)")
    args = parser.parse_args()
    import pyarrow.parquet as pq

    out = args.out or Path(tempfile.mkdtemp(prefix="hierui-allocation-")) / "kld"
    specs = [s for level in args.levels for s in (level, *(f"{level}@{a}" for a in args.allocations))]
    command = [sys.executable, "-m", "hierui", "kld", "--model", args.model, "--ctx", str(args.ctx), "--out", str(out)]
    for spec in specs:
        command += ["--prune", spec]
    print(" ".join(command[2:]), flush=True)
    done = subprocess.run(command, stdout=subprocess.DEVNULL)
    if done.returncode:
        sys.exit(f"hierui kld failed (exit {done.returncode})")
    summary = {row["spec"]: row for row in pq.read_table(out / "kld_summary.parquet").to_pylist()}
    pairs = {(r["spec_a"], r["spec_b"]): r for r in pq.read_table(out / "kld_pairs.parquet").to_pylist()}
    first = next(iter(summary.values()))
    print(f"{args.model} · {first['corpus']} · ctx {args.ctx} · {first['tokens']} tokens scored")
    print(f"{'spec':28} {'sparsity':>8} {'mean KLD':>16} {'PPL ratio':>9} {'same top':>8}   vs uniform")
    for level in args.levels:
        for spec in (level, *(f"{level}@{a}" for a in args.allocations)):
            row = summary[spec]
            versus = ""
            if spec != level:
                pair = pairs.get((spec, level))
                sign = 1
                if pair is None:
                    pair, sign = pairs[(level, spec)], -1
                base = summary[level]["kl_mean"]
                diff, lo, hi = (sign * pair[k] for k in ("kl_diff", "kl_diff_lo", "kl_diff_hi"))
                lo, hi = min(lo, hi), max(lo, hi)
                versus = (
                    f"KLD {diff / base:+.1%} [{lo / base:+.1%} … {hi / base:+.1%}] p {pair['kl_diff_p']:.3g}, "
                    f"top-1 McNemar p {pair['mcnemar_p']:.3g}"
                )
            print(
                f"{spec:28} {row['measured_sparsity']:8.4f} {row['kl_mean']:9.4f} ± {row['kl_mean_unc']:.4f} "
                f"{row['ppl_ratio']:9.3f} {row['same_top']:8.2%}   {versus}"
            )
    import json

    allocations = json.loads((out / "kld.json").read_text(encoding="utf-8")).get("allocations") or {}
    predicted = {spec: a["auto"] for spec, a in allocations.items() if (a.get("auto") or {}).get("predicted_kl")}
    if predicted:
        print(
            "\n@auto's prediction (each layer measured alone on the calibration, damages summed) against the mean KLD "
            "measured here on the whole allocated model:"
        )
        for spec, auto in predicted.items():
            measured = summary[spec]["kl_mean"]
            print(
                f"{spec:28} predicted {auto['predicted_kl']:.4f}  measured {measured:.4f}  "
                f"measured ÷ predicted {measured / auto['predicted_kl']:.2f}  (levels {auto.get('levels')})"
            )
    print(f"tables: {out}")


if __name__ == "__main__":
    main()
