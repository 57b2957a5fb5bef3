"""bench/scaling.py runs end to end on tiny-random: one case in its fresh process, the table row, the skipped
case, the GPU bandwidth expectation (also for an --expect shape) and the --json file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_scaling_bench_runs_on_tiny_random(tmp_path):
    out = tmp_path / "scaling.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "scaling.py"),
            "--models",
            "tiny-random",
            "--specs",
            "magnitude:0.5",
            "wanda:0.5",
            "--skip",
            "tiny-random=wanda:0.5",
            "--steps",
            "2",
            "--threads",
            "1",  # 2 threads on 2 busy cores make a tiny model's steps ~100× slower (OpenMP waits)
            "--expect",
            "random:smollm2-135m",  # the GPU expectation only (built on the meta device)
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "cores" in lines[0] and "torch " in lines[0], lines[0]
    assert any(line.startswith("load average at the start: ") for line in lines)
    rows = [line for line in lines if line.startswith("tiny-random ")]
    assert len(rows) == 2, lines
    assert "magnitude:0.5" in rows[0] and "failed" not in rows[0] and "%" in rows[0], rows[0]
    assert "wanda:0.5" in rows[1] and "skipped (--skip)" in rows[1], rows[1]
    for name in ("tiny-random", "smollm2-135m"):
        assert any(line.strip().startswith(name) and "ms per step of the pair" in line for line in lines), lines

    data = json.loads(out.read_text())
    assert data["bandwidth_tbps"] == 4.8
    shape = data["shapes"]["tiny-random"]
    assert shape["params"] > shape["pruned_params"] > 0 and shape["bf16_bytes_per_step"] > 0
    assert data["shapes"]["random:smollm2-135m"]["measured"] is False
    assert data["shapes"]["random:smollm2-135m"]["bf16_bytes_per_step"] > 100 * shape["bf16_bytes_per_step"]
    (case,) = data["cases"]
    assert case["spec"] == "magnitude:0.5" and "error" not in case, case
    assert abs(case["sparsity"] - 0.5) < 0.01
    for key in ("load_s", "prune_s", "step_ms", "step_off_ms", "bare_ms", "dense_peak", "pair_peak", "plan_peak"):
        assert case[key] > 0, (key, case)
    assert case["pair_peak"] >= case["dense_peak"] and case["threads"] == 1
