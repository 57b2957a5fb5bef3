"""The dense and perturbed continuations, each token coloured by the KL of its step."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from engine.settings import StepSettings
from hierui.tokentext import running
from hierui.widgets.scale import kl_color


class Continuation(Static):
    """Tokens of one model up to the end of the run; the selected step is underlined and bold."""

    def __init__(self, side: str, **kwargs):
        super().__init__("", **kwargs)
        self.side = side  # "d" or "p"

    records: reactive[list] = reactive(list, always_update=True)
    selected: reactive[int | None] = reactive(None)
    settings: reactive[StepSettings] = reactive(StepSettings)
    header: reactive[dict] = reactive(dict)

    def _redraw(self) -> None:
        if self.side == "d":
            self.border_title = "dense"
        else:
            spec = (self.header.get("perturbation") or {}).get("spec")
            title = f"perturbed ({spec})" if spec else "perturbed"
            self.border_title = title + (" · own picks, dense context" if self.settings.mode == "shared" else "")
        self.show(self.records, self.selected)

    watch_records = watch_selected = watch_settings = watch_header = _redraw

    def show(self, records: list[dict], selected: int | None) -> None:
        text = Text()
        key = f"text_{self.side}"
        for r in records:
            style = f"on {kl_color(r.get('kl'))}"
            if r["step"] == selected:
                style += " bold underline reverse"
            elif self.side == "p" and r.get("token_p") != r.get("token_d"):
                style += " italic"
            text.append(running(r.get(key, "")), style=style)
        if not records:
            text.append("(no steps yet: press space to step, r to run)", style="dim")
        self.update(text)
