"""Metric series over steps (plotext): per-step KL, cumulative KL, 1 − cos in each space."""

from __future__ import annotations

from textual.reactive import reactive
from textual_plotext import PlotextPlot

FLOOR = 1e-7  # log scale: zero divergence is drawn at the floor


class SeriesChart(PlotextPlot):
    BORDER_TITLE = "over steps"
    records: reactive[list] = reactive(list, always_update=True)
    selected: reactive[int | None] = reactive(None)

    def _redraw(self) -> None:
        self.show(self.records, self.selected)

    watch_records = watch_selected = _redraw

    def show(self, records: list[dict], selected: int | None) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("divergence over steps (log scale)")
        if records:
            steps = [r["step"] for r in records]

            def series(values):
                return [max(v, FLOOR) if v is not None else FLOOR for v in values]

            plt.plot(steps, series(r.get("kl") for r in records), label="KL", marker="braille")
            plt.plot(steps, series(r.get("cum_kl") for r in records), label="cum KL", marker="braille")
            plt.plot(
                steps,
                series(1 - (r.get("emb_cos") or [1.0])[-1] for r in records),
                label="1−cos hidden",
                marker="braille",
            )
            plt.plot(
                steps, series(1 - (r.get("logit_cos") or 1.0) for r in records), label="1−cos logit", marker="braille"
            )
            plt.plot(
                steps, series(1 - (r.get("prob_cos") or 1.0) for r in records), label="1−cos prob", marker="braille"
            )
            plt.yscale("log")
            if selected is not None:
                plt.vline(selected, "white")
            plt.xlim(0, max(steps[-1], 1))
        self.refresh()
