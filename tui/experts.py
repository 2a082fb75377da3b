"""The experts view: a layers x experts map, each cell coloured by the tier holding the expert and shaded
by how hot it is, then the cache hit rate and promotions.

A cell stands for a block of experts (and of layers) when the map is larger than the widget; it shows
the hottest of them, since where the hot experts live is what decides speed. Each text row draws two
layer rows with the upper-half block, foreground above and background below.
"""

from __future__ import annotations

import math

import numpy as np
from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Static

from .telemetry import Telemetry

CODES = "0123456789rn"  # placement characters: GPU index, RAM, NVMe
GPU_COLORS = ((80, 200, 120), (70, 160, 235), (170, 120, 235), (235, 120, 170))  # cycled over GPU indices
TIER_COLORS = {"r": (235, 185, 60), "n": (215, 80, 70)}
CODE_INDEX = {c: i for i, c in enumerate(CODES)}
UNKNOWN = len(CODES)  # a character outside CODES
LABEL_WIDTH = 5  # "L 57 "
DIM = 0.2  # brightness of a cold expert; hot ones are drawn at full colour
UNREPORTED_HEAT = 0.6  # shade used when the engine reports placement but no hotness


def code_color(code: int) -> tuple[int, int, int]:
    if code >= UNKNOWN:
        return (90, 90, 90)
    char = CODES[code]
    return TIER_COLORS.get(char) or GPU_COLORS[int(char) % len(GPU_COLORS)]


def shade(code: int, heat: float) -> Color:
    r, g, b = code_color(code)
    k = DIM + (1 - DIM) * math.sqrt(float(np.clip(heat, 0, 1)))  # sqrt: routing is long-tailed
    return Color.from_rgb(r * k, g * k, b * k)


def bin_map(placement, hotness, max_rows: int, max_cols: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(codes, heat, layers per cell, experts per cell): the map reduced to at most max_rows x max_cols,
    each cell showing its hottest expert (the first one when no hotness is reported)."""
    codes = np.array([[CODE_INDEX.get(c, UNKNOWN) for c in row] for row in placement])  # (L, E)
    n_layers, n_experts = codes.shape
    if hotness is None or hotness.shape != codes.shape:
        hotness = np.full(codes.shape, UNREPORTED_HEAT, dtype=np.float32)
    per_row, per_col = math.ceil(n_layers / max_rows), math.ceil(n_experts / max_cols)
    rows, cols = math.ceil(n_layers / per_row), math.ceil(n_experts / per_col)
    pad = ((0, rows * per_row - n_layers), (0, cols * per_col - n_experts))

    def cells(a: np.ndarray, fill) -> np.ndarray:  # (L, E) -> (rows, cols, per_row * per_col)
        a = np.pad(a, pad, constant_values=fill).reshape(rows, per_row, cols, per_col)
        return a.transpose(0, 2, 1, 3).reshape(rows, cols, -1)

    heat = cells(hotness, -1.0)  # padding never wins the argmax
    hottest = heat.argmax(-1)[..., None]
    return np.take_along_axis(cells(codes, UNKNOWN), hottest, -1)[..., 0], heat.max(-1), per_row, per_col


class ExpertMap(Widget):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.telemetry = Telemetry()

    def show(self, t: Telemetry) -> None:
        self.telemetry = t
        self.refresh()

    def render(self) -> Text:
        t = self.telemetry
        if not t.placement:
            return Text("no routed experts reported: a dense model, or an engine without placement stats")
        width, height = self.size
        codes, heat, per_row, per_col = bin_map(
            t.placement, t.hotness, max(2 * (height - 1), 1), max(width - LABEL_WIDTH, 1)
        )
        text = Text(axis_line(len(t.placement[0]), per_row, per_col), style="dim")
        for r in range(0, codes.shape[0], 2):
            text.append(f"\nL{t.first_layer + r * per_row:<3} ", style="dim")
            for c in range(codes.shape[1]):
                upper = shade(codes[r, c], heat[r, c])
                lower = shade(codes[r + 1, c], heat[r + 1, c]) if r + 1 < codes.shape[0] else None
                text.append("▀", style=Style(color=upper, bgcolor=lower))
        return text


def axis_line(n_experts: int, per_row: int, per_col: int) -> str:
    return f"{' ' * LABEL_WIDTH}experts 0–{n_experts - 1} →   cell: {per_col} expert(s) x {per_row} layer(s)"


def legend(t: Telemetry) -> Text:
    """A swatch per tier with its expert count, then the numbers of the expert cache."""
    text = Text()
    for tier in t.tiers:
        code = tier.device.rpartition(":")[2] if tier.tier == "gpu" else tier.tier[0]
        if tier.experts and code in CODES:
            text.append("■ ", style=Style(color=shade(CODES.index(code), 1.0)))
            text.append(f"{tier.label} {tier.experts:,}   ")
    text.append("bright = hot\n", style="dim")
    hit = "–" if t.hit_rate is None else f"{t.hit_rate:.1%}"
    promotions = "–" if t.promotions_per_s is None else f"{t.promotions_per_s:.1f}/s"
    counts = f"{t.experts_total:,} experts in {len(t.placement)} layers"
    return text.append(f"GPU hit rate {hit} · promotions {promotions} · {counts}")


class ExpertsView(Vertical, can_focus=True):
    def compose(self) -> ComposeResult:
        yield ExpertMap()
        yield Static(classes="legend")

    def show(self, t: Telemetry) -> None:
        self.query_one(ExpertMap).show(t)
        self.query_one(".legend", Static).update(legend(t))
