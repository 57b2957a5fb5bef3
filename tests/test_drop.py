"""attndrop / mlpdrop / blockdrop on the seeded tiny Llama: scoring, KV-cache generation, sharing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from engine.errors import HieruiError
from engine.models.loading import load
from engine.perturb import perturb
from engine.perturb.calibration import Calibration
from engine.perturb.drop import DroppedAttention, DroppedMLP, apply_drop, drop_attention, drop_blocks, drop_mlp
from engine.perturb.pair import clone_sharing, shared_fraction
from engine.perturb.spec import parse_spec

DROP = {"attention": drop_attention, "mlp": drop_mlp, "block": drop_blocks}


@pytest.fixture(scope="module")
def loaded():
    return load("tiny-random", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def calib_ids():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))


def _dropped(model, kind):
    layers = model.model.layers
    if kind == "attention":
        return [i for i, layer in enumerate(layers) if isinstance(layer.self_attn, DroppedAttention)]
    if kind == "mlp":
        return [i for i, layer in enumerate(layers) if isinstance(layer.mlp, DroppedMLP)]
    return None


def _reference_similarity(model, ids):
    """Per-layer cosine similarities computed independently: hidden states + output hooks."""
    layers = model.model.layers
    attn, mlp, out = {}, {}, {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.register_forward_hook(lambda _m, _a, o, i=i: attn.__setitem__(i, o[0])))
        hooks.append(layer.mlp.register_forward_hook(lambda _m, _a, o, i=i: mlp.__setitem__(i, o)))
        hooks.append(layer.register_forward_hook(lambda _m, _a, o, i=i: out.__setitem__(i, o)))
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for h in hooks:
            h.remove()
    scores = {"attention": [], "mlp": [], "block": []}
    for i in range(len(layers)):
        h_in, h_out = hidden[i], out[i]
        h_mid = h_in + attn[i]
        torch.testing.assert_close(h_mid + mlp[i], h_out)
        scores["attention"].append(F.cosine_similarity(h_in, h_mid, dim=-1).mean().item())
        scores["mlp"].append(F.cosine_similarity(h_mid, h_out, dim=-1).mean().item())
        scores["block"].append(F.cosine_similarity(h_in, h_out, dim=-1).mean().item())
    return scores


def _top(scores, n):
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:n])


@pytest.mark.parametrize("method,count", [("attndrop", 2), ("mlpdrop", 1), ("blockdrop", 2), ("attndrop", 3)])
def test_drops_the_n_most_similar(loaded, calib_ids, method, count):
    dense = loaded.model
    ref = _reference_similarity(dense, calib_ids)
    clone = clone_sharing(dense)
    details = apply_drop(dense, clone, parse_spec(f"{method}:{count}"), calib_ids)
    kind = details["kind"]
    assert kind == {"attndrop": "attention", "mlpdrop": "mlp", "blockdrop": "block"}[method]
    assert details["similarity"] == pytest.approx(ref[kind], abs=1e-5)
    expected = _top(ref[kind], count)
    assert details["dropped"] == expected
    if kind == "block":
        kept = [i for i in range(4) if i not in expected]
        assert len(clone.model.layers) == 4 - count
        assert clone.config.num_hidden_layers == 4 - count
        assert all(
            a is dense.model.layers[i].self_attn.q_proj.weight
            for a, i in zip((layer.self_attn.q_proj.weight for layer in clone.model.layers), kept)
        )
        assert [layer.self_attn.layer_idx for layer in clone.model.layers] == list(range(4 - count))
    else:
        assert _dropped(clone, kind) == expected
        assert len(clone.model.layers) == 4


def _greedy_with_cache(model, prompt, steps, cache=None):
    tokens = prompt.clone()
    logits_seen = []
    with torch.no_grad():
        out = model(input_ids=prompt, cache=cache, use_cache=True)
        for _ in range(steps):
            logits = out.logits[:, -1, :]
            logits_seen.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            out = model(input_ids=nxt, cache=out.cache, use_cache=True)
    return tokens, torch.stack(logits_seen, 1)


def _greedy_without_cache(model, prompt, steps):
    tokens = prompt.clone()
    logits_seen = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=tokens, use_cache=False).logits[:, -1, :]
            logits_seen.append(logits)
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens, torch.stack(logits_seen, 1)


@pytest.mark.parametrize(
    "kind,indices",
    [
        ("attention", [0]),
        ("attention", [1, 3]),
        ("attention", [0, 1, 2]),
        ("mlp", [0, 2]),
        ("block", [0]),
        ("block", [1, 2]),
    ],
)
def test_kv_cache_generation_matches_recomputation(loaded, kind, indices):
    model = clone_sharing(loaded.model)
    DROP[kind](model, indices)
    prompt = torch.tensor([[256, 72, 101, 108, 108, 111], [256, 87, 111, 114, 108, 100]])
    steps = 8
    want, want_logits = _greedy_without_cache(model, prompt, steps)
    got, got_logits = _greedy_with_cache(model, prompt, steps)  # the model builds DynamicCache(config=...)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    # a cache built without a config (layers created lazily by index) works too
    got2, logits2 = _greedy_with_cache(model, prompt, steps, cache=DynamicCache())
    assert torch.equal(got2, want)
    torch.testing.assert_close(logits2, want_logits, atol=1e-4, rtol=1e-4)
    # and so does generate()
    gen = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=258,
    )
    assert torch.equal(gen, want)


def test_attention_cache_holds_only_live_layers(loaded):
    model = clone_sharing(loaded.model)
    drop_attention(model, [0, 2])
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[256, 1, 2, 3, 4]]), use_cache=True)
    cache = out.cache
    assert cache.get_seq_length() == 5
    # one K/V store per remaining attention (slots 0, 1); the dropped ones get storage-less dummies
    assert cache.is_dummy == [False, False, True, True]
    assert [layer.get_seq_length() for layer in cache.layers[:2]] == [5, 5]
    live = [layer.self_attn for layer in model.model.layers if not isinstance(layer.self_attn, DroppedAttention)]
    assert [attn.layer_idx for attn in live] == [0, 1]


def _tiny(arch):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        pad_token_id=258,
    )
    if arch == "qwen2-mixed":  # layers 0, 1 full attention, 2, 3 sliding (window 4)
        cls = Qwen2ForCausalLM
        config = Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=2, **common)
    elif arch == "qwen2":
        cls, config = Qwen2ForCausalLM, Qwen2Config(**common)
    else:
        cls, config = MistralForCausalLM, MistralConfig(sliding_window=4, **common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(config).eval()


@pytest.mark.parametrize(
    "arch,kind,indices",
    [
        ("qwen2-mixed", "attention", [0]),
        ("qwen2-mixed", "attention", [2]),
        ("qwen2-mixed", "attention", [1, 3]),
        ("qwen2-mixed", "block", [0, 3]),
        ("qwen2", "attention", [0]),
        ("mistral", "attention", [0, 1]),
        ("mistral", "block", [0]),
    ],
)
def test_other_architectures_generate_with_cache(arch, kind, indices):
    dense = _tiny(arch)
    model = clone_sharing(dense)
    DROP[kind](model, indices)
    prompt = torch.tensor([[1, 72, 101, 108, 108, 111]])
    steps = 8  # 14 tokens in all: past the sliding window of 4
    want, want_logits = _greedy_without_cache(model, prompt, steps)
    got, got_logits = _greedy_with_cache(model, prompt, steps)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    gen = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=258,
    )
    assert torch.equal(gen, want)
    assert shared_fraction(dense, model) == 1.0
    # and the dropped model computes what the dense one does with those sublayers/blocks cut out
    with torch.no_grad():
        got_full = model(input_ids=want, use_cache=False).logits
    torch.testing.assert_close(got_full, _hooked_dense_logits(dense, kind, indices, want), atol=1e-5, rtol=1e-5)


def _zero_output(module, _args, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]),) + tuple(output[1:])
    return torch.zeros_like(output)


def _identity_block(module, args, kwargs, output):
    return args[0] if args else kwargs["hidden_states"]


def _hooked_dense_logits(dense, kind, indices, ids):
    """The dense model's logits with the given sublayers' outputs forced to zero (blocks: made identities)."""
    hooks = []
    for i in indices:
        layer = dense.model.layers[i]
        if kind == "attention":
            hooks.append(layer.self_attn.register_forward_hook(_zero_output))
        elif kind == "mlp":
            hooks.append(layer.mlp.register_forward_hook(_zero_output))
        else:
            hooks.append(layer.register_forward_hook(_identity_block, with_kwargs=True))
    try:
        with torch.no_grad():
            return dense(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize(
    "kind,indices",
    [("attention", [0]), ("attention", [1, 3]), ("mlp", [2]), ("mlp", [0, 3]), ("block", [0]), ("block", [1, 3])],
)
def test_matches_hooked_dense_reference(loaded, calib_ids, kind, indices):
    dense = loaded.model
    model = clone_sharing(dense)
    DROP[kind](model, indices)
    ids = calib_ids[:4]
    want = _hooked_dense_logits(dense, kind, indices, ids)
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
        plain = dense(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the drop changed something


@pytest.mark.parametrize("spec", ["attndrop:2", "mlpdrop:2", "blockdrop:2"])
def test_shares_tensors_and_leaves_dense_alone(loaded, calib_ids, spec):
    dense = loaded.model
    ids = calib_ids[:2]
    with torch.no_grad():
        before = dense(input_ids=ids, use_cache=False).logits.clone()
    calibration = Calibration(calib_ids, "self", 8, 32, 0, "test")
    calls = []
    pair = perturb(loaded, spec, calibration=calibration, use_cache=False, progress=lambda *a: calls.append(a))
    assert calls[-1] == ("scoring", 8, 8)
    perturbed = pair.perturbed
    assert shared_fraction(dense, perturbed) == 1.0
    dense_ptrs = {p.data_ptr() for p in dense.parameters()}
    assert all(p.data_ptr() in dense_ptrs for p in perturbed.parameters())
    assert len(list(perturbed.parameters())) < len(list(dense.parameters()))
    assert len(pair.report.details["dropped"]) == 2
    assert len(pair.report.details["similarity"]) == 4
    # the dense model, its modules and its config are untouched
    assert perturbed.config is not dense.config
    assert dense.config.num_hidden_layers == 4 and getattr(dense.config, "kv_sharing_modes", None) is None
    assert len(dense.model.layers) == 4
    assert not any(isinstance(m, (DroppedAttention, DroppedMLP)) for m in dense.modules())
    assert [layer.self_attn.layer_idx for layer in dense.model.layers] == [0, 1, 2, 3]
    with torch.no_grad():
        after = dense(input_ids=ids, use_cache=False).logits
        changed = perturbed(input_ids=ids, use_cache=False).logits
    assert torch.equal(before, after)
    assert not torch.allclose(changed, before, atol=1e-3)


@pytest.mark.parametrize("method", ["attndrop", "mlpdrop", "blockdrop"])
def test_dropping_every_layer_is_an_error(loaded, calib_ids, method):
    dense = loaded.model
    for count in (4, 5):
        with pytest.raises(HieruiError, match="at least one must remain"):
            apply_drop(dense, clone_sharing(dense), parse_spec(f"{method}:{count}"), calib_ids)
    details = apply_drop(dense, clone_sharing(dense), parse_spec(f"{method}:3"), calib_ids[:2])
    assert len(details["dropped"]) == 3


@pytest.mark.parametrize("spec", ["attndrop:2", "mlpdrop:1", "blockdrop:2"])
def test_saved_drop_loads_with_from_pretrained_and_matches(tiny, tiny_calib, tmp_path, spec):
    from transformers import AutoModelForCausalLM

    from engine.perturb import perturb
    from engine.perturb.export import save_checkpoint

    pair = perturb(tiny, spec, calibration=tiny_calib)
    save_checkpoint(pair, tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved")).eval()
    ids = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, pair.perturbed(ids).logits, atol=1e-5)


def test_drop_scores_are_cached(tiny, tiny_calib, fresh_home):
    from pathlib import Path

    first = perturb(tiny, "mlpdrop:2", calibration=tiny_calib)
    cached = list((Path(fresh_home) / "pruned").glob("*-similarity.json"))
    assert len(cached) == 1
    second = perturb(tiny, "attndrop:1", calibration=tiny_calib)  # same scores, another kind
    assert len(list((Path(fresh_home) / "pruned").glob("*-similarity.json"))) == 1
    assert second.report.details["similarity"] == pytest.approx(
        perturb(tiny, "attndrop:1", calibration=tiny_calib, use_cache=False).report.details["similarity"]
    )
    fresh = perturb(tiny, "mlpdrop:2", calibration=tiny_calib, use_cache=False)  # scored anew, not read back
    assert first.report.details["dropped"] == fresh.report.details["dropped"]
    assert first.report.details["similarity"] == pytest.approx(fresh.report.details["similarity"])
