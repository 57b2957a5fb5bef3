"""hierui kld --out guarded like batch's (issue 25, class 6; engine.kld.folder): one writer per folder, the same kld
run or a refusal naming what differs, the folder's specs reused by a rerun, and a kld run into a batch folder of the
same model and calibration allowed."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

CTX = 32
TEXT = " ".join(f"Sentence number {i} tells of a {w} that walked to the river." for i, w in enumerate("abcde"))


@pytest.fixture()
def text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def _kld(cli, text, out, *args):
    return cli("kld", "-m", "tiny-random", "--device", "cpu", "--text", text, "--ctx", CTX, "--out", out, *args)


def _refused(run, *words):
    err = run.stderr.strip()
    assert run.returncode == 2 and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def test_a_folder_another_run_writes_to_is_refused(cli, text, tmp_path):
    """Guards: two kld runs into one folder both went ahead, one overwriting the other's tables; now the second
    is refused in one line naming the first, before any model loads. (The lock is re-entrant within a process,
    so another process holds it.)"""
    import subprocess
    import sys

    out = tmp_path / "out"
    holder = "import sys\nfrom engine.record.lock import lock_folder\nwith lock_folder(sys.argv[1]):\n"
    holder += "    print('held', flush=True)\n    sys.stdin.read()\n"
    with subprocess.Popen([sys.executable, "-c", holder, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as p:
        try:
            assert p.stdout.readline().strip() == b"held"
            run = _kld(cli, text, out, "-p", "magnitude:0.5")
        finally:
            p.stdin.close()
    _refused(run, f"is in use by hierui pid {p.pid}")
    assert not out.exists()  # the holder made the folder and removed it again; kld wrote nothing there


def test_another_kld_run_is_refused(cli, text, tmp_path):
    """Guards: a kld run into a folder holding another kld run (other text, window, model or calibration)
    overwrote it silently; now it is refused in one line naming what differs, before any model loads."""
    from engine.kld import corpus, folder

    out = tmp_path / "out"
    out.mkdir()
    calib = {"wanda:0.5": {"source": None, "samples": 8, "length": 128, "seed": 0}}
    stored = folder.manifest(
        "tiny-random", str(text), corpus.text_hash(TEXT), CTX, None, "cpu", "auto", calibration=calib
    )
    folder.write_manifest(out, stored, ["wanda:0.5"])
    before = (out / "kld.json").read_bytes()
    other = tmp_path / "other.txt"
    other.write_text(TEXT + " And one more sentence about the river.")
    _refused(_kld(cli, other, out, "-p", "magnitude:0.5"), "holds another kld run", "text differs")
    _refused(_kld(cli, text, out, "-p", "magnitude:0.5", "--stride", "16"), "--stride differs")
    _refused(_kld(cli, text, out, "-p", "magnitude:0.5", "--dtype", "bfloat16"), "dtype differs")
    run = _kld(cli, text, out, "-p", "wanda:0.5", "--calib-samples", "16")
    _refused(run, "the calibration of wanda:0.5 differs")
    assert (out / "kld.json").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["kld.json"]


@pytest.mark.slow
def test_the_same_kld_run_reuses_the_folder_and_adds_specs(cli, text, tmp_path):
    """Guards: a rerun into a kld folder overwrote it, and a run with another spec replaced the folder's specs;
    now the same run reuses the specs already scored (the same tables, no model loaded) and adds new ones."""
    out = tmp_path / "out"
    assert _kld(cli, text, out, "-p", "magnitude:0.5").returncode == 0
    manifest = json.loads((out / "kld.json").read_text())
    assert manifest["specs"] == ["magnitude:0.5"] and manifest["ctx"] == CTX and manifest["model"] == "tiny-random"
    tokens = pq.read_table(out / "kld_tokens.parquet")
    again = _kld(cli, text, out, "-p", "magnitude:0.5")  # the same run: nothing scored again, the same tables
    assert again.returncode == 0 and "nothing to score again" in again.stderr and "Mean    KLD:" in again.stdout
    assert pq.read_table(out / "kld_tokens.parquet").equals(tokens)
    more = _kld(cli, text, out, "-p", "magnitude:0.3")  # another spec on the same run: added beside the first
    assert more.returncode == 0 and "scoring magnitude:0.3" in more.stderr
    summary = pq.read_table(out / "kld_summary.parquet").column("spec").to_pylist()
    assert summary == ["magnitude:0.5", "magnitude:0.3"]
    assert pq.read_table(out / "kld_tokens.parquet").slice(0, tokens.num_rows).equals(tokens)
    assert json.loads((out / "kld.json").read_text())["specs"] == summary


def test_kld_tables_without_kld_json_are_refused(cli, text, tmp_path):
    """Guards: a folder with another (older) kld run's tables and no kld.json was overwritten."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "kld_summary.parquet").write_bytes(b"PAR1")
    _refused(_kld(cli, text, out, "-p", "magnitude:0.5"), "no kld.json")


