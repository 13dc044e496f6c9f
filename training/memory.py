"""Exemplar memory: a fixed budget of past images, chosen by iCaRL herding, replayed in later tasks.

The budget is shared by all classes seen so far: each class keeps memory_size // classes_seen images.
Herding returns a *ranking*, so shrinking an old class to a smaller quota keeps its first entries,
which are still the best approximation of its mean at that size (iCaRL's reduce step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def herding_order(features: np.ndarray, count: int) -> np.ndarray:
    """Indices of min(count, N) rows whose running mean best follows the mean of all rows (iCaRL).

    Rows are L2-normalised first, as iCaRL does, so the choice does not favour large activations.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"herding expects [N, D] features, got shape {features.shape}")
    count = min(int(count), len(features))
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = features / np.maximum(norms, 1e-12)
    target = unit.mean(axis=0)
    chosen: list[int] = []
    running_sum = np.zeros_like(target)
    available = np.ones(len(unit), dtype=bool)
    for k in range(1, count + 1):
        # Distance between the class mean and the mean we would have after adding each candidate.
        gaps = np.linalg.norm(target - (running_sum + unit) / k, axis=1)
        gaps[~available] = np.inf
        pick = int(np.argmin(gaps))
        chosen.append(pick)
        available[pick] = False
        running_sum += unit[pick]
    return np.asarray(chosen, dtype=np.int64)


@dataclass(frozen=True)
class Exemplar:
    """One remembered training image: its path relative to the data root, and its label."""

    path: str
    label: int


class ExemplarMemory:
    """Per-class ranked exemplars under one total budget."""

    def __init__(self, memory_size: int) -> None:
        if memory_size < 0:
            raise ValueError(f"memory_size must not be negative, got {memory_size}")
        self.memory_size = memory_size
        self.by_class: dict[int, list[Exemplar]] = {}

    def quota(self, classes_seen: int) -> int:
        """Images each class may keep once `classes_seen` classes share the budget."""
        return self.memory_size // classes_seen if classes_seen > 0 else self.memory_size

    def update(self, paths: list[str], labels: np.ndarray, features: np.ndarray, classes_seen: int) -> None:
        """Shrink the old classes to the new quota, then herd the quota for every class in `labels`."""
        labels = np.asarray(labels)
        if not (len(paths) == len(labels) == len(features)):
            raise ValueError(f"paths, labels and features disagree in length: {len(paths)}, {len(labels)}, "
                             f"{len(features)}")
        quota = self.quota(classes_seen)
        for label in self.by_class:
            self.by_class[label] = self.by_class[label][:quota]
        for label in sorted(set(int(v) for v in labels)):
            rows = np.flatnonzero(labels == label)
            order = rows[herding_order(features[rows], quota)]
            self.by_class[label] = [Exemplar(paths[i], label) for i in order]
        if len(self) > self.memory_size:
            raise AssertionError(f"memory holds {len(self)} images, over its budget of {self.memory_size}")

    def exemplars(self) -> list[Exemplar]:
        return [e for label in sorted(self.by_class) for e in self.by_class[label]]

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_class.values())

    def to_json(self) -> dict:
        return {"memory_size": self.memory_size,
                "exemplars": [{"path": e.path, "label": e.label} for e in self.exemplars()]}

    @classmethod
    def from_json(cls, data: dict) -> "ExemplarMemory":
        memory = cls(int(data["memory_size"]))
        for item in data["exemplars"]:
            memory.by_class.setdefault(int(item["label"]), []).append(Exemplar(str(item["path"]), int(item["label"])))
        return memory
