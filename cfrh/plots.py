"""Report figures as PNG bytes (matplotlib, Agg backend), so they can be written to any cache filesystem."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # never needs a display; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Series:
    """One line of a panel: ``group`` picks the colour (e.g. the bit length), ``dashed`` marks a baseline."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    group: str = ""
    dashed: bool = False


def line_panels(panels: dict[str, list[Series]], xlabel: str, ylabel: str, title: str,
                xlim: tuple[float, float] | None = None, ylim: tuple[float, float] | None = (0.0, 1.0),
                markers: bool = True) -> bytes:
    """A row (or grid) of panels, one per key of ``panels``, with a shared legend; returns PNG bytes.

    Lines of the same ``group`` share a colour across panels, so "64 bits" reads the same everywhere."""
    names = list(panels)
    cols = min(len(names), 2) or 1
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    groups = list(dict.fromkeys(s.group for series in panels.values() for s in series))
    colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    for ax, name in zip(axes.flat, names):
        for s in panels[name]:
            ax.plot(s.x, s.y, label=s.label, color=colours[s.group], linestyle="--" if s.dashed else "-",
                    marker=None if (s.dashed or not markers) else "o", markersize=3, linewidth=1.4,
                    alpha=0.7 if s.dashed else 1.0)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if xlim:
            ax.set_xlim(*xlim)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize="small", frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) - 1) // 4), 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
