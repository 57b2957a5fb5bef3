"""The Jinja2 environment the report pages render with: templates/, autoescape, undefined names an error."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
