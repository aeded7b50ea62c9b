"""The accuracy matrix as a heatmap (people read forgetting off a picture faster than a table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from .metrics import AccuracyMatrix


def format_matrix(matrix: AccuracyMatrix, metrics: dict[str, float] | None = None, f1: bool = False) -> str:
    """A plain-text table: rows 'after task i', columns tasks, plus the b row and the metrics."""
    R, b = (matrix.F1, matrix.b_f1) if f1 else (matrix.R, matrix.b)
    names = matrix.tasks
    width = max(8, *(len(n) + 1 for n in names))
    cell = lambda v: f"{'-' if np.isnan(v) else f'{v:.3f}':>{width}}"  # noqa: E731
    corner = "after \\ on"
    lines = [f"{corner:<16}" + "".join(f"{n:>{width}}" for n in names)]
    lines.append(f"{'untrained (b)':<16}" + "".join(cell(v) for v in b))
    for i, n in enumerate(names):
        lines.append(f"{n:<16}" + "".join(cell(v) for v in R[i]))
    if metrics:
        keys = ("ACC", "BWT", "FWT", "forgetting")
        suffix = "_f1" if f1 else ""
        lines.append("  ".join(f"{k}={metrics.get(k + suffix, float('nan')):+.4f}" for k in keys))
    return "\n".join(lines)


def annotated_heatmap(
    data: np.ndarray, path: str | Path, xticks: list[str], yticks: list[str], title: str, *, xlabel: str = "",
    ylabel: str = "", cmap: str = "viridis", white_text: Callable[[float], bool] = lambda v: v < 0.6,
    figsize: tuple[float, float] | None = None, fontsize: int = 9, aspect: str = "equal",
    decorate: Callable[[Any], None] | None = None,
) -> Path:
    """A [0, 1] heatmap PNG with each cell's value written in it (NaN cells left blank)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; never opens a window
    import matplotlib.pyplot as plt

    rows, cols = data.shape
    fig, ax = plt.subplots(figsize=figsize or (1.1 * cols + 2.5, 0.8 * rows + 1.2))
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect=aspect)
    for (i, j), v in np.ndenumerate(data):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if white_text(v) else "black",
                    fontsize=fontsize)
    ax.set_xticks(range(cols), xticks, rotation=30, ha="right")
    ax.set_yticks(range(rows), yticks)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if decorate is not None:
        decorate(ax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(matrix: AccuracyMatrix, path: str | Path, title: str = "", f1: bool = False) -> Path:
    """Write R (with the untrained row b on top) as an annotated heatmap PNG."""
    R, b = (matrix.F1, matrix.b_f1) if f1 else (matrix.R, matrix.b)
    data = np.vstack([b[None, :], R])
    T = len(matrix.tasks)
    return annotated_heatmap(
        data, path, matrix.tasks, ["untrained (b)"] + [f"after {n}" for n in matrix.tasks],
        title or ("macro-F1" if f1 else "accuracy") + " matrix R[i, j]", xlabel="evaluated on",
        figsize=(1.1 * T + 2.5, 0.8 * T + 2), decorate=lambda ax: ax.axhline(0.5, color="white", linewidth=2))
