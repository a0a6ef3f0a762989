"""Pictures of evaluation results, written atomically (temp file + rename) as PNG.

matplotlib's object API (Figure) is used directly: no global backend switch, no pyplot state.
"""
from __future__ import annotations

import os
from pathlib import Path

from selfflow.components.files import atomic_path
from selfflow.components.metrics.probes import ProbeResults
from selfflow.components.metrics.stratified import StratifiedLoss


def save_figure_atomic(figure, path: str | os.PathLike) -> Path:
    with atomic_path(path, suffix=".png") as temp:
        figure.savefig(temp, format="png", dpi=110, bbox_inches="tight")
    return Path(path)


def plot_probe_heatmap(results: ProbeResults, path: str | os.PathLike, step: int) -> Path:
    """Block x noise-level accuracy heatmaps (linear, and kNN when present)."""
    from matplotlib.figure import Figure

    tables = [("linear probe", results.linear)] + ([("kNN probe", results.knn)] if results.knn is not None else [])
    figure = Figure(figsize=(3.2 * len(tables) + 0.8, 0.45 * len(results.blocks) + 1.6))
    axes = figure.subplots(1, len(tables), squeeze=False)[0]
    image = None
    for axis, (title, table) in zip(axes, tables):
        image = axis.imshow(table, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(results.levels)), [f"{level:g}" for level in results.levels])
        axis.set_yticks(range(len(results.blocks)), [str(block) for block in results.blocks])
        axis.set_xlabel("noise level t")
        axis.set_ylabel("block")
        axis.set_title(f"{title}, step {step}")
        for row in range(table.shape[0]):
            for col in range(table.shape[1]):
                value = table[row, col]
                axis.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                          color="black" if value > 0.6 else "white")
    figure.colorbar(image, ax=list(axes), label="test accuracy")
    return save_figure_atomic(figure, path)


def plot_loss_by_t(losses: StratifiedLoss, path: str | os.PathLike, step: int) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 3.4))
    axis = figure.subplots()
    widths = (losses.edges[1:] - losses.edges[:-1]).numpy()
    axis.bar(losses.centres.numpy(), losses.means.numpy(), width=widths * 0.9, color="tab:blue")
    axis.axhline(losses.overall, color="tab:red", linestyle="--", label=f"overall {losses.overall:.4f}")
    axis.set_xlim(0.0, 1.0)
    axis.set_xlabel("t (0 = data, 1 = noise)")
    axis.set_ylabel("held-out flow loss")
    axis.set_title(f"loss by timestep, step {step}")
    axis.legend(loc="best")
    return save_figure_atomic(figure, path)
