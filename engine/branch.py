"""Branches of a run: continue it from a step with another token, to tell a single bad step from compounding damage.

The counterfactual (`--counterfactual`, free mode). At a run's first divergence `at` (the first step where the
two models choose different tokens), the branch feeds the perturbed model the dense model's token instead of its
own and goes on in free mode: a free-mode run of the pair from the prompt and the dense text up to and including
step `at`, for the parent's remaining steps (max_new_tokens − at − 1; a branch at the last step has none). Its
step 0 is the parent's step `at + 1` (`start_step`); a sampled branch draws the parent's noise from there on, so
its dense side reproduces the parent's dense text.

Recovery. A branch step agrees when the two models choose the same token there (`same_token`); steps after one
model has ended compare nothing and are left out. `recovery_steps` is the number of branch steps before the two
texts agree to the end of the run (0: the perturbed model follows the dense text at once after the correction);
`recovered` is True when the branch agrees at every compared step, or when, after its last disagreement, it agrees
for at least RESYNC (4) compared steps to the end; False otherwise (a shorter agreeing tail is a coincidence: on
the embedded model a branch that had disagreed for 29 steps "recovered" on a final newline); both are None
when the branch has no compared step (no steps left, or the dense token at `at` ends the text). A run without a
divergence (spec `none`) has no branch: its summary's `recovered` is None, nothing to recover from. The summary
also gets the branch's own first divergence (`branch_divergence`, a branch step: where the texts split again) and
its mean KL (`branch_kl_mean`).

From an alternative. `branch_prefix` gives the prefix and start step of a new run that continues a recorded
run's perturbed text after a step with another token (the explorer's branch; a new session whose header links
the parent: engine.stepper.Stepper's `prefix`, `start_step`, `parent`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from engine.errors import HieruiError
from engine.summary import mean

BRANCH_SUMMARY = ("recovered", "recovery_steps", "branch_divergence", "branch_kl_mean")  # the summary's fields
# a branch that disagreed again recovers only when it then agrees for at least this many compared steps to the end:
# two free texts meeting on one token at the end ('\n' after unrelated sentences) is a coincidence, not a recovery
RESYNC = 4


@dataclass
class Branch:
    """A branch of a run at step `at`, the perturbed model fed `token` there; `steps` are its own step records
    (free mode, numbered from 0: branch step k is the parent's step start_step + k)."""

    at: int  # the parent step whose dense token the perturbed model is fed (the first divergence)
    token: int  # that token (the dense model's choice at `at`)
    text: str  # its text
    start_step: int  # at + 1: the parent step that the branch's step 0 is
    steps: list[dict] = field(default_factory=list)
    recovered: bool | None = None
    recovery_steps: int | None = None

    def to_dict(self) -> dict:
        return {
            "at": self.at,
            "token": self.token,
            "text": self.text,
            "start_step": self.start_step,
            "recovered": self.recovered,
            "recovery_steps": self.recovery_steps,
            "steps": list(self.steps),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Branch:
        """A Branch from its dict (a closing line's `branch`, checked by engine.validate.check_branch)."""
        recovered = d.get("recovered")
        steps = d.get("recovery_steps")
        return cls(
            at=int(d["at"]),
            token=int(d["token"]),
            text=d.get("text") or "",
            start_step=int(d["start_step"]),
            steps=list(d.get("steps") or []),
            recovered=None if recovered is None else bool(recovered),
            recovery_steps=None if steps is None else int(steps),
        )

    def summary(self) -> dict:
        """The summary's branch fields (BRANCH_SUMMARY)."""
        return {
            "recovered": self.recovered,
            "recovery_steps": self.recovery_steps,
            "branch_divergence": self.steps[-1].get("first_divergence") if self.steps else None,
            "branch_kl_mean": mean(s.get("kl") for s in self.steps),
        }


def branch_summary(branch: Branch | None) -> dict:
    """The summary's branch fields: the branch's, or all None for a run without one (no divergence)."""
    return branch.summary() if branch is not None else dict.fromkeys(BRANCH_SUMMARY)


def recovery(steps: list[dict]) -> tuple[bool | None, int | None]:
    """(recovered, recovery_steps) of a branch's step records (the module docstring): the compared steps after
    the last disagreeing one all agree and are at least RESYNC of them (or every compared step agrees); (None,
    None) without a compared step."""
    compared = [(i, s["same_token"]) for i, s in enumerate(steps) if s.get("same_token") is not None]
    if not compared:
        return None, None
    disagree = [k for k, (_, same) in enumerate(compared) if not same]
    if not disagree:
        return True, 0
    tail = len(compared) - 1 - disagree[-1]  # compared steps agreeing to the end, after the last disagreement
    if tail < RESYNC:  # none, or a coincidence (two free texts meeting on one token, a newline, at the end)
        return False, None
    return True, compared[disagree[-1]][0] + 1


def branch_prefix(header: dict, steps: list[dict], step: int, token: int) -> tuple[list[int], int]:
    """(prefix ids, start step) of a new run that continues the perturbed run of a recorded session (`header`,
    `steps`) after step `step` with `token` instead of the perturbed model's choice: the run's own prefix, what
    the perturbed model was fed before `step`, then `token`; its step 0 is the parent's step `step` + 1 (counted
    from the parent's own start step, so a sampled branch keeps the parent's noise stream)."""
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < len(steps):
        raise HieruiError(f"no step {step} to branch from: the run has steps 0 to {len(steps) - 1}")
    fed = []
    for record in steps[:step]:
        got = (record.get("fed") or [None, None])[1]
        if got is None:
            raise HieruiError(f"the perturbed model had ended at step {record.get('step')}: nothing to branch from")
        fed.append(int(got))
    if (steps[step].get("fed") or [None, None])[1] is None:
        raise HieruiError(f"the perturbed model had ended before step {step}: nothing to branch from")
    prefix = [int(t) for t in header.get("prefix_ids") or []] + fed + [int(token)]
    return prefix, int(header.get("start_step") or 0) + step + 1


def branches_at(pair, stepper, ats: list[int | None]) -> list[Branch | None]:
    """Per row of a finished BatchStepper (or Stepper), the branch at step `ats[b]` feeding the perturbed model the
    dense token there (None where `ats[b]` is None). All rows' branches are stepped together in one free-mode
    BatchStepper, to the largest remaining count, each cut to its own."""
    from engine.stepper import BatchStepper, model_context

    batch = getattr(stepper, "batch", stepper)
    rows, settings = batch.rows, batch.settings
    if len(ats) != len(rows):
        raise ValueError("one branch step (or None) per row")
    todo = []  # (row index, at, prefix, remaining steps)
    for b, (row, at) in enumerate(zip(rows, ats)):
        if at is None:
            continue
        if not 0 <= at < len(row.records) or row.records[at].get("token_d") is None:
            raise HieruiError(f"row {b}: no dense token at step {at} to branch from")
        prefix = list(row.prefix_ids) + [int(r["fed"][0]) for r in row.records[: at + 1]]
        todo.append((b, at, prefix, settings.max_new_tokens - at - 1))
    out: list[Branch | None] = [None] * len(rows)
    for b, at, _prefix, _left in todo:
        record = rows[b].records[at]
        out[b] = Branch(at=at, token=int(record["token_d"]), text=record.get("text_d") or "", start_step=at + 1)
    # a branch fed an end-of-sequence token, or at the last step, has nothing left to step
    todo = [t for t in todo if t[3] > 0 and out[t[0]].token not in batch.eos]
    if not todo:
        return out
    longest = max(left for *_, left in todo)
    context = model_context(pair.dense)
    # one stepper for all, unless the longest count would not fit a row's context or a prompt was cut to fit
    # (stepped with its own count, each gets exactly its parent's window)
    fits = context is None or all(
        rows[b].truncated_from is None and len(rows[b].ids) + at + 1 + longest <= context for b, at, _, _ in todo
    )
    groups = [todo] if fits else [[t] for t in todo]
    for group in groups:
        count = max(left for *_, left in group)
        branch = BatchStepper(
            pair,
            [rows[b].prompt for b, *_ in group],
            replace(settings, mode="free", max_new_tokens=count, choices=None, counterfactual=False),
            choices=[rows[b].choices for b, *_ in group],
            prefixes=[prefix for _, _, prefix, _ in group],
            start_steps=[rows[b].start_step + at + 1 for b, at, _, _ in group],
        )
        for (b, _at, _prefix, left), records in zip(group, branch.run()):
            out[b].steps = records[:left]
            out[b].recovered, out[b].recovery_steps = recovery(out[b].steps)
    return out


def counterfactuals(pair, stepper) -> list[Branch | None]:
    """The counterfactual branch of each row of a finished free-mode BatchStepper (or Stepper): at the row's first
    divergence, the perturbed model fed the dense token; None where the row has no divergence."""
    batch = getattr(stepper, "batch", stepper)
    if batch.settings.mode != "free":
        raise HieruiError("the counterfactual branch needs free mode (shared mode has no divergence to branch from)")
    return branches_at(pair, batch, [row.first_divergence for row in batch.rows])
