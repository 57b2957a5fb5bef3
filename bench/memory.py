"""Peak memory of a pair relative to the dense model alone, each measured in a fresh process.

    .venv/bin/python bench/memory.py [--model smollm2-135m] [--specs wanda:0.5 attndrop:4]

Each case loads the model (and builds the pair: pruned weights come from the cache, which a first
untimed process fills), then steps 8 tokens, and reports its peak resident set size (ru_maxrss).
Aims: a pruned pair at most 1.85× the dense model (embeddings, norms, LM head shared), a drop spec at most 1.05×.
"""

import argparse
import json
import subprocess
import sys

CASE = """
import json, resource, sys
from engine.models.loading import load
from engine.run.stepper import Stepper, StepSettings
model, spec, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
loaded = load(model, device="cpu")
if spec == "dense":
    from engine.perturb.pair import ModelPair
    from engine.perturb.spec import parse_spec
    pair = ModelPair(loaded.model, loaded.model, loaded.tokenizer, parse_spec("none"), loaded=loaded)
    # the dense model alone: step it against itself (one model's weights, two KV caches)
else:
    from engine.perturb import perturb
    pair = perturb(loaded, spec)
if steps:
    Stepper(pair, "Tell me about the moon.", StepSettings(max_new_tokens=steps)).run()
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak(model: str, spec: str, steps: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CASE, model, spec, str(steps)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--specs", nargs="+", default=["wanda:0.5", "attndrop:4"])
    args = parser.parse_args()
    for spec in args.specs:  # fill the caches (calibration, pruned weights) outside the measurement
        peak(args.model, spec, 0)
    dense = peak(args.model, "dense", 8)
    print(f"{'dense alone':<14} {dense:8.0f} MiB")
    for spec in args.specs:
        mib = peak(args.model, spec, 8)
        print(f"{spec:<14} {mib:8.0f} MiB = {mib / dense:.2f}× the dense model")


if __name__ == "__main__":
    main()
