"""Batched stepping: generated tokens per second of the pair at batch size B over B = 1.

    .venv/bin/python bench/batch_throughput.py [--model smollm2-135m] [--prune wanda:0.5] [--batch 8] [--tokens 32]
        [--lens sampled all off]

The same B prompts are stepped one at a time and then all together (every metric computed in both), with
end of sequence disabled so every row makes --tokens steps, for each lens mode (batch's default `sampled`, `all`,
`off`). Prints the ratio of tokens per second B ÷ 1 per mode, and each mode's batched throughput ÷ lens off's
(issue 26's goals: the default's B=8 ≥ 3 × its B=1 and ≥ 0.8 × lens off's).
"""

import argparse
import json
import time
from pathlib import Path

from engine.models.loading import load
from engine.perturb import perturb
from engine.record.settings import BATCH_LENS, LENS_MODES
from engine.run.stepper import BatchStepper, StepSettings

PROMPTS = [
    "What is the capital of France?",
    "Write a short story about a lighthouse keeper.",
    "Explain photosynthesis to a child.",
    "List three uses of a paperclip.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Write a Python function that reverses a string.",
    "Give me a recipe for pancakes.",
    "What are the planets of the solar system?",
    "Describe a rainy day in the city.",
    "How do vaccines work?",
    "Summarise the plot of Romeo and Juliet.",
    "What is 17 times 23?",
    "Name five animals that live in the ocean.",
    "Why do leaves change colour in autumn?",
    "Write a haiku about winter.",
]


def tokens_per_second(pair, prompts, settings) -> float:
    stepper = BatchStepper(pair, prompts, settings)
    stepper.eos = set()
    start = time.perf_counter()
    rows = stepper.run()
    return sum(len(r) for r in rows) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prune", default="wanda:0.5")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--lens",
        nargs="+",
        default=[BATCH_LENS, "all", "off"],
        choices=LENS_MODES,
        help=f"lens modes to measure (default: batch's {BATCH_LENS}, then all and off)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file (bench/speed_goals.py reads it)")
    args = parser.parse_args()
    pair = perturb(load(args.model, device=args.device), args.prune)
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    tokens_per_second(pair, prompts[:1], StepSettings(max_new_tokens=4))  # warm up
    batched_by_mode, single_by_mode = {}, {}
    for lens in args.lens:
        settings = StepSettings(max_new_tokens=args.tokens, lens=lens)
        single_start = time.perf_counter()
        single_tokens = 0
        for prompt in prompts:
            stepper = BatchStepper(pair, [prompt], settings)
            stepper.eos = set()
            single_tokens += sum(len(r) for r in stepper.run())
        single = single_by_mode[lens] = single_tokens / (time.perf_counter() - single_start)
        batched = batched_by_mode[lens] = tokens_per_second(pair, prompts, settings)
        print(
            f"lens {lens:7s} B=1: {single:6.1f} tokens/s · B={args.batch}: {batched:6.1f} tokens/s · "
            f"ratio {batched / single:.2f}× ({args.model}, {args.prune}, {args.tokens} tokens a prompt)"
        )
    if "off" in batched_by_mode:
        for lens, batched in batched_by_mode.items():
            if lens != "off":
                print(
                    f"lens {lens:7s} B={args.batch} ÷ lens off B={args.batch}: {batched / batched_by_mode['off']:.2f}×"
                )
    if args.json:
        figures = {"batch": args.batch, "single_tokens_s": single_by_mode, "batched_tokens_s": batched_by_mode}
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
