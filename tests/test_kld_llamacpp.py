"""llama.cpp's KL-divergence base file in hierui kld (engine.kld.llamacpp): written (--base-format llama.cpp) and
read (--base, known by its magic), its bytes parsed here by hand, a file written here by hand scored against numpy,
and the one-line refusals."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from engine.kld import corpus as kld
from engine.kld.llamacpp import LlamaCppBase, LlamaCppWriter, row_width

CTX = 16
TEXT = " ".join(f"Sentence number {i} tells of a {w} that walked to the river." for i, w in enumerate("abcde"))


def _write(tiny, path, pairs=(), text=TEXT, ctx=CTX):
    writer = LlamaCppWriter(path)
    run = kld.score(tiny, list(pairs), text, "test", ctx=ctx, save_base=writer)
    writer.write(tiny.tokenizer, text, kld.layout(len(run.ids), ctx, None), "tiny-random")
    return run


def _parse(path):
    """The file by hand: (n_ctx, n_vocab, n_chunk, tokens, rows (n, nv) uint16)."""
    data = path.read_bytes()
    assert data[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = struct.unpack("<iii", data[8:20])
    tokens = np.frombuffer(data, "<i4", n_ctx * n_chunk, 20)
    rest = np.frombuffer(data, "<u2", offset=20 + 4 * n_ctx * n_chunk)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    assert rest.size % nv == 0
    return n_ctx, n_vocab, n_chunk, tokens, rest.reshape(-1, nv)


def _window_logits(tiny, window):
    import torch

    with torch.no_grad():
        out = tiny.model(input_ids=torch.tensor([window]), use_cache=False)
    return out.logits[0].float().numpy()


def test_the_bytes_are_llamacpps_layout(tiny, tmp_path):
    """A 2-window toy, parsed with struct/numpy: magic, header, tokens (BOS first), and per scored position the
    scale, the floor and q = round((z − lo)/scale) from logits computed here."""
    ids = kld.tokenize(tiny.tokenizer, TEXT, bos_first=True)
    bos = kld.bos_id(tiny.tokenizer)
    assert bos is not None and ids[0] == bos
    text = tiny.tokenizer.decode(ids[1 : 2 * CTX + 5])  # two windows and a few tokens more (cut)
    assert len(kld.tokenize(tiny.tokenizer, text, bos_first=True)) // CTX == 2
    path = tmp_path / "toy.kld"
    _write(tiny, path, text=text)
    n_ctx, n_vocab, n_chunk, tokens, rows = _parse(path)
    stream = kld.tokenize(tiny.tokenizer, text, bos_first=True)
    assert (n_ctx, n_vocab, n_chunk) == (CTX, len(tiny.tokenizer), 2)
    assert tokens.tolist() == stream[: 2 * CTX]
    first, m = CTX // 2, CTX - 1 - CTX // 2
    assert rows.shape == (2 * m, row_width(n_vocab))
    q_off = 0
    for c in range(2):
        window = stream[c * CTX : (c + 1) * CTX]
        window[0] = bos
        z = _window_logits(tiny, window)[first : CTX - 1]  # positions n_ctx/2 … n_ctx − 2
        for j in range(m):
            row = rows[c * m + j]
            scale, min_lp = row[:4].copy().view("<f4")
            zj = z[j].astype(np.float64)
            top, lo = zj.max(), max(zj.min(), zj.max() - 16)
            lse = np.log(np.exp(zj - top).sum())
            assert scale == pytest.approx((top - lo) / 65535, rel=1e-5)
            assert min_lp == pytest.approx(lo - top - lse, abs=1e-5)
            want = np.where(zj > lo, np.rint((zj - lo) / scale), 0)
            q = row[4 : 4 + n_vocab].astype(np.int64)
            assert np.abs(q - want).max() <= 1  # the forward pass here and hierui's head round apart
            q_off += int((q != want).sum())
            assert (row[4 + n_vocab :] == 0).all()  # the padding
            assert q.max() == 65535 and row[4 + int(zj.argmax())] == 65535
    assert q_off <= rows.shape[0] * n_vocab // 100  # off by one at a rounding edge only


def test_round_trip_against_the_dense_model_and_a_wanda_spec(tiny, tiny_calib, tmp_path):
    """Written and read back: the dense model against its own file has KL 0 up to the 16-bit rounding, and a
    wanda spec's KL, same-top and NLLs are the run's without a base file (the same windows), to that rounding."""
    from engine.perturb import perturb
    from engine.perturb.spec import unperturbed

    pair = perturb(tiny, "wanda:0.5", calibration=tiny_calib, use_cache=False)
    path = tmp_path / "b.kld"
    plain = _write(tiny, path, [pair])
    base = LlamaCppBase(path)
    assert base.ctx == CTX and base.chunks == plain.windows
    read = kld.score(tiny, [pair], TEXT, "test", ctx=CTX, base=base)
    assert read.base_kind == "llama.cpp" and read.summaries()[0]["hidden_cos"] is None
    a, b = plain.results[0].tokens, read.results[0].tokens
    assert np.allclose(a["kl"], b["kl"], atol=3e-4)
    assert abs(a["kl"].mean() - b["kl"].mean()) < 1e-4 * max(1.0, a["kl"].mean())
    assert np.allclose(a["nll_d"], b["nll_d"], atol=3e-4) and np.allclose(a["nll_p"], b["nll_p"], atol=1e-5)
    assert np.allclose(a["kl_rev"], b["kl_rev"], atol=3e-4)
    assert (a["same_top"] == b["same_top"]).mean() > 0.98
    none = kld.score(tiny, [perturb(tiny, unperturbed(), use_cache=False)], TEXT, "test", ctx=CTX, base=base)
    assert np.abs(none.results[0].tokens["kl"]).max() < 3e-4
    assert none.results[0].tokens["same_top"].mean() > 0.98


def test_a_file_written_here_by_hand_is_scored_as_numpy_says(tiny, tmp_path):
    """llama.cpp's layout written here from random rows; hierui's KL (terms at or below −16 dropped, as
    llama.cpp), NLL and same-top against them, computed here in numpy."""
    import torch

    from engine.perturb import perturb
    from engine.perturb.spec import unperturbed

    rng = np.random.default_rng(0)
    stream = kld.tokenize(tiny.tokenizer, TEXT, bos_first=True)
    n_chunk, v = len(stream) // CTX, len(tiny.tokenizer)
    m, nv = CTX - 1 - CTX // 2, row_width(v)
    rows = np.zeros((n_chunk * m, nv), dtype="<u2")
    scales = rng.uniform(15, 25, len(rows)).astype("<f4") / 65535
    mins = rng.uniform(-22, -17, len(rows)).astype("<f4")
    rows[:, :4] = np.stack([scales, mins], 1).view("<u2")
    rows[:, 4 : 4 + v] = rng.integers(0, 65536, (len(rows), v))
    path = tmp_path / "hand.kld"
    path.write_bytes(
        b"_logits_"
        + struct.pack("<iii", CTX, v, n_chunk)
        + np.asarray(stream[: n_chunk * CTX], "<i4").tobytes()
        + rows.tobytes()
    )
    pair = perturb(tiny, unperturbed(), use_cache=False)
    got = kld.score(tiny, [pair], TEXT, "test", ctx=CTX, base=LlamaCppBase(path)).results[0].tokens
    bos = kld.bos_id(tiny.tokenizer)
    kl, nll_d, same = [], [], []
    for c in range(n_chunk):
        window = stream[c * CTX : (c + 1) * CTX]
        window[0] = bos
        z = torch.tensor(_window_logits(tiny, window)[CTX // 2 : CTX - 1], dtype=torch.float64)
        lp_p = torch.log_softmax(z, -1).numpy()
        for j in range(m):
            r = rows[c * m + j]
            lp_d = (scales[c * m + j] * r[4 : 4 + v].astype(np.float32) + mins[c * m + j]).astype(np.float64)
            keep = lp_d > -16
            kl.append((np.exp(lp_d[keep]) * (lp_d[keep] - lp_p[j][keep])).sum())
            nll_d.append(-lp_d[window[CTX // 2 + j + 1]])
            same.append(int(r[4 : 4 + v].argmax()) == int(z[j].argmax()))
    assert np.allclose(got["kl"], kl, rtol=1e-4, atol=1e-4)
    assert np.allclose(got["nll_d"], nll_d, rtol=1e-5)
    assert got["same_top"].tolist() == same


@pytest.fixture(scope="module")
def written(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("lc") / "b.kld"
    _write(tiny, path)
    return path


def test_cli_writes_and_reads_a_llamacpp_file(cli, tmp_path):
    text = tmp_path / "c.txt"
    text.write_text(TEXT)
    path = tmp_path / "w.kld"
    args = ["kld", "-m", "tiny-random", "--device", "cpu", "--text", text]
    done = cli(*args, "--ctx", CTX, "--save-base", path, "--base-format", "llama.cpp")
    assert done.returncode == 0, done.stderr
    assert "llama.cpp" in done.stdout and path.read_bytes()[:8] == b"_logits_"
    done = cli(*args, "-p", "none", "--base", path, "--out", tmp_path / "o")  # --ctx from the file
    assert done.returncode == 0, done.stderr
    assert "ctx 16 stride 16" in done.stdout and "(llama.cpp, 16-bit log-probabilities)" in done.stdout
    import pyarrow.parquet as pq

    summary = pq.read_table(tmp_path / "o" / "kld_summary.parquet").to_pylist()[0]
    assert summary["base_kind"] == "llama.cpp" and summary["base"] == str(path) and summary["kl_mean"] < 3e-4
    import json

    assert json.loads((tmp_path / "o" / "kld.json").read_text())["tokens"] == "llama.cpp"
    # a folder scored over hierui's own token stream takes no run over llama.cpp's (a BOS first): the stored specs'
    # tokens would not be the new run's
    plain = cli(*args, "--ctx", CTX, "-p", "none", "--out", tmp_path / "p")
    assert plain.returncode == 0, plain.stderr
    again = cli(*args, "--ctx", CTX, "-p", "none", "--out", tmp_path / "p", "--save-base", tmp_path / "x.kld",
                "--base-format", "llama.cpp")  # fmt: skip
    err = again.stderr.strip()
    assert again.returncode == 2 and len(err.splitlines()) == 1 and "the token stream" in err, err


def _refused(cli, monkeypatch, *args):
    import engine.run.open

    monkeypatch.setattr(engine.run.open, "open_dense", lambda *a, **k: pytest.fail("a model was loaded"))
    done = cli("kld", "-m", "tiny-random", "--device", "cpu", *args)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_files_are_one_line(cli, written, tmp_path, monkeypatch):
    text = tmp_path / "c.txt"
    text.write_text(TEXT)
    data = written.read_bytes()
    cut = tmp_path / "cut.kld"
    cut.write_bytes(data[: len(data) - 7])
    assert "truncated" in _refused(cli, monkeypatch, "-p", "none", "--text", text, "--base", cut)
    head = tmp_path / "head.kld"
    head.write_bytes(data[:14])
    assert "truncated" in _refused(cli, monkeypatch, "-p", "none", "--text", text, "--base", head)
    magic = tmp_path / "magic.kld"
    magic.write_bytes(b"_logitz_" + data[8:])
    assert "not a readable base file" in _refused(cli, monkeypatch, "-p", "none", "--text", text, "--base", magic)
    err = _refused(cli, monkeypatch, "-p", "none", "--text", text, "--ctx", 32, "--base", written)
    assert "--ctx 32" in err and "n_ctx 16" in err
    err = _refused(cli, monkeypatch, "-p", "none", "--text", text, "--stride", 8, "--base", written)
    assert "--stride 8" in err
    other = tmp_path / "o.txt"
    other.write_text(TEXT.replace("number 3", "nombre 3"))
    err = _refused(cli, monkeypatch, "-p", "none", "--text", other, "--base", written)
    assert "not this text's" in err and f"token {1 + TEXT.index('number 3') + 1}" in err
    n_ctx, n_vocab, n_chunk = struct.unpack("<iii", data[8:20])
    vocab = tmp_path / "vocab.kld"  # one more token id: the same tokens, rows one uint16 pair wider
    rows = np.frombuffer(data, "<u2", offset=20 + 4 * n_ctx * n_chunk).reshape(-1, row_width(n_vocab))
    wider = np.zeros((rows.shape[0], row_width(n_vocab + 1)), "<u2")
    wider[:, : rows.shape[1]] = rows
    vocab.write_bytes(data[:12] + struct.pack("<ii", n_vocab + 1, n_chunk) + data[20 : 20 + 4 * n_ctx * n_chunk])
    with open(vocab, "ab") as f:
        f.write(wider.tobytes())
    err = _refused(cli, monkeypatch, "-p", "none", "--text", text, "--base", vocab)
    assert f"n_vocab {n_vocab + 1}" in err


def test_bad_writing_options_are_one_line(cli, tmp_path, monkeypatch):
    text = tmp_path / "c.txt"
    text.write_text(TEXT)
    out = tmp_path / "w.kld"
    save = ["--text", text, "--ctx", CTX, "--save-base", out, "--base-format", "llama.cpp"]
    assert "--base-k" in _refused(cli, monkeypatch, *save, "--base-k", 8)
    assert "do not overlap" in _refused(cli, monkeypatch, *save, "--stride", 8)
    assert "--base-format gguf" in _refused(
        cli, monkeypatch, "--text", text, "--save-base", out, "--base-format", "gguf"
    )
    assert "--save-base" in _refused(cli, monkeypatch, "-p", "none", "--text", text, "--base-format", "llama.cpp")
    assert not out.exists()


def test_a_gguf_file_is_described_by_its_tensors_not_its_name(tmp_path):
    """describe_gguf: each type's weights and the bits per weight from the tensor table (Q8_0: 34 bytes per block
    of 32 weights, 8.5 bits; F32: 32), whatever the file is called."""
    import gguf
    import numpy as np

    from engine.models.gguf_info import describe_gguf, types_label

    path = tmp_path / "named-Q4_K_M.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    q8 = gguf.quants.quantize(
        np.linspace(-1, 1, 64 * 96, dtype=np.float32).reshape(64, 96), gguf.GGMLQuantizationType.Q8_0
    )
    writer.add_tensor("blk.0.ffn_down.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(32 * 64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = describe_gguf(path)
    assert info["types"] == {"Q8_0": 64 * 96, "F32": 32 * 64}
    assert info["bits_per_weight"] == pytest.approx((64 * 96 * 8.5 + 32 * 64 * 32) / (64 * 96 + 32 * 64))
    assert info["file_size"] == path.stat().st_size
    assert types_label(info["types"]) == "Q8_0 75% · F32 25%"


def test_the_size_table_sorts_by_file_and_compares_with_the_next_smaller():
    from hierui.views.kld import size_lines

    def row(spec, size, kl):
        return {"spec": spec, "file_size": size, "bits_per_weight": size / 1e6, "kl_mean": kl, "kl_p99_9": 10 * kl,
                "same_top": 0.9, "quant_types": '{"Q8_0": 3, "F32": 1}'}  # fmt: skip

    rows = [row("checkpoint:/q/m-Q8_0.gguf", 150 * 2**20, 0.004), row("checkpoint:/q/m-Q4_K_M.gguf", 90 * 2**20, 0.05)]
    rows.append({"spec": "wanda:0.5", "kl_mean": 0.7})  # not a file: not in the table
    # kld_pairs holds each pair once, a before b in the order given: Q8_0 − Q4_K_M here
    pairs = [{"spec_a": rows[0]["spec"], "spec_b": rows[1]["spec"], "kl_diff": -0.046, "kl_diff_lo": -0.05,
              "kl_diff_hi": -0.042}]  # fmt: skip
    lines = size_lines(rows, pairs)
    body = [line for line in lines[2:] if line.strip()]
    assert body[0].startswith("◆ m-Q4_K_M.gguf") and "90.0" in body[0] and "KLD" not in body[0]
    assert body[1].strip() == "Q8_0 75% · F32 25%"
    assert body[2].startswith("◆ m-Q8_0.gguf") and "KLD -0.046000 [-0.050000 … -0.042000] differs" in body[2]
    assert not any("wanda" in line for line in lines)
    assert size_lines(rows[2:], pairs) == []


def test_the_pareto_front_by_hand():
    from engine.results.sizes import pareto_front

    #          small+bad  mid+good  big+worse  big+best  equal to mid
    sizes = [1.0, 2.0, 3.0, 3.0, 2.0]
    losses = [0.9, 0.1, 0.5, 0.05, 0.1]
    assert pareto_front(sizes, losses) == [True, True, False, True, True]
