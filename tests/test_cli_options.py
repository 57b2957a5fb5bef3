"""The options several commands share are declared once (hierui.cli.options) and checked once (hierui.cli.checks):
every command words them alike, and a bad --dtype is the same one line, exit 2, on every command that takes it."""

from pathlib import Path

import pytest
import typer

from hierui.cli import app, options

SESSION = Path(__file__).resolve().parent.parent / "sessions" / "choice-wanda-0.5-shared.jsonl"
BAD_DTYPE = "error: unknown dtype 'fp8': use auto, float32, bfloat16 or float16"


def _commands() -> dict:
    """Every command and command group of `hierui` by its path ('cache clear'), as click builds them."""
    found = {}

    def walk(command, path):
        found[path] = command
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return found


def _helps(option: str) -> dict:
    """The help text of `option` on each command that takes it."""
    return {
        path: param.help
        for path, command in _commands().items()
        for param in command.params
        if option in getattr(param, "opts", ())
    }


# (option, the wordings options.py gives it, at least this many commands take it)
SHARED = [
    ("--device", [options.DEVICE_HELP], 9),
    ("--dtype", [options.DTYPE_HELP], 8),
    ("--model", [options.MODEL_HELP, "the model to load (confirms a local path or hub id the session names)"], 8),
    ("--prune", [options.SPEC_HELP, "the perturbation spec (confirms a checkpoint:PATH the session names)"], 8),
    ("--calib", [options.CALIB_HELP, "the calibration text file (confirms the one the session names)"], 6),
    ("--no-cache", [options.NO_CACHE_HELP], 6),
    ("--tie-margin", [options.TIE_MARGIN_HELP], 2),
    ("--kind", [options.KIND_HELP], 2),
]


@pytest.mark.parametrize("option, wordings, at_least", SHARED, ids=[s[0] for s in SHARED])
def test_a_shared_option_is_worded_alike_on_every_command(option, wordings, at_least):
    helps = _helps(option)
    assert len(helps) >= at_least, sorted(helps)
    for path, text in helps.items():
        assert any(w in text for w in wordings), f"hierui {path} {option}: {text!r}"


def test_the_same_option_has_the_same_names_and_the_rerun_prefix_where_it_applies_to_rerun_only():
    commands = _commands()
    for path in ("explore", "batch", "prune", "plan", "kld", "check", "noise", "attribute"):
        assert _helps("--device")[path] == options.DEVICE_HELP
    for option in ("--device", "--dtype", "--no-cache", "--model", "--calib", "--prune"):
        assert _helps(option)["replay"].startswith("--rerun: "), option
    for path in ("explore", "batch", "prune"):
        assert _helps("--gpu-mem")[path] == options.GPU_MEM_HELP
    for path, command in commands.items():  # -m and -p are short for --model and --prune wherever they exist
        for param in command.params:
            opts = set(getattr(param, "opts", ()))
            assert not opts & {"-m", "-p"} or opts in ({"--model", "-m"}, {"--prune", "-p"}), (path, opts)


# each command taking --dtype, with what else it needs to reach its checks
DTYPE_COMMANDS = {
    "explore": ["--model", "tiny-random", "-p", "none"],
    "replay": ["--rerun", SESSION],
    "attribute": ["{tmp}/absent.jsonl"],  # the dtype is checked before the session is read
    "batch": ["--model", "tiny-random", "-p", "none", "--prompts", "{tmp}/prompts.txt", "--out", "{tmp}/out"],
    "prune": ["--model", "tiny-random", "-p", "none"],
    "plan": ["--model", "tiny-random", "-p", "none"],
    "kld": ["--model", "tiny-random", "-p", "none", "--out", "{tmp}/kld"],
    "sensitivity": ["--model", "tiny-random", "-p", "magnitude:0.5", "--out", "{tmp}/kld"],
    "check": ["--model", "tiny-random", "-p", "none"],
}


def test_every_command_with_dtype_is_in_the_table_below():
    assert set(_helps("--dtype")) == set(DTYPE_COMMANDS)


@pytest.mark.parametrize("command", sorted(DTYPE_COMMANDS))
def test_a_bad_dtype_is_one_line_and_exit_2_before_loading_on_every_command(cli, command, tmp_path, monkeypatch):
    import engine.models.loading
    from hierui.cli import checks

    (tmp_path / "prompts.txt").write_text("Hello\n")
    calls = []
    the_one_check = checks.check_dtype

    def spy(dtype):
        calls.append(dtype)
        return the_one_check(dtype)

    monkeypatch.setattr(checks, "check_dtype", spy)
    monkeypatch.setattr(engine.models.loading, "load", lambda *a, **k: pytest.fail(f"{command} loaded a model"))
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in DTYPE_COMMANDS[command]]
    run = cli(command, *args, "--dtype", "fp8")
    assert run.returncode == 2, run.stdout + run.stderr
    assert [line for line in run.stderr.splitlines() if line.strip()] == [BAD_DTYPE]
    assert calls == ["fp8"]  # hierui.cli.checks.check_dtype said it, not a copy of it
    assert not (tmp_path / "out").exists() and not (tmp_path / "kld").exists()
