"""attndrop / mlpdrop / blockdrop, their scores, KV caches, `prune --save` and the stepper's last-position hooks
on every family of the tiny-random zoo (engine.models.zoo).

The references here do not use engine.anatomy.sublayers: each family's residual contributions are named below by hand.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from zoo_grid import grid

from engine.anatomy.sublayers import state_modules
from engine.errors import HieruiError
from engine.models.loading import load
from engine.models.zoo import FAMILIES, SLIDING_WINDOW
from engine.perturb import perturb
from engine.perturb.calibration import Calibration
from engine.perturb.drop import (
    _own_config,
    drop_attention,
    drop_blocks,
    drop_mlp,
    hidden_map_after_block_drop,
    similarity_scores,
    standard_equivalent,
)
from engine.perturb.pair import ModelPair, clone_sharing, shared_fraction
from engine.perturb.spec import parse_spec
from engine.record.settings import StepSettings
from engine.run.stepper import BatchStepper, Stepper

DROP = {"attention": drop_attention, "mlp": drop_mlp, "block": drop_blocks}
SPECS = {"attndrop:1": "attention", "mlpdrop:1": "mlp", "blockdrop:1": "block"}

# per family, the module of a decoder layer whose output is what attention / the MLP adds to the residual stream
CONTRIBUTION = {
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gpt_neox": ("attention", "mlp"),
    "opt": ("self_attn", "fc2"),  # OPT's MLP is fc1 → fc2 inside the layer: fc2's output is added
    "gpt2": ("attn", "mlp"),
}
MIXED = ["qwen2", "gemma2", "gemma3", "mistral"]  # sliding-window attention (mixed with full, or everywhere)


def _layers(model, family):
    if family == "gpt_neox":
        return model.gpt_neox.layers
    if family == "opt":
        return model.model.decoder.layers
    if family == "gpt2":
        return model.transformer.h
    return model.model.layers


@functools.cache
def _loaded(family):
    return load(f"tiny-random:{family}", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def calibration():
    ids = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(3))
    return Calibration(ids, "self", 8, 24, 0, "test")


def _zero_output(_module, _args, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]),) + tuple(output[1:])
    return torch.zeros_like(output)


def _identity_block(_module, args, kwargs, _output):
    return args[0] if args else kwargs["hidden_states"]


def _hooked_dense_logits(dense, family, kind, indices, ids):
    """The dense model's logits with the given sublayers' residual contributions zeroed (blocks: identities)."""
    attention, mlp = CONTRIBUTION.get(family, ("self_attn", "mlp"))
    hooks = []
    for i in indices:
        layer = _layers(dense, family)[i]
        if kind == "block":
            hooks.append(layer.register_forward_hook(_identity_block, with_kwargs=True))
        else:
            module = getattr(layer, attention if kind == "attention" else mlp)
            hooks.append(module.register_forward_hook(_zero_output))
    try:
        with torch.no_grad():
            return dense(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------ every family × every drop


@pytest.mark.parametrize("family, spec", grid(FAMILIES, SPECS))
def test_drop_equals_hooked_reference(family, spec, calibration):
    loaded = _loaded(family)
    dense = loaded.model
    pair = perturb(loaded, spec, calibration=calibration, use_cache=False)
    details = pair.report.details
    kind = SPECS[spec]
    assert details["kind"] == kind and len(details["dropped"]) == 1 and len(details["similarity"]) == 4
    ids = torch.randint(0, 256, (2, 2 * SLIDING_WINDOW), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = pair.perturbed(input_ids=ids, use_cache=False).logits
        plain = dense(input_ids=ids, use_cache=False).logits
    want = _hooked_dense_logits(dense, family, kind, details["dropped"], ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the drop changed something (OPT's mlpdrop once did not)
    assert shared_fraction(dense, pair.perturbed) == 1.0
    assert len(_layers(dense, family)) == 4 and dense.config.num_hidden_layers == 4  # the dense model untouched
    if kind == "block":
        assert len(_layers(pair.perturbed, family)) == 3 and pair.perturbed.config.num_hidden_layers == 3


def _reference_scores(dense, family, ids, contribution=None):
    """Cosines from hooked states: h_in (layer input), a, m (the residual contributions), h_out (layer output)."""
    attention, mlp = contribution or CONTRIBUTION.get(family, ("self_attn", "mlp"))
    states: dict = {}
    hooks = []
    for i, layer in enumerate(_layers(dense, family)):

        def keep(key, i=i, take=lambda args, kwargs, out: out[0] if isinstance(out, tuple) else out):
            return lambda _m, args, kwargs, out: states.__setitem__((key, i), take(args, kwargs, out))

        layer_input = keep("in", take=lambda a, k, o: a[0] if a else k["hidden_states"])
        hooks.append(layer.register_forward_hook(layer_input, with_kwargs=True))
        hooks.append(layer.register_forward_hook(keep("out"), with_kwargs=True))
        hooks.append(getattr(layer, attention).register_forward_hook(keep("a"), with_kwargs=True))
        hooks.append(getattr(layer, mlp).register_forward_hook(keep("m"), with_kwargs=True))
    try:
        with torch.no_grad():
            dense(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    scores = {"attention": [], "mlp": [], "block": []}
    for i in range(len(_layers(dense, family))):
        h_in, h_out, a = states["in", i], states["out", i], states["a", i]
        m = states["m", i].view_as(h_in)  # OPT's fc2 gives [tokens, hidden]
        h_mid = h_in + a  # GPT-NeoX (parallel residual): not a state the model computes, but defined alike
        torch.testing.assert_close(h_mid + m, h_out, atol=1e-5, rtol=1e-5)  # the decomposition is right
        scores["attention"].append(F.cosine_similarity(h_in, h_mid, dim=-1).mean().item())
        scores["mlp"].append(F.cosine_similarity(h_mid, h_out, dim=-1).mean().item())
        scores["block"].append(F.cosine_similarity(h_in, h_out, dim=-1).mean().item())
    return scores


@pytest.mark.parametrize("family", ["gemma2", "olmo2", "gpt_neox", "opt", "gpt2"])
def test_scores_measure_the_residual_stream(family, calibration):
    dense = _loaded(family).model
    ids = calibration.ids
    want = _reference_scores(dense, family, ids)
    got = similarity_scores(dense, ids, batch_size=3)
    for kind in ("attention", "mlp", "block"):
        assert got[kind] == pytest.approx(want[kind], abs=1e-5), kind
    if family == "gemma2":  # scoring self_attn's raw output, before Gemma's output norm, gives other numbers
        with pytest.raises(AssertionError):  # that is not what the layer adds: the decomposition fails
            _reference_scores(dense, family, ids, contribution=("self_attn", "post_feedforward_layernorm"))


def test_post_ln_models_are_refused():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=260, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4)
    config.do_layer_norm_before = False
    model = OPTForCausalLM(config).eval()
    with pytest.raises(HieruiError, match="post-LN"):
        similarity_scores(model, torch.randint(0, 256, (2, 8)))
    with pytest.raises(HieruiError, match="post-LN"):
        drop_attention(clone_sharing(model), [0])


# ------------------------------------------------------------------ KV caches past the sliding window


def _direct(family, kind, indices):
    """The dense model and a clone with the given sublayers / blocks dropped (no scoring)."""
    loaded = _loaded(family)
    clone = clone_sharing(loaded.model)
    _own_config(loaded.model, clone)
    DROP[kind](clone, indices)
    spec = {"attention": "attndrop", "mlp": "mlpdrop", "block": "blockdrop"}[kind]
    pair = ModelPair(loaded.model, clone, loaded.tokenizer, parse_spec(f"{spec}:{len(indices)}"), loaded=loaded)
    if kind == "block":
        pair.hidden_map = hidden_map_after_block_drop(4, indices)
    return pair


def _kinds(family):
    types = getattr(_loaded(family).model.config, "layer_types", None) or ["sliding_attention"] * 4
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    full = [i for i, t in enumerate(types) if t != "sliding_attention"] or [3]
    return sliding, full


def _stepped_logits(pair, prompts, steps):
    """Each model's last-position logits at every step of a shared-mode run, and the tokens each row saw."""
    seen = {"d": [], "p": []}
    hooks = [
        pair.dense.register_forward_hook(lambda _m, _a, out: seen["d"].append(out.logits[:, -1].clone())),
        pair.perturbed.register_forward_hook(lambda _m, _a, out: seen["p"].append(out.logits[:, -1].clone())),
    ]
    settings = StepSettings(max_new_tokens=steps, raw=True)
    try:
        if len(prompts) == 1:
            stepper = Stepper(pair, prompts[0], settings)
            stepper.run()
            rows = [stepper.row]
        else:
            batch = BatchStepper(pair, prompts, settings)
            batch.run()
            rows = batch.rows
    finally:
        for h in hooks:
            h.remove()
    return seen, [row.ids + [r["fed"][1] for r in row.records] for row in rows]


