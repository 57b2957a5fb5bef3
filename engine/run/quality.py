"""Quick quality checks of a model: perplexity on a text and a few greedy tokens for a prompt."""

from __future__ import annotations

import math
from importlib import resources


def heldout_text() -> str:
    """A short text written for hierui (shipped in engine/data), used for perplexity."""
    return resources.files("engine").joinpath("data/heldout.txt").read_text(encoding="utf-8")


def perplexity(model, tokenizer, text: str, window: int = 512) -> float:
    """exp(mean next-token NLL) of `text`, scored in non-overlapping windows of `window` tokens."""
    import torch

    from engine.models.tokens import text_ids

    ids = torch.tensor(text_ids(tokenizer, text), dtype=torch.long)  # the tokenizer's own BOS convention
    device = model.get_input_embeddings().weight.device
    total_nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start : start + window + 1].unsqueeze(0).to(device)
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk[:, :-1], use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total_nll += float(nll)
            count += chunk.shape[1] - 1
    return math.exp(total_nll / max(count, 1))


def greedy_tokens(model, tokenizer, prompt_ids: list[int], max_new_tokens: int = 24) -> list[int]:
    """Greedy continuation with a KV cache, stopping at end of sequence."""
    import torch

    ids = torch.tensor([prompt_ids], dtype=torch.long)
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist()
