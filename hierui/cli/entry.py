"""The `hierui` command: every command module registered on the typer app, and main(), which turns every
HieruiError, out-of-memory and Ctrl-C into one line on stderr and an exit code."""

import inspect
import sys

from rich.text import Text  # messages are plain text: a path like a[b] is not markup

from engine.errors import HieruiError, is_oom

# each module registers its commands on the apps when it is imported
from hierui.cli import attribute, batch, check, explore, kld, prune, sensitivity, sessions, store  # noqa: F401
from hierui.cli.apps import app, cache_app, models_app
from hierui.cli.checks import reject_empty_paths
from hierui.output import err_console
from hierui.tokentext import escape  # a message may quote a file's text or an argument: no control characters

# the order of `hierui --help` (models and cache, groups, come last)
COMMANDS = (
    "explore",
    "show",
    "replay",
    "attribute",
    "batch",
    "report",
    "prune",
    "plan",
    "kld",
    "sensitivity",
    "check",
    "noise",
)
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
    from typer import Abort
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    try:
        reject_empty_paths(sys.argv[1:] if argv is None else argv)
        if not {"--help", "-h"} & set(sys.argv[1:] if argv is None else argv):
            from engine.record.paths import hierui_home

            hierui_home()  # $HIERUI_HOME that is not a folder: one line before any command starts
        # not standalone: a usage error comes back here to be one line, not click's box
        code = _command()(args=argv, prog_name="hierui", standalone_mode=False)
        # as click's standalone mode: always SystemExit, with typer.Exit(N)'s code (or click's ctx.exit)
        sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)
    except NoArgsIsHelpError as e:  # a group without its command: typer printed the help
        sys.exit(e.exit_code)
    except ClickException as e:
        said = usage_error(e, sys.argv[1:] if argv is None else argv)
        err_console.print(Text("error: ", style="bold red") + Text(said), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except Abort:  # click's end of input at a prompt
        err_console.print("aborted", highlight=False)
        sys.exit(1)
    except HieruiError as e:
        from engine.run.plan import last_figure

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


def _command():
    """The typer app as its click command, every help text in it plain text: typer renders help as rich markup,
    which would take `[ray]` in `pip install 'hierui[ray]'` for a style and drop it."""
    import typer.main
    from rich.markup import escape as plain

    def walk(command) -> None:
        for name in ("help", "short_help", "epilog"):
            if isinstance(getattr(command, name, None), str):
                setattr(command, name, plain(getattr(command, name)))
        for param in command.params:
            if isinstance(getattr(param, "help", None), str):
                param.help = plain(param.help)
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    command = typer.main.get_command(app)
    walk(command)
    return command


def usage_error(e, args: list[str]) -> str:
    """A click usage error (a malformed or unknown option, a missing argument, an unknown command) as one line:
    the command, what is wrong, and its help. An unknown option is suggested only the command's own visible
    options that are close to it, and the commands that have it where it is another command's."""
    from typer._click.exceptions import NoSuchOption

    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else _command_path(args)
    if isinstance(e, NoSuchOption) and ctx is not None:
        message = f"no such option {e.option_name}" + _option_hints(e.option_name, ctx)
    else:
        message = e.format_message()
    message = " ".join(escape(message).split()).rstrip(".")
    return f"{path}: {message}{'' if message.endswith('?') else '.'} See {path} --help"


def _command_path(args: list[str]) -> str:
    """`hierui COMMAND [SUBCOMMAND]` as far as `args` name commands (for an error click gives no context)."""
    import typer.main

    command, path = typer.main.get_command(app), ["hierui"]
    for arg in args:
        sub = getattr(command, "commands", {}).get(arg)
        if sub is None:
            if not arg.startswith("-"):
                break
            continue
        command = sub
        path.append(arg)
    return " ".join(path)


def _option_hints(name: str, ctx) -> str:
    import difflib

    def visible(command) -> list[str]:
        return [o for p in command.params if not getattr(p, "hidden", False) for o in (*p.opts, *p.secondary_opts)]

    own = [o for o in visible(ctx.command) if o.startswith("--")]
    close = difflib.get_close_matches(name.lstrip("-"), [o[2:] for o in own], n=3, cutoff=0.7)
    if close:
        return f": did you mean {' or '.join('--' + c for c in close)}?"
    root = ctx.find_root().command
    others = [n for n, c in getattr(root, "commands", {}).items() if name in visible(c)]
    if others:
        return f": it is an option of {', '.join('hierui ' + n for n in others)}"
    return ""


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
