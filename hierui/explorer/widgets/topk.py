"""Top-k tokens of both models at the selected step, with where the dense ones landed under the perturbed model."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from hierui import tokentext
from hierui.format import prob

MIN_TOKEN_WIDTH = 6
FIXED_WIDTH = 1 + 5 + 5 + 3 + 5  # the #, both p and Δr columns, and the padding between the six columns


def token_cell(text: str, width: int | None = None) -> Text:
    return Text(tokentext.cell(text, width))


class TopKTable(Static):
    BORDER_TITLE = "top-k"
    record: reactive[dict | None] = reactive(None)

    def watch_record(self) -> None:
        self.show(self.record)

    def on_resize(self) -> None:
        self.show(self.record)

    def token_width(self) -> int:
        """Each token column's share of the panel: tokens show in full where the panel is wide enough."""
        return max(MIN_TOKEN_WIDTH, (self.content_size.width - FIXED_WIDTH) // 2)

    def show(self, record: dict | None) -> None:
        table = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False, collapse_padding=True)
        table.add_column("#", style="dim", no_wrap=True, min_width=1)
        width = self.token_width()
        table.add_column("dense", no_wrap=True, min_width=5, max_width=width)
        table.add_column("p", justify="right", no_wrap=True, min_width=5)
        table.add_column("pert.", no_wrap=True, min_width=5, max_width=width)
        table.add_column("p", justify="right", no_wrap=True, min_width=5)
        table.add_column("Δr", justify="right", no_wrap=True, min_width=2)
        self.rows: list[tuple] = []
        if record is not None:
            top_d, top_p = record.get("topk_d") or [], record.get("topk_p") or []
            rank_p = {tok: i for i, (tok, _t, _p) in enumerate(top_p)}
            for i in range(max(len(top_d), len(top_p))):
                d = top_d[i] if i < len(top_d) else None
                p = top_p[i] if i < len(top_p) else None
                shift = Text("")
                if d is not None:
                    where = rank_p.get(d[0])
                    if where is None:
                        shift = Text(f">{len(top_p)}", style="red")
                    elif where == i:
                        shift = Text("=", style="green")
                    else:
                        shift = Text(f"{where - i:+d}", style="yellow")
                row = (
                    str(i + 1),
                    token_cell(d[1], width) if d else "",
                    prob(d[2]) if d else "",
                    token_cell(p[1], width) if p else "",
                    prob(p[2]) if p else "",
                    shift,
                )
                self.rows.append(row)
                table.add_row(*row)
        self.update(table)
