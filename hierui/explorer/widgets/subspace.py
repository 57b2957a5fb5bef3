"""The categorical subspace (--choices): both models' distributions over the candidates."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from engine.record.settings import StepSettings
from hierui.format import metric, prob


class SubspacePanel(Static):
    BORDER_TITLE = "choices"
    record: reactive[dict | None] = reactive(None)
    settings: reactive[StepSettings] = reactive(StepSettings)

    def _redraw(self) -> None:
        self.show(self.record, list(self.settings.choices) if self.settings.choices else None)

    watch_record = watch_settings = _redraw

    def show(self, record: dict | None, choices: list[str] | None) -> None:
        if not choices:
            self.display = False
            return
        self.display = True
        if record is None or "sub_p_d" not in record:
            self.update(Text("choices: no step selected", style="dim"))
            return
        table = Table(
            box=None,
            padding=(0, 1),
            show_edge=False,
            expand=True,
            title=f"sub KL {metric('sub_kl', record.get('sub_kl'))} (full {metric('kl', record.get('kl'))})",
            title_justify="left",
        )
        table.add_column("choice")
        table.add_column("dense", justify="right")
        table.add_column("perturbed", justify="right")
        best_d = max(range(len(choices)), key=lambda i: record["sub_p_d"][i])
        best_p = max(range(len(choices)), key=lambda i: record["sub_p_p"][i])
        for i, (choice, pd, pp) in enumerate(zip(choices, record["sub_p_d"], record["sub_p_p"])):
            table.add_row(
                repr(choice),
                Text(prob(pd), style="bold" if i == best_d else ""),
                Text(prob(pp), style="bold" if i == best_p else ""),
            )
        self.update(table)
