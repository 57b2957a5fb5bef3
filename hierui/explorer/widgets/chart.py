"""Metric series over steps (plotext): per-step KL, cumulative KL, 1 − cos in each space.

The legend is the panel's bottom border (the series' names in their colours), so it shows at every size;
steps are numbered from 1, as everywhere on screen.
"""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual_plotext import PlotextPlot

FLOOR = 1e-7  # log scale: zero divergence is drawn at the floor


def _gap(cos) -> float | None:
    return None if cos is None else 1 - cos


SERIES = (  # (label, plotext colour, the same colour for the legend, value of a step record or None)
    ("KL", "red", "red", lambda r: r.get("kl")),
    ("cum KL", "orange", "dark_orange", lambda r: r.get("cum_kl")),
    ("1−cos hidden", "cyan", "cyan", lambda r: _gap((r.get("emb_cos") or [None])[-1])),
    ("1−cos logit", "green", "green", lambda r: _gap(r.get("logit_cos"))),
    ("1−cos prob", "magenta", "magenta", lambda r: _gap(r.get("prob_cos"))),
)


def legend() -> Text:
    text = Text()
    for i, (label, _color, rich_color, _value) in enumerate(SERIES):
        text.append(" ━ " if i == 0 else "  ━ ", style=rich_color)
        text.append(label)
    return text + Text(" ")


class SeriesChart(PlotextPlot):
    """Redrawn from its records at every render: plotext's build transforms the data it holds in place
    (log scale), so a figure is never built twice (a resize re-renders)."""

    BORDER_TITLE = "over steps"
    records: reactive[list] = reactive(list, always_update=True)
    selected: reactive[int | None] = reactive(None)

    def on_mount(self) -> None:
        self.border_subtitle = legend()

    def _draw(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("divergence over steps (log scale)")
        if not self.records:
            return
        steps = [r["step"] + 1 for r in self.records]  # on screen steps count from 1
        for _label, color, _rich, value in SERIES:
            # a step where nothing was compared (one side had ended) is a gap, not a point at the floor
            points = [(step, v) for step, v in zip(steps, map(value, self.records)) if v is not None]
            if points:
                xs, ys = zip(*points)
                plt.plot(list(xs), [max(v, FLOOR) for v in ys], color=color, marker="braille")
        plt.yscale("log")
        if self.selected is not None:
            plt.vline(self.selected + 1, "white")
        last = max(steps[-1], 2)
        plt.xlim(1, last)
        every = 5 if last <= 40 else 10 if last <= 120 else 50
        ticks = sorted({1, *range(every, last + 1, every), last})
        plt.xticks(ticks, [str(t) for t in ticks])
        plt.xlabel("step")

    def render(self):
        self._draw()
        return super().render()
