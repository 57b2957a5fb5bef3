"""The header line: model, spec, sparsity, mode, T, the selected step and the app's state."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from engine.settings import StepSettings
from hierui.format import MISSING

STATE_LABELS = {
    "loading": "⏳ loading",
    "ready": "● ready",
    "running": "▶ running",
    "paused": "⏸ paused",
    "done": "■ done",
    "failed": "✖ failed",
    "replay": "↺ replay",
    "playing": "▶ playing",
}
NARROW = 110  # below this width the line drops the least useful parts


class InfoBar(Widget):
    state = reactive("loading")
    header: reactive[dict] = reactive(dict)
    settings: reactive[StepSettings] = reactive(StepSettings)
    records: reactive[list] = reactive(list, always_update=True)
    selected: reactive[int | None] = reactive(None)
    total = reactive(0)

    def __init__(self, hint: str = "", **kwargs):
        super().__init__(**kwargs)
        self.hint = hint  # what was asked for, shown until the header is known

    def line(self) -> str:
        h = self.header or {}
        pert = h.get("perturbation") or {}
        narrow = self.size.width and self.size.width < NARROW
        if pert.get("spec"):
            model = str(h.get("model_display") or h.get("model") or "")
            parts = [model.replace(" (embedded)", "") if narrow else model, str(pert["spec"])]
        else:  # still loading: what was asked for
            parts = [self.hint or "hierui"]
        sparsity = pert.get("measured_sparsity")
        if isinstance(sparsity, (int, float)) and sparsity:
            parts.append(f"sparsity {sparsity:.1%}")
        parts.append(self.settings.mode)
        parts.append(f"T={self.settings.temperature:g}")
        step = MISSING if self.selected is None else str(self.selected + 1)
        parts.append(f"step {step}/{len(self.records)}" + ("" if narrow else f" (max {self.total})"))
        state = getattr(self.state, "value", self.state)
        parts.append(STATE_LABELS.get(state, str(state)))
        return " · ".join(parts)

    def render(self) -> Text:
        return Text(self.line())
