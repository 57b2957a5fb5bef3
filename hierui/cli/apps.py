"""The typer apps (`hierui`, `hierui models`, `hierui cache`) that every command module registers on."""

import typer


def _help_without_type_artefacts() -> None:
    """typer 0.29's rich help prints a Python type beside every option: `<bool>` beside each flag (even
    `--help <bool>`, though a flag takes no value), `<str>`, `<list[str]>`, `<int range>`. Show what click
    shows instead: nothing beside a flag, TEXT, INTEGER, FLOAT or PATH beside a value."""
    from typer.core import TyperArgument, TyperOption

    names = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "bool": "BOOLEAN"}
    for cls in (TyperOption, TyperArgument):
        shown = getattr(cls, "display_type_rich", None)
        if shown is None or getattr(shown, "hierui", False):
            continue

        def display_type_rich(self, ctx, _shown=shown, _names=names):
            if getattr(self, "is_flag", False):
                return None
            label = _shown(self, ctx)
            if not label or self.metavar is not None or not label.startswith("<"):
                return label
            inner, dots = label.rstrip("."), "..." if label.endswith("...") else ""
            inner = inner.strip("<>").removeprefix("list[").removesuffix("]").removesuffix(" range")
            return _names.get(inner, inner) + dots

        display_type_rich.hierui = True
        cls.display_type_rich = display_type_rich


_help_without_type_artefacts()

app = typer.Typer(
    name="hierui",
    help="Explore why pruning breaks generation: a dense and a perturbed LLM side by side.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="List the model aliases and what is cached; fetch a model.", invoke_without_command=True)
app.add_typer(models_app, name="models")
cache_app = typer.Typer(
    help="List and clear the caches: pruned weights, drop scores, calibration batches.", invoke_without_command=True
)
app.add_typer(cache_app, name="cache")
