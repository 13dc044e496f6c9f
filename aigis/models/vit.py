"""A plain Vision Transformer whose parameter names match timm's, so timm checkpoints load from a file.

Names: patch_embed.proj, cls_token, pos_embed, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2}, norm, head. Every projection is a plain nn.Linear: peft wraps those, whereas
nn.MultiheadAttention / nn.TransformerEncoder take fast paths that bypass LoRA wrappers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigis.models.base import Backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)   # timm's augreg ViT weights were trained with mean = std = 0.5
INCEPTION_STD = (0.5, 0.5, 0.5)
LAYER_NORM_EPS = 1e-6              # timm's ViT and ConViT both use 1e-6, not PyTorch's 1e-5


def resize_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Resample patch position embeddings [1, gh*gw, D] from one patch grid to another.

    Lets a 224-px checkpoint (14x14 patches) run on other crops, e.g. 64 px (4x4 patches). Bicubic
    with antialiasing, as timm resamples them (exports to ONNX as one Resize node, opset >= 18).
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, with one strided convolution."""

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        height, width = x.shape[-2:]
        if height < self.patch_size or width < self.patch_size:
            raise ValueError(f"input {height}x{width} is smaller than one {self.patch_size}-px patch")
        x = self.proj(x)                               # [N, D, gh, gw]
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid      # [N, gh*gw, D]


class Attention(nn.Module):
    """Multi-head self-attention from one fused qkv projection (timm's Attention / ConViT's MHSA)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)             # each [N, heads, tokens, head_dim]
        x = F.scaled_dot_product_attention(q, k, v)                # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """Token-wise feed-forward: fc1, GELU, fc2."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(Backbone):
    """ViT (Dosovitskiy et al.) with a class token; features are the final-norm class token."""

    blocks_attribute = "blocks"
    tail_modules = ("norm",)

    def __init__(
        self,
        name: str,
        dim: int,
        depth: int,
        num_heads: int,
        patch_size: int = 16,
        img_size: int = 224,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_classes: int = 1000,
        mean: tuple[float, float, float] = INCEPTION_MEAN,
        std: tuple[float, float, float] = INCEPTION_STD,
    ) -> None:
        super().__init__()
        self.name = name
        self.feature_dim = dim
        self.mean, self.std = mean, std
        self.default_lora_targets = [r"(.*\.)?blocks\.\d+\.attn\.qkv"]   # (.*\.)? also matches when nested
        # The patch grid the position embeddings were learnt for; other input sizes resample them.
        self.grid = (img_size // patch_size, img_size // patch_size)

        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's scheme for training from scratch: small truncated normals, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def fix_input_size(self, size: int) -> None:
        """Resample the position embeddings once for `size`-px inputs (export: the crop is fixed, and the
        bicubic-antialias resize then needs no ONNX operator). Only for a frozen copy: it changes weights."""
        grid = (size // self.patch_embed.patch_size,) * 2
        with torch.no_grad():
            patches = resize_pos_embed(self.pos_embed[:, 1:], self.grid, grid)
            self.pos_embed = nn.Parameter(torch.cat([self.pos_embed[:, :1], patches], dim=1), requires_grad=False)
        self.grid = grid

    def forward_trunk(self, x: Tensor, split: int) -> Tensor:
        x, grid = self.patch_embed(x)
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        x = x + resize_pos_embed(patch_pos, self.grid, grid)
        cls = (self.cls_token + cls_pos).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks[:split]:
            x = block(x)
        return x

    def forward_tail(self, h: Tensor, split: int) -> Tensor:
        for block in self.blocks[split:]:
            h = block(h)
        return self.norm(h[:, 0])

    def forward_logits(self, x: Tensor) -> Tensor:
        return self.head(self(x))


def vit_tiny_patch16_224() -> VisionTransformer:
    return VisionTransformer("vit_tiny_patch16_224", dim=192, depth=12, num_heads=3)


def vit_small_patch16_224() -> VisionTransformer:
    return VisionTransformer("vit_small_patch16_224", dim=384, depth=12, num_heads=6)


def vit_base_patch16_224() -> VisionTransformer:
    return VisionTransformer("vit_base_patch16_224", dim=768, depth=12, num_heads=12)


def vit_micro() -> VisionTransformer:
    """A random-init test size that runs in milliseconds on CPU at 32-64 px."""
    return VisionTransformer("vit_micro", dim=48, depth=4, num_heads=3, patch_size=8, img_size=32,
                             num_classes=10)
