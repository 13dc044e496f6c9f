"""The two reference points LoRAX is measured against, in the same harness.

- finetune: one backbone, fully trainable, task after task, with a growing classifier and no memory.
  It shows how much a plain network forgets (the lower bound).
- joint: the same network trained once on all tasks together (the upper bound, no forgetting possible).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from aigis.training.model import FeatureExtractor, UnifiedClassifier


class FullModel(nn.Module):
    """ImageInput + a fully trainable backbone + a linear classifier that grows with each task."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        from aigis.models import ImageInput

        self.image_input = ImageInput(backbone.mean, backbone.std)
        self.backbone = backbone
        self.backbone_name: str = backbone.name
        self.feature_dim: int = backbone.feature_dim
        self.classifier: UnifiedClassifier | None = None
        self.num_tasks = 0

    def add_task(self, new_classes: int = 2) -> int:
        """Grow the classifier by `new_classes` (one more task's real and fake). Returns the task index."""
        if self.classifier is None:
            device = next(self.backbone.parameters()).device
            self.classifier = UnifiedClassifier(self.feature_dim, 1, new_classes).to(device)
        else:
            self.classifier = self.classifier.expanded(0, new_classes)
        self.num_tasks += 1
        return self.num_tasks - 1

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.backbone.parameters()) + list(self.classifier.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    def freeze(self) -> None:
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def trunk_features(self, pixels: Tensor) -> Tensor:
        """No shared trunk: every weight trains, so the whole backbone is the one extractor."""
        return pixels

    def task_features(self, pixels: Tensor, task: int = 0) -> Tensor:
        """The one extractor's features of normalised `pixels` (`task` is ignored: there is one backbone)."""
        return self.backbone(pixels).float()

    def features(self, images: Tensor) -> list[Tensor]:
        return [self.task_features(self.image_input(images))]

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(*self.features(images))

    def forward_train(self, images: Tensor) -> tuple[Tensor, None]:
        return self(images), None

    def merged_extractor(self, task: int = 0) -> FeatureExtractor:
        return FeatureExtractor(copy.deepcopy(self.image_input), copy.deepcopy(self.backbone)).eval()

    def classifier_module(self) -> UnifiedClassifier:
        return copy.deepcopy(self.classifier).eval()

    def model_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.backbone.state_dict().items()}

    def load_model_state_dict(self, state: dict[str, Tensor]) -> None:
        self.backbone.load_state_dict(state, strict=True)

    def heads_state_dict(self) -> dict[str, Tensor]:
        return {f"classifier.{k}": v.detach().cpu().contiguous().clone()
                for k, v in self.classifier.linear.state_dict().items()}

    def load_heads_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.classifier.linear.load_state_dict({k.removeprefix("classifier."): v for k, v in state.items()})
