"""`hierui show SESSION` and `hierui replay --rerun` as text: a session's header, continuations, summary and
steps, and the deviations of a rerun. Reads files only: no torch, no transformers.

Steps are shown counted from 1 (hierui.format.step_label): the session files keep their 0-based `step`,
`first_divergence`, `end_d` and `end_p`. A long title (a path) is a line of text above its table, never a
title squeezed into the table's width."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text

from engine.errors import HieruiError
from engine.perturb.checkpoint import structure_note
from hierui.format import MISSING, metric, pct, step_label
from hierui.output import console, err_console
from hierui.tokentext import cell, clip, escape, running

CELL_LIMIT = 20_000  # characters of one cell (a prompt, a continuation) that `show` prints without --full


def cut(text: str, full: bool = False, limit: int = CELL_LIMIT) -> str:
    """`text`, or its first `limit` characters and a visible marker saying how much is left out (rich folds a
    cell character by character: a 2 MB cell took 11 s to print)."""
    if full or len(text) <= limit:
        return text
    return text[:limit] + f" … [cut: {len(text) - limit:,} more characters; --full shows all]"


def print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        err_console.print(Text("warning: ", style="yellow") + Text(escape(warning)), soft_wrap=True)


def _session_header_table(session, full: bool = False) -> Table:
    h = session.header  # engine.record.header.SessionHeader: text from a file, escaped before printing
    pert = h.perturbation
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column(overflow="fold")

    sparsity = pct(pert.measured_sparsity)
    if pert.dense_sparsity:
        sparsity += f" (dense model: {pct(pert.dense_sparsity)})"
    rows = [
        ("model", escape(h.display or MISSING)),
        *([("architecture", escape(h.architecture.summary()))] if h.architecture is not None else []),
        ("perturbation", escape(pert.spec or MISSING)),
        *([("", escape(note))] if (note := structure_note(pert.details)) else []),
        ("measured sparsity", sparsity),
    ]
    calib = h.calibration
    if calib is not None:
        origin = "self-generated" if calib.file is None else escape(calib.file)
        rows.append(("calibration", f"{calib.samples}×{calib.length} tokens, {origin}, seed {calib.seed}"))
    decoding = f"sampled, seed {h.seed}" if h.sample else "greedy"
    rows += [
        ("mode", f"{escape(h.mode)} ({decoding})"),
        ("temperature", metric("temperature", h.temperature)),
        ("prompt", cut(running(h.prompt), full) + ("  (raw, no chat template)" if h.raw else "")),
        ("choices", ", ".join(repr(c) for c in h.choices) if h.choices else MISSING),
        *[("", f"note: {escape(note)}") for note in h.choice_notes or ()],
        ("steps", f"{len(session.steps)}" + ("" if session.complete else " (interrupted: no closing summary)")),
        ("created", escape(h.created or MISSING)),
    ]
    where = " ".join(escape(v) for v in (h.device, h.dtype) if v)
    if where:
        rows.append(("recorded on", where + (f", hierui {escape(h.hierui)}" if h.hierui else "")))
    for name, value in rows:
        table.add_row(name, Text(value))
    return table


# summary fields that are steps: shown counted from 1 (branch_divergence: a step of the counterfactual branch)
SUMMARY_STEPS = ("first_divergence", "end_d", "end_p", "branch_divergence")


def _summary_table(summary: dict, title: str) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in summary.items():
        table.add_row(name, step_label(value) if name in SUMMARY_STEPS else metric(name, value))
    return table


def split_line(session) -> str | None:
    """Where the two texts part, as a sentence with the step counted from 1; None without steps."""
    steps = session.steps
    if not steps:
        return None
    if session.header.mode == "free":
        first = steps[-1].get("first_divergence")
        if first is None:
            return f"the two texts never split in the {len(steps)} steps"
        return f"the texts split at step {step_label(first)}"
    first = next((s.get("step", i) for i, s in enumerate(steps) if s.get("token_d") != s.get("token_p")), None)
    if first is None:
        return f"the perturbed model picks the dense model's token at all {len(steps)} steps"
    return f"the perturbed model would first have picked another token at step {step_label(first)}"


def branch_line(branch) -> str:
    """The counterfactual branch (engine.record.branches.Branch) as a sentence, steps counted from 1 as the parent's."""
    token = cell(branch.text)
    where = f"counterfactual: the perturbed model fed the dense token “{token}” at step {step_label(branch.at)}, "
    if branch.recovered is None:
        return where + "the branch has no step to compare (the run ends there)"
    if branch.recovered:
        n = branch.recovery_steps or 0
        if n == 0:
            return where + "the perturbed model follows the dense text at once (recovered after 0 steps)"
        return (
            where + f"the perturbed model follows the dense text again after {n} step{'s' * (n != 1)} "
            f"(from step {step_label(branch.start_step + n)} on): recovered"
        )
    split = branch.steps[-1].get("first_divergence") if branch.steps else None
    again = (
        f"; they split again at step {step_label(branch.start_step + split)} (branch step {step_label(split)})"
        if split is not None
        else ""
    )
    return where + f"the texts do not agree again by the end of the run{again}: not recovered"


