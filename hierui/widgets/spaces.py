"""The hierarchy at the selected step: hidden → logit → probability, measured beside theory."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from engine.settings import StepSettings
from hierui.format import MISSING, metric
from hierui.widgets.scale import kl_color


class SpacesPanel(Static):
    BORDER_TITLE = "hierarchy: measured vs theory"
    record: reactive[dict | None] = reactive(None)
    settings: reactive[StepSettings] = reactive(StepSettings)

    def _redraw(self) -> None:
        self.show(self.record, self.settings.temperature)

    watch_record = watch_settings = _redraw

    def show(self, record: dict | None, temperature: float) -> None:
        if record is None:
            self.update(Text("no step selected", style="dim"))
            return
        table = Table(box=None, padding=(0, 1), show_edge=False, expand=True)
        table.add_column("space", style="bold", no_wrap=True)
        table.add_column("measured", justify="right", no_wrap=True)
        table.add_column("theory", justify="right", no_wrap=True)
        emb = record.get("emb_cos") or [None]
        est = record.get("emb_cos_est") or [None]
        kl = record.get("kl")
        amp = record.get("amp")
        table.add_row("hidden cos", metric("emb_cos", emb[-1]), metric("emb_cos_est", est[-1]))
        table.add_row("logit cos", metric("logit_cos", record.get("logit_cos")), "")
        table.add_row("logit rel", metric("logit_rel", record.get("logit_rel")), "")
        table.add_row(
            f"prob cos T{temperature:g}",
            metric("prob_cos", record.get("prob_cos")),
            metric("prob_cos_est", record.get("prob_cos_est")),
        )
        table.add_row(
            Text("KL", style=f"bold on {kl_color(kl)}"), metric("kl", kl), metric("kl_est", record.get("kl_est"))
        )
        table.add_row("amp", MISSING if amp is None else f"{metric('amp', amp)}×", "")
        table.add_row("JS", metric("js", record.get("js")), "")
        table.add_row("TV", metric("tv", record.get("tv")), "")
        table.add_row("top-1 agree", "yes" if record.get("top1_agree") else "no", "")
        table.add_row("top-k share", metric("topk_overlap", record.get("topk_overlap")), "")
        table.add_row("Δp · rank", f"{metric('dp', record.get('dp'))} · {int(record.get('rank_shift') or 0)}", "")
        table.add_row("cum KL", metric("cum_kl", record.get("cum_kl")), "")
        table.add_row("cum NLL gap", metric("cum_nll_gap", record.get("cum_nll_gap")), "")
        if record.get("first_divergence") is not None:
            table.add_row("texts split", f"step {record['first_divergence']}", "")
        self.update(table)
