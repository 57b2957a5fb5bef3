"""engine.results.localization (what the report's "where it breaks" section reads) on hand-made tables, and the
section itself on a real tiny sweep."""

from pathlib import Path

import pytest

from engine.results import localization as W
from engine.results.runs import RunData


def _run(steps=(), summary=(), attribution=(), specs=("a", "b"), manifest=None) -> RunData:
    run = RunData(Path("."), manifest or {}, list(summary), list(steps))
    run.attribution = list(attribution)
    run.specs = list(specs)
    return run


def test_lens_grids_average_each_layer_and_step_over_runs():
    steps = [
        {"run_id": "r1", "spec": "a", "mode": "shared", "step": 0, "lens_kl": [0.1, 0.4]},
        {"run_id": "r1", "spec": "a", "mode": "shared", "step": 1, "lens_kl": [0.2, None]},
        {"run_id": "r2", "spec": "a", "mode": "shared", "step": 0, "lens_kl": [0.3, 0.6]},
        {"run_id": "r3", "spec": "a", "mode": "free", "step": 0, "lens_kl": [9.0, 9.0]},  # another mode
        {"run_id": "r4", "spec": "b", "mode": "shared", "step": 0, "lens_kl": None},  # lens off
    ]
    summary = [{"spec": "a", "mode": "shared"}, {"spec": "a", "mode": "free"}]
    grids = W.lens_grids(_run(steps, summary))
    assert [g.spec for g in grids] == ["a"]
    (grid,) = grids
    assert (grid.layers, grid.steps, grid.runs, grid.mode) == (2, 2, 2, "shared")
    assert grid.values[0] == pytest.approx([0.2, 0.2])
    assert grid.values[1][0] == pytest.approx(0.5) and grid.values[1][1] is None


def test_flip_units_count_who_ranks_first_and_who_is_in_the_minimal_set():
    def unit(run_id, step, name, rank, in_set, restored):
        kind, layer = name.split(".")
        return dict(
            run_id=run_id, spec="a", step=step, unit=name, kind=kind, layer=int(layer), rank=rank,
            in_minimal_set=in_set, restored_kl=restored,
        )  # fmt: skip

    rows = [
        unit("r1", 3, "mlp.2", 1, True, 0.9),
        unit("r1", 3, "attn.0", 2, False, 0.1),
        unit("r1", 3, "block.2", 1, False, 0.95),  # blocks are not sublayers: never "first" here
        unit("r1", 5, "attn.0", 1, True, 0.7),
        unit("r1", 5, "mlp.2", 2, True, 0.5),
        unit("r2", 1, "mlp.2", 1, True, 0.8),
    ]
    units = W.flip_units(_run(attribution=rows))
    assert [(u["unit"], u["first"], u["in_set"], u["flips"]) for u in units] == [
        ("mlp.2", 2, 3, 3),
        ("attn.0", 1, 1, 3),
    ]
    assert units[0]["restored"] == pytest.approx(0.8)  # the median over its flips
    layers = W.flip_layers(_run(attribution=rows))["a"]
    assert layers["mlp"] == {2: 2} and layers["attn"] == {0: 1}


def test_recovery_and_flip_rows():
    summary = [
        {"spec": "a", "mode": "free", "first_divergence": 2, "recovered": True, "recovery_steps": 0},
        {"spec": "a", "mode": "free", "first_divergence": 1, "recovered": False, "recovery_steps": None},
        {"spec": "a", "mode": "free", "first_divergence": 4, "recovered": True, "recovery_steps": 4},
        {"spec": "a", "mode": "free", "first_divergence": None, "recovered": None},
        {"spec": "a", "mode": "shared", "compared_steps": 10, "flips": 4, "near_tie_flips": 1, "kl_mean": 0.2},
        {"spec": "a", "mode": "shared", "compared_steps": 6, "flips": 0, "near_tie_flips": 0, "kl_mean": 0.1},
    ]
    run = _run(summary=summary, specs=["a"], manifest={"noise_floor": {"flip_rate": 0.01, "kl_mean": 1e-6}})
    (rec,) = W.recovery_rows(run)
    assert (rec["runs"], rec["split"], rec["branched"], rec["recovered"]) == (4, 3, 3, 2)
    assert rec["rate"] == pytest.approx(2 / 3) and rec["steps"] == pytest.approx(2.0)
    (flips,) = W.flip_rows(run)
    assert (flips["flips"], flips["compared"], flips["near_ties"]) == (4, 16, 1)
    assert flips["flip_rate"] == pytest.approx(0.25) and flips["floor_flip_rate"] == 0.01


def test_the_report_shows_the_lens_heatmap_of_a_real_sweep(cli, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one prompt\nanother prompt\n")
    out = tmp_path / "out"
    args = ["batch", "--model", "tiny-random", "--prompts", prompts, "--out", out, "--max-new-tokens", "4"]
    r = cli(*args, "--prune", "magnitude:0.5", "--mode", "shared", "--mode", "free")
    assert r.returncode == 0, r.stderr
    r = cli("report", out)
    assert r.returncode == 0, r.stderr
    page = (out / "report.html").read_text()
    section = page[page.index('id="where-it-breaks"') :]
    section = section[: section.index("</section>")]
    assert "half of the final KL is reached by layer" in section
    assert "lens-heatmap" in section  # the heatmap's SVG
    assert "compared steps" in section  # flips beside the (missing) noise floor
    assert "No noise floor recorded" in section


def test_a_sweep_records_the_measured_noise_floor_and_the_report_shows_it(cli, tmp_path, fresh_home):
    import json

    prompts = tmp_path / "p.txt"
    prompts.write_text("one prompt\nanother prompt\n")
    r = cli("noise", "--model", "tiny-random", "--prompts", prompts, "--dtypes", "float32", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = cli("batch", "--model", "tiny-random", "--prompts", prompts, "--out", out, "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    floor = json.loads((out / "batch.json").read_text())["noise_floor"]
    assert floor["dtype"] == "float32" and floor["source"].startswith("hierui noise")
    session = json.loads(next((out / "sessions").glob("*.jsonl")).read_text().splitlines()[0])
    assert session["tie_margin"] == floor["tie_margin"]  # the runs used the measured threshold
    assert cli("report", out).returncode == 0
    page = (out / "report.html").read_text()
    assert "Noise floor of the dense model" in page and "No noise floor recorded" not in page
