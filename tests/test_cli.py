"""The CLI: bad input is one clear line with exit code 2; prune works end to end on tiny-random.

Contract tests run in-process (the `cli` fixture); a few run the real command in a subprocess (`hierui`)
where the process is the point: exit codes, tracebacks, import time.
"""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "--prune", "wanda:1.5"], "sparsity must be in (0, 1)"),
        (["prune", "--prune", "wanda:4:2"], "0 < N < M"),
        (["prune", "--prune", "foo:0.5"], "unknown method 'foo'"),
        (["prune", "--prune", "magnitude:"], "argument is missing"),
        (["prune", "--model", "llama-9000"], "unknown model 'llama-9000'"),
        (["prune", "--model", "/no/such/dir"], "model directory not found"),
        (["models", "pull", "nope-model"], "unknown model 'nope-model'"),
        (["explore", "--model", "llama-9000"], "unknown model 'llama-9000'"),
        (["explore", "--prune", "wanda:1.5"], "sparsity must be in (0, 1)"),
        (["explore", "--prune", "nope:2"], "unknown method 'nope'"),
        (["explore", "--mode", "sideways"], "unknown mode 'sideways'"),
        (["explore", "--temperature", "0"], "temperature must be > 0"),
        (["explore", "--calib", "/no/such/file.txt"], "calibration file not found"),
        (["explore", "--prune", "checkpoint:/no/such/dir"], "not found"),
        (["explore"], "needs an interactive terminal"),  # valid input, but no terminal here: still before the UI
        (["replay", "/no/such/session.jsonl"], "session not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, args, message):
    run = cli(*args)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert message in lines[0]
    assert "Traceback" not in run.stderr + run.stdout


def test_bad_input_in_a_real_process_is_one_line_exit_2_and_no_traceback(hierui):
    run = hierui("prune", "--prune", "wanda:1.5")
    assert (
        run.returncode == 2
        and run.stderr.strip() == "error: spec 'wanda:1.5': sparsity must be in (0, 1)"
        or ("sparsity must be in (0, 1)" in run.stderr and len(run.stderr.strip().splitlines()) == 1)
    )
    assert "Traceback" not in run.stderr + run.stdout


@pytest.mark.slow
def test_prune_tiny_random_end_to_end_and_save(hierui, tmp_path):
    out = tmp_path / "saved"
    run = hierui(
        "prune",
        "--model",
        "tiny-random",
        "--prune",
        "magnitude:2:4",
        "--tokens",
        "4",
        "--save",
        str(out),
        env={"HIERUI_HOME": str(tmp_path / "home")},
    )
    assert run.returncode == 0, run.stderr
    assert "50.00%" in run.stdout and "perplexity" in run.stdout and "greedy" in run.stdout
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    again = hierui(
        "prune",
        "--model",
        "tiny-random",
        "--prune",
        f"checkpoint:{out}",
        "--tokens",
        "4",
        env={"HIERUI_HOME": str(tmp_path / "home")},
    )
    assert again.returncode == 0, again.stderr
    assert "50.00%" in again.stdout


def test_models_lists_aliases(cli):
    run = cli("models")
    assert run.returncode == 0
    assert "llama-7b" in run.stdout and "huggyllama/llama-7b" in run.stdout and "tiny-random" in run.stdout


def test_replay_without_a_terminal_prints_the_session(hierui):
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "sessions" / "choice-wanda-0.5-shared.jsonl"
    run = hierui("replay", str(example))
    assert run.returncode == 0 and "wanda:0.5" in run.stdout and "summary" in run.stdout


@pytest.mark.parametrize("args", [["--help"], ["models"]])
def test_light_commands_do_not_import_torch(args):
    probe = (
        f"import runpy, sys\nsys.argv = ['hierui', *{args!r}]\n"
        "try:\n    runpy.run_module('hierui', run_name='__main__')\n"
        "except SystemExit:\n    pass\nsys.stderr.write(str(('torch' in sys.modules, 'transformers' in sys.modules)))"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.stderr.strip().endswith("(False, False)"), run.stderr


@pytest.mark.parametrize(
    "error, message",
    [
        ("cuda", "CUDA out of memory: use --dtype bfloat16"),
        ("host", "out of memory: use a smaller model"),
    ],
)
def test_out_of_memory_is_one_line_and_exit_1(monkeypatch, capsys, error, message):
    import torch

    import hierui.cli as cli

    def boom(*_args, **_kwargs):
        raise (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if error == "cuda"
            else MemoryError()
        )

    monkeypatch.setattr(cli, "app", boom)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert message in err and len([line for line in err.splitlines() if line.strip()]) == 1 and "Traceback" not in err
