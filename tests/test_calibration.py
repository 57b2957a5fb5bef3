"""Calibration batches: self-generated (seeded, full length, no EOS), text files, and the cache."""

import pytest
import torch

from engine.calibration import build_calibration
from engine.errors import HieruiError


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
    import engine.calibration as calibration

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
