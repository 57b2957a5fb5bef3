"""The texts the explorer shows around the two continuations: what a run fed the perturbed model, the context a
branch continues, and the counterfactual branch's line."""

from __future__ import annotations

from engine.record.header import SessionHeader
from hierui.format import step_label
from hierui.tokentext import cell


def fed_text(records: list[dict]) -> str:
    """The text the perturbed model was fed over `records` (its own picks in free mode, the dense ones in shared)."""
    out = []
    for r in records:
        fed = (r.get("fed") or [None, None])[1]
        out.append(r.get("text_d", "") if fed == r.get("token_d") else r.get("text_p", ""))
    return "".join(out)


def branch_lead(header: SessionHeader, depth: int = 0) -> tuple:
    """A branch session's (context text before the chosen token, the chosen token's text), read from its parent
    session's file where that is still there (a branch of a branch: its parents' too); () for no branch."""
    parent = header.parent
    if parent is None:
        return ()
    chosen = parent.text or ""
    before = "… "
    if depth < 8 and parent.session is not None and parent.step is not None:
        from engine.errors import HieruiError
        from engine.record.session import load_session

        try:
            session = load_session(parent.session)
        except (HieruiError, OSError):
            session = None
        if session is not None:
            lead = branch_lead(session.header, depth + 1)
            before = (lead[0] + lead[1] if lead else "") + fed_text(session.steps[: parent.step])
    return before, chosen


def counterfactual_line(branch) -> str:
    """A counterfactual branch (engine.record.branches.Branch) as the line under the texts: the dense token fed
    where the texts split, the perturbed model's text from there on, and whether it came back to the dense text."""
    from hierui.tokentext import clip, escape

    if branch is None:
        return "⑂ counterfactual: the two texts never split, nothing to branch"
    steps = branch.steps or []
    if branch.recovered is None:
        verdict = "nothing left to compare"
    elif branch.recovered:
        k = branch.recovery_steps or 0
        verdict = "recovered at once" if k == 0 else f"recovered after {k} step{'s' if k != 1 else ''}"
    else:
        verdict = f"did not recover in {len(steps)} steps"
    text = clip(escape("".join(s.get("text_p") or "" for s in steps)), 160)
    return (
        f"⑂ counterfactual: fed the dense token {cell(branch.text)} at step {step_label(branch.at)}, the perturbed "
        f"model went on “{text}” — {verdict}"
    )


def recorded_counterfactual(source) -> str:
    """A replayed session's counterfactual branch (Session.branch), as its line; '' when it has none (a live run
    shows its own once it has finished)."""
    session = getattr(source, "session", None)
    branch = getattr(session, "branch", None)
    if branch is None and not (session is not None and session.complete and session.header.counterfactual):
        return ""
    return counterfactual_line(branch)
