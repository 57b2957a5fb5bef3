"""`hierui noise` as text: the summary line, one row per comparison, the notes and the tie margins."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from hierui.format import num, pct
from hierui.progress import duration

KIND_LABEL = {"dtype": "dtype (reference)", "batch": "batch shape", "cache": "cached vs full pass"}


def summary_line(floor: dict) -> str:
    return " · ".join(
        [
            floor.get("display") or floor["model"],
            floor["device"],
            ", ".join(floor["dtypes"]),
            f"{floor['prompts']} prompts × {floor['max_new_tokens']} steps, teacher-forced on the "
            f"{floor['reference_dtype']} greedy text, batches of {floor['batch_size']}",
        ]
    )


def noise_table(floor: dict) -> Table:
    table = Table(
        title="hierui noise: the dense model against itself (KL at T = 1 in nats; margin: top-1 − top-2 probability)",
        title_justify="left",
    )
    for header in ("comparison", "what", "steps", "KL mean", "KL p99", "KL max", "flips", "flip rate"):
        table.add_column(header, justify="left" if header in ("comparison", "what") else "right", no_wrap=True)
    for header in ("max flip margin", "|Δmargin| p99.9", "|Δmargin| max"):
        table.add_column(header, justify="right", no_wrap=True)
    for c in floor["comparisons"]:
        style = "dim" if c["kind"] == "dtype" else ""
        table.add_row(
            c["name"],
            KIND_LABEL.get(c["kind"], c["kind"]),
            str(c["steps"]),
            num(c["kl_mean"], 2),
            num(c["kl_p99"], 2),
            num(c["kl_max"], 2),
            str(c["flips"]),
            pct(c["flip_rate"]),
            num(c["flip_margin_max"], 2),
            num(c["dmargin_p99_9"], 2),
            num(c["dmargin_max"], 2),
            style=style,
        )
    return table


def tie_line(floor: dict) -> str:
    margins = ", ".join(f"{d} {num(v, 2)}" for d, v in floor["tie_margin"].items())
    return (
        f"tie margins: {margins} (a flip whose dense top-1/top-2 margin is below it could be numerical noise; "
        f"the largest of max |Δmargin| and max flip margin over batch shape and cache)"
    )


def print_noise(console, floor: dict, path=None) -> None:
    console.print(Text(summary_line(floor)), highlight=False, soft_wrap=True)
    console.print(noise_table(floor))
    for note in floor.get("notes") or []:
        console.print(Text("note ", style="yellow") + Text(note), highlight=False, soft_wrap=True)
    if path is not None:
        console.print(
            Text(f"saved: {path} (in {duration(floor.get('seconds') or 0.0)})", style="dim"),
            highlight=False,
            soft_wrap=True,
        )
    console.print(Text(tie_line(floor)), highlight=False, soft_wrap=True)
