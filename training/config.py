"""Training settings: one dataclass, read from TOML, overridable from the command line.

The defaults are the paper's (lorax.md); a config file only states what differs. Learning rates are
given at batch 512 and scaled by batch_size / 512 when used, as the paper does.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aigis.errors import TrainingError

METHODS = ("lorax", "finetune", "joint")
ON_BAD = ("stop", "skip")
REFERENCE_BATCH = 512

# Settings that change where or how fast a run goes but not what it learns: a resumed run may differ in them.
RUNTIME_ONLY = ("device", "num_workers", "on_bad", "cache_images")


class ConfigError(TrainingError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; targets=None means the backbone's default_lora_targets.

    last_blocks = k puts the adapters on the backbone's last k blocks and its head only: the blocks before them
    form a trunk that every task shares, computed (and exported) once, so each new task adds the cost of its
    tail only. None (or "all", which a config can write where a default of k is to be undone) adapts every
    block (the paper's setting)."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.1
    targets: list[str] | None = None
    last_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.last_blocks == "all":
            self.last_blocks = None


@dataclass
class TrainConfig:
    """Everything that decides what a training run learns (plus where it runs)."""

    backbone: str = "convit_base"
    weights: str | None = "default"      # "default", a local file, or None (random init)
    lora: LoraSettings = field(default_factory=LoraSettings)
    crop: int = 224
    epochs: int = 50
    batch_size: int = 32
    lr_first: float = 1e-4               # at batch 512; used for task 0
    lr_later: float = 5e-4               # at batch 512; used for tasks 1..
    weight_decay: float = 1e-6
    memory_size: int = 500
    diversity_weight: float = 0.1
    # After each task from the second on, the unified classifier alone is fine-tuned for this many epochs on the
    # exemplar memory (equal images per class) at balance_lr, against its drift toward the newest generator.
    # 0 = off (the paper's setting).
    balance_epochs: int = 0
    balance_lr: float = 1e-3
    seed: int = 0
    device: str = "auto"                 # auto = cuda if available, else cpu
    amp: bool | None = None              # None = on exactly when the device is CUDA
    num_workers: int = 0
    method: str = "lorax"
    # The baselines (finetune, joint) train every backbone weight; at rates tuned for LoRA adapters they
    # diverge, so their learning rates are multiplied by this factor (1.0 = the same rates as LoRAX).
    full_network_lr_scale: float = 1.0
    on_bad: str = "stop"                 # unreadable image: stop the run, or skip it with a warning
    cache_images: bool | str = "auto"    # keep decoded images in memory; auto = when the run is small

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = _from_dict(LoraSettings, self.lora, prefix="lora.")
        if isinstance(self.weights, str) and self.weights.lower() in ("none", "random", ""):
            self.weights = None
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.on_bad not in ON_BAD:
            raise ConfigError(f"on_bad: {self.on_bad!r} is not one of {', '.join(ON_BAD)}")
        for name in ("crop", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.cache_images not in (True, False, "auto"):
            raise ConfigError(f"cache_images: expected true, false or \"auto\", got {self.cache_images!r}")
        if self.balance_epochs < 0 or not self.balance_lr > 0:
            raise ConfigError(f"balance_epochs must not be negative and balance_lr must be positive, got "
                              f"{self.balance_epochs} and {self.balance_lr}")
        if self.memory_size < 0 or self.num_workers < 0:
            raise ConfigError("memory_size and num_workers must not be negative")
        if self.lora.r < 1:
            raise ConfigError(f"lora.r: must be at least 1, got {self.lora.r}")
        if self.lora.last_blocks is not None and (isinstance(self.lora.last_blocks, bool)
                                                  or not isinstance(self.lora.last_blocks, int)
                                                  or self.lora.last_blocks < 0):
            raise ConfigError(f"lora.last_blocks: a number of blocks (0 or more), \"all\" or unset, got "
                              f"{self.lora.last_blocks!r}")
        if not 0.0 <= self.lora.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.lora.dropout}")
        if not self.full_network_lr_scale > 0:
            raise ConfigError(f"full_network_lr_scale: must be positive, got {self.full_network_lr_scale}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device: {self.device!r} is not auto, cpu or cuda[:N]")

    # ---- derived values -------------------------------------------------------------------------
    def learning_rate(self, task_index: int) -> float:
        """The paper's rule: lr_first for task 0, lr_later after, each times batch_size / 512."""
        base = self.lr_first if task_index == 0 else self.lr_later
        if self.method != "lorax":
            base *= self.full_network_lr_scale
        return base * self.batch_size / REFERENCE_BATCH

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device: {self.device!r} asked for, but CUDA is not available here")
        return self.device

    def use_amp(self, device: str) -> bool:
        return device.startswith("cuda") if self.amp is None else bool(self.amp and device.startswith("cuda"))

    # ---- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def learning_identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        identity = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_ONLY}
        if self.method == "lorax":
            identity.pop("full_network_lr_scale")       # has no effect on a LoRAX run
        return identity

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, values)

    @classmethod
    def from_toml(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Read `path` (None = defaults only), then apply `overrides` ({"epochs": 3, "lora.r": 8})."""
        values: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            try:
                values = tomllib.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{path}: config file not found") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            head, _, tail = key.partition(".")
            if tail:
                values.setdefault(head, {})[tail] = value
            else:
                values[key] = value
        try:
            return cls.from_dict(values)
        except ConfigError as exc:
            raise ConfigError(f"{path or 'config'}: {exc}") from None


def _from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `values`, refusing unknown keys (a typo must not pass silently)."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(known)}")
    return cls(**values)


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable 'key: old -> new' lines between two nested settings dicts."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += differences(a, b, prefix + key + ".")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines
