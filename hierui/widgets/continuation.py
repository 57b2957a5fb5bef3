"""The dense and perturbed continuations, each token coloured by the KL of its step."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from hierui.widgets.scale import kl_color


def visible(text: str) -> str:
    return text.replace("\n", "⏎\n").replace("\t", "→")


class Continuation(Static):
    """Tokens of one model up to the end of the run; the selected step is underlined and bold."""

    def __init__(self, side: str, **kwargs):
        super().__init__("", **kwargs)
        self.side = side  # "d" or "p"

    def show(self, records: list[dict], selected: int | None) -> None:
        text = Text()
        key = f"text_{self.side}"
        for r in records:
            style = f"on {kl_color(r.get('kl'))}"
            if r["step"] == selected:
                style += " bold underline reverse"
            elif self.side == "p" and r.get("token_p") != r.get("token_d"):
                style += " italic"
            text.append(visible(r.get(key, "")), style=style)
        if not records:
            text.append("(no steps yet: press space to step, r to run)", style="dim")
        self.update(text)
