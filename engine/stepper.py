"""Lockstep stepping of a ModelPair: one token at a time, each model with its own KV cache.

Step i compares the two next-token distributions after the prompt and i generated tokens, then feeds:
  - `shared` (teacher-forced): both models get the dense model's choice;
  - `free`: each model gets its own choice, so their texts can split.
Choices are greedy, or with `sample=True` drawn by an exponential race whose noise is drawn once per
step from one seeded generator and used by both models (identical sampling streams).

A step record holds `step`, `token_d`/`token_p` (each model's own choice at this step), `text_d`/`text_p`,
`fed` (what each was fed), every metric of engine.metrics, and the accumulated ones: `cum_kl`,
`cum_nll_gap` (Σ nll_p − nll_d), `same_token`, and in free mode `first_divergence`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from engine import metrics as M
from engine.errors import HieruiError
from engine.quality import prompt_ids

MODES = ("shared", "free")


@dataclass
class StepSettings:
    mode: str = "shared"
    temperature: float = 1.0
    max_new_tokens: int = 64
    sample: bool = False
    seed: int = 0
    choices: list[str] | None = None
    raw: bool = False
    topk: int = 5

    def validate(self) -> "StepSettings":
        if self.mode not in MODES:
            raise HieruiError(f"unknown mode '{self.mode}': use shared or free")
        if not self.temperature > 0:
            raise HieruiError(f"temperature must be > 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise HieruiError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.topk < 1:
            raise HieruiError(f"top-k must be at least 1, got {self.topk}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def choice_token_ids(tokenizer, choices: list[str]) -> tuple[list[int], list[str]]:
    """The first token of each choice (the categorical subspace), and notes on multi-token choices."""
    ids, notes = [], []
    for choice in choices:
        toks = tokenizer(choice, add_special_tokens=False)["input_ids"]
        if not toks:
            raise HieruiError(f"choice {choice!r} is empty after tokenization")
        if len(toks) > 1:
            notes.append(f"choice {choice!r} is {len(toks)} tokens; its first token stands for it")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise HieruiError(f"choices {choices} do not start with distinct tokens")
    return ids, notes


def eos_ids(tokenizer, model) -> set[int]:
    found: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(v for v in value if isinstance(v, int))
    return found


def hidden_state_map(pair) -> list[int]:
    """For each dense hidden-state index ℓ = 0..L, the perturbed model's index that corresponds to it.

    The identity, except after blockdrop: there the perturbed state after dense layer ℓ is the one after
    the last kept layer before it.
    """
    n_dense = pair.dense.config.num_hidden_layers
    details = pair.report.details if pair.report is not None else {}
    if details.get("kind") != "block":
        return list(range(n_dense + 1))
    dropped = set(details["dropped"])
    mapping, kept = [0], 0
    for layer in range(n_dense):
        kept += layer not in dropped
        mapping.append(kept)
    return mapping


class Stepper:
    """Steps a pair in lockstep from a prompt. `step()` returns one record, or None when finished."""

    def __init__(self, pair, prompt: str, settings: StepSettings | None = None):
        self.pair = pair
        self.tokenizer = pair.tokenizer
        self.settings = (settings or StepSettings()).validate()
        self.prompt = prompt
        self.prompt_ids = prompt_ids(self.tokenizer, prompt, raw=self.settings.raw)
        self.device = pair.dense.get_input_embeddings().weight.device
        self.choice_ids: list[int] = []
        self.notes: list[str] = []
        if self.settings.choices:
            self.choice_ids, self.notes = choice_token_ids(self.tokenizer, self.settings.choices)
        self._choice_tensor = torch.tensor(self.choice_ids, dtype=torch.long) if self.choice_ids else None
        self._eos = eos_ids(self.tokenizer, pair.dense)
        self._map = torch.tensor(hidden_state_map(pair), dtype=torch.long)
        self.records: list[dict] = []
        self.finished = False
        self._generator: torch.Generator | None = None
        self._state = None  # (hidden_d, logits_d, hidden_p, logits_p) for the next step
        self._caches = None
        self._cum = {"kl": 0.0, "nll_gap": 0.0, "first_divergence": None}
        self._fed: tuple[list[int], list[int]] = ([], [])  # generated tokens each model was fed
        self.seconds = 0.0

    # ------------------------------------------------------------ forward passes

    def _new_cache(self, model):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    @torch.no_grad()
    def _forward(self, model, ids: torch.Tensor, cache):
        out = model(input_ids=ids.to(self.device), cache=cache, use_cache=True, output_hidden_states=True)
        logits = out.logits[:, -1, :]
        hidden = torch.stack([h[:, -1, :].to(logits.device) for h in out.hidden_states], dim=1)
        return hidden, logits

    def _prefill(self) -> None:
        d, p = self.pair.dense, self.pair.perturbed
        self._caches = (self._new_cache(d), self._new_cache(p))
        hd, zd = self._forward(d, self.prompt_ids, self._caches[0])
        hp, zp = self._forward(p, self.prompt_ids, self._caches[1])
        self._state = (hd, zd, hp, zp)
        if self.settings.sample:
            self._generator = torch.Generator(device=zd.device).manual_seed(self.settings.seed)
        if self._choice_tensor is not None:
            self._choice_tensor = self._choice_tensor.to(zd.device)
        self._map = self._map.to(hp.device)

    # ------------------------------------------------------------ one step

    def _choose(self, z_d: torch.Tensor, z_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.settings.sample:
            return z_d.argmax(-1), z_p.argmax(-1)
        t = self.settings.temperature
        noise = torch.empty(z_d.shape, device=z_d.device).exponential_(generator=self._generator)
        pick = lambda z: (torch.softmax(z.float() / t, dim=-1) / noise).argmax(-1)  # noqa: E731
        return pick(z_d), pick(z_p)

    @torch.no_grad()
    def step(self) -> dict | None:
        if self.finished:
            return None
        started = time.perf_counter()
        if self._state is None:
            self._prefill()
        hd, zd, hp, zp = self._state
        s = self.settings
        tok_d, tok_p = self._choose(zd, zp)
        fed_p = tok_d if s.mode == "shared" else tok_p
        values = M.step_metrics(hd, hp.index_select(1, self._map), zd, zp, tok_d, fed_p,
                                temperature=s.temperature, k=s.topk, choice_ids=self._choice_tensor)
        values["token_d"] = tok_d.float()
        values["token_p"] = tok_p.float()
        row = M.to_host(values)[0]
        record = self._record(row)
        self.records.append(record)

        i = record["step"]
        ended_d = record["token_d"] in self._eos
        ended_p = record["token_p"] in self._eos
        ended = ended_d if s.mode == "shared" else (ended_d or ended_p)
        if ended or i + 1 >= s.max_new_tokens:
            self.finished = True
            self._state = None
            self._caches = None
        else:
            d, p = self.pair.dense, self.pair.perturbed
            hd, zd = self._forward(d, tok_d.view(1, 1), self._caches[0])
            hp, zp = self._forward(p, fed_p.view(1, 1), self._caches[1])
            self._state = (hd, zd, hp, zp)
        self.seconds += time.perf_counter() - started
        return record

    def _record(self, row: dict) -> dict:
        tok = self.tokenizer
        s = self.settings
        i = len(self.records)
        token_d, token_p = int(row.pop("token_d")), int(row.pop("token_p"))
        fed_p = token_d if s.mode == "shared" else token_p
        self._cum["kl"] += row["kl"]
        self._cum["nll_gap"] += row["nll_p"] - row["nll_d"]
        if token_d != token_p and self._cum["first_divergence"] is None:
            self._cum["first_divergence"] = i
        record = {"step": i, "token_d": token_d, "token_p": token_p,
                  "text_d": self._piece(self._fed[0], token_d), "text_p": self._piece(self._fed[1], token_p),
                  "fed": [token_d, fed_p]}
        self._fed[0].append(token_d)
        self._fed[1].append(fed_p)
        for name in ("d", "p"):
            ids, probs = row.pop(f"topk_{name}_ids"), row.pop(f"topk_{name}_probs")
            record[f"topk_{name}"] = [[t, tok.decode([t]), p] for t, p in zip(ids, probs)]
        record.update(row)
        record["cum_kl"] = self._cum["kl"]
        record["cum_nll_gap"] = self._cum["nll_gap"]
        record["same_token"] = token_d == token_p
        if s.mode == "free":
            record["first_divergence"] = self._cum["first_divergence"]
        return record

    def _piece(self, context: list[int], token: int) -> str:
        """The text `token` adds after `context`, decoded in context: a character split over several tokens
        (an emoji in byte-level BPE) comes out whole with the token that completes it, "" before that."""
        tail = context[-16:]  # enough context to place the boundary
        before = self.tokenizer.decode(tail).rstrip("\ufffd")
        after = self.tokenizer.decode(tail + [token]).rstrip("\ufffd")
        if after.startswith(before):
            return after[len(before):]
        return self.tokenizer.decode([token])

    def run(self, callback=None) -> list[dict]:
        """Step to the end; `callback(record)` after each step."""
        while not self.finished:
            record = self.step()
            if record is not None and callback:
                callback(record)
        return self.records

    # ------------------------------------------------------------ describing the run

    def header(self) -> dict:
        """The session header fields of shared/design.md (the writer adds format, version, created)."""
        pair = self.pair
        report = pair.report
        loaded = pair.loaded
        perturbation = {"spec": str(pair.spec)}
        if report is not None:
            perturbation.update(measured_sparsity=report.measured_sparsity, dense_sparsity=report.dense_sparsity,
                                details={k: v for k, v in report.details.items()})
        model = loaded.ref.name if loaded is not None else getattr(pair.dense.config, "name_or_path", "")
        return {
            "model": model,
            "model_display": loaded.ref.display if loaded is not None else model,
            "perturbation": perturbation,
            "calibration": report.calibration if report is not None else None,
            "prompt": self.prompt,
            "prompt_tokens": self.prompt_ids.shape[1],
            "mode": self.settings.mode,
            "temperature": self.settings.temperature,
            "choices": self.settings.choices,
            "choice_ids": self.choice_ids or None,
            "seed": self.settings.seed,
            "sample": self.settings.sample,
            "max_new_tokens": self.settings.max_new_tokens,
            "raw": self.settings.raw,
            "topk": self.settings.topk,
            "layers": pair.dense.config.num_hidden_layers,
            "device": str(self.device),
            "dtype": str(pair.dense.get_input_embeddings().weight.dtype).removeprefix("torch."),
        }
