"""PNG plots for heads and reports (matplotlib's Agg canvas, no pyplot state): curves, confusion, projection."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def training_curves_png(history: dict[str, list[float]]) -> bytes:
    """Loss and accuracy per epoch, train and validation, side by side."""
    fig = Figure(figsize=(9, 3.4))
    for ax, metric, title in zip(fig.subplots(1, 2), ("loss", "accuracy"), ("loss", "accuracy")):
        for key, name, style in ((metric, "train", "-"), (f"val_{metric}", "validation", "--")):
            values = history.get(key)
            if values:
                ax.plot(np.arange(1, len(values) + 1), values, style, marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(fig)


def confusion_png(cm: np.ndarray, labels: Sequence[str]) -> bytes:
    """Counts in every cell, true classes down, predicted across; readable up to ~40 classes."""
    n = len(labels)
    side = min(16.0, max(4.0, 0.55 * n + 2))
    fig = Figure(figsize=(side + 1, side))
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = cm.max() / 2 if cm.size and cm.max() else 0
    fontsize = 10 if n <= 12 else 7
    for i in range(n):
        for j in range(n):
            color = "white" if cm[i, j] > threshold else "black"
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color=color, fontsize=fontsize)
    ax.set_title("confusion matrix (evaluation images)")
    return _png(fig)


def projection_png(xy: np.ndarray, labels: Sequence[str] | np.ndarray, method: str) -> bytes:
    """A 2-D scatter of the features, one colour per class, legend outside the axes."""
    names = np.asarray(labels, dtype=object)
    classes = sorted(set(names.tolist()))
    cmap = _colours(len(classes))
    fig = Figure(figsize=(8, 6))
    ax = fig.subplots()
    for k, name in enumerate(classes):
        pts = xy[names == name]
        ax.scatter(pts[:, 0], pts[:, 1], s=12, alpha=0.75, color=cmap[k], label=f"{name} ({len(pts)})")
    ax.set_title(f"features in 2-D ({method}), coloured by true class")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _png(fig)


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
