"""Divergence of the perturbed model from the dense one at one generation step, in three spaces.

Pure tensor functions, computed on the models' device, batched over a leading dimension B:

    h_d, h_p   (B, L+1, H)  hidden states at the last position, ℓ = 0 token embeddings … L final normed state
    z_d, z_p   (B, V)       logits at the last position
    T                       temperature of the probability space, P = softmax(z / T)

Names are the contract of docs/design.md (sessions, batch tables and the UI use them). Every value of a
step is gathered into one tensor and moved to the host once (`to_host`).

Theory estimates (second order in the perturbation) shown beside the measurements:
    1 − cos(h, h + Δh) ≈ ‖Δh⊥‖² / (2‖h‖²)        → emb_cos_est = 1 − emb_perp² / 2
    KL(p ‖ p′)         ≈ Var_{i~p}(Δz_i) / (2T²)  → kl_est
    1 − cos(p, p′)     ≈ Var_{i~r}(Δz_i) / (2T²), r_i = p_i² / Σ_j p_j²  → prob_cos_est = 1 − that
They hold for small perturbations (Var(Δz)/T² ≪ 1, ‖Δh⊥‖/‖h‖ ≪ 1). A cosine estimate outside [−1, 1] means
nothing (the perturbation is too large for a second-order expansion): it is recorded as NaN (null on the
host) with its flag `emb_cos_est_oor` (per layer) / `prob_cos_est_oor` true; the flag is false where the
estimate is a value. `kl_est` is ≥ 0 by construction and has no flag.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-12


def _f(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 model outputs are upcast; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity as 1 − ‖â − b̂‖²/2: no cancellation when the vectors are nearly equal, and
    exactly 1 when they are equal (the plain dot-product form loses 1 − cos below ~1e-7 in float32)."""
    ua = a / a.norm(dim=-1, keepdim=True).clamp_min(EPS)
    ub = b / b.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return 1.0 - (ua - ub).square().sum(-1) / 2.0


