"""Sequential, layer-by-layer calibration, as the Wanda and SparseGPT references do it.

The calibration tokens go through the model once with every decoder layer replaced by a recorder that
passes its input through: this yields the first layer's inputs and, for every layer, the keyword arguments
the model gives it (rotary embeddings, the attention mask), which differ between layers in some families:
Gemma 2/3 and Qwen2 give sliding-window layers another mask than full-attention ones, and Gemma 3 other
rotary embeddings too. Positional arguments (GPT-2's block takes its mask positionally) are turned into
keywords through the layer's signature; the KV cache arguments are dropped. Nothing a model passes its layers
depends on what the layers before returned, so recording does not need to run them.

Then each layer in turn: run it on the current inputs with hooks that accumulate input statistics for each
of its weight matrices (`engine.anatomy.linears.WeightView`: linears, GPT-2 Conv1Ds, experts), prune them from
those statistics, and run it again so that the *pruned* layer's outputs become the next layer's inputs.

Experts (engine.perturb.experts): the statistics of expert e come only from the calibration tokens the
router sends to e, recorded by a pre-hook on the experts module; an expert no calibration token reaches is
pruned by magnitude instead, with a warning, and listed in the details.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from accelerate.utils import send_to_device

from engine.anatomy.linears import WeightView, decoder_layers, is_experts, weight_views
from engine.perturb.inputs import InputStats
from engine.place.streaming import each_resident, layer_device

# arguments of a decoder layer that are not recorded: calibration runs without a KV cache
CACHE_ARGUMENTS = frozenset({"cache", "past_key_values", "past_key_value", "layer_past", "use_cache"})


class _Stop(Exception):
    pass


def _recorder(layer, on_call: Callable[[torch.Tensor, dict], None], last: bool):
    """A stand-in for `layer.forward`: turns the call into (hidden_states, keyword arguments) through the
    real forward's signature, reports it, and returns the hidden states unchanged (raising _Stop if `last`)."""
    signature = inspect.signature(layer.forward)
    params = list(signature.parameters.values())
    first = params[0].name
    var_kw = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    def forward(*args, **kwargs):
        arguments = dict(signature.bind(*args, **kwargs).arguments)
        if var_kw is not None:
            arguments.update(arguments.pop(var_kw, {}))
        hidden = arguments.pop(first)
        on_call(hidden, {k: v for k, v in arguments.items() if k not in CACHE_ARGUMENTS})
        if last:
            raise _Stop
        return hidden

    return forward


@torch.no_grad()
def capture_calibration(model, calib_ids: torch.Tensor, batch_size: int = 8):
    """Run the calibration chunks through `model` with its decoder layers recording instead of computing.

    Returns (hidden, layer_kwargs): the first layer's input per chunk (on that layer's device), and
    layer_kwargs[i][c] the keyword arguments the model passes layer i for chunk c.
    """
    layers = list(decoder_layers(model))
    hidden: list[torch.Tensor] = []
    layer_kwargs: list[list[dict]] = [[] for _ in layers]
    saved = []
    for i, layer in enumerate(layers):

        def on_call(h, kw, i=i):
            if i == 0:
                hidden.append(h.detach())
            layer_kwargs[i].append(kw)

        saved.append(layer.__dict__.get("forward"))  # accelerate's device hooks live there
        layer.forward = _recorder(layer, on_call, last=i == len(layers) - 1)
    try:
        embed_device = model.get_input_embeddings().weight.device
        for start in range(0, calib_ids.shape[0], batch_size):
            ids = calib_ids[start : start + batch_size].to(embed_device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        for layer, old in zip(layers, saved):
            if old is None:
                del layer.forward
            else:
                layer.forward = old
    for i, per_chunk in enumerate(layer_kwargs):
        if len(per_chunk) != len(hidden):
            raise ValueError(f"decoder layer {i} was not called once per calibration chunk ({len(per_chunk)} calls)")
    device = layer_device(layers[0])
    return [h.to(device) for h in hidden], layer_kwargs


def capture_layer_inputs(model, calib_ids: torch.Tensor, batch_size: int = 8):
    """The first decoder layer's inputs per calibration chunk: [(hidden_states, kwargs)]."""
    hidden, layer_kwargs = capture_calibration(model, calib_ids, batch_size)
    return list(zip(hidden, layer_kwargs[0]))


def _layer_out(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_layer(layer, chunks):
    """The layer's outputs for every chunk, with the same keyword arguments."""
    return [(_layer_out(layer(h, **kw)), kw) for h, kw in chunks]


# the new [out, in] weight of one matrix from its input statistics
PruneMatrix = Callable[[WeightView, InputStats], torch.Tensor]


@torch.no_grad()
def prune_layers_sequentially(
    model,
    calib_ids: torch.Tensor,
    prune_matrix: PruneMatrix,
    gram: bool,
    spec=None,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 8,
) -> dict:
    """Prune every decoder layer of `model` (by replacing weights), layer after layer.

    `prune_matrix(view, stats)` returns the new [out, in] weight of one WeightView from its input stats.
    `spec` (the pruning Spec) is what an expert without calibration tokens is pruned with by magnitude.
    Returns the details for the report: for MoE models `expert_tokens` ([{layer, tokens: [per expert]}]) and
    `experts_without_tokens` ([[layer, expert]]).
    """
    from engine.perturb.experts import ExpertInputs, prune_experts

    layers = decoder_layers(model)
    hidden, layer_kwargs = capture_calibration(model, calib_ids, batch_size)
    details: dict = {}
    # a streamed layer (engine.place.streaming) has its weights in for its turn, its pruned ones written after
    for index, layer in each_resident(layers):
        # on several GPUs, the layer's own device: its inputs and every keyword argument (masks, rotary
        # embeddings, whatever a family passes) go there, moved whatever their structure (nested tuples, dicts,
        # objects with .to), so a new layer signature needs nothing here
        device = layer_device(layer)
        kwargs = layer_kwargs[index]
        chunks = [(h.to(device), send_to_device(kw, device)) for h, kw in zip(hidden, kwargs)]
        views = weight_views(layer, index)
        plain = [v for v in views if v.expert is None]
        stats = {id(v): InputStats(v.in_features, v.parameter.device, gram) for v in plain}
        hooks = [v.module.register_forward_hook(lambda _m, args, _out, s=stats[id(v)]: s.add(args[0])) for v in plain]
        experts = [ExpertInputs(module) for module in layer.modules() if is_experts(module)]
        hooks += [e.attach() for e in experts]
        try:
            run_layer(layer, chunks)
        finally:
            for h in hooks:
                h.remove()
        for v in plain:
            v.assign(prune_matrix(v, stats[id(v)]))
        del stats
        for inputs in experts:
            expert_views = [v for v in views if v.expert is not None and v.module is inputs.module]
            prune_experts(index, inputs, expert_views, prune_matrix, gram, spec, details)
        del experts
        hidden = [h for h, _ in run_layer(layer, chunks)]
        if progress:
            progress(index + 1, len(layers))
    return details
