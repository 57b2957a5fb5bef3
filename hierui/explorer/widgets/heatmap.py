"""Where it breaks: the logit lens per layer × step, a heatmap of `lens_kl` (or `lens_dense_final_kl`).

Rows are the layers ℓ = 1 … L from the top down (as in the layer panel); each text row holds two layer rows
(the upper and lower half of a ▀ cell). When the model has more layers than fit, adjacent layers share a
row and the row shows their largest value (the title says so). Columns are steps, the newest that fit; when
a step out of view is selected the window moves just enough to show it. Above the map, a flip (the two top-1
tokens differ) is ✗ and a near tie (a flip within the noise margin) ≈; the selected step is marked above
(▼, or its flip mark reversed) and below (▲ with its number). The colour is the KL in nats on a log scale,
half a decade per colour (the legend in the bottom border).

A run with the lens "all" steps without waiting for it: the explorer computes each step's lens behind the stepping
(hierui.explorer.live), so a step whose lens is not there yet is a pending column, ░ (PENDING_STYLE), not a colour
and not the · of a step with nothing to show (a model had ended; `--lens sampled` left it out). In a replay the same
░ marks a step whose lens was never computed (the run was closed before its lens); the border says which.
"""

from __future__ import annotations

import math

from rich.style import Style
from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from engine.record.header import SessionHeader, header_of
from hierui.format import step_label

# log10 of the lowest bound and the width of a colour band in decades: 1e-4 … 10, half a decade each
LOW, BAND, BANDS = -4.0, 0.5, 10
# one colour below 1e-4 (a zero too), BANDS colours between, one at and above 10 (a magma-like ramp)
PALETTE = (
    "#1a1035",
    "#2c115f",
    "#451378",
    "#5e1a80",
    "#772381",
    "#902c80",
    "#aa347c",
    "#c43e74",
    "#dc4d68",
    "#ee645f",
    "#f9855f",
    "#fcc27a",
)
assert len(PALETTE) == BANDS + 2
MISSING_STYLE = "#5a5a5a"
PENDING, PENDING_STYLE = "░", "#8a8a8a"  # a step whose lens is still to come (or was never computed: a replay)

VIEWS = {
    # view: (record field, the title's name for it, what it is)
    "lens": ("lens_kl", "lens KL", "KL(dense lens ℓ ‖ perturbed lens ℓ)"),
    "final": ("lens_dense_final_kl", "dense final KL", "KL(dense final ‖ perturbed lens ℓ)"),
}
LABEL = 5  # columns of the layer labels at the left


def color(value: float | None) -> str | None:
    """The colour of a KL value (None: nothing measured)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if value <= 0:
        return PALETTE[0]
    band = math.floor((math.log10(value) - LOW) / BAND)
    return PALETTE[min(max(band + 1, 0), len(PALETTE) - 1)]


def legend() -> Text:
    """The scale: a chip per colour band, decades labelled between them (nats, log scale)."""
    text = Text()
    text.append("nats ", style="dim")
    text.append("█", style=PALETTE[0])
    for decade in range(int(LOW), int(LOW + BANDS * BAND) + 1):
        label = f"{10.0**decade:g}" if -2 <= decade <= 1 else f"1e{decade}"
        text.append(label, style="dim")
        first = int((decade - LOW) / BAND) + 1
        chips = PALETTE[first : first + int(1 / BAND)] if decade < LOW + BANDS * BAND else PALETTE[-1:]
        for chip in chips:
            text.append("█", style=chip)
    return text


def pending(record: dict, key: str, mode: str | None) -> bool:
    """Whether `record`'s lens `key` is still to come: the lens is on for every step (`mode`, the header's lens,
    is "all"), the field is there but null, and the step compares the two models (after a model ended there is
    nothing to compute)."""
    return (
        mode == "all"
        and key in record
        and record[key] is None
        and record.get("token_d") is not None
        and record.get("token_p") is not None
    )


def bins(layers: int, rows: int) -> list[tuple[int, int]]:
    """[start, stop) layer indices (0-based) of each of at most `rows` bins over `layers` layers."""
    count = max(1, min(layers, rows))
    return [(i * layers // count, (i + 1) * layers // count) for i in range(count)]


def aggregate(values, groups: list[tuple[int, int]]) -> list[float | None]:
    """Each group's largest known value (None where it has none)."""
    out = []
    for start, stop in groups:
        known = [v for v in (values or [])[start:stop] if v is not None]
        out.append(max(known) if known else None)
    return out


