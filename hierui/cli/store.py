"""`hierui models` (the aliases, what is cached, pull) and `hierui cache` (list, clear): what hierui keeps on
disk. Listing imports no torch."""

from pathlib import Path

import typer
from rich.table import Table

from hierui.cli import launch, options
from hierui.cli.apps import cache_app, models_app
from hierui.output import console, err_console


@models_app.callback()
def models_list(ctx: typer.Context) -> None:
    """List the aliases, their targets, and which are cached locally."""
    if ctx.invoked_subcommand is not None:
        return
    from rich import box

    from engine.models.hub import list_models
    from engine.record.paths import models_dir

    rows = list_models()
    table = Table(title="models (--model NAME)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("alias", no_wrap=True)
    table.add_column("target", overflow="fold")
    table.add_column("cached", no_wrap=True)
    for row in rows:
        cached = "built in" if row["where"] == "built in" else "yes" if row["cached"] else "-"
        table.add_row(row["alias"], row["target"], cached)
    console.print(table)
    # where the cached ones are: paths of any length, wrapped (never cut) at the terminal's width
    console.print(f"converted models are kept in {models_dir()}", highlight=False, overflow="fold")
    for row in rows:
        if row["cached"] and row["where"] and row["where"] != "built in":
            console.print(f"  {row['alias']}: {row['where']}", highlight=False, overflow="fold")


@models_app.command("pull")
def models_pull(name: str = typer.Argument(..., help=options.MODEL_HELP)) -> None:
    """Fetch (and convert) a model so later runs need no network."""
    from engine.models.hub import pull
    from engine.models.names import resolve

    resolve(name)
    launch.quiet_libraries()
    from hierui.progress import stage_progress

    with stage_progress(err_console) as (say, _step):
        where = pull(name, progress=say)
    console.print(f"{name}: ready" + (f" in {where}" if where else " (built in, nothing to fetch)"))


@cache_app.callback()
def cache_list(ctx: typer.Context, kind: options.Kind = None) -> None:
    """List the cache entries; stale ones (made by another algorithm or hierui version) are never reused."""
    if ctx.invoked_subcommand is not None:
        return
    from engine.perturb import cache
    from engine.record.paths import hierui_home

    found = cache.entries(kind)
    table = Table(title=f"cache of hierui {cache.hierui_version()} in {hierui_home()}", title_justify="left")
    for col in ("kind", "model", "spec", "made by", "size", "age", "stale"):
        table.add_column(col, justify="right" if col in ("size", "age") else "left")
    for e, spec in zip(found, _specs(found, cache.entries("calib") if kind else found)):
        table.add_row(e.kind, e.model, spec, e.versions, _size(e.size), _age(e.age()), "yes" if e.stale else "-")
    console.print(table)
    stale = sum(e.stale for e in found)
    console.print(
        f"{_entries(len(found))}, {_size(sum(e.size for e in found))}, {stale} stale"
        + (": hierui cache clear --stale removes them" if stale else "")
    )


@cache_app.command("clear")
def cache_clear(
    stale: bool = typer.Option(False, "--stale", help="only the stale entries"),
    kind: options.Kind = None,
) -> None:
    """Remove cache entries (all of them, or the stale ones); converted models are kept."""
    from engine.perturb import cache

    removed = cache.clear(kind, stale_only=stale)
    what = " ".join(w for w in ("stale" if stale else "", kind or "") if w)
    console.print(
        f"removed {len(removed)} {what + ' ' if what else ''}cache {_entries(len(removed), False)} "
        f"({_size(sum(e.size for e in removed))})"
    )


def _specs(found: list, calibs: list) -> list[str]:
    """The spec column, so that no two rows read the same: where entries of one kind, model, spec and version
    differ only in what the row does not show, each says what differs, and only that (the dtype, the calibration
    as its calib entry lists it, the calibration file, the model's weights behind one name, or else the key)."""
    named = {(c.meta or {}).get("key"): f"calib {c.spec}" for c in calibs}

    def details(e) -> dict:
        meta = e.meta or {}
        calib = meta.get("calibration")
        source = meta.get("source_path") if e.kind == "calib" else None
        return {
            "dtype": str(meta.get("dtype") or "").removeprefix("torch."),
            "calibration": named.get(calib) or f"calib {str(calib)[:8]}" if isinstance(calib, str) else "",
            "file": Path(source).name if source else "",
            "weights": f"weights {str(meta.get('model_key') or '')[-12:]}",
            "key": f"key {e.path.name[:8]}",
        }

    groups: dict[tuple, list[int]] = {}
    for i, e in enumerate(found):
        groups.setdefault((e.kind, e.model, e.spec, e.versions), []).append(i)
    out = [e.spec for e in found]
    for members in groups.values():
        if len(members) < 2:
            continue
        seen = [details(found[i]) for i in members]
        shown: list[str] = []  # the fields that differ, in order, until they tell every entry apart
        for field in seen[0]:
            if len({d[field] for d in seen}) > 1:
                shown.append(field)
                if len({tuple(d[f] for f in shown) for d in seen}) == len(seen):
                    break
        for i, d in zip(members, seen):
            out[i] += "".join(f" · {d[f] or 'no ' + f}" for f in shown)
    return out


def _entries(n: int, count: bool = True) -> str:
    word = "entry" if n == 1 else "entries"
    return f"{n} {word}" if count else word


def _size(n: float) -> str:
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"


def _age(seconds: float) -> str:
    for limit, div, unit in ((60, 1, "s"), (3600, 60, "m"), (86400, 3600, "h")):
        if seconds < limit:
            return f"{int(seconds // div)}{unit}"
    return f"{int(seconds // 86400)}d"
