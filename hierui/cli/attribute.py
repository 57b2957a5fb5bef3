"""`hierui attribute`: which units' damage flips the token at a recorded step, by patching the dense outputs of
blocks, attention and MLP into the perturbed forward (engine.run.attribution); printed per step, --out as rows."""

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from engine.errors import HieruiError
from hierui.cli import checks, launch, options
from hierui.cli.apps import app
from hierui.output import console, err_console
from hierui.views.session import print_warnings

RecordedDtype = options.recorded_dtype()
Model, Calib, Spec = options.confirmed_model(), options.confirmed_calib(), options.confirmed_spec()
Out = options.out("write every unit's row here: Parquet if it ends in .parquet, else JSON Lines")


@app.command()
def attribute(
    session: Path = typer.Argument(..., help="a session file (.jsonl)", show_default=False),
    steps: Optional[list[int]] = typer.Option(
        None,
        "--step",
        help="the step to attribute, counted from 1 as on screen and in `show --steps`; repeatable (default: flips)",
    ),
    out: Out = None,
    top: int = typer.Option(10, "--top", min=0, help="units shown per list (sublayers, blocks); 0: all"),
    greedy: bool = typer.Option(True, "--greedy/--no-greedy", help="search the smallest set restoring the top-1"),
    device: options.Device = "auto",
    dtype: RecordedDtype = None,
    gpu_mem: options.GpuMem = None,
    gpus: options.Gpus = None,
    no_cache: options.NoCache = False,
    model: Model = None,
    calib: Calib = None,
    spec: Spec = None,
) -> None:
    """Which units' damage flips the token at a recorded step (loads the session's models).

    At each step, patch the dense output of every block, attention and MLP into the perturbed forward and rank
    them by the KL their restoration removes."""
    from engine.models.devices import check_device

    if session.is_dir():
        raise HieruiError(f"{session} is a directory: attribute takes one session file")
    checks.output_file(out, "--out")
    checks.check_dtype(dtype)
    checks.check_calib_file(calib)
    check_device(device)
    from engine.record.session import load_session
    from engine.run import rerun as R

    recorded = load_session(session)
    print_warnings(recorded.warnings)
    wanted = _steps_to_attribute(session, recorded, steps)
    plan = R.plan_rerun(recorded, model=model, calib=calib, spec=spec)  # refuses paths the file names
    if model is not None:
        from engine.models.names import resolve

        resolve(model)
    if not wanted:
        console.print(f"no flip step to attribute in {session}: the two models' top-1 agree at every compared step")
        return
    request = R.rerun_request(recorded, plan, device, dtype, gpu_mem, gpus, use_cache=not no_cache)
    from rich.text import Text

    from hierui.tokentext import escape

    console.print(Text(f"attributing with {escape(plan.describe())}"), highlight=False, soft_wrap=True)
    memory = launch.print_plan(request, always=False)
    results, tokenizer = _attribute_steps(recorded, wanted, plan, request, memory, greedy)
    from engine.run import attribution as A

    records = recorded.steps
    for step, result in results:
        _print_attribution(step, result, records[step], tokenizer, top, same=A.same_context(records, step))
    if out is not None:
        rows = [row for step, result in results for row in result.rows(step)]
        _write_rows(out.expanduser(), rows)
        console.print(f"{len(rows)} rows: {out}", highlight=False, soft_wrap=True)


def _steps_to_attribute(session: Path, recorded, steps: list[int] | None) -> list[int]:
    """The records' indices to attribute: --step N (counted from 1, as on screen and in `show`) or every flip;
    one line now for a step that is not there or comes after the perturbed model's end."""
    from engine.run import attribution as A

    header, records = recorded.header, recorded.steps
    if not records:
        raise HieruiError(f"{session} has no recorded steps to attribute")
    mode = header.mode
    for n in steps or []:
        if not 1 <= n <= len(records):
            raise HieruiError(f"no step {n} in {session}: it has steps 1..{len(records)} (counted from 1)")
    wanted = [n - 1 for n in dict.fromkeys(steps)] if steps else A.flip_steps(records, mode)
    for step in wanted:
        A.context_at(header, records, step)
    return wanted


