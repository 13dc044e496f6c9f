"""The LoRAX model: one frozen backbone, one LoRA adapter per task, one classifier over all of them.

Task k's feature extractor is the backbone with adapter k active. An image goes through every
extractor (the paper's unmerged way: peft's set_adapter before each pass); the features are
concatenated and a single linear "unified" classifier maps them to all classes seen so far. From
the second task on, a DER-style diversity head on the newest extractor's features (new classes + one
"old" output) pushes the new adapter towards features the old extractors lack.

For deployment each extractor can be merged (merge_and_unload) into a plain module, and the
classifier taken out on its own: export builds one served model per extractor plus one classifier.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import Tensor, nn

from aigis.training.config import LoraSettings

ADAPTER_PREFIX = "task_"


def adapter_name(task_index: int) -> str:
    """peft adapter name of task `task_index` (never a bare number, which would read as a module index)."""
    return f"{ADAPTER_PREFIX}{task_index}"


def configured_targets(settings: LoraSettings, backbone: nn.Module) -> list[str]:
    """lora.targets, else the backbone's defaults (for a tail, its tail defaults where it has them)."""
    if settings.targets is not None:
        return list(settings.targets)
    tail_defaults = getattr(backbone, "tail_lora_targets", None) if settings.last_blocks is not None else None
    return list(tail_defaults or getattr(backbone, "default_lora_targets", []))


def lora_targets(settings: LoraSettings, backbone: nn.Module) -> str | list[str]:
    """peft's target_modules: the configured targets (else the backbone's), within the tail when there is a trunk.

    A one-element list holding a regex is passed to peft as that regex. With lora.last_blocks set, the targets
    are resolved here to the module names inside the last blocks and the head, so the trunk carries no adapter.
    """
    shared = settings.last_blocks is not None
    targets = configured_targets(settings, backbone)
    if not targets:
        raise ValueError("no LoRA target modules: set lora.targets or give the backbone default_lora_targets")
    regex_chars = set("*+?|()[]\\^$")
    pattern = targets[0] if len(targets) == 1 and regex_chars & set(targets[0]) else None
    if not shared:
        return pattern if pattern is not None else targets

    def matches(name: str) -> bool:   # peft's rule: a regex matches the whole name, a name matches its end
        if pattern is not None:
            return re.fullmatch(pattern, name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)

    split = backbone.split_for(settings.last_blocks)
    names = [name for name, _ in backbone.named_modules() if name and matches(name) and backbone.in_tail(name, split)]
    if not names:
        raise ValueError(f"lora.last_blocks = {settings.last_blocks}: no LoRA target of {targets} lies in the "
                         f"last {settings.last_blocks} blocks or the head of {backbone.name}")
    return names


def lora_config(settings: LoraSettings, backbone: nn.Module):
    """peft LoraConfig from our settings and the backbone's targets."""
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=lora_targets(settings, backbone), bias="none")


