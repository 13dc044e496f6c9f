"""Continual-learning scores: per-sample correctness, the accuracy matrix and what is read off it.

R[i, j] is the accuracy on task i's validation set after training task j (defined for i <= j).
Scoring is "multi-real" (lorax.md): a real image predicted as ANY real class is correct, a fake must
be given its own generator. Binary scoring only asks real vs fake.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from aigis.contract import is_real_label


def multi_real_correct(predicted: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-sample correctness: reals count as right for any real class, fakes only for their own."""
    predicted, target = np.asarray(predicted), np.asarray(target)
    both_real = is_real_label_array(predicted) & is_real_label_array(target)
    return both_real | (predicted == target)


def binary_correct(predicted: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-sample correctness of the real-vs-fake decision alone."""
    return is_real_label_array(np.asarray(predicted)) == is_real_label_array(np.asarray(target))


def is_real_label_array(labels: np.ndarray) -> np.ndarray:
    return np.vectorize(is_real_label, otypes=[bool])(labels) if labels.size else np.zeros(0, bool)


class AccuracyMatrix:
    """R[i, j] for tasks i and training stages j; NaN where not (yet) evaluated."""

    def __init__(self, num_tasks: int, num_stages: int | None = None) -> None:
        self.values = np.full((num_tasks, num_stages or num_tasks), np.nan)

    @classmethod
    def from_list(cls, rows: list[list[float | None]]) -> "AccuracyMatrix":
        matrix = cls(len(rows), len(rows[0]) if rows else 0)
        matrix.values[:] = [[np.nan if v is None else v for v in row] for row in rows]
        return matrix

    def to_list(self) -> list[list[float | None]]:
        return [[None if math.isnan(v) else float(v) for v in row] for row in self.values]

    def set(self, task: int, stage: int, accuracy: float) -> None:
        self.values[task, stage] = accuracy


def summarize(matrix: np.ndarray) -> dict[str, float | None]:
    """Final average accuracy, average incremental accuracy, BWT and forgetting of an accuracy matrix.

    A square matrix is a continual run (column j filled for rows 0..j). A single column is a joint
    run (trained once on everything): it has an average accuracy but no backward transfer.
    """
    R = np.asarray(matrix, dtype=float)
    if R.ndim != 2 or R.size == 0:
        raise ValueError(f"accuracy matrix must be 2-D and non-empty, got shape {R.shape}")
    tasks, stages = R.shape
    last = R[:, stages - 1]
    if np.isnan(last).any():
        raise ValueError("the last column of the accuracy matrix must be filled for every task")
    if stages == 1:
        average = float(last.mean())
        return {"average_accuracy": average, "average_incremental_accuracy": average,
                "bwt": None, "forgetting": None, "max_drop_forgetting": None}
    if stages != tasks:
        raise ValueError(f"a continual accuracy matrix must be square (or one column), got {R.shape}")
    incremental = [float(np.mean(R[: j + 1, j])) for j in range(stages)]
    if tasks == 1:
        bwt = forgetting_max = 0.0
    else:
        old = range(tasks - 1)
        bwt = float(np.mean([R[i, -1] - R[i, i] for i in old]))
        forgetting_max = float(np.mean([np.max(R[i, i : stages - 1]) - R[i, -1] for i in old]))
    return {
        "average_accuracy": float(last.mean()),
        "average_incremental_accuracy": float(np.mean(incremental)),
        "bwt": bwt,
        "forgetting": -bwt,
        "max_drop_forgetting": forgetting_max,
    }


def plot_accuracy_matrix(matrix: np.ndarray, task_names: list[str], path: str | Path, title: str = "") -> None:
    """Heat map of R[i, j] with the numbers written in, saved as PNG (matplotlib Agg, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = np.asarray(matrix, dtype=float)
    tasks, stages = R.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * stages, 1.0 + 0.7 * tasks), dpi=120)
    image = ax.imshow(np.ma.masked_invalid(R * 100), vmin=0, vmax=100, cmap="viridis")
    for i in range(tasks):
        for j in range(stages):
            if not math.isnan(R[i, j]):
                value = R[i, j] * 100
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if value > 60 else "white")
    column_names = task_names[:stages] if stages > 1 else ["joint"]
    ax.set_xticks(range(stages), column_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(tasks), task_names[:tasks], fontsize=8)
    ax.set_xlabel("after training task")
    ax.set_ylabel("evaluated on task")
    ax.set_title(title or "accuracy (%)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_percent(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}"
