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


# ------------------------------------------------------------------ token ids read from files


def check_token_ids(ids, vocab_size: int, where: str, model: str | None = None) -> None:
    """The one check of token ids read from a file (a session, a kld base file, a cached calibration batch) before
    a model reads them: each must be a row of the model's input embedding, 0 ≤ id < `vocab_size` (the config's
    vocab_size, what embedding indexing needs; it may exceed the tokenizer's vocabulary). Else one HieruiError
    (exit 2) naming `where` (the file and the field, e.g. "s.jsonl: step 3: token_d"), the position of the first
    bad id and its value. `ids`: one id, a list of ids (None entries are skipped: a model that had ended) or an
    integer tensor; `model`: named in the message."""
    of = f"a token id of {model}" if model else "a token id of the model"
    expected = f"expected {of} (0 … {vocab_size - 1})"
    if hasattr(ids, "dtype") and hasattr(ids, "nonzero"):  # a tensor
        if ids.dtype.is_floating_point or ids.dtype.is_complex or str(ids.dtype) == "torch.bool":
            raise HieruiError(f"{where} holds {str(ids.dtype).removeprefix('torch.')} values, {expected}")
        bad = (ids < 0) | (ids >= vocab_size)
        if bool(bad.any()):
            position = [int(i) for i in bad.nonzero()[0]]
            index = "".join(f"[{i}]" for i in position)
            raise HieruiError(f"{where}{index} is {int(ids[tuple(position)])}, {expected}")
        return
    scalar = not isinstance(ids, (list, tuple))
    for i, value in enumerate([ids] if scalar else ids):
        if value is None:
            continue
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # as validate reads
        if isinstance(value, bool) or not whole or not 0 <= value < vocab_size:
            raise HieruiError(f"{where}{'' if scalar else f'[{i}]'} is {value!r}, {expected}")


def embedding_rows(name: str, config: dict | None = None) -> int | None:
    """How many token ids the model `name` embeds (the rows of its input embedding, which a token id indexes),
    known before its weights load: its config's vocab_size (which may exceed the tokenizer's vocabulary); a
    random: shape's is its tokenizer's size (engine.models.random_shapes resizes the vocabulary to it).
    `config`: the config when the caller has read it. None where the config is not known before loading."""
    from engine.models.configs import config_int, read_config
    from engine.models.names import resolve

    if resolve(name).kind == "random":
        from engine.models.random_shapes import random_tokenizer

        return len(random_tokenizer())
    return config_int(config if config is not None else read_config(name), "vocab_size")


def model_rows(model) -> int:
    """The rows of a loaded model's input embedding: the token ids it can read."""
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None)
    return int(rows if rows is not None else embedding.weight.shape[0])
