"""Continual LoRAX training, its baselines and metrics.

    from aigis.training import load_run
    model = load_run("runs/demo")            # LoRAXModel, eval mode, every finished task

Imports are lazy so that `aigis --help` (which imports aigis.training.cli) does not load torch.
"""

from __future__ import annotations

__all__ = ["ContinualRun", "LoRAXModel", "TrainConfig", "load_run"]


def __getattr__(name: str):
    if name in ("load_run", "ContinualRun"):
        from aigis.training import run

        return getattr(run, name)
    if name == "LoRAXModel":
        from aigis.training.model import LoRAXModel

        return LoRAXModel
    if name == "TrainConfig":
        from aigis.training.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'aigis.training' has no attribute {name!r}")