def _branch_table(branch, full: bool = False) -> Table:
    """The two continuations of the counterfactual branch, after the dense token it feeds."""
    table = Table(
        title=f"counterfactual branch: from step {step_label(branch.start_step)}, both fed the dense text",
        title_justify="left",
        expand=True,
    )
    table.add_column("dense", ratio=1, overflow="fold")
    table.add_column("perturbed", ratio=1, overflow="fold")
    dense = "".join(running(s.get("text_d")) for s in branch.steps)
    pert = "".join(running(s.get("text_p")) for s in branch.steps)
    table.add_row(Text(cut(dense, full)), Text(cut(pert, full)))
    return table


def _continuations_table(session, full: bool = False) -> Table:
    shared = session.header.mode != "free"
    table = Table(title="continuations", title_justify="left", expand=True)
    table.add_column("dense", ratio=1, overflow="fold")
    table.add_column(
        "perturbed (its own choice at each step, fed the dense token)" if shared else "perturbed",
        ratio=1,
        overflow="fold",
    )
    dense = "".join(running(s.get("text_d")) for s in session.steps)
    pert = "".join(running(s.get("text_p")) for s in session.steps)
    table.add_row(Text(cut(dense, full)), Text(cut(pert, full)))
    return table


def _steps_table(session) -> Table:
    choices = bool(session.header.choices) or any("sub_kl" in s for s in session.steps)
    table = Table()
    columns = [
        "step",
        "dense",
        "perturbed",
        "emb_cos[L]",
        "logit_cos",
        "prob_cos",
        "kl",
        "kl_est",
        "tv",
        "top1",
        "amp",
        "cum_kl",
    ] + (["sub_kl"] if choices else [])
    for name in columns:
        table.add_column(name, justify="left" if name in ("dense", "perturbed") else "right")
    for s in session.steps:
        emb = s.get("emb_cos") if isinstance(s.get("emb_cos"), list) and s.get("emb_cos") else [None]
        top1 = s.get("top1_agree")
        same = s.get("token_d") == s.get("token_p")
        row = [
            step_label(s.get("step")),
            Text(cell(s.get("text_d"))),
            Text(cell(s.get("text_p")), style=None if same else "red"),
            metric("emb_cos", emb[-1]),
            *[metric(k, s.get(k)) for k in ("logit_cos", "prob_cos", "kl", "kl_est", "tv")],
            MISSING if top1 is None else ("✓" if top1 else "✗"),
            metric("amp", s.get("amp")),
            metric("cum_kl", s.get("cum_kl")),
        ]
        if choices:
            row.append(metric("sub_kl", s.get("sub_kl")))
        table.add_row(*row)
    return table


def _session_files(path: Path) -> list[Path]:
    """The sessions of a directory: a `hierui batch` output (sessions/*.jsonl) or a folder of sessions."""
    for folder in (path / "sessions", path):
        files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        if files:
            return files
    raise HieruiError(f"{path} is a directory, not a session file (and it holds no sessions/*.jsonl)")


def _show_directory(path: Path) -> None:
    from engine.record.session import load_session
    from engine.record.summary import summarize

    table = Table()
    for name in ("session", "model", "perturbation", "mode", "prompt", "steps", "kl_mean", "same_top1_rate"):
        table.add_column(name, justify="right" if name in ("steps", "kl_mean", "same_top1_rate") else "left")
    interrupted = False
    for file in _session_files(path):
        try:
            s = load_session(file)
        except HieruiError as e:
            table.add_row(Text(escape(file.name)), Text(f"unreadable: {escape(str(e))}", style="red"), *[""] * 6)
            continue
        summary = s.summary if s.complete else summarize(s.steps, s.header.mode)
        interrupted |= not s.complete
        table.add_row(
            Text(escape(file.name)),
            Text(escape(s.header.display or MISSING)),
            Text(escape(s.header.perturbation.spec or MISSING)),
            Text(escape(s.header.mode)),
            Text(clip(escape(s.header.prompt), 40)),
            f"{len(s.steps)}" + ("" if s.complete else "*"),
            metric("kl_mean", summary.get("kl_mean")),
            metric("same_top1_rate", summary.get("same_top1_rate")),
        )
    console.print(Text(f"sessions in {path}", style="italic"))
    console.print(table)
    if interrupted:
        console.print("* interrupted run (no closing summary); its figures are computed from the recorded steps")
    csv = path / "summary.csv"
    if csv.is_file():
        console.print(f"batch summary table: {csv}")
    console.print("show one of them with: hierui show SESSION.jsonl [--steps]", highlight=False)


