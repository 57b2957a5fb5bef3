"""A pair on several devices (engine.place.placement): one device_map for both models, made before loading.

This machine has one CPU and no GPU, so what runs here is (a) the map itself, made on the meta device for
pretended GPUs, (b) the whole hooked path (accelerate's hooks on every module, as several GPUs get them) on one
device, which must give exactly what the plain model gives, and (c) the bookkeeping that keeps per-step copies
to one per device. bench/gpu_check.sh runs the cross-device path itself on a GPU machine.
"""

import json

import pytest
import torch

from engine.anatomy.linears import decoder_layers, decoder_layers_prefix, weight_views
from engine.errors import HieruiError
from engine.models.loading import load
from engine.perturb import perturb
from engine.place.placement import (
    check_same_placement,
    describe,
    device_runs,
    gather,
    layer_devices,
    mismatched_layers,
    pair_device_map,
)
from engine.run.plan import GiB
from engine.run.plan.placing import bytes_by_entry
from engine.run.plan.shape import config_object, meta_model
from engine.run.stepper import Stepper, StepSettings

METRICS = ("kl", "js", "tv", "logit_cos", "prob_cos", "dp", "nll_d", "nll_p", "emb_cos")
EXACT = ("token_d", "token_p", "top1_agree", "rank_shift", "same_token", "first_divergence")


def _meta(name: str, dtype=torch.bfloat16):
    return meta_model(name, config_object(name), dtype)


def _layer_of(name: str, prefix: str) -> int | None:
    return int(name[len(prefix) :].split(".")[0]) if name.startswith(prefix) else None


# ------------------------------------------------------------------ the map, on the meta device


def test_a_7b_map_keeps_layers_whole_in_order_and_within_each_budget():
    model = _meta("random:llama-7b")
    prefix = decoder_layers_prefix(model)
    budgets = {0: 10 * GiB, 1: 10 * GiB, 2: 10 * GiB}
    overhead = 1.6
    device_map = pair_device_map(model, torch.bfloat16, budgets, overhead)
    # every parameter is under exactly one entry, and a decoder layer is one entry (never split over GPUs)
    names = [n for n, _ in model.named_parameters()]
    for name in names:
        owners = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        assert len(owners) == 1, name
        layer = _layer_of(name, prefix)
        if layer is not None:
            assert owners[0] == f"{prefix}{layer}"
    # filled in order: layer ℓ's GPU never decreases with ℓ, and GPU 0 is used
    gpus = [device_map[f"{prefix}{i}"] for i in range(len(decoder_layers(model)))]
    assert gpus == sorted(gpus) and gpus[0] == 0 and len(set(gpus)) >= 2
    # each GPU's dense bytes, with what the pair adds in proportion, within its budget
    sizes = bytes_by_entry(model, device_map)
    for gpu, budget in budgets.items():
        held = sum(size for name, size in sizes.items() if device_map[name] == gpu)
        assert held * overhead <= budget
    # 13.5 GB of bfloat16 weights × 1.6 do not go into 2 × 5 GiB
    with pytest.raises(HieruiError, match="does not fit 2 GPU"):
        pair_device_map(model, torch.bfloat16, {0: 5 * GiB, 1: 5 * GiB}, overhead)


def test_the_map_is_described_by_layer_ranges():
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1}
    device_map |= {"model.norm": 1, "lm_head": 1}
    assert describe(device_map, "model.layers.") == "cuda:0: embed_tokens, layers 0–1 · cuda:1: norm, lm_head, layer 2"


# ------------------------------------------------------------------ copies per step: one per device


def test_device_runs_group_consecutive_devices():
    a, b = torch.device("cpu"), torch.device("meta")
    assert device_runs([a, a, b, b, b, a]) == [(a, 0, 2), (b, 2, 5), (a, 5, 6)]
    assert device_runs([]) == []


def test_gather_is_stack_and_moves_each_run_once(monkeypatch):
    cpu = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    assert torch.equal(gather(cpu, torch.device("cpu")), torch.stack(cpu, dim=1))
    # three layers on one device and two on another, to a third: two copies, not five
    mixed = [t.to("meta") if i < 3 else t for i, t in enumerate(cpu)]
    moved = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        moved.append(tuple(self.shape))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    out = gather(mixed, torch.device("meta"), dim=0)
    monkeypatch.undo()
    assert out.device.type == "meta" and out.shape == (5, 2, 3)
    assert moved == [(3, 2, 3), (2, 2, 3)]


# ------------------------------------------------------------------ the hooked path on one device