def _attribute_steps(recorded, wanted: list[int], plan, request, memory, greedy: bool):
    """Open the pair the rerun plan names (engine.run.rerun.open_session_pair: by `request` and its memory plan,
    the session's token ids checked against the loaded model before it runs) and attribute each wanted step:
    [(step, result)] and the tokenizer."""
    from engine.run import attribution as A
    from engine.run.rerun import open_session_pair
    from hierui.progress import stage_progress

    header, records = recorded.header, recorded.steps
    temperature = header.temperature
    results = []
    with stage_progress(err_console) as (_say, step_progress):
        pair, loaded, _ = open_session_pair(recorded, plan, request, memory, progress=step_progress)
        for n, step in enumerate(wanted):
            step_progress("attributing", n, len(wanted))
            results.append((step, A.attribute(pair, A.context_at(header, records, step), temperature, greedy=greedy)))
        step_progress("attributing", len(wanted), len(wanted))
    return results, loaded.tokenizer


def _print_attribution(step: int, result, record: dict, tokenizer, top: int, same: bool) -> None:
    """One step's attribution: the headline, the units ranked (sublayers, then blocks), the minimal set."""
    from rich.text import Text

    from hierui.format import step_label
    from hierui.tokentext import escape

    def token(t: int) -> str:
        return repr(escape(tokenizer.decode([t])))

    recorded = record.get("kl")
    tokens = f"dense {token(result.top1_d)} · perturbed {token(result.top1_p)}"
    head = f"step {step_label(step)}: {tokens} · KL {result.kl:.4g}"
    if recorded is not None:
        head += f" (recorded {recorded:.4g})"
    head += f" · {result.seconds:.1f} s"
    console.print(Text(head, style="bold"), highlight=False, soft_wrap=True)
    if not same:
        console.print(
            "  the texts split before this step: both models were given the perturbed model's context",
            style="yellow",
            highlight=False,
        )
    console.print(_units_table(result, top))
    if result.minimal_set is not None:
        if result.top1_d == result.top1_p:
            what = "the top-1 already agrees: nothing to restore"
        else:
            names = ", ".join(result.minimal_set)
            what = f"{names} ({'restores' if result.minimal_restores else 'does not restore'} the dense top-1)"
        console.print(f"  smallest set (greedy): {what}", highlight=False, soft_wrap=True)
    if result.skipped:
        console.print(f"  not in the perturbed model: {', '.join(result.skipped)}", style="dim", highlight=False)
    console.print()


def _units_table(result, top: int) -> Table:
    """The units ranked by the KL their restoration removes: sublayers, then blocks, `top` of each (0: all)."""
    table = Table(box=None, pad_edge=False, show_edge=False)
    for name, justify in (("rank", "right"), ("unit", "left"), ("KL removed", "right"), ("KL patched", "right")):
        table.add_column(name, justify=justify)
    table.add_column("restores top-1")
    table.add_column("in set")
    chosen = set(result.minimal_set or [])
    for group in ("sublayer", "block"):
        units = result.ranked(group)
        shown = units[:top] if top else units
        for u in shown:
            table.add_row(
                str(u.rank),
                u.unit,
                "—" if u.restored_kl is None else f"{u.restored_kl:.1%}",
                f"{u.kl_patched:.4g}",
                "yes" if u.restores_top1 else "",
                "●" if u.unit in chosen else "",
            )
        if len(shown) < len(units):
            table.add_row("", f"… {len(units) - len(shown)} more", "", "", "", "", style="dim")
        if group == "sublayer" and units:
            table.add_section()
    return table


def _write_rows(path: Path, rows: list[dict]) -> None:
    """`hierui attribute --out`: Parquet (engine.record.schema's types) for a .parquet suffix, else JSON Lines."""
    import json

    from engine.record import schema
    from engine.record.paths import atomic_write

    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = schema.to_table(rows, {"step": schema.INT, **schema.ATTRIBUTION_FIELDS}, str(path))
        atomic_write(path, lambda tmp: pq.write_table(table, str(tmp)))
    else:
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
