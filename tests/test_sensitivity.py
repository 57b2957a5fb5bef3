"""hierui sensitivity (engine.sensitivity): a unit perturbed alone, scored from the cached dense input of its layer,
gives exactly `hierui kld`'s per-token numbers on a model where only that unit is perturbed; the dense model is
left as it was; an interrupted run resumes to the same table; bad input is one line before any model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.kld import corpus as kld
from engine.perturb.spec import parse_spec
from engine.sensitivity import folder
from engine.sensitivity.units import units as units_of

CTX = 32
TEXT = " ".join(f"Sentence number {i} tells of a {w} that walked to the river." for i, w in enumerate("abcde"))


@pytest.fixture(scope="module")
def magnitude(tiny):
    from engine.perturb import perturb

    return perturb(tiny, "magnitude:0.5", use_cache=False)


@pytest.fixture(scope="module")
def dense(tiny):
    from engine.sensitivity.dense import DenseSide

    return DenseSide(tiny, kld.frame(tiny.tokenizer, TEXT, "test", "tiny-random", CTX, None))


def _single_unit_model(loaded, pair, unit):
    """By hand: a sharing clone of the dense model with only `unit`'s matrices taken from the perturbed model
    (pruned weights assigned; a quantized module put in its place)."""
    from engine.anatomy.linears import decoder_layers, weight_views
    from engine.perturb.pair import ModelPair, clone_sharing

    clone = clone_sharing(loaded.model)
    mine, theirs = decoder_layers(clone)[unit.layer], decoder_layers(pair.perturbed)[unit.layer]
    perturbed_views = {v.name: v for v in weight_views(theirs, unit.layer)}
    for v in weight_views(mine, unit.layer):
        if v.name not in unit.views:
            continue
        if v.name in perturbed_views:
            v.assign(perturbed_views[v.name].matrix().detach().clone())
        else:  # int8/nf4: the quantized module of the perturbed model
            mine.set_submodule(v.name, theirs.get_submodule(v.name))
    return ModelPair(dense=loaded.model, perturbed=clone, tokenizer=loaded.tokenizer, spec=pair.spec)


def _measured(dense, pair, units):
    from engine.sensitivity.measure import measure_level

    rows, tokens = [], {}
    measure_level(
        dense, pair.perturbed, pair.spec, units, set(), rows.append, lambda u, t: tokens.__setitem__(u.name, t)
    )
    return rows, tokens


@pytest.mark.parametrize("kind", ["layer", "sublayer", "matrix"])
def test_a_unit_scores_as_hierui_kld_on_a_model_where_only_it_is_perturbed(tiny, magnitude, dense, kind):
    """Guards the core claim: starting from the cached dense input of the unit's layer (stand-ins for the layers
    before it) and scoring against the stored dense head inputs gives `hierui kld --prune`'s per-token numbers for
    a model built by hand with only that unit perturbed (engine.kld.corpus.score), to 1e-5."""
    units = units_of(tiny.model, kind)
    chosen = [units[0], units[len(units) // 2], units[-1]]  # layer 0 (no stand-in), a middle one, the last
    rows, tokens = _measured(dense, magnitude, chosen)
    assert [r["unit"] for r in rows] == [u.name for u in chosen]
    for unit, row in zip(chosen, rows):
        run = kld.score(tiny, [_single_unit_model(tiny, magnitude, unit)], TEXT, "test", ctx=CTX)
        theirs = run.results[0].tokens
        for name in ("kl", "kl_rev", "nll_p", "nll_d", "dp"):
            np.testing.assert_allclose(tokens[unit.name][name], theirs[name], rtol=0, atol=1e-5, err_msg=name)
        assert np.array_equal(tokens[unit.name]["same_top"], theirs["same_top"])
        summary = run.summaries()[0]
        assert row["kl_mean"] == pytest.approx(summary["kl_mean"], abs=1e-6)
        assert row["kl_mean_lo"] == pytest.approx(summary["kl_mean_lo"], abs=1e-6)
        assert row["ppl_p"] == pytest.approx(summary["ppl_p"], rel=1e-5) and row["kl_mean"] > 0


def test_the_dense_side_kept_or_remade_gives_the_same_numbers(tiny, magnitude, dense, monkeypatch):
    """Guards engine.sensitivity.dense.KEPT_BYTES: the dense log-probabilities kept for the run (small corpora) and
    remade from the head's inputs per layer (large ones) give the very same per-token numbers."""
    from engine.sensitivity import dense as dense_module

    assert dense.kept is not None  # tiny-random's fit
    monkeypatch.setattr(dense_module, "KEPT_BYTES", 0)
    remade = dense_module.DenseSide(tiny, dense.run)
    assert remade.kept is None
    units = units_of(tiny.model, "layer")[1:2]
    _rows, kept = _measured(dense, magnitude, units)
    _rows, made = _measured(remade, magnitude, units)
    for name, values in kept[units[0].name].items():
        assert np.array_equal(values, made[units[0].name][name]), name


