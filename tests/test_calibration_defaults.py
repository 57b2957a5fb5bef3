"""Issue 25, class 5: the same words mean the same thing. A spec with the default calibration is the same model in
every command (engine.record.settings.default_calibration: one default per method), kld takes the calibration
options, `--calib-seed` is the calibration's seed everywhere (prune's old --seed warns and maps to it), and a base
file records the dense model it was made from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.record.settings import CalibSettings

TEXT = " ".join(f"Sentence number {i} tells of a {w} that walked to the river." for i, w in enumerate("abcde"))


class Stop(Exception):
    """Raised by the patched planner: the command got as far as its memory plan, with everything resolved."""


@pytest.fixture()
def requested(monkeypatch):
    """What each command asks of engine.run.open (its PairRequest's calibration, at the plan line it prints
    before loading), and what `hierui plan` sizes: a list of calibration dicts, the command stopped there."""
    from engine.run import plan as P
    from hierui.cli import launch

    seen: list[dict] = []

    def print_plan(request, always=True):
        seen.append(dict(request.calib))
        raise Stop

    def estimate(model, specs, calib=None, **_):
        seen.append({"samples": calib[0], "length": calib[1]} if calib else {})
        raise Stop

    monkeypatch.setattr(launch, "print_plan", print_plan)
    monkeypatch.setattr(launch, "interactive", lambda: True)  # explore checks for a terminal before its plan
    monkeypatch.setattr(P, "estimate", estimate)
    return seen


def _command(cli_args: list[str]) -> None:
    from hierui.cli import main

    with pytest.raises(Stop):
        main(cli_args)


COMMANDS = {  # each command that perturbs a spec, up to its plan, on tiny-random
    "explore": lambda spec, tmp: ["explore", "-m", "tiny-random", "-p", spec, "--sessions", str(tmp / "s")],
    "prune": lambda spec, tmp: ["prune", "-m", "tiny-random", "-p", spec],
    "batch": lambda spec, tmp: (
        ["batch", "-m", "tiny-random", "-p", spec, "--prompts", str(tmp / "p.txt")] + ["--out", str(tmp / "b")]
    ),
    "kld": lambda spec, tmp: (
        ["kld", "-m", "tiny-random", "-p", spec, "--text", str(tmp / "c.txt"), "--ctx", "32"]
        + ["--out", str(tmp / "k")]
    ),
    "plan": lambda spec, tmp: ["plan", "-m", "tiny-random", "-p", spec],
}


@pytest.mark.parametrize("spec, samples", [("wanda:0.5", 32), ("sparsegpt:0.5", 64)])
def test_a_spec_has_one_default_calibration_in_every_command(requested, tmp_path, spec, samples):
    """Guards class 5: `kld --prune wanda:0.5` calibrated on 32 samples and `batch --prune wanda:0.5` on 64, two
    models under one name. Now every command resolves the spec to the same calibration."""
    (tmp_path / "p.txt").write_text("hello\n")
    (tmp_path / "c.txt").write_text(TEXT)
    for name, args in COMMANDS.items():
        _command(args(spec, tmp_path))
        got = requested.pop()
        assert (got["samples"], got["length"]) == (samples, 128), name
        if name != "plan":  # the plan sizes samples × length only
            assert CalibSettings(**got) == CalibSettings(samples=samples), name


def test_the_sweep_records_each_specs_calibration(tmp_path):
    """batch.json records the calibration per spec (engine.record.settings.calibrations), as kld does: Wanda's
    default is not SparseGPT's, and a given value applies to every spec."""
    from engine.sweep.sweeps import plan_sweep

    (tmp_path / "p.txt").write_text("hello\n")
    specs = ["wanda:0.5", "sparsegpt:0.5", "int8"]
    sweep = plan_sweep(prompts_file=tmp_path / "p.txt", model="tiny-random", specs=specs)
    assert sweep.manifest()["calibration"] == {
        "wanda:0.5": CalibSettings(samples=32).to_dict(),
        "sparsegpt:0.5": CalibSettings(samples=64).to_dict(),
    }
    given = plan_sweep(prompts_file=tmp_path / "p.txt", model="tiny-random", specs=specs, calib={"seed": 7})
    assert {c["seed"] for c in given.calibrations().values()} == {7}


def test_calibrations_differ_per_spec():
    from engine.record.settings import calibrations_differ

    w, s = CalibSettings(samples=32).to_dict(), CalibSettings().to_dict()
    assert calibrations_differ({"wanda:0.5": w, "sparsegpt:0.5": s}, {"wanda:0.5": w}) == []
    assert calibrations_differ({"wanda:0.5": s}, {"wanda:0.5": w}) == ["wanda:0.5"]
    assert calibrations_differ(s, {"wanda:0.5": w}) == ["length", "samples", "seed", "source", "wanda:0.5"]
    assert calibrations_differ(None, {"wanda:0.5": w}) == []


