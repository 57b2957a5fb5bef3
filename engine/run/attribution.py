"""Attribution by patching: which units' damage flips the perturbed model's token at one generation step.

At a step, the perturbed model's forward over the last position is rerun with the dense model's output of one
*unit* restored, for each unit (docs/design.md, "Where it breaks"). Units, ℓ = 0..L−1 the dense decoder layer:

    attn.ℓ    what layer ℓ's attention adds to the residual stream (engine.anatomy.sublayers: Anatomy.attention_out,
              Gemma 2/3 and OLMo 2 after their output norm), replaced at the last position by the dense one's
    mlp.ℓ     the same for the MLP (OPT: fc2's output, flattened [tokens, hidden])
    block.ℓ   the whole layer's increment: out′ = in_p + (out_d − in_d) at the last position

Patching every block, or every attn and mlp unit, gives the dense final residual, hence the dense logits (to
float tolerance): the earlier positions' keys and values stay the perturbed model's, but nothing at the last
position reads them except through the patched outputs. A unit missing in the perturbed model is skipped: the
attention and MLP of a blockdrop'd layer (the layer is gone); its block unit is kept, and patching it adds the
dense increment to the residual stream where the layer was. A dropped attention or MLP (attndrop/mlpdrop) is a
stand-in module that adds zeros: its unit exists, and patching it restores what was dropped. Post-LN models
(Anatomy.norm_after_residual, OPT-350m) normalise after the residual add, so a sublayer's output is no additive
contribution: they get block units only (the block increment still telescopes to the dense output).

How it runs: both sides at the last position only, the perturbed side as batched forwards of several sets of
patched units at once (engine.run.patching.Patcher).

Per unit: `kl_patched` = KL(P_d ‖ P_p′) at T, `restored_kl` = (kl − kl_patched)/kl (the fraction of the step's KL
removed; None where kl is 0), `restores_top1` (the patched argmax is the dense top-1), and `rank` (1 = removes the
most KL) among the sublayer units (attn and mlp ranked together) or among the block units.

The greedy smallest set is over the sublayer units (with the block units of layers whose sublayers the perturbed
model lacks, blockdrop; over the block units for post-LN models): each round is one batched forward of S ∪ {u} for
every remaining u; it stops at the first round where a row restores the dense top-1 (taking that row with the
lowest KL), else adds the unit with the lowest KL. Where the top-1 already agrees there is nothing to restore: the
set is empty and `minimal_restores` true.

Which steps can be attributed: the perturbed model's context is used for both models, so only steps whose two
contexts are identical have a meaning here (`flip_steps`): every step in shared mode; in free mode the steps up to
the first divergence, since after it the two models were fed different tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import HieruiError
from engine.run.patching import Patcher

KINDS = ("attn", "mlp", "block")


@dataclass
class UnitResult:
    unit: str
    kind: str
    layer: int
    kl_patched: float
    restored_kl: float | None  # (kl − kl_patched) / kl; None where kl == 0
    restores_top1: bool
    rank: int = 0  # 1 = removes the most KL, among the sublayers (attn and mlp together) or among the blocks


@dataclass
class Attribution:
    """The attribution of one step: the unpatched KL and top-1s, one result per unit, the greedy smallest set."""

    kl: float  # KL(P_d ‖ P_p) at T, unpatched
    top1_d: int
    top1_p: int
    temperature: float
    units: list[UnitResult]
    minimal_set: list[str] | None  # greedy, in the order added; None when not computed
    minimal_restores: bool | None  # whether that set restores the dense top-1
    skipped: list[str] = field(default_factory=list)  # units the perturbed model lacks
    seconds: float = 0.0

    def ranked(self, kind: str | None = None) -> list[UnitResult]:
        """Units by KL removed, most first: of one kind ("attn", "mlp", "block"), "sublayer" (attn and mlp
        together), or None: the sublayers, then the blocks."""

        def order(units):
            return sorted(units, key=lambda u: (u.kl_patched, u.layer, u.kind))

        if kind is None:
            return self.ranked("sublayer") + self.ranked("block")
        if kind == "sublayer":
            return order([u for u in self.units if u.kind in ("attn", "mlp")])
        if kind not in KINDS:
            raise ValueError(f"unknown unit kind {kind!r}")
        return order([u for u in self.units if u.kind == kind])

    def rows(self, step: int | None = None) -> list[dict]:
        """One row per unit (engine.record.schema.ATTRIBUTION_FIELDS; with `step`, the step first)."""
        chosen = set(self.minimal_set or [])
        out = []
        for u in self.units:
            row = {} if step is None else {"step": step}
            row.update(
                unit=u.unit,
                kind=u.kind,
                layer=u.layer,
                kl=self.kl,
                kl_patched=u.kl_patched,
                restored_kl=u.restored_kl,
                restores_top1=u.restores_top1,
                rank=u.rank,
                in_minimal_set=(u.unit in chosen) if self.minimal_set is not None else None,
                top1_d=self.top1_d,
                top1_p=self.top1_p,
                minimal_restores=self.minimal_restores,
            )
            out.append(row)
        return out


# ------------------------------------------------------------------ the steps of a session


def context_at(session_header, steps: list[dict], step: int) -> list[int]:
    """The perturbed model's context at `step`: the prompt ids and the tokens it was fed before that step
    (`session_header`: an engine.record.header.SessionHeader, or its dict)."""
    from engine.record.header import header_of

    ids = header_of(session_header).prompt_ids
    if not ids:
        raise HieruiError("the session's header has no prompt_ids: it cannot be attributed")
    if not 0 <= step < len(steps):
        raise HieruiError(f"no step {step}: the session has steps 0..{len(steps) - 1}")
    fed = [record["fed"][1] for record in steps[:step]]
    if any(t is None for t in fed):
        raise HieruiError(f"step {step} comes after the perturbed model's end of sequence")
    return [int(t) for t in ids] + [int(t) for t in fed]


def same_context(steps: list[dict], step: int) -> bool:
    """Whether both models had the same context at `step` (every token fed before it the same)."""
    return all(record["fed"][0] == record["fed"][1] for record in steps[:step])


def flip_steps(steps: list[dict], mode: str = "shared") -> list[int]:
    """The steps whose top-1 differs and whose two contexts are identical: every such step in shared mode; in
    free mode only up to the first divergence (that step itself, under greedy decoding), because after it the
    models were fed different tokens and patching one into the other compares different contexts. `mode` is
    checked through the fed tokens themselves, so a sampled free run is handled the same way."""
    out = []
    for record in steps:
        i = record["step"]
        if record.get("top1_agree") is None or bool(record["top1_agree"]):
            continue
        if mode == "shared" or same_context(steps, i):
            out.append(i)
        else:
            break  # free mode: the contexts never agree again
    return out


# ------------------------------------------------------------------ attribution


def attribute(pair, context_ids: list[int], temperature: float = 1.0, greedy: bool = True) -> Attribution:
    """Attribute the perturbed model's divergence at the step whose context (the perturbed model's: prompt ids
    and the tokens fed before the step) is `context_ids`: one patched rerun of the last position per unit, in
    batched forwards, and with `greedy` the smallest set of sublayer units that restores the dense top-1."""
    started = time.perf_counter()
    patcher = Patcher(pair, list(context_ids), temperature)
    units = patcher.units
    sets = [[]] + [[u] for u in range(len(units))]
    kls, tops = patcher.run(sets)
    kl, top1_p = max(0.0, kls[0]), tops[0]
    results = []
    for u, unit in enumerate(units):
        k = max(0.0, kls[u + 1])
        results.append(
            UnitResult(
                unit=unit.name,
                kind=unit.kind,
                layer=unit.layer,
                kl_patched=k,
                restored_kl=(kl - k) / kl if kl > 0 else None,
                restores_top1=tops[u + 1] == patcher.top1_d,
            )
        )
    for group in (("attn", "mlp"), ("block",)):  # the sublayers ranked together, the blocks apart
        ordered = sorted((r for r in results if r.kind in group), key=lambda r: (r.kl_patched, r.layer, r.kind))
        for rank, r in enumerate(ordered, start=1):
            r.rank = rank
    minimal, restores = None, None
    if greedy:
        minimal, restores = _greedy(patcher, kls[1:], tops[1:], top1_p)
    return Attribution(
        kl=kl,
        top1_d=patcher.top1_d,
        top1_p=top1_p,
        temperature=float(temperature),
        units=results,
        minimal_set=minimal,
        minimal_restores=restores,
        skipped=patcher.skipped,
        seconds=time.perf_counter() - started,
    )


def _greedy(patcher: Patcher, single_kl: list[float], single_top: list[int], top1_p: int):
    """The greedy smallest set of sublayer units restoring the dense top-1; a layer without sublayers in the
    perturbed model (blockdrop) takes part through its block unit, and a post-LN model through its blocks."""
    units = patcher.units
    if top1_p == patcher.top1_d:
        return [], True  # nothing to restore
    gone = {int(name.split(".")[1]) for name in patcher.skipped}  # layers whose sublayers the perturbed model lacks
    pool = [u for u, unit in enumerate(units) if unit.kind != "block" or unit.layer in gone]
    pool = pool or list(range(len(units)))  # post-LN: block units only
    chosen: list[int] = []
    kls, tops = [single_kl[u] for u in pool], [single_top[u] for u in pool]  # round 1: the single units
    candidates = list(pool)
    while candidates:
        restoring = [i for i, t in enumerate(tops) if t == patcher.top1_d]
        pick = min(restoring or range(len(candidates)), key=lambda i: kls[i])
        chosen.append(candidates.pop(pick))
        if restoring:
            return [units[u].name for u in chosen], True
        if not candidates:
            break
        kls, tops = patcher.run([chosen + [u] for u in candidates])
    return [units[u].name for u in chosen], False


# ------------------------------------------------------------------ in a sweep


def attribution_path(out: str | Path, run) -> Path:
    """OUT/attribution/<run_id>.jsonl: written whole once a run's attribution is complete."""
    return Path(out) / "attribution" / f"{run.run_id}.jsonl"


def attribution_complete(out: str | Path, run) -> bool:
    return attribution_path(out, run).is_file()


def attribute_run(pair, session, run, out: str | Path, temperature: float, hooks=None) -> list[dict]:
    """Attribute every flip step of a recorded run (engine.sweep.sweeps.Run) and write its rows
    (engine.record.schema.ATTRIBUTION) to attribution_path; returns them."""
    from engine.record.paths import atomic_write

    header, steps = session.header, session.steps
    todo = flip_steps(steps, header.mode)
    ident = {"run_id": run.run_id, "spec": str(run.spec), "mode": run.mode, "prompt_id": run.prompt.id}
    rows = []
    for n, step in enumerate(todo):
        if hooks is not None:
            hooks.stage(f"attributing {run.run_id}: step {n + 1}/{len(todo)}", n, len(todo))
        result = attribute(pair, context_at(header, steps, step), temperature)
        rows += [{**ident, **row} for row in result.rows(step)]
    if hooks is not None and todo:
        hooks.stage(f"attributing {run.run_id}: step {len(todo)}/{len(todo)}", len(todo), len(todo))
    text = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)
    path = attribution_path(out, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)
    return rows


def read_run(out: str | Path, run) -> list[dict]:
    path = attribution_path(out, run)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
