"""Sequential, layer-by-layer calibration, as the Wanda and SparseGPT references do it, at two passes per layer.

The calibration tokens go through the model once with every decoder layer replaced by a recorder that
passes its input through: this yields the first layer's inputs and, for every layer, the keyword arguments
the model gives it (rotary embeddings, the attention mask), which differ between layers in some families:
Gemma 2/3 and Qwen2 give sliding-window layers another mask than full-attention ones, and Gemma 3 other
rotary embeddings too. Positional arguments (GPT-2's block takes its mask positionally) are turned into
keywords through the layer's signature; the KV cache arguments are dropped. Nothing a model passes its layers
depends on what the layers before returned, so recording does not need to run them.

Then each layer in turn, in two passes over its calibration chunks:

1. the dense layer, with a pre-hook on each of its weight matrices (`engine.anatomy.linears.WeightView`:
   linears, GPT-2 Conv1Ds) and experts modules. The statistics (engine.perturb.inputs.InputStats) are computed
   once per distinct input, not once per matrix: the matrices that receive the very same tensor in the first
   chunk (q, k and v; gate and up) form one SharedInput, whose Wanda norms and SparseGPT Gram matrix (one matrix
   product per chunk) they all use. The pass stops as soon as the last hooked module of the layer has its input
   (on a Llama layer: before down_proj computes), since no output of pass one is used; the first chunk runs
   whole, to learn that order. A layer that breaks either assumption (a matrix called twice, matrices of one
   group given different tensors in a later chunk, another call order) is calibrated again with one statistic
   per matrix and whole forwards, the plain way;
2. the pruned layer, whose outputs become the next layer's inputs (not for the last layer: nothing reads them).

Nothing in the loop copies to the host; SparseGPT checks its factorizations once per layer
(engine.perturb.sparsegpt). The statistics and every mask are the same as with one hook per matrix and two
whole forwards (tests/test_prune_passes.py compares them).

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
from engine.perturb.inputs import InputStats, SharedInput
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


# the new [out, in] weights of a layer's matrices, from their shared inputs: for each SharedInput, one per view
PruneLayer = Callable[[list[SharedInput]], list[list[torch.Tensor]]]


class _Restart(Exception):
    """A layer broke what shared statistics and the early stop assume: calibrate it the plain way."""


class _PassOne:
    """The hooks of pass one over a layer (see the module's docstring), and the SharedInputs they fill.

    `share`: one statistic per distinct input and the early stop; without it, one per matrix and whole forwards.
    """

    def __init__(self, plain: list[WeightView], experts: list, gram: bool, share: bool):
        self.plain, self.experts, self.gram, self.share = plain, experts, gram, share
        self.groups: list[SharedInput] = []
        self.group_of: dict[int, SharedInput] = {}  # id(view) -> its SharedInput
        self.first: dict[int, tuple[torch.Tensor, SharedInput]] = {}  # chunk 0: id(tensor) -> (tensor, its group)
        self.added: dict[int, torch.Tensor] = {}  # id(group) -> the tensor added this chunk
        self.calls: dict[int, int] = {}  # id(module) -> calls this chunk
        self.order: list[object] = []  # chunk 0: the hooked modules in the order they were called
        self.stop_at = None  # the module whose pre-hook ends the layer's forward, once the first chunk has run
        self.chunk = 0
        if not share:
            for v in plain:
                self._new_group(v)

    def _new_group(self, view: WeightView) -> SharedInput:
        group = SharedInput(InputStats(view.in_features, view.parameter.device, self.gram), [view])
        self.groups.append(group)
        self.group_of[id(view)] = group
        return group

    def _called(self, module) -> None:
        count = self.calls[id(module)] = self.calls.get(id(module), 0) + 1
        if self.share and count > 1:
            raise _Restart  # a matrix called twice in one forward: its group would miss the second input
        if self.chunk == 0:
            self.order.append(module)

    def matrix(self, view: WeightView, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self._called(module)
        if not self.share:
            self.group_of[id(view)].stats.add(x)
        else:
            group = self.group_of.get(id(view))
            if group is None:  # first seen: joins the group of a tensor already read this chunk (chunk 0 only)
                known = self.first.get(id(x)) if self.chunk == 0 else None
                if known is None:
                    group = self._new_group(view)
                    self.first[id(x)] = (x, group)
                    self.added[id(group)] = x
                    group.stats.add(x)
                else:
                    group = known[1]
                    group.views.append(view)
                    self.group_of[id(view)] = group
            else:
                added = self.added.get(id(group))
                if added is None:
                    self.added[id(group)] = x
                    group.stats.add(x)
                elif added is not x:
                    raise _Restart  # one group, two tensors: these matrices do not share their input
        if module is self.stop_at:
            raise _Stop

    def experts_module(self, module, args, kwargs):
        self._called(module)  # ExpertInputs' own pre-hook, registered first, has recorded the input
        if module is self.stop_at:
            raise _Stop

    def attach(self) -> list:
        hooks = []
        for v in self.plain:
            hook = lambda m, a, kw, v=v: self.matrix(v, m, a, kw)  # noqa: E731
            hooks.append(v.module.register_forward_pre_hook(hook, with_kwargs=True))
        for e in self.experts:
            hooks.append(e.attach())
            hooks.append(e.module.register_forward_pre_hook(self.experts_module, with_kwargs=True))
        return hooks

    def end_chunk(self) -> None:
        hooked = [v.module for v in self.plain] + [e.module for e in self.experts]
        once = all(self.calls.get(id(m), 0) == 1 for m in hooked)
        if self.stop_at is not None:
            if not once:
                raise _Restart  # stopped before a module it has not called yet: another order
        elif self.share and self.chunk == 0 and once and self.order:
            self.stop_at = self.order[-1]
        self.chunk += 1
        self.calls.clear()
        self.added.clear()
        self.first.clear()

    def shared_inputs(self) -> list[SharedInput]:
        for v in self.plain:  # a matrix its layer never called: empty statistics, as before
            if id(v) not in self.group_of:
                self._new_group(v)
        return self.groups


@torch.no_grad()
def pass_one(layer, chunks, plain: list[WeightView], experts: list, gram: bool) -> list[SharedInput]:
    """Pass one over `layer` (see the module's docstring): the SharedInputs of its matrices `plain`, and each
    experts module's tokens recorded in `experts` (engine.perturb.experts.ExpertInputs).

    The first chunk runs whole in every layer: what a layer calls after the module it stops at is only known from
    running it, and a layer may differ from another of the same modules (its forward replaced, a hook)."""
    for share in (True, False):
        capture = _PassOne(plain, experts, gram, share)
        hooks = capture.attach()
        try:
            for h, kw in chunks:
                try:
                    layer(h, **kw)
                except _Stop:
                    pass
                capture.end_chunk()
            return capture.shared_inputs()
        except _Restart:
            for e in experts:
                e.hidden.clear()
                e.index.clear()
        finally:
            for hook in hooks:
                hook.remove()
    raise AssertionError("unreachable: pass one without sharing never restarts")  # pragma: no cover


@torch.no_grad()
def prune_layers_sequentially(
    model,
    calib_ids: torch.Tensor,
    prune_layer: PruneLayer,
    gram: bool,
    spec=None,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 8,
) -> dict:
    """Prune every decoder layer of `model` (by replacing weights), layer after layer.

    `prune_layer(shared)` returns, for each SharedInput of a layer, the new [out, in] weights of its views.
    `spec` (the pruning Spec) is what an expert without calibration tokens is pruned with by magnitude.
    Returns the details for the report: for MoE models `expert_tokens` ([{layer, tokens: [per expert]}]) and
    `experts_without_tokens` ([[layer, expert]]).
    """
    from engine.perturb.experts import ExpertInputs, prune_experts

    layers = decoder_layers(model)
    hidden, layer_kwargs = capture_calibration(model, calib_ids, batch_size)
    details: dict = {}
    last = len(layers) - 1
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
        experts = [ExpertInputs(module) for module in layer.modules() if is_experts(module)]
        shared = pass_one(layer, chunks, plain, experts, gram)
        for group, weights in zip(shared, prune_layer(shared)):
            for v, w in zip(group.views, weights):
                v.assign(w)
        del shared
        for inputs in experts:
            expert_views = [v for v in views if v.expert is not None and v.module is inputs.module]
            prune_experts(index, inputs, expert_views, prune_layer, gram, spec, details)
        del experts
        if index < last:  # pass two: the pruned layer's outputs, the next layer's inputs
            hidden = [h for h, _ in run_layer(layer, chunks)]
        if progress:
            progress(index + 1, len(layers))
    return details
