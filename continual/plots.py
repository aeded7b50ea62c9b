"""Every picture the project draws (people read forgetting off a picture faster than a table).

The libraries (``fusion``, ``continual.metrics``) compute tables; this module turns them into
text tables and PNGs: the accuracy matrix, fusion attention, routing confusion, metric bars,
the comparison's curves.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .metrics import AccuracyMatrix, accuracy_curve, score_label

SEEN = "mean seen"  # the printed matrices' column of the mean over the tasks seen so far


def format_matrix(matrix: AccuracyMatrix, metrics: dict[str, float] | None = None, f1: bool = False,
                  agnostic: bool = False) -> str:
    """A plain-text table: rows 'after task i', columns tasks, plus the b row and the metrics;
    ``agnostic``: the task-agnostic matrix instead, with each row's routing accuracy."""
    if agnostic:
        return _format_agnostic(matrix, metrics)
    R, b = (matrix.F1, matrix.b_f1) if f1 else (matrix.R, matrix.b)
    names = matrix.tasks
    width = max(8, *(len(n) + 1 for n in [*names, *matrix.scores]))
    cell = lambda v: f"{'-' if np.isnan(v) else f'{v:.3f}':>{width}}"  # noqa: E731
    corner = "after \\ on"
    # the last column: the mean over the tasks seen so far (metrics.accuracy_curve), row by row
    lines = [f"{corner:<16}" + "".join(f"{n:>{width}}" for n in names) + f"{SEEN:>{width + 2}}"]
    if not f1:  # what each column's entries are (the macro-F1 table says so in its title)
        lines.append(f"{'score':<16}" + "".join(f"{s:>{width}}" for s in matrix.scores))
    lines.append(f"{'untrained (b)':<16}" + "".join(cell(v) for v in b))
    for i, (n, seen) in enumerate(zip(names, accuracy_curve(R))):
        lines.append(f"{n:<16}" + "".join(cell(v) for v in R[i]) + "  " + cell(seen))
    if metrics:
        keys = ("ACC", "BWT", "FWT", "forgetting")
        suffix = "_f1" if f1 else ""
        lines.append("  ".join(f"{k}={_metric(metrics.get(k + suffix))}" for k in keys))
    return "\n".join(lines)


def _metric(v: float | None) -> str:
    """A metric for the summary line; "n/a" where it is undefined (BWT and forgetting of a one-task
    stream: no task was scored after a later one), not "+nan"."""
    return "n/a" if v is None or math.isnan(v) else f"{v:+.4f}"


def _format_agnostic(matrix: AccuracyMatrix, metrics: dict[str, float] | None) -> str:
    names = matrix.tasks
    width = max(8, *(len(n) + 1 for n in names))
    cell = lambda v: f"{'-' if np.isnan(v) else f'{v:.3f}':>{width}}"  # noqa: E731
    corner = "after \\ on"
    lines = [f"{corner:<16}" + "".join(f"{n:>{width}}" for n in names) + f"{SEEN:>{width + 2}}{'routing':>{width}}"]
    for i, (n, seen) in enumerate(zip(names, accuracy_curve(matrix.A))):
        lines.append(f"{n:<16}" + "".join(cell(v) for v in matrix.A[i]) + "  " + cell(seen) + cell(matrix.routing[i]))
    if metrics:
        lines.append("  ".join(f"{k}={_metric(metrics.get(k + '_agnostic'))}" for k in ("ACC", "BWT", "forgetting"))
                     + f"  routing={_metric(metrics.get('routing_accuracy')).lstrip('+')}")
    return "\n".join(lines)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; never opens a window
    import matplotlib.pyplot as plt

    return plt


def check_image_path(path: str | Path, option: str) -> None:
    """Refuse a picture path matplotlib cannot write by its suffix (before any table is printed:
    the error came after them), or one with none (matplotlib then writes PATH.png, not PATH)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    fig = _pyplot().figure()
    kinds = fig.canvas.get_supported_filetypes()
    _pyplot().close(fig)  # only its own: a caller's open figures stay
    if suffix not in kinds:
        raise ValueError(f"{option} {path}: give a picture file name ending in one of "
                         f"{', '.join('.' + k for k in sorted(kinds))} (e.g. heatmap.png)")


def _save(fig: Any, path: str | Path) -> Path:
    """Write a figure as a PNG (creating its folder) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def annotated_heatmap(
    data: np.ndarray, path: str | Path, xticks: list[str], yticks: list[str], title: str, *, xlabel: str = "",
    ylabel: str = "", cmap: str = "viridis", white_text: Callable[[float], bool] = lambda v: v < 0.6,
    figsize: tuple[float, float] | None = None, fontsize: int = 9, aspect: str = "equal",
    decorate: Callable[[Any], None] | None = None,
) -> Path:
    """A [0, 1] heatmap PNG with each cell's value written in it (NaN cells left blank)."""
    plt = _pyplot()

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
    return _save(fig, path)


