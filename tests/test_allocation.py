"""Layer allocations of pruning specs (`wanda:0.6@owl`, `@owl:M:λ`, `@FILE.json`): the grammar, OWL's ratios and
sparsities against hand computations, the global sparsity exact in weights, files checked before loading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engine.errors import HieruiError
from engine.perturb import perturb
from engine.perturb.allocation import Matrix, owl_sparsities, pruned_count, realize, realized
from engine.perturb.spec import parse_spec


def test_grammar_round_trips_and_slugs():
    """What the user types comes back from str() (the cache key and the header hold it) and the slug is a file name."""
    cases = {
        "wanda:0.6@owl": ("wanda:0.6@owl", "wanda-0.6-at-owl"),
        "magnitude:0.7@owl:7:0.1": ("magnitude:0.7@owl:7:0.1", "magnitude-0.7-at-owl-7-0.1"),
        "sparsegpt:0.6@OWL:5:0.08": ("sparsegpt:0.6@owl", "sparsegpt-0.6-at-owl"),
        "wanda:0.5@runs/x/allocation.json": ("wanda:0.5@runs/x/allocation.json", "wanda-0.5-at-allocation"),
        "wanda:0.6@auto": ("wanda:0.6@auto", "wanda-0.6-at-auto"),
        "sparsegpt:0.6@auto:0.4:0.8": ("sparsegpt:0.6@auto:0.4:0.8", "sparsegpt-0.6-at-auto-0.4-0.8"),
    }
    for typed, (text, slug) in cases.items():
        spec = parse_spec(typed)
        assert (str(spec), spec.slug) == (text, slug)
        assert parse_spec(str(spec)) == spec
    assert parse_spec("checkpoint:/models/a@b").path == "/models/a@b"  # a path keeps its '@'


@pytest.mark.parametrize(
    "typed, says",
    [
        ("wanda:2:4@owl", "N:M pattern fixes the sparsity"),
        ("int8@owl", "not to int8"),
        ("attndrop:2@owl", "not to attndrop"),
        ("none@owl", "not to none"),
        ("wanda@owl", "takes a sparsity"),
        ("wanda:0.5@", "nothing after '@'"),
        ("wanda:0.5@owl:1:0.1", "M must be above 1"),
        ("wanda:0.5@owl:5:0.7", "λ must be in [0, 0.5)"),
        ("wanda:0.5@owl:5", "two numbers"),
        ("wanda:0.5@auto:0.6:0.8", "do not hold the target 0.5"),
        ("wanda:0.5@auto:0.8:0.6", "0 ≤ LO < HI < 1"),
    ],
)
def test_bad_allocations_are_one_line(typed, says):
    with pytest.raises(HieruiError) as e:
        parse_spec(typed)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_owl_sparsities_by_hand():
    """OWL's formula: ratios scaled to [0, 2λ], centred on the target density, sparsity = 1 − density."""
    assert owl_sparsities([1.0, 2.0, 3.0], 0.5, 0.1) == pytest.approx([0.6, 0.5, 0.4])
    assert owl_sparsities([0.01, 0.03], 0.7, 0.08) == pytest.approx([0.78, 0.62])  # denser where more outliers
    assert owl_sparsities([0.2, 0.2, 0.2], 0.6, 0.08) == [0.6, 0.6, 0.6]


@pytest.mark.parametrize("per_row", [True, False])
def test_realize_hits_the_target_in_whole_weights(per_row):
    """Whatever the wanted mix, the whole counts the methods prune total the target to within one grain (a row of
    the widest matrix for a per-row method, one weight otherwise), and int() in the methods gives each count back."""
    rng = np.random.default_rng(0)
    shapes = [(64, 48), (48, 64), (96, 48), (48, 96)]
    matrices = [Matrix(layer, f"m{j}", *shapes[j]) for layer in range(6) for j in range(4)]
    wanted = {(m.layer, m.name): float(rng.uniform(0.35, 0.85)) for m in matrices}
    for target in (0.3, 0.5, 0.6, 0.7):
        given = realize(matrices, wanted, per_row, target)
        total = sum(m.weights for m in matrices)
        pruned = sum(pruned_count(m, given[(m.layer, m.name)], per_row) for m in matrices)
        grain = max(m.rows for m in matrices) if per_row else 1
        assert abs(pruned - round(target * total)) <= grain / 2
        fractions = realized(matrices, given, per_row)
        assert sum(fractions[(m.layer, m.name)] * m.weights for m in matrices) == pytest.approx(pruned)


