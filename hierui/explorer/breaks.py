"""Where it breaks, the explorer's keys for it: the layer × step map (v), attributing the selected step (a),
branching from one of its top-k alternatives into a new run (b) and back to the parent run (u), and the
counterfactual branch's line under the texts."""

from __future__ import annotations

from functools import partial

from textual.widgets import ContentSwitcher, Static

from engine.record.branches import branch_prefix
from hierui.explorer.state import AppState
from hierui.explorer.texts import fed_text
from hierui.explorer.widgets.attribution import AttributionPanel
from hierui.explorer.widgets.branch import BranchChooser
from hierui.explorer.widgets.heatmap import HeatmapPanel
from hierui.format import step_label
from hierui.tokentext import cell


class BreakActions:
    """Mixed into hierui.explorer.app.HieruiApp: needs its live run and pair, keeps the attributions it computed
    (`_attributions`) and the runs branched from (`_parents`), and starts its attribution worker."""

    def action_heat_view(self) -> None:
        heatmap = self.query_one("#heatmap", HeatmapPanel)
        heatmap.toggle()
        self.call_after_refresh(heatmap.scroll_visible, top=True, animate=False)

    def _selected_record(self, what: str) -> dict | None:
        """The selected step's record, or None after saying why there is none."""
        if self.selected is None or not self.records:
            self.notify(f"no step selected: step first, then {what}", severity="warning")
            return None
        return self.records[min(self.selected, len(self.records) - 1)]

    def _needs_models(self, what: str) -> bool:
        """Refuse (one line) where the models are not there: a replay, or while they load."""
        if self.replay:
            spec, model = self.header.perturbation.spec or "SPEC", self.header.model or "MODEL"
            self.notify(
                f"{what} needs the models, and a replay loads none: explore this prompt live "
                f"(hierui explore --model {model} --prune {spec}) and press the key there",
                severity="warning",
                timeout=12,
            )
            return True
        if self.pair is None or self.live is None:
            self.notify(f"{what} needs the models: they are not ready yet", severity="warning")
            return True
        return False

    # ------------------------------------------------------------ attribution

    def action_attribute(self) -> None:
        panel = self.query_one("#attribution", AttributionPanel)
        switch = self.query_one("#switch", ContentSwitcher)
        step = self.selected
        if switch.current == "attribution" and panel.step == step and step is not None:
            switch.current = "chart"  # a again on the step shown: back to the chart
            return
        if self._needs_models("attribution") or self._selected_record("attribute it") is None:
            return
        from engine.run.attribution import same_context

        record = self.records[step]
        switch.current = "attribution"
        cached = self._attributions.get((id(self.source), step))
        if cached is not None and cached[0] is self.source:
            panel.show_result(step, cached[1], record)
        else:
            if record.get("kl") is None:
                panel.note(f"step {step_label(step)} compares nothing (a model had ended): nothing to attribute", step)
                return
            if not same_context(self.records, step):
                self.notify(
                    "the texts split before this step: both models are given the perturbed model's context",
                    severity="warning",
                )
            self._pause("attribute")
            self.follow = False  # a step in flight lands without moving the selection off the attributed one
            panel.running(step)
            self._attribute(self.live, self.run_id, step)
        self.call_after_refresh(switch.scroll_visible, top=True, animate=False)  # the compact layout scrolls

    # ------------------------------------------------------------ branches

    def action_branch(self) -> None:
        if self._needs_models("branching") or (record := self._selected_record("branch from it")) is None:
            return
        if not record.get("topk_p") and not record.get("topk_d"):
            self.notify("no top-k alternatives at this step (a model had ended)", severity="warning")
            return
        fed = (record.get("fed") or [None, None])[1]
        self.push_screen(BranchChooser(record, fed), callback=partial(self._branch_from, record["step"]))

    def _branch_from(self, step: int, choice: tuple[int, str] | None) -> None:
        """Continue the perturbed model's context before `step` with the chosen token: a new run, its session
        linked to this one; this run stays open to come back to (u)."""
        if choice is None:
            return
        from engine.errors import HieruiError
        from hierui.explorer.live import LiveRun

        token, text = choice
        parent = self.live
        prefix, start = branch_prefix(parent.header, parent.records, step, token)
        self._pause("branch")
        link = {"session": str(parent.path), "step": step, "token": int(token), "text": text}
        try:
            run = LiveRun(
                self.pair,
                parent.stepper.prompt,
                parent.settings,
                self.session_dir,
                prefix=prefix,
                start_step=start,
                parent=link,
            )
        except HieruiError as e:
            self.notify(str(e), title="cannot branch", severity="error", timeout=30)
            return
        lead = (self.lead[0] + self.lead[1] if self.lead else "") + fed_text(parent.records[:step]), text
        self._parents.append((parent, self.selected, self.lead))
        self._adopt(run, notes=False, lead=lead)
        self.state = AppState.READY
        self.notify(f"branch of step {step_label(step)} with {cell(text)}: a new session (u: back to the parent)")
        self.action_toggle_run()

    def action_parent(self) -> None:
        if not self._parents:
            self.notify("this run is not a branch", severity="warning")
            return
        branch = self.source
        self._go.clear()
        branch.close()
        parent, selected, lead = self._parents.pop()
        self._adopt(parent, notes=False, lead=lead)
        if selected is not None and self.records:
            self.selected = min(selected, len(self.records) - 1)
            self.follow = self.selected == len(self.records) - 1
        self.state = AppState.DONE if parent.finished else (AppState.PAUSED if self.records else AppState.READY)
        self.notify(f"back to the parent run; the branch is in {branch.path}")

    # ------------------------------------------------------------ the counterfactual branch (--counterfactual)

    def _show_counterfactual(self, line: str) -> None:
        widget = self.query_one("#counterfactual", Static)
        widget.display = bool(line)
        widget.update(line)
