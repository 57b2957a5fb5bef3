"""Dropping whole sublayers or blocks: attndrop:N, mlpdrop:N, blockdrop:N.

Scoring follows "What Matters in Transformers? Not All Attention Is Needed" (He et al., 2024), one-shot
on the dense model: for each decoder layer, the mean over calibration tokens of the cosine similarity
between a sublayer's input and its output (residual included). The N with the highest similarity
(they change the hidden state least) are dropped.

The states are the real residual stream of each family (engine.anatomy.sublayers): h_in the layer's input, `a` what
attention adds to it (its output; Gemma 2/3 and OLMo 2: its output after the norm they apply to it), `m`
what the MLP adds (likewise; OPT: fc2's output), h_mid = h_in + a, h_out the layer's output:

    attention: h_in   vs  h_mid = h_in + a
    mlp:       h_mid  vs  h_out = h_mid + m
    block:     h_in   vs  h_out

In a parallel-residual layer (GPT-NeoX: h_out = h_in + a + m, both sublayers read h_in) h_mid = h_in + a is
not a state the model computes, but the same formulas are kept, and mean: attention, how far attention alone
turns the layer's input; mlp, the layer's output with and without the MLP's contribution (exactly what
mlpdrop removes). Before scoring, h_out = h_in + a + m is checked on the first batch: a layer that does not
add its sublayers' outputs to its input (a post-LN model such as OPT-350m) is refused, not mis-scored.

Dropping replaces modules of the perturbed clone, never tensors (the clone shares them with the dense
model), so a drop costs no weight memory:

- blockdrop: the kept layers form a new ModuleList; their attention `layer_idx` are renumbered 0..K-1 and
  the clone's config gets num_hidden_layers = K (and `layer_types` etc. of the kept layers).
- mlpdrop: the MLP becomes a module returning zeros (OPT, whose MLP is inline: fc1 and fc2 become
  zero-width / zero stand-ins), and an output norm of the MLP (Gemma, OLMo 2) an identity.
- attndrop: the attention becomes a module returning zeros that stores no KV cache (its output norm an
  identity). KV caches: the remaining attentions are renumbered 0..K-1 so that cache slot 0 always belongs
  to a live attention (DynamicCache.get_seq_length() and the causal masks read slot 0, also in a cache
  built without a config), and `kv_sharing_modes` marks the last L-K slots "reuse", so that
  DynamicCache/StaticCache(config=...) build a storage-less DummyLayer there. When the attention kinds mix
  (Qwen2, Gemma 2/3: sliding-window and full layers) so that renumbering would give an attention a slot of
  the wrong kind (a sliding one a full slot or back), the indices are kept, the dropped layers' own slots
  are "reuse", and the dropped attention claims its slot as a DummyLayer in a cache that was made without
  a config (lazily, one slot per layer index): otherwise that slot stays an empty DynamicLayer, and when it
  is slot 0 the cache counts 0 tokens seen, which restarts the positions and sizes the masks wrongly.

Streamed layers (engine.place.streaming): scoring runs the dense model's layers as they stream (each layer's weights in
for its forward only; after the pass, even one stopped by an error, none is left resident). A drop replaces or
removes the clone's modules as above; then each clone layer's store is narrowed to the tensors the layer still
has and its hook renumbered (engine.place.streaming.refit_layers), so reading a layer never asks for a dropped
sublayer's tensors. `prune --save` writes the zeroed output projections to the clone's own store, layer by layer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

from engine.anatomy.linears import decoder_layers
from engine.anatomy.sublayers import Anatomy, anatomy, get
from engine.errors import HieruiError
from engine.perturb.job import Job
from engine.perturb.stored import _cached_json, _scores_key
from engine.place.streaming import is_streamed, refit_layers, release_layers, resident

# the declarations (each method's kind: attention, mlp or block; the scores' version): engine.record.methods.drop


def _claim_slot(cache, slot: int) -> None:
    """Make `slot` of `cache` a storage-less DummyLayer (caches made without a config create DynamicLayers)."""
    from transformers.cache_utils import Cache, DummyLayer

    layers = getattr(cache, "layers", None) if isinstance(cache, Cache) else None
    if not isinstance(layers, list):
        return
    if slot < len(layers):
        if not isinstance(layers[slot], DummyLayer):
            layers[slot] = DummyLayer()
    elif getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(layers) < slot:
            layers.append(cache.layer_class_to_replicate())
        layers.append(DummyLayer())


class DroppedAttention(nn.Module):
    """Stands in for a dropped attention: adds nothing to the residual stream, caches nothing. With a `slot`
    (its layer's KV cache slot, kept when the slots could not be renumbered) it makes that slot a DummyLayer."""

    def __init__(self, slot: int | None = None):
        super().__init__()
        self.slot = slot

    def forward(self, hidden_states, *args, **kwargs):
        if self.slot is not None:
            for name in ("cache", "layer_past", "past_key_values", "past_key_value"):
                if kwargs.get(name) is not None:
                    _claim_slot(kwargs[name], self.slot)
        return torch.zeros_like(hidden_states), None


class DroppedMLP(nn.Module):
    """Stands in for a dropped MLP: adds nothing to the residual stream."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


class Zeros(nn.Module):
    """Stands in for a linear of an inline MLP (OPT's fc1/fc2): zeros of width `width`, computed from nothing."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], self.width)


# ------------------------------------------------------------------ scoring


def _out(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _cos_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.reshape(-1, a.shape[-1]).float()
    b = b.reshape(-1, b.shape[-1]).float()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).sum())


def _droppable(model) -> Anatomy:
    """The anatomy of `model`, refusing a family whose residual stream does not decompose."""
    parts = anatomy(model)
    if parts.norm_after_residual:
        raise HieruiError(
            f"{parts.model_type} normalises after the residual add (post-LN): its sublayers' contributions "
            f"cannot be dropped one by one; attndrop/mlpdrop/blockdrop support pre-norm models"
        )
    return parts


def _check_decomposition(parts: Anatomy, i: int, h_in, a, m, h_out) -> None:
    """h_out must be h_in + a + m (to rounding): otherwise the anatomy misreads this family."""
    expected = (h_in.float() + a.float()) + m.float()
    tolerance = 1e-3 if h_out.dtype == torch.float32 else 3e-2
    err = float((h_out.float() - expected).norm() / h_out.float().norm().clamp_min(1e-12))
    if not err <= tolerance:
        raise HieruiError(
            f"the decoder layers of {parts.model_type} do not add their attention and MLP outputs to their input "
            f"as hierui expects (layer {i}: relative error {err:.2g}); attndrop/mlpdrop/blockdrop cannot score them"
        )


@torch.no_grad()
def similarity_scores(
    model, calib_ids: torch.Tensor, batch_size: int = 8, progress: Callable[[int, int], None] | None = None
) -> dict[str, list[float]]:
    """Per decoder layer, the mean input/output cosine similarity of its attention, MLP and whole block."""
    parts = _droppable(model)
    layers = decoder_layers(model)
    sums = {kind: [0.0] * len(layers) for kind in ("attention", "mlp", "block")}
    tokens = 0
    seen: dict[int, dict] = {}
    checked: set[int] = set()
    handles = []

    for i, layer in enumerate(layers):

        def grab_input(_m, args, kwargs, i=i):
            seen[i] = {"in": args[0] if args else kwargs["hidden_states"]}

        def grab(name, i=i):
            def hook(_m, _args, output):
                seen[i][name] = _out(output)

            return hook

        def grab_output(_m, _args, output, i=i):
            states = seen.pop(i)
            # the input as the model passed it: on several GPUs, still on the previous layer's device
            h_out = _out(output)
            h_in = states["in"].to(h_out.device)
            a, m = states["a"].view_as(h_in), states["m"].view_as(h_in)  # OPT's fc2: [tokens, hidden]
            if i not in checked:
                _check_decomposition(parts, i, h_in, a, m, h_out)
                checked.add(i)
            h_mid = h_in + a
            sums["attention"][i] += _cos_sum(h_in, h_mid)
            sums["mlp"][i] += _cos_sum(h_mid, h_out)
            sums["block"][i] += _cos_sum(h_in, h_out)

        handles += [
            layer.register_forward_pre_hook(grab_input, with_kwargs=True),
            get(layer, parts.attention_out()).register_forward_hook(grab("a")),
            get(layer, parts.mlp_out()).register_forward_hook(grab("m")),
            layer.register_forward_hook(grab_output),
        ]
    # the decoder stack only: the LM head's logits over every calibration position are not needed
    # (they would be the largest tensor of the whole pass)
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None) or model
    try:
        device = model.get_input_embeddings().weight.device
        total = calib_ids.shape[0]
        for start in range(0, total, batch_size):
            ids = calib_ids[start : start + batch_size]
            body(input_ids=ids.to(device), use_cache=False)
            tokens += ids.numel()
            if progress:
                progress(min(start + batch_size, total), total)
    finally:
        for h in handles:
            h.remove()
        if is_streamed(model):  # a pass stopped inside a layer's forward (an error) would leave its weights in
            release_layers(model)
    return {kind: [s / tokens for s in row] for kind, row in sums.items()}