@pytest.mark.parametrize("spec", ["magnitude:0.6@owl", "wanda:0.6@owl", "sparsegpt:0.6@owl", "wanda:0.7@owl:3:0.2"])
def test_global_sparsity_exact_on_a_tiny_model(tiny, tiny_calib, spec):
    """The zeros of the pruned model, counted over every pruned matrix, are the target within 0.001 (the issue's
    bound; uniform wanda:0.6 on this model's 64-wide rows is 0.594), and the layers do differ."""
    pair = perturb(tiny, spec, calibration=tiny_calib, use_cache=False)
    target = parse_spec(spec).sparsity
    assert abs(pair.report.measured_sparsity - target) <= 0.001
    details = pair.report.details["allocation"]
    assert details["sparsity"] == pytest.approx(pair.report.measured_sparsity, abs=1e-9)
    assert max(details["layers"]) - min(details["layers"]) > 0.05
    assert len(details["outlier_ratios"]) == len(details["layers"])


def _plant_outliers(model, layer: int, share: float = 0.02, scale: float = 50.0):
    """Multiply a `share` of layer `layer`'s q_proj weights by `scale` (outliers the ratio must count)."""
    q = model.model.layers[layer].self_attn.q_proj.weight
    g = torch.Generator().manual_seed(1)
    chosen = torch.rand(q.shape, generator=g) < share
    with torch.no_grad():
        q[chosen] *= scale


def test_owl_magnitude_ratios_by_hand():
    """Each layer's share of |W| above M × the layer's mean |W| (all its matrices pooled), planted outliers found."""
    from engine.models.loading import load
    from engine.perturb.owl import magnitude_ratios

    model = load("tiny-random", device="cpu").model
    _plant_outliers(model, 2)
    got = magnitude_ratios(model, 5.0)
    for i, layer in enumerate(model.model.layers):
        mats = [p.detach().abs().numpy().ravel() for n, p in layer.named_parameters() if n.endswith("proj.weight")]
        w = np.concatenate(mats)
        assert got[i] == pytest.approx(float((w > 5.0 * w.mean()).mean()), abs=1e-12)
    assert got[2] == max(got) and got[2] > 3 * min(got)


