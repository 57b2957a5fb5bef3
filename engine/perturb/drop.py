"""Dropping whole sublayers or blocks: attndrop:N, mlpdrop:N, blockdrop:N.

Scoring follows "What Matters in Transformers? Not All Attention Is Needed" (He et al., 2024), one-shot
on the dense model: for each decoder layer, the mean over calibration tokens of the cosine similarity
between a sublayer's input and its output (residual included). The N with the highest similarity
(they change the hidden state least) are dropped.

    attention: h_in            vs  h_mid = h_in + self_attn(input_layernorm(h_in))
    mlp:       h_mid           vs  h_out = h_mid + mlp(post_attention_layernorm(h_mid))
    block:     h_in            vs  h_out

Dropping works on stock transformers models (Llama, Qwen2, Mistral) by replacing modules of the
perturbed clone, never by touching tensors (the clone shares them with the dense model), so a drop
costs no weight memory:

- blockdrop: the kept layers form a new ModuleList; their attention `layer_idx` are renumbered
  0..K-1 and the clone's config gets num_hidden_layers = K (and `layer_types` of the kept layers).
- mlpdrop: `layer.mlp` becomes a module returning zeros.
- attndrop: `layer.self_attn` becomes a module returning zeros that touches no KV cache. The
  remaining attention modules are renumbered 0..K-1 so cache slot 0 always belongs to a live
  attention (DynamicCache.get_seq_length() and the causal mask read slot 0, also in a cache built
  without a config). The config keeps num_hidden_layers (the model's forward loops over
  layers[:num_hidden_layers]); instead `kv_sharing_modes` marks the last L-K slots "reuse", which
  makes DynamicCache/StaticCache(config=...) build a no-storage DummyLayer there. When the config's
  `layer_types` mix kinds (e.g. Qwen2 sliding + full) so that renumbering would give an attention
  a cache slot of the wrong kind, the indices are kept and the dropped slots themselves become
  dummies (DynamicCache(config=...) then still finds the first live slot; a config-less cache would not).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

from engine.errors import HieruiError
from engine.perturb.linears import decoder_layers

# bump when the output changes: cached similarity scores made by another version are then not reused (engine.cache)
ALGORITHM_VERSION = 1

KINDS = {"attndrop": "attention", "mlpdrop": "mlp", "blockdrop": "block"}


class DroppedAttention(nn.Module):
    """Stands in for a dropped self-attention: adds nothing to the residual stream, caches nothing."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class DroppedMLP(nn.Module):
    """Stands in for a dropped MLP: adds nothing to the residual stream."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


# ------------------------------------------------------------------ scoring


def _out(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _cos_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.reshape(-1, a.shape[-1]).float()
    b = b.reshape(-1, b.shape[-1]).float()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).sum())


@torch.no_grad()
def similarity_scores(
    model, calib_ids: torch.Tensor, batch_size: int = 8, progress: Callable[[int, int], None] | None = None
) -> dict[str, list[float]]:
    """Per decoder layer, the mean input/output cosine similarity of its attention, MLP and whole block."""
    layers = decoder_layers(model)
    sums = {kind: [0.0] * len(layers) for kind in ("attention", "mlp", "block")}
    tokens = 0
    seen: dict[int, torch.Tensor] = {}
    handles = []

    for i, layer in enumerate(layers):

        def grab_input(_m, args, kwargs, i=i):
            seen[i] = args[0] if args else kwargs["hidden_states"]

        def grab_attention(_m, _args, output, i=i):
            h_in = seen[i]
            h_mid = h_in + _out(output)
            sums["attention"][i] += _cos_sum(h_in, h_mid)
            seen[i] = (h_in, h_mid)

        def grab_output(_m, _args, output, i=i):
            h_in, h_mid = seen.pop(i)
            h_out = _out(output)
            sums["mlp"][i] += _cos_sum(h_mid, h_out)
            sums["block"][i] += _cos_sum(h_in, h_out)

        handles += [
            layer.register_forward_pre_hook(grab_input, with_kwargs=True),
            layer.self_attn.register_forward_hook(grab_attention),
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


def drop_mlp(model, indices) -> None:
    """Replace the MLP of each layer in `indices` by a zero module."""
    layers = decoder_layers(model)
    for i in indices:
        layers[i].mlp = DroppedMLP()


def drop_attention(model, indices) -> None:
    """Replace the self-attention of each layer in `indices` by a zero module, keeping KV caches right."""
    layers = decoder_layers(model)
    for i in indices:
        layers[i].self_attn = DroppedAttention()
    live = [i for i, layer in enumerate(layers) if not isinstance(layer.self_attn, DroppedAttention)]
    if not live:
        raise HieruiError("cannot drop every attention layer: at least one must remain")
    cfg = _config(model)
    types = getattr(cfg, "layer_types", None)
    if types is None or [types[i] for i in live] == list(types[: len(live)]):
        _renumber([layers[i].self_attn for i in live])
        cfg.kv_sharing_modes = [None] * len(live) + ["reuse"] * (len(layers) - len(live))
    else:  # mixed slot kinds: keep the indices, make the dropped slots themselves dummies
        cfg.kv_sharing_modes = [None if i in live else "reuse" for i in range(len(layers))]


def drop_blocks(model, indices) -> None:
    """Remove the decoder layers in `indices`; the rest are renumbered and the config shrunk to match."""
    owner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = decoder_layers(model)
    if owner.layers is not layers:
        raise HieruiError(f"blockdrop does not know where {type(model).__name__} keeps its decoder layers")
    drop = set(indices)
    kept = [i for i in range(len(layers)) if i not in drop]
    owner.layers = nn.ModuleList([layers[i] for i in kept])
    _renumber(owner.layers)
    cfg = _config(model)
    for name in ("layer_types", "mlp_layer_types", "kv_sharing_modes"):
        value = getattr(cfg, name, None)
        if value is not None:
            setattr(cfg, name, [value[i] for i in kept])
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
    kind = KINDS[spec.method]
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
    return {"dropped": dropped, "kind": kind, "similarity": scores}


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

    Dropped blocks are really gone (the clone is already standard). A dropped attention or MLP becomes
    a zero output projection (o_proj / down_proj), which adds exactly nothing to the residual stream.
    """
    from engine.pair import clone_sharing
    from engine.perturb.linears import set_weight

    kind = details.get("kind")
    if kind == "block":
        return clone
    model = clone_sharing(dense)
    for i in details.get("dropped", []):
        layer = decoder_layers(model)[i]
        out = layer.self_attn.o_proj if kind == "attention" else layer.mlp.down_proj
        set_weight(out, torch.zeros_like(out.weight))
        if getattr(out, "bias", None) is not None:
            out.bias = nn.Parameter(torch.zeros_like(out.bias), requires_grad=False)
    return model
