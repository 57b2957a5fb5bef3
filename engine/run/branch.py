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
the parent: engine.run.stepper.Stepper's `prefix`, `start_step`, `parent`).
"""

from __future__ import annotations

from dataclasses import replace

from engine.errors import HieruiError
from engine.record.branches import Branch, recovery


def branches_at(pair, stepper, ats: list[int | None]) -> list[Branch | None]:
    """Per row of a finished BatchStepper (or Stepper), the branch at step `ats[b]` feeding the perturbed model the
    dense token there (None where `ats[b]` is None). All rows' branches are stepped together in one free-mode
    BatchStepper, to the largest remaining count, each cut to its own."""
    from engine.run.stepper import BatchStepper, model_context

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
