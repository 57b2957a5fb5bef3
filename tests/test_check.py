"""`hierui check`: the self-test passes on a sound model, catches each planted fault (exit 1), refuses bad input
before loading anything (exit 2), and runs on every member of the tiny-random zoo."""

import copy
import gc
import json

import pytest
import torch

from engine.check import selfcheck as S
from engine.check.sharing import fingerprint
from engine.models.zoo import FAMILIES

FAST = ["--steps", "4", "--calib-samples", "4", "--calib-len", "32"]


def _results(path) -> dict:
    data = json.loads(path.read_text())
    return {(r["spec"], r["check"]): r for r in data["results"]}


def _check(cli, tmp_path, *args, model="tiny-random"):
    out = tmp_path / "check.json"
    result = cli("check", "--model", model, *FAST, "--json", out, *args)
    return result, (_results(out) if out.is_file() else {})


def test_check_passes_on_tiny_random(cli, tmp_path):
    specs = ["none", "magnitude:0.5", "wanda:2:4", "attndrop:1"]
    result, rows = _check(cli, tmp_path, *[a for s in specs for a in ("-p", s)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert {spec for spec, _ in rows} == set(specs)
    assert all(r["status"] in ("pass", "n/a") for r in rows.values())
    assert rows["none", "zero"]["status"] == "pass" and rows["none", "zero"]["value"] == 0.0
    assert rows["magnitude:0.5", "zero"]["status"] == "n/a"
    assert rows["magnitude:0.5", "sparsity"]["status"] == "pass"
    assert rows["attndrop:1", "sparsity"]["status"] == "n/a"
    for spec in specs:  # the numbers behind each pass: a deviation within its tolerance
        for check in ("cache", "batch"):
            r = rows[spec, check]
            assert r["status"] == "pass" and 0 <= r["value"] <= r["tolerance"], r
        assert rows[spec, "sharing"]["value"] == 0.0
    data = json.loads((tmp_path / "check.json").read_text())
    assert data["model"] == "tiny-random" and data["dtype"] == "float32" and data["ok"] is True
    assert data["architecture"]["model_type"] == "llama" and data["architecture"]["layers"] == 4
    assert set(data["results"][0]) >= {"spec", "check", "status", "value", "tolerance", "reason"}
    out = result.stdout
    assert "tiny-random" in out and "llama" in out and "cpu float32" in out
    assert "PASS" in out and "FAIL" not in out and "every applicable check passed" in out
    assert "Traceback" not in result.stderr and "checking" in result.stderr  # progress on stderr


def test_every_spec_gets_every_check_and_no_spec_is_dropped_silently(tiny):
    report = S.run_selfcheck(tiny, ["none", "int8"], steps=2, calib_options={"samples": 2, "length": 16})
    assert gc.get_freeze_count() == 0  # the objects it froze while it ran (gc.freeze) are unfrozen
    assert report.specs == ["none", "int8"]
    for spec in report.specs:  # every check of every spec has a row, n/a ones with their reason
        rows = [r for r in report.results if r.spec == spec]
        assert [r.check for r in rows] == list(S.CHECKS)
        assert all(r.reason for r in rows if r.status == "n/a")
    assert set(S.DEFAULT_SPECS) >= {"none", "wanda:0.5", "sparsegpt:0.5", "wanda:2:4", "blockdrop:1", "int8", "nf4"}


# ------------------------------------------------------------------ planted faults: each check catches its own


def test_sharing_check_catches_a_copying_clone(cli, tmp_path, monkeypatch):
    import engine.perturb.pair

    monkeypatch.setattr(engine.perturb.pair, "clone_sharing", copy.deepcopy)
    result, rows = _check(cli, tmp_path, "-p", "none", "-p", "magnitude:0.5")
    assert result.returncode == 1
    for spec in ("none", "magnitude:0.5"):
        row = rows[spec, "sharing"]
        assert row["status"] == "fail" and row["value"] > 0 and "copied" in row["reason"]
    assert rows["none", "zero"]["status"] == "pass"  # a deep copy computes the same numbers
    assert "FAIL" in result.stdout and "sharing" in result.stdout


def test_sharing_check_catches_pruning_the_dense_model_in_place(cli, tmp_path, monkeypatch):
    import engine.perturb.magnitude as magnitude
    from engine.anatomy.linears import decoder_layers, layer_linears

    def in_place(model, spec, progress=None, allocated=None):  # zeroes the smallest half of each weight, shared
        for layer in decoder_layers(model):
            for lin in layer_linears(layer).values():
                w = lin.weight.data
                w.view(-1)[w.abs().flatten().argsort()[: w.numel() // 2]] = 0

    monkeypatch.setattr(magnitude, "prune_magnitude", in_place)
    result, rows = _check(cli, tmp_path, "-p", "magnitude:0.5")
    assert result.returncode == 1
    row = rows["magnitude:0.5", "sharing"]
    assert row["status"] == "fail" and "dense model changed in place" in row["reason"]


def test_cache_check_catches_a_broken_kv_cache(cli, tmp_path, monkeypatch):
    from engine.run.stepper import BatchStepper

    monkeypatch.setattr(BatchStepper, "_new_cache", lambda self, model: None)  # every pass starts afresh
    result, rows = _check(cli, tmp_path, "-p", "none")
    assert result.returncode == 1
    row = rows["none", "cache"]
    assert row["status"] == "fail" and row["value"] > row["tolerance"] and "deviates" in row["reason"]


def test_batch_check_catches_a_batch_attending_to_its_padding(cli, tmp_path, monkeypatch):
    from engine.run.stepper import BatchStepper

    original = BatchStepper._both

    def unmasked(self, ids_d, ids_p, extra, *args, **kwargs):
        if "attention_mask" in extra:  # a batch that attends to its left padding
            extra = {**extra, "attention_mask": torch.ones_like(extra["attention_mask"])}
        return original(self, ids_d, ids_p, extra, *args, **kwargs)

    monkeypatch.setattr(BatchStepper, "_both", unmasked)
    result, rows = _check(cli, tmp_path, "-p", "none")
    assert result.returncode == 1
    assert rows["none", "batch"]["status"] == "fail"
    assert rows["none", "cache"]["status"] == "pass", rows["none", "cache"]  # one prompt alone has no padding


def test_sparsity_check_catches_one_matrix_less_sparse(cli, tmp_path, monkeypatch):
    import engine.perturb.magnitude as magnitude
    from engine.anatomy.linears import decoder_layers

    original = magnitude.prune_magnitude

    def one_row_unpruned(model, spec, progress=None, allocated=None):
        original(model, spec, progress)
        lin = decoder_layers(model)[2].mlp.down_proj
        lin.weight.data[0].fill_(0.5)  # the pruned copy's own tensor: sharing is unaffected

    monkeypatch.setattr(magnitude, "prune_magnitude", one_row_unpruned)
    result, rows = _check(cli, tmp_path, "-p", "magnitude:0.5")
    assert result.returncode == 1
    row = rows["magnitude:0.5", "sparsity"]
    assert row["status"] == "fail" and "layer 2" in row["reason"] and "down_proj" in row["reason"]
    assert row["value"] > 0
    assert rows["magnitude:0.5", "sharing"]["status"] == "pass"


def test_the_dense_fingerprint_sees_one_last_bit_and_a_sign_flip(tiny):
    """What the sharing check compares before and after (the dense model changed in place) is exact: one weight
    moved by one unit in the last place, or negated, changes it; put back, it is the same again."""
    weight = tiny.model.model.layers[1].mlp.up_proj.weight
    flat = weight.data.view(-1)
    keep = flat[:2].clone()
    before = fingerprint(tiny.model)
    try:
        flat[0] = torch.nextafter(keep[0], torch.tensor(float("inf")))
        assert fingerprint(tiny.model) != before
        flat[0] = keep[0]
        assert fingerprint(tiny.model) == before
        flat[1] = -keep[1]
        assert fingerprint(tiny.model) != before
    finally:
        flat[:2] = keep
    assert fingerprint(tiny.model) == before


def test_sparsity_check_catches_a_broken_n_of_m_group(tiny):
    from engine.perturb import perturb

    pair = perturb(tiny, "magnitude:2:4", use_cache=False)
    lin = pair.perturbed.model.layers[0].self_attn.q_proj
    row = lin.weight.data[5]
    row[:4] = torch.tensor([0.1, 0.2, 0.0, 0.0])  # the matrix keeps its zero count, one group has 3 kept
    row[4:8] = torch.tensor([0.0, 0.0, 0.0, 0.3])
    result = S.check_sparsity(pair)
    assert result.status == "fail" and "group of 4" in result.reason


def test_zero_check_catches_noise_in_none(cli, tmp_path, monkeypatch):
    import engine.perturb.pair

    real = engine.perturb.pair.clone_sharing

    def noisy(model):
        clone = real(model)
        lin = clone.model.layers[1].mlp.up_proj
        noise = 1e-6 * torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(0))
        lin.weight = torch.nn.Parameter(lin.weight + noise, requires_grad=False)
        return clone

    monkeypatch.setattr(engine.perturb.pair, "clone_sharing", noisy)
    result, rows = _check(cli, tmp_path, "-p", "none")
    assert result.returncode == 1
    row = rows["none", "zero"]
    assert row["status"] == "fail" and row["value"] != 0 and "from its identity value" in row["reason"]


def test_a_perturbation_that_raises_fails_its_checks_and_the_others_run(cli, tmp_path, monkeypatch):
    import engine.perturb.magnitude as magnitude

    def broken(model, spec, progress=None, allocated=None):
        raise RuntimeError("planted failure\nsecond line")

    monkeypatch.setattr(magnitude, "prune_magnitude", broken)
    result, rows = _check(cli, tmp_path, "-p", "magnitude:0.5", "-p", "none")
    assert result.returncode == 1
    for check in ("cache", "batch", "sharing", "sparsity"):
        row = rows["magnitude:0.5", check]
        assert row["status"] == "fail" and row["reason"] == "the perturbation failed: RuntimeError: planted failure"
    assert rows["magnitude:0.5", "zero"]["status"] == "n/a"
    assert all(rows["none", c]["status"] in ("pass", "n/a") for c in S.CHECKS)
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ bad input: exit 2, one line, nothing loaded


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model", "no-such-model"], "no-such-model"),
        (["--model", "tiny-random:nosuch"], "nosuch"),
        (["--model", "tiny-random", "-p", "wanda:2"], "wanda:2"),
        (["--model", "tiny-random", "-p", "none", "-p", "frobnicate:1"], "frobnicate"),
        (["--model", "tiny-random", "-p", "attndrop:4"], "at most 3"),
        (["--model", "tiny-random", "--dtype", "float8"], "float8"),
        (["--model", "tiny-random", "--device", "tpu"], "tpu"),
        (["--model", "tiny-random", "--json", "/nonexistent-folder/x.json"], "--json"),
    ],
)
def test_bad_input_is_one_line_before_loading(cli, monkeypatch, args, words):
    import engine.models.loading

    def must_not_load(*_a, **_k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(engine.models.loading, "load", must_not_load)
    result = cli("check", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


# ------------------------------------------------------------------ the zoo


@pytest.mark.parametrize("family", list(FAMILIES))
def test_check_on_every_zoo_family(cli, tmp_path, family):
    """Cheap specs on every family. Where this fails, hierui is wrong on that family: the failing rows say how."""
    result, rows = _check(
        cli, tmp_path, "-p", "none", "-p", "magnitude:0.5", "-p", "attndrop:1", model=f"tiny-random:{family}"
    )
    failed = {f"{spec} {check}": row["reason"] for (spec, check), row in rows.items() if row["status"] == "fail"}
    assert result.returncode == 0 and not failed, failed or result.stderr
    assert rows["none", "zero"]["status"] == "pass"


def test_tolerance_rule_scales_with_the_dtype():
    assert S.rel_tolerance(torch.float32) < S.rel_tolerance(torch.float16) < S.rel_tolerance(torch.bfloat16)
    eps = S.rel_tolerance(torch.float32)
    assert S.metric_tolerance(eps, scale=0.1, magnitude=0.0) == eps  # never below ε
    assert S.metric_tolerance(eps, scale=10.0, magnitude=1.0) == pytest.approx(eps * 40 * 2)
    assert "float32" in S.tolerance_rule(torch.float32)


def test_the_precision_quantized_kernels_return_is_measured(tiny):
    """bitsandbytes' CPU nf4 kernel rounds its outputs to bfloat16 even in a float32 model: the check measures
    that and gives the perturbed model bfloat16's tolerance; int8 returns float32 values; none is the model's."""
    from engine.check.selfcheck import kernel_dtype, rel_tolerance, side_tolerance
    from engine.perturb import perturb

    nf4 = perturb(tiny, "nf4", use_cache=False)
    assert kernel_dtype(nf4) == "bfloat16"
    assert side_tolerance(nf4, "perturbed") == rel_tolerance("bfloat16") and side_tolerance(nf4, "dense") == 1e-4
    assert kernel_dtype(perturb(tiny, "int8", use_cache=False)) == "float32"
    assert kernel_dtype(perturb(tiny, "none")) == "float32"