def _assert_stepping_equals_full_forward(pair, prompts, steps=20, dense=False):
    """The perturbed model's (and with `dense`, the dense model's) logits at every step of a Stepper run
    equal a full forward pass over the same tokens."""
    seen, tokens = _stepped_logits(pair, prompts, steps)
    for b, toks in enumerate(tokens):
        assert len(toks) > SLIDING_WINDOW + 8  # past the window
        ids = torch.tensor([toks])
        n = len(toks) - steps  # the prompt's length
        for name, model in (("d", pair.dense), ("p", pair.perturbed)):
            if name == "d" and not dense:
                continue
            with torch.no_grad():
                full = model(input_ids=ids, use_cache=False).logits[0]
            got = torch.stack([step[b] for step in seen[name][:steps]])
            torch.testing.assert_close(got, full[n - 1 : len(toks) - 1], atol=2e-5, rtol=1e-4)


PROMPT = "Sliding windows: a test prompt, long enough."


@pytest.mark.parametrize("spec", ["attndrop:1", "blockdrop:1"])
@pytest.mark.parametrize("family", MIXED)
def test_stepping_past_the_window_equals_full_forward(family, spec, calibration):
    pair = perturb(_loaded(family), spec, calibration=calibration, use_cache=False)
    _assert_stepping_equals_full_forward(pair, [PROMPT], dense=spec == "attndrop:1")


