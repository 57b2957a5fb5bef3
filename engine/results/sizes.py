"""The quant-choosing table: candidates read from GGUF files, smallest first, each with its paired difference from
the next smaller one and whether it is on the Pareto front of size and mean KLD (`hierui kld`'s terminal table and
its report section)."""

from __future__ import annotations

import json
from pathlib import Path


def pareto_front(sizes: list[float], losses: list[float]) -> list[bool]:
    """Whether each candidate is on the front: no other is at most as large with at most as much loss and strictly
    better in one of the two (smaller, or less loss). Equal candidates are both on it."""
    front = []
    for i, (size, loss) in enumerate(zip(sizes, losses)):
        beaten = any(
            j != i and s <= size and q <= loss and (s < size or q < loss) for j, (s, q) in enumerate(zip(sizes, losses))
        )
        front.append(not beaten)
    return front


def candidates_by_size(rows: list[dict], pairs: list[dict] | None) -> list[dict]:
    """kld_summary rows with a file_size (GGUF candidates), smallest first, each with `name` (the file's name),
    `types` ({type: weights}), `front` (pareto_front on size and kl_mean) and `versus`: its KLD minus the next
    smaller candidate's with the paired 95% interval ({"diff", "lo", "hi"}, from kld_pairs; None for the
    smallest or where the pair is missing)."""
    sized = sorted((r for r in rows if r.get("file_size") is not None), key=lambda r: r["file_size"])
    front = pareto_front([r["file_size"] for r in sized], [r.get("kl_mean") or 0.0 for r in sized])
    by_pair = {(p["spec_a"], p["spec_b"]): p for p in pairs or []}
    out = []
    for i, r in enumerate(sized):
        versus = None
        if i:
            below = sized[i - 1]["spec"]
            pair, sign = by_pair.get((r["spec"], below)), 1
            if pair is None:
                pair, sign = by_pair.get((below, r["spec"])), -1
            if pair is not None and pair.get("kl_diff") is not None:
                lo, hi = sorted((sign * pair["kl_diff_lo"], sign * pair["kl_diff_hi"]))
                versus = {"diff": sign * pair["kl_diff"], "lo": lo, "hi": hi}
        types = r.get("quant_types")
        out.append(
            {
                **r,
                "name": Path(r["spec"].partition(":")[2]).name,
                "types": json.loads(types) if isinstance(types, str) else types,
                "front": front[i],
                "versus": versus,
            }
        )
    return out
