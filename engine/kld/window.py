"""One window of a corpus KLD on the device, in memory that does not grow with ctx × vocabulary.

**The forward pass** (`forward`). Each model runs over the window to the input of its output head: a pre-hook on
the head keeps the head's inputs at the scored positions and hands the head a single row, so no model builds the
[positions, vocabulary] logits. The head (`Head`: its weight, bias and final soft-capping) is then applied here
chunk by chunk of positions (`chunks`: CHUNK_ELEMENTS logits at a time, at least one position, so a vocabulary of
any size is bounded too), each chunk scored and dropped. The one row the model's own head computed checks, every
window, that its logits are head(h): a model whose logits are anything else (a logit scale, say) is scored from its
own logits instead (the scored positions at once, logits_to_keep; the caller passes no head from then on).

**The hidden states** come from hooks too (engine.anatomy.sublayers.state_modules: each decoder layer's input and
the final norm's output, ℓ = 0 … L, what output_hidden_states returns), at the scored positions only, handed to a
callback: the dense model's are kept (L+1 × m × H), the perturbed model's compared with them as they are made
(`Cosines`) and dropped. Where the layers are not found, output_hidden_states (every position) is the fallback.

**The metrics** of a chunk (`dense_side`, `pair_metrics`) come from one log-softmax per model: the dense side
(log-probabilities, probabilities, its top-1 and NLL) once per chunk for every spec, then per spec one
log-softmax, one difference and two row dot products (KL both ways), its probabilities made in place."""

from __future__ import annotations

from dataclasses import dataclass

# logits per chunk (positions × vocabulary): 64 MB of float32 per tensor, about five alive at once. Measured on the
# embedded model (V = 49,152, 2 cores, quiet): the head and the metrics of 255 positions take 0.34 s in one chunk,
# 0.37 s in chunks of 128 or 64, 0.51 s in chunks of 32 (the head's weight is read once per chunk).
CHUNK_ELEMENTS = 1 << 24


