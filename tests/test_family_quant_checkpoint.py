"""int8 / nf4 and checkpoint:PATH on every tiny-random zoo family (CPU): Conv1D and 3-D experts quantized,
routers kept, per-layer-shaped and structurally different checkpoints loaded and compared."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file
from zoo_grid import grid

from engine.anatomy.linears import decoder_layers
from engine.errors import HieruiError
from engine.models.loading import load
from engine.models.zoo import FAMILIES
from engine.perturb import perturb
from engine.perturb.pair import clone_sharing
from engine.run.stepper import Stepper, StepSettings

bnb = pytest.importorskip("bitsandbytes")

from transformers.pytorch_utils import Conv1D  # noqa: E402

ROUTERS = ("mlp.gate", "mlp.shared_expert_gate")
BNB_CLASS = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}


@pytest.fixture(scope="module", autouse=True)
def _home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HIERUI_HOME", str(tmp_path_factory.mktemp("hierui-home")))
        yield


_LOADED: dict = {}


def zoo(family: str):
    """The zoo member, loaded once, with a snapshot of its tensors (pointer and values) taken at load."""
    if family not in _LOADED:
        loaded = load(f"tiny-random:{family}", device="cpu", dtype="float32")
        snapshot = {n: (p.data_ptr(), p.detach().clone()) for n, p in loaded.model.named_parameters()}
        _LOADED[family] = (loaded, snapshot)
    return _LOADED[family]


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def steps(pair, n: int = 3) -> list[dict]:
    return Stepper(pair, "Hello there", StepSettings(max_new_tokens=n)).run()


def expected_targets(model) -> dict:
    """What int8/nf4 must quantize, counted independently of engine.perturb.quant: {kind: [(layer, path)]}."""
    out = {"linear": [], "conv1d": [], "experts": [], "router": []}
    for i, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if name in ROUTERS or type(module).__name__.endswith("Router"):
                out["router"].append((i, name))
            elif isinstance(module, Conv1D):
                out["conv1d"].append((i, name))
            elif isinstance(module, nn.Linear):
                out["linear"].append((i, name))
            else:
                for attr, p in module.named_parameters(recurse=False):
                    if p.dim() == 3:
                        out["experts"].extend((i, f"{name}.{attr}[{e}]") for e in range(p.shape[0]))
    return out


# ------------------------------------------------------------------ int8 / nf4 on every family


@pytest.mark.parametrize("family, method", grid(FAMILIES, ["int8", "nf4"]))
def test_quantizes_every_projection_of_every_family(family, method):
    loaded, snapshot = zoo(family)
    dense = loaded.model
    want = expected_targets(dense)
    pair = perturb(loaded, method)
    q = pair.perturbed
    details = pair.report.details

    # every Linear and Conv1D of the decoder is a bitsandbytes module with no float weight left
    cls = BNB_CLASS[method]
    for i, name in want["linear"] + want["conv1d"]:
        module = decoder_layers(q)[i].get_submodule(name)
        assert isinstance(module, cls), (i, name)
        assert not torch.is_floating_point(module.weight)
    assert details["quantized"]["linear"] == len(want["linear"])
    assert details["quantized"]["conv1d"] == len(want["conv1d"])
    assert details["quantized_linears"] == len(want["linear"]) + len(want["conv1d"]) > 0
    assert details["skipped"] == []

    # every expert matrix: new values, close to the dense ones
    assert details["quantized"]["expert_matrices"] == len(want["experts"])
    for i in sorted({i for i, _ in want["experts"]}):
        d_experts, q_experts = decoder_layers(dense)[i].mlp.experts, decoder_layers(q)[i].mlp.experts
        for attr, d in d_experts.named_parameters(recurse=False):
            p = getattr(q_experts, attr)
            assert p.data_ptr() != d.data_ptr() and p.shape == d.shape and p.dtype == d.dtype
            assert not torch.equal(p, d)
            assert ((p - d).norm() / d.norm()).item() < (0.05 if method == "int8" else 0.2)
    if want["experts"]:
        assert details["methods"]["experts"].startswith("weights quantize-dequantized with bitsandbytes' quantizer")
    for kind in ("linear", "conv1d"):
        if want[kind]:
            assert details["methods"][kind].startswith("bitsandbytes kernels")

    # routers stay the dense model's own full-precision tensors
    for i, name in want["router"]:
        d, p = decoder_layers(dense)[i].get_submodule(name), decoder_layers(q)[i].get_submodule(name)
        assert type(p) is type(d) and p.weight.data_ptr() == d.weight.data_ptr()
    assert set(details["full_precision"]) == {name for _, name in want["router"]}

    # the dense model's tensors are untouched: same storage, same values
    for n, p in dense.named_parameters():
        ptr, value = snapshot[n]
        assert p.data_ptr() == ptr and torch.equal(p.detach(), value), n
    assert q.get_input_embeddings().weight.data_ptr() == dense.get_input_embeddings().weight.data_ptr()
    assert pair.report.measured_sparsity is None

    # the pair steps, with a finite, positive divergence
    records = steps(pair, 1)
    kls = [r["kl"] for r in records]
    assert all(k is not None and math.isfinite(k) for k in kls) and max(kls) > 0


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantized_values_are_bitsandbytes_own(method):
    """Experts equal bitsandbytes' de-quantized weights; a Conv1D's bitsandbytes linear holds its transpose."""
    F = bnb.functional
    loaded, _ = zoo("mixtral")
    pair = perturb(loaded, method)
    d_experts = decoder_layers(loaded.model)[1].mlp.experts
    q_experts = decoder_layers(pair.perturbed)[1].mlp.experts
    for attr in ("gate_up_proj", "down_proj"):
        for e, w in enumerate(getattr(d_experts, attr).detach()):
            if method == "nf4":
                packed, state = F.quantize_4bit(w.clone(), blocksize=64, quant_type="nf4", compress_statistics=False)
                ref = F.dequantize_4bit(packed, state)
            else:
                cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
                ref = F.int8_vectorwise_dequant(cb, scb).float()
            assert torch.equal(getattr(q_experts, attr)[e], ref), (attr, e)

    gpt2, _ = zoo("gpt2")
    conv = decoder_layers(gpt2.model)[0].attn.c_attn
    lin = decoder_layers(perturb(gpt2, method).perturbed)[0].attn.c_attn
    w = conv.weight.detach().t().contiguous()  # [out, in]
    assert (lin.in_features, lin.out_features) == (conv.nx, conv.nf)
    assert lin.bias.data_ptr() == conv.bias.data_ptr()
    if method == "nf4":
        packed, state = F.quantize_4bit(w.clone(), blocksize=64, quant_type="nf4", compress_statistics=False)
        state_lin = copy.deepcopy(lin.weight.quant_state)
        cpu_packed = getattr(state_lin, "packing_format_for_cpu", False)  # repacked for the CPU kernel on first use
        data = lin.weight.data.clone()
        if cpu_packed:
            data, state_lin = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state_lin)
        assert torch.equal(data.view(-1), packed.view(-1))  # the same nf4 codes
        absmax = state.absmax
        if cpu_packed:
            absmax = absmax.to(torch.bfloat16)  # bitsandbytes' AVX512-BF16 CPU kernel keeps the scales in bfloat16
        assert torch.equal(state_lin.absmax.reshape(-1).float(), absmax.float())
    else:
        cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        scales = lin.weight.SCB if lin.weight.SCB is not None else lin.state.SCB  # moved to state on first use
        assert torch.equal(lin.weight.data, cb) and torch.equal(scales, scb)


def test_conv1d_equals_its_transposed_linear():
    """The un-quantized equivalent of a Conv1D, a linear over its transposed weight, gives Conv1D's outputs:
    exactly over the transposed view; to float rounding over the contiguous copy bitsandbytes quantizes."""
    loaded, _ = zoo("gpt2")
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(0))
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        conv = decoder_layers(loaded.model)[1].get_submodule(name)
        assert tuple(conv.weight.shape) == (conv.nx, conv.nf)
        lin = nn.Linear(conv.nx, conv.nf)
        lin.weight, lin.bias = nn.Parameter(conv.weight.detach().t()), conv.bias
        with torch.no_grad():
            expected = conv(x[..., : conv.nx])
            assert torch.equal(lin(x[..., : conv.nx]), expected), name
            lin.weight = nn.Parameter(conv.weight.detach().t().contiguous())
            torch.testing.assert_close(lin(x[..., : conv.nx]), expected, rtol=1e-6, atol=1e-5)


def test_a_shape_bitsandbytes_cannot_take_is_skipped(monkeypatch):
    from engine.perturb import quant

    real = quant._nf4_linear

    def picky(b, weight, bias, dtype):
        if weight.shape[0] == 32:  # k_proj / v_proj of the zoo's GQA models
            raise AssertionError("N must be divisible by block_n")
        return real(b, weight, bias, dtype)

    monkeypatch.setattr(quant, "_nf4_linear", picky)
    loaded, _ = zoo("llama")
    pair = perturb(loaded, "nf4")
    skipped = pair.report.details["skipped"]
    assert len(skipped) == 8 and all("(64->32): AssertionError: N must be divisible by block_n" in s for s in skipped)
    assert pair.report.details["quantized_linears"] == 20
    k = decoder_layers(pair.perturbed)[0].self_attn.k_proj
    assert (
        type(k) is nn.Linear
        and k.weight.data_ptr() == decoder_layers(loaded.model)[0].self_attn.k_proj.weight.data_ptr()
    )
    assert max(r["kl"] for r in steps(pair, 2)) > 0


# ------------------------------------------------------------------ checkpoint:PATH on several families

CHANGED = {
    "llama": "model.layers.0.self_attn.q_proj.weight",
    "gpt2": "transformer.h.0.mlp.c_fc.weight",
    "mixtral": "model.layers.0.mlp.experts.down_proj",  # saved per expert, fused again on loading
}


def changed_name(family: str, model) -> str:
    """The tensor the test prunes: CHANGED's, else the first weight matrix of the first decoder layer."""
    if family in CHANGED:
        return CHANGED[family]
    first = decoder_layers(model)[0]
    inside = {id(p) for p in first.parameters()}
    return next(n for n, p in model.named_parameters() if id(p) in inside and p.dim() >= 2)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpoint_of_a_pruned_clone(family, tmp_path):
    """Every family: a perturbed model saved with save_pretrained loads as checkpoint:DIR, shares every tensor
    but the changed one with the dense model, and steps."""
    loaded, snapshot = zoo(family)
    dense = loaded.model
    clone = clone_sharing(dense)
    name = changed_name(family, dense)
    owner, _, attr = name.rpartition(".")
    module = clone.get_submodule(owner)
    w = getattr(module, attr).detach().clone()
    w.view(-1)[::2] = 0  # half the entries pruned
    setattr(module, attr, nn.Parameter(w, requires_grad=False))
    clone.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)

    pair = perturb(loaded, f"checkpoint:{tmp_path}")
    ckpt = pair.perturbed
    assert torch.equal(logits(ckpt), logits(clone))
    params = dict(ckpt.named_parameters())
    dense_params = dict(dense.named_parameters())
    changed = name
    assert pair.report.details["shared_tensors"] == len(params) - 1
    for name, p in params.items():
        assert (p.data_ptr() == dense_params[name].data_ptr()) == (name != changed), name
    assert pair.report.details["structure"]["hidden_metrics"] == "all layers"
    for n, p in dense.named_parameters():
        assert p.data_ptr() == snapshot[n][0] and torch.equal(p.detach(), snapshot[n][1])
    records = steps(pair)
    assert records[0]["emb_cos"][0] == 1.0 and all(c is not None for c in records[0]["emb_cos"])
    assert max(r["kl"] for r in records) > 0


