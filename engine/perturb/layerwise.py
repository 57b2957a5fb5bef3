"""Sequential, layer-by-layer calibration, as the Wanda and SparseGPT references do it.

The calibration tokens are embedded once and stopped at the first decoder layer, capturing the inputs
that layer sees (and the keyword arguments the model passes it: rotary embeddings, the causal mask).
Then each layer in turn: run it on the current inputs with hooks on its linears that accumulate
input statistics, prune its linears from those statistics, and run it again so that the *pruned*
layer's outputs become the next layer's inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.perturb.linears import decoder_layers, layer_linears


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model, calib_ids: torch.Tensor, batch_size: int = 8):
    """Run the embedding stage on each calibration chunk, returning [(hidden_states, kwargs)] per chunk."""
    layers = decoder_layers(model)
    first = layers[0]
    device = next(first.parameters()).device
    captured: list = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache", "hidden_states")}
        captured.append((hidden.detach(), kw))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        embed_device = model.get_input_embeddings().weight.device
        for start in range(0, calib_ids.shape[0], batch_size):
            ids = calib_ids[start : start + batch_size].to(embed_device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return [(h.to(device), kw) for h, kw in captured]


def _layer_out(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_layer(layer, chunks):
    """The layer's outputs for every chunk, with the same keyword arguments."""
    return [(_layer_out(layer(h, **kw)), kw) for h, kw in chunks]


class InputStats:
    """Accumulates what a linear's inputs look like over the calibration tokens.

    `sq`: per input feature, the sum of squares over all tokens (Wanda's ‖X_j‖₂²).
    `xtx`: the input Gram matrix Σ x xᵀ (SparseGPT's Hessian, up to a factor), when `gram=True`.
    """

    def __init__(self, in_features: int, device, gram: bool):
        self.tokens = 0
        self.sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if gram else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sq += (x * x).sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ per input feature."""
        return self.sq.sqrt()


PruneLinear = Callable[[str, object, InputStats], torch.Tensor]


@torch.no_grad()
def prune_layers_sequentially(
    model,
    calib_ids: torch.Tensor,
    prune_linear: PruneLinear,
    gram: bool,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 8,
) -> None:
    """Prune every decoder layer of `model` in place (by replacing weights), layer after layer.

    `prune_linear(name, linear, stats)` returns the new weight for one linear from its input stats.
    """
    from engine.perturb.linears import set_weight

    layers = decoder_layers(model)
    chunks = capture_layer_inputs(model, calib_ids, batch_size)
    for index, layer in enumerate(layers):
        device = next(layer.parameters()).device
        chunks = [(h.to(device), {k: _to(v, device) for k, v in kw.items()}) for h, kw in chunks]
        linears = layer_linears(layer)
        stats = {name: InputStats(lin.in_features, device, gram) for name, lin in linears.items()}
        hooks = [
            lin.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0]))
            for name, lin in linears.items()
        ]
        try:
            run_layer(layer, chunks)
        finally:
            for h in hooks:
                h.remove()
        for name, lin in linears.items():
            set_weight(lin, prune_linear(name, lin, stats[name]))
        del stats
        chunks = run_layer(layer, chunks)
        if progress:
            progress(index + 1, len(layers))


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value
