"""Token ids and token text: a prompt's ids, end-of-sequence ids, the choices' token ids, a token's text in context.

Prompt convention (as lm-eval-harness and llama.cpp): a chat model's prompt goes through its chat template
unless `raw`; a raw prompt is tokenized with the tokenizer's own special-token convention
(`add_special_tokens=True`), so a BOS is added only where the tokenizer is configured to add one
(SmolLM2's is not; Llama's is). Sessions record the resulting `prompt_ids`.
"""

from __future__ import annotations

from engine.errors import HieruiError


def prompt_ids(tokenizer, prompt: str, raw: bool = False) -> list[int]:
    """The token ids both models are fed first: the chat template for chat models unless `raw`."""
    if not raw and getattr(tokenizer, "chat_template", None):
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def text_ids(tokenizer, text: str) -> list[int]:
    """A plain text's ids with the tokenizer's own special tokens (what perplexity scores)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def eos_ids(tokenizer, model) -> set[int]:
    """Every end-of-sequence id: the tokenizer's and the generation config's (an int or a list)."""
    found: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(v for v in value if isinstance(v, int))
    return found


def choice_token_ids(tokenizer, choices) -> tuple[list[int], list[str]]:
    """The first token of each choice (the categorical subspace), and a note for each multi-token choice."""
    ids, notes = [], []
    for choice in choices:
        toks = tokenizer(choice, add_special_tokens=False)["input_ids"]
        if not toks:
            raise HieruiError(f"choice {choice!r} is empty after tokenization")
        if len(toks) > 1:
            notes.append(f"choice {choice!r} is {len(toks)} tokens; its first token stands for it")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise HieruiError(f"choices {list(choices)} do not start with distinct tokens")
    return ids, notes


def piece(tokenizer, context: list[int], token: int) -> str:
    """The text `token` adds after `context`, decoded in context: a character split over several tokens
    (an emoji in byte-level BPE) comes out whole with the token that completes it, "" before that."""
    tail = context[-16:]  # enough context to place the boundary
    before = tokenizer.decode(tail).rstrip("\ufffd")
    after = tokenizer.decode(tail + [token]).rstrip("\ufffd")
    if after.startswith(before):
        return after[len(before) :]
    return tokenizer.decode([token])