# ------------------------------------------------------------------ structurally different checkpoints


def _save(directory, tensors: dict, config, tokenizer) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _replace(owner, name: str, weight) -> None:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    setattr(owner, name, lin)


def test_per_layer_heads_and_widths(tmp_path):
    """Layer 1's MLP halved and layer 2 down to one KV head, the config unchanged (LLM-Pruner style)."""
    loaded, _ = zoo("llama")
    dense = loaded.model
    sd = dict(dense.state_dict())
    mlp, attn = "model.layers.1.mlp.", "model.layers.2.self_attn."
    keep = torch.arange(0, 128, 2)  # every other neuron
    sd[mlp + "gate_proj.weight"] = sd[mlp + "gate_proj.weight"][keep]
    sd[mlp + "up_proj.weight"] = sd[mlp + "up_proj.weight"][keep]
    sd[mlp + "down_proj.weight"] = sd[mlp + "down_proj.weight"][:, keep]
    sd[attn + "k_proj.weight"] = sd[attn + "k_proj.weight"][16:]  # head_dim 16: keep KV head 1 of 2
    sd[attn + "v_proj.weight"] = sd[attn + "v_proj.weight"][16:]
    path = _save(tmp_path / "ckpt", sd, dense.config, loaded.tokenizer)

    # the reference: the same slicing applied in memory to a copy of the dense model
    ref = copy.deepcopy(dense)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        _replace(ref.model.layers[1].mlp, proj, sd[mlp + proj + ".weight"])
    for proj in ("k_proj", "v_proj"):
        _replace(ref.model.layers[2].self_attn, proj, sd[attn + proj + ".weight"])
    ref.model.layers[2].self_attn.num_key_value_groups = 4

    pair = perturb(loaded, f"checkpoint:{path}")
    ckpt = pair.perturbed
    assert torch.equal(logits(ckpt), logits(ref))
    assert ckpt.model.layers[1].mlp.down_proj.weight.shape == (64, 64)
    assert ckpt.model.layers[2].self_attn.num_key_value_groups == 4
    assert ckpt.model.layers[0].self_attn.num_key_value_groups == 2
    structure = pair.report.details["structure"]
    assert structure["per_layer_shapes"] is True
    assert structure["hidden_metrics"] == "all layers"
    assert structure["kv_heads"] == {"dense": 2, "checkpoint": [2, 2, 1, 2]}
    assert structure["mlp_width"] == {"dense": 128, "checkpoint": [128, 64, 128, 128]}
    assert "attention_heads" not in structure
    assert ckpt.model.layers[0].mlp.up_proj.weight.data_ptr() == dense.model.layers[0].mlp.up_proj.weight.data_ptr()
    records = steps(pair, 4)
    assert all(r["kl"] > 0 and all(c is not None for c in r["emb_cos"]) for r in records)