def _batch_json(out, model: str, samples: int) -> None:
    out.mkdir()
    calib = {"wanda:0.5": {"source": None, "samples": samples, "length": 128, "seed": 0}}
    manifest = {"format": "hierui-batch", "version": 1, "model": model, "specs": ["wanda:0.5"], "calibration": calib}
    (out / "batch.json").write_text(json.dumps(manifest))


def test_kld_into_a_batch_folder_of_the_same_model_and_calibration(cli, text, tmp_path):
    """Guards: kld --out into a batch folder merged another model's (or another calibration's) kld into the
    sweep's report; a kld of the batch's model and calibration stays allowed (docs/design.md, Corpus KLD)."""
    from engine.record.settings import calibration_for

    samples = calibration_for("wanda").samples
    same = tmp_path / "same"
    _batch_json(same, "tiny-random", samples)
    run = _kld(cli, text, same, "-p", "magnitude:0.5")
    assert run.returncode == 0, run.stderr
    assert (same / "kld_summary.parquet").is_file() and (same / "batch.json").is_file()
    _refused(
        _kld(cli, text, same, "-p", "wanda:0.5", "--calib-samples", samples // 2), "another calibration of wanda:0.5"
    )
    other = tmp_path / "other"
    _batch_json(other, "random:smollm2-135m", samples)
    _refused(_kld(cli, text, other, "-p", "magnitude:0.5"), "another model")
    assert sorted(p.name for p in other.iterdir()) == ["batch.json"]


def test_a_batch_into_a_kld_folder_of_another_model_or_calibration_is_refused(cli, text, tmp_path):
    """Guards: `hierui batch --out` into a kld folder merged another model's sweep into the kld run's report; the
    same model and calibration stay allowed, as kld into a batch folder (engine.sweep.folder._check_kld)."""
    out = tmp_path / "k"
    assert _kld(cli, text, out, "-p", "magnitude:0.5").returncode == 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("The river\n")
    batch = ("batch", "--device", "cpu", "--prompts", prompts, "--out", out, "--max-new-tokens", "2")
    _refused(cli(*batch, "-m", "random:smollm2-135m", "-p", "magnitude:0.5"), "kld run of another model")
    kld = json.loads((out / "kld.json").read_text())
    kld["calibration"] = {"wanda:0.5": {"source": None, "samples": 3, "length": 16, "seed": 0}}
    (out / "kld.json").write_text(json.dumps(kld))
    _refused(cli(*batch, "-m", "tiny-random", "-p", "wanda:0.5"), "another calibration of wanda:0.5")
    run = cli(*batch, "-m", "tiny-random", "-p", "magnitude:0.5")
    assert run.returncode == 0, run.stderr
    assert (out / "batch.json").is_file() and (out / "kld_summary.parquet").is_file()
