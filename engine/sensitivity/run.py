"""A whole sensitivity run: levels × units, resumed from OUT (engine.sensitivity.folder).

Per level, the whole model is perturbed ONCE (`open_level`: engine.run.open.open_pair, through the pruned-weight
cache, with the level's calibration as every command gives it), so each unit's tensors are those of that sequentially
pruned model: a unit's mask saw the calibration the sequential run gave its layer (the outputs of the pruned layers
before it), not the dense activations. The dense side is computed once for the run (engine.sensitivity.dense) and each
unit is scored from the cached dense input of its layer (engine.sensitivity.measure). A level whose rows OUT holds
already is not perturbed again."""

from __future__ import annotations

import gc
from collections.abc import Callable

from engine.sensitivity import folder


def run_sensitivity(
    loaded,
    open_level: Callable,
    levels: list,
    unit: str,
    text: str,
    corpus: str,
    ctx: int,
    stride: int | None,
    out,
    wanted: dict,
    progress=None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Measure every unit of `loaded`'s model (--unit `unit`) at every level, the rows OUT holds for this run
    skipped; each finished row appended to OUT (and handed to `on_row`); the tables written at the end. Returns the
    rows, levels × units in order. `open_level(spec)`: the ModelPair of one level over `loaded`."""
    from engine.kld.corpus import frame
    from engine.models.configs import config_int
    from engine.place.streaming import is_streamed
    from engine.sensitivity.dense import DenseSide
    from engine.sensitivity.measure import measure_level
    from engine.sensitivity.units import units as units_of

    if is_streamed(loaded.model):
        from engine.errors import HieruiError

        raise HieruiError("hierui sensitivity needs the model in memory, not streamed: raise --gpu-mem or use --dtype")
    units = units_of(loaded.model, unit)
    folder.write_manifest(out, wanted)
    done = {(row["unit"], row["level"]) for row in folder.read_rows(out)}

    def finished(row: dict) -> None:
        folder.append_row(out, row)
        done.add((row["unit"], row["level"]))
        if on_row is not None:
            on_row(row)

    todo = [level for level in levels if any((u.name, str(level)) not in done for u in units)]
    if todo:
        max_ctx = config_int(loaded.model.config.to_dict(), "max_position_embeddings")
        run = frame(loaded.tokenizer, text, corpus, loaded.ref.name, ctx, stride, max_ctx)
        dense = DenseSide(loaded, run, progress)
        for level in todo:
            pair = open_level(level)
            measure_level(dense, pair.perturbed, level, units, done, finished, progress=progress)
            del pair
            gc.collect()
    rows = folder.ordered(folder.read_rows(out), levels, units)
    folder.write_tables(out, rows)
    return rows


def unit_table(model, unit: str) -> list:
    """The units of `model` for --unit `unit` (engine.sensitivity.units), for `allocation`."""
    from engine.sensitivity.units import units as units_of

    return units_of(model, unit)


def allocation(
    rows: list[dict], units: list, unit: str, method: str, target: float, out=None, lo=None, hi=None
) -> dict:
    """`--allocate TARGET`: the allocation file engine.perturb.allocation.allocate_from_table makes from the
    measured rows (each unit's KLD at each sparsity level), written to OUT/allocation.json when `out` is given."""
    import json
    from pathlib import Path

    from engine.perturb.allocation import allocate_from_table
    from engine.record.paths import atomic_write

    by_name = {u.name: u for u in units}
    table = [
        {
            "unit": row["unit"],
            "unit_kind": unit,
            "layer": row["layer"],
            "matrices": [f"layers.{row['layer']}.{name}" for name in by_name[row["unit"]].views],
            "weights": row["weights"],
            "level": row["sparsity"],
            "kl_mean": row["kl_mean"],
        }
        for row in rows
    ]
    data = allocate_from_table(table, method, target, lo, hi)
    if out is not None:
        atomic_write(Path(out) / ALLOCATION, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return data


ALLOCATION = "allocation.json"