def test_per_layer_shapes_that_remove_nothing_give_the_dense_logits(tmp_path):
    """A config claiming a wider MLP and one KV head, over the dense tensors: the tensors' shapes win."""
    loaded, _ = zoo("llama")
    dense = loaded.model
    config = copy.deepcopy(dense.config)
    config.intermediate_size, config.num_key_value_heads = 256, 1
    path = _save(tmp_path / "ckpt", dict(dense.state_dict()), config, loaded.tokenizer)
    pair = perturb(loaded, f"checkpoint:{path}")
    assert torch.equal(logits(pair.perturbed), logits(dense))
    assert pair.report.details["structure"]["per_layer_shapes"] is True
    assert all(r["kl"] == 0 and r["emb_cos"] == [1.0] * 5 for r in steps(pair))


def _fewer_layers(loaded, directory, drop: int) -> str:
    dense = loaded.model
    tensors = {}
    for name, t in dense.state_dict().items():
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            if i == drop:
                continue
            name = name.replace(f"model.layers.{i}.", f"model.layers.{i - (i > drop)}.")
        tensors[name] = t
    config = copy.deepcopy(dense.config)
    config.num_hidden_layers -= 1
    return _save(directory, tensors, config, loaded.tokenizer)


def test_fewer_layers(tmp_path):
    loaded, _ = zoo("llama")
    path = _fewer_layers(loaded, tmp_path / "ckpt", drop=2)
    pair = perturb(loaded, f"checkpoint:{path}")
    structure = pair.report.details["structure"]
    assert structure["layers"] == [4, 3]
    assert structure["hidden_metrics"] == "embeddings and final only"
    assert pair.hidden_map == [0, -1, -1, -1, 3]
    records = steps(pair)
    for r in records:
        assert r["emb_cos"][0] == 1.0 and r["emb_cos"][1:4] == [None] * 3 and r["emb_cos"][4] is not None
        assert r["emb_cos_est_oor"][1:4] == [False] * 3 and r["kl"] > 0

    # with the hint `hierui prune --save` leaves for a blockdrop: every layer through the drop mapping
    (tmp_path / "ckpt" / "hierui-perturbation.json").write_text(
        json.dumps({"spec": "blockdrop:1", "details": {"kind": "block", "dropped": [2]}})
    )
    pair = perturb(loaded, f"checkpoint:{path}")
    assert pair.hidden_map == [0, 1, 2, 2, 3]
    assert pair.report.details["structure"]["hidden_metrics"].startswith("all layers, through the dropped blocks")
    r = steps(pair, 1)[0]
    assert r["emb_cos"][:3] == [1.0, 1.0, 1.0] and None not in r["emb_cos"]


