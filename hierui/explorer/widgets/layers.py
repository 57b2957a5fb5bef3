"""Embedding space: hidden-state cosine per layer for the selected step, with the theory estimate.

The top two lines stay in view: a strip of 1 − cos over the layers (emb … out) and the final normed
state (the value the hierarchy panel quotes). Below them every layer, ℓ = emb, 1 … L−1, out: the panel
scrolls with the mouse, or with ↑/↓/pgup/pgdn once focused (tab or a click).
"""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.reactive import reactive
from textual.widgets import Static

from hierui.explorer.widgets.scale import drift_color
from hierui.format import cos_estimate, ended_note, metric

BAR = 8


def strip(drift: list, width: int) -> Text:
    """1 − cos per layer as coloured cells, `width` cells at most (several layers per cell: the worst)."""
    text = Text()
    cells = max(1, min(len(drift), width))
    for i in range(cells):
        group = drift[i * len(drift) // cells : (i + 1) * len(drift) // cells] or [None]
        known = [d for d in group if d is not None]
        text.append("█", style=drift_color(max(known) if known else None))
    return text


class LayerPanel(Static, can_focus=True):
    BORDER_TITLE = "embedding space: cos per layer"
    BINDINGS = [
        Binding("up", "scroll_up", "Layers ↑", show=False),
        Binding("down", "scroll_down", "Layers ↓", show=False),
        Binding("pageup", "page_up", "Layers page ↑", show=False),
        Binding("pagedown", "page_down", "Layers page ↓", show=False),
    ]
    record: reactive[dict | None] = reactive(None)

    def watch_record(self) -> None:
        self.show(self.record)

    def on_resize(self) -> None:
        self.show(self.record)

    def show(self, record: dict | None) -> None:
        if record is None or not record.get("emb_cos"):
            self.update(Text(ended_note(record) or "hidden states: no step selected", style="dim"))
            return
        cos = record["emb_cos"]
        est = record.get("emb_cos_est") or [None] * len(cos)
        drift = [None if c is None else 1.0 - c for c in cos]
        top = max((d for d in drift if d is not None), default=0.0) or 1.0
        last = len(cos) - 1
        width = max(self.content_size.width, 20)
        text = Text()
        text.append("1−cos emb ", style="dim")
        text.append_text(strip(drift, width - 14))
        text.append(" out\n", style="dim")
        text.append(f"  out {metric('emb_cos', cos[-1]):>7} {cos_estimate(est[-1], cos[-1]):>7}", style="bold")
        text.append(" ← final\n", style="dim")
        text.append(" layer   cos   theory  1−cos\n", style="bold")
        for layer, (c, e, d) in enumerate(zip(cos, est, drift)):
            name = "emb" if layer == 0 else ("out" if layer == last else f"{layer:>3}")
            filled = 0 if d is None else max(0, min(BAR, round(BAR * d / top)))
            text.append(f"  {name:>3} {metric('emb_cos', c):>7} {cos_estimate(e, c):>7} ")
            text.append("▇" * filled, style=drift_color(d))
            text.append(" " * (BAR - filled) + ("\n" if layer < last else ""))
        self.update(text)
