"""The hierarchy at the selected step: hidden → logit → probability, measured beside theory."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from hierui.widgets.scale import fmt, kl_color


class SpacesPanel(Static):
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
        table.add_row("hidden cos", fmt(emb[-1]), fmt(est[-1]))
        table.add_row("logit cos", fmt(record.get("logit_cos")), "")
        table.add_row("logit rel", fmt(record.get("logit_rel")), "")
        table.add_row(f"prob cos T{temperature:g}", fmt(record.get("prob_cos")), fmt(record.get("prob_cos_est")))
        table.add_row(Text("KL", style=f"bold on {kl_color(kl)}"), fmt(kl), fmt(record.get("kl_est")))
        table.add_row("amp", "–" if amp is None else f"{amp:.3g}×", "")
        table.add_row("JS", fmt(record.get("js")), "")
        table.add_row("TV", fmt(record.get("tv")), "")
        table.add_row("top-1 agree", "yes" if record.get("top1_agree") else "no", "")
        table.add_row("top-k share", fmt(record.get("topk_overlap"), 2), "")
        table.add_row("Δp · rank", f"{fmt(record.get('dp'), 3)} · {int(record.get('rank_shift') or 0)}", "")
        table.add_row("cum KL", fmt(record.get("cum_kl"), 3), "")
        table.add_row("cum NLL gap", fmt(record.get("cum_nll_gap"), 3), "")
        if record.get("first_divergence") is not None:
            table.add_row("texts split", f"step {record['first_divergence']}", "")
        self.update(table)