def chunks(total: int, vocab: int) -> list[tuple[int, int]]:
    """(lo, hi) position ranges of at most CHUNK_ELEMENTS logits each (at least one position), of equal sizes."""
    most = max(1, CHUNK_ELEMENTS // max(1, vocab))
    count = -(-total // most)
    step = -(-total // count) if count else 1
    return [(lo, min(lo + step, total)) for lo in range(0, total, step)]


class Head:
    """A model's output head applied by hand: logits = softcap(h @ weight.T + bias), in float32."""

    def __init__(self, weight, bias=None, softcap: float | None = None):
        self.weight, self.bias, self.softcap = weight, bias, softcap

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def of(cls, model) -> Head | None:
        """The model's output head, or None where it is not a plain matrix on a device (offloaded, say)."""
        module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or weight.device.type == "meta":
            return None
        from engine.anatomy.sublayers import logit_softcap

        bias = getattr(module, "bias", None)
        return cls(weight.detach(), bias.detach() if bias is not None else None, logit_softcap(model))

    def __call__(self, h):
        import torch
        import torch.nn.functional as F

        w = self.weight
        bias = self.bias.to(w.device, w.dtype) if self.bias is not None else None
        z = F.linear(h.to(w.device, w.dtype), w, bias)
        if self.softcap:  # in the model's dtype, as its forward pass does
            z = torch.tanh(z / self.softcap) * self.softcap
        return z.float()


@dataclass
class Window:
    """One model's forward pass over a window, for its m scored positions: the head's inputs and the head (its
    logits made chunk by chunk), or the model's own float32 logits where its head cannot be applied here."""

    head_in: object | None  # (m, d) in the model's dtype
    head: Head | None
    logits: object | None  # (m, V) float32, only where head is None

    @property
    def vocab(self) -> int:
        return self.head.vocab if self.head is not None else int(self.logits.shape[-1])

    def logits_at(self, lo: int, hi: int):
        """The float32 logits (hi − lo, V) of scored positions lo … hi − 1."""
        if self.head is None:
            return self.logits[lo:hi]
        return self.head(self.head_in[lo:hi])


def forward(model, ids, m: int, head: Head | None, on_state=None) -> Window:
    """`model` over the window `ids` (1, ctx): a Window of its last m + 1 positions but the last (the m scored
    positions, predicting the window's last m tokens), its logits made by `head` (Head.of(model); None: the model's
    own logits). The Window's head is None where the model's logits turned out not to be head(h). `on_state(ℓ, h)`:
    called with each hidden state ℓ = 0 … L at those positions ((m, H), on its layer's device), where given."""
    import torch

    module = model.get_output_embeddings() if head is not None else None
    keep = m + 1
    got: dict = {}

    def head_input(_module, args, kwargs):
        h = args[0] if args else kwargs["input"]
        got["h"] = h[0, -keep:-1].clone()
        first = h[:, -keep:][:, :1]  # the model's own head computes the first scored position only: the check
        return ((first, *args[1:]), kwargs) if args else (args, {**kwargs, "input": first})

    hooks = [module.register_forward_pre_hook(head_input, with_kwargs=True)] if module is not None else []
    layers, final = (None, None)
    if on_state is not None:
        from engine.anatomy.sublayers import state_hooks, state_modules

        layers, final = state_modules(model)
        if layers is not None:  # each state at the scored positions
            hooks += state_hooks(layers, final, lambda index, h: on_state(index, h[0, -keep:-1]))
    every = on_state is not None and layers is None  # no layers found: output_hidden_states, every position
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False, output_hidden_states=every, **_keep(model, keep))
    finally:
        for hook in hooks:
            hook.remove()
    if every:
        for index, h in enumerate(out.hidden_states):
            on_state(index, h[0, -keep:-1])
    if head is None:
        return Window(None, None, out.logits[0, -keep:-1].float())
    if "h" in got:  # (a model that never calls its head module is scored from its own logits)
        own = out.logits[0, -1].float()
        mine = head(got["h"][:1])[0].to(own.device)
        if _same_logits(mine, own, head.weight.dtype):
            return Window(got["h"], head, None)
    with torch.no_grad():  # its own logits (a logit scale, say), the hidden states already handed on
        out = model(input_ids=ids, use_cache=False, **_keep(model, keep))
    return Window(None, None, out.logits[0, -keep:-1].float())


def _keep(model, keep: int) -> dict:
    import inspect

    return {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _same_logits(mine, own, dtype) -> bool:
    """The head applied here gives the model's logits, to the rounding of a matmul of another shape."""
    import torch

    scale = float(own.abs().max()) or 1.0
    rel = max(1e-3, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-3
    return bool(torch.allclose(mine, own, rtol=0, atol=rel * scale))


class Cosines:
    """The hidden-state cosines of a window: `keep` is the dense model's on_state (its states at the scored
    positions, kept), `against(hidden_map, sums)` a perturbed model's, adding to `sums[ℓ]` per dense state ℓ the
    sum over the scored positions of cos(dense ℓ, perturbed hidden_map[ℓ]) as that state is made; NaN where ℓ has
    no counterpart (−1) or the hidden sizes differ, as engine.perturb.pair.mapped_hidden. The sums stay on the
    device until `settle()` (after the forward pass: no synchronisation inside it)."""

    def __init__(self, states: int):
        self.states: list = [None] * states
        self.pending: list = []  # (sums, ℓ, the sum on the device)

    def keep(self, index: int, h) -> None:
        self.states[index] = h.clone()

    def against(self, hidden_map, sums):
        import torch.nn.functional as F

        wanted: dict[int, list[int]] = {}
        for i, j in enumerate(hidden_map):
            if j < 0:
                sums[i] = float("nan")
            else:
                wanted.setdefault(j, []).append(i)

        def on_state(index: int, h) -> None:
            for i in wanted.get(index, ()):
                d = self.states[i]
                if d.shape[-1] != h.shape[-1]:
                    sums[i] = float("nan")
                    continue
                cos = F.cosine_similarity(d.float(), h.to(d.device).float(), dim=-1)
                self.pending.append((sums, i, cos.double().sum()))

        return on_state

    def settle(self) -> None:
        for sums, i, total in self.pending:
            sums[i] += total.cpu()
        self.pending = []


def dense_side(logits_d, targets) -> dict:
    """The dense side of a chunk's metrics, once for every spec: log-probabilities, probabilities, NLL of the
    actual next tokens, top-1 and its probability (the inputs of pair_metrics)."""
    import torch

    lp = torch.log_softmax(logits_d, dim=-1)
    p = lp.exp()
    conf, top = p.max(dim=-1)
    nll = -lp.gather(-1, targets.to(lp.device)[:, None])[:, 0]
    return {"lp": lp, "p": p, "nll": nll, "conf": conf, "top": top}


def pair_metrics(dense: dict, logits_p, targets, log_softmax=None) -> dict:
    """Per-token metrics of a chunk (dense_side's and the perturbed float32 logits (c, V)), on the device. The KL
    weighs by dense["p"] (a llama.cpp base file's leaves out the tokens at its floor); `log_softmax` (default
    torch's over the last dimension) turns the perturbed logits into log-probabilities."""
    import torch

    logits_p = logits_p.to(dense["lp"].device)
    lp_p = torch.log_softmax(logits_p, dim=-1) if log_softmax is None else log_softmax(logits_p)
    top_p = lp_p.argmax(dim=-1)
    nll_p = -lp_p.gather(-1, targets.to(lp_p.device)[:, None])[:, 0]
    diff = torch.sub(dense["lp"], lp_p)
    kl = _rowdot(dense["p"], diff)
    kl_rev = -_rowdot(lp_p.exp_(), diff)  # lp_p is not read again: its probabilities in place
    return {
        "kl": kl,
        "kl_rev": kl_rev,
        "same_top": dense["top"] == top_p,
        "dp": nll_p.neg().exp() - dense["nll"].neg().exp(),
        "nll_d": dense["nll"],
        "nll_p": nll_p,
        "conf_d": dense["conf"],
        "top_d": dense["top"],
        "top_p": top_p,
    }


def _rowdot(a, b):
    """Σ_v a[i, v] b[i, v] per row, without the (c, V) product."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def token_metrics(logits_d, logits_p, targets) -> dict:
    """Per-token metrics of two (m, V) float32 logit blocks and the (m,) actual next tokens, on the device."""
    return pair_metrics(dense_side(logits_d, targets), logits_p, targets)


def window_logits(model, ids, keep: int, hidden: bool = True):
    """The float32 logits at the window's last `keep` positions (1, keep, V), and the hidden states (a tuple)
    when `hidden`: the model's own forward (every position's hidden states), for checks and benchmarks."""
    import torch

    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, output_hidden_states=hidden, **_keep(model, keep))
    return out.logits[:, -keep:].float(), out.hidden_states


def hidden_cosines(h_d, h_p, hidden_map, keep: int):
    """(L+1, keep) cosine of the dense and perturbed hidden states at the last `keep` positions (NaN where a
    dense layer has no counterpart, engine.perturb.pair.mapped_hidden)."""
    import torch

    from engine.perturb.pair import mapped_hidden
    from engine.place.placement import gather

    # on several GPUs the layers' states are where the layers are: one copy per device to the last one's
    where = h_d[-1].device
    d = gather([h[0, -keep:] for h in h_d], where, dim=0).float()[None]  # (1, L+1, keep, H)
    p = gather([h[0, -keep:] for h in h_p], where, dim=0).float()[None]
    index = torch.tensor(hidden_map, dtype=torch.long, device=p.device)
    b, n, k, hdim = d.shape
    pm = mapped_hidden(d.reshape(1, n, k * hdim), p.reshape(1, p.shape[1], k * hdim), index).reshape(1, n, k, hdim)
    return torch.nn.functional.cosine_similarity(d, pm, dim=-1)[0]