def test_a_unit_swapped_in_leaves_every_other_tensor_dense_and_is_taken_out_again(tiny, magnitude):
    """Guards engine.sensitivity.swap: inside the block only the unit's weights are the perturbed model's (every
    other parameter the very same dense tensor); afterwards the model is the dense one again, tensor for tensor and
    value for value, also when the block raises."""
    import torch

    from engine.anatomy.linears import decoder_layers, weight_views
    from engine.sensitivity.swap import swapped

    model = tiny.model
    before = {name: p for name, p in model.named_parameters()}
    values = {name: p.detach().clone() for name, p in before.items()}
    unit = units_of(model, "sublayer")[3]  # layers.1.mlp
    layer, theirs = decoder_layers(model)[unit.layer], decoder_layers(magnitude.perturbed)[unit.layer]
    perturbed = dict(magnitude.perturbed.named_parameters())
    inside = {f"model.layers.{unit.layer}.{v}.weight" for v in unit.views}
    with pytest.raises(RuntimeError, match="boom"):
        with swapped(layer, theirs, weight_views(layer, unit.layer), unit.views):
            now = dict(model.named_parameters())
            assert set(now) == set(before)
            for name, p in now.items():
                if name in inside:
                    assert p is perturbed[name] and not torch.equal(p, values[name])
                else:
                    assert p is before[name]
            raise RuntimeError("boom")
    for name, p in model.named_parameters():
        assert p is before[name] and torch.equal(p, values[name])


def test_an_interrupted_run_resumes_to_the_same_table(tiny, tmp_path):
    """Guards resuming: rows are appended as they finish, so a run stopped after k rows and run again measures only
    the others, and its table equals an uninterrupted run's (the timings aside)."""
    from engine.perturb import perturb
    from engine.sensitivity.levels import levels
    from engine.sensitivity.run import run_sensitivity

    chosen = levels(parse_spec("magnitude:0.5"), [0.3, 0.6])

    def go(out, on_row=None):
        wanted = folder.manifest("tiny-random", chosen[0], chosen, "sublayer", "test", kld.text_hash(TEXT), CTX, None,
                                 "cpu", "auto", None)  # fmt: skip
        assert folder.check_out(wanted, out) is not None
        opened = []

        def open_level(level):
            opened.append(str(level))
            return perturb(tiny, level)

        rows = run_sensitivity(tiny, open_level, chosen, "sublayer", TEXT, "test", CTX, None, out, wanted,
                               on_row=on_row)  # fmt: skip
        return rows, opened

    whole, _ = go(tmp_path / "whole")

    class Stop(Exception):
        pass

    seen = []

    def stop_after_ten(row):
        seen.append(row)
        if len(seen) == 10:  # inside the second level
            raise Stop

    with pytest.raises(Stop):
        go(tmp_path / "cut", stop_after_ten)
    assert len(folder.read_rows(tmp_path / "cut")) == 10
    assert not (tmp_path / "cut" / folder.TABLE).exists()
    resumed, opened = go(tmp_path / "cut")
    assert opened == ["magnitude:0.6"]  # the first level is complete: not perturbed again

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(resumed) == strip(whole) and len(whole) == 16
    table = strip(folder.read_table(tmp_path / "cut"))
    assert table == strip(folder.read_table(tmp_path / "whole")) == strip(whole)


