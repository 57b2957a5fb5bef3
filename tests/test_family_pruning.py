"""Pruning every zoo family (engine.models.zoo): every weight matrix found and pruned exactly as asked, masks and
SparseGPT updates checked against computations made here from scratch, MoE experts calibrated on exactly
the tokens their router sends them, and the pruned-weight cache round trip for 3-D experts and Conv1D."""

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from zoo_grid import grid

from engine.anatomy.linears import decoder_layers, model_weight_views, weight_views
from engine.models.zoo import FAMILIES
from engine.perturb import perturb
from engine.perturb.layerwise import capture_calibration, run_layer
from engine.perturb.magnitude import magnitude_mask
from engine.perturb.pair import clone_sharing
from engine.perturb.sparsegpt import sparsegpt_weight
from engine.perturb.spec import parse_spec

MOE = ("mixtral", "qwen2_moe")
SPECS = ("magnitude:0.5", "wanda:0.5", "sparsegpt:0.5", "wanda:2:4", "sparsegpt:2:4")
SAMPLES, LENGTH = 8, 32  # longer than the zoo's sliding window (16): sliding and full layers see different masks

_LOADED: dict = {}
_CALIB: dict = {}
_DENSE: dict = {}


def _member(family):
    """(loaded model, calibration, snapshot of the dense parameters), built once per family."""
    if family not in _LOADED:
        from engine.models.loading import load
        from engine.perturb.calibration import build_calibration

        loaded = load(f"tiny-random:{family}", device="cpu")
        _LOADED[family] = loaded
        _CALIB[family] = build_calibration(loaded, samples=SAMPLES, length=LENGTH, seed=0, use_cache=False)
        _DENSE[family] = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    return _LOADED[family], _CALIB[family], _DENSE[family]


def _assert_dense_untouched(loaded, snapshot):
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, snapshot[name]), name


# ------------------------------------------------------------------ calibration inputs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_captured_layer_inputs_reproduce_the_models_hidden_states(family):
    """Layer after layer from the recorded inputs and per-layer kwargs = the model's own hidden states
    (sliding vs full masks of Gemma/Qwen2, Gemma 3's two rotary embeddings, GPT-2's positional mask)."""
    loaded, calib, _ = _member(family)
    model = loaded.model
    layers = decoder_layers(model)
    ids = calib.ids[:5]
    outs = []
    keep = lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o)  # noqa: E731
    hooks = [layer.register_forward_hook(keep) for layer in layers]
    try:
        with torch.no_grad():
            result = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    hidden, layer_kwargs = capture_calibration(model, ids, batch_size=2)  # three chunks: 2 + 2 + 1
    assert len(hidden) == 3 and all(len(kw) == 3 for kw in layer_kwargs)
    for i, layer in enumerate(layers):
        hidden = [h for h, _ in run_layer(layer, list(zip(hidden, layer_kwargs[i])))]
        mine = torch.cat(hidden)
        assert torch.allclose(mine, outs[i], atol=1e-5, rtol=1e-5), (family, i)
        if i < len(layers) - 1:  # the model's last hidden state is after the final norm
            assert torch.allclose(mine, result.hidden_states[i + 1], atol=1e-5, rtol=1e-5), (family, i)


# ------------------------------------------------------------------ which matrices


EXPECTED_TYPES = {
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
    "gpt2": {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"},
    "mixtral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"},
    "qwen2_moe": {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_up_proj",
        "experts.down_proj",
        "gate_proj",
        "up_proj",
        "shared_expert.down_proj",
    },
}
LLAMA_TYPES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
ROUTERS = {"mixtral": ["mlp.gate"], "qwen2_moe": ["mlp.gate", "mlp.shared_expert_gate"]}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_weight_matrix_but_the_routers_is_a_view(family):
    loaded, _, _ = _member(family)
    views = model_weight_views(loaded.model)
    assert {v.type for v in views} == EXPECTED_TYPES.get(family, LLAMA_TYPES)
    for index, layer in enumerate(decoder_layers(loaded.model)):
        covered = {id(v.parameter) for v in weight_views(layer, index)}
        routers = {id(layer.get_submodule(r).weight) for r in ROUTERS.get(family, [])}
        for name, p in layer.named_parameters():
            if p.dim() >= 2:
                assert (id(p) in covered) != (id(p) in routers), f"{family} layer {index} {name}"
    for v in views:
        m = v.matrix()
        assert m.shape == (v.out_features, v.in_features)
        if v.kind == "conv1d":
            assert (v.module.nf, v.module.nx) == tuple(m.shape)
    if family in MOE:
        experts = [v for v in views if v.expert is not None]
        n = loaded.model.config.num_local_experts if family == "mixtral" else loaded.model.config.num_experts
        assert len(experts) == 4 * 2 * n and {v.expert for v in experts} == set(range(n))


