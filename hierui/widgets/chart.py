"""Metric series over steps (plotext): per-step KL, cumulative KL, 1 − cos in each space."""

from __future__ import annotations

from textual.reactive import reactive
from textual_plotext import PlotextPlot

FLOOR = 1e-7  # log scale: zero divergence is drawn at the floor
SERIES = (  # (label, value of a step record)
    ("KL", lambda r: r.get("kl")),
    ("cum KL", lambda r: r.get("cum_kl")),
    ("1−cos hidden", lambda r: 1 - (r.get("emb_cos") or [1.0])[-1]),
    ("1−cos logit", lambda r: 1 - (r.get("logit_cos") or 1.0)),
    ("1−cos prob", lambda r: 1 - (r.get("prob_cos") or 1.0)),
)


class SeriesChart(PlotextPlot):
    """Redrawn from its records at every render: plotext's build transforms the data it holds in place
    (log scale), so a figure is never built twice (a resize re-renders)."""

    BORDER_TITLE = "over steps"
    records: reactive[list] = reactive(list, always_update=True)
    selected: reactive[int | None] = reactive(None)

    def _draw(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("divergence over steps (log scale)")
        if not self.records:
            return
        steps = [r["step"] for r in self.records]
        for label, value in SERIES:
            values = [value(r) for r in self.records]
            plt.plot(steps, [max(v, FLOOR) if v is not None else FLOOR for v in values], label=label, marker="braille")
        plt.yscale("log")
        if self.selected is not None:
            plt.vline(self.selected, "white")
        plt.xlim(0, max(steps[-1], 1))

    def render(self):
        self._draw()
        return super().render()
