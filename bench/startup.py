"""Start-up time of the light commands, relative to `python -c pass` (none of them imports torch).

.venv/bin/python bench/startup.py [--repeats 5]
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SESSION = ROOT / "sessions" / "choice-wanda-0.5-shared.jsonl"
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "hierui --help": [sys.executable, "-m", "hierui", "--help"],
    "hierui show SESSION": [sys.executable, "-m", "hierui", "show", str(SESSION)],
    "hierui models": [sys.executable, "-m", "hierui", "models"],
}
CHECK = (
    "import sys, runpy; sys.argv = {argv!r}; \ntry:\n    runpy.run_module('hierui', run_name='__main__')\n"
    "except SystemExit:\n    pass\nprint('torch' in sys.modules, 'transformers' in sys.modules)"
)


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every command alike
        for name, cmd in COMMANDS.items():
            times[name].append(wall(cmd))
    base = statistics.median(times["python -c pass"])
    for name, cmd in COMMANDS.items():
        median = statistics.median(times[name])
        imported = ""
        if name != "python -c pass":
            probe = subprocess.run(
                [sys.executable, "-c", CHECK.format(argv=["hierui", *cmd[3:]])], capture_output=True, text=True
            )
            torch_loaded = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else "?"
            imported = f" · torch, transformers imported: {torch_loaded}"
        print(f"{name:<22} {median * 1000:7.0f} ms = {median / base:5.1f}× python -c pass{imported}")


if __name__ == "__main__":
    main()
