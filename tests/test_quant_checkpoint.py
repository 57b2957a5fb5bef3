"""int8 / nf4 quantization and checkpoint:PATH perturbations, on tiny-random (CPU)."""

from __future__ import annotations

import sys

import pytest
import torch

from engine.anatomy.linears import decoder_layers, layer_linears
from engine.errors import HieruiError
from engine.models.loading import load
from engine.perturb import perturb
from engine.perturb.pair import clone_sharing
from engine.perturb.spec import parse_spec

bnb = pytest.importorskip("bitsandbytes")

LAYERS, LINEARS_PER_LAYER = 4, 7
BNB_CLASS = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}


@pytest.fixture(scope="module", autouse=True)
def _home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HIERUI_HOME", str(tmp_path_factory.mktemp("hierui-home")))
        yield


@pytest.fixture(scope="module")
def loaded():
    return load("tiny-random", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def dense_logits(loaded, ids):
    return logits(loaded.model, ids)


@pytest.fixture(scope="module")
def quantized(loaded, ids, dense_logits):
    """{method: (pair, relative logit error)}, built once per method."""
    out = {}
    for method in ("int8", "nf4"):
        pair = perturb(loaded, method)
        out[method] = (pair, rel_err(logits(pair.perturbed, ids), dense_logits))
    return out


# ------------------------------------------------------------------ int8 / nf4


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_every_decoder_linear_is_replaced(quantized, loaded, method):
    pair, _ = quantized[method]
    cls = getattr(bnb.nn, BNB_CLASS[method])
    found = [lin for layer in decoder_layers(pair.perturbed) for lin in layer_linears(layer).values()]
    assert len(found) == LAYERS * LINEARS_PER_LAYER
    assert all(isinstance(lin, cls) for lin in found)
    assert all(not torch.is_floating_point(lin.weight) for lin in found)
    dense = [lin for layer in decoder_layers(loaded.model) for lin in layer_linears(layer).values()]
    assert all(type(lin) is torch.nn.Linear and lin.weight.dtype == torch.float32 for lin in dense)
    details = pair.report.details
    assert details["quantized_linears"] == LAYERS * LINEARS_PER_LAYER
    assert details["bits"] == (8 if method == "int8" else 4)
    assert details["backend"] == f"bitsandbytes {bnb.__version__}"


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_logits_close_but_not_equal(quantized, method):
    _, err = quantized[method]
    assert 1e-4 < err < (0.1 if method == "int8" else 0.6)


def test_nf4_error_larger_than_int8(quantized):
    # measured on tiny-random: int8 ~0.03, nf4 ~0.29
    assert quantized["nf4"][1] > 2 * quantized["int8"][1]


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_dense_model_untouched_and_shared(quantized, loaded, ids, dense_logits, method):
    pair, _ = quantized[method]
    assert torch.equal(logits(loaded.model, ids), dense_logits)
    fresh = load("tiny-random", device="cpu", dtype="float32").model.state_dict()
    assert all(torch.equal(t, fresh[n]) for n, t in loaded.model.state_dict().items())
    d, p = loaded.model, pair.perturbed
    assert p.get_input_embeddings().weight.data_ptr() == d.get_input_embeddings().weight.data_ptr()
    assert p.get_output_embeddings().weight.data_ptr() == d.get_output_embeddings().weight.data_ptr()
    assert p.model.norm.weight.data_ptr() == d.model.norm.weight.data_ptr()
    assert p.model.layers[0].input_layernorm.weight.data_ptr() == d.model.layers[0].input_layernorm.weight.data_ptr()


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantized_has_no_measured_sparsity(quantized, method):
    report = quantized[method][0].report
    assert report.measured_sparsity is None
    assert report.by_type == {}


def test_generation_with_cache_matches_full_forward(quantized, ids):
    model = quantized["nf4"][0].perturbed
    with torch.no_grad():
        full = model(ids[:, :9]).logits[:, -1]
        first = model(ids[:, :8], use_cache=True)
        step = model(ids[:, 8:9], past_key_values=first.past_key_values, use_cache=True).logits[:, -1]
    assert torch.allclose(step, full, atol=1e-4)


def test_missing_bitsandbytes_is_one_line(loaded, monkeypatch):
    from engine.perturb.quant import quantize

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(HieruiError, match="need bitsandbytes"):
        quantize(clone_sharing(loaded.model), parse_spec("int8"))


def test_backend_failure_is_one_line(loaded, monkeypatch):
    from engine.perturb.quant import quantize

    def broken(*_a, **_k):
        raise RuntimeError("no kernel for this device\nsecond line")

    monkeypatch.setattr(bnb, "matmul_4bit", broken)
    with pytest.raises(HieruiError, match=r"cannot run nf4 on cpu.*no kernel for this device$"):
        quantize(clone_sharing(loaded.model), parse_spec("nf4"))


# ------------------------------------------------------------------ checkpoint:PATH


def test_checkpoint_of_a_pruned_model(loaded, ids, dense_logits, tmp_path):
    pruned = perturb(loaded, "magnitude:0.5", use_cache=False).perturbed
    pruned.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    pair = perturb(loaded, f"checkpoint:{tmp_path}")
    ckpt, dense = pair.perturbed, loaded.model

    assert torch.equal(logits(ckpt, ids), logits(pruned, ids))
    assert torch.equal(logits(dense, ids), dense_logits)
    assert not ckpt.training and not any(p.requires_grad for p in ckpt.parameters())
    emb = ckpt.get_input_embeddings().weight
    assert emb.data_ptr() == dense.get_input_embeddings().weight.data_ptr()
    assert ckpt.get_output_embeddings().weight is emb  # still tied
    assert ckpt.model.norm.weight.data_ptr() == dense.model.norm.weight.data_ptr()
    q = ckpt.model.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() != dense.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert pair.report.measured_sparsity == pytest.approx(0.5, abs=1e-3)
    assert pair.report.dense_sparsity == pytest.approx(0.0, abs=1e-3)


def test_checkpoint_missing_path(loaded, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(HieruiError, match=f"checkpoint not found: {missing}"):
        perturb(loaded, f"checkpoint:{missing}")


# another hidden size is no longer refused: it loads with hidden-state metrics null
# (tests/test_family_quant_checkpoint.py::test_another_hidden_size_compares_logits_only)
@pytest.mark.parametrize("change, message", [({"vocab_size": 300}, "output vocabulary 300 vs 260")])
def test_checkpoint_incompatible(loaded, tmp_path, change, message):
    from transformers import LlamaForCausalLM

    from engine.models.tiny import tiny_config

    config = tiny_config()
    config.num_hidden_layers = 1
    for key, value in change.items():
        setattr(config, key, value)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(HieruiError, match=message):
        perturb(loaded, f"checkpoint:{tmp_path}")


def test_many_checkpoints_expand_to_one_spec_each(tmp_path):
    """`checkpoint:quants/*.gguf` and `checkpoint:FOLDER` of GGUF files: one spec per file, by name; a glob that
    matches nothing, or a folder with nothing to score, one line; a model folder and other specs left as typed."""
    from engine.perturb.spec import expand_specs

    quants = tmp_path / "quants"
    quants.mkdir()
    for name in ("m-Q8_0.gguf", "m-Q4_K_M.gguf", "notes.txt"):
        (quants / name).write_bytes(b"")
    model = tmp_path / "pruned"
    model.mkdir()
    (model / "config.json").write_text("{}")
    files = [f"checkpoint:{quants / n}" for n in ("m-Q4_K_M.gguf", "m-Q8_0.gguf")]
    assert expand_specs([f"checkpoint:{quants}/*.gguf", "wanda:0.5"]) == [*files, "wanda:0.5"]
    assert expand_specs([f"checkpoint:{quants}"]) == files
    assert expand_specs([f"checkpoint:{tmp_path}/*"]) == [f"checkpoint:{model}"]  # a model folder, not a text file
    as_typed = [f"checkpoint:{model}", "checkpoint:/no/such"]  # parse_spec and the loader judge these
    assert expand_specs(as_typed) == as_typed
    with pytest.raises(HieruiError, match="no GGUF file or model folder matches"):
        expand_specs([f"checkpoint:{tmp_path}/*.safetensors"])
    (quants / "m-Q8_0.gguf").unlink()
    (quants / "m-Q4_K_M.gguf").unlink()
    with pytest.raises(HieruiError, match="neither a config.json nor GGUF files"):
        expand_specs([f"checkpoint:{quants}"])


def test_kld_scores_every_model_a_glob_names(cli, tmp_path):
    """hierui kld --prune 'checkpoint:runs/*': each saved model a candidate of its own, in the tables."""
    import pyarrow.parquet as pq

    runs = tmp_path / "runs"
    for spec in ("magnitude:0.3", "magnitude:0.6"):
        saved = cli("prune", "--model", "tiny-random", "--prune", spec, "--save", runs / spec.replace(":", "-"))
        assert saved.returncode == 0, saved.stderr
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10, encoding="utf-8")
    out = tmp_path / "out"
    done = cli("kld", "-m", "tiny-random", "--text", text, "--ctx", "32", "-p", f"checkpoint:{runs}/*", "--out", out)
    assert done.returncode == 0, done.stderr
    rows = pq.read_table(out / "kld_summary.parquet").to_pylist()
    assert [r["spec"] for r in rows] == [f"checkpoint:{runs / n}" for n in ("magnitude-0.3", "magnitude-0.6")]
    assert rows[0]["kl_mean"] < rows[1]["kl_mean"]  # the sparser checkpoint moves the model further
    assert [round(r["measured_sparsity"], 2) for r in rows] == [0.3, 0.6]
