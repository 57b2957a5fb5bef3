"""A run's branches as data: the Branch record a session's closing line holds, its summary fields, recovery, and
where a branch from an alternative starts. Stepping them is engine.run.branch (its docstring: the counterfactual,
recovery and RESYNC)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import HieruiError
from engine.record.header import header_of
from engine.record.summary import mean

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
        """A Branch from its dict (a closing line's `branch`, checked by engine.record.validate.check_branch)."""
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


def branch_prefix(header, steps: list[dict], step: int, token: int) -> tuple[list[int], int]:
    """(prefix ids, start step) of a new run that continues the perturbed run of a recorded session (`header`, an
    engine.record.header.SessionHeader or its dict; `steps`) after step `step` with `token` instead of the
    perturbed model's choice: the run's own prefix, what the perturbed model was fed before `step`, then `token`;
    its step 0 is the parent's step `step` + 1 (counted from the parent's own start step, so a sampled branch
    keeps the parent's noise stream)."""
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
    header = header_of(header)
    return [*header.prefix_ids, *fed, int(token)], header.start_step + step + 1
