"""One window of a corpus KLD on the device: the logits (and hidden states) of a model over the window, the
per-token metrics of two logit blocks, and the hidden-state cosines of the dense and perturbed models."""

from __future__ import annotations


def window_logits(model, ids, keep: int, hidden: bool = True):
    """The float32 logits at the window's last `keep` positions (1, keep, V), and the hidden states (a tuple)
    when `hidden`; logits_to_keep where the model takes it, so the first half's logits are never built."""
    import inspect

    import torch

    params = inspect.signature(model.forward).parameters
    with torch.no_grad():
        if "logits_to_keep" in params:
            out = model(input_ids=ids, use_cache=False, logits_to_keep=keep, output_hidden_states=hidden)
        else:
            out = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    return out.logits[:, -keep:].float(), out.hidden_states


def token_metrics(logits_d, logits_p, targets) -> dict:
    """Per-token metrics of two (m, V) float32 logit blocks and the (m,) actual next tokens, on the device."""
    import torch

    lp_d = torch.log_softmax(logits_d, dim=-1)
    lp_p = torch.log_softmax(logits_p, dim=-1)
    p_d, p_p = lp_d.exp(), lp_p.exp()
    diff = lp_d - lp_p
    nll_d = -lp_d.gather(-1, targets[:, None])[:, 0]
    nll_p = -lp_p.gather(-1, targets[:, None])[:, 0]
    conf_d, top_d = p_d.max(dim=-1)
    return {
        "kl": (p_d * diff).sum(-1),
        "kl_rev": -(p_p * diff).sum(-1),
        "same_top": top_d == lp_p.argmax(dim=-1),
        "dp": nll_p.neg().exp() - nll_d.neg().exp(),
        "nll_d": nll_d,
        "nll_p": nll_p,
        "conf_d": conf_d,
        "top_d": top_d,
        "top_p": lp_p.argmax(dim=-1),
    }


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