def _tiny_map() -> dict:
    """tiny-random's modules one by one, all on the CPU: the shape of a multi-GPU map, on this machine."""
    model = _meta("tiny-random", torch.float32)
    prefix = decoder_layers_prefix(model)
    names = [n for n, _ in model.named_children()]
    inner = [f"{prefix.split('.')[0]}.{n}" for n, _ in model.get_submodule(prefix.split(".")[0]).named_children()]
    layers = [f"{prefix}{i}" for i in range(len(decoder_layers(model)))]
    entries = [n for n in inner if n != prefix.rstrip(".")] + layers + [n for n in names if n != prefix.split(".")[0]]
    return {name: "cpu" for name in entries}


@pytest.fixture(scope="module")
def hooked():
    return load("tiny-random", device="cpu", device_map=_tiny_map())


@pytest.fixture(scope="module")
def pairs(tiny, hooked, tiny_calib):
    return tuple(perturb(m, "wanda:0.5", calibration=tiny_calib, use_cache=False) for m in (tiny, hooked))


def test_a_mapped_load_has_accelerates_hooks_and_computes_alike(tiny, hooked):
    assert all(getattr(layer, "_hf_hook", None) is not None for layer in decoder_layers(hooked.model))
    assert json.loads(json.dumps(hooked.model.hf_device_map)) == _tiny_map()
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        assert torch.equal(tiny.model(input_ids=ids).logits, hooked.model(input_ids=ids).logits)


def test_pruning_a_mapped_model_gives_the_same_weights_and_keeps_the_placement(pairs):
    plain, mapped = pairs
    assert not mismatched_layers(mapped.dense, mapped.perturbed)
    for a, b in zip(decoder_layers(plain.perturbed), decoder_layers(mapped.perturbed)):
        assert getattr(b, "_hf_hook", None) is not None  # the copy has its own hooks, like the dense model
        for va, vb in zip(weight_views(a, 0), weight_views(b, 0)):
            assert torch.equal(va.matrix(), vb.matrix())
    assert mapped.report.measured_sparsity == plain.report.measured_sparsity


@pytest.mark.parametrize("mode", ["shared", "free"])
def test_stepping_a_mapped_pair_gives_the_same_metrics(pairs, mode):
    settings = StepSettings(mode=mode, max_new_tokens=5, raw=True)
    ra, rb = (Stepper(pair, "The quick brown fox", settings).run() for pair in pairs)
    assert len(ra) == len(rb) == 5
    for a, b in zip(ra, rb):
        for key in EXACT:
            assert a.get(key) == b.get(key), key
        for key in METRICS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_a_perturbed_layer_on_another_device_is_caught(pairs):
    _plain, mapped = pairs
    assert [str(d) for d in layer_devices(mapped.perturbed)] == ["cpu"] * len(decoder_layers(mapped.dense))
    check_same_placement(mapped.dense, mapped.perturbed)
    from engine.perturb.pair import clone_sharing

    stray = clone_sharing(mapped.dense)
    decoder_layers(stray)[1].to("meta")
    assert mismatched_layers(mapped.dense, stray) == [(1, "cpu", "meta")]
    with pytest.raises(RuntimeError, match="layer 1: dense cpu, perturbed meta"):
        check_same_placement(mapped.dense, stray)


def test_a_random_shape_built_by_a_map_has_the_same_weights(tmp_path):
    """random: shapes on several GPUs are made tensor by tensor on their devices (never whole on one), drawn in
    the same order from the same generator: the same weights as the one-device build."""
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3}
    config |= {"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": True}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    name = f"random:{path}"
    one = load(name, device="cpu", dtype="float32").model
    prefix = decoder_layers_prefix(one)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map |= {f"{prefix}{i}": "cpu" for i in range(3)}
    mapped = load(name, device="cpu", dtype="float32", device_map=device_map).model
    a, b = one.state_dict(), mapped.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert mapped.lm_head.weight is mapped.model.embed_tokens.weight  # tied again once set


def test_hierui_check_passes_on_a_mapped_model(hooked):
    """hierui's own self-test through accelerate's hooks on every module: zero divergence for none, KV-cached
    stepping equal to a full forward, batched equal to one at a time, sharing and sparsity, for a pruning, a block
    drop (the layers renumbered under their hooks) and a quantization (modules replaced inside hooked layers)."""
    import engine.check.selfcheck as S

    specs = ["none", "sparsegpt:0.5", "blockdrop:1", "int8"]
    report = S.run_selfcheck(hooked, specs, steps=4, calib_options={"samples": 4, "length": 16})
    assert report.specs == specs
    assert [(r.spec, r.check, r.reason) for r in report.results if r.status == "fail"] == []
    assert sum(r.status == "pass" for r in report.results) >= 3 * len(specs)
