"""The `hierui` command: every command module registered on the typer app, and main(), which turns every
HieruiError, out-of-memory and Ctrl-C into one line on stderr and an exit code."""

import inspect
import sys

from engine.errors import HieruiError, is_oom

# each module registers its commands on the apps when it is imported
from hierui.cli import attribute, batch, check, explore, kld, prune, sessions, store  # noqa: F401
from hierui.cli.apps import app, cache_app, models_app
from hierui.cli.checks import reject_empty_paths
from hierui.output import err_console

# the order of `hierui --help` (models and cache, groups, come last)
COMMANDS = ("explore", "show", "replay", "attribute", "batch", "report", "prune", "plan", "kld", "check", "noise")
app.registered_commands.sort(key=lambda info: COMMANDS.index(info.name or info.callback.__name__))


def _unwrap_help() -> None:
    """The commands' docstrings are wrapped for the source; typer keeps those line breaks, so a terminal of
    another width showed ragged lines ("where it" / "breaks"). Each paragraph becomes one line, which rich
    then wraps at the terminal's width."""
    for typer_app in (app, models_app, cache_app):
        for info in typer_app.registered_commands:
            doc = info.help or (info.callback.__doc__ if info.callback else None)
            if doc:
                paragraphs = inspect.cleandoc(doc).split("\n\n")
                info.help = "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


_unwrap_help()


def main(argv: list[str] | None = None) -> None:
    """The `hierui` command: every HieruiError is one line on stderr and its exit code; out of memory and
    Ctrl-C likewise. `argv` (default: the process's arguments) lets tests run it in-process."""
    from engine.run.plan import forget

    forget()  # an out-of-memory message names this command's own plan only
    try:
        reject_empty_paths(sys.argv[1:] if argv is None else argv)
        app(args=argv)
    except HieruiError as e:
        from rich.text import Text  # the message is plain text: a path like a[b] is not markup

        from engine.run.plan import last_figure
        from hierui.tokentext import escape  # a message may quote a file's text: no control characters

        message = str(e) + (last_figure() if e.exit_code == 1 and str(e).startswith("out of memory") else "")
        err_console.print(Text("error: ", style="bold red") + Text(escape(message)), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError (CUDA) derives from RuntimeError
        if not is_oom(e):
            raise
        _out_of_memory(e)


def _out_of_memory(e: BaseException) -> None:
    """Out of memory on the host or on CUDA: what to try, and the memory this run's plan predicted; exit 1."""
    from engine.run.plan import last_figure

    figure = last_figure()  # the estimate this run printed at its start, if any
    if isinstance(e, MemoryError):
        err_console.print(
            "error: out of memory: use a smaller model, --dtype bfloat16, a smaller --batch-size "
            f"or fewer --calib-samples{figure}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        err_console.print(
            "error: CUDA out of memory: use --dtype bfloat16, a smaller --batch-size, fewer "
            f"--calib-samples, a smaller model or --device cpu{figure}",
            highlight=False,
            soft_wrap=True,
        )
    sys.exit(1)
