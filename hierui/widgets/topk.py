"""Top-k tokens of both models at the selected step, with where the dense ones landed."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from hierui.widgets.continuation import visible


class TopKTable(DataTable):
    def on_mount(self) -> None:
        self.cursor_type = "none"
        self.add_columns("#", "dense", "p", "perturbed", "p", "Δr")

    def show(self, record: dict | None) -> None:
        self.clear()
        if record is None:
            return
        top_d, top_p = record.get("topk_d") or [], record.get("topk_p") or []
        rank_p = {tok: i for i, (tok, _t, _p) in enumerate(top_p)}
        for i in range(max(len(top_d), len(top_p))):
            d = top_d[i] if i < len(top_d) else None
            p = top_p[i] if i < len(top_p) else None
            if d is not None:
                where = rank_p.get(d[0])
                if where is None:
                    shift = Text(f">{len(top_p)}", style="red")
                elif where == i:
                    shift = Text("=", style="green")
                else:
                    shift = Text(f"{'+' if where > i else ''}{where - i}", style="yellow")
            else:
                shift = Text("")
            self.add_row(
                str(i + 1),
                repr(visible(d[1]))[1:-1] if d else "", f"{d[2]:.3f}" if d else "",
                repr(visible(p[1]))[1:-1] if p else "", f"{p[2]:.3f}" if p else "",
                shift,
            )
