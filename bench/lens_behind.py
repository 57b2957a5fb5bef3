"""The explorer's stepping with the logit lens computed behind it (issue 26): ms/step of the stepping loop.

    .venv/bin/python bench/lens_behind.py [--model smollm2-135m] [--prune wanda:0.5] [--steps 32] [--repeats 3]

Five ways of taking the same steps, alternated in this process on the same pair and prompt, each recorded to a
session file in a temporary folder as the explorer records it:

    bare     two bare KV-cached forwards a step (bench/step_overhead.py's reference)
    off      the explorer's run (hierui.explorer.live.LiveRun) with the lens off
    in-step  the lens "all" computed inside each step (the explorer before issue 26; batch's --lens all)
    later    the explorer's run with the lens "all" left for later, no lens worker: the loop alone
    behind   the same with a second thread computing each pending step's lens as the explorer's lens worker does
             (LiveRun.compute_lens: the oldest first, its lens line written), the two competing for the cores

Prints, per repeat (the ways in a rotated order, so none is always first or last), the loop's ms/step and for
`behind` how long after the last step the last column was filled; then the medians of each ratio to two bare
forwards and of `behind` to `later` and to `off` (what the background lens costs the loop). On a 2-core CPU the
lens worker competes with stepping for the cores; on a GPU the two share the device. On a CPU shared with other
work, run it with OMP_WAIT_POLICY=PASSIVE: OpenMP threads spinning between operations made every way 2–5× slower
and uneven on a busy 2-core machine (load 8–10), a second thread of work changing how much they spun.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from step_overhead import PROMPT, time_bare  # noqa: E402

from engine.models.loading import load  # noqa: E402
from engine.perturb import perturb  # noqa: E402
from engine.record.settings import StepSettings  # noqa: E402
from engine.run.recorder import SessionRecorder  # noqa: E402
from engine.run.stepper import Stepper  # noqa: E402
from hierui.explorer.live import LiveRun  # noqa: E402


def settings(steps: int, lens: str) -> StepSettings:
    return StepSettings(mode="shared", max_new_tokens=steps, lens=lens, tie_margin=0.0)


def time_live(pair, steps: int, lens: str, folder: str, behind: bool = False) -> tuple[float, float, list[int], list]:
    """(seconds of the stepping loop, seconds after it until every lens was computed, the dense tokens, prompt ids)."""
    run = LiveRun(pair, PROMPT, settings(steps, lens), folder)
    run.stepper.batch.eos = set()
    done = threading.Event()
    filled = [0.0]

    def worker():  # hierui.explorer.workers' lens worker: the pending steps, oldest first, until the run ends
        while True:
            pending = run.lens_pending()
            if not pending:
                if run.stepper.finished:
                    break
                time.sleep(0.001)
                continue
            run.compute_lens(pending[0])
        filled[0] = time.perf_counter()
        done.set()

    thread = threading.Thread(target=worker) if behind else None
    start = time.perf_counter()
    if thread is not None:
        thread.start()
    while not run.finished:
        run.step()
    loop = time.perf_counter() - start
    after = 0.0
    if thread is not None:
        done.wait()
        thread.join()
        after = filled[0] - start - loop
    run.close()
    return loop, after, [r["token_d"] for r in run.records], run.stepper.prompt_ids


def time_in_step(pair, steps: int, folder: str) -> float:
    stepper = Stepper(pair, PROMPT, settings(steps, "all"))
    stepper.batch.eos = set()
    recorder = SessionRecorder(stepper, [os.path.join(folder, f"in-step-{time.monotonic_ns()}.jsonl")])
    start = time.perf_counter()
    recorder.run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prune", default="wanda:0.5")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the figures to this file (bench/speed_goals.py reads it)")
    args = parser.parse_args()
    pair = perturb(load(args.model, device=args.device), args.prune)
    n = args.steps
    ms = lambda t: f"{t / n * 1000:7.1f}"  # noqa: E731
    ratios: dict[str, list[float]] = {
        k: [] for k in ("off", "in-step", "later", "behind", "behind/later", "behind/off")
    }
    print(f"{args.model} · {args.prune} · {n} steps · torch threads {torch.get_num_threads()} · load {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as folder:
        time_live(pair, 4, "all", folder, behind=True)  # warm up every path
        time_in_step(pair, 4, folder)
        _, _, fed, ids = time_live(pair, n, "off", folder)  # the tokens the bare forwards are fed
        ids = torch.tensor([ids], device=pair.dense.device)
        ways = {
            "bare": lambda: (time_bare(pair, ids, fed), 0.0),
            "off": lambda: time_live(pair, n, "off", folder)[:2],
            "in-step": lambda: (time_in_step(pair, n, folder), 0.0),
            "later": lambda: time_live(pair, n, "all", folder)[:2],
            "behind": lambda: time_live(pair, n, "all", folder, behind=True)[:2],
        }
        names = list(ways)
        for repeat in range(args.repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            t = {name: ways[name]() for name in order}
            for key in ("off", "in-step", "later", "behind"):
                ratios[key].append(t[key][0] / t["bare"][0])
            ratios["behind/later"].append(t["behind"][0] / t["later"][0])
            ratios["behind/off"].append(t["behind"][0] / t["off"][0])
            print(
                " · ".join(f"{name} {ms(t[name][0])}" for name in names)
                + f" ms/step (map full {t['behind'][1] * 1000:.0f} ms after the last step; order {' '.join(order)})"
            )
    med = {k: statistics.median(v) for k, v in ratios.items()}
    print(
        f"medians of {args.repeats} (÷ two bare forwards): off {med['off']:.3f} · in-step {med['in-step']:.3f}"
        f" · later {med['later']:.3f} · behind {med['behind']:.3f}"
    )
    print(
        f"the lens worker's cost to the stepping loop (medians): behind ÷ later {med['behind/later']:.3f}"
        f" · behind ÷ off {med['behind/off']:.3f}"
    )
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"ratio_to_bare": med}, indent=1) + "\n")


if __name__ == "__main__":
    main()
