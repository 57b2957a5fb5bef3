"""Pruning correctness: masks against hand-computed values, exact sparsity, N:M groups, SparseGPT updates."""

import pytest
import torch

from engine.anatomy.linears import decoder_layers, layer_linears
from engine.perturb import perturb
from engine.perturb.inputs import InputStats
from engine.perturb.magnitude import magnitude_mask
from engine.perturb.sparsegpt import sparsegpt_weight
from engine.perturb.spec import parse_spec
from engine.perturb.wanda import wanda_mask

W_HAND = torch.tensor(
    [
        [1.0, -2.0, 3.0, 0.5],
        [4.0, 1.0, -1.0, 2.0],
        [0.6, 0.25, 8.0, 0.1],
    ]
)
# four tokens whose feature norms are ‖X_j‖₂ = 1, 2, 0.5, 4
X_HAND = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 2.0, 0.0, 0.0],
        [0.0, 0.0, 0.5, 0.0],
        [0.0, 0.0, 0.0, 4.0],
    ]
)


def test_wanda_mask_matches_hand_computation():
    stats = InputStats(4, "cpu", gram=False)
    stats.add(X_HAND)
    assert torch.allclose(stats.norm, torch.tensor([1.0, 2.0, 0.5, 4.0]))
    # scores |W|·‖X‖: row0 = 1, 4, 1.5, 2 ; row1 = 4, 2, 0.5, 8 ; row2 = 0.6, 0.5, 4, 0.4
    expected = torch.tensor(
        [
            [True, False, True, False],
            [False, True, True, False],
            [False, True, False, True],
        ]
    )
    assert torch.equal(wanda_mask(W_HAND, stats.norm, parse_spec("wanda:0.5")), expected)


def test_wanda_differs_from_magnitude_on_the_same_weights():
    stats = InputStats(4, "cpu", gram=False)
    stats.add(X_HAND)
    assert not torch.equal(
        wanda_mask(W_HAND, stats.norm, parse_spec("wanda:0.5")), magnitude_mask(W_HAND, parse_spec("magnitude:0.5"))
    )


def test_magnitude_uses_one_threshold_per_matrix():
    w = torch.tensor([[0.1, -0.2, 0.3, 0.4], [5.0, 6.0, -7.0, 8.0]])
    mask = magnitude_mask(w, parse_spec("magnitude:0.5"))
    # the four smallest magnitudes of the whole matrix are all in row 0: a per-row rule would split them
    assert torch.equal(mask, torch.tensor([[True] * 4, [False] * 4]))


def test_magnitude_with_ties_prunes_exactly_the_request():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 2.0, 0.0]])
    mask = magnitude_mask(w, parse_spec("magnitude:0.5"))
    assert int(mask.sum()) == 4 and bool(mask[1, 3]) and not bool(mask[1, 2])


def test_nm_hand_example():
    w = torch.tensor([[1.0, -3.0, 2.0, 0.5, 9.0, 8.0, -7.0, 0.1]])
    mask = magnitude_mask(w, parse_spec("magnitude:2:4"))
    assert torch.equal(mask, torch.tensor([[True, False, False, True, False, False, True, True]]))


def _linears(model):
    for layer in decoder_layers(model):
        yield from layer_linears(layer).values()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_measured_sparsity_equals_request(tiny, tiny_calib, method, sparsity):
    pair = perturb(tiny, f"{method}:{sparsity}", calibration=tiny_calib, use_cache=False)
    for lin in _linears(pair.perturbed):
        w = lin.weight
        if method == "wanda":  # Wanda's comparison group is the output row
            per_row = (w == 0).sum(dim=1)
            assert torch.all(per_row == int(w.shape[1] * sparsity))
        else:
            assert int((w == 0).sum()) == int(w.numel() * sparsity)
    assert pair.report.measured_sparsity == pytest.approx(sparsity, abs=1 / 64)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_n_of_m_keeps_exactly_n_of_every_m(tiny, tiny_calib, method, n, m):
    pair = perturb(tiny, f"{method}:{n}:{m}", calibration=tiny_calib, use_cache=False)
    for lin in _linears(pair.perturbed):
        w = lin.weight
        groups = w.reshape(w.shape[0], -1, m)
        assert torch.all((groups != 0).sum(dim=2) == n)
    assert pair.report.measured_sparsity == pytest.approx(1 - n / m)


