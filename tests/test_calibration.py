"""Calibration batches: self-generated (seeded, full length, no EOS), text files, and the cache."""

import pytest
import torch

from engine.errors import HieruiError
from engine.perturb.calibration import build_calibration


def test_self_generated_is_seeded_full_length_and_free_of_eos(tiny):
    a = build_calibration(tiny, samples=5, length=20, seed=3, use_cache=False)
    b = build_calibration(tiny, samples=5, length=20, seed=3, use_cache=False)
    c = build_calibration(tiny, samples=5, length=20, seed=4, use_cache=False)
    assert a.ids.shape == (5, 20) and a.ids.dtype == torch.long
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    assert torch.all(a.ids[:, 0] == tiny.tokenizer.bos_token_id)
    assert not torch.any(a.ids[:, 1:] == tiny.tokenizer.eos_token_id)
    assert not torch.any(a.ids[:, 1:] == tiny.tokenizer.pad_token_id)
    assert len(set(a.ids[:, 1:].flatten().tolist())) > 20  # really sampled, not one repeated token


def test_text_file_gives_windows_of_the_text(tiny, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 20
    path = tmp_path / "calib.txt"
    path.write_text(text)
    calib = build_calibration(tiny, source=str(path), samples=6, length=16, use_cache=False)
    all_ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    joined = " ".join(map(str, all_ids))
    for row in calib.ids.tolist():
        assert " ".join(map(str, row)) in joined
    assert calib.describe()["source"] == str(path.resolve())


def test_bad_calibration_inputs(tiny, tmp_path):
    with pytest.raises(HieruiError, match="not found"):
        build_calibration(tiny, source=str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(HieruiError, match="fewer than"):
        build_calibration(tiny, source=str(short), length=64, use_cache=False)


def test_calibration_is_cached(tiny, fresh_home):
    first = build_calibration(tiny, samples=3, length=8)
    second = build_calibration(tiny, samples=3, length=8)
    assert not first.from_cache and second.from_cache
    assert torch.equal(first.ids, second.ids) and first.key == second.key


def test_calibration_is_rebuilt_when_its_algorithm_or_hierui_changes(tiny, fresh_home, monkeypatch):
    import engine
    import engine.perturb.calibration as calibration

    first = build_calibration(tiny, samples=3, length=8)
    assert build_calibration(tiny, samples=3, length=8).from_cache
    with monkeypatch.context() as m:
        m.setattr(calibration, "ALGORITHM_VERSION", getattr(calibration, "ALGORITHM_VERSION", 1) + 1, raising=False)
        bumped = build_calibration(tiny, samples=3, length=8)
        assert not bumped.from_cache and bumped.key != first.key
        assert build_calibration(tiny, samples=3, length=8).from_cache
    monkeypatch.setattr(engine, "__version__", engine.__version__ + ".post1")
    upgraded = build_calibration(tiny, samples=3, length=8)
    assert not upgraded.from_cache and upgraded.key not in (first.key, bumped.key)


def test_calibration_cache_keeps_its_metadata_beside_it(tiny, fresh_home, tmp_path):
    import json
    from pathlib import Path

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    calib = build_calibration(tiny, source=str(text), samples=2, length=8, seed=5)
    meta = json.loads((Path(fresh_home) / "calib" / f"{calib.key}.meta.json").read_text())
    assert (Path(fresh_home) / "calib" / f"{calib.key}.pt").is_file()
    assert meta["kind"] == "calib" and meta["key"] == calib.key and meta["algorithm"] == "calibration"
    assert meta["calibration"]["samples"] == 2 and meta["calibration"]["seed"] == 5
    assert meta["calibration"]["source"].startswith("file:") and meta["source_path"] == str(text.resolve())
    assert not [p for p in (Path(fresh_home) / "calib").iterdir() if p.name.startswith(".")]  # no temporary file


# ------------------------------------------------------------------ the default calibration, and what a run says of it


def test_the_default_calibration_rule():
    """engine.record.settings.default_calibration: one default per method, whatever the command: Wanda takes
    QUICK_CALIB_SAMPLES (a quick first start), SparseGPT and the drop methods CALIB_SAMPLES; all 128 tokens long."""
    from engine.record.settings import (
        CALIB_LENGTH,
        CALIB_SAMPLES,
        QUICK_CALIB_SAMPLES,
        CalibSettings,
        calibration_for,
        default_calibration,
    )

    assert (QUICK_CALIB_SAMPLES, CALIB_SAMPLES, CALIB_LENGTH) == (32, 64, 128)
    assert default_calibration("wanda") == CalibSettings(samples=32, length=128, seed=0, source=None)
    for method in ("sparsegpt", "attndrop", "mlpdrop", "blockdrop"):
        assert default_calibration(method) == CalibSettings() and CalibSettings().samples == 64, method
    given = calibration_for("wanda", samples=8, length=None, source=None, seed=None)
    assert (given.samples, given.length, given.seed) == (8, 128, 0)
    with pytest.raises(HieruiError, match="at least 1 sample"):
        calibration_for("wanda", samples=0)


def test_a_sweep_takes_each_methods_default_calibration(tmp_path):
    from engine.sweep.sweeps import plan_sweep

    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    sweep = plan_sweep(prompts_file=prompts, model="tiny-random", specs=["wanda:0.5", "sparsegpt:0.5", "magnitude:0.5"])
    assert [(c["samples"], c["length"]) for c in sweep.calibrations().values()] == [(32, 128), (64, 128)]
    assert list(sweep.calibrations()) == ["wanda:0.5", "sparsegpt:0.5"]  # magnitude calibrates nothing


def test_describe_calibration():
    from engine.perturb.calibration import describe_calibration

    assert describe_calibration({"source": "self", "samples": 32, "length": 128, "seed": 0}) == (
        "calibration: 32×128 self-generated"
    )
    assert describe_calibration({"source": "/data/notes.txt", "samples": 64, "length": 256, "seed": 0}) == (
        "calibration: 64×256 from notes.txt"
    )
    assert describe_calibration({"source": "self", "samples": 8, "length": 16, "seed": 3}) == (
        "calibration: 8×16 self-generated (seed 3)"
    )
    assert describe_calibration(None) == "calibration: none"


def test_the_calibration_module_imports_no_torch():
    import subprocess
    import sys

    probe = "import sys, engine.perturb.calibration, engine.record.settings; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "False", run.stderr


def test_a_run_records_samples_length_and_source(tiny):
    from engine.perturb import perturb

    pair = perturb(tiny, "wanda:0.5", use_cache=False, calib_options={"samples": 3, "length": 8})
    calib = pair.report.calibration
    assert (calib["samples"], calib["length"], calib["source"], calib["seed"]) == (3, 8, "self", 0)


def test_the_first_sequences_do_not_depend_on_how_many_are_asked_for(tiny, monkeypatch):
    """The explorer's 32 sequences are the first 32 of a sweep's 64 (one batch of GENERATION_BATCH)."""
    import engine.perturb.calibration as calibration

    monkeypatch.setattr(calibration, "GENERATION_BATCH", 4)
    few = build_calibration(tiny, samples=4, length=10, seed=1, use_cache=False)
    more = build_calibration(tiny, samples=8, length=10, seed=1, use_cache=False)
    assert torch.equal(few.ids, more.ids[:4])


def test_calibration_reports_its_progress_in_tokens(tiny):
    calls = []
    build_calibration(tiny, samples=3, length=6, use_cache=False, progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, 15) and calls[-1] == (15, 15)
    assert all(b[0] > a[0] for a, b in zip(calls, calls[1:]))
