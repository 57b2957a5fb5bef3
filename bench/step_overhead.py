"""Step overhead: the stepper with every metric vs two bare KV-cached forward passes of the same tokens.

Measured twice: with the logit lens on (the default: every layer read out through the head, engine.run.lens) and
with it off (`--no-lens`); the issue's goal for the lens on is ≤ 1.35× on the embedded model.

    .venv/bin/python bench/step_overhead.py [--model smollm2-135m] [--prune wanda:0.5] [--steps 48] [--repeats 3]

Both sides run in this process on the same pair, prompt and fed tokens: the bare side is the dense and
the perturbed model each stepping with its own DynamicCache (prefill + one token a step), nothing else.
Prints the median ratio over alternating repeats (machines here are noisy; compare ratios, not times).
"""

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from engine.models.loading import load
from engine.perturb import perturb
from engine.run.stepper import Stepper, StepSettings

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def time_stepper(pair, steps: int, lens: bool = True):
    stepper = Stepper(pair, PROMPT, StepSettings(mode="shared", max_new_tokens=steps, lens=lens))
    stepper.batch.eos = set()  # always run the full number of steps
    start = time.perf_counter()
    records = stepper.run()
    return time.perf_counter() - start, [r["token_d"] for r in records], torch.tensor([stepper.prompt_ids])


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
    args = parser.parse_args()
    pair = perturb(load(args.model, device=args.device), args.prune)
    time_stepper(pair, 4)  # warm up both paths
    ratios, ratios_off = [], []
    for _ in range(args.repeats):
        t_step, fed, prompt_ids = time_stepper(pair, args.steps)
        t_bare = time_bare(pair, prompt_ids.to(pair.dense.device), fed)
        t_off, _, _ = time_stepper(pair, args.steps, lens=False)
        ratios.append(t_step / t_bare)
        ratios_off.append(t_off / t_bare)
        ms = lambda t: f"{t / args.steps * 1000:7.2f} ms/step"  # noqa: E731
        print(
            f"stepper {ms(t_step)} · without the lens {ms(t_off)} · bare pair {ms(t_bare)}"
            f" · ratio {t_step / t_bare:.3f} (lens off {t_off / t_bare:.3f})"
        )
    print(f"step overhead ratio, lens on (median of {args.repeats}): {statistics.median(ratios):.3f}")
    print(f"step overhead ratio, lens off (median of {args.repeats}): {statistics.median(ratios_off):.3f}")


if __name__ == "__main__":
    main()
