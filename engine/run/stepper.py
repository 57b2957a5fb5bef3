"""Lockstep stepping of a ModelPair: one token at a time, each model with its own KV cache.

Step i compares the two next-token distributions after the prompt and i generated tokens, then feeds:
  - `shared` (teacher-forced): both models get the dense model's choice;
  - `free`: each model gets its own choice, so their texts can split.
Choices are greedy, or with `sample=True` drawn by an exponential race whose noise is drawn once per
step from one seeded generator and used by both models (identical sampling streams).

A step record holds `step`, `token_d`/`token_p` (each model's own choice at this step), `text_d`/`text_p`,
`fed` (what each was fed), every metric of engine.run.metrics, and the accumulated ones: `cum_kl`,
`cum_nll_gap` (Σ nll_p − nll_d), `same_token`, in free mode `first_divergence`, and `end_d`/`end_p`.

End of a run. `end_d`/`end_p` is the step at which that model emitted an end-of-sequence token, in that step's
record and every later one (None before, and if it never does). Shared mode ends at the dense model's EOS
(the perturbed model is fed the dense text, so it never ends on its own: `end_p` stays None). Free mode ends
when both models have ended, or at the token limit: after one model's EOS the other goes on, fed its own
choices. In the records after a model's end step, that model generates nothing: its token is None, its text
"", its entry of `fed`, its top-k list, its `nll_*` and its `sub_p_*` are None; every field that compares the
two models (the embedding, logit and probability metrics, their estimates, amp, dp, rank_shift, top-1/top-k
agreement, sub_kl/sub_cos/sub_agree, same_token) is None, not computed. The running model's own fields go on.
`cum_kl` and `cum_nll_gap` sum over the compared steps only: they keep their last value once a model ended.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from engine.anatomy.sublayers import state_hooks, state_modules
from engine.errors import HieruiError
from engine.models.tokens import choice_token_ids, eos_ids, piece, prompt_ids
from engine.perturb.pair import mapped_hidden
from engine.place.placement import gather
from engine.record.schema import LENS_FIELDS
from engine.record.settings import LENS_SAMPLE_EVERY, StepSettings, fit_context
from engine.run import metrics as M

__all__ = ["BatchStepper", "Stepper", "StepSettings"]


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
    end_d: int | None = None  # the step at which each model emitted end-of-sequence
    end_p: int | None = None
    fed: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))  # generated tokens each model got
    truncated_from: int | None = None  # the prompt's length in tokens before left truncation (settings.truncate)
    prefix_ids: list[int] = field(default_factory=list)  # tokens fed after the prompt before step 0 (a branch)
    start_step: int = 0  # the step of the parent run this row's step 0 is (a branch): the sampling noise stream
    parent: dict | None = None  # a branch's parent run: {"session": path, "step": s, "token": id, …} (its header)


PREFILL_CHUNK = 512  # prompt tokens fed per forward pass in the prefill


def model_context(model) -> int | None:
    """The longest sequence the model takes (config.max_position_embeddings), or None when it does not say."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


@torch.no_grad()
def _lens_values(head, head_p, hd, hp, zd, zp, kl, top1, settings: StepSettings) -> list[dict]:
    """The lens fields of B rows (engine.run.lens.lens_metrics) as records hold them: lists over ℓ = 1..L, null
    where not a number, lens_top1_agree as bools. ℓ = L is the models' own output: exactly the step's `kl` and
    `top1` (B,)."""
    from engine.run.lens import lens_metrics

    lens = lens_metrics(head, hd, hp, zd, zp, settings.temperature, head_p=head_p)
    lens["lens_kl"][:, -1] = kl
    lens["lens_dense_final_kl"][:, -1] = kl
    lens["lens_top1_agree"][:, -1] = top1
    rows = M.to_host(lens)
    for host in rows:
        host["lens_top1_agree"] = [None if v is None else bool(v) for v in host["lens_top1_agree"]]
    return rows


