"""The logit lens: each layer's hidden state read out through the model's own final norm and LM head.

    lens ℓ = softmax(head(final_norm(h_ℓ)) / T)        ℓ = 1..L, h_ℓ the residual stream after ℓ layers

with the functions the model itself uses to turn its last hidden state into logits: the final norm module
(and OPT's `project_out` after it, where a model has one), the output embedding (`get_output_embeddings()`,
tied or not) and Gemma's final soft-capping (z = cap · tanh(z / cap)). At ℓ = L the lens is the model's own
output distribution: the stepper takes the model's logits there, so `lens_kl[L]` is `kl` by construction, and
`head(final_norm(h_L))` reproducing the model's logits is tested per family (tests/test_lens.py).

Cost. One matmul per model of its (B·(L−1), H) hidden states by the head, in the model's
dtype (a lower-precision lens would put its own noise into small divergences: bfloat16 changed `lens_kl` by up
to 30% on wanda:0.5 and 300% on int8 of the embedded model), then one log-softmax over (B, L, V) per model. On
the embedded model (V = 49,152, L = 30) that is about 1.7 GFLOP a step, ~0.3–0.4 of a pair's two decode
forwards on a 2-core CPU (bench/step_overhead.py states the measured ratio); on a GPU it is a small fraction.

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
from engine.run.metrics import _f


@dataclass
class LensHead:
    """The modules that turn a residual-stream state into logits: final norm(s), head, soft-capping."""

    norms: list  # applied in order (the final norm; OPT: and project_out)
    head: object  # the output embedding (a Linear)
    softcap: float | None

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of residual-stream states h (…, H), in the model's dtype."""
        for norm in self.norms:
            h = norm(h)
        z = self.head(h)
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


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
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    return LensHead(norms=norms, head=head, softcap=float(softcap) if softcap else None)


def lens_metrics(
    head: LensHead,
    h_d: torch.Tensor,
    h_p: torch.Tensor,
    z_d: torch.Tensor,
    z_p: torch.Tensor,
    temperature: float = 1.0,
    head_p: LensHead | None = None,
) -> dict[str, torch.Tensor]:
    """lens_kl, lens_top1_agree, lens_dense_final_kl, each (B, L), from the hidden states (B, L+1, H) of the
    stepper (ℓ = 0 embeddings, 1..L−1 the residual stream after ℓ layers, L the final normed state) and the
    models' logits (B, V), which are the lens at ℓ = L.

    `head_p`: the perturbed model's own head where it differs from the dense one (a checkpoint whose norm or
    head was changed); by default both lenses read through the dense model's head (the same tensors: a
    perturbation never touches the final norm or the head). A NaN hidden state (a dense layer without
    counterpart, engine.perturb.pair.mapped_hidden) gives NaN metrics there.
    """
    depth = h_d.shape[1] - 1  # L
    mid_d, mid_p = h_d[:, 1:depth], h_p[:, 1:depth]  # (B, L−1, H)
    # one matmul per model over all its layers, of the same shape for both: equal states give bitwise equal
    # lenses (stacking both models in one matmul did not: a row's rounding depends on where it sits, which put
    # ±1e-7 into lens_kl where the two models are identical)
    zm_d, zm_p = head.logits(mid_d), (head_p or head).logits(mid_p)
    # (B, L, V): the mid layers' lenses, then the models' own logits at ℓ = L
    lz_d = torch.cat([_f(zm_d), _f(z_d).unsqueeze(1)], dim=1) / temperature
    lz_p = torch.cat([_f(zm_p), _f(z_p).unsqueeze(1)], dim=1) / temperature
    logp_d = torch.log_softmax(lz_d, dim=-1)
    logp_p = torch.log_softmax(lz_p, dim=-1)
    p_d = logp_d.exp()
    final_d = logp_d[:, -1:, :]
    kl = (p_d * (logp_d - logp_p)).sum(-1)
    agree = (logp_d.argmax(-1) == logp_p.argmax(-1)).to(kl.dtype)
    return {
        "lens_kl": kl,
        # 1/0, NaN where the lens is not a number (to_host: null); the stepper records it as bools
        "lens_top1_agree": agree.masked_fill(kl.isnan(), float("nan")),
        "lens_dense_final_kl": (final_d.exp() * (final_d - logp_p)).sum(-1),
    }
