"""Step overhead: the stepper with every metric vs two bare KV-cached forward passes of the same tokens.

Measured per lens mode (engine.record.settings.LENS_MODES): "all" (every step's layers read out through the head
inline, engine.run.lens), "sampled" (`hierui batch`'s default: every 4th step, the flips, the first divergence),
"later" (the explorer's stepping: the lens kept for a worker, BatchStepper(lens_later=True), so the loop never
computes it) and "off"; and the lens alone: the time of computing one step's lens (compute_lens on what "later"
kept, both models' mid layers through the head) ÷ the time of two bare decode forwards (the issue's goal ≤ 0.25).

    .venv/bin/python bench/step_overhead.py [--model smollm2-135m] [--prune wanda:0.5] [--steps 48]
                                            [--repeats 3] [--threads N]

All sides run in this process on the same pair, prompt and fed tokens: the bare side is the dense and the perturbed
model each stepping with its own DynamicCache (prefill + one token a step), nothing else. Prints the median ratio
over alternating repeats (machines here are noisy; compare ratios, not times) and the load average.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from engine.models.loading import load
from engine.perturb import perturb
from engine.run.stepper import Stepper, StepSettings

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
MODES = ("all", "sampled", "later", "off")


def time_stepper(pair, steps: int, lens: str = "all"):
    """Seconds to step `steps` tokens with the lens mode `lens` ("later": "all" kept for compute_lens), the tokens
    fed, the prompt ids and the stepper."""
    later = lens == "later"
    settings = StepSettings(mode="shared", max_new_tokens=steps, lens="all" if later else lens)
    stepper = Stepper(pair, PROMPT, settings, lens_later=later)
    stepper.batch.eos = set()  # always run the full number of steps
    start = time.perf_counter()
    records = stepper.run()
    return time.perf_counter() - start, [r["token_d"] for r in records], torch.tensor([stepper.prompt_ids]), stepper


def time_lens(stepper) -> float:
    """Seconds to compute every kept step's lens (a stepper made with lens_later), one step at a time."""
    start = time.perf_counter()
    for row, step in stepper.batch.lens_pending():
        stepper.batch.compute_lens(row, step)
    return time.perf_counter() - start


@torch.no_grad()
def time_bare(pair, prompt_ids, fed: list[int]) -> float:
    caches = [DynamicCache(config=m.config) for m in (pair.dense, pair.perturbed)]
    start = time.perf_counter()
    for model, cache in zip((pair.dense, pair.perturbed), caches):
        model(input_ids=prompt_ids, cache=cache, use_cache=True)
    for token in fed[:-1]:
        ids = torch.tensor([[token]], device=prompt_ids.device)
        for model, cache in zip((pair.dense, pair.perturbed), caches):
            model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1].argmax(-1).item()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prune", default="wanda:0.5")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default torch's); 1 on a shared machine is steadier"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file (bench/speed_goals.py reads it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = perturb(load(args.model, device=args.device), args.prune)
    for mode in MODES:  # warm up every path
        time_stepper(pair, 4, mode)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    ratios: dict[str, list[float]] = {mode: [] for mode in (*MODES, "lens")}
    ms = lambda t: f"{t / args.steps * 1000:7.2f}"  # noqa: E731
    for _ in range(args.repeats):
        times = {}
        t_all, fed, prompt_ids, _ = time_stepper(pair, args.steps, "all")
        t_bare = time_bare(pair, prompt_ids.to(pair.dense.device), fed)
        times["all"] = t_all
        for mode in ("sampled", "later", "off"):
            times[mode], _, _, stepper = time_stepper(pair, args.steps, mode)
            if mode == "later":
                times["lens"] = time_lens(stepper)
        for mode, t in times.items():
            ratios[mode].append(t / t_bare)
        print("ms/step: bare pair " + ms(t_bare) + " · " + " · ".join(f"{mode} {ms(t)}" for mode, t in times.items()))
    for mode in (*MODES, "lens"):
        what = "the lens alone, one step" if mode == "lens" else f"stepping, lens {mode}"
        values = ratios[mode]
        print(
            f"{what:27} ÷ two bare forwards (median of {args.repeats}): {statistics.median(values):.3f} "
            f"(range {min(values):.3f}–{max(values):.3f})"
        )
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        medians = {mode: statistics.median(values) for mode, values in ratios.items()}
        args.json.write_text(json.dumps({"ratio_to_bare": medians}, indent=1) + "\n")


if __name__ == "__main__":
    main()
