"""One attribution answer, computed from the served class probabilities and the manifest's class names."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from aigis import contract

from .manifest import Manifest


@dataclass(frozen=True)
class Attribution:
    """The answer for one image.

    `generator` is the task whose fake class won (None when a real class won); `fake_score` sums the
    probabilities of all fake classes, so it stays meaningful when several generators share the mass.
    """

    label: str                          # predicted class name, e.g. "fake/biggan"
    generator: str | None
    is_fake: bool
    fake_score: float
    probabilities: dict[str, float]     # class name -> probability, in class order
    model_version: str                  # the version that answered, from the response

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attributions(probs: np.ndarray, manifest: Manifest, model_version: str) -> list[Attribution]:
    """PROBS [N, C] -> one Attribution per row."""
    probs = np.asarray(probs, dtype=np.float64)
    names = manifest.class_names
    if probs.ndim != 2 or probs.shape[1] != len(names):
        raise ValueError(f"PROBS has shape {list(probs.shape)}, the manifest names {len(names)} classes")
    fake_columns = [c for c in range(len(names)) if not contract.is_real_label(c)]
    results = []
    for row in probs:
        best = int(np.argmax(row))
        fake = not contract.is_real_label(best)
        results.append(
            Attribution(
                label=names[best],
                generator=manifest.tasks[contract.task_of_label(best)] if fake else None,
                is_fake=fake,
                fake_score=float(row[fake_columns].sum()),
                probabilities={name: float(p) for name, p in zip(names, row)},
                model_version=model_version,
            )
        )
    return results