class BatchStepper:
    """Steps a pair in lockstep over B prompts at once (left padding, attention masks, per-row positions).

    `step()` returns a record per row, None for rows already finished (end of sequence or the token limit).
    Each row's records equal (to float tolerance) those of stepping its prompt alone. A model that has ended
    in a row (free mode) is fed the pad token in that row from then on, and its outputs there are ignored:
    the pad only enters that model's own KV cache (each model has its own, and batch rows never attend to each
    other), so the running model of the row is unaffected. A model that has ended in every row is not run any
    more. `choices` gives each row its own candidate tokens (default: `settings.choices` for every row). The
    settings are frozen: a stepper keeps the ones it was made with.
    """

    def __init__(
        self,
        pair,
        prompts: list[str],
        settings: StepSettings | None = None,
        choices: list | None = None,
        prefixes: list[list[int]] | None = None,
        start_steps: list[int] | None = None,
        recorded_ids: list[list[int] | None] | None = None,
        lens_later: bool = False,
        dense_trajectory=None,
    ):
        """`prefixes`: per row, token ids fed after the prompt before step 0 (a branch continues a run from a
        step: the prompt plus the tokens generated before it); `start_steps`: per row, the step of the parent
        run that this row's step 0 is, so a sampled branch draws the parent's noise from there on.
        `recorded_ids`: per row, the ids fed first as a session recorded them (its prompt_ids, the prefix
        included), instead of the prompt tokenized now (None: tokenize it): a rerun feeds what the recording fed.
        `lens_later`: the logit lens is not computed in step(): the records carry its fields None, and what it
        needs is kept for `compute_lens` (the explorer computes it behind the stepping; `lens_pending`).
        `dense_trajectory`: an engine.run.trajectory.DenseTrajectory (a sweep's): empty, it records the dense
        outputs of this stepper's forward passes; recorded (same rows and settings), the dense model is not run and
        its outputs come from it (engine.run.trajectory)."""
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
        prefixes = prefixes if prefixes is not None else [[] for _ in prompts]
        start_steps = start_steps if start_steps is not None else [0] * len(prompts)
        if len(prefixes) != len(prompts) or len(start_steps) != len(prompts):
            raise HieruiError("one prefix and one start step per prompt, or none")
        context = model_context(pair.dense)
        given = recorded_ids if recorded_ids is not None else [None] * len(prompts)
        for prompt, row_choices, prefix, recorded in zip(prompts, per_row, prefixes, given):
            if recorded:
                ids = [int(t) for t in recorded]
            else:
                ids = prompt_ids(self.tokenizer, prompt, raw=self.settings.raw) + [int(t) for t in prefix]
            if not ids and self.tokenizer.bos_token_id is not None:
                ids = [self.tokenizer.bos_token_id]  # an empty prompt starts from the beginning of a text
            if not ids:
                raise HieruiError(f"the prompt {prompt!r} is empty after tokenization")
            keep = fit_context(len(ids), self.settings.max_new_tokens, context, self.settings.truncate)
            truncated_from = len(ids) if keep < len(ids) else None
            ids = ids[len(ids) - keep :]
            cids, notes = choice_token_ids(self.tokenizer, row_choices) if row_choices else ([], [])
            row = _Row(prompt, ids, list(row_choices) if row_choices else None, cids, notes)
            row.truncated_from = truncated_from
            row.prefix_ids = [int(t) for t in prefix]
            self.rows.append(row)
        for row, start in zip(self.rows, start_steps):
            row.start_step = int(start)
        self.eos = eos_ids(self.tokenizer, pair.dense)  # the ids that end a run (an empty set: run to the limit)
        self._map = torch.tensor(pair.hidden_map, dtype=torch.long)
        self._taps: dict = {}  # model → (its decoder layers, its final norm): where _forward hooks it
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._state = None  # (hidden_d, logits_d, hidden_p, logits_p) for the next step
        self._caches = None
        self._mask = None  # (B, T) attention mask over everything fed so far, or None for one row
        self._next_pos = None
        self._generators: list[torch.Generator] = []
        self._choices = None  # (ids (B, C), mask (B, C)) on the device
        self._lens = None  # (dense head, perturbed head or None) once found: engine.run.lens
        self.lens_later = bool(lens_later)
        # (row, step) → what compute_lens needs, oldest first (lens_later); the lock: step() adds while
        # compute_lens, in another thread, takes
        self._lens_kept: dict[tuple[int, int], tuple] = {}
        self._lens_lock = threading.Lock()
        self._dense_source = dense_trajectory
        self._replay = False  # the dense outputs come from _dense_source (set at the prefill)
        self.tie_margin, self.tie_margin_source = self._tie_margin()

    @property
    def finished(self) -> bool:
        return all(row.finished for row in self.rows)

    def _tie_margin(self) -> tuple[float, str]:
        """The near-tie threshold: the settings' own, else the dense model's noise floor (engine.run.noise)."""
        if self.settings.tie_margin is not None:
            return float(self.settings.tie_margin), "given"
        from engine.run.floor import dtype_name, tie_margin

        loaded = getattr(self.pair, "loaded", None)
        name = loaded.ref.name if loaded is not None else getattr(self.pair.dense.config, "name_or_path", "")
        weight = self.pair.dense.get_input_embeddings().weight
        return tie_margin(name, weight.device.type, dtype_name(weight.dtype))

    def _lens_heads(self):
        """The lens heads of both models (engine.run.lens), found once; None where the lens is off or impossible."""
        if self.settings.lens == "off":
            return None
        if self._lens is None:
            from engine.run.lens import lens_head

            dense, pert = lens_head(self.pair.dense), lens_head(self.pair.perturbed)
            if dense is None or pert is None:
                self._lens = (None, None)
            else:
                # the perturbed head only where it is not the dense one's tensors (a checkpoint)
                same = all(
                    a is b
                    for a, b in zip(
                        [p for m in (*dense.norms, dense.head) for p in m.parameters()],
                        [p for m in (*pert.norms, pert.head) for p in m.parameters()],
                    )
                ) and len(pert.norms) == len(dense.norms)
                self._lens = (dense, None if same else pert)
        return self._lens if self._lens[0] is not None else None

    # ------------------------------------------------------------ forward passes

    def _new_cache(self, model):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    @torch.no_grad()
    def _forward(self, model, ids: torch.Tensor, cache, **kwargs):
        """The last position's logits and hidden states (ℓ = 0 the embeddings … L the final normed state).

        Only the last position is kept: `logits_to_keep=1` computes the LM head there alone, and hooks copy
        the last position of each decoder layer's input and of the final norm's output, so a long prompt's
        prefill never holds logits or hidden states for every position (output_hidden_states would)."""
        if model not in self._taps:  # found once per model, not at every forward pass
            self._taps[model] = state_modules(model)  # each layer's input, the final norm's output
        layers, norm = self._taps[model]
        if layers is None:  # an architecture whose layers and final norm we cannot find: every position
            out = model(input_ids=ids.to(self.device), cache=cache, use_cache=True, output_hidden_states=True, **kwargs)
            logits = out.logits[:, -1, :]
            return gather([h[:, -1, :] for h in out.hidden_states], logits.device, dim=1), logits

        grabbed: list = [None] * (len(layers) + 1)  # the last position of each state ℓ = 0 … L

        def keep_last(index: int, h: torch.Tensor) -> None:
            grabbed[index] = h[:, -1, :].clone()

        hooks = state_hooks(layers, norm, keep_last)
        try:
            out = model(input_ids=ids.to(self.device), cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        logits = out.logits[:, -1, :]
        # several GPUs: one copy per device to the head's, not one per layer (engine.place.placement)
        hidden = gather(grabbed, logits.device, dim=1)
        return hidden, logits

    def _both(self, ids_d: torch.Tensor, ids_p: torch.Tensor, extra: dict, run=(True, True), keep=True) -> None:
        """Feed each model its ids; a model with `run` False (ended in every row) keeps its last outputs,
        which are ignored, and drops its cache. `keep` False: outputs nobody reads (a prefill chunk before the
        last), neither recorded nor replayed."""
        hd, zd, hp, zp = self._state if self._state is not None else (None,) * 4
        if run[0]:
            hd, zd = self._dense(ids_d, extra, keep)
        if run[1]:
            hp, zp = self._forward(self.pair.perturbed, ids_p, self._caches[1], **extra)
        self._caches = tuple(cache if go else None for cache, go in zip(self._caches, run))
        self._state = (hd, zd, hp, zp)

    def _dense(self, ids: torch.Tensor, extra: dict, keep: bool):
        """The dense model's (hidden, logits) for `ids`: replayed from the dense trajectory, or computed (and
        recorded into it when it records)."""
        source = self._dense_source
        if self._replay:
            return source.next() if keep else (None, None)
        hd, zd = self._forward(self.pair.dense, ids, self._caches[0], **extra)
        if source is not None and keep:
            source.add(hd, zd)
        return hd, zd

    def _prefill(self) -> None:
        d, p = self.pair.dense, self.pair.perturbed
        self._replay = self._dense_source is not None and self._dense_source.start(self)
        self._caches = (None if self._replay else self._new_cache(d), self._new_cache(p))
        width = max(len(r.ids) for r in self.rows)
        ids = torch.full((len(self.rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(self.rows), width), dtype=torch.long)
        for b, row in enumerate(self.rows):  # left padding: every prompt ends at the last column
            ids[b, width - len(row.ids) :] = torch.tensor(row.ids)
            mask[b, width - len(row.ids) :] = 1
        positions = None
        if len(self.rows) > 1:
            positions = (mask.cumsum(-1) - 1).clamp(min=0).to(self.device)
            self._mask = mask.to(self.device)
            self._next_pos = positions[:, -1:] + 1
        # in chunks through the KV caches: attention over a chunk holds chunk × seen scores, not width², so a
        # long prompt's prefill stays bounded; only the last chunk's outputs (the last position) are kept
        for start in range(0, width, PREFILL_CHUNK):
            end = min(width, start + PREFILL_CHUNK)
            extra = (
                {}
                if positions is None
                else {"attention_mask": self._mask[:, :end], "position_ids": positions[:, start:end]}
            )
            self._both(ids[:, start:end], ids[:, start:end], extra, keep=end == width)
        zd = self._state[1]
        if self.settings.sample:
            self._generators = [torch.Generator(device=zd.device).manual_seed(self.settings.seed) for _ in self.rows]
            for row, gen in zip(self.rows, self._generators):  # a branch: the parent's noise from its step on
                for _ in range(row.start_step):
                    torch.empty(zd.shape[-1], device=zd.device).exponential_(generator=gen)
        width_c = max(len(r.choice_ids) for r in self.rows)
        if width_c:
            cids = torch.zeros((len(self.rows), width_c), dtype=torch.long)
            cmask = torch.zeros((len(self.rows), width_c), dtype=torch.bool)
            for b, row in enumerate(self.rows):
                cids[b, : len(row.choice_ids)] = torch.tensor(row.choice_ids, dtype=torch.long)
                cmask[b, : len(row.choice_ids)] = True
            self._choices = (cids.to(zd.device), cmask.to(zd.device))
        self._map = self._map.to(self._state[2].device)

    # ------------------------------------------------------------ one step

    def _choose(self, z_d: torch.Tensor, z_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.settings.sample:
            return z_d.argmax(-1), z_p.argmax(-1)
        t = self.settings.temperature
        # one noise vector per row from that row's generator, used by both models: identical streams
        noise = torch.stack(
            [torch.empty(z_d.shape[-1], device=z_d.device).exponential_(generator=g) for g in self._generators]
        )
        pick = lambda z: (torch.softmax(z.float() / t, dim=-1) / noise).argmax(-1)  # noqa: E731
        return pick(z_d), pick(z_p)

    @torch.no_grad()
    def step(self) -> list[dict | None]:
        if self.finished:
            return [None] * len(self.rows)
        if self._state is None:
            self._prefill()
        hd, zd, hp, zp = self._state
        s = self.settings
        tok_d, tok_p = self._choose(zd, zp)
        fed_p = tok_d if s.mode == "shared" else tok_p
        cids, cmask = self._choices if self._choices is not None else (None, None)
        hp_mapped = mapped_hidden(hd, hp, self._map)  # −1 in hidden_map / another hidden size: NaN, recorded as null
        values = M.step_metrics(
            hd,
            hp_mapped,
            zd,
            zp,
            tok_d,
            fed_p,
            temperature=s.temperature,
            k=s.topk,
            choice_ids=cids,
            choice_mask=cmask,
        )
        values["margin_d"] = M.margin(zd, s.temperature)
        lens = self._lens_step(hd, hp, hp_mapped, zd, zp, values, tok_d, tok_p)  # batch row → its lens fields
        values["token_d"] = tok_d.float()
        values["token_p"] = tok_p.float()
        out: list[dict | None] = []
        for b, (row, host) in enumerate(zip(self.rows, M.to_host(values))):
            if row.finished:
                out.append(None)
                continue
            if lens is not None:  # a row whose lens this step does not compute (sampled, later): null
                host.update(lens.get(b) or dict.fromkeys(LENS_FIELDS))
            record = self._record(row, host)
            row.records.append(record)
            ended = row.end_d is not None if s.mode == "shared" else None not in (row.end_d, row.end_p)
            row.finished = ended or len(row.records) >= s.max_new_tokens
            out.append(record)
        if self.finished:
            self._state = None
            self._caches = None
        else:
            # what each model is fed next: its token where it is still running, the pad token elsewhere
            live_d = torch.tensor([not r.finished and r.end_d is None for r in self.rows], device=tok_d.device)
            live_p = torch.tensor([not r.finished and r.end_p is None for r in self.rows], device=tok_d.device)
            ids_d = torch.where(live_d, tok_d, torch.full_like(tok_d, self._pad))
            ids_p = torch.where(live_p, fed_p, torch.full_like(fed_p, self._pad))
            extra = {}
            if self._mask is not None:
                ones = torch.ones((len(self.rows), 1), dtype=self._mask.dtype, device=self._mask.device)
                self._mask = torch.cat([self._mask, ones], dim=1)
                extra = {"attention_mask": self._mask, "position_ids": self._next_pos}
                self._next_pos = self._next_pos + 1
            self._both(ids_d.view(-1, 1), ids_p.view(-1, 1), extra, run=(bool(live_d.any()), bool(live_p.any())))
        return out

    # ------------------------------------------------------------ the logit lens

    def _lens_rows(self, values: dict, tok_d: torch.Tensor, tok_p: torch.Tensor) -> list[int]:
        """The batch rows whose lens this step computes: every row still comparing the two models ("all"), or
        of those ("sampled") the rows at a step that is a multiple of LENS_SAMPLE_EVERY, whose top-1 flips, or
        whose texts split for the first time (free mode)."""
        s = self.settings
        live = [b for b, r in enumerate(self.rows) if not r.finished and r.end_d is None and r.end_p is None]
        if s.lens == "all" or not live:
            return live
        agree = values["top1_agree"].tolist()  # one small transfer (NaN: no comparison, no flip)
        split = (tok_d != tok_p).tolist()
        chosen = []
        for b in live:
            row = self.rows[b]
            first = s.mode == "free" and row.first_divergence is None and split[b]
            if len(row.records) % LENS_SAMPLE_EVERY == 0 or agree[b] == 0 or first:
                chosen.append(b)
        return chosen

    def _lens_step(self, hd, hp, hp_mapped, zd, zp, values: dict, tok_d, tok_p) -> dict[int, dict] | None:
        """This step's lens fields per batch row that computes them (`_lens_rows`), only on those rows; None with
        the lens off. With `lens_later`, what each of those rows needs is kept for compute_lens instead (and
        every row's fields are null for now)."""
        heads = self._lens_heads()
        if heads is None:
            return None
        rows = self._lens_rows(values, tok_d, tok_p)
        # another hidden size (a checkpoint): no mapped states (NaN), read them through the dense head → null
        head_p = heads[1] if hp.shape[-1] == hd.shape[-1] else None
        kl, top1 = values["kl"], values["top1_agree"]
        if self.lens_later:
            with self._lens_lock:
                for b in rows:
                    one = slice(b, b + 1)
                    kept = (hd[one], hp_mapped[one], zd[one], zp[one], kl[one].clone(), top1[one].clone())
                    self._lens_kept[(b, len(self.rows[b].records))] = (heads[0], head_p, *kept)
            return {}
        if not rows:
            return {}
        if len(rows) < len(self.rows):  # only the chosen rows go through the head
            index = torch.tensor(rows, device=hd.device)
            hd, hp_mapped, zd, zp, kl, top1 = (
                t.index_select(0, index.to(t.device)) for t in (hd, hp_mapped, zd, zp, kl, top1)
            )
        return dict(zip(rows, _lens_values(heads[0], head_p, hd, hp_mapped, zd, zp, kl, top1, self.settings)))

    def lens_pending(self) -> list[tuple[int, int]]:
        """The (row, step) pairs whose lens is kept for compute_lens and not computed yet, oldest first."""
        with self._lens_lock:
            return list(self._lens_kept)

    def compute_lens(self, row: int, step: int) -> dict | None:
        """The lens fields of `row`'s step `step` (a stepper made with lens_later): lens_kl, lens_top1_agree
        (bools), lens_dense_final_kl, lists over ℓ = 1..L as a record holds them; what was kept for it is dropped.
        None where nothing is kept for it (unknown, or computed already). Safe to call from another thread while
        step() runs: it reads only what was kept and the final norm and head (never through their hooks)."""
        with self._lens_lock:
            kept = self._lens_kept.pop((row, step), None)
        if kept is None:
            return None
        return _lens_values(*kept, self.settings)[0]

    def _record(self, row: _Row, host: dict) -> dict:
        tok = self.tokenizer
        s = self.settings
        i = len(row.records)
        live = {"d": row.end_d is None, "p": row.end_p is None}  # ended before this step: generates nothing
        token_d, token_p = int(host.pop("token_d")), int(host.pop("token_p"))
        fed_p = token_d if s.mode == "shared" else token_p
        tokens = {"d": token_d if live["d"] else None, "p": token_p if live["p"] else None}
        fed = {"d": tokens["d"], "p": fed_p if live["p"] else None}
        both = live["d"] and live["p"]
        if both:
            if host["kl"] is not None:  # None: not a number (a non-finite logit)
                row.cum_kl += host["kl"]
            if host["nll_p"] is not None and host["nll_d"] is not None:
                row.cum_nll_gap += host["nll_p"] - host["nll_d"]
            if token_d != token_p and row.first_divergence is None:
                row.first_divergence = i
        record = {"step": i, "token_d": tokens["d"], "token_p": tokens["p"]}
        for name, index in (("d", 0), ("p", 1)):
            record[f"text_{name}"] = piece(tok, row.fed[index], tokens[name]) if live[name] else ""
            if live[name]:
                row.fed[index].append(fed[name])
        record["fed"] = [fed["d"], fed["p"]]
        for name in ("d", "p"):
            ids, probs = host.pop(f"topk_{name}_ids"), host.pop(f"topk_{name}_probs")
            record[f"topk_{name}"] = [[t, tok.decode([t]), p] for t, p in zip(ids, probs)] if live[name] else None
        n_choices = len(row.choice_ids)
        for key in ("sub_p_d", "sub_p_p"):
            if key in host:
                host[key] = host[key][:n_choices]
        if not n_choices:
            for key in ("sub_p_d", "sub_p_p", "sub_kl", "sub_cos", "sub_agree"):
                host.pop(key, None)
        # a flip (the two top-1 tokens differ) at a dense margin below the noise threshold: a near tie
        flip = host["top1_agree"] is not None and not host["top1_agree"]
        margin = host["margin_d"]
        host["near_tie"] = bool(flip and margin is not None and margin < self.tie_margin)
        if not both:  # one model has ended: only the running one's own fields are values
            own = {f"{kind}_{name}" for name in ("d", "p") if live[name] for kind in ("nll", "sub_p")}
            own |= {"margin_d"} if live["d"] else set()
            host = {key: (value if key in own else None) for key, value in host.items()}
        record.update(host)
        record["cum_kl"] = row.cum_kl
        record["cum_nll_gap"] = row.cum_nll_gap
        record["same_token"] = token_d == token_p if both else None
        if s.mode == "free":
            record["first_divergence"] = row.first_divergence
        if live["d"] and token_d in self.eos:
            row.end_d = i
        if s.mode == "free" and live["p"] and token_p in self.eos:
            row.end_p = i
        record["end_d"] = row.end_d
        record["end_p"] = row.end_p
        return record

    def run(self, callback=None) -> list[list[dict]]:
        """Step to the end; `callback(row_index, record)` after each record. Returns the records per row."""
        while not self.finished:
            for b, record in enumerate(self.step()):
                if record is not None and callback:
                    callback(b, record)
        return [row.records for row in self.rows]


class Stepper:
    """Steps a pair in lockstep from one prompt: a BatchStepper of one row. `step()` returns one record,
    or None when the run is over."""

    def __init__(
        self,
        pair,
        prompt: str,
        settings: StepSettings | None = None,
        prefix: list[int] | None = None,
        start_step: int = 0,
        parent: dict | None = None,
        recorded_ids: list[int] | None = None,
        lens_later: bool = False,
    ):
        """`prefix`, `start_step`: a branch of another run (BatchStepper); `parent`: what the session header
        records of the run it branches from; `recorded_ids`: the prompt's ids as a session recorded them
        (BatchStepper); `lens_later`: the lens kept for `batch.compute_lens(0, step)` (BatchStepper)."""
        rows = dict(prefixes=[list(prefix or [])], start_steps=[start_step], recorded_ids=[recorded_ids])
        self.batch = BatchStepper(pair, [prompt], settings, lens_later=lens_later, **rows)
        self.batch.rows[0].parent = dict(parent) if parent else None

    @property
    def pair(self):
        return self.batch.pair

    @property
    def settings(self) -> StepSettings:
        return self.batch.settings

    @property
    def row(self) -> _Row:
        return self.batch.rows[0]

    @property
    def prompt(self) -> str:
        return self.row.prompt

    @property
    def prompt_ids(self) -> list[int]:
        return self.row.ids

    @property
    def choice_ids(self) -> list[int]:
        return self.row.choice_ids

    @property
    def notes(self) -> list[str]:
        """Warnings about the choices (a multi-token choice is read through its first token)."""
        return self.row.notes

    @property
    def records(self) -> list[dict]:
        return self.row.records

    @property
    def finished(self) -> bool:
        return self.batch.finished

    def step(self) -> dict | None:
        return self.batch.step()[0]

    def run(self, callback=None) -> list[dict]:
        """Step to the end; `callback(record)` after each step. Returns the records."""
        self.batch.run(None if callback is None else (lambda _b, record: callback(record)))
        return self.records
