"""Attribution of one step by patching (engine.run.attribution): the units ranked by the KL their restoration removes.

Each sublayer unit (`attn.ℓ`, `mlp.ℓ`) is a bar of `restored_kl`, the fraction of the step's KL removed when the
dense model's output of that unit is patched into the perturbed forward (1 = all of it; negative: patching it
adds KL), ✓ where that alone restores the dense top-1, ● where it is in the greedy minimal set. The blocks
(`block.ℓ`) are a second, shorter list beside (or below) them. The panel renders what the app gives it: a
hint, a line saying the attribution is running or why it cannot run, or a result.
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from hierui import tokentext
from hierui.format import metric, step_label

BAR = 16  # the widest a bar gets
EIGHTHS = " ▏▎▍▌▋▊▉█"


def bar(fraction: float | None, width: int) -> Text:
    """A bar of `fraction` (clipped to [0, 1]) `width` cells wide, in eighths."""
    if fraction is None or fraction <= 0:
        return Text(" " * width)
    eighths = round(min(fraction, 1.0) * width * 8)
    full, rest = divmod(eighths, 8)
    body = "█" * full + (EIGHTHS[rest] if rest and full < width else "")
    return Text(body.ljust(width), style="green" if fraction >= 0.5 else "yellow")


def percent(fraction: float | None) -> str:
    if fraction is None:
        return "—"
    return f"{round(fraction * 100)}%"  # an int: a tiny negative share is "0%", not "-0%"


def token_text(record: dict | None, token: int) -> str:
    """The text of a token id from the step's top-k lists (a quoted cell), else its id."""
    for key in ("topk_d", "topk_p"):
        for tok, text, _p in (record or {}).get(key) or []:
            if tok == token:
                return f"'{tokentext.cell(text, 14)}'"
    return f"#{token}"


def unit_line(rank: int, u, chosen: set[str], flip: bool, width: int) -> Text:
    """One unit: rank, name, bar, percentage, ✓ (restores the dense top-1, at a flip), ● (in the minimal set)."""
    fixed = 3 + 9 + 1 + 5 + 3  # rank, name, spaces, percentage, marks
    line = Text()
    line.append(f"{rank:>2} ", style="dim")
    line.append(f"{u.unit:<8} ", style="bold" if u.unit in chosen else "")
    line.append_text(bar(u.restored_kl, max(3, min(BAR, width - fixed))))
    line.append(f" {percent(u.restored_kl):>4}", style="dim" if (u.restored_kl or 0) <= 0 else "")
    line.append(" ✓" if flip and u.restores_top1 else "  ", style="green")
    line.append("●" if u.unit in chosen else " ", style="cyan")
    return line


class AttributionPanel(Static):
    """The attribution of one step; `step` is the step it shows (None: a hint or a note)."""

    BORDER_TITLE = "attribution"

    def __init__(self, **kwargs):
        super().__init__("", **kwargs)
        self.step: int | None = None
        self.result = None
        self.record: dict | None = None
        self.lines: list[str] = []  # the ranked units shown (tests)

    def on_resize(self) -> None:
        if self.result is not None:
            self._draw()

    def note(self, text: str, step: int | None = None, title: str = "attribution") -> None:
        self.step, self.result, self.lines = step, None, []
        self.border_title = title
        self.border_subtitle = ""
        self.update(Text(text, style="dim"))

    def running(self, step: int) -> None:
        self.note(
            f"patching each sublayer's dense output into the perturbed model at step {step_label(step)}…",
            step,
            f"attribution · step {step_label(step)} · running",
        )

    def show_result(self, step: int, result, record: dict | None) -> None:
        self.step, self.result, self.record = step, result, record
        self.border_title = f"attribution · step {step_label(step)} · a: back to the chart"
        self.border_subtitle = "bar: KL removed · ✓ restores top-1 · ● minimal set "
        self._draw()

    def _draw(self) -> None:
        r, record = self.result, self.record
        width = max(self.content_size.width, 30)
        height = max(self.content_size.height, 4)
        flip = r.top1_d != r.top1_p
        chosen = set(r.minimal_set or [])
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f"KL {metric('kl', r.kl)}", style="bold")
        if flip:
            text.append(f" · dense {token_text(record, r.top1_d)} vs perturbed {token_text(record, r.top1_p)}")
        else:
            text.append(f" · both pick {token_text(record, r.top1_d)}: no flip to restore")
        text.append("\n")
        sublayers, blocks = r.ranked("sublayer"), r.ranked("block")
        two = width >= 56 and blocks
        left = (width * 3) // 5 if two else width
        rows = height - 2  # the headline and the minimal set
        if not two and blocks:
            rows -= 1  # the blocks' line
        shown = sublayers[: max(rows, 1)]
        self.lines = [u.unit for u in shown]
        right = blocks[: max(rows, 1)] if two else []
        for i in range(max(len(shown), len(right))):
            line = unit_line(i + 1, shown[i], chosen, flip, left) if i < len(shown) else Text("")
            if two:
                line.pad_right(left - line.cell_len)
                line.append("│", style="dim")
                if i < len(right):
                    line.append_text(unit_line(i + 1, right[i], chosen, flip, width - left - 1))
            text.append_text(line)
            text.append("\n")
        if not two and blocks:
            text.append("blocks ", style="dim")
            text.append(
                " · ".join(
                    f"{b.unit} {percent(b.restored_kl)}" + (" ✓" if flip and b.restores_top1 else "")
                    for b in blocks[:4]
                )
            )
            text.append("\n")
        text.append_text(self._minimal(r, flip))
        self.update(text)

    @staticmethod
    def _minimal(r, flip: bool) -> Text:
        if r.minimal_set is None:
            return Text("minimal set: not computed", style="dim")
        if not flip:
            return Text("minimal set: none needed (the top-1 tokens agree)", style="dim")
        names = " + ".join(r.minimal_set) or "—"
        text = Text()
        text.append("minimal set: ", style="dim")
        text.append(names, style="bold cyan")
        if r.minimal_restores:
            text.append(" restores the dense top-1", style="green")
        else:
            text.append(" does not restore the dense top-1 (all sublayers tried)", style="yellow")
        return text