def test_prune_seed_warns_and_is_the_calibration_seed(requested, cli, capsys):
    """Guards class 5: prune's --seed was the calibration's seed while --seed is the sampling seed elsewhere. It now
    warns, maps to --calib-seed for one release, and is hidden in the help."""
    _command(["prune", "-m", "tiny-random", "-p", "wanda:0.5", "--calib-seed", "3"])
    assert requested.pop()["seed"] == 3 and "--seed" not in capsys.readouterr().err
    _command(["prune", "-m", "tiny-random", "-p", "wanda:0.5", "--seed", "3"])
    assert requested.pop()["seed"] == 3
    assert "--seed is now --calib-seed" in " ".join(capsys.readouterr().err.split())
    assert "--seed" not in cli("prune", "--help").stdout.replace("--calib-seed", "")
    clash = cli("prune", "-m", "tiny-random", "--seed", "3", "--calib-seed", "4")
    assert clash.returncode == 2 and "disagree" in clash.stderr and len(clash.stderr.splitlines()) == 1


def test_every_command_takes_calib_seed(requested, tmp_path):
    """--calib-seed is the calibration's seed in explore, batch and kld (their --seed stays the sampling seed)."""
    (tmp_path / "p.txt").write_text("hello\n")
    for name in ("explore", "batch", "kld"):
        (tmp_path / "c.txt").write_text(TEXT)
        _command([*COMMANDS[name]("wanda:0.5", tmp_path), "--calib-seed", "5"])
        assert requested.pop()["seed"] == 5, name


def test_kld_takes_and_records_the_calibration_options(cli, tmp_path, fresh_home):
    """Guards class 5: kld took no calibration options. --calib-samples/--calib-len reach the calibration it builds
    (its cache entry) and kld.json records the calibration per spec, as batch.json does."""
    text = tmp_path / "c.txt"
    text.write_text(TEXT)
    out = tmp_path / "o"
    args = ["kld", "-m", "tiny-random", "--device", "cpu", "-p", "wanda:0.5", "--text", text, "--ctx", "32"]
    run = cli(*args, "--calib-samples", "3", "--calib-len", "16", "--calib-seed", "2", "--out", out)
    assert run.returncode == 0, run.stderr
    metas = [json.loads(p.read_text()) for p in (Path(fresh_home) / "calib").glob("*.meta.json")]
    assert [m["calibration"]["samples"] for m in metas] == [3] and metas[0]["calibration"]["length"] == 16
    recorded = json.loads((out / "kld.json").read_text())["calibration"]
    assert recorded == {"wanda:0.5": {"source": None, "samples": 3, "length": 16, "seed": 2}}


@pytest.fixture(scope="module")
def base_of_tiny(tmp_path_factory):
    """A top-8 base file of tiny-random on TEXT, written by `hierui kld --save-base`."""
    from hierui.cli import main

    folder = tmp_path_factory.mktemp("base")
    (folder / "c.txt").write_text(TEXT)
    base = folder / "base.st"
    args = ["kld", "-m", "tiny-random", "--device", "cpu", "--text", str(folder / "c.txt"), "--ctx", "32"]
    try:
        main([*args, "--save-base", str(base), "--base-k", "8"])
    except SystemExit as e:
        assert e.code in (0, None)
    assert base.is_file()
    return base, folder / "c.txt"


def test_a_base_file_names_its_dense_model(base_of_tiny):
    from engine.kld.base import BaseFile
    from engine.models.names import resolve

    base, _text = base_of_tiny
    meta = BaseFile(base).meta
    assert meta["model"] == "tiny-random" and meta["model_key"] == resolve("tiny-random").cache_key()


def test_a_base_file_of_another_dense_model_is_refused(cli, base_of_tiny, tmp_path):
    """Guards class 5: a base file's tokenizer, text and windows were checked, not its dense model: kld --prune on
    another model with the same tokenizer (tiny-random:llama, byte tokens as tiny-random) scored a perturbation of
    one model against the dense side of another. Now one line, exit 2, before the model loads."""
    base, text = base_of_tiny
    args = ["kld", "-m", "tiny-random:llama", "--device", "cpu", "--text", text, "--ctx", "32", "--base", base]
    run = cli(*args, "-p", "magnitude:0.5", "--out", tmp_path / "o")
    assert run.returncode == 2 and "another dense model (tiny-random)" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_scoring_a_saved_model_against_a_base_file_names_the_base_model(cli, base_of_tiny, tmp_path):
    """--model M --base FILE without --prune scores M itself (a saved pruned model) against the base: allowed for
    any model with the base's tokenizer, and the report names the base file's dense model."""
    base, text = base_of_tiny
    args = ["kld", "-m", "tiny-random:llama", "--device", "cpu", "--text", text, "--ctx", "32", "--base", base]
    run = cli(*args, "--out", tmp_path / "o")
    assert run.returncode == 0, run.stderr
    assert f"against base file {base} of tiny-random" in " ".join(run.stdout.split())
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "o" / "kld_summary.parquet").column("base_model").to_pylist() == ["tiny-random"]


def test_a_base_file_without_a_model_key_is_checked_as_before(base_of_tiny, tmp_path):
    """A base file that names no model_key (an earlier version's, llama.cpp's) is checked by tokenizer, vocabulary
    and tokens only: any --model passes check_model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from engine.kld.base import BaseFile

    base, _ = base_of_tiny
    with safe_open(str(base), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "model_key"}
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    old = tmp_path / "old.st"
    save_file(tensors, str(old), metadata=meta)
    BaseFile(old).check_model("tiny-random:llama")
    with pytest.raises(Exception, match="another dense model"):
        BaseFile(base).check_model("tiny-random:llama")
