"""What every backbone shares: the Backbone interface, the in-model normalisation, weight files, hashes.

Kept apart from `aigis.models.__init__` so that the model files can import it without a cycle.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

from aigis.errors import DataError

# How many key names an error message lists before it says "...".
_SHOWN_KEYS = 5


class WeightsError(DataError):
    """A weights file that cannot be used; the message names the file and what did not fit."""


class Backbone(nn.Module):
    """A frozen feature extractor: normalised float [N, 3, H, W] -> pooled features [N, feature_dim].

    Subclasses set the attributes below in __init__. `mean` and `std` are on the 0..1 scale, as
    ImageInput expects. `default_lora_targets` is what peft's `target_modules` should be: a list of
    module names, or one regular expression in a 1-element list (pass it to peft as the bare string,
    which peft matches against the full module name).
    """

    name: str
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_lora_targets: list[str]

    # The repeated blocks, in order, are the ModuleList attribute named here. A shared trunk (LoRA on the last k
    # blocks only) splits the network before one of them: forward_trunk runs the stem and blocks[:split], which
    # no adapter touches, once per image; forward_tail runs blocks[split:] and the head once per task.
    blocks_attribute: str
    # Modules after the blocks (the head); with the blocks past the split they make up the tail.
    tail_modules: tuple[str, ...] = ()

    @property
    def num_blocks(self) -> int:
        return len(getattr(self, self.blocks_attribute))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_tail(self.forward_trunk(x, 0), 0)

    def forward_trunk(self, x: Tensor, split: int) -> Tensor:
        """Normalised images -> the activations entering block `split` (the stem and the blocks before it)."""
        raise NotImplementedError

    def forward_tail(self, h: Tensor, split: int) -> Tensor:
        """forward_trunk's output -> pooled features [N, feature_dim] (block `split` on, then the head)."""
        raise NotImplementedError

    def split_for(self, last_blocks: int | None) -> int:
        """The block where the tail starts when LoRA adapts the last `last_blocks` blocks (None: all of them)."""
        if last_blocks is None:
            return 0
        if not 0 <= last_blocks <= self.num_blocks:
            raise ValueError(f"lora.last_blocks: {self.name} has {self.num_blocks} blocks, got {last_blocks}")
        return self.num_blocks - last_blocks

    def in_tail(self, module_name: str, split: int) -> bool:
        """Whether module `module_name` runs in the tail that starts at block `split`."""
        parts = module_name.split(".")
        if parts[0] == self.blocks_attribute:
            return len(parts) > 1 and int(parts[1]) >= split
        return parts[0] in self.tail_modules

    def forward_logits(self, x: Tensor) -> Tensor:
        """ImageNet logits from the pretrained classifier, kept only to check that weights loaded right."""
        raise NotImplementedError

    def image_input(self) -> "ImageInput":
        """The normalisation this backbone's weights expect, as a module that takes uint8 NHWC."""
        return ImageInput(self.mean, self.std)


class ImageInput(nn.Module):
    """uint8 [N, H, W, 3] RGB -> normalised float32 [N, 3, H, W]: (x / 255 - mean) / std per channel.

    Normalisation lives in the model (and so in every exported graph) so that clients send raw pixels.
    Written with plain tensor ops only, which export to ONNX as a few elementwise nodes.
    """

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got mean={mean!r} std={std!r}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std!r}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # Work on the 0..255 scale: (x - 255 * mean) / (255 * std). Products are taken in float64 first,
        # so e.g. mean = 127/255, std = 128/255 gives exactly (x - 127) / 128.
        offset = torch.tensor([255.0 * m for m in self.mean], dtype=torch.float64)
        scale = torch.tensor([255.0 * s for s in self.std], dtype=torch.float64)
        # Not persistent: they follow from (mean, std), which the manifest records, not from trained weights.
        self.register_buffer("offset", offset.float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", scale.float().view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"ImageInput expects uint8 [N, H, W, 3] RGB images, got {images.dtype} "
                             f"{list(images.shape)}")
        x = images.permute(0, 3, 1, 2).float()
        return (x - self.offset) / self.scale

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


def state_dict_sha256(module: nn.Module) -> str:
    """Hex SHA-256 of every tensor in the state dict, in name order: the identity of frozen weights.

    Names, dtypes and shapes are hashed along with the bytes, so a renamed or reshaped tensor changes
    the hash too. Independent of device and of the order modules were registered in.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _unwrap(checkpoint: object, path: Path) -> dict[str, Tensor]:
    """Accept a bare state dict or one under "model" / "state_dict" (common training-script wrappers)."""
    if isinstance(checkpoint, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(checkpoint.get(wrapper), dict):
                checkpoint = checkpoint[wrapper]
                break
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise WeightsError(f"{path}: expected a state dict (name -> tensor), got {type(checkpoint).__name__}")
    not_tensors = [key for key, value in checkpoint.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise WeightsError(f"{path}: {len(not_tensors)} entries are not tensors: {_some(not_tensors)}")
    return dict(checkpoint)


def _some(keys: list[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f", ... ({len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else "")


def read_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Read a .safetensors or .pth/.pt/.bin checkpoint without unpickling objects (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path), device="cpu"), path)
        except SafetensorError as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise WeightsError(f"{path}: refused to load: it holds pickled objects, and only plain tensors "
                               f"are accepted (weights_only=True)") from exc
        raise WeightsError(f"{path}: not a readable torch checkpoint ({str(exc).splitlines()[0]})") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    return _unwrap(checkpoint, path)


def load_weights_file(path: str | Path, model: nn.Module | None = None) -> dict[str, Tensor]:
    """Read a checkpoint; with `model`, also check that it fits exactly and load it into the model.

    Raises FileNotFoundError for a missing file and WeightsError (naming the file and a few keys)
    for an unreadable file, missing or unexpected keys, or shapes that do not match.
    """
    state = read_weights_file(path)
    if model is not None:
        load_checked(model, state, source=str(path))
    return state


def load_checked(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """load_state_dict(strict=True), but one WeightsError that lists what is missing, extra or misshapen."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [f"{key} {list(state[key].shape)} != {list(expected[key].shape)}"
                   for key in expected if key in state and state[key].shape != expected[key].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_some(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensors with the wrong shape: {_some(wrong_shape)}")
    if problems:
        what = getattr(model, "name", type(model).__name__)
        raise WeightsError(f"{source}: does not fit {what}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