def test_another_hidden_size_compares_logits_only(tmp_path):
    from transformers import LlamaForCausalLM

    loaded, _ = zoo("llama")
    config = copy.deepcopy(loaded.model.config)
    config.hidden_size, config.num_hidden_layers, config.head_dim = 32, 2, 8
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    pair = perturb(loaded, f"checkpoint:{tmp_path}")
    structure = pair.report.details["structure"]
    assert structure["hidden_size"] == [64, 32] and structure["hidden_metrics"] == "none: hidden sizes differ"
    for r in steps(pair):
        assert r["emb_cos"] == [None] * 5 and r["emb_rel"] == [None] * 5
        assert r["kl"] is not None and r["kl"] > 0 and r["logit_cos"] is not None
        # the lens: nothing to compare in the middle layers, the last layer is the models' own output
        assert r["lens_kl"][:-1] == [None] * 3 and r["lens_kl"][-1] == r["kl"]

    # the explorer (a note when the run starts) and `hierui show` say what is not compared
    from engine.perturb.checkpoint import structure_note
    from engine.record.session import load_session
    from engine.run.recorder import SessionRecorder
    from hierui.explorer.live import LiveRun
    from hierui.explorer.sources import RecordedRun

    note = structure_note(pair.report.details)
    assert note and "none: hidden sizes differ" in note
    live = LiveRun(pair, "Hello", StepSettings(max_new_tokens=2), tmp_path / "sessions")
    assert note in live.notes
    session_path = tmp_path / "s.jsonl"
    SessionRecorder(Stepper(pair, "Hello", StepSettings(max_new_tokens=2)), [session_path]).run()
    assert note in RecordedRun(load_session(session_path)).notes