def show_path(path: Path, steps: bool, full: bool = False) -> None:
    from engine.record.session import load_session
    from engine.record.summary import summarize

    if path.is_dir():
        from hierui.views.batch import is_batch_output, show_batch

        if steps or full:  # a folder is shown as its tables or its list of sessions: no steps, nothing cut
            from engine.errors import HieruiError

            given = " and ".join(o for o, on in (("--steps", steps), ("--full", full)) if on)
            verb = "apply" if steps and full else "applies"
            raise HieruiError(f"{given} only {verb} to a session file; {path} is a folder: show one of its sessions")

        if is_batch_output(path):  # a `hierui batch` output: the report's table and charts
            show_batch(path, console)
            return
        _show_directory(path)
        return
    session = load_session(path)
    print_warnings(session.warnings)
    console.print(Text(f"session {escape(str(session.path))}", style="italic"))
    console.print(_session_header_table(session, full))
    if session.steps:
        console.print(_continuations_table(session, full))
        console.print(split_line(session), highlight=False)
    if session.branch is not None:
        if session.branch.steps:
            console.print(_branch_table(session.branch, full))
        console.print(Text(branch_line(session.branch)), highlight=False)
    elif session.complete and "recovered" in session.summary:  # counterfactual on, but nothing split
        console.print("counterfactual: no divergence, so no branch", highlight=False)
    if session.complete:
        console.print(_summary_table(session.summary, "summary"))
    else:
        console.print(
            f"the run was interrupted: no closing summary; computed from the {len(session.steps)} recorded steps:",
            style="yellow",
            highlight=False,
        )
        console.print(_summary_table(summarize(session.steps, session.header.mode), "summary (computed)"))
    if steps and session.steps:
        console.print("steps (step 1 = the first generated token)", highlight=False)
        console.print(_steps_table(session))


def print_comparison(session, result, tol: float) -> None:
    h = session.header
    console.print(
        Text(
            f"{escape(h.display)} · {escape(h.perturbation.spec)}"
            f" · {escape(h.mode)} · {result.recorded} recorded steps, {result.rerun} recomputed"
        )
    )
    console.print("largest absolute deviation per metric, recording vs recomputation:", highlight=False)
    table = Table()
    table.add_column("metric")
    table.add_column("max |Δ|", justify="right")
    for name, value in result.deviations.items():
        label = "null vs number, or missing" if value == float("inf") else f"{value:.3e}"
        table.add_row(name, label, style="red" if value >= tol else None)
    console.print(table)
    for note in result.notes:
        console.print(note, highlight=False)
    if result.tokens_match:
        console.print(f"tokens: all {result.recorded} steps match", highlight=False)
    else:
        i = result.first_token_mismatch
        console.print(f"tokens: differ, first at step {step_label(i)}", style="red", highlight=False)
    if result.topk_id_mismatches:
        console.print(f"top-k token lists differ at {result.topk_id_mismatches} step(s)", highlight=False)
    worst = max(result.deviations, key=result.deviations.get, default=None)
    if worst is not None:
        verdict = "below" if result.max_deviation < tol else "NOT below"
        console.print(
            f"max deviation {result.max_deviation:.3e} ({worst}), {verdict} the tolerance {tol:g}", highlight=False
        )
    console.print(
        "rerun matches the recording" if result.ok(tol) else "rerun does NOT match the recording",
        style="green" if result.ok(tol) else "bold red",
        highlight=False,
    )


def print_branch_comparison(result, tol: float) -> None:
    """How the rerun's counterfactual branch compares with the recorded one (engine.run.rerun.compare_branch)."""
    for note in result.notes:
        console.print(note, highlight=False)
    if result.tokens_match:
        tokens = f"all {result.recorded} steps match"
    else:
        tokens = f"differ, first at branch step {step_label(result.first_token_mismatch)}"
    worst = max(result.deviations, key=result.deviations.get, default=None)
    deviation = f", max deviation {result.max_deviation:.3e} ({worst})" if worst is not None else ""
    console.print(
        f"counterfactual branch: tokens {tokens}{deviation}: "
        + ("matches the recording" if result.ok(tol) else "does NOT match the recording"),
        style=None if result.ok(tol) else "bold red",
        highlight=False,
    )
