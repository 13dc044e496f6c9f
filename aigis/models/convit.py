"""ConViT (d'Ascoli et al., 2021): a ViT whose first layers can behave like convolutions.

The first `local_up_to_layer` blocks use gated positional self-attention (GPSA): each head mixes
ordinary content attention with a learnt attention over relative patch positions, weighted by a
per-head gate. The class token joins only after those blocks; the remaining blocks are plain
multi-head self-attention. Parameter names match timm's convit_{tiny,small,base}, so their
checkpoints load from a local file. LoRAX puts its adapters on the GPSA blocks' qk and v projections.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from aigis.models.base import Backbone
from aigis.models.vit import (IMAGENET_MEAN, IMAGENET_STD, LAYER_NORM_EPS, Attention, Mlp, PatchEmbed,
                              resize_pos_embed)


def relative_positions(grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """[P, P, 3] for P = gh*gw patches in row-major order: (dx, dy, dx^2 + dy^2) from query p to key q."""
    rows = torch.arange(grid[0], device=device).repeat_interleave(grid[1])
    cols = torch.arange(grid[1], device=device).repeat(grid[0])
    dy = rows[None, :] - rows[:, None]
    dx = cols[None, :] - cols[:, None]
    return torch.stack([dx, dy, dx * dx + dy * dy], dim=-1).to(dtype)


class GPSA(nn.Module):
    """Gated positional self-attention: per head, (1 - g) * content attention + g * positional attention.

    g = sigmoid(gating_param[head]). The positional attention is softmax(pos_proj(relative position)),
    which depends on where a key patch is, not on what it shows: with the local init below each head
    attends around one fixed offset, like one tap of a convolution kernel.
    """

    def __init__(self, dim: int, num_heads: int, locality_strength: float = 1.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.locality_strength = locality_strength
        self.qk = nn.Linear(dim, dim * 2, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)
        self.gating_param = nn.Parameter(torch.ones(num_heads))

    @torch.no_grad()
    def local_init(self) -> None:
        """Start as a convolution: v = identity, head (i, j) of a k x k grid peaks at offset (j - c, i - c).

        pos_proj maps (dx, dy, d^2) to 2 * (dx * ox + dy * oy) - d^2 = |offset|^2 - |delta - offset|^2,
        largest where the relative position delta equals the head's offset. Heads beyond k*k keep
        their random init, as in the paper's code.
        """
        self.v.weight.copy_(torch.eye(self.v.weight.shape[0]))
        kernel = int(self.num_heads ** 0.5)
        center = (kernel - 1) / 2
        for i in range(kernel):
            for j in range(kernel):
                head = i + kernel * j
                self.pos_proj.weight[head] = torch.tensor([2.0 * (j - center), 2.0 * (i - center), -1.0])
        self.pos_proj.weight.mul_(self.locality_strength)

    def forward(self, x: Tensor, rel_pos: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        q, k = self.qk(x).reshape(batch, tokens, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.v(x).reshape(batch, tokens, self.num_heads, head_dim).transpose(1, 2)

        content = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)    # [N, heads, P, P]
        position = self.pos_proj(rel_pos).permute(2, 0, 1).softmax(dim=-1)   # [heads, P, P]
        gate = torch.sigmoid(self.gating_param).view(1, -1, 1, 1)
        attn = (1.0 - gate) * content + gate * position
        attn = attn / attn.sum(dim=-1, keepdim=True)

        x = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm transformer block with either GPSA (needs relative positions) or plain attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, use_gpsa: bool,
                 locality_strength: float) -> None:
        super().__init__()
        self.use_gpsa = use_gpsa
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn: nn.Module = (GPSA(dim, num_heads, locality_strength) if use_gpsa
                                else Attention(dim, num_heads, qkv_bias=False))
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, rel_pos: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + (self.attn(y, rel_pos) if self.use_gpsa else self.attn(y))
        return x + self.mlp(self.norm2(x))


class ConViT(Backbone):
    """GPSA blocks on patch tokens, then the class token joins for the plain blocks; features = norm(cls)."""

    blocks_attribute = "blocks"
    tail_modules = ("norm",)

    def __init__(
        self,
        name: str,
        dim: int,
        depth: int,
        num_heads: int,
        local_up_to_layer: int = 10,
        patch_size: int = 16,
        img_size: int = 224,
        mlp_ratio: float = 4.0,
        locality_strength: float = 1.0,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if not 0 <= local_up_to_layer < depth:
            raise ValueError(f"local_up_to_layer must be in [0, depth={depth}), got {local_up_to_layer}: "
                             "the class token joins at that block")
        self.name = name
        self.feature_dim = dim
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD   # what timm's ConViT weights were trained with
        self.local_up_to_layer = local_up_to_layer
        # Only GPSA blocks exist below local_up_to_layer, so this matches exactly their qk and v.
        self.default_lora_targets = [r"(.*\.)?blocks\.\d+\.attn\.(qk|v)"]   # (.*\.)? also matches when nested
        # A tail of the last blocks may hold only plain blocks, whose attention has one fused qkv projection.
        self.tail_lora_targets = [r"(.*\.)?blocks\.\d+\.attn\.(qk|v|qkv)"]
        self.grid = (img_size // patch_size, img_size // patch_size)

        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim))  # patches only
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, use_gpsa=i < local_up_to_layer, locality_strength=locality_strength)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, GPSA):
                module.local_init()

    def fix_input_size(self, size: int) -> None:
        """Resample the position embeddings once for `size`-px inputs (see VisionTransformer.fix_input_size)."""
        grid = (size // self.patch_embed.patch_size,) * 2
        with torch.no_grad():
            self.pos_embed = nn.Parameter(resize_pos_embed(self.pos_embed, self.grid, grid), requires_grad=False)
        self.grid = grid

    def forward(self, x: Tensor) -> Tensor:
        """Any input size (the tail alone assumes a square patch grid: a trunk's output does not carry it)."""
        return self.norm(self._embed_and_run(x, len(self.blocks))[:, 0])

    def forward_trunk(self, x: Tensor, split: int) -> Tensor:
        return self._embed_and_run(x, split)

    def _embed_and_run(self, x: Tensor, stop: int) -> Tensor:
        x, grid = self.patch_embed(x)
        x = x + resize_pos_embed(self.pos_embed, self.grid, grid)
        return self._run_blocks(x, grid, 0, stop)

    def forward_tail(self, h: Tensor, split: int) -> Tensor:
        # Square crops only: the patch grid follows from the number of patch tokens.
        patches = h.shape[1] - (1 if split > self.local_up_to_layer else 0)
        side = math.isqrt(patches)
        return self.norm(self._run_blocks(h, (side, side), split, len(self.blocks))[:, 0])

    def _run_blocks(self, x: Tensor, grid: tuple[int, int], start: int, stop: int) -> Tensor:
        """Blocks start..stop-1; the class token joins in front of the patches at block local_up_to_layer."""
        rel_pos = relative_positions(grid, x.device, x.dtype)
        for index in range(start, stop):
            if index == self.local_up_to_layer:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = self.blocks[index](x, rel_pos)
        return x

    def forward_logits(self, x: Tensor) -> Tensor:
        return self.head(self(x))


def convit_tiny() -> ConViT:
    return ConViT("convit_tiny", dim=192, depth=12, num_heads=4)


def convit_small() -> ConViT:
    return ConViT("convit_small", dim=432, depth=12, num_heads=9)


def convit_base() -> ConViT:
    return ConViT("convit_base", dim=768, depth=12, num_heads=16)


def convit_micro() -> ConViT:
    """A random-init test size: 2 GPSA blocks (2x2 local heads), then the class token, 2 plain blocks."""
    return ConViT("convit_micro", dim=48, depth=4, num_heads=4, local_up_to_layer=2, patch_size=8,
                  img_size=32, num_classes=10)
