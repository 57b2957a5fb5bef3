"""The versioned caches: an entry made by another algorithm or hierui version is never reused, every entry
has its metadata beside it, and `hierui cache` lists and clears them."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import engine
from engine.errors import HieruiError
from engine.perturb import perturb


def _bump(monkeypatch, module, name="ALGORITHM_VERSION"):
    # raising=False: on code without the constant this still runs, and the cache must still not be reused
    monkeypatch.setattr(module, name, getattr(module, name, 1) + 1, raising=False)


def test_pruned_weights_are_not_reused_after_the_algorithm_changes(tiny, fresh_home, monkeypatch):
    import engine.record.methods.magnitude as magnitude

    first = perturb(tiny, "magnitude:0.5")
    assert not first.report.from_cache and perturb(tiny, "magnitude:0.5").report.from_cache
    with monkeypatch.context() as m:
        _bump(m, magnitude)
        after = perturb(tiny, "magnitude:0.5")
        assert not after.report.from_cache
        assert perturb(tiny, "magnitude:0.5").report.from_cache  # the new version's entry is reused in turn
    assert perturb(tiny, "magnitude:0.5").report.from_cache  # the old one is still there for the old version


def test_wanda_weights_are_not_reused_after_wanda_or_calibration_changes(tiny, fresh_home, monkeypatch):
    import engine.perturb.calibration as calibration
    import engine.record.methods.wanda as wanda

    opts = {"samples": 4, "length": 16}
    assert not perturb(tiny, "wanda:0.5", calib_options=opts).report.from_cache
    again = perturb(tiny, "wanda:0.5", calib_options=opts)
    assert again.report.from_cache and again.report.calibration["from_cache"]
    with monkeypatch.context() as m:
        _bump(m, wanda)
        assert not perturb(tiny, "wanda:0.5", calib_options=opts).report.from_cache
    assert perturb(tiny, "wanda:0.5", calib_options=opts).report.from_cache
    _bump(monkeypatch, calibration)
    rebuilt = perturb(tiny, "wanda:0.5", calib_options=opts)
    assert not rebuilt.report.calibration["from_cache"] and not rebuilt.report.from_cache


def test_drop_scores_are_not_reused_after_the_algorithm_changes(tiny, tiny_calib, fresh_home, monkeypatch):
    import engine.perturb.drop as drop
    import engine.record.methods.drop as declared

    perturb(tiny, "mlpdrop:1", calibration=tiny_calib)
    scores = list((Path(fresh_home) / "pruned").glob("*-similarity.json"))
    assert len(scores) == 1
    _bump(monkeypatch, declared)
    calls = []
    real = drop.similarity_scores
    monkeypatch.setattr(drop, "similarity_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    perturb(tiny, "mlpdrop:1", calibration=tiny_calib)
    assert calls == [1]
    assert len(list((Path(fresh_home) / "pruned").glob("*-similarity.json"))) == 2


def test_a_new_hierui_version_reuses_nothing(tiny, tiny_calib, fresh_home, monkeypatch):
    from engine.perturb import cache

    perturb(tiny, "magnitude:0.5")
    perturb(tiny, "attndrop:1", calibration=tiny_calib)
    monkeypatch.setattr(engine, "__version__", engine.__version__ + ".post1")
    assert not perturb(tiny, "magnitude:0.5").report.from_cache
    assert [e.stale for e in cache.entries()].count(True) == 2  # the pruned weights and the scores


def test_every_entry_has_its_metadata_beside_it(tiny, fresh_home):
    from engine.perturb import cache

    perturb(tiny, "wanda:0.5", calib_options={"samples": 4, "length": 16, "seed": 1})
    perturb(tiny, "blockdrop:1", calib_options={"samples": 4, "length": 16, "seed": 1})
    found = {e.kind: e for e in cache.entries()}
    assert set(found) == {"pruned", "scores", "calib"}
    for e in found.values():
        meta_file = e.path.with_name(e.path.name.rsplit(".", 1)[0] + ".meta.json")
        assert meta_file.is_file() and json.loads(meta_file.read_text()) == e.meta
        assert e.meta["kind"] == e.kind and e.path.name.startswith(e.meta["key"])
        assert e.meta["model"] == "tiny-random" and e.meta["model_key"] == tiny.ref.cache_key()
        assert e.meta["hierui_version"] == engine.__version__
        assert e.meta["algorithm_version"] == cache.algorithm_version(e.meta["algorithm"])
        assert e.meta["size"] == e.path.stat().st_size and e.meta["created"]
        assert not e.stale
    assert found["pruned"].meta["spec"] == "wanda:0.5" and found["pruned"].meta["algorithm"] == "wanda"
    assert found["pruned"].meta["calibration"] == found["calib"].meta["key"]
    assert found["calib"].meta["calibration"] == {"source": "self", "samples": 4, "length": 16, "seed": 1}
    assert found["scores"].meta["algorithm"] == "similarity"
    wanda_version = cache.algorithm_version("wanda")
    assert (
        found["calib"].spec == "self 4×16 s1" and found["pruned"].versions == f"v{wanda_version} · {engine.__version__}"
    )


def test_entries_and_clear(tiny, fresh_home, monkeypatch):
    import engine.record.methods.magnitude as magnitude
    from engine.perturb import cache

    perturb(tiny, "magnitude:0.5")
    before = magnitude.ALGORITHM_VERSION
    _bump(monkeypatch, magnitude)
    perturb(tiny, "magnitude:0.5")
    perturb(tiny, "magnitude:0.3")
    pruned = Path(fresh_home) / "pruned"
    (pruned / "0123456789abcdef0123.safetensors").write_bytes(b"made before versioned caches")
    (pruned / "fedcba9876543210fedc.meta.json").write_text("{}")  # metadata without its data
    leftover = pruned / ".x.safetensors.123-abc.tmp"
    leftover.write_bytes(b"")
    os.utime(leftover, (time.time() - 2 * cache.LEFTOVER_SECONDS,) * 2)
    fresh_tmp = pruned / ".y.safetensors.456-def.tmp"  # a writer may still be busy with it
    fresh_tmp.write_bytes(b"")

    listed = cache.entries()
    assert len(listed) == 4 and [e.stale for e in listed].count(True) == 2
    legacy = next(e for e in listed if e.meta is None)
    assert legacy.stale and "no metadata" in legacy.why and legacy.model == "?"
    old = next(e for e in listed if e.meta and e.stale)
    assert f"magnitude v{before}, now v{before + 1}" in old.why
    assert cache.entries("calib") == []

    removed = cache.clear(stale_only=True)
    assert {e.path for e in removed} == {legacy.path, old.path}
    assert len(cache.entries()) == 2 and not any(e.stale for e in cache.entries())
    assert not (pruned / "fedcba9876543210fedc.meta.json").exists() and not leftover.exists()
    assert fresh_tmp.exists()
    assert cache.clear(kind="calib") == []
    assert len(cache.clear()) == 2 and cache.entries() == []
    assert [p.name for p in pruned.iterdir()] == [fresh_tmp.name]


def test_unknown_kind_is_one_clear_line():
    from engine.perturb import cache

    with pytest.raises(HieruiError) as info:
        cache.entries("weights")
    assert str(info.value) == "unknown cache kind 'weights': use pruned, scores, calib"


def _fake_entry(home: Path, key: str, hierui_version: str, spec="magnitude:0.5"):
    from engine.record.methods.magnitude import ALGORITHM_VERSION

    data = home / "pruned" / f"{key}.safetensors"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_bytes(b"x" * 2000)
    meta = {
        "kind": "pruned",
        "key": key,
        "model": "tiny-random",
        "model_key": "tiny-random:1",
        "spec": spec,
        "dtype": "torch.float32",
        "calibration": None,
        "algorithm": "magnitude",
        "algorithm_version": ALGORITHM_VERSION,
        "hierui_version": hierui_version,
        "created": "2024-01-01T00:00:00+00:00",
        "size": 2000,
    }
    (home / "pruned" / f"{key}.meta.json").write_text(json.dumps(meta))


def test_cli_lists_and_clears_the_cache(cli, tmp_path):
    home = tmp_path / "home"
    _fake_entry(home, "a" * 20, engine.__version__)
    _fake_entry(home, "b" * 20, "0.0.1", spec="magnitude:0.3")
    (home / "calib").mkdir()
    (home / "calib" / f"{'c' * 20}.pt").write_bytes(b"old")

    listed = cli("cache", env={"HIERUI_HOME": home, "COLUMNS": "80"})
    assert listed.returncode == 0, listed.stderr
    assert all(len(line) <= 80 for line in listed.stdout.splitlines())
    rows = [line for line in listed.stdout.splitlines() if "pruned" in line or "calib " in line]
    assert len(rows) == 3
    from engine.record.methods.magnitude import ALGORITHM_VERSION

    assert "magnitude:0.5" in listed.stdout and f"v{ALGORITHM_VERSION} · {engine.__version__}" in listed.stdout
    assert f"v{ALGORITHM_VERSION} · 0.0.1" in listed.stdout and "2.0 kB" in listed.stdout
    assert "3 entries" in listed.stdout and "2 stale" in listed.stdout
    only_calib = cli("cache", "--kind", "calib", env={"HIERUI_HOME": home, "COLUMNS": "80"})
    assert "1 entry," in only_calib.stdout and "magnitude" not in only_calib.stdout

    cleared = cli("cache", "clear", "--stale", env={"HIERUI_HOME": home, "COLUMNS": "80"})
    assert cleared.returncode == 0 and "removed 2 stale cache entries" in cleared.stdout
    assert [p.name for p in (home / "pruned").iterdir() if not p.name.endswith(".meta.json")] == [
        f"{'a' * 20}.safetensors"
    ]
    assert not list((home / "calib").iterdir())
    everything = cli("cache", "clear", "--kind", "pruned", env={"HIERUI_HOME": home, "COLUMNS": "80"})
    assert "removed 1 pruned cache entry " in everything.stdout and not list((home / "pruned").iterdir())


@pytest.mark.parametrize("args", [["cache", "--kind", "weights"], ["cache", "clear", "--kind", "weights"]])
def test_cli_bad_kind_is_one_line_and_exit_2(cli, tmp_path, args):
    run = cli(*args, env={"HIERUI_HOME": tmp_path, "COLUMNS": "80"})
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown cache kind 'weights'" in lines[0], run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_current_versions_are_read_without_importing_the_algorithm():
    from engine.perturb import cache

    code = (
        "import sys; from engine.perturb import cache; "
        "print(cache.algorithm_version('wanda'), cache.algorithm_version('calibration'), "
        "'torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import engine.perturb.calibration
    import engine.record.methods.wanda

    assert run.stdout.split() == [
        str(engine.record.methods.wanda.ALGORITHM_VERSION),
        str(engine.perturb.calibration.ALGORITHM_VERSION),
        "False",
    ]
    assert cache.algorithm_version("nope") is None