def test_int8_units_are_the_quantized_modules_swapped_in(tiny, dense):
    """Guards quantization as a unit: int8's bitsandbytes modules put into the dense layer give `hierui kld`'s
    numbers for a model where only that sublayer's linears are quantized."""
    pytest.importorskip("bitsandbytes")
    from engine.perturb import perturb

    pair = perturb(tiny, "int8", use_cache=False)
    unit = units_of(tiny.model, "sublayer")[2]
    _rows, tokens = _measured(dense, pair, [unit])
    run = kld.score(tiny, [_single_unit_model(tiny, pair, unit)], TEXT, "test", ctx=CTX)
    np.testing.assert_allclose(tokens[unit.name]["kl"], run.results[0].tokens["kl"], rtol=0, atol=1e-5)
    assert float(np.mean(tokens[unit.name]["kl"])) > 0


# ------------------------------------------------------------------ the command


def _text(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize(
    "args, what",
    [
        (["-p", "wanda:0.5", "--unit", "head"], "unknown --unit 'head'"),
        (["-p", "attndrop:1"], "drops whole sublayers"),
        (["-p", "none"], "changes nothing"),
        (["-p", "magnitude:0.5", "--sparsities", "0.3,x"], "'x' is not a number"),
        (["-p", "magnitude:0.5", "--sparsities", "0.3,1.2"], "outside (0, 1)"),
        (["-p", "wanda:2:4", "--sparsities", "0.3"], "N:M pattern fixes its sparsity"),
        (["-p", "int8", "--sparsities", "0.3"], "quantization has no sparsity"),
        (["-p", "int8", "--allocate", "0.5"], "--allocate does not go with --prune int8"),
        (["-p", "magnitude:0.5", "--allocate", "1.5"], "--allocate 1.5"),
        (["-p", "magnitude:0.5", "--suite", "heldout", "--text", "TEXT"], "give --text or --suite, not both"),
        ([], "give --prune SPEC"),
    ],
)
def test_bad_input_is_one_line_before_loading(cli, tmp_path, monkeypatch, args, what):
    """Guards the command's contract: each mistake is one line, exit 2, and no model loads."""
    import engine.run.open

    monkeypatch.setattr(engine.run.open, "open_dense", lambda *a, **k: pytest.fail("a model was loaded"))
    args = [str(_text(tmp_path)) if a == "TEXT" else a for a in args]
    r = cli("sensitivity", "-m", "tiny-random", "--device", "cpu", "--out", tmp_path / "o", *args)
    assert r.returncode == 2 and what in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_command_writes_the_table_prints_it_and_refuses_another_run_into_its_folder(cli, tmp_path):
    """Guards the command end to end on a tiny model: the table (units × levels) in Parquet and CSV, the terminal
    table sorted by damage, the allocation file --allocate writes, one line for another run into the folder, and
    `hierui report` on the folder (its sensitivity section and heatmap)."""
    text, out = _text(tmp_path), tmp_path / "o"
    args = ["sensitivity", "-m", "tiny-random", "--device", "cpu", "--text", text, "--ctx", CTX, "--out", out]
    r = cli(*args, "-p", "magnitude:0.5", "--sparsities", "0.4,0.6", "--allocate", "0.5")
    assert r.returncode == 0, r.stderr
    rows = folder.read_table(out)
    assert len(rows) == 8 and {r["level"] for r in rows} == {"magnitude:0.4", "magnitude:0.6"}
    assert (out / folder.CSV).is_file() and "per-unit damage" in r.stdout
    shown = [line.split()[0] for line in r.stdout.splitlines() if line.strip().startswith("layers.")]
    worst = max(rows, key=lambda row: row["kl_mean"])
    assert shown and shown[0] == worst["unit"]
    allocation = json.loads((out / "allocation.json").read_text())
    assert allocation["target"] == 0.5 and set(allocation["layers"]) == {"0", "1", "2", "3"}
    again = cli(*args, "-p", "magnitude:0.5", "--sparsities", "0.4,0.6", "--unit", "sublayer")
    assert again.returncode == 2 and "--unit differs" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    report = cli("report", out)
    page = (out / "report.html").read_text()
    assert report.returncode == 0 and "Sensitivity: one unit perturbed at a time" in page
    assert 'id="sensitivity-heatmap' in page and f"most damaging unit is {worst['unit']}" in page
    kld = cli(
        "kld", "-m", "tiny-random", "--device", "cpu", "--text", text, "--ctx", CTX, "-p", "magnitude:0.5", "--out", out
    )
    assert kld.returncode == 0, kld.stderr  # a kld run into the same folder: its page keeps the sensitivity section
    page = (cli("report", out), (out / "report.html").read_text())[1]
    assert page.index('<section id="corpus-kld">') < page.index("Sensitivity: one unit perturbed at a time")


# ------------------------------------------------------------------ the zoo


def _zoo_families():
    from engine.models.zoo import FAMILIES

    return list(FAMILIES)


@pytest.mark.slow
@pytest.mark.parametrize("family", _zoo_families())
@pytest.mark.parametrize("kind", ["sublayer", "matrix"])
def test_every_zoo_family_scores_a_unit_as_a_hand_built_model(family, kind):
    """Guards the stand-ins and the swap on every family (sliding and full layers, soft-capped logits, output norms,
    Conv1D, parallel residual, experts): a middle unit's and the last unit's numbers equal `hierui kld`'s on a model
    built by hand with only that unit pruned, and the dense model is left as it was."""
    import torch

    from engine.models.loading import load
    from engine.perturb import perturb
    from engine.sensitivity.dense import DenseSide

    loaded = load(f"tiny-random:{family}", device="cpu", dtype="float32")
    before = {n: (p, p.detach().clone()) for n, p in loaded.model.named_parameters()}
    pair = perturb(loaded, "magnitude:0.5", use_cache=False)
    dense = DenseSide(loaded, kld.frame(loaded.tokenizer, TEXT, "test", family, CTX, None))
    units = units_of(loaded.model, kind)
    chosen = [units[len(units) // 2], units[-1]]
    _rows, tokens = _measured(dense, pair, chosen)
    for unit in chosen:
        run = kld.score(loaded, [_single_unit_model(loaded, pair, unit)], TEXT, "test", ctx=CTX)
        theirs = run.results[0].tokens
        np.testing.assert_allclose(tokens[unit.name]["kl"], theirs["kl"], rtol=0, atol=1e-5, err_msg=unit.name)
        np.testing.assert_allclose(tokens[unit.name]["nll_p"], theirs["nll_p"], rtol=0, atol=1e-5, err_msg=unit.name)
    for name, p in loaded.model.named_parameters():
        assert p is before[name][0] and torch.equal(p, before[name][1]), name


@pytest.mark.slow
@pytest.mark.parametrize("family", _zoo_families())
def test_the_command_runs_on_every_zoo_family(cli, tmp_path, family):
    """Guards the issue's "done when": `hierui sensitivity` end to end on a tiny model of each zoo family."""
    out = tmp_path / "o"
    args = ["-m", f"tiny-random:{family}", "--device", "cpu", "--dtype", "float32", "-p", "magnitude:0.5"]
    r = cli("sensitivity", *args, "--text", _text(tmp_path), "--ctx", CTX, "--unit", "sublayer", "--out", out)
    assert r.returncode == 0, r.stderr
    rows = folder.read_table(out)
    assert len(rows) == 8 and all(row["kl_mean"] > 0 for row in rows)


def test_the_table_reads_whole_at_80_columns():
    """At 80 columns the compact table keeps every unit name and number whole (no cut with …); at 130: the interval."""
    from rich.console import Console

    from hierui.views.sensitivity import sensitivity_table

    rows = [
        {"unit": f"layers.{i}.attention", "level": f"wanda:{s}", "sparsity": s, "kl_mean": 0.0717 * (i + 1) * s,
         "kl_mean_lo": 0.06, "kl_mean_hi": 0.08, "kl_p99": 0.182, "same_top": 0.411, "ppl_delta": -52.04}
        for i in range(12) for s in (0.4, 0.6)
    ]  # fmt: skip
    for width, wanted in ((80, "11.attention"), (130, "95% interval")):
        console = Console(width=width, record=True, color_system=None)
        console.print(sensitivity_table(rows, None, width))
        text = console.export_text()
        assert wanted in text and "…" not in text.replace(" … ", "")
        assert max(len(line) for line in text.splitlines()) <= width
