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
from engine.quality import eos_ids, prompt_ids

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


@dataclass
class _Row:
    """One prompt of a batch: its ids, choices and what it has recorded so far."""

    prompt: str
    ids: list[int]
    choices: list[str] | None
    choice_ids: list[int]
    notes: list[str]
    records: list[dict] = field(default_factory=list)
    finished: bool = False
    cum_kl: float = 0.0
    cum_nll_gap: float = 0.0
    first_divergence: int | None = None
    fed: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))  # generated tokens each model got


class BatchStepper:
    """Steps a pair in lockstep over B prompts at once (left padding, attention masks, per-row positions).

    `step()` returns a record per row, None for rows already finished (end of sequence or the token limit).
    Each row's records equal (to float tolerance) those of stepping its prompt alone. `choices` gives each
    row its own candidate tokens (default: `settings.choices` for every row).
    """

    def __init__(self, pair, prompts: list[str], settings: StepSettings | None = None,
                 choices: list[list[str] | None] | None = None):
        if not prompts:
            raise HieruiError("no prompts to step")
        self.pair = pair
        self.tokenizer = pair.tokenizer
        self.settings = (settings or StepSettings()).validate()
        self.device = pair.dense.get_input_embeddings().weight.device
        per_row = choices if choices is not None else [self.settings.choices] * len(prompts)
        if len(per_row) != len(prompts):
            raise HieruiError("one list of choices per prompt, or none")
        self.rows: list[_Row] = []
        for prompt, row_choices in zip(prompts, per_row):
            ids = prompt_ids(self.tokenizer, prompt, raw=self.settings.raw)[0].tolist()
            cids, notes = choice_token_ids(self.tokenizer, row_choices) if row_choices else ([], [])
            self.rows.append(_Row(prompt, ids, list(row_choices) if row_choices else None, cids, notes))
        self._eos = eos_ids(self.tokenizer, pair.dense)
        self._map = torch.tensor(hidden_state_map(pair), dtype=torch.long)
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._state = None  # (hidden_d, logits_d, hidden_p, logits_p) for the next step
        self._caches = None
        self._mask = None  # (B, T) attention mask over everything fed so far, or None for one row
        self._next_pos = None
        self._generators: list[torch.Generator] = []
        self._choices = None  # (ids (B, C), mask (B, C)) on the device
        self.steps_taken = 0
        self.seconds = 0.0

    @property
    def finished(self) -> bool:
        return all(row.finished for row in self.rows)

    # ------------------------------------------------------------ forward passes

    def _new_cache(self, model):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    @torch.no_grad()
    def _forward(self, model, ids: torch.Tensor, cache, **kwargs):
        out = model(input_ids=ids.to(self.device), cache=cache, use_cache=True, output_hidden_states=True, **kwargs)
        logits = out.logits[:, -1, :]
        hidden = torch.stack([h[:, -1, :].to(logits.device) for h in out.hidden_states], dim=1)
        return hidden, logits

    def _both(self, ids_d: torch.Tensor, ids_p: torch.Tensor, extra: dict) -> None:
        hd, zd = self._forward(self.pair.dense, ids_d, self._caches[0], **extra)
        hp, zp = self._forward(self.pair.perturbed, ids_p, self._caches[1], **extra)
        self._state = (hd, zd, hp, zp)

    def _prefill(self) -> None:
        d, p = self.pair.dense, self.pair.perturbed
        self._caches = (self._new_cache(d), self._new_cache(p))
        width = max(len(r.ids) for r in self.rows)
        ids = torch.full((len(self.rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(self.rows), width), dtype=torch.long)
        for b, row in enumerate(self.rows):  # left padding: every prompt ends at the last column
            ids[b, width - len(row.ids):] = torch.tensor(row.ids)
            mask[b, width - len(row.ids):] = 1
        extra = {}
        if len(self.rows) > 1:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            self._mask = mask.to(self.device)
            self._next_pos = positions[:, -1:].to(self.device) + 1
            extra = {"attention_mask": self._mask, "position_ids": positions.to(self.device)}
        self._both(ids, ids, extra)
        zd = self._state[1]
        if self.settings.sample:
            self._generators = [torch.Generator(device=zd.device).manual_seed(self.settings.seed) for _ in self.rows]
        width_c = max(len(r.choice_ids) for r in self.rows)
        if width_c:
            cids = torch.zeros((len(self.rows), width_c), dtype=torch.long)
            cmask = torch.zeros((len(self.rows), width_c), dtype=torch.bool)
            for b, row in enumerate(self.rows):
                cids[b, :len(row.choice_ids)] = torch.tensor(row.choice_ids, dtype=torch.long)
                cmask[b, :len(row.choice_ids)] = True
            self._choices = (cids.to(zd.device), cmask.to(zd.device))
        self._map = self._map.to(self._state[2].device)

    # ------------------------------------------------------------ one step

    def _choose(self, z_d: torch.Tensor, z_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.settings.sample:
            return z_d.argmax(-1), z_p.argmax(-1)
        t = self.settings.temperature
        # one noise vector per row from that row's generator, used by both models: identical streams
        noise = torch.stack([torch.empty(z_d.shape[-1], device=z_d.device).exponential_(generator=g)
                             for g in self._generators])
        pick = lambda z: (torch.softmax(z.float() / t, dim=-1) / noise).argmax(-1)  # noqa: E731
        return pick(z_d), pick(z_p)

    @torch.no_grad()
    def step(self) -> list[dict | None]:
        if self.finished:
            return [None] * len(self.rows)
        started = time.perf_counter()
        if self._state is None:
            self._prefill()
        hd, zd, hp, zp = self._state
        s = self.settings
        tok_d, tok_p = self._choose(zd, zp)
        fed_p = tok_d if s.mode == "shared" else tok_p
        cids, cmask = self._choices if self._choices is not None else (None, None)
        values = M.step_metrics(hd, hp.index_select(1, self._map), zd, zp, tok_d, fed_p,
                                temperature=s.temperature, k=s.topk, choice_ids=cids, choice_mask=cmask)
        values["token_d"] = tok_d.float()
        values["token_p"] = tok_p.float()
        out: list[dict | None] = []
        for row, host in zip(self.rows, M.to_host(values)):
            if row.finished:
                out.append(None)
                continue
            record = self._record(row, host)
            row.records.append(record)
            ended_d, ended_p = record["token_d"] in self._eos, record["token_p"] in self._eos
            ended = ended_d if s.mode == "shared" else (ended_d or ended_p)
            row.finished = ended or len(row.records) >= s.max_new_tokens
            out.append(record)
        self.steps_taken += 1
        if self.finished:
            self._state = None
            self._caches = None
        else:
            extra = {}
            if self._mask is not None:
                ones = torch.ones((len(self.rows), 1), dtype=self._mask.dtype, device=self._mask.device)
                self._mask = torch.cat([self._mask, ones], dim=1)
                extra = {"attention_mask": self._mask, "position_ids": self._next_pos}
                self._next_pos = self._next_pos + 1
            self._both(tok_d.view(-1, 1), fed_p.view(-1, 1), extra)
        self.seconds += time.perf_counter() - started
        return out

    def _record(self, row: _Row, host: dict) -> dict:
        tok = self.tokenizer
        s = self.settings
        i = len(row.records)
        token_d, token_p = int(host.pop("token_d")), int(host.pop("token_p"))
        fed_p = token_d if s.mode == "shared" else token_p
        row.cum_kl += host["kl"]
        row.cum_nll_gap += host["nll_p"] - host["nll_d"]
        if token_d != token_p and row.first_divergence is None:
            row.first_divergence = i
        record = {"step": i, "token_d": token_d, "token_p": token_p,
                  "text_d": self._piece(row.fed[0], token_d), "text_p": self._piece(row.fed[1], token_p),
                  "fed": [token_d, fed_p]}
        row.fed[0].append(token_d)
        row.fed[1].append(fed_p)
        for name in ("d", "p"):
            ids, probs = host.pop(f"topk_{name}_ids"), host.pop(f"topk_{name}_probs")
            record[f"topk_{name}"] = [[t, tok.decode([t]), p] for t, p in zip(ids, probs)]
        n_choices = len(row.choice_ids)
        for key in ("sub_p_d", "sub_p_p"):
            if key in host:
                host[key] = host[key][:n_choices]
        if not n_choices:
            for key in ("sub_p_d", "sub_p_p", "sub_kl", "sub_cos", "sub_agree"):
                host.pop(key, None)
        record.update(host)
        record["cum_kl"] = row.cum_kl
        record["cum_nll_gap"] = row.cum_nll_gap
        record["same_token"] = token_d == token_p
        if s.mode == "free":
            record["first_divergence"] = row.first_divergence
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

    def run(self, callback=None) -> list[list[dict]]:
        """Step to the end; `callback(row_index, record)` after each record. Returns the records per row."""
        while not self.finished:
            for b, record in enumerate(self.step()):
                if record is not None and callback:
                    callback(b, record)
        return [row.records for row in self.rows]

    def header(self, row: int = 0) -> dict:
        """The session header of one row (shared/design.md; the writer adds format, version, created)."""
        pair = self.pair
        report = pair.report
        loaded = pair.loaded
        r = self.rows[row]
        perturbation = {"spec": str(pair.spec)}
        if report is not None:
            perturbation.update(measured_sparsity=report.measured_sparsity, dense_sparsity=report.dense_sparsity,
                                details=dict(report.details))
        model = loaded.ref.name if loaded is not None else getattr(pair.dense.config, "name_or_path", "")
        return {
            "model": model,
            "model_display": loaded.ref.display if loaded is not None else model,
            "perturbation": perturbation,
            "calibration": report.calibration if report is not None else None,
            "prompt": r.prompt,
            "prompt_tokens": len(r.ids),
            "mode": self.settings.mode,
            "temperature": self.settings.temperature,
            "choices": r.choices,
            "choice_ids": r.choice_ids or None,
            "seed": self.settings.seed,
            "sample": self.settings.sample,
            "max_new_tokens": self.settings.max_new_tokens,
            "raw": self.settings.raw,
            "topk": self.settings.topk,
            "layers": pair.dense.config.num_hidden_layers,
            "device": str(self.device),
            "dtype": str(pair.dense.get_input_embeddings().weight.dtype).removeprefix("torch."),
        }


class Stepper(BatchStepper):
    """Steps a pair in lockstep from one prompt. `step()` returns one record, or None when finished."""

    def __init__(self, pair, prompt: str, settings: StepSettings | None = None):
        super().__init__(pair, [prompt], settings)
        self.prompt = prompt

    @property
    def prompt_ids(self) -> torch.Tensor:
        return torch.tensor([self.rows[0].ids], dtype=torch.long)

    @property
    def choice_ids(self) -> list[int]:
        return self.rows[0].choice_ids

    @property
    def notes(self) -> list[str]:
        return self.rows[0].notes

    @property
    def records(self) -> list[dict]:
        return self.rows[0].records

    def step(self) -> dict | None:
        return super().step()[0]

    def run(self, callback=None) -> list[dict]:
        super().run(None if callback is None else (lambda _b, record: callback(record)))
        return self.records
