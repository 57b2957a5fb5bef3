"""Re-record the example sessions shipped in sessions/ with the embedded model (what `hierui replay` opens
without any model: the explorer's screen, the logit-lens map, the counterfactual branch of the free runs).

    .venv/bin/python scripts/example_sessions.py [--keep DIR]

Three prompts (a factual question, a story, a multiple-choice question with --choices " A" … " D") under
wanda:0.5 and attndrop:6, in shared and free mode, 48 tokens, free runs with --counterfactual: one `hierui batch`
sweep, whose sessions are copied to sessions/<prompt>-<spec>-<mode>.jsonl. Takes a few minutes on 2 CPU cores
(calibration and pruning come from $HIERUI_HOME's cache when there).
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    {"id": "factual", "prompt": "What is the capital of France, and what is it famous for?"},
    {"id": "story", "prompt": "Write a short story about a lighthouse keeper who finds a message in a bottle."},
    {
        "id": "choice",
        "prompt": "Which planet is known as the Red Planet?\nA. Venus\nB. Mars\nC. Jupiter\nD. Saturn\n"
        "Answer with the letter.",
        "choices": [" A", " B", " C", " D"],
    },
]
SPECS = ("wanda:0.5", "attndrop:6")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="record into this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="hierui-examples-"))
    prompts = work / "prompts.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    command = [sys.executable, "-m", "hierui", "batch", "--prompts", str(prompts), "--out", str(work / "out")]
    command += [arg for spec in SPECS for arg in ("--prune", spec)]
    command += ["--mode", "shared", "--mode", "free", "--max-new-tokens", "48", "--counterfactual"]
    subprocess.run(command, check=True)
    for session in sorted((work / "out" / "sessions").glob("*.jsonl")):
        shutil.copyfile(session, ROOT / "sessions" / session.name)
        print(f"sessions/{session.name}")
    if args.keep is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
