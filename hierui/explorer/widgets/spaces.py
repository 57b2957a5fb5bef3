"""The hierarchy at the selected step: hidden → logit → probability, measured beside theory."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from hierui.explorer.widgets.scale import kl_color
from hierui.format import MISSING, OUT_OF_RANGE, cos_estimate, ended_note, metric, step_label


class SpacesPanel(Static):
    BORDER_TITLE = "hierarchy: measured vs theory"
    record: reactive[dict | None] = reactive(None)

    def watch_record(self) -> None:
        self.show(self.record)

    def show(self, record: dict | None) -> None:
        if record is None or ended_note(record):
            self.update(Text(ended_note(record) or "no step selected", style="dim"))
            return
        table = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False, expand=True)
        table.add_column("space", style="bold", no_wrap=True)
        table.add_column("measured", justify="right", no_wrap=True)
        table.add_column("theory", justify="right", no_wrap=True)
        emb = record.get("emb_cos") or [None]
        est = record.get("emb_cos_est") or [None]
        kl = record.get("kl")
        amp = record.get("amp")
        hidden_est, prob_est = (
            cos_estimate(est[-1], emb[-1]),
            cos_estimate(record.get("prob_cos_est"), record.get("prob_cos")),
        )
        table.add_row("hidden cos", metric("emb_cos", emb[-1]), hidden_est)
        table.add_row("logit cos", metric("logit_cos", record.get("logit_cos")), "")
        table.add_row("logit rel", metric("logit_rel", record.get("logit_rel")), "")
        table.add_row("prob cos", metric("prob_cos", record.get("prob_cos")), prob_est)
        table.add_row(
            Text("KL", style=f"bold on {kl_color(kl)}"), metric("kl", kl), metric("kl_est", record.get("kl_est"))
        )
        table.add_row("amp", MISSING if amp is None else f"{metric('amp', amp)}×", "")
        table.add_row("JS", metric("js", record.get("js")), "")
        table.add_row("TV", metric("tv", record.get("tv")), "")
        agree = record.get("top1_agree")
        table.add_row("top-1 agree", MISSING if agree is None else ("yes" if agree else "no"), "")
        table.add_row("top-k share", metric("topk_overlap", record.get("topk_overlap")), "")
        table.add_row("Δp top-1", metric("dp", record.get("dp")), "")
        table.add_row("rank shift", metric("rank_shift", record.get("rank_shift")), "")
        table.add_row("cum KL", metric("cum_kl", record.get("cum_kl")), "")
        table.add_row("cum NLL gap", metric("cum_nll_gap", record.get("cum_nll_gap")), "")
        if record.get("first_divergence") is not None:
            table.add_row("texts split", f"step {step_label(record['first_divergence'])}", "")
        out_of_range = OUT_OF_RANGE in (hidden_est, prob_est)
        self.border_subtitle = f"{OUT_OF_RANGE}: Δz too large" if out_of_range else ""
        self.update(table)
