"""Colour scales: per-step KL for tokens, 1 − cos for layers."""

from __future__ import annotations

import math

from rich.text import Text

# (upper bound of KL in nats, background colour)
KL_SCALE = [
    (0.01, "#1b5e20"),
    (0.05, "#558b2f"),
    (0.2, "#9e9d24"),
    (0.5, "#ef6c00"),
    (1.0, "#d84315"),
    (math.inf, "#b71c1c"),
]


def kl_color(kl: float | None) -> str:
    if kl is None:
        return "#424242"
    for bound, color in KL_SCALE:
        if kl < bound:
            return color
    return KL_SCALE[-1][1]


def kl_legend() -> Text:
    text = Text("KL ", style="dim")
    lower = 0.0
    for bound, color in KL_SCALE:
        label = f"<{bound:g}" if math.isfinite(bound) else f"≥{lower:g}"
        text.append(f" {label} ", style=f"white on {color}")
        lower = bound
    return text


def drift_color(one_minus_cos: float | None) -> str:
    """Colour for 1 − cos on a log scale from 1e-5 (green) to 1e-1 and beyond (red)."""
    if one_minus_cos is None:
        return "#424242"
    value = max(one_minus_cos, 1e-7)
    level = (math.log10(value) + 5) / 4  # 1e-5 → 0, 1e-1 → 1
    level = min(max(level, 0.0), 1.0)
    palette = ["#1b5e20", "#558b2f", "#9e9d24", "#f9a825", "#ef6c00", "#d84315", "#b71c1c"]
    return palette[min(int(level * len(palette)), len(palette) - 1)]
