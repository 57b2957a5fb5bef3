"""hierui's product face: the typer CLI and the Textual app."""