def most_redundant(scores: list[float], count: int) -> list[int]:
    """Indices of the `count` highest scores (ties: the lower index first), sorted."""
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:count])


# ------------------------------------------------------------------ applying


def _config(model):
    return model.config.get_text_config(decoder=True)


def _renumber(modules) -> None:
    """Give every module that carries a `layer_idx` (the attention's cache slot) its position in `modules`."""
    for new_idx, module in enumerate(modules):
        for sub in module.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_idx


def _cache_kinds(cfg, count: int) -> list[str]:
    """The kind of cache slot (full_attention, sliding_attention, ...) each layer gets from
    DynamicCache(config=...), as transformers derives it (`layer_types`, else each layer's sliding window)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        kinds, _ = get_layer_types_and_kwargs(cfg)
        kinds = list(kinds)
    except Exception:  # an older or newer transformers: the config's own list
        kinds = list(getattr(cfg, "layer_types", None) or [])
    return kinds if len(kinds) == count else ["full_attention"] * count


def drop_mlp(model, indices) -> None:
    """Make the MLP of each layer in `indices` add nothing (a zero module; OPT: zero stand-ins for fc1, fc2)."""
    parts = _droppable(model)
    layers = decoder_layers(model)
    for i in indices:
        layer = layers[i]
        if parts.mlp:
            setattr(layer, parts.mlp, DroppedMLP())
        else:
            fc1, fc2 = parts.inline_mlp
            setattr(layer, fc2, Zeros(_width(get(layer, fc2))))
            setattr(layer, fc1, Zeros(0))  # nothing is computed for a dropped fc2 to ignore
        if parts.mlp_norm_out:
            setattr(layer, parts.mlp_norm_out, nn.Identity())


def _width(linear) -> int:
    width = getattr(linear, "out_features", None) or getattr(linear, "nf", None)
    return int(width) if width else int(linear.weight.shape[0])


def _set_slots(modules, slots) -> None:
    """Give every module inside `modules[k]` that carries a `layer_idx` (an attention's KV cache slot) `slots[k]`."""
    for module, slot in zip(modules, slots):
        for sub in module.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = slot


def drop_attention(model, indices) -> None:
    """Replace the attention of each layer in `indices` by a zero module, keeping KV caches right."""
    parts = _droppable(model)
    layers = decoder_layers(model)
    for i in indices:
        setattr(layers[i], parts.attention, DroppedAttention())
        if parts.attention_norm_out:
            setattr(layers[i], parts.attention_norm_out, nn.Identity())
    dropped = [i for i in range(len(layers)) if isinstance(get(layers[i], parts.attention), DroppedAttention)]
    live = [i for i in range(len(layers)) if i not in dropped]
    if not live:
        raise HieruiError("cannot drop every attention layer: at least one must remain")
    cfg = _config(model)
    kinds = _cache_kinds(cfg, len(layers))
    attentions = [get(layers[i], parts.attention) for i in live]
    if [kinds[i] for i in live] == kinds[: len(live)]:  # renumbering keeps every attention's slot kind
        _set_slots(attentions, range(len(live)))
        cfg.kv_sharing_modes = [None] * len(live) + ["reuse"] * len(dropped)
        for i in dropped:
            get(layers[i], parts.attention).slot = None
    else:  # mixed slot kinds: keep the indices, make the dropped slots themselves dummies
        _set_slots(attentions, live)
        cfg.kv_sharing_modes = [None if i in live else "reuse" for i in range(len(layers))]
        for i in dropped:
            get(layers[i], parts.attention).slot = i


def drop_blocks(model, indices) -> None:
    """Remove the decoder layers in `indices`; the rest are renumbered and the config shrunk to match."""
    parts = _droppable(model)
    owner = get(model, parts.owner)
    layers = decoder_layers(model)
    drop = set(indices)
    kept = [i for i in range(len(layers)) if i not in drop]
    setattr(owner, parts.layers, nn.ModuleList([layers[i] for i in kept]))
    _renumber(parts.layer_list(model))
    cfg = _config(model)
    for name in ("layer_types", "mlp_layer_types", "kv_sharing_modes"):
        value = getattr(cfg, name, None)
        if isinstance(value, (list, tuple)) and len(value) == len(layers):
            setattr(cfg, name, [value[i] for i in kept])
    only, step = getattr(cfg, "mlp_only_layers", None), getattr(cfg, "decoder_sparse_step", None)
    if isinstance(only, (list, tuple)) and isinstance(step, int) and step > 0:
        # Qwen2-MoE builds layer i with a dense MLP when i is in mlp_only_layers or (i + 1) % step != 0: say
        # which of the kept layers are dense by their new index, so that a saved model reloads the same
        cfg.mlp_only_layers = [new for new, old in enumerate(kept) if old in set(only) or (old + 1) % step != 0]
        cfg.decoder_sparse_step = 1
    cfg.num_hidden_layers = len(kept)


DROPPERS = {"attention": drop_attention, "mlp": drop_mlp, "block": drop_blocks}


def _own_config(dense, clone) -> None:
    """Make sure the clone's config is its own object before it is edited."""
    old = clone.config
    if old is not dense.config:
        return
    new = copy.deepcopy(old)
    for module in clone.modules():
        if getattr(module, "config", None) is old:
            module.config = new


def apply_drop(
    dense,
    clone,
    spec,
    calib_ids: torch.Tensor,
    progress: Callable[[int, int], None] | None = None,
    scores: dict | None = None,
) -> dict:
    """Score the dense model's layers on `calib_ids` (or take `scores`, the result of `similarity_scores`),
    then drop the `spec.count` most redundant in `clone`."""
    kind = spec.declared.params["kind"]
    n_layers = len(decoder_layers(dense))
    if spec.count >= n_layers:
        raise HieruiError(
            f"{spec}: the model has {n_layers} layers and at least one must remain; drop at most {n_layers - 1}"
        )
    if scores is None:
        scores = similarity_scores(dense, calib_ids, progress=progress)
    scores = scores[kind]
    dropped = most_redundant(scores, spec.count)
    _own_config(dense, clone)
    DROPPERS[kind](clone, dropped)
    if is_streamed(clone):  # the layers' stores must name only the tensors the layers still have
        refit_layers(clone)
    return {"dropped": dropped, "kind": kind, "similarity": scores}


def build(job: Job):
    """The clone with the sublayers or blocks dropped; the similarity scores from the cache when it holds them
    (engine.perturb.stored). A block drop renumbers the layers: job.hidden_map says which state stands where."""
    from engine.perturb.pair import clone_sharing

    dense, calibration = job.dense, job.calibration

    def score():
        return similarity_scores(dense, calibration.ids, progress=lambda d, t: job.say("scoring", d, t))

    algorithm = job.spec.declared.algorithm
    scores = _cached_json(_scores_key(job.loaded, algorithm, calibration), score, job.use_cache)
    clone = clone_sharing(dense)
    details = apply_drop(dense, clone, job.spec, calibration.ids, scores=scores) or {}
    job.report.details.update(details)
    if details.get("kind") == "block":
        job.hidden_map = hidden_map_after_block_drop(dense.config.num_hidden_layers, details["dropped"])
    return clone


def hidden_map_after_block_drop(n_layers: int, dropped: list[int]) -> list[int]:
    """For each dense hidden-state index ℓ = 0..n_layers, the index of the corresponding hidden state of a
    model whose blocks `dropped` are removed: the state after the last kept block before ℓ."""
    gone = set(dropped)
    mapping, kept = [0], 0
    for layer in range(n_layers):
        kept += layer not in gone
        mapping.append(kept)
    return mapping


# ------------------------------------------------------------------ saving


def standard_equivalent(dense, clone, details: dict):
    """A model with the same outputs that a stock `from_pretrained` can load, for `prune --save`.

    Dropped blocks are really gone (the clone is already standard). A dropped attention or MLP becomes a
    zero output projection, which adds exactly nothing to the residual stream: every parameter of the
    sublayer's output projection(s) is zeroed (engine.anatomy.sublayers.Anatomy.output_parameters: o_proj, GPT-2's
    Conv1D c_proj, NeoX's dense / dense_4h_to_h, OPT's out_proj / fc2, an experts module's 3-D down_proj and
    a shared expert's down_proj), and the bias of an output norm that has one. New tensors replace the
    zeroed ones: the dense model's are never written.
    """
    from engine.perturb.pair import clone_sharing

    kind = details.get("kind")
    if kind == "block":
        return clone
    model = clone_sharing(dense)
    parts = _droppable(model)
    for i in details.get("dropped", []):
        layer = decoder_layers(model)[i]
        paths = parts.output_parameters(layer, kind)
        if not paths:
            raise HieruiError(f"hierui does not know the {kind} output projection of {parts.model_type}")
        bias = parts.norm_bias(layer, kind)
        # streamed: the layer's weights in while they are replaced, the zeros then written to the copy's own store
        with resident(layer):
            for path in paths + ([bias] if bias else []):
                owner_path, _, name = path.rpartition(".")
                owner = get(layer, owner_path)
                old = getattr(owner, name)
                setattr(owner, name, nn.Parameter(torch.zeros_like(old), requires_grad=False))
    return model
