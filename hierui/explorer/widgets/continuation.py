"""The dense and perturbed continuations, each token coloured by the KL of its step.

In a branch, each text starts with the end of the context it continues (dim) and the chosen token (marked ⑂)."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from engine.perturb.calibration import describe_calibration
from engine.record.header import SessionHeader, header_of
from engine.record.settings import StepSettings
from hierui.explorer.widgets.scale import kl_color
from hierui.format import step_label
from hierui.tokentext import escape, running, token

LEAD_CHARS = 60  # a branch shows this much of the text it continues


class Continuation(Static):
    """Tokens of one model up to the end of the run; the selected step is underlined and bold."""

    def __init__(self, side: str, **kwargs):
        super().__init__("", **kwargs)
        self.side = side  # "d" or "p"

    records: reactive[list] = reactive(list, always_update=True)
    selected: reactive[int | None] = reactive(None)
    settings: reactive[StepSettings] = reactive(StepSettings)
    header: reactive[SessionHeader] = reactive(SessionHeader)
    lead: reactive[tuple] = reactive(tuple)  # a branch: (the context's text before it, the chosen token's text)
    validate_header = staticmethod(header_of)  # a header set as a dict is read as a SessionHeader

    def _redraw(self) -> None:
        if self.side == "d":
            self.border_title = "dense"
        else:
            spec = self.header.perturbation.spec
            title = f"perturbed ({escape(spec)})" if spec else "perturbed"
            note = " · own picks, dense context" if self.settings.mode == "shared" else ""
            # the whole title where it fits the border, else without the note
            fits = not self.size.width or len(title + note) + 6 <= self.size.width
            self.border_title = title + (note if fits else "")
            calib = self.header.calibration.to_dict() if self.header.calibration is not None else {}
            self.border_subtitle = describe_calibration(calib) if calib else ""
        self.show(self.records, self.selected)

    watch_records = watch_selected = watch_settings = watch_header = watch_lead = _redraw

    def on_resize(self) -> None:
        self._redraw()

    def show(self, records: list[dict], selected: int | None) -> None:
        """Each token on its step's KL colour (grey where nothing was compared: the other side had ended);
        the perturbed model's picks that differ from the dense one in italics; this side's end marked."""
        text = Text()
        if self.lead:  # a branch: the end of the context it continues, dim, and the chosen token marked
            before, chosen = self.lead
            tail = before[-LEAD_CHARS:]
            text.append(("…" if len(before) > LEAD_CHARS else "") + running(tail), style="dim")
            text.append(token(chosen), style="bold magenta underline")
            text.append("⑂", style="bold magenta")
        key, end_key = f"text_{self.side}", f"end_{self.side}"
        for r in records:
            style = f"on {kl_color(r.get('kl'))}"
            if r["step"] == selected:
                style += " bold underline reverse"
            elif self.side == "p" and None not in (r.get("token_p"), r.get("token_d")) and r["token_p"] != r["token_d"]:
                style += " italic"
            text.append(token(r.get(key, "")), style=style)
            if r.get(end_key) == r["step"]:  # this model emitted end-of-sequence at this step
                text.append(f" ⏹ end (step {step_label(r['step'])})", style="bold")
        if not records:
            text.append("(no steps yet: press space to step, r to run)", style="dim")
        self.update(text)
