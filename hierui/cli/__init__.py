"""The `hierui` command line (typer): one module per command group, the options they share declared once
(options.py), the input checks they share (checks.py). Heavy imports (torch, transformers) happen inside
commands."""

from hierui.cli.entry import app, main

__all__ = ["app", "main"]