def heatmap(matrix: AccuracyMatrix, path: str | Path, title: str = "", f1: bool = False, agnostic: bool = False) -> Path:
    """Write R (with the untrained row b on top) as an annotated heatmap PNG; ``agnostic``: the
    task-agnostic matrix (no b row: an untrained task cannot be routed to)."""
    T = len(matrix.tasks)
    if agnostic:
        return annotated_heatmap(matrix.A, path, matrix.tasks, [f"after {n}" for n in matrix.tasks],
                                 title or score_label(matrix) + " without the task id", xlabel="evaluated on",
                                 figsize=(1.1 * T + 2.5, 0.8 * T + 1.6))
    R, b = (matrix.F1, matrix.b_f1) if f1 else (matrix.R, matrix.b)
    data = np.vstack([b[None, :], R])
    return annotated_heatmap(
        data, path, matrix.tasks, ["untrained (b)"] + [f"after {n}" for n in matrix.tasks],
        title or ("macro-F1" if f1 else score_label(matrix)) + " matrix R[i, j]", xlabel="evaluated on",
        figsize=(1.1 * T + 2.5, 0.8 * T + 2), decorate=lambda ax: ax.axhline(0.5, color="white", linewidth=2))


def fusion_heatmap(weights: Any, path: str | Path, title: str | None = None) -> Path:
    """A :class:`fusion.FusionWeights` as a modules x sources heatmap PNG."""
    M, N = weights.weights.shape
    return annotated_heatmap(weights.weights, path, weights.sources, weights.rows,
                             title or f"fusion attention for {weights.task} (mean over {weights.tokens} tokens)",
                             xlabel="fused delta (source task)", cmap="magma", white_text=lambda v: v < 0.55,
                             figsize=(1.0 * N + 3, 0.38 * M + 1.8), fontsize=8, aspect="auto")


def write_fusion_report(weights: Any, directory: str | Path) -> list[Path]:
    """A fusion's attention weights as CSV, Markdown and PNG in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    md = d / f"fusion-{weights.task}.md"
    md.write_text(weights.table() + "\n")
    return [weights.to_csv(d / f"fusion-{weights.task}.csv"), md, fusion_heatmap(weights, d / f"fusion-{weights.task}.png")]


def task_attention_heatmap(names: Sequence[str], table: np.ndarray, path: str | Path, title: str) -> Path:
    """A tasks' inputs x tasks' deltas table of mean weights (SAPT's attention) as a PNG."""
    n = len(names)
    return annotated_heatmap(np.asarray(table, dtype=float), path, list(names), list(names), title,
                             xlabel="mean weight on the LoRA of", ylabel="inputs of", cmap="Blues",
                             white_text=lambda v: v > 0.6, figsize=(1.0 * n + 2.5, 0.8 * n + 2))


def routing_heatmap(result: Any, path: str | Path) -> Path:
    """A :class:`fusion.routing.RoutingResult`'s row-normalised confusion (true x routed task) as a PNG."""
    frac = result.confusion / result.confusion.sum(1, keepdims=True)
    n = len(result.tasks)
    return annotated_heatmap(frac, path, result.tasks, result.tasks,
                             f"{result.router} router: routing accuracy {result.routing_accuracy:.3f}",
                             xlabel="routed to", ylabel="true task", cmap="Blues", white_text=lambda v: v > 0.6,
                             figsize=(1.0 * n + 2.5, 0.8 * n + 2))


def metric_bars(rows: dict[str, dict[str, Any]], metrics: Sequence[str], path: str | Path,
                title: str = "continual-learning metrics per method") -> Path:
    """Grouped bars: each metric (x) for each row's label (one bar colour per row); a row holding
    ``<metric>_std`` (a study over several seeds) gets error bars of one standard deviation."""
    plt = _pyplot()

    def value(row: dict[str, Any], key: str) -> float:
        return np.nan if row.get(key) is None else row[key]

    labels = list(rows)
    x = np.arange(len(metrics))
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(2.2 * len(metrics) + 2, 4))
    spread = False
    for i, label in enumerate(labels):
        stds = [value(rows[label], f"{k}_std") for k in metrics]
        has = not all(np.isnan(stds))
        spread |= has
        ax.bar(x + i * width - 0.4 + width / 2, [value(rows[label], k) for k in metrics], width, label=label,
               yerr=stds if has else None, capsize=3 if has else 0)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, metrics)
    ax.set_title(title + (" (whiskers: ± one std over seeds)" if spread else ""))
    ax.legend(fontsize=8)
    return _save(fig, path)


def accuracy_curves(rows: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """One line per row's label: the mean score over the tasks seen so far after each task
    (``ACC_curve``), beside the same without the task id (``ACC_agnostic_curve``) where any row has it.
    Rows with ``<curve>_std`` (several seeds) get a band of one standard deviation."""
    plt = _pyplot()
    panels = [("ACC_curve", "with the task id")]
    if any(any(v is not None for v in r.get("ACC_agnostic_curve") or []) for r in rows.values()):
        panels.append(("ACC_agnostic_curve", "without the task id"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, (key, what) in zip(axes[0], panels):
        for label, row in rows.items():
            y = np.array(row.get(key) or [], dtype=float)  # (None, a point never measured, reads as NaN)
            if not len(y):
                continue
            x = np.arange(1, len(y) + 1)
            line, = ax.plot(x, y, marker="o", label=label)
            std = row.get(f"{key}_std")
            if std:
                s = np.array(std, dtype=float)
                ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.15)
            ax.set_xticks(x)
        ax.set_xlabel("tasks learned")
        ax.set_title(f"mean score over the tasks seen, {what}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(fontsize=8)
    return _save(fig, path)