def cos_estimate(est: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A second-order estimate of a cosine, and where it leaves [−1, 1]: (the estimate with NaN there, a bool
    flag that is true there). NaN in, NaN out, flag false."""
    oor = (est < -1.0) | (est > 1.0)
    return est.masked_fill(oor, float("nan")), oor


def embedding_metrics(h_d: torch.Tensor, h_p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer: emb_cos, emb_rel = ‖Δh‖/‖h‖, emb_perp = ‖Δh⊥‖/‖h‖, emb_cos_est (NaN outside [−1, 1]) and
    emb_cos_est_oor (bool: the estimate left [−1, 1], ‖Δh⊥‖/‖h‖ > 2). Each (B, L+1)."""
    h_d, h_p = _f(h_d), _f(h_p)
    delta = h_p - h_d
    norm_d = h_d.norm(dim=-1).clamp_min(EPS)
    along = (delta * h_d).sum(-1, keepdim=True) / (norm_d.unsqueeze(-1) ** 2)
    perp = (delta - along * h_d).norm(dim=-1) / norm_d
    est, oor = cos_estimate(1.0 - perp.square() / 2.0)
    return {
        "emb_cos": _cos(h_d, h_p),
        "emb_rel": delta.norm(dim=-1) / norm_d,
        "emb_perp": perp,
        "emb_cos_est": est,
        "emb_cos_est_oor": oor,
    }


def logit_metrics(z_d: torch.Tensor, z_p: torch.Tensor) -> dict[str, torch.Tensor]:
    """logit_cos and logit_rel = ‖Δz‖/‖z‖, each (B,)."""
    z_d, z_p = _f(z_d), _f(z_p)
    return {"logit_cos": _cos(z_d, z_p), "logit_rel": (z_p - z_d).norm(dim=-1) / z_d.norm(dim=-1).clamp_min(EPS)}


def _weighted_var(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    mean = (weights * x).sum(-1, keepdim=True)
    return (weights * (x - mean).square()).sum(-1)


def probability_metrics(
    z_d: torch.Tensor, z_p: torch.Tensor, temperature: float = 1.0, k: int = 5
) -> dict[str, torch.Tensor]:
    """KL, JS, TV, cosines with their theory estimates, top-1/top-k agreement, dp and rank_shift. (B,) each.
    `prob_cos_est` is NaN where it leaves [−1, 1], flagged by `prob_cos_est_oor` (bool).

    Also returns the top-k lists (`topk_d_ids`, `topk_d_probs`, `topk_p_ids`, `topk_p_probs`, (B, k)) and
    the log-probabilities (`logp_d`, `logp_p`, (B, V)) for the caller's NLL.
    """
    z_d, z_p = _f(z_d), _f(z_p)
    logp_d = torch.log_softmax(z_d / temperature, dim=-1)
    logp_p = torch.log_softmax(z_p / temperature, dim=-1)
    p_d, p_p = logp_d.exp(), logp_p.exp()
    # log of the mixture m = (p_d + p_p)/2; exactly log p where the two agree, so identical distributions give a
    # JS of exactly 0 (logaddexp(a, a) − log 2 is not always a in floating point)
    log_m = torch.where(logp_d == logp_p, logp_d, torch.logaddexp(logp_d, logp_p) - math.log(2.0))
    dz = z_p - z_d
    r = p_d.square() / p_d.square().sum(-1, keepdim=True)
    top_d = p_d.argmax(-1, keepdim=True)
    k = min(k, z_d.shape[-1])
    best_d, best_p = torch.topk(p_d, k, dim=-1), torch.topk(p_p, k, dim=-1)
    ids_d, ids_p = best_d.indices, best_p.indices
    p_p_at_t = p_p.gather(-1, top_d)
    prob_cos_est, prob_cos_est_oor = cos_estimate(1.0 - _weighted_var(r, dz) / (2 * temperature**2))
    return {
        "kl": (p_d * (logp_d - logp_p)).sum(-1),
        "kl_est": _weighted_var(p_d, dz) / (2 * temperature**2),
        "prob_cos": _cos(p_d, p_p),
        "prob_cos_est": prob_cos_est,
        "prob_cos_est_oor": prob_cos_est_oor,
        "js": 0.5 * (p_d * (logp_d - log_m)).sum(-1) + 0.5 * (p_p * (logp_p - log_m)).sum(-1),
        "tv": 0.5 * (p_d - p_p).abs().sum(-1),
        "top1_agree": (top_d.squeeze(-1) == p_p.argmax(-1)).float(),
        "topk_overlap": (ids_d.unsqueeze(-1) == ids_p.unsqueeze(-2)).any(-1).float().mean(-1),
        "dp": (p_p_at_t - p_d.gather(-1, top_d)).squeeze(-1),
        "rank_shift": (p_p > p_p_at_t).sum(-1).float(),  # 0: the dense top token is still first
        "topk_d_ids": ids_d,
        "topk_d_probs": best_d.values,
        "topk_p_ids": ids_p,
        "topk_p_probs": best_p.values,
        "logp_d": logp_d,
        "logp_p": logp_p,
    }


def amplification(prob_cos: torch.Tensor, logit_cos: torch.Tensor) -> torch.Tensor:
    """amp = (1 − prob_cos) / (1 − logit_cos); NaN where the logits are identical (recorded as null)."""
    num = 1.0 - prob_cos
    den = 1.0 - logit_cos
    return torch.where(den > 0, num / den.clamp_min(EPS), torch.full_like(num, float("nan")))


def subspace_metrics(
    z_d: torch.Tensor,
    z_p: torch.Tensor,
    choice_ids: torch.Tensor,
    temperature: float = 1.0,
    choice_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The categorical subspace: both distributions renormalised over the candidate tokens.

    `choice_ids`: (C,) for every row, or (B, C) per row with `choice_mask` (B, C) marking the real ones
    (padded entries get probability 0 and add nothing).
    """
    ids = choice_ids.expand(z_d.shape[0], -1) if choice_ids.dim() == 1 else choice_ids
    zc_d, zc_p = _f(z_d).gather(-1, ids) / temperature, _f(z_p).gather(-1, ids) / temperature
    if choice_mask is not None:
        zc_d = zc_d.masked_fill(~choice_mask, float("-inf"))
        zc_p = zc_p.masked_fill(~choice_mask, float("-inf"))
    lq_d, lq_p = torch.log_softmax(zc_d, dim=-1), torch.log_softmax(zc_p, dim=-1)
    q_d, q_p = lq_d.exp(), lq_p.exp()
    terms = q_d * (lq_d - lq_p)
    if choice_mask is not None:
        terms = terms.masked_fill(~choice_mask, 0.0)
    return {
        "sub_p_d": q_d,
        "sub_p_p": q_p,
        "sub_kl": terms.sum(-1),
        "sub_cos": _cos(q_d, q_p),
        "sub_agree": (q_d.argmax(-1) == q_p.argmax(-1)).float(),
    }


def step_metrics(
    h_d,
    h_p,
    z_d,
    z_p,
    fed_d,
    fed_p,
    temperature: float = 1.0,
    k: int = 5,
    choice_ids: torch.Tensor | None = None,
    choice_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every per-step metric of the design's table (accumulated ones excepted), still on the device.

    `fed_d`, `fed_p` (B,): the tokens each model is fed next (equal in shared mode), for nll_d / nll_p.
    Top-k lists come as `topk_d_ids`, `topk_d_probs`, `topk_p_ids`, `topk_p_probs` (B, k).
    """
    out: dict[str, torch.Tensor] = {}
    out.update(embedding_metrics(h_d, h_p))
    out.update(logit_metrics(z_d, z_p))
    prob = probability_metrics(z_d, z_p, temperature, k)
    logp_d, logp_p = prob.pop("logp_d"), prob.pop("logp_p")
    out.update(prob)
    out["amp"] = amplification(out["prob_cos"], out["logit_cos"])
    out["nll_d"] = -logp_d.gather(-1, fed_d.view(-1, 1)).squeeze(-1)
    out["nll_p"] = -logp_p.gather(-1, fed_p.view(-1, 1)).squeeze(-1)
    if choice_ids is not None and choice_ids.numel() > 0:
        out.update(subspace_metrics(z_d, z_p, choice_ids, temperature, choice_mask))
    return out


def margin(z_d: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """margin_d: the dense top-1 minus top-2 probability at T, (B,) (1 for a one-token vocabulary)."""
    p = torch.softmax(_f(z_d) / temperature, dim=-1)
    if p.shape[-1] < 2:
        return torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
    top = torch.topk(p, 2, dim=-1).values
    return top[:, 0] - top[:, 1]


def to_host(metrics: dict[str, torch.Tensor]) -> list[dict[str, object]]:
    """One device→host transfer for all of a step's metrics; a dict of Python values per batch row.

    Scalars become floats (NaN → None), per-layer and per-choice vectors lists, *_ids lists of ints, bool
    tensors (the *_oor flags) bools or lists of bools.
    """
    names = list(metrics)
    batch = next(iter(metrics.values())).shape[0]
    flat = torch.cat([metrics[n].reshape(batch, -1).to(torch.float64) for n in names], dim=1).cpu()
    widths = [metrics[n].reshape(batch, -1).shape[1] for n in names]
    vectors = {n for n in names if metrics[n].dim() > 1}
    bools = {n for n in names if metrics[n].dtype == torch.bool}
    rows = []
    for row in flat.tolist():
        record: dict[str, object] = {}
        pos = 0
        for name, width in zip(names, widths):
            values = row[pos : pos + width]
            pos += width
            if name.endswith("_ids"):
                record[name] = [int(v) for v in values]
            elif name in bools:
                record[name] = [bool(v) for v in values] if name in vectors else bool(values[0])
            elif name in vectors:
                record[name] = [None if math.isnan(v) else v for v in values]
            else:
                record[name] = None if math.isnan(values[0]) else values[0]
        rows.append(record)
    return rows