def test_owl_wanda_ratios_against_hooks_on_one_dense_forward(tiny_calib):
    """Wanda scores |W|·‖X_j‖ with ‖X‖ from the dense model's own activations: the sequential two-pass capture gives
    the ratios that pre-hooks on every linear of one plain dense forward give."""
    from engine.models.loading import load
    from engine.perturb.owl import wanda_ratios

    model = load("tiny-random", device="cpu").model
    _plant_outliers(model, 1)
    sq: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):

            def hook(_m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq[name] = sq.get(name, 0) + (x * x).sum(0)

            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for start in range(0, tiny_calib.ids.shape[0], 8):
            model(input_ids=tiny_calib.ids[start : start + 8], use_cache=False)
    for h in hooks:
        h.remove()
    want = []
    for i, layer in enumerate(model.model.layers):
        scores = []
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                norm = sq[f"{i}.{name}"].sqrt()
                scores.append((module.weight.detach().double().abs() * norm[None]).numpy().ravel())
        s = np.concatenate(scores)
        want.append(float((s > 5.0 * s.mean()).mean()))
    got = wanda_ratios(model, tiny_calib.ids, 5.0)
    assert got == pytest.approx(want, abs=2e-4)  # a score within float32 rounding of the threshold may flip


def _layers_file(tmp_path, values, name="alloc.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"layers": {str(i): v for i, v in enumerate(values)}}))
    return path


def test_a_file_allocation_is_pruned_as_written(tiny, tiny_calib, tmp_path):
    """@FILE: each layer pruned at the file's sparsity (to the row), the total exact, the file's hash recorded."""
    path = _layers_file(tmp_path, [0.5, 0.7, 0.5, 0.7])
    pair = perturb(tiny, f"wanda:0.6@{path}", calibration=tiny_calib, use_cache=False)
    details = pair.report.details["allocation"]
    assert details["layers"] == pytest.approx([0.5, 0.7, 0.5, 0.7], abs=1 / 64)
    assert abs(pair.report.measured_sparsity - 0.6) <= 0.001
    assert len(details["sha256"]) == 64
    for i, layer in enumerate(pair.perturbed.model.layers):
        zeros = sum(int((p == 0).sum()) for n, p in layer.named_parameters() if n.endswith("proj.weight"))
        total = sum(p.numel() for n, p in layer.named_parameters() if n.endswith("proj.weight"))
        assert zeros / total == pytest.approx(details["layers"][i], abs=1e-9)
        assert pair.report.details["layer_sparsity"][i] == pytest.approx(zeros / total, abs=1e-6)  # the tables'


@pytest.mark.slow  # a batch, a kld run and two reports (about 40 s); fast: the header's layer_sparsity above
def test_layer_sparsities_reach_the_batch_and_kld_tables_and_the_report(cli, tmp_path):
    """Each spec's zeros per decoder layer, as its session header records them: summary.parquet (and .csv) of
    batch, kld_summary.parquet of kld, and the report's chart only where the layers differ."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from engine.record.session import load_session
    from engine.sweep.folder import session_path
    from engine.sweep.runner import run_sweep
    from engine.sweep.sweeps import plan_sweep

    path = _layers_file(tmp_path, [0.5, 0.7, 0.5, 0.7])
    specs = ["wanda:0.6", f"wanda:0.6@{path}"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\n", encoding="utf-8")
    calib = {"samples": 4, "length": 16, "seed": 0}
    sweep = plan_sweep(
        prompts_file=prompts, model="tiny-random", specs=specs, modes=["shared"], max_new_tokens=3, calib=calib
    )
    out = tmp_path / "out"
    run_sweep(sweep, out, batch_size=1)
    rows = {r["spec"]: r for r in pq.read_table(out / "summary.parquet").to_pylist()}
    uniform, allocated = (json.loads(rows[s]["layer_sparsity"]) for s in specs)
    assert uniform == pytest.approx([38 / 64] * 4, abs=1e-6)  # int(64 · 0.6) of each 64-wide row
    assert allocated == pytest.approx([0.5, 0.7, 0.5, 0.7], abs=1 / 64)
    for run in sweep.runs():
        header = load_session(session_path(out, run)).header
        assert json.loads(rows[str(run.spec)]["layer_sparsity"]) == header.perturbation.details["layer_sparsity"]
    assert "layer_sparsity" in (out / "summary.csv").read_text(encoding="utf-8").splitlines()[0]
    text = tmp_path / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12, encoding="utf-8")
    prune = [a for s in specs for a in ("--prune", s)]
    done = cli(
        "kld",
        "--model",
        "tiny-random",
        "--text",
        text,
        "--ctx",
        "32",
        *prune,
        "--out",
        out,
        "--calib-samples",
        "4",
        "--calib-len",
        "16",
    )
    assert done.returncode == 0, done.stderr
    kld_rows = {r["spec"]: r for r in pq.read_table(out / "kld_summary.parquet").to_pylist()}
    assert json.loads(kld_rows[specs[1]]["layer_sparsity"]) == allocated
    allocations = json.loads((out / "kld.json").read_text(encoding="utf-8"))["allocations"]
    assert list(allocations) == [specs[1]] and len(allocations[specs[1]]["sha256"]) == 64  # the uniform has none
    from hierui.report.page import write_report

    page = write_report(out).read_text(encoding="utf-8")
    assert page.count('id="layer-sparsity-') >= 2  # section 1 and the kld section
    uniform_only = tmp_path / "uniform"
    shutil.copytree(out, uniform_only)
    table = pq.read_table(uniform_only / "kld_summary.parquet")
    pq.write_table(table.filter(pc.equal(table.column("spec"), specs[0])), uniform_only / "kld_summary.parquet")
    kld_page = write_report(uniform_only, tmp_path / "u.html").read_text(encoding="utf-8")
    kld_section = kld_page[kld_page.index('<section id="corpus-kld"') :]
    assert 'id="layer-sparsity-' not in kld_section  # one flat line says nothing the tables do not


@pytest.mark.parametrize(
    "content, says",
    [
        ({"layers": {"0": 0.5, "1": 0.7, "2": 0.5, "3": 0.5}}, "average 0.5500"),
        ({"layers": {"0": 0.6, "1": 0.6, "2": 0.6, "9": 0.6}}, "no decoder layer 9"),
        ({"layers": {"0": 0.6, "1": 0.6, "2": 1.0, "3": 0.6}}, "must be in [0, 1)"),
        ({"layers": {"0": 0.6, "1": 0.6, "2": 0.6}}, "no sparsity for layer 3"),
        ({"matrices": {"layers.0.self_attn.qq": 0.6}}, 'no matrix "layers.0.self_attn.qq"'),
        ({"sparsity": 0.6}, 'expected an object with "layers"'),
    ],
)
def test_bad_files_are_refused_before_loading(tmp_path, content, says):
    """The file against the model's config.json (no weights loaded): one line naming what is wrong."""
    from engine.models.configs import read_config
    from engine.perturb.spec import check_fits

    path = tmp_path / "alloc.json"
    path.write_text(json.dumps(content))
    with pytest.raises(HieruiError) as e:
        check_fits(parse_spec(f"wanda:0.6@{path}"), read_config("tiny-random"))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_the_cache_key_follows_the_file_content(tiny, tmp_path):
    """Two files of the same name but other sparsities are two cache entries; the same content, one."""
    from engine.perturb.stored import _prune_key

    path = _layers_file(tmp_path, [0.5, 0.7, 0.5, 0.7])
    spec = parse_spec(f"magnitude:0.6@{path}")
    first = _prune_key(tiny, spec, None).path
    assert _prune_key(tiny, spec, None).path == first
    _layers_file(tmp_path, [0.7, 0.5, 0.7, 0.5])
    assert _prune_key(tiny, spec, None).path != first


def test_allocate_against_brute_force():
    """The Lagrangian allocation of three units on a coarse grid: the budget met and the predicted total KLD no worse
    than the best of every combination that meets it (brute force), up to the grid's granularity."""
    import itertools

    from engine.perturb import allocation

    units = [
        {"unit": "a", "weights": 100, "points": [(0.45, 0.10), (0.6, 0.20), (0.75, 0.45)]},
        {"unit": "b", "weights": 100, "points": [(0.45, 0.50), (0.6, 1.50), (0.75, 4.00)]},
        {"unit": "c", "weights": 200, "points": [(0.45, 0.20), (0.6, 0.50), (0.75, 1.30)]},
    ]
    chosen = allocation.allocate(units, 0.6, 0.45, 0.75)
    assert sum(chosen[u["unit"]] * u["weights"] for u in units) == pytest.approx(0.6 * 400)
    assert all(0.45 - 1e-9 <= s <= 0.75 + 1e-9 for s in chosen.values())
    damage = lambda picks: sum(allocation.predicted_damage(u["points"], picks[u["unit"]]) for u in units)  # noqa: E731
    grid = [0.45 + 0.0125 * i for i in range(25)]
    best = min(
        damage(dict(zip("abc", combo)))
        for combo in itertools.product(grid, repeat=3)
        if abs(combo[0] * 100 + combo[1] * 100 + combo[2] * 200 - 240) < 1e-6
    )
    assert damage(chosen) <= best + 1e-6
    assert chosen["a"] > 0.6 > chosen["b"]  # the robust unit takes more, the fragile one less


def test_allocation_file_from_a_sensitivity_table(tiny, tiny_calib, tmp_path):
    """`hierui sensitivity --allocate`'s file: per layer, readable by @FILE, pruned to the target exactly."""
    from engine.perturb.allocation import allocate_from_table

    rows = [
        {"unit": f"layer {i}", "unit_kind": "layer", "layer": i, "matrices": [], "weights": 36864}
        | {"level": s, "kl_mean": k}
        for i, slope in enumerate([0.2, 1.0, 0.5, 3.0])
        for s, k in ((0.45, slope * 0.45), (0.6, slope * 0.7), (0.75, slope * 1.2))
    ]
    data = allocate_from_table(rows, "wanda", 0.6)
    assert data["unit"] == "layer" and set(data["layers"]) == {"0", "1", "2", "3"}
    assert data["layers"]["0"] > data["layers"]["3"]
    path = tmp_path / "allocation.json"
    path.write_text(json.dumps(data))
    pair = perturb(tiny, f"wanda:0.6@{path}", calibration=tiny_calib, use_cache=False)
    assert abs(pair.report.measured_sparsity - 0.6) <= 0.001


def test_the_sparsity_check_reads_each_matrix_own_target(tiny, tiny_calib):
    """`hierui check`'s sparsity check passes an allocated pair (each matrix at the count it was given) and still
    fails one whose matrix holds a zero too few."""
    from engine.check.sparsity import check_sparsity

    pair = perturb(tiny, "wanda:0.6@owl", calibration=tiny_calib, use_cache=False)
    assert check_sparsity(pair).status == "pass"
    q = pair.perturbed.model.layers[1].self_attn.q_proj.weight
    with torch.no_grad():
        row = (q[0] == 0).nonzero()[0, 0]
        q[0, row] = 1.0
    result = check_sparsity(pair)
    assert result.status == "fail" and "layer 1 self_attn.q_proj" in result.reason


def test_auto_measures_the_layers_and_meets_the_budget(tiny, tiny_calib, monkeypatch, fresh_home):
    """@auto on a tiny model: the sensitivity is measured at the bounds and the target on the calibration, the
    layers get different sparsities within the bounds, the total is the target, and what was measured is cached
    (a second build reads it back: the measurement does not run again)."""
    from engine.sensitivity import auto

    calls = []
    measure = auto.allocation_for
    monkeypatch.setattr(auto, "allocation_for", lambda job, say=None: calls.append(1) or measure(job, say))
    pair = perturb(tiny, "wanda:0.6@auto:0.5:0.7", calibration=tiny_calib)
    details = pair.report.details["allocation"]
    assert abs(pair.report.measured_sparsity - 0.6) <= 0.001
    assert details["auto"]["levels"] == [0.5, 0.6, 0.7] and details["auto"]["bounds"] == [0.5, 0.7]
    assert all(0.5 - 1 / 64 <= s <= 0.7 + 1 / 64 for s in details["layers"])
    assert max(details["layers"]) - min(details["layers"]) > 0.05
    perturb(tiny, "wanda:0.6@auto:0.5:0.7", calibration=tiny_calib, use_cache=True)
    assert len(calls) == 1


def test_charts_name_an_allocation_file_by_its_name():
    """A spec naming its allocation file by a long path: the charts' labels keep the file's name only, and the
    axes keep their room (matplotlib warns when a label squeezes them to nothing)."""
    import warnings

    from hierui.report import charts as C

    long = "wanda:0.6@/data/runs/2026-12-08/some/deep/folder/of/allocations/smollm2-wanda-0.6-auto.json"
    rows = [
        {"spec": "wanda:0.6", "layer_sparsity": [0.59] * 8, "amp": 3.0},
        {"spec": long, "layer_sparsity": [0.5, 0.7] * 4, "amp": 2.5},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layers = C.chart_layer_sparsity(rows)
        amplification = C.chart_amplification(rows)
    for svg in (layers, amplification):
        assert "wanda:0.6@smollm2-wanda-0.6-auto.json" in svg and "/data/runs" not in svg
    assert C.chart_layer_sparsity([rows[0]]) is None  # flat: nothing the tables do not say
