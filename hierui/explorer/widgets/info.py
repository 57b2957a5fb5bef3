"""The header line: model, spec, sparsity, calibration, mode, T, the selected step and the app's state.

A branch says so (⑂ branch of step N). It always fits one line: the least useful parts go first (calibration,
what T changes, the step limit, sparsity), then the model's name is shortened; the state (ready, running, done,
replay …) always shows.
"""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from engine.perturb.calibration import describe_calibration
from engine.record.header import SessionHeader, header_of
from engine.record.settings import StepSettings
from hierui.format import MISSING
from hierui.tokentext import clip, escape

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
SEP = " · "


def short_model(name: str) -> str:
    """SmolLM2-135M-Instruct (embedded) → SmolLM2-135M; a path or hub id → its last part."""
    name = name.replace(" (embedded)", "").rsplit("/", 1)[-1]
    return name.removesuffix("-Instruct").removesuffix("-instruct")


class InfoBar(Widget):
    state = reactive("loading")
    header: reactive[SessionHeader] = reactive(SessionHeader)
    settings: reactive[StepSettings] = reactive(StepSettings)
    records: reactive[list] = reactive(list, always_update=True)
    selected: reactive[int | None] = reactive(None)
    total = reactive(0)
    validate_header = staticmethod(header_of)  # a header set as a dict is read as a SessionHeader

    def __init__(self, hint: str = "", **kwargs):
        super().__init__(**kwargs)
        self.hint = hint  # what was asked for, shown until the header is known

    def parts(self, level: int) -> list[str]:
        """The line's parts at a level of detail: 0 everything, higher levels leave more out."""
        h = self.header
        model = escape(h.display or "")  # header text from a file: escaped
        s = self.settings
        spec = escape(h.perturbation.spec or "")
        out = [model if level < 5 else short_model(model), spec] if spec else [escape(self.hint)]
        if h.parent is not None and h.parent.step is not None:  # a branch: of which step
            out.append(f"⑂ branch of step {h.parent.step + 1}")
        sparsity = h.perturbation.measured_sparsity
        if sparsity and level < 4:
            out.append(f"sparsity {sparsity:.1%}")
        calib = h.calibration.to_dict() if h.calibration is not None else {}
        if calib and level < 1:
            out.append(describe_calibration(calib))
        if h.architecture is not None and level < 1:
            out.append(escape(h.architecture.summary()))
        out.append(s.mode)
        decoding = f"sampled, seed {s.seed}" if s.sample else "greedy"
        out.append(f"T={s.temperature:g} (probabilities; {decoding})" if level < 2 else f"T={s.temperature:g}")
        step = MISSING if self.selected is None else str(self.selected + 1)
        out.append(f"step {step}/{len(self.records)}" + (f" (max {self.total})" if level < 3 else ""))
        return out

    def line(self) -> str:
        width = self.size.width - 2 if self.size.width else 10_000  # padding 0 1
        state = STATE_LABELS.get(getattr(self.state, "value", self.state), str(self.state))
        for level in range(6):
            text = SEP.join([*self.parts(level), state])
            if len(text) <= width:
                return text
        rest = SEP.join(self.parts(5)[1:] + [state])  # the model's name is cut last
        return SEP.join([clip(self.parts(5)[0], max(width - len(rest) - len(SEP), 4)), rest])

    def render(self) -> Text:
        return Text(self.line(), no_wrap=True, overflow="ellipsis")