class UnifiedClassifier(nn.Module):
    """Linear layer over the concatenation of every extractor's features: (f_0, ..., f_{T-1}) -> logits."""

    def __init__(self, feature_dim: int, num_extractors: int, num_classes: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.num_extractors = num_extractors
        self.linear = nn.Linear(feature_dim * num_extractors, num_classes)

    @property
    def num_classes(self) -> int:
        return self.linear.out_features

    def forward(self, *features: Tensor) -> Tensor:
        if len(features) != self.num_extractors:
            raise ValueError(f"classifier expects {self.num_extractors} feature tensors, got {len(features)}")
        return self.linear(torch.cat(features, dim=1))

    def expanded(self, extra_extractors: int, extra_classes: int) -> "UnifiedClassifier":
        """A larger classifier that starts as this one: old weights copied, old classes ignore new features.

        New rows (new classes) get PyTorch's default init; the old rows' weights on the new features
        start at zero, so the old decision function is unchanged when the new task begins.
        """
        grown = UnifiedClassifier(self.feature_dim, self.num_extractors + extra_extractors,
                                  self.num_classes + extra_classes).to(self.linear.weight.device)
        old_in, old_out = self.linear.in_features, self.linear.out_features
        with torch.no_grad():
            grown.linear.weight[:old_out].zero_()
            grown.linear.weight[:old_out, :old_in] = self.linear.weight
            grown.linear.bias[:old_out] = self.linear.bias
        return grown


class FeatureExtractor(nn.Module):
    """uint8 NHWC images -> float32 features: the model's ImageInput, then one backbone."""

    def __init__(self, image_input: nn.Module, backbone: nn.Module) -> None:
        super().__init__()
        self.image_input = image_input
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(self.image_input(images)).float()


class TrunkExtractor(nn.Module):
    """uint8 NHWC images -> the frozen trunk's activations: the stem and the blocks before the split, which
    carry no adapter and so are computed once per image for every task."""

    def __init__(self, image_input: nn.Module, backbone: nn.Module, split: int) -> None:
        super().__init__()
        self.image_input = image_input
        self.backbone = backbone
        self.split = split

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone.forward_trunk(self.image_input(images), self.split).float()


class TailExtractor(nn.Module):
    """Trunk activations -> one task's float32 features: the blocks after the split (its adapter merged) and the head."""

    def __init__(self, backbone: nn.Module, split: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.split = split

    def forward(self, trunk: Tensor) -> Tensor:
        return self.backbone.forward_tail(trunk, self.split).float()


class LoRAXModel(nn.Module):
    """Frozen backbone + per-task LoRA adapters + unified classifier (+ diversity head while training)."""

    def __init__(self, backbone: nn.Module, lora: LoraSettings, manifest: dict | None = None) -> None:
        super().__init__()
        from aigis.models import ImageInput

        self.image_input = ImageInput(backbone.mean, backbone.std)
        self.backbone_name: str = backbone.name
        self.feature_dim: int = backbone.feature_dim
        self.lora = lora
        self._peft_config = lora_config(lora, backbone)
        # Where the tail starts: with lora.last_blocks set, every block before it is a trunk shared by all tasks.
        self.trunk_split: int = backbone.split_for(lora.last_blocks)
        for parameter in backbone.parameters():
            parameter.requires_grad_(False)
        self.extractors: nn.Module = backbone     # becomes a peft PeftModel with the first task
        self.classifier: UnifiedClassifier | None = None
        self.diversity_head: nn.Linear | None = None
        self.num_tasks = 0
        self.trainable_task: int | None = None    # the adapter that learns; None = all frozen
        self.manifest: dict = manifest or {}

    # ---- growing ---------------------------------------------------------------------------------
    def add_task(self, new_classes: int = 2) -> int:
        """Add an adapter, grow the classifier by `new_classes`, reset the diversity head. Returns the task index."""
        from peft import get_peft_model

        task = self.num_tasks
        name = adapter_name(task)
        if task == 0:
            self.extractors = get_peft_model(self.extractors, copy.deepcopy(self._peft_config), adapter_name=name)
            device = self.image_input_device()
            self.classifier = UnifiedClassifier(self.feature_dim, 1, new_classes).to(device)
        else:
            self.extractors.add_adapter(name, copy.deepcopy(self._peft_config))
            self.classifier = self.classifier.expanded(1, new_classes)
        self.extractors.to(self.image_input_device())
        self.num_tasks = task + 1
        self.diversity_head = (nn.Linear(self.feature_dim, new_classes + 1).to(self.image_input_device())
                               if task > 0 else None)
        self.trainable_task = task
        self.extractors.set_adapter(name)
        return task

    def freeze(self) -> None:
        """End of training: no adapter learns any more; the diversity head is kept for the checkpoint only."""
        self.trainable_task = None
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates in the current task: the active adapter and both heads."""
        if self.trainable_task is None:
            return []
        params = list(self.adapter_parameters(self.trainable_task).values())
        params += list(self.classifier.parameters())
        if self.diversity_head is not None:
            params += list(self.diversity_head.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    # ---- running ---------------------------------------------------------------------------------
    def image_input_device(self) -> torch.device:
        for tensor in self.image_input.buffers():
            return tensor.device
        return next(self.extractors.parameters()).device

    @property
    def shared_trunk(self) -> bool:
        """Whether the model is served as one trunk plus a tail per task (lora.last_blocks set)."""
        return self.lora.last_blocks is not None

    def backbone_module(self) -> nn.Module:
        """The backbone with its LoRA layers in place (peft's wrapper taken off)."""
        get_base_model = getattr(self.extractors, "get_base_model", None)
        return get_base_model() if get_base_model is not None else self.extractors

    def trunk_features(self, pixels: Tensor) -> Tensor:
        """The trunk's activations of normalised `pixels`: computed once, whatever the number of tasks."""
        with torch.no_grad():   # no adapter lies in the trunk
            return self.backbone_module().forward_trunk(pixels, self.trunk_split)

    def task_features(self, trunk: Tensor, task: int) -> Tensor:
        """Features from extractor `task` (adapter `task` active) of the trunk's activations."""
        learning = task == self.trainable_task and torch.is_grad_enabled()
        self.extractors.set_adapter(adapter_name(task), inference_mode=not learning)
        with torch.set_grad_enabled(learning):
            return self.backbone_module().forward_tail(trunk, self.trunk_split).float()

    def features(self, images: Tensor) -> list[Tensor]:
        """Every extractor's features of uint8 NHWC `images`, in task order."""
        trunk = self.trunk_features(self.image_input(images))
        return [self.task_features(trunk, k) for k in range(self.num_tasks)]

    def forward(self, images: Tensor) -> Tensor:
        """uint8 NHWC images -> logits over all classes seen (T unmerged passes, one per adapter)."""
        self._check_ready()
        return self.classifier(*self.features(images))

    def forward_train(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits and, from task 2 on, the diversity head's logits on the newest extractor's features."""
        self._check_ready()
        features = self.features(images)
        diversity = self.diversity_head(features[-1]) if self.diversity_head is not None else None
        return self.classifier(*features), diversity

    def train(self, mode: bool = True) -> "LoRAXModel":
        """Training mode reaches only the LoRA dropout: the frozen backbone (its BatchNorm statistics and
        dropout included) always runs as in evaluation, so old extractors stay exactly what they were."""
        super().train(False)
        self.training = mode
        if mode:
            for module_name, module in self.extractors.named_modules():
                if module_name.endswith(f"lora_dropout.{adapter_name(self.trainable_task)}"):
                    module.train(True)
        return self

    # ---- deployment views ------------------------------------------------------------------------
    def merged_extractor(self, task: int) -> nn.Module:
        """A standalone module with adapter `task` merged into the weights: uint8 NHWC -> float32 [N, D], or with a
        shared trunk the tail, trunk activations -> float32 [N, D]."""
        self._check_task(task)
        extractors = copy.deepcopy(self.extractors)
        extractors.set_adapter(adapter_name(task), inference_mode=True)
        merged = extractors.merge_and_unload(adapter_names=[adapter_name(task)])
        extractor = (TailExtractor(merged, self.trunk_split) if self.shared_trunk
                     else FeatureExtractor(copy.deepcopy(self.image_input), merged)).eval()
        for parameter in extractor.parameters():
            parameter.requires_grad_(False)
        return extractor

    def trunk_module(self) -> TrunkExtractor:
        """The standalone shared trunk (uint8 NHWC -> activations entering the tail), for a shared-trunk model."""
        self._check_ready()
        if not self.shared_trunk:
            raise RuntimeError("this model adapts every block (lora.last_blocks is not set): it has no shared trunk")
        backbone = copy.deepcopy(self.extractors).unload()   # the frozen backbone, adapters taken out
        trunk = TrunkExtractor(copy.deepcopy(self.image_input), backbone, self.trunk_split).eval()
        for parameter in trunk.parameters():
            parameter.requires_grad_(False)
        return trunk

    def classifier_module(self) -> UnifiedClassifier:
        """A standalone copy of the unified classifier: (features_0, ..., features_{T-1}) -> logits."""
        self._check_ready()
        classifier = copy.deepcopy(self.classifier).eval()
        for parameter in classifier.parameters():
            parameter.requires_grad_(False)
        return classifier

    # ---- state for checkpoints -------------------------------------------------------------------
    def adapter_parameters(self, task: int) -> dict[str, nn.Parameter]:
        """Adapter `task`'s parameters, keyed by their path in the backbone without the adapter name."""
        self._check_task(task)
        name = adapter_name(task)
        found = {}
        for path, parameter in self.extractors.named_parameters():
            parts = path.split(".")
            if name in parts:
                key = ".".join(p for p in parts if p != name)
                found[key.removeprefix("base_model.model.")] = parameter
        if not found:
            raise RuntimeError(f"adapter {name} has no parameters: do the LoRA targets match any module?")
        return found

    # Adapters are saved as peft writes them (get/set_peft_model_state_dict) without peft's wrapper prefix, so a
    # checkpoint's keys are the backbone's own module paths.
    PEFT_PREFIX = "base_model.model."

    def adapter_state_dict(self, task: int) -> dict[str, Tensor]:
        from peft import get_peft_model_state_dict

        self._check_task(task)
        state = get_peft_model_state_dict(self.extractors, adapter_name=adapter_name(task))
        return {k.removeprefix(self.PEFT_PREFIX): v.detach().cpu().contiguous().clone() for k, v in state.items()}

    def load_adapter_state_dict(self, task: int, state: dict[str, Tensor]) -> None:
        from peft import set_peft_model_state_dict

        own = self.adapter_state_dict(task)
        if set(own) != set(state):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ValueError(f"adapter {task} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
        for key, value in own.items():
            if value.shape != state[key].shape:
                raise ValueError(f"adapter {task}, {key}: shape {list(state[key].shape)} != {list(value.shape)}")
        set_peft_model_state_dict(self.extractors, {self.PEFT_PREFIX + k: v for k, v in state.items()},
                                  adapter_name=adapter_name(task))

    def heads_state_dict(self) -> dict[str, Tensor]:
        self._check_ready()
        state = {f"classifier.{k}": v for k, v in self.classifier.linear.state_dict().items()}
        if self.diversity_head is not None:
            state.update({f"diversity.{k}": v for k, v in self.diversity_head.state_dict().items()})
        return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}

    def load_heads_state_dict(self, state: dict[str, Tensor]) -> None:
        self._check_ready()
        self.classifier.linear.load_state_dict({k.removeprefix("classifier."): v for k, v in state.items()
                                                if k.startswith("classifier.")})
        diversity = {k.removeprefix("diversity."): v for k, v in state.items() if k.startswith("diversity.")}
        if diversity and self.diversity_head is not None:
            self.diversity_head.load_state_dict(diversity)

    def _check_ready(self) -> None:
        if self.num_tasks == 0 or self.classifier is None:
            raise RuntimeError("the model has no task yet: call add_task() (or load a run) first")

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} does not exist; the model has {self.num_tasks} task(s)")
