"""Recording a run: the session header of a pair's run and the SessionRecorder that steps a stepper and writes each
row to its session file (engine.record.session) as it goes."""

from __future__ import annotations

from pathlib import Path

from engine.record.header import Perturbation, SessionHeader
from engine.record.session import Session, SessionWriter


def session_header(pair, settings, row, tie_margin: tuple[float, str] | None = None) -> SessionHeader:
    """The header of one row's session (the writer stamps format, version, created and hierui).

    `pair`: an engine.perturb.pair.ModelPair; `settings`: the engine.record.settings.StepSettings the row is stepped
    with; `row`: the stepper's row (prompt, ids, choices, choice ids, notes); `tie_margin`: the near-tie
    threshold the stepper used and where it came from (BatchStepper.tie_margin, .tie_margin_source)."""
    from engine.record.architecture import describe as describe_architecture

    report = pair.report
    loaded = pair.loaded
    perturbation = Perturbation(spec=str(pair.spec))
    if report is not None:
        perturbation = Perturbation(str(pair.spec), report.measured_sparsity, report.dense_sparsity, report.details)
    model = loaded.ref.name if loaded is not None else getattr(pair.dense.config, "name_or_path", "")
    first = pair.dense.get_input_embeddings().weight
    margin, source = tie_margin if tie_margin else (None, None)
    return SessionHeader(
        model=model,
        model_display=loaded.ref.display if loaded is not None else model,
        perturbation=perturbation,
        calibration=report.calibration if report is not None else None,
        prompt=row.prompt,
        prompt_tokens=len(row.ids),
        prompt_ids=row.ids,
        truncated_from=getattr(row, "truncated_from", None),
        mode=settings.mode,
        temperature=settings.temperature,
        choices=list(row.choices) if row.choices else None,
        choice_ids=list(row.choice_ids) or None,
        choice_notes=list(row.notes) or None,
        seed=settings.seed,
        sample=settings.sample,
        max_new_tokens=settings.max_new_tokens,
        raw=settings.raw,
        topk=settings.topk,
        lens=settings.lens,
        tie_margin=margin,
        tie_margin_source=source,
        prefix_ids=getattr(row, "prefix_ids", None) or (),
        start_step=getattr(row, "start_step", 0),
        parent=getattr(row, "parent", None),
        counterfactual=bool(getattr(settings, "counterfactual", False)) and settings.mode == "free",
        layers=pair.dense.config.num_hidden_layers,
        architecture=describe_architecture(pair.dense.config),
        device=str(first.device),
        dtype=str(first.dtype).removeprefix("torch."),
        # engine.run.plan's estimate made before loading: {peak_bytes, peak_stage, placement, fits, …}
        plan=getattr(pair, "plan", None) or None,
    )


class SessionRecorder:
    """Steps a stepper and writes each of its rows to its own session file as it goes: the one recording
    path of `hierui batch`, `hierui replay --rerun` and the explorer.

    `stepper`: an engine.run.stepper.BatchStepper, or a Stepper (one row); `paths`: one file per row. A row's
    file is opened at its first recorded step (header, then every step so far, each flushed) and gets its
    closing summary as soon as the row finishes. `close(summary=False)` ends the others without one (an
    interrupted run, rerun later); `close(summary=True)` ends them with a summary of the steps taken (the
    explorer's restart or quit: the user ended the run there).

    With `counterfactual` on in free mode, the rows' files stay open until every row has finished; then the
    counterfactual branches are stepped (engine.run.branch.counterfactuals, all rows at once) and each file is closed
    with its summary, the branch's fields and the branch. A run ended before it finished gets no branch.
    """

    def __init__(self, stepper, paths: list):
        self.stepper = getattr(stepper, "batch", stepper)
        self.paths = [Path(p) for p in paths]
        if len(self.paths) != len(self.stepper.rows):
            raise ValueError("one session path per row")
        self.writers: list[SessionWriter | None] = [None] * len(self.paths)
        self._written = [0] * len(self.paths)
        settings = self.stepper.settings
        self.counterfactual = bool(getattr(settings, "counterfactual", False)) and settings.mode == "free"
        self.branches: list = [None] * len(self.paths)  # engine.record.branches.Branch per row, once computed

    @property
    def finished(self) -> bool:
        return self.stepper.finished

    @property
    def started(self) -> bool:
        return any(w is not None for w in self.writers)

    def header(self, b: int) -> SessionHeader:
        s = self.stepper
        return session_header(s.pair, s.settings, s.rows[b], (s.tie_margin, s.tie_margin_source))

    def step(self) -> list[dict | None]:
        """One step of every unfinished row, written before it is returned."""
        records = self.stepper.step()
        for b, record in enumerate(records):
            if record is not None:
                self._flush(b)
        if self.counterfactual and self.stepper.finished:
            self._close_with_branches()
        return records

    def _close_with_branches(self) -> None:
        """Step every row's counterfactual branch, then close each file with its summary and branch."""
        from engine.record.branches import branch_summary
        from engine.record.summary import summarize
        from engine.run.branch import counterfactuals

        if all(w is None or w.closed for w in self.writers):
            return
        self.branches = counterfactuals(self.stepper.pair, self.stepper)
        for writer, row, branch in zip(self.writers, self.stepper.rows, self.branches):
            if writer is None or writer.closed:
                continue
            summary = {**summarize(row.records, self.stepper.settings.mode), **branch_summary(branch)}
            writer.close(summary, branch.to_dict() if branch is not None else None)

    def _flush(self, b: int) -> None:
        """Write row b's records not yet in its file (opening it first), and its summary once it finished."""
        from engine.record.summary import summarize

        row = self.stepper.rows[b]
        if self.writers[b] is None:
            self.writers[b] = SessionWriter(self.paths[b], self.header(b))
        writer = self.writers[b]
        for record in row.records[self._written[b] :]:
            writer.write_step(record)
        self._written[b] = len(row.records)
        if row.finished and not self.counterfactual:  # counterfactual: closed with the branches (step)
            writer.close(summarize(row.records, self.stepper.settings.mode))

    def run(self, callback=None, stop=None) -> list[Session]:
        """Step to the end (or until `stop()` is true); `callback(row_index, record)` after each record.

        Ctrl-C or an error keeps every step written so far, without a summary (an interrupted run)."""
        try:
            while not self.finished:
                if stop is not None and stop():
                    break
                for b, record in enumerate(self.step()):
                    if record is not None and callback is not None:
                        callback(b, record)
        finally:
            self.close(summary=False)
        return self.sessions()

    def close(self, summary: bool) -> None:
        """End every open session; with `summary`, each gets its closing summary over the steps taken."""
        from engine.record.summary import summarize

        for b, writer in enumerate(self.writers):
            if writer is None or writer.closed:
                continue
            row = self.stepper.rows[b]
            writer.close(summarize(row.records, self.stepper.settings.mode) if summary else None)

    def sessions(self) -> list[Session]:
        """What each row's file holds now (rows never recorded have an empty session)."""
        out = []
        for b, row in enumerate(self.stepper.rows):
            writer = self.writers[b]
            out.append(
                Session(
                    path=self.paths[b],
                    header=writer.header if writer else self.header(b),
                    steps=list(row.records),
                    summary=writer.summary if writer else None,
                    branch=self.branches[b] if writer and writer.summary is not None else None,
                )
            )
        return out