# ------------------------------------------------------------------ exact sparsity


@pytest.mark.parametrize("family, spec", grid(FAMILIES, SPECS))
def test_every_matrix_has_the_requested_sparsity(family, spec):
    loaded, calib, snapshot = _member(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no expert goes without calibration tokens here
        pair = perturb(loaded, spec, calibration=calib, use_cache=False)
    parsed = parse_spec(spec)
    views = model_weight_views(pair.perturbed)
    dense_views = model_weight_views(pair.dense)
    assert len(views) == len(dense_views) > 0
    for v, d in zip(views, dense_views):
        w = v.matrix()
        assert v.name == d.name and w.shape == d.matrix().shape
        assert v.parameter is not d.parameter  # a new tensor, never written in place
        if parsed.n is not None:  # N:M along the input dimension
            groups = (w == 0).reshape(w.shape[0], -1, parsed.m)
            assert torch.all(groups.sum(dim=2) >= parsed.m - parsed.n), v.name
            assert int((w == 0).sum()) == w.numel() * (parsed.m - parsed.n) // parsed.m, v.name
        elif parsed.method == "wanda":  # Wanda's comparison group is the output row
            assert torch.all((w == 0).sum(dim=1) == int(w.shape[1] * 0.5)), v.name
        else:  # one count per matrix
            assert int((w == 0).sum()) == int(w.numel() * 0.5), v.name
    _assert_dense_untouched(loaded, snapshot)
    report = pair.report
    assert report.measured_sparsity == pytest.approx(0.5)
    assert report.dense_sparsity == 0.0
    assert set(report.by_type) == {v.type for v in views} | {"all"}
    assert all(row["perturbed"] == pytest.approx(0.5) for row in report.by_type.values())
    if family in MOE:
        by_expert = report.details["by_expert"]
        assert len(by_expert) == 4 * len({v.expert for v in views if v.expert is not None})
        assert all(row["perturbed"] == pytest.approx(0.5) and row["dense"] == 0.0 for row in by_expert)
        if parsed.method != "magnitude":
            assert report.details["experts_without_tokens"] == []
            assert [sum(r["tokens"]) for r in report.details["expert_tokens"]] == [SAMPLES * LENGTH * 2] * 4
    else:
        assert "by_expert" not in report.details
    for router in ROUTERS.get(family, []):  # routers stay the dense model's own tensors, untouched
        for dl, pl in zip(decoder_layers(pair.dense), decoder_layers(pair.perturbed)):
            assert pl.get_submodule(router).weight is dl.get_submodule(router).weight


# ------------------------------------------------------------------ independent computations


def _hybrid(pair):
    """The dense model with the perturbed model's layer 0: what layer 1 was calibrated on."""
    hybrid = clone_sharing(pair.dense)
    decoder_layers(hybrid)[0] = decoder_layers(pair.perturbed)[0]
    return hybrid


def _inputs(model, modules, ids):
    """Inputs of each module (plain forward hooks) over one forward pass: [tokens, in_features] each."""
    seen = {id(m): [] for m in modules}
    keep = lambda mod, a, _o: seen[id(mod)].append(a[0].reshape(-1, a[0].shape[-1]))  # noqa: E731
    hooks = [m.register_forward_hook(keep) for m in modules]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v).double() for k, v in seen.items()}


def _dense_out_in(view):
    """A view's dense weight as [out, in], transposing a Conv1D by hand."""
    w = view.parameter
    return (w.t() if view.kind == "conv1d" else w).double()


def _lowest_half_per_row(score):
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, score.argsort(dim=1)[:, : score.shape[1] // 2], True)
    return mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_wanda_mask_of_layer_1_from_inputs_captured_here(family):
    loaded, calib, _ = _member(family)
    pair = perturb(loaded, "wanda:0.5", calibration=calib, use_cache=False)
    dense = [v for v in weight_views(decoder_layers(pair.dense)[1], 1) if v.expert is None]
    pruned = [v for v in weight_views(decoder_layers(pair.perturbed)[1], 1) if v.expert is None]
    hybrid = _hybrid(pair)
    plain = [v for v in weight_views(decoder_layers(hybrid)[1], 1) if v.expert is None]
    x = _inputs(hybrid, [v.module for v in plain], calib.ids)
    for d, p, h in zip(dense, pruned, plain):
        score = _dense_out_in(d).abs() * x[id(h.module)].norm(dim=0).reshape(1, -1)
        assert torch.equal(p.matrix() == 0, _lowest_half_per_row(score)), (family, d.name)


def _damped_hessian(x):
    """The Hessian SparseGPT uses: XᵀX, dead inputs' diagonal set to 1, plus 1% of the mean diagonal."""
    h = x.t() @ x
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    return h + 0.01 * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)


