"""Usage errors and help (issue 25, class 8; hierui.cli.entry): a malformed or unknown option, a missing argument or
an unknown command is one line and exit 2, naming the command and its help; an unknown option is suggested only
options the command shows; help text is plain text (`hierui[ray]` keeps its `[ray]`) and --device lists every
device engine.models.devices.check_device accepts."""

from __future__ import annotations

import pytest


def _one_line(run, command: str) -> str:
    err = run.stderr.strip()
    assert run.returncode == 2 and len(err.splitlines()) == 1, run.stderr
    assert err.startswith(f"error: {command}: ") and f"See {command} --help" in err, err
    assert "╭" not in err and "Usage:" not in err and not run.stdout
    return err


@pytest.mark.parametrize(
    "args, command, says",
    [
        (["kld", "--ctx", "abc"], "hierui kld", "Invalid value for '--ctx'"),
        (["check", "--steps", "0"], "hierui check", "Invalid value for '--steps'"),
        (["batch", "--steps", "3"], "hierui batch", "no such option --steps"),
        (["plan", "--prune"], "hierui plan", "Option '--prune' requires an argument"),
        (["cache", "clear", "--kind"], "hierui cache clear", "Option '--kind' requires an argument"),
        (["show"], "hierui show", "Missing argument"),
        (["bogus"], "hierui", "No such command 'bogus'"),
    ],
)
def test_a_usage_error_is_one_line_and_exit_2(cli, args, command, says):
    """Guards: click's five-line box (usage, 'Try --help', a framed message) for a malformed option."""
    assert says in _one_line(cli(*args), command)


def test_an_unknown_option_is_suggested_the_commands_own_close_options(cli):
    """Guards: 'Possible options: …' naming options far from what was typed, or hidden ones the command does not
    show (prune's old --seed), instead of the close ones or the command that has the option."""
    assert _one_line(cli("kld", "--prun", "wanda:0.5"), "hierui kld").endswith(
        "no such option --prun: did you mean --prune? See hierui kld --help"
    )
    assert "did you mean" not in _one_line(cli("explore", "--bogus"), "hierui explore")  # was: --gpus
    said = _one_line(cli("batch", "--steps", "3"), "hierui batch")
    assert "it is an option of" in said and "hierui check" in said and "hierui batch," not in said


def test_suggestions_are_only_visible_options_of_the_command():
    """Every command, several misspellings: whatever is suggested is an option that command shows in its help."""
    import re

    import typer.main
    from typer._click.exceptions import NoSuchOption, UsageError

    from hierui.cli.entry import app, usage_error

    def walk(command, path):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])

    words = ["--prun", "--sed", "--seeds", "--mdoel", "--devce", "--dtyp", "--calib-sample", "--outt", "--steps"]
    for path, command in walk(typer.main.get_command(app), []):
        shown = {o for p in command.params if not getattr(p, "hidden", False) for o in (*p.opts, *p.secondary_opts)}
        for word in words:
            try:
                command.make_context(" ".join(["hierui", *path]), [word, "x"])
            except NoSuchOption as e:
                said = usage_error(e, [*path, word, "x"])
                suggested = re.search(r"did you mean (.*)\?", said)
                for option in suggested.group(1).split(" or ") if suggested else []:
                    assert option in shown, (path, word, said)
            except UsageError:  # the command has the option, and "x" is no value for it
                continue


def test_help_keeps_brackets_and_lists_every_device(cli):
    """Guards: rich markup ate `[ray]` in `pip install 'hierui[ray]'`, and --device's help omitted mps."""
    import typer.main

    from engine.models.devices import DEVICE_CHOICES
    from hierui.cli.entry import app

    for command in ("kld", "batch"):
        shown = "".join(cli(command, "--help", env={"COLUMNS": "400"}).stdout.split())
        assert "pipinstall'hierui[ray]'" in shown, command
    assert "mps" in DEVICE_CHOICES
    for name, command in typer.main.get_command(app).commands.items():
        if any("--device" in p.opts for p in command.params):
            shown = " ".join(cli(name, "--help", env={"COLUMNS": "400"}).stdout.split())
            assert DEVICE_CHOICES in shown, name
