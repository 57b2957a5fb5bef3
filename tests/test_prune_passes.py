"""Pruning at the two-pass floor (engine.perturb.layerwise, issue 26 item 5): the statistics of each distinct input
computed once and shared by the matrices that read it, pass one stopped once the last matrix has its input, the
last layer not run again, one SparseGPT factorization per shared input, one host synchronisation per layer; and
the masks and weights the same as the per-matrix way (one hook, one statistic, one Hessian per matrix, two whole
forwards per layer, the reference sweep written out here)."""

import pytest
import torch

from engine.anatomy.linears import decoder_layers, is_experts, model_weight_views, weight_views
from engine.perturb.inputs import InputStats
from engine.perturb.layerwise import capture_calibration, prune_layers_sequentially, run_layer
from engine.perturb.masks import lowest_k, n_of_m
from engine.perturb.pair import clone_sharing
from engine.perturb.sparsegpt import inverse_hessian_factor, prune_sparsegpt
from engine.perturb.spec import parse_spec
from engine.perturb.wanda import prune_wanda, wanda_mask

SPECS = ("wanda:0.5", "wanda:2:4", "sparsegpt:0.5", "sparsegpt:2:4")
BATCH = 3  # 7 calibration sequences: chunks of 3, 3 and 1, so that pass one stops early in two of them
_MODELS: dict = {}


def _member(name):
    """(loaded model, calibration ids: 7 random sequences of 16 tokens), built once per module."""
    if name not in _MODELS:
        from engine.models.loading import load

        loaded = load(name, device="cpu")
        vocab = loaded.model.get_input_embeddings().weight.shape[0]
        _MODELS[name] = loaded, torch.randint(0, vocab, (7, 16), generator=torch.Generator().manual_seed(0))
    return _MODELS[name]


# ------------------------------------------------------------------ the per-matrix way, written out


def _reference_sweep(weight, xtx, spec, blocksize=128):
    """SparseGPT's blocked OBS sweep over one matrix with its own Hessian, column by column as the reference
    implementation (IST-DASLab/sparsegpt) does it."""
    W = weight.detach().float().clone()
    rows, cols = W.shape
    Hinv, dead = inverse_hessian_factor(xtx)
    W[:, dead] = 0
    nm = spec.n is not None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            k = int(rows * i2 * spec.sparsity) - int(rows * i1 * spec.sparsity)
            mask1 = lowest_k(W1**2 / d.reshape(1, -1) ** 2, k)
        for i in range(i2 - i1):
            if nm and i % spec.m == 0:
                mask1[:, i : i + spec.m] = n_of_m(W1[:, i : i + spec.m] ** 2 / d[i : i + spec.m] ** 2, spec.n, spec.m)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype)


def _per_matrix(model, ids, spec):
    """Prune `model` the per-matrix way: a forward hook and an InputStats per matrix, the whole layer run twice."""
    from engine.perturb.experts import ExpertInputs, prune_experts

    gram = spec.method == "sparsegpt"

    def prune(view, stats):
        w = view.matrix()
        if gram:
            return _reference_sweep(w, stats.xtx, spec)
        return w.masked_fill(wanda_mask(w, stats.norm, spec), 0)

    hidden, layer_kwargs = capture_calibration(model, ids, BATCH)
    for index, layer in enumerate(decoder_layers(model)):
        chunks = list(zip(hidden, layer_kwargs[index]))
        views = weight_views(layer, index)
        plain = [v for v in views if v.expert is None]
        stats = {id(v): InputStats(v.in_features, "cpu", gram) for v in plain}
        hooks = [v.module.register_forward_hook(lambda _m, a, _o, s=stats[id(v)]: s.add(a[0])) for v in plain]
        experts = [ExpertInputs(m) for m in layer.modules() if is_experts(m)]
        hooks += [e.attach() for e in experts]
        run_layer(layer, chunks)
        for h in hooks:
            h.remove()
        for v in plain:
            v.assign(prune(v, stats[id(v)]))
        for inputs in experts:
            own = [v for v in views if v.expert is not None and v.module is inputs.module]
            per_view = lambda shared: [[prune(g.views[0], g.stats)] for g in shared]  # noqa: E731
            prune_experts(index, inputs, own, per_view, gram, spec, {})
        hidden = [h for h, _ in run_layer(layer, chunks)]