def _obs_optimum(w, pruned, h):
    """argmin ‖(w − ŵ)X‖² subject to ŵ_P = 0, for one row: ŵ_K = w_K + w_P H_PK H_KK⁻¹."""
    keep = ~pruned
    out = torch.zeros_like(w)
    out[keep] = w[keep] + w[pruned] @ h[pruned][:, keep] @ torch.linalg.inv(h[keep][:, keep])
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sparsegpt_updates_of_layer_1_in_closed_form(family):
    """Two closed forms, on a real layer-1 matrix with inputs captured here:
    - with a fixed mask pruning a prefix of the columns, SparseGPT's sweep is the OBS optimum;
    - for the mask SparseGPT chose, each row is w − w_P U_PP⁻¹ U_P,: (U: upper Cholesky factor of H⁻¹),
      and its error is no less than the OBS optimum's for that mask (kept columns left of a pruned one are
      not updated: SparseGPT's approximation)."""
    loaded, calib, _ = _member(family)
    pair = perturb(loaded, "sparsegpt:0.5", calibration=calib, use_cache=False)
    hybrid = _hybrid(pair)
    views = [v for v in weight_views(decoder_layers(hybrid)[1], 1) if v.expert is None]
    pruned_views = {v.name: v for v in weight_views(decoder_layers(pair.perturbed)[1], 1)}
    x = _inputs(hybrid, [v.module for v in views], calib.ids)
    for view in (views[0], views[-1]):  # an attention input projection and the MLP's output projection
        xs = x[id(view.module)]
        h = _damped_hessian(xs)
        w = _dense_out_in(view)
        cols = w.shape[1]
        for r in (0, w.shape[0] - 1):
            row = w[r]
            # a fixed prefix mask, one sweep over all columns
            prefix = torch.zeros(cols, dtype=torch.bool)
            prefix[: cols // 2] = True
            swept = sparsegpt_weight(
                row.float()[None], (xs.t() @ xs).float(), parse_spec("sparsegpt:0.5"), blocksize=cols, mask=prefix[None]
            )[0].double()
            expected = _obs_optimum(row, prefix, h)
            expected[torch.diag(xs.t() @ xs) == 0] = 0  # never-active inputs (OPT's ReLU): zeroing them is free
            assert torch.allclose(swept, expected, atol=1e-4 * float(row.abs().max())), (family, view.name, r)
            # the mask the pipeline chose
            got = pruned_views[view.name].matrix()[r].double()
            p = got == 0
            u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
            closed = row - row[p] @ torch.linalg.solve(u[p][:, p], u[p])
            assert torch.allclose(got, closed, atol=1e-3 * float(row.abs().max())), (family, view.name, r)

            gram = xs.t() @ xs
            err_got, err_opt = (float((row - c) @ gram @ (row - c)) for c in (got, _obs_optimum(row, p, h)))
            assert err_got >= err_opt * (1 - 1e-6), (family, view.name, r)


# ------------------------------------------------------------------ mixture of experts


def _moe_layer_inputs(model, layer_index, ids):
    """What the router of one layer saw and chose: (router input [tokens, H], top-k indices [tokens, k])."""
    router = decoder_layers(model)[layer_index].mlp.gate
    seen = []
    handle = router.register_forward_hook(lambda _m, a, out: seen.append((a[0].reshape(-1, a[0].shape[-1]), out[2])))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return torch.cat([s[0] for s in seen]).double(), torch.cat([s[1] for s in seen])


@pytest.mark.parametrize("family", MOE)
def test_expert_statistics_come_from_exactly_the_tokens_routed_to_it(family, monkeypatch):
    import engine.perturb.experts as experts

    loaded, calib, _ = _member(family)
    recorded = {}
    real = experts.expert_stats

    def spy(inputs, expert, views, gram):
        stats = real(inputs, expert, views, gram)
        for v in views:
            recorded[(v.layer, expert, v.attr)] = (stats[id(v)].sq.clone(), stats[id(v)].tokens)
        return stats

    monkeypatch.setattr(experts, "expert_stats", spy)
    pair = perturb(loaded, "wanda:0.5", calibration=calib, use_cache=False)
    assert loaded.model.config.hidden_act == "silu"
    for layer_index in (0, 1):
        model = pair.dense if layer_index == 0 else _hybrid(pair)
        x, chosen = _moe_layer_inputs(model, layer_index, calib.ids)
        mod = decoder_layers(pair.dense)[layer_index].mlp.experts
        pruned = decoder_layers(pair.perturbed)[layer_index].mlp.experts
        counts = []
        for e in range(mod.num_experts):
            routed = x[(chosen == e).any(dim=-1)]
            counts.append(routed.shape[0])
            gate, up = F.linear(routed, mod.gate_up_proj[e].double()).chunk(2, dim=-1)
            inner = F.silu(gate) * up
            for attr, inputs in (("gate_up_proj", routed), ("down_proj", inner)):
                sq, tokens = recorded[(layer_index, e, attr)]
                assert tokens == routed.shape[0]
                expected = (inputs * inputs).sum(0)
                assert torch.allclose(sq.double(), expected, rtol=1e-4, atol=1e-6), (layer_index, e, attr)
                w = getattr(mod, attr)[e].double()
                mask = _lowest_half_per_row(w.abs() * inputs.norm(dim=0).reshape(1, -1))
                assert torch.equal(getattr(pruned, attr)[e] == 0, mask), (layer_index, e, attr)
        assert pair.report.details["expert_tokens"][layer_index] == {"layer": layer_index, "tokens": counts}
        assert sum(counts) == SAMPLES * LENGTH * loaded.model.config.num_experts_per_tok


def _never_route_to(model, layer_index, expert):
    """Make the router of one layer never choose `expert` (a forward hook redoing its top-k without it)."""
    router = decoder_layers(model)[layer_index].mlp.gate

    def reroute(_m, _args, out):
        logits = out[0].clone()
        logits[:, expert] = float("-inf")
        top = torch.topk(torch.softmax(logits.float(), dim=-1), router.top_k, dim=-1)
        scores = top.values / top.values.sum(dim=-1, keepdim=True)
        return out[0], scores.to(out[1].dtype), top.indices

    router.register_forward_hook(reroute)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("family", MOE)
def test_an_expert_without_calibration_tokens_falls_back_to_magnitude(family, method):
    loaded, calib, _ = _member(family)
    model = copy.deepcopy(loaded.model)  # the shared dense model keeps its router
    _never_route_to(model, 1, 2)
    other = dataclasses.replace(loaded, model=model)
    with pytest.warns(UserWarning, match="layer 1, expert 2: the router sent it no calibration token"):
        pair = perturb(other, f"{method}:0.5", calibration=calib, use_cache=False)
    details = pair.report.details
    assert details["experts_without_tokens"] == [[1, 2]]
    assert details["expert_tokens"][1]["tokens"][2] == 0
    assert all(t > 0 for r in details["expert_tokens"] for i, t in enumerate(r["tokens"]) if (r["layer"], i) != (1, 2))
    spec = parse_spec("magnitude:0.5")
    dense, pruned = decoder_layers(model)[1].mlp.experts, decoder_layers(pair.perturbed)[1].mlp.experts
    for attr in ("gate_up_proj", "down_proj"):
        w = getattr(dense, attr)[2]
        assert torch.equal(getattr(pruned, attr)[2], w.masked_fill(magnitude_mask(w, spec), 0))
        w0 = getattr(dense, attr)[0]  # a calibrated expert is not pruned by magnitude
        assert not torch.equal(getattr(pruned, attr)[0] == 0, magnitude_mask(w0, spec))
    assert pair.report.measured_sparsity == pytest.approx(0.5)


# ------------------------------------------------------------------ the cache


@pytest.mark.parametrize("family", ["mixtral", "gpt2"])
def test_pruned_weights_cache_round_trip(family, fresh_home):
    loaded, calib, snapshot = _member(family)
    first = perturb(loaded, "wanda:0.5", calibration=calib, use_cache=True)
    second = perturb(loaded, "wanda:0.5", calibration=calib, use_cache=True)
    assert not first.report.from_cache and second.report.from_cache
    a, b = model_weight_views(first.perturbed), model_weight_views(second.perturbed)
    dense = model_weight_views(loaded.model)
    assert [v.name for v in a] == [v.name for v in b] == [v.name for v in dense]
    assert any(v.kind == ("expert" if family == "mixtral" else "conv1d") for v in b)
    for va, vb, vd in zip(a, b, dense):
        assert torch.equal(va.matrix(), vb.matrix()), va.name
        assert vb.parameter.shape == vd.parameter.shape and vb.parameter is not vd.parameter
    assert second.report.by_type == first.report.by_type
    assert second.report.measured_sparsity == first.report.measured_sparsity == pytest.approx(0.5)
    assert second.report.details == first.report.details  # expert token counts travel with the weights
    embed = loaded.model.get_input_embeddings().weight
    assert second.perturbed.get_input_embeddings().weight is embed
    ids = calib.ids[:2, :12]
    with torch.no_grad():
        assert torch.equal(first.perturbed(ids).logits, second.perturbed(ids).logits)
    _assert_dense_untouched(loaded, snapshot)
