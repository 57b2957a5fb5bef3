"""Multiple-choice scoring: the categorical subspace, read the way multiple-choice evaluations read it.

An item is a prompt and candidate continuations (`choices`), one of them the `answer`. Each choice is
scored cloze-style by the sum of the log-probabilities of its tokens after the prompt (plain text, no chat
template): the prompt followed by every choice is one batch of C rows, one forward pass per model. The
subspace distribution is the softmax of those scores (for single-token choices: the full next-token
distribution renormalised over the choice tokens). Beside it, the full-vocabulary metrics at the position
after the prompt (KL, TV, cosines): what generation reads at the same place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import HieruiError
from engine.perturb.pair import mapped_hidden
from engine.run import metrics as M


@dataclass
class ChoiceItem:
    id: str
    prompt: str
    choices: list[str]
    answer: int
    topic: str | None = None


@torch.no_grad()
def _choice_logprobs(
    model, rows: torch.Tensor, mask: torch.Tensor, n_prompt: int, choice_ids: list[list[int]], temperature: float
):
    """Σ log p(choice tokens | prompt) per row, plus the last-prompt-position logits and hidden states."""
    device = model.get_input_embeddings().weight.device
    out = model(input_ids=rows.to(device), attention_mask=mask.to(device), use_cache=False, output_hidden_states=True)
    logp = torch.log_softmax(out.logits.float() / temperature, dim=-1)
    scores = []
    for r, ids in enumerate(choice_ids):
        positions = torch.arange(n_prompt - 1, n_prompt - 1 + len(ids), device=logp.device)
        scores.append(logp[r, positions, torch.tensor(ids, device=logp.device)].sum())
    at = n_prompt - 1  # the position after the prompt: identical in every row
    hidden = torch.stack([h[:1, at, :].to(logp.device) for h in out.hidden_states], dim=1)
    return torch.stack(scores), out.logits[:1, at, :], hidden


def item_token_ids(tokenizer, item_id: str, prompt: str, choices: list[str]) -> tuple[list[int], list[list[int]]]:
    """An item's prompt ids (plain text, the tokenizer's own special tokens) and each choice's ids; an empty
    one is a HieruiError. A sweep calls it for every item before it starts, scoring again per item."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    if not prompt_ids:
        raise HieruiError(f"item {item_id}: the prompt is empty after tokenization")
    choice_ids = []
    for choice in choices:
        ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
        if not ids:
            raise HieruiError(f"item {item_id}: choice {choice!r} is empty after tokenization")
        choice_ids.append(ids)
    return prompt_ids, choice_ids


def score_item(pair, item: ChoiceItem, temperature: float = 1.0) -> dict:
    """Both models' scores for one item: subspace distributions, predictions, correctness and divergences."""
    tok = pair.tokenizer
    prompt, choice_ids = item_token_ids(tok, item.id, item.prompt, item.choices)
    width = len(prompt) + max(len(c) for c in choice_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = torch.full((len(choice_ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(rows)
    for r, ids in enumerate(choice_ids):  # right padding: every row starts with the same prompt
        seq = prompt + ids
        rows[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
    s_d, z_d, h_d = _choice_logprobs(pair.dense, rows, mask, len(prompt), choice_ids, temperature)
    s_p, z_p, h_p = _choice_logprobs(pair.perturbed, rows, mask, len(prompt), choice_ids, temperature)
    h_p = mapped_hidden(h_d, h_p, torch.tensor(pair.hidden_map, device=h_p.device))
    # the choice scores play the logits of a C-way subspace (already at temperature T)
    every = torch.arange(len(choice_ids), device=s_d.device)
    sub = M.to_host(M.subspace_metrics(s_d.unsqueeze(0), s_p.unsqueeze(0), every))[0]
    top = torch.zeros(1, dtype=torch.long, device=z_d.device)
    full = M.to_host(M.step_metrics(h_d, h_p, z_d, z_p, top, top, temperature=temperature))[0]
    pred_d = max(range(len(choice_ids)), key=lambda c: sub["sub_p_d"][c])
    pred_p = max(range(len(choice_ids)), key=lambda c: sub["sub_p_p"][c])
    return {
        "item_id": item.id,
        "topic": item.topic,
        "prompt": item.prompt,
        "choices": item.choices,
        "answer": item.answer,
        "score_d": s_d.tolist(),
        "score_p": s_p.tolist(),
        "sub_p_d": sub["sub_p_d"],
        "sub_p_p": sub["sub_p_p"],
        "pred_d": pred_d,
        "pred_p": pred_p,
        "correct_d": pred_d == item.answer,
        "correct_p": pred_p == item.answer,
        "agree": pred_d == pred_p,
        "sub_kl": sub["sub_kl"],
        "sub_cos": sub["sub_cos"],
        "kl": full["kl"],
        "tv": full["tv"],
        "logit_cos": full["logit_cos"],
        "prob_cos": full["prob_cos"],
        "emb_cos_final": full["emb_cos"][-1],
    }


def summarize_items(rows: list[dict]) -> dict:
    """Accuracy of both models, how often they pick the same choice, and subspace vs full-vocabulary KL."""
    from engine.record.summary import mean

    n = len(rows)
    out = {"items": n}
    if not n:
        return out
    out["acc_d"] = sum(r["correct_d"] for r in rows) / n
    out["acc_p"] = sum(r["correct_p"] for r in rows) / n
    out["agree_rate"] = sum(r["agree"] for r in rows) / n
    out["sub_kl_mean"] = mean(r["sub_kl"] for r in rows)
    out["kl_mean"] = mean(r["kl"] for r in rows)
    out["tv_mean"] = mean(r["tv"] for r in rows)
    return out
