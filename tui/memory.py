"""The memory view: one row per device (GPUs, RAM, NVMe) with a stacked usage bar and a trend line,
then the speeds."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Sparkline, Static

from .telemetry import History, Telemetry, Tier, human_bytes, human_rate

# What a bar is made of, in drawing order: (Tier field, legend name, colour).
PARTS = (
    ("weights_bytes", "weights", "#5f87d7"),
    ("experts_bytes", "experts", "#87af5f"),
    ("kv_bytes", "KV", "#d7af5f"),
)
OTHER_COLOR = "#8a8a8a"  # used bytes the engine did not break down
CACHED_COLOR = "#5fafaf"  # NVMe: expert bytes the page cache holds
FREE_COLOR = "#3c3c3c"  # budget not used yet (NVMe: mapped, not cached)


class UsageBar(Widget):
    """A one-line bar of coloured segments over a total; the rest of the total drawn as free."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.segments: list[tuple[int, str]] = []  # (bytes, colour)
        self.total = 0

    def show(self, segments: list[tuple[int, str]], total: int) -> None:
        self.segments, self.total = segments, total
        self.refresh()

    def render(self) -> Text:
        width = self.size.width
        bar, filled = Text(), 0
        for value, color in self.segments:
            cells = min(round(value / self.total * width), width - filled) if self.total else 0
            bar.append("█" * cells, style=color)
            filled += cells
        bar.append("█" * (width - filled), style=FREE_COLOR)
        return bar


class TierRow(Vertical):
    """One device: name, bar, `used / budget`, trend of used bytes; below it, what the bytes hold."""

    def __init__(self, label: str):
        super().__init__(classes="tier-row")
        self.label = label

    def compose(self) -> ComposeResult:
        with Horizontal(classes="bar-line"):
            yield Static(self.label, classes="name")
            yield UsageBar()
            yield Static(classes="amount")
            yield Sparkline(classes="trend")
        yield Static(classes="breakdown")

    def show(self, tier: Tier, t: Telemetry, trend: list[float]) -> None:
        segments, total = bar_segments(tier)
        self.query_one(UsageBar).show(segments, total)
        budget = f" / {human_bytes(tier.budget_bytes)}" if tier.budget_bytes else ""
        self.query_one(".amount", Static).update(f"{human_bytes(tier.used_bytes)}{budget}")
        self.query_one(Sparkline).data = trend
        self.query_one(".breakdown", Static).update(breakdown(tier, t))


def bar_segments(tier: Tier) -> tuple[list[tuple[int, str]], int]:
    """Segments and the total they are drawn against: the budget when there is one, else what is used."""
    if tier.tier == "nvme":  # mapped bytes, of which the page cache holds some
        return [(tier.resident_bytes or 0, CACHED_COLOR)], tier.used_bytes
    segments = [(getattr(tier, field) or 0, color) for field, _, color in PARTS]
    rest = tier.used_bytes - sum(value for value, _ in segments)
    return segments + [(max(rest, 0), OTHER_COLOR)], max(tier.budget_bytes or 0, tier.used_bytes)


def breakdown(tier: Tier, t: Telemetry) -> Text:
    """`weights 6.1 GiB · experts 10.9 GiB · …` with each name in its bar colour."""
    if tier.tier == "nvme":
        items = [("page cache", tier.resident_bytes, CACHED_COLOR), ("mapped", tier.used_bytes, FREE_COLOR)]
    else:
        experts_name = "pinned experts" if tier.tier == "ram" else "experts"
        items = [
            (experts_name if field == "experts_bytes" else name, getattr(tier, field), color)
            for field, name, color in PARTS
        ]
    text = Text()
    for name, value, color in items:
        if value is not None:
            text.append("■ ", style=color).append(f"{name} {human_bytes(value)}  ")
    if tier.tier == "ram":
        text.append(f"RSS {human_bytes(t.rss_bytes)}")
    return text


class SpeedRow(Horizontal):
    def compose(self) -> ComposeResult:
        yield Static("Speed", classes="name")
        yield Static(classes="speeds")
        yield Sparkline(classes="trend")

    def show(self, t: Telemetry, trend: list[float]) -> None:
        self.query_one(".speeds", Static).update(
            f"prefill {human_rate(t.prefill_tps, 'tok/s')} · decode {human_rate(t.decode_tps, 'tok/s')}"
            f" · TTFT {human_rate(t.ttft_s, 's')}"
        )
        self.query_one(Sparkline).data = trend


class MemoryView(VerticalScroll):
    """Rebuilt only when the set of devices changes; every poll after that updates the rows in place."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.labels: tuple[str, ...] = ()

    def compose(self) -> ComposeResult:
        yield Static("waiting for the first stats…", classes="title")
        for label in self.labels:
            yield TierRow(label)
        yield SpeedRow()

    async def show(self, t: Telemetry, history: History) -> None:
        labels = tuple(tier.label for tier in t.tiers)
        if labels != self.labels:
            self.labels = labels
            await self.recompose()
        self.query_one(".title", Static).update(title(t))
        for row, tier in zip(self.query(TierRow), t.tiers):
            row.show(tier, t, history[tier.label])
        self.query_one(SpeedRow).show(t, history["decode"])


def title(t: Telemetry) -> Text:
    """The model, then the legend of the bars' colours."""
    about = f"  {t.arch} · ctx {t.ctx} · weights {human_bytes(t.weights_bytes)}\n"
    text = Text.assemble((t.model, "bold"), about)
    for _, name, color in PARTS:
        text.append("█ ", style=color).append(f"{name}  ")
    text.append("█ ", style=OTHER_COLOR).append("other  ")
    return text.append("█ ", style=FREE_COLOR).append("free")
