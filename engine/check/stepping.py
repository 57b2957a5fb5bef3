"""How the checks step a pair and look inside: the prompts and settings every check steps, the forward passes a
(Batch)Stepper made (caught by a spy), and the reference passes without hierui code (a full pass, transformers'
own incremental decoding).

Every run steps exactly `steps` tokens (no stop at end-of-sequence: the checks compare numbers, and a run that
ended at its first token would compare none).
"""

from __future__ import annotations

import math

import torch

from engine.errors import HieruiError
from engine.record.settings import StepSettings

TEMPERATURE = 1.0
TOPK = 5
# raw prompts (no chat template) of clearly different lengths in any tokenizer, and per prompt its choices:
# two, three, and none, so the batched subspace metrics see rows of different widths
PROMPTS = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The capital of France is",
    "Hi",
)
CHOICES = (("A", "B"), ("yes", "no", "maybe"), None)


def step_settings(mode: str, steps: int, choices) -> StepSettings:
    return StepSettings(
        mode=mode,
        temperature=TEMPERATURE,
        max_new_tokens=steps,
        choices=list(choices) if choices else None,
        raw=True,
        topk=TOPK,
    ).validate()


def spy_forwards(batch, pair) -> dict[int, list]:
    """Record what each model's forward passes return inside a (Batch)Stepper: {id(model): [(hidden, logits)]}."""
    calls: dict[int, list] = {id(pair.dense): [], id(pair.perturbed): []}
    original = batch._forward

    def spy(model, ids, cache, **kwargs):
        hidden, logits = original(model, ids, cache, **kwargs)
        calls.setdefault(id(model), []).append((hidden.detach(), logits.detach()))
        return hidden, logits

    batch._forward = spy
    return calls


def _chunks(prompt_len: int) -> int:
    from engine.run.stepper import PREFILL_CHUNK

    return max(1, math.ceil(prompt_len / PREFILL_CHUNK))


def step_outputs(calls: list, prompt_len: int, n_steps: int, row: int = 0) -> list[tuple]:
    """The (hidden (L+1, H), logits (V,)) each step was computed from: the last prefill pass, then one pass per
    step (none after the last step)."""
    first = _chunks(prompt_len) - 1
    if len(calls) < first + n_steps:
        raise HieruiError(f"the stepper made {len(calls)} forward passes for {n_steps} steps", 1)
    return [(calls[first + i][0][row], calls[first + i][1][row]) for i in range(n_steps)]


@torch.no_grad()
def full_pass(model, ids: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over `ids` without a cache: hidden states (T, L+1, H) and logits (T, V)."""
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=False, output_hidden_states=True)
    logits = out.logits[0]
    hidden = torch.stack([h[0].to(logits.device) for h in out.hidden_states], dim=1)
    return hidden, logits


def incremental_pass(
    model, prompt: list[int], fed: list[int], device, rows: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own incremental decoding, no hierui code: the prompt in one call through a fresh
    DynamicCache, then each fed token alone. The hidden states (n, L+1, H) and logits (n, V) at the last
    position of each call, n = len(fed) + 1 (of the first row, with `rows` identical rows in the batch)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    hidden, logits = [], []
    with torch.no_grad():
        for ids in [prompt] + [[t] for t in fed]:
            out = model(
                input_ids=torch.tensor([ids] * rows, device=device),
                cache=cache,
                use_cache=True,
                output_hidden_states=True,
            )
            logits.append(out.logits[0, -1])
            hidden.append(torch.stack([h[0, -1].to(out.logits.device) for h in out.hidden_states]))
    return torch.stack(hidden), torch.stack(logits)


def stepped_alone(pair, index: int, steps: int, runs: dict | None) -> tuple:
    """(stepper, records, forward-pass outputs) of PROMPTS[index] stepped alone in shared mode; kept in `runs`
    (one dict per pair), so the cache and the batch checks step it once."""
    from engine.run.stepper import Stepper

    runs = {} if runs is None else runs
    if (index, steps) not in runs:
        stepper = Stepper(pair, PROMPTS[index], step_settings("shared", steps, CHOICES[index]))
        stepper.batch.eos = set()  # to the step limit (engine.run.stepper: an empty set never ends a run)
        calls = spy_forwards(stepper.batch, pair)
        runs[index, steps] = (stepper, stepper.run(), calls)
    return runs[index, steps]
