"""Embedding space: hidden-state cosine per layer for the selected step, with the theory estimate."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from hierui.format import metric
from hierui.widgets.scale import drift_color

BAR = 10


class LayerPanel(Static):
    BORDER_TITLE = "embedding space: cos per layer"
    record: reactive[dict | None] = reactive(None)

    def watch_record(self) -> None:
        self.show(self.record)

    def show(self, record: dict | None) -> None:
        if record is None or not record.get("emb_cos"):
            self.update(Text("hidden states: no step selected", style="dim"))
            return
        cos = record["emb_cos"]
        est = record.get("emb_cos_est") or [None] * len(cos)
        drift = [None if c is None else 1.0 - c for c in cos]
        top = max((d for d in drift if d is not None), default=0.0) or 1.0
        text = Text()
        for d in drift:
            text.append("█", style=drift_color(d))
        text.append("\n")
        text.append(" layer   cos     theory  1−cos\n", style="bold")
        last = len(cos) - 1
        for layer, (c, e, d) in enumerate(zip(cos, est, drift)):
            name = "emb" if layer == 0 else ("out" if layer == last else f"{layer:>3}")
            filled = 0 if d is None else max(0, min(BAR, round(BAR * d / top)))
            text.append(f" {name:>5} {metric('emb_cos', c):>7} {metric('emb_cos_est', e):>7} ")
            text.append("▇" * filled, style=drift_color(d))
            text.append(" " * (BAR - filled) + "\n")
        self.update(text)
