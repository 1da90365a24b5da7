"""The pictures moemerge draws (routing shares, accuracy, benchmarks), as PNG bytes.

matplotlib's object API on the Agg canvas, not pyplot: no global figure state and no display, so a merge's
background thread, the report and the benchmark scripts can draw at the same time."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# One colour per expert (by index), matplotlib's tab10: the token colouring in the report uses the same ones.
EXPERT_HEX = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
SHARE_COLORMAP = "viridis"


def expert_color(expert: int) -> str:
    return EXPERT_HEX[expert % len(EXPERT_HEX)]


def png(figure: Figure) -> bytes:
    """The figure as PNG bytes (Agg canvas, 100 dpi)."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _layer_ticks(layers: Sequence[int]) -> tuple[list[int], list[str]]:
    """At most about 16 layer labels, so 60 layers stay legible."""
    step = max(1, math.ceil(len(layers) / 16))
    positions = list(range(0, len(layers), step))
    return positions, [str(layers[i]) for i in positions]


def layer_shares(
    shares: Sequence[Sequence[Sequence[float]]],
    panels: Sequence[str],
    experts: Sequence[str],
    layers: Sequence[int],
    title: str,
    columns: int = 6,
) -> bytes:
    """One heatmap per panel (a text, a label, an expert's prompts): rows are layers (first at the top),
    columns experts, colour the share in [0, 1]; `shares` is [panels][layers][experts]."""
    count = max(1, len(panels))
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    width = 1.2 + 0.45 * len(experts)
    height = 1.4 + 0.16 * len(layers)
    figure = Figure(figsize=(columns * width + 1.2, rows * height + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    image = None
    ticks, labels = _layer_ticks(layers)
    for index, ax in enumerate(axes.flat):
        if index >= len(panels):
            ax.set_axis_off()
            continue
        image = ax.imshow(shares[index], vmin=0, vmax=1, cmap=SHARE_COLORMAP, aspect="auto", interpolation="nearest")
        ax.set_title(panels[index][:28], fontsize=9)
        ax.set_xticks(range(len(experts)), [name[:10] for name in experts], rotation=60, fontsize=8, ha="right")
        ax.set_yticks(ticks, labels if index % columns == 0 else [""] * len(ticks), fontsize=7)
        if index % columns == 0:
            ax.set_ylabel("layer", fontsize=8)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label="share of tokens")
    figure.suptitle(title, fontsize=10)
    return png(figure)


def confusion(matrix: Sequence[Sequence[float]], labels: Sequence[str], experts: Sequence[str], title: str) -> bytes:
    """A label × expert matrix of shares (each row sums to 1), each cell annotated."""
    figure = Figure(figsize=(1.6 + 0.7 * len(experts), 1.2 + 0.5 * len(labels)), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap=SHARE_COLORMAP, interpolation="nearest")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="white" if value < 0.6 else "k")
    ax.set_xticks(range(len(experts)), list(experts), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), list(labels), fontsize=8)
    ax.set_xlabel("router's first choice")
    ax.set_ylabel("label")
    figure.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=10)
    return png(figure)


def lines(
    series: dict[str, Sequence[float]], xs: Sequence[int], xlabel: str, ylabel: str, title: str, colors: list[str]
) -> bytes:
    """One line per series over the same x values (layers), y in [0, 1]."""
    figure = Figure(figsize=(7, 3), layout="constrained")
    ax = figure.subplots()
    for (name, values), color in zip(series.items(), colors, strict=True):
        ax.plot(xs, values, marker=".", label=name, color=color)
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    return png(figure)


def grouped_bars(groups: Sequence[str], charts: dict[str, dict[str, Sequence[float | None]]], title: str) -> bytes:
    """Bar charts, one above the other, over the same groups (a model size, a method): `charts` maps each
    chart's y label to its series (name → one value per group, None leaves a gap); bars carry their values."""
    series_count = max(len(series) for series in charts.values())
    width = max(4.0, 0.35 * len(groups) * series_count + 1.5)
    figure = Figure(figsize=(width, 3.2 * len(charts) + 0.6), layout="constrained")
    for ax, (ylabel, series) in zip(figure.subplots(len(charts), 1, squeeze=False)[:, 0], charts.items(), strict=True):
        bar = 0.8 / max(1, len(series))
        for s, (name, values) in enumerate(series.items()):
            xs = [g + (s - (len(series) - 1) / 2) * bar for g in range(len(groups))]
            bars = ax.bar(xs, [v or 0 for v in values], bar, label=name, color=expert_color(s))
            ax.bar_label(bars, [f"{v:.3g}" if v is not None else "" for v in values], fontsize=7)
        tilted = len(groups) > 4
        ax.set_xticks(
            range(len(groups)),
            list(groups),
            fontsize=8,
            rotation=25 if tilted else 0,
            ha="right" if tilted else "center",
        )
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    return png(figure)