@pytest.mark.parametrize("family", MIXED)
def test_stepping_with_chosen_drops_equals_full_forward(family):
    """A sliding layer's attention, a full one's, both; a sliding block, a full one (mistral: all sliding)."""
    sliding, full = _kinds(family)
    cases = [
        ("attention", sliding[:1]),
        ("attention", full[:1]),
        ("attention", sorted({sliding[-1], full[0]})),
        ("block", sliding[:1]),
        ("block", full[:1]),
    ]
    for kind, indices in cases:
        _assert_stepping_equals_full_forward(_direct(family, kind, indices), [PROMPT])


def test_batched_stepping_with_a_dropped_first_attention():
    pair = _direct("qwen2", "attention", [0])  # slot 0 is a full-attention one, the first live slot too
    _assert_stepping_equals_full_forward(pair, ["Hi there, a row.", PROMPT + " A longer second row."])


@pytest.mark.parametrize("family", MIXED)
def test_any_cache_counts_right_after_attndrop(family):
    """Before the fix, a cache made without a config (slots created lazily, one per layer index) counted 0
    tokens seen when a dropped attention kept slot 0 (mixed sliding/full layers): positions restarted at 0 and
    the masks were sized from the empty slot. Fed one token at a time and in chunks, across the window."""
    ids = torch.randint(0, 256, (2, 2 * SLIDING_WINDOW + 3), generator=torch.Generator().manual_seed(7))
    chunks = [6] + [1] * 10 + [7, 9] + [1] * 3
    assert sum(chunks) == ids.shape[1]
    for indices in ([0], [2], [1, 3], [0, 1, 2]):
        model = _direct(family, "attention", indices).perturbed
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits
            for kv in (DynamicCache(config=model.config), DynamicCache()):
                outs, start = [], 0
                for size in chunks:
                    outs.append(model(input_ids=ids[:, start : start + size], cache=kv, use_cache=True).logits)
                    start += size
                assert kv.get_seq_length() == ids.shape[1]
                torch.testing.assert_close(torch.cat(outs, 1), want, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ the stepper's last-position hooks


@pytest.mark.parametrize("family", list(FAMILIES))
def test_last_position_hooks_equal_output_hidden_states(family):
    loaded = _loaded(family)
    models = {"dense": loaded.model, "attndrop": _direct(family, "attention", [1]).perturbed}
    models["blockdrop"] = _direct(family, "block", [2]).perturbed
    pair = ModelPair(loaded.model, loaded.model, loaded.tokenizer, parse_spec("none"), loaded=loaded)
    stepper = BatchStepper(pair, ["x"])
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(9))
    for name, model in models.items():
        layers, final = state_modules(model)
        assert layers is not None and final is not None, f"{family} {name} falls back to every position"
        assert len(layers) == model.config.num_hidden_layers
        hidden, logits = stepper._forward(model, ids, DynamicCache(config=model.config))
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
        want = torch.stack([h[:, -1] for h in out.hidden_states], dim=1)
        assert hidden.shape == want.shape == (2, len(layers) + 1, want.shape[-1])
        torch.testing.assert_close(hidden, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, out.logits[:, -1], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ prune --save


@pytest.mark.parametrize("family, kind", grid(FAMILIES, ["attention", "mlp", "block"]))
def test_standard_equivalent_reloads_with_the_same_outputs(family, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    pair = _direct(family, kind, [1, 2])
    saved = standard_equivalent(pair.dense, pair.perturbed, {"kind": kind, "dropped": [1, 2]})
    if kind == "block":
        assert saved is pair.perturbed  # dropped blocks are really gone: the clone is already standard
    else:  # new zero tensors; the dense ones are never written
        assert shared_fraction(pair.dense, saved) < 1.0
    saved.save_pretrained(str(tmp_path), safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 2 * SLIDING_WINDOW), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = pair.perturbed(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(saved(input_ids=ids, use_cache=False).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=ids, use_cache=False).logits, want, atol=1e-5, rtol=1e-5)


def test_blockdrop_keeps_qwen2_moe_dense_layers_dense_after_reload(tmp_path):
    """Qwen2-MoE picks each layer's MLP by index (mlp_only_layers, decoder_sparse_step): after blockdrop the
    saved config must name the kept layers' kinds by their new indices."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        decoder_sparse_step=2,  # layers 1, 3 sparse ...
        mlp_only_layers=[3],  # ... but 3 dense
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dense = Qwen2MoeForCausalLM(config).eval()
    clone = clone_sharing(dense)
    _own_config(dense, clone)
    drop_blocks(clone, [0])
    kinds = [type(layer.mlp).__name__ for layer in clone.model.layers]
    assert kinds == ["Qwen2MoeSparseMoeBlock", "Qwen2MoeMLP", "Qwen2MoeMLP"]
    clone.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert [type(layer.mlp).__name__ for layer in reloaded.model.layers] == kinds
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, clone(input_ids=ids).logits)