def _pruned(model, ids, spec, per_matrix=False, change=None):
    """The weights of `model` pruned (a clone: `change` is made to its layer 1 first)."""
    clone = clone_sharing(model)
    if change is not None:
        change(decoder_layers(clone)[1])
    if per_matrix:
        _per_matrix(clone, ids, spec)
    else:
        prune = prune_wanda if spec.method == "wanda" else prune_sparsegpt
        prune(clone, spec, ids, batch_size=BATCH)
    return [v.matrix().detach().clone() for v in model_weight_views(clone)]


def _assert_same(new, old, what):
    assert len(new) == len(old)
    for a, b in zip(new, old):
        assert torch.equal(a == 0, b == 0), what  # the masks identical
        assert torch.allclose(a, b, rtol=0, atol=1e-6), what  # the weights to 1e-6


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("name", ["tiny-random:llama", "tiny-random:phi3", "tiny-random:gpt2", "tiny-random:mixtral"])
def test_shared_inputs_prune_as_the_per_matrix_way(name, spec):
    """Guards equality, not speed: shared statistics and Hessians (q/k/v, gate/up), the early stop and the
    skipped last pass give the masks and weights of one statistic and one Hessian per matrix, on separate
    projections (llama), fused ones (phi3), GPT-2's Conv1Ds and MoE experts (mixtral)."""
    loaded, ids = _member(name)
    spec = parse_spec(spec)
    _assert_same(_pruned(loaded.model, ids, spec), _pruned(loaded.model, ids, spec, per_matrix=True), (name, spec))


def _double_down_proj(layer):
    """Make a Llama layer's MLP call its down_proj a second time on another input (whose output it drops)."""
    mlp = layer.mlp
    forward = mlp.forward

    def twice(x):
        out = forward(x)
        mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * 0.5)
        return out

    mlp.forward = twice


def _no_mlp_for_one(layer):
    """Make a Llama layer skip its MLP (output zero) on a chunk of one sequence, the last chunk here."""
    mlp = layer.mlp
    forward = mlp.forward
    mlp.forward = lambda x: torch.zeros_like(x) if x.shape[0] == 1 else forward(x)


@pytest.mark.parametrize("spec", ["wanda:0.5", "sparsegpt:0.5"])
@pytest.mark.parametrize("change", [_double_down_proj, _no_mlp_for_one])
def test_a_layer_that_breaks_the_order_is_calibrated_the_plain_way(change, spec):
    """Guards the fallback: where a matrix is called twice in one forward (its second input would be lost to a
    shared statistic, and the early stop would cut it off), or a later chunk no longer calls the matrix the
    first chunk called last (the early stop would never come), the layer is calibrated one statistic per
    matrix with whole forwards, and prunes as the per-matrix way does."""
    loaded, ids = _member("tiny-random:llama")
    spec = parse_spec(spec)
    new = _pruned(loaded.model, ids, spec, change=change)
    _assert_same(new, _pruned(loaded.model, ids, spec, per_matrix=True, change=change), spec)
    assert not all(torch.equal(a, b) for a, b in zip(new, _pruned(loaded.model, ids, spec)))  # the change counts


# ------------------------------------------------------------------ the work done