def test_per_layer_shapes_refused_outside_llama_style(tmp_path):
    loaded, _ = zoo("gpt2")
    sd = dict(loaded.model.state_dict())
    sd.pop("lm_head.weight")  # tied to the embeddings
    h = "transformer.h.1.mlp."
    sd[h + "c_fc.weight"], sd[h + "c_fc.bias"] = sd[h + "c_fc.weight"][:, :64], sd[h + "c_fc.bias"][:64]
    sd[h + "c_proj.weight"] = sd[h + "c_proj.weight"][:64]
    path = _save(tmp_path / "ckpt", sd, loaded.model.config, loaded.tokenizer)
    with pytest.raises(
        HieruiError,
        match=r"transformer\.h\.1\.mlp\.c_fc\.weight \[64, 64\] \(config: \[64, 128\]\).*"
        r"load only for Llama-style models \(llama, mistral, qwen2, qwen3\), not gpt2",
    ):
        perturb(loaded, f"checkpoint:{path}")


def test_per_layer_shapes_that_cannot_run_are_one_line(tmp_path):
    loaded, _ = zoo("llama")
    sd = dict(loaded.model.state_dict())
    sd["model.layers.3.self_attn.k_proj.weight"] = sd["model.layers.3.self_attn.k_proj.weight"][:24]
    path = _save(tmp_path / "ckpt", sd, loaded.model.config, loaded.tokenizer)
    with pytest.raises(HieruiError, match=r"layer 3: q_proj 64 / k_proj 24 outputs are not whole heads of head_dim 16"):
        perturb(loaded, f"checkpoint:{path}")


def test_nothing_to_quantize_is_one_line(monkeypatch):
    from engine.perturb import quant

    monkeypatch.setattr(quant, "weight_modules", lambda layer, keep=(): [])
    loaded, _ = zoo("gpt2")
    with pytest.raises(HieruiError, match=r"^int8: found no decoder weight matrix of GPT2LMHeadModel to quantize$"):
        perturb(loaded, "int8")