def _inputs_of(model, module, ids):
    seen = []
    handle = module.register_forward_hook(lambda _m, args, _o: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return torch.cat(seen)


def test_wanda_is_sequential_and_uses_input_norms(tiny, tiny_calib):
    """Each layer's q_proj mask = lowest |W|·‖X_j‖ per row, X being its inputs through the *pruned* layers before."""
    pair = perturb(tiny, "wanda:0.5", calibration=tiny_calib, use_cache=False)
    dense_layers, pruned_layers = decoder_layers(pair.dense), decoder_layers(pair.perturbed)
    for dl, pl in zip(dense_layers, pruned_layers):
        x = _inputs_of(pair.perturbed, pl.self_attn.q_proj, tiny_calib.ids)
        score = dl.self_attn.q_proj.weight.abs() * x.norm(dim=0)
        order = score.argsort(dim=1)
        expected = torch.zeros_like(score, dtype=torch.bool)
        expected.scatter_(1, order[:, : score.shape[1] // 2], True)
        assert torch.equal(pl.self_attn.q_proj.weight == 0, expected)
    # layer 1 saw outputs of the pruned layer 0, which differ from the dense ones
    x_dense = _inputs_of(pair.dense, dense_layers[1].self_attn.q_proj, tiny_calib.ids)
    x_pruned = _inputs_of(pair.perturbed, pruned_layers[1].self_attn.q_proj, tiny_calib.ids)
    assert not torch.allclose(x_dense, x_pruned)


def _anisotropic_inputs(tokens=1024, features=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, features, generator=g)
    mix = torch.eye(features) + 0.5 * torch.randn(features, features, generator=g) / features**0.5
    scales = torch.exp(0.5 * torch.randn(features, generator=g))  # some features larger, as in LLMs
    return (z @ mix) * scales


def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g)
    x = _anisotropic_inputs()
    stats = InputStats(64, "cpu", gram=True)
    stats.add(x)

    def err(w_hat):
        return float(((w - w_hat) @ x.T).pow(2).sum())

    for s in ("0.5", "2:4"):
        mag = w.masked_fill(magnitude_mask(w, parse_spec(f"magnitude:{s}")), 0)
        wan = w.masked_fill(wanda_mask(w, stats.norm, parse_spec(f"wanda:{s}")), 0)
        sgpt = sparsegpt_weight(w, stats.xtx, parse_spec(f"sparsegpt:{s}"), blocksize=32)
        assert err(sgpt) < err(wan) < err(mag), s


def test_sparsegpt_single_weight_matches_closed_form_obs():
    """Pruning one weight w_q: OBS says δ = −(w_q / [H⁻¹]_qq) · H⁻¹[q, :] (H damped as SparseGPT does)."""
    g = torch.Generator().manual_seed(4)
    x = _anisotropic_inputs(tokens=256, features=8, seed=5)
    w = torch.randn(1, 8, generator=g).abs() + 1.0
    w[0, 0] = 0.01  # by far the least salient: it is the one pruned
    stats = InputStats(8, "cpu", gram=True)
    stats.add(x)
    w_hat = sparsegpt_weight(w, stats.xtx, parse_spec("sparsegpt:0.125"), blocksize=8)
    h = stats.xtx.double()
    h = h + 0.01 * h.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    expected = w.double() - (w[0, 0].double() / hinv[0, 0]) * hinv[0:1, :]
    assert w_hat[0, 0] == 0
    assert torch.allclose(w_hat.double(), expected, atol=1e-5)


def test_sparsegpt_updates_the_kept_weights():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=g)
    stats = InputStats(64, "cpu", gram=True)
    stats.add(_anisotropic_inputs(seed=3))
    w_hat = sparsegpt_weight(w, stats.xtx, parse_spec("sparsegpt:0.5"))
    kept = w_hat != 0
    assert int(kept.sum()) == w.numel() // 2
    assert not torch.allclose(w_hat[kept], w[kept])  # OBS compensation moved them


def test_sparsegpt_layer_output_error_below_wanda_and_magnitude(tiny, tiny_calib):
    """On the tiny model's first decoder layer, with the very calibration inputs used to prune."""
    from engine.perturb.layerwise import capture_layer_inputs, run_layer

    chunks = capture_layer_inputs(tiny.model, tiny_calib.ids)
    dense_out = torch.cat([h for h, _ in run_layer(decoder_layers(tiny.model)[0], chunks)])
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        pair = perturb(tiny, f"{method}:0.5", calibration=tiny_calib, use_cache=False)
        out = torch.cat([h for h, _ in run_layer(decoder_layers(pair.perturbed)[0], chunks)])
        errors[method] = float((out - dense_out).pow(2).sum())
    assert errors["sparsegpt"] < errors["wanda"]
    assert errors["sparsegpt"] < errors["magnitude"]


def test_none_gives_identical_logits(tiny):
    pair = perturb(tiny, "none")
    ids = torch.tensor([[256, 72, 105, 33, 10, 87]])
    with torch.no_grad():
        assert torch.equal(pair.dense(ids).logits, pair.perturbed(ids).logits)
    assert pair.report.measured_sparsity == 0.0


def test_pruned_model_shares_untouched_tensors_and_leaves_dense_alone(tiny, tiny_calib):
    before = tiny.model.model.layers[0].mlp.down_proj.weight.clone()
    pair = perturb(tiny, "wanda:0.5", calibration=tiny_calib, use_cache=False)
    d, p = pair.dense, pair.perturbed
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert ptr(p.model.embed_tokens.weight) == ptr(d.model.embed_tokens.weight)
    assert ptr(p.lm_head.weight) == ptr(d.lm_head.weight)
    assert ptr(p.model.norm.weight) == ptr(d.model.norm.weight)
    assert ptr(p.model.layers[2].input_layernorm.weight) == ptr(d.model.layers[2].input_layernorm.weight)
    assert ptr(p.model.layers[0].mlp.down_proj.weight) != ptr(d.model.layers[0].mlp.down_proj.weight)
    assert torch.equal(d.model.layers[0].mlp.down_proj.weight, before)
    assert int((d.model.layers[0].mlp.down_proj.weight == 0).sum()) == 0


def test_pruned_weights_are_cached(tiny, tiny_calib, fresh_home):
    first = perturb(tiny, "sparsegpt:0.5", calibration=tiny_calib)
    second = perturb(tiny, "sparsegpt:0.5", calibration=tiny_calib)
    assert not first.report.from_cache and second.report.from_cache
    for a, b in zip(_linears(first.perturbed), _linears(second.perturbed)):
        assert torch.equal(a.weight, b.weight)
    # the cached copy still shares what it did not change
    assert second.perturbed.lm_head.weight.data_ptr() == tiny.model.lm_head.weight.data_ptr()
    other = perturb(tiny, "sparsegpt:0.3", calibration=tiny_calib)
    assert not other.report.from_cache
