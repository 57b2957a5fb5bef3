"""The logit lens: each layer's hidden state read out through the model's own final norm and LM head.

    lens ℓ = softmax(head(final_norm(h_ℓ)) / T)        ℓ = 1..L, h_ℓ the residual stream after ℓ layers

with the functions the model itself uses to turn its last hidden state into logits: the final norm module
(and OPT's `project_out` after it, where a model has one), the output embedding (`get_output_embeddings()`,
tied or not) and Gemma's final soft-capping (z = cap · tanh(z / cap)). At ℓ = L the lens is the model's own
output distribution: the stepper takes the model's logits there, so `lens_kl[L]` is `kl` by construction, and
`head(final_norm(h_L))` reproducing the model's logits is tested per family (tests/test_lens.py).

Cost. The mid layers' states of BOTH models, normed, go through the head in one batched matrix product (a (2, N, H)
stack, N = B·(L−1), by the head's weight: `torch.bmm`, one weight chunk read once for both models), in chunks of the
vocabulary (LENS_CHUNK rows of the head's weight at a time), each chunk's float32 statistics folded into running
ones: per row the running max and sum of exp (an online log-sum-exp), the sums KL needs (KL(p‖q) = Σp·(z_p − z_q)
− lse_p + lse_q), Σ p_final·z_pℓ for lens_dense_final_kl, and a running argmax for the top-1. No (B, L, V) tensor is
kept: what a step holds is a chunk's (2, N, LENS_CHUNK), whatever the vocabulary. A leading dimension of 2, not the
two models' rows stacked: each model's product is then the same computation, so equal states give bitwise equal
lenses (lens_kl exactly 0; stacked as rows, a row's rounding depended on where it sat, ±1e-7). The matmul runs in
the model's dtype (a lower-precision lens would put its own noise into small divergences: bfloat16 changed
`lens_kl` by up to 30% on wanda:0.5 and 300% on int8 of the embedded model), the statistics in float32. Where the
head's weight is not a plain tensor on a device (a streamed or offloaded head behind accelerate's hooks, a quantized
Linear) the head is called on the whole vocabulary and the same statistics are taken over chunks of its output.
The final norm is called with `module.forward(h)`, not `module(h)`: hierui's own forward hooks (the stepper's taps
on the final norm) never fire from the lens, which the explorer computes in a second thread while a step runs.
bench/step_overhead.py prints the lens's cost against two bare decode forwards: on the embedded model (V = 49,152,
L = 30), one core of this 2-core CPU, 0.58–0.64 of them (0.79 with the full-vocabulary log-softmaxes before), 84% of
it the matmul (1.64 GMAC in float32), which no reordering removes; the modes (engine.record.settings.LENS_MODES) take
it off the critical path instead.

Per-layer metrics (lists over ℓ = 1..L, the design's contract):
    lens_kl[ℓ]              KL(dense lens ℓ ‖ perturbed lens ℓ)
    lens_top1_agree[ℓ]      the two lenses' top-1 tokens agree
    lens_dense_final_kl[ℓ]  KL(dense final ‖ perturbed lens ℓ): how early the perturbed model's prediction
                            departs from where the dense model ends
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.anatomy import sublayers as A
from engine.record.settings import LENS_CHUNK
from engine.run.metrics import _f


@dataclass
class LensHead:
    """The modules that turn a residual-stream state into logits: final norm(s), head, soft-capping."""

    norms: list  # applied in order (the final norm; OPT: and project_out)
    head: object  # the output embedding (a Linear)
    softcap: float | None

    @torch.no_grad()
    def normed(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm(s) applied to h, through `forward` (no forward hooks fire: the stepper's taps)."""
        for norm in self.norms:
            h = norm.forward(h)
        return h

    def cap(self, z: torch.Tensor) -> torch.Tensor:
        """The model's final soft-capping (Gemma), or z."""
        return torch.tanh(z / self.softcap) * self.softcap if self.softcap else z

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of residual-stream states h (…, H), in the model's dtype."""
        return self.cap(self.head.forward(self.normed(h)))

    def plain_weight(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight (V, H), bias or None) where the head is a plain Linear whose weight is an ordinary floating
        tensor on a device, else None (accelerate's hooks, a quantized or meta weight: call the head instead)."""
        head = self.head
        if type(head) is not torch.nn.Linear or hasattr(head, "_hf_hook"):
            return None
        weight, bias = head.weight, head.bias
        for t in (weight, bias):
            plain = t is None or type(t) in (torch.Tensor, torch.nn.Parameter)
            if not plain or (t is not None and (t.device.type == "meta" or not t.is_floating_point())):
                return None
        return weight, bias


def lens_head(model) -> LensHead | None:
    """The model's own final norm and head, or None where hierui cannot find them (no lens then)."""
    parts = A.find(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if parts is None or parts.final is None or head is None:
        return None
    final = parts.final_module(model)
    norms = [final]
    if parts.final.endswith("project_out"):  # OPT: final_layer_norm, then project_out (anatomy's `final`)
        owner = A.get(model, parts.owner)
        norm = getattr(owner, "final_layer_norm", None)
        norms = [norm, final] if norm is not None else [final]
    return LensHead(norms=norms, head=head, softcap=A.logit_softcap(model))


def _chunks(head: LensHead, head_p: LensHead | None, x: torch.Tensor, chunk: int):
    """The lens logits of the normed states x (2, N, H), model 0 through `head`, model 1 through `head_p` (or
    `head`), one vocabulary chunk at a time: (start, (2, N, c)) in the model's dtype, soft-capped."""
    heads = (head, head_p or head)
    plain = [h.plain_weight() for h in heads]

    def capped(z: torch.Tensor) -> torch.Tensor:
        if not (heads[0].softcap or heads[1].softcap):
            return z
        return torch.stack([heads[0].cap(z[0]), heads[1].cap(z[1])])

    if all(p is not None and p[0].device == x.device for p in plain):
        (w0, b0), (w1, b1) = plain
        same = w0 is w1 and b0 is b1
        vocab = w0.shape[0]
        for start in range(0, vocab, chunk):
            end = min(vocab, start + chunk)
            if same:  # one weight chunk for both models: read once, the same product for each
                z = torch.bmm(x, w0[start:end].t().to(x.dtype).unsqueeze(0).expand(2, -1, -1))
                if b0 is not None:
                    z = z + b0[start:end]
            else:
                w = torch.stack([w0[start:end], w1[start:end]]).transpose(1, 2)
                z = torch.bmm(x, w.to(x.dtype))
                if b0 is not None or b1 is not None:
                    zero = torch.zeros(end - start, dtype=z.dtype, device=z.device)
                    z = z + torch.stack([zero if b is None else b[start:end] for b in (b0, b1)]).unsqueeze(1)
            yield start, capped(z)
        return
    # a head hierui cannot slice: the whole vocabulary at once, the statistics still per chunk
    z = capped(torch.stack([heads[0].head.forward(x[0]), heads[1].head.forward(x[1])]))
    for start in range(0, z.shape[-1], chunk):
        yield start, z[..., start : start + chunk]


def lens_metrics(
    head: LensHead,
    h_d: torch.Tensor,
    h_p: torch.Tensor,
    z_d: torch.Tensor,
    z_p: torch.Tensor,
    temperature: float = 1.0,
    head_p: LensHead | None = None,
    chunk: int = LENS_CHUNK,
) -> dict[str, torch.Tensor]:
    """lens_kl, lens_top1_agree, lens_dense_final_kl, each (B, L), from the hidden states (B, L+1, H) of the
    stepper (ℓ = 0 embeddings, 1..L−1 the residual stream after ℓ layers, L the final normed state) and the
    models' logits (B, V), which are the lens at ℓ = L.

    `head_p`: the perturbed model's own head where it differs from the dense one (a checkpoint whose norm or
    head was changed); by default both lenses read through the dense model's head (the same tensors: a
    perturbation never touches the final norm or the head). A NaN hidden state (a dense layer without
    counterpart, engine.perturb.pair.mapped_hidden) gives NaN metrics there.
    """
    batch, depth = h_d.shape[0], h_d.shape[1] - 1  # B, L
    t = float(temperature)
    # the models' own output distributions at T (ℓ = L), float32
    logf_d = torch.log_softmax(_f(z_d) / t, dim=-1)
    logf_p = torch.log_softmax(_f(z_p) / t, dim=-1)
    final = {
        "kl": (logf_d.exp() * (logf_d - logf_p)).sum(-1),
        "agree": (logf_d.argmax(-1) == logf_p.argmax(-1)).to(torch.float32),
    }
    f_d = logf_d.exp()  # (B, V): p_final
    neg_entropy = (f_d * logf_d).sum(-1)  # Σ p_final log p_final
    mids = depth - 1
    if mids > 0:
        x = torch.stack([head.normed(h_d[:, 1:depth]), (head_p or head).normed(h_p[:, 1:depth])])
        x = x.reshape(2, batch * mids, x.shape[-1])
        kl_mid, agree_mid, final_mid = (v.view(batch, mids) for v in _online(_chunks(head, head_p, x, chunk), f_d, t))
    else:
        kl_mid = agree_mid = final_mid = torch.zeros((batch, 0), dtype=torch.float32, device=z_d.device)
    kl = torch.cat([kl_mid.to(final["kl"].device), final["kl"].unsqueeze(1)], dim=1)
    agree = torch.cat([agree_mid.to(kl.device), final["agree"].unsqueeze(1)], dim=1)
    dense_final = torch.cat([final_mid.to(kl.device) + neg_entropy.unsqueeze(1), final["kl"].unsqueeze(1)], dim=1)
    return {
        "lens_kl": kl,
        # 1/0, NaN where the lens is not a number (to_host: null); the stepper records it as bools
        "lens_top1_agree": agree.masked_fill(kl.isnan(), float("nan")),
        "lens_dense_final_kl": dense_final,
    }


def _online(chunks, f_d: torch.Tensor, t: float):
    """Per row of the (2, N, V) lens logits given chunk by chunk (N = B·(L−1), B rows of `f_d`, the dense final
    distributions (B, V)), in float32 (N,): KL(dense lens ‖ perturbed lens), the two top-1s' agreement (1/0), and
    lse_q − Σ p_final·z_q of the perturbed lens q (KL(p_final ‖ q) less Σ p_final log p_final, added by the caller).

    Both models' chunk is one (2, N, c) tensor through each operation (few passes over it: max, exp, sum, and two
    batched dot products), the running statistics (2, N): max m, Σ exp(z − m), and for the dense lens
    Σ exp(z_d − m_d)·(z_d − z_p), rescaled by exp(m_old − m_new) when the max moves."""
    m = total = cross = fz = best = arg = None
    batch = f_d.shape[0]
    for start, z in chunks:
        z = _f(z)
        if t != 1.0:
            z = z / t
        width = z.shape[-1]
        top, where = z.max(-1)  # (2, N): each row's largest logit in the chunk and its index
        new = top if m is None else torch.maximum(m, top)
        e = torch.sub(z, new.unsqueeze(-1)).exp_()  # (2, N, c)
        diff = z[0] - z[1]
        dot = torch.bmm(e[0].unsqueeze(1), diff.unsqueeze(2)).view(-1)  # Σ exp(z_d − m_d)·(z_d − z_p)
        f = f_d[:, start : start + width].to(z.device)  # (B, c)
        part_fz = torch.bmm(z[1].view(batch, -1, width), f.unsqueeze(-1)).reshape(-1)  # Σ p_final·z_q
        if m is None:
            total, cross, fz, best, arg = e.sum(-1), dot, part_fz, top, where
        else:
            scale = torch.exp(m - new)
            total = total * scale + e.sum(-1)
            cross = cross * scale[0] + dot
            fz = fz + part_fz
            # the first index of the largest value, as argmax: a later chunk only where strictly larger
            up = top > best
            arg = torch.where(up, where + start, arg)
            best = torch.where(up, top, best)
        m = new
    lse = m + torch.log(total)  # (2, N)
    kl = cross / total[0] - lse[0] + lse[1]
    agree = (arg[0] == arg[1]).to(torch.float32)
    return kl, agree, lse[1] - fz