def _count(monkeypatch, owner, name):
    calls = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_statistics_are_computed_once_per_distinct_input(monkeypatch):
    """Fails on one hook per matrix (7 statistics per chunk of a Llama layer): q, k and v read one input and
    gate and up another, so a Llama layer computes 4 per chunk."""
    loaded, ids = _member("tiny-random:llama")
    adds = _count(monkeypatch, InputStats, "add")
    prune_wanda(clone_sharing(loaded.model), parse_spec("wanda:0.5"), ids, batch_size=BATCH)
    chunks = -(-ids.shape[0] // BATCH)
    assert len(adds) == len(decoder_layers(loaded.model)) * chunks * 4


def test_pass_one_stops_before_the_last_matrix_computes_and_the_last_layer_runs_once():
    """Fails on two whole forwards per layer: pass one runs its first chunk whole (to learn the order of the
    matrices) and stops the others once down_proj has its input; the last layer's pruned outputs feed nothing,
    so it is not run again."""
    loaded, ids = _member("tiny-random:llama")
    clone = clone_sharing(loaded.model)
    layers = decoder_layers(clone)
    down = {i: 0 for i in range(len(layers))}
    calls = {i: 0 for i in range(len(layers))}
    for i, layer in enumerate(layers):
        layer.mlp.down_proj.register_forward_hook(lambda *_, i=i: down.__setitem__(i, down[i] + 1))
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    prune_wanda(clone, parse_spec("wanda:0.5"), ids, batch_size=BATCH)
    chunks = -(-ids.shape[0] // BATCH)
    last = len(layers) - 1
    assert down == {i: 1 + (chunks if i < last else 0) for i in range(len(layers))}
    # the recorder's call per chunk (capture_calibration), pass one, pass two but for the last layer
    assert calls == {i: chunks + chunks + (chunks if i < last else 0) for i in range(len(layers))}


def test_sparsegpt_factors_each_shared_hessian_once(monkeypatch):
    """Fails on one Hessian per matrix (7 inverses per Llama layer): q/k/v and gate/up share theirs, 4."""
    loaded, ids = _member("tiny-random:llama")
    inverses = _count(monkeypatch, torch, "cholesky_inverse")
    prune_sparsegpt(clone_sharing(loaded.model), parse_spec("sparsegpt:0.5"), ids, batch_size=BATCH)
    assert len(inverses) == len(decoder_layers(loaded.model)) * 4


@pytest.mark.parametrize("spec", ["sparsegpt:0.5", "sparsegpt:2:4"])
def test_sparsegpt_reads_the_device_once_per_layer(monkeypatch, spec):
    """Fails on a host read per matrix (each factorization checked with int(info)): SparseGPT reads one flag per
    layer back from the device (whether any of its Hessians needs more damping), nothing else in the loop."""
    from engine.perturb import layerwise

    loaded, ids = _member("tiny-random:llama")
    clone = clone_sharing(loaded.model)
    hidden, layer_kwargs = capture_calibration(clone, ids, BATCH)  # before the layer loop: not counted
    monkeypatch.setattr(layerwise, "capture_calibration", lambda *_a, **_k: (hidden, layer_kwargs))
    reads = [_count(monkeypatch, torch.Tensor, name) for name in ("__bool__", "__int__", "__float__", "item", "tolist")]
    prune_sparsegpt(clone, parse_spec(spec), ids, batch_size=BATCH)
    assert sum(len(c) for c in reads) == len(decoder_layers(clone))


def test_prune_layers_sequentially_hands_each_shared_input_its_views():
    """The interface the methods implement: one call per layer with its SharedInputs, one weight per view back."""
    loaded, ids = _member("tiny-random:llama")
    seen = []

    def keep(shared):
        seen.append([[v.type for v in group.views] for group in shared])
        return [[v.matrix() for v in group.views] for group in shared]

    prune_layers_sequentially(clone_sharing(loaded.model), ids, keep, gram=False, batch_size=BATCH)
    assert seen == [[["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]] * len(
        decoder_layers(loaded.model)
    )


def test_a_hessian_that_needs_more_damping_is_factored_again():
    """Guards the deferred check: the layer's one host read finds the group whose Hessian was not positive
    definite at the first damping and sweeps it again with the damping that works, as the per-matrix way does."""
    from types import SimpleNamespace

    from engine.perturb.inputs import SharedInput
    from engine.perturb.sparsegpt import sparsegpt_layer, sparsegpt_weight

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    good = x.t() @ x
    bad = good - 1.05 * torch.linalg.eigvalsh(good)[0] * torch.eye(16)  # one negative eigenvalue, mild
    spec = parse_spec("sparsegpt:0.5")
    weights = [torch.randn(8, 16, generator=g) for _ in range(3)]
    groups = []
    for xtx, ws in ((good, weights[:1]), (bad, weights[1:])):
        stats = InputStats(16, "cpu", gram=True)
        stats.xtx = xtx
        groups.append(SharedInput(stats, [SimpleNamespace(matrix=lambda w=w: w, parameter=w) for w in ws]))
    got = sparsegpt_layer(groups, spec)
    for group, new in zip(groups, got):
        for view, w in zip(group.views, new):
            assert torch.equal(w, sparsegpt_weight(view.matrix(), group.stats.xtx, spec))
    assert torch.isfinite(got[1][0]).all()


@pytest.mark.slow
@pytest.mark.embedded
@pytest.mark.parametrize("spec", ["wanda:0.5", "sparsegpt:0.5"])
def test_the_embedded_model_prunes_as_the_per_matrix_way(embedded, spec):
    """Guards equality where weights tie: the embedded model's de-quantized Q4_1 weights have many exact ties in
    |W|, so any change in which entries a selection picks among equal scores would show here (4 × 64 tokens:
    chunks of 3 and 1)."""
    ids = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    spec = parse_spec(spec)
    _assert_same(_pruned(embedded.model, ids, spec), _pruned(embedded.model, ids, spec, per_matrix=True), spec)
