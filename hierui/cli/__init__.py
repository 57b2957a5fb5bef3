"""The typer app: every hierui command."""

from hierui.cli.commands import app, main

__all__ = ["app", "main"]