class HeatmapPanel(Static):
    """Layers × steps of the logit-lens KL; `view` "lens" (lens_kl) or "final" (lens_dense_final_kl)."""

    records: reactive[list] = reactive(list, always_update=True)
    selected: reactive[int | None] = reactive(None)
    header: reactive[SessionHeader] = reactive(SessionHeader)
    view: reactive[str] = reactive("lens")
    live: reactive[bool] = reactive(False)  # the steps come from a live run: a pending column is being computed
    validate_header = staticmethod(header_of)  # a header set as a dict is read as a SessionHeader

    def __init__(self, **kwargs):
        super().__init__("", **kwargs)
        self.first = 0  # the first step in view
        self.shown: dict = {}  # what the last render showed (tests): steps, bins, layers

    def _redraw(self) -> None:
        self.show()

    watch_records = watch_selected = watch_header = watch_view = watch_live = _redraw

    def on_resize(self) -> None:
        self.show()

    def toggle(self) -> str:
        self.view = "final" if self.view == "lens" else "lens"
        return self.view

    def layers(self) -> int:
        key = VIEWS[self.view][0]
        count = max((len(r.get(key) or []) for r in self.records), default=0)
        if not count and any(pending(r, key, self.header.lens) for r in self.records):
            count = self.header.layers or 0  # every step shown is pending: the rows the lens will fill
        return count

    def off_note(self) -> str | None:
        """Why there is nothing to draw, or None."""
        if self.layers():
            return None
        if self.header.lens == "off":
            return "the logit lens was off for this run (--lens off): no layer × step map"
        if self.records:
            return "this session has no logit-lens data (recorded without the lens): no layer × step map"
        return None

    def window(self, width: int) -> tuple[int, int]:
        """The steps in view, [first, stop): the newest that fit, moved to keep the selected step in view."""
        n = len(self.records)
        if n <= width:
            self.first = 0
            return 0, n
        selected = n - 1 if self.selected is None else min(self.selected, n - 1)
        if selected == n - 1:
            self.first = n - width
        elif selected < self.first:
            self.first = selected
        elif selected >= self.first + width:
            self.first = selected - width + 1
        self.first = max(0, min(self.first, n - width))
        return self.first, self.first + width

    def show(self) -> None:
        key, name, _what = VIEWS[self.view]
        other = "dense final" if self.view == "lens" else "lens KL"  # what v switches to
        layers = self.layers()
        note = self.off_note()
        size = self.content_size
        rows = max(size.height - 2, 1)  # the flip row above, the step axis below
        groups = bins(layers, 2 * rows) if layers > rows else bins(layers, rows)
        half = layers > rows  # two layer bins per text row
        binned = f" · {layers} layers → {len(groups)} rows (max)" if layers and len(groups) < layers else ""
        title = f"{name} · layer × step{binned}"
        if self.size.width and len(title) + 6 > self.size.width:  # too long for the border: the binning first
            title = f"{name}{binned}"
        self.border_title = title
        self.border_subtitle = self._subtitle(sum(pending(r, key, self.header.lens) for r in self.records), other)
        if note or not self.records:
            self.border_subtitle = ""
            self.shown = {"steps": (0, 0), "bins": [], "layers": layers, "note": note}
            self.update(Text(note or "layer × step: no step yet", style="dim"))
            return
        width = max(size.width - LABEL, 1)
        wide = 2 if 2 * len(self.records) <= width else 1  # few steps: two columns each
        first, stop = self.window(width // wide)
        steps = self.records[first:stop]
        selected = self.selected
        columns = [PENDING if pending(r, key, self.header.lens) else aggregate(r.get(key), groups) for r in steps]
        text = Text(no_wrap=True, overflow="crop")
        text.append_text(self._flip_row(steps, selected, wide))
        text.append("\n")
        per_row = 2 if half else 1
        repeat = 1 if half else max(1, rows // max(len(groups), 1))  # few layers: each several rows tall
        for row in range(math.ceil(len(groups) / per_row)):
            top = row * per_row
            for again in range(repeat):
                label = f"{groups[top][0] + 1:>{LABEL - 1}} " if again == 0 else " " * LABEL
                text.append(label, style="dim")
                for column in columns:
                    if column == PENDING:
                        text.append(PENDING * wide, style=PENDING_STYLE)
                        continue
                    upper = color(column[top])
                    lower = color(column[top + 1]) if half and top + 1 < len(groups) else None
                    glyph, style = self._cell(upper, lower, half)
                    text.append(glyph * wide, style=style)
                text.append("\n")
        text.append_text(self._axis(steps, selected, wide, width))
        waiting = [r["step"] for r, column in zip(steps, columns) if column == PENDING]
        self.shown = {"steps": (first, stop), "bins": groups, "layers": layers, "note": None, "pending": waiting}
        self.update(text)

    def _subtitle(self, waiting: int, other: str) -> Text:
        """The legend, the count of pending columns (░) and the `v` hint, the latter parts dropped, the hint first,
        where the border is too narrow for them."""
        what = "computing" if self.live else "uncomputed"
        parts = [f" {waiting} {what}", " · v: " + other] if waiting else [None, " · v: " + other]
        for keep in (parts, parts[:1] + [None], [f" {waiting}" if waiting else None, None]):
            text = legend()
            if keep[0] is not None:
                text.append(" · ", style="dim")
                text.append(PENDING, style=PENDING_STYLE)
                text.append(keep[0], style="dim")
            if keep[1] is not None:
                text.append(keep[1], style="dim")
            if not self.size.width or len(text.plain) + 6 <= self.size.width:
                break
        return text

    @staticmethod
    def _cell(upper: str | None, lower: str | None, half: bool) -> tuple[str, Style | str]:
        """A cell's glyph and style: one layer bin (█), or two (▀: the upper in front, the lower behind)."""
        if not half:
            return ("█", upper) if upper else ("·", MISSING_STYLE)
        if upper and lower:
            return "▀", Style(color=upper, bgcolor=lower)
        if upper:
            return "▀", upper
        if lower:
            return "▄", lower
        return "·", MISSING_STYLE

    @staticmethod
    def _flip_row(steps: list[dict], selected: int | None, wide: int) -> Text:
        text = Text(" " * LABEL)
        for r in steps:
            flip = r.get("top1_agree") is not None and not r.get("top1_agree")
            mark, style = (("≈", "bold yellow") if r.get("near_tie") else ("✗", "bold red")) if flip else (" ", "")
            if r["step"] == selected:
                mark, style = (mark if flip else "▼"), "bold reverse" + (" red" if flip and mark == "✗" else "")
            text.append(mark.ljust(wide), style=style)
        return text

    @staticmethod
    def _axis(steps: list[dict], selected: int | None, wide: int, width: int) -> Text:
        """The step axis: ▲ and the number of the selected step, other step numbers where they fit."""
        cells = [" "] * (len(steps) * wide + 12)
        marks = []
        if selected is not None:
            where = next((i for i, r in enumerate(steps) if r["step"] == selected), None)
            if where is not None:
                label, at = "▲" + step_label(selected), where * wide
                if at + len(label) > width:  # at the right edge: the number before the mark
                    label = step_label(selected) + "▲"
                    at -= len(label) - 1
                marks.append((at, label, True))
        every = 5 if wide == 2 else 10
        for i, r in enumerate(steps):
            number = r["step"] + 1
            if number == 1 or number % every == 0:
                marks.append((i * wide, step_label(r["step"]), False))
        taken = [False] * len(cells)
        text = Text()
        text.append("step ", style="dim")
        styles: list[str] = [""] * len(cells)
        for at, label, chosen in sorted(marks, key=lambda m: not m[2]):  # the selected step's label first
            span = range(at, at + len(label) + (0 if chosen else 1))
            if at + len(label) > width or any(taken[j] for j in span if j < len(taken)):
                continue
            for j, ch in zip(range(at, at + len(label)), label):
                cells[j], taken[j], styles[j] = ch, True, "bold" if chosen else "dim"
            for j in span:
                if j < len(taken):
                    taken[j] = True
        for ch, style in zip(cells[:width], styles[:width]):
            text.append(ch, style=style)
        text.rstrip()
        return text
