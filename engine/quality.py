"""Quick quality checks of a model: perplexity on a text and a few greedy tokens for a prompt."""

from __future__ import annotations

import math
from importlib import resources

DEFAULT_PROMPT = "What is the capital of France?"


def heldout_text() -> str:
    """A short text written for hierui (shipped in engine/data), used for perplexity."""
    return resources.files("engine").joinpath("data/heldout.txt").read_text(encoding="utf-8")


def prompt_ids(tokenizer, prompt: str, raw: bool = False):
    """Token ids (1 × n) for a prompt: the chat template for chat models unless `raw`."""
    import torch

    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
        return torch.tensor([ids], dtype=torch.long)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if tokenizer.bos_token_id is not None and (ids.numel() == 0 or ids[0, 0] != tokenizer.bos_token_id):
        ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
    return ids.long()


def perplexity(model, tokenizer, text: str, window: int = 512) -> float:
    """exp(mean next-token NLL) of `text`, scored in non-overlapping windows of `window` tokens."""
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if tokenizer.bos_token_id is not None:
        ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
    device = model.get_input_embeddings().weight.device
    total_nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start:start + window + 1].unsqueeze(0).to(device)
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk[:, :-1], use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total_nll += float(nll)
            count += chunk.shape[1] - 1
    return math.exp(total_nll / max(count, 1))


def greedy_tokens(model, tokenizer, ids, max_new_tokens: int = 24) -> list[int]:
    """Greedy continuation with a KV cache, stopping at end of sequence."""
    import torch

    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def eos_ids(tokenizer, model) -> set[int]:
    """Every end-of-sequence id: the tokenizer's and the generation config's (an int or a list)."""
    found: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(v for v in value if isinstance(v, int))
    return found
