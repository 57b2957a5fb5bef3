"""Branching: pick one of the top-k alternatives at a step (dense and perturbed lists merged) to continue from.

The chooser is a small modal list over the screen: ↑/↓ or the digit keys choose, enter branches, esc cancels.
It returns the chosen (token id, token text), or None.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from hierui import tokentext
from hierui.format import prob, step_label


def alternatives(record: dict) -> list[dict]:
    """The step's top-k tokens of both models, merged by id: the dense ranks first, then the perturbed-only
    ones; each {token, text, rank_d, p_d, rank_p, p_p} (None where that model's top-k lacks it)."""
    out: dict[int, dict] = {}
    for side in ("d", "p"):
        for rank, (tok, text, p) in enumerate(record.get(f"topk_{side}") or [], start=1):
            entry = out.setdefault(
                tok, {"token": tok, "text": text, "rank_d": None, "p_d": None, "rank_p": None, "p_p": None}
            )
            entry[f"rank_{side}"], entry[f"p_{side}"] = rank, p
    return list(out.values())


def describe(entry: dict, fed: int | None, width: int = 16) -> Text:
    text = Text()
    text.append(f"{tokentext.cell(entry['text'], width):<{width}}", style="bold")
    for side, name in (("d", "dense"), ("p", "pert.")):
        rank = entry[f"rank_{side}"]
        text.append(
            f" {name} " + (f"#{rank} {prob(entry[f'p_{side}'])}" if rank else "  –      "), style="" if rank else "dim"
        )
    if entry["token"] == fed:
        text.append("  ← was fed", style="dim")
    return text


class BranchChooser(ModalScreen):
    """Choose the token to feed the perturbed model's context at `step` instead of the one it was fed
    (its look: the BranchChooser rules of hierui/explorer/hierui.tcss)."""

    BINDINGS = [Binding("escape", "dismiss_none", "Cancel", tooltip="branch nothing")]

    def __init__(self, record: dict, fed: int | None):
        super().__init__()
        self.record = record
        self.fed = fed
        self.entries = alternatives(record)

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = f"branch at step {step_label(self.record['step'])}: feed which token?"
            yield Static(
                Text(
                    "a new run continues the perturbed model's context before this step with the chosen token "
                    "(a new session, linked to this one)",
                    style="dim",
                )
            )
            width = max([len(tokentext.cell(e["text"], 16)) for e in self.entries] + [5])
            yield OptionList(
                *[
                    Option(Text.assemble((f"{i + 1} ", "dim"), describe(e, self.fed, width)), id=str(e["token"]))
                    for i, e in enumerate(self.entries)
                ],
                id="alternatives",
            )
            yield Static(Text("enter: branch · 1–9: choose · esc: cancel", style="dim"))

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        options.focus()
        options.highlighted = 0 if self.entries else None

    def on_key(self, event) -> None:
        if event.character and event.character.isdigit() and 1 <= int(event.character) <= len(self.entries):
            event.stop()
            self._choose(int(event.character) - 1)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self._choose(event.option_index)

    def _choose(self, index: int) -> None:
        entry = self.entries[index]
        self.dismiss((entry["token"], entry["text"]))

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
