"""A CLIP-style image-text model whose parameter names and shapes are OpenAI's.

Two reasons for keeping OpenAI's layout exactly: a user who has an OpenAI CLIP checkpoint on disk can
load it (the fine-tune threat model), and the from-scratch threat model (MEM's main setting) uses the
very same architecture with random weights. Attention is written out by hand (so nothing depends on
nn.MultiheadAttention's internals) but its parameters are named like nn.MultiheadAttention's.

Small presets ("rn_tiny", "rn_wide", "vit_tiny", "cnn_words") train on a CPU in minutes at 32-64 px; "RN50"
and "ViT-B/32" are OpenAI's sizes. "cnn_words" is the one tower that is not OpenAI's: a plain CNN (PlainCNN),
so that a protection can be tried against an image model built unlike the ones it was made with.
"""

from __future__ import annotations

import math
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# OpenAI CLIP's image normalisation (the statistics its checkpoints were trained with).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# The largest value exp(logit_scale) may take, as in CLIP's training.
MAX_LOGIT_SCALE = 100.0

# CLIPConfig.vision_tower of the one image tower that is not OpenAI's (PlainCNN).
PLAIN_CNN = "plain_cnn"


@dataclass(frozen=True)
class CLIPConfig:
    """Hyper-parameters, named as OpenAI's CLIP constructor names them.

    vision_layers: a 4-tuple of block counts builds a ModifiedResNet; an int builds a ViT with
    that many layers (then vision_patch_size is needed). Attention heads follow OpenAI's rule,
    which is also how they are recovered from a state dict: ViT width // 64, ResNet width * 32 // 64.
    vision_tower "plain_cnn" builds a PlainCNN instead, of vision_layers conv blocks starting at
    vision_width channels; None (the default) means OpenAI's towers, told apart by vision_layers.
    """

    embed_dim: int
    image_resolution: int
    vision_layers: tuple[int, ...] | int
    vision_width: int
    vision_patch_size: int | None
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int
    vision_tower: str | None = None

    @property
    def is_plain_cnn(self) -> bool:
        return self.vision_tower == PLAIN_CNN

    @property
    def is_resnet(self) -> bool:
        return not self.is_plain_cnn and isinstance(self.vision_layers, (tuple, list))

    def validate(self) -> None:
        if self.vision_tower not in (None, PLAIN_CNN):
            raise ValueError(f"unknown vision_tower {self.vision_tower!r}; known: None (OpenAI's towers), "
                             f"{PLAIN_CNN!r}")
        if self.is_plain_cnn:
            if not isinstance(self.vision_layers, int) or self.vision_layers < 1:
                raise ValueError(f"a plain CNN needs a positive number of conv blocks, got {self.vision_layers}")
            halvings = 2 ** (self.vision_layers - 1)
            if self.image_resolution % halvings:
                raise ValueError(f"a plain CNN of {self.vision_layers} blocks halves the image "
                                 f"{self.vision_layers - 1} times: it needs image_resolution divisible by "
                                 f"{halvings}, got {self.image_resolution}")
        elif self.is_resnet:
            if len(self.vision_layers) != 4 or min(self.vision_layers) < 1:
                raise ValueError(f"a ModifiedResNet needs 4 positive block counts, got {self.vision_layers}")
            if self.image_resolution % 32:
                raise ValueError(f"a ModifiedResNet needs image_resolution divisible by 32, got {self.image_resolution}")
            if self.vision_width % 2:
                raise ValueError(f"vision_width must be even for a ModifiedResNet, got {self.vision_width}")
        else:
            if not self.vision_patch_size or self.image_resolution % self.vision_patch_size:
                raise ValueError(
                    f"a ViT needs image_resolution ({self.image_resolution}) divisible by "
                    f"vision_patch_size ({self.vision_patch_size})"
                )
            if self.vision_width < 64 or self.vision_width % 64:
                raise ValueError(f"a ViT needs vision_width a multiple of 64 (64-dim heads), got {self.vision_width}")
        if self.transformer_width % self.transformer_heads:
            raise ValueError(
                f"transformer_width {self.transformer_width} is not divisible by {self.transformer_heads} heads"
            )
        if self.context_length < 2 or self.vocab_size < 2:
            raise ValueError("context_length and vocab_size must be at least 2")


OPENAI_VOCAB_SIZE = 49408

PRESETS: dict[str, CLIPConfig] = {
    # CPU-trainable sizes. vocab_size is CLIP's; pass the tokenizer's to build_clip for a smaller table.
    "rn_tiny": CLIPConfig(
        embed_dim=128, image_resolution=32, vision_layers=(1, 1, 1, 1), vision_width=16,
        vision_patch_size=None, context_length=40, vocab_size=OPENAI_VOCAB_SIZE,
        transformer_width=128, transformer_heads=2, transformer_layers=2,
    ),
    # rn_tiny's image tower four times as wide (15x the parameters): a hacker with more capacity to
    # memorise a per-image noise, for checking that protection does not rest on a tiny model.
    "rn_wide": CLIPConfig(
        embed_dim=128, image_resolution=32, vision_layers=(1, 1, 1, 1), vision_width=64,
        vision_patch_size=None, context_length=40, vocab_size=OPENAI_VOCAB_SIZE,
        transformer_width=128, transformer_heads=2, transformer_layers=2,
    ),
    "vit_tiny": CLIPConfig(
        embed_dim=128, image_resolution=32, vision_layers=4, vision_width=128,
        vision_patch_size=4, context_length=40, vocab_size=OPENAI_VOCAB_SIZE,
        transformer_width=128, transformer_heads=2, transformer_layers=2,
    ),
    # A plain CNN image tower (5 conv-BN-ReLU blocks, 32 to 512 channels, global average pool, projection)
    # beside the same 2-layer text transformer over the same caption-trained tokens: a hacker family with
    # neither residual blocks nor attention nor patches.
    "cnn_words": CLIPConfig(
        embed_dim=128, image_resolution=32, vision_layers=5, vision_width=32,
        vision_patch_size=None, context_length=40, vocab_size=OPENAI_VOCAB_SIZE,
        transformer_width=128, transformer_heads=2, transformer_layers=2, vision_tower=PLAIN_CNN,
    ),
    # OpenAI's published sizes.
    "RN50": CLIPConfig(
        embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
        vision_patch_size=None, context_length=77, vocab_size=OPENAI_VOCAB_SIZE,
        transformer_width=512, transformer_heads=8, transformer_layers=12,
    ),
    "ViT-B/32": CLIPConfig(
        embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
        vision_patch_size=32, context_length=77, vocab_size=OPENAI_VOCAB_SIZE,
        transformer_width=512, transformer_heads=8, transformer_layers=12,
    ),
}


# ----------------------------------------------------------------------------------------------
# Building blocks


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (OpenAI checkpoints are fp16)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's checkpoints were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over [N, L, W], with nn.MultiheadAttention's parameter names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        n, length, width = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))])
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of pre-LN residual attention blocks over batch-first [N, L, W] sequences."""

    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.width, self.layers, self.causal = width, layers, causal
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x, causal=self.causal)
        return x


class Bottleneck(nn.Module):
    """ResNet bottleneck with CLIP's anti-aliased downsampling (avgpool before the strided path)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(
                OrderedDict([
                    ("-1", nn.AvgPool2d(stride)),
                    ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                    ("1", nn.BatchNorm2d(out)),
                ])
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Pools a feature map by one attention query (the mean of the map) over all positions."""

    def __init__(self, spatial_dim: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        x = x.reshape(n, c, h * w).transpose(1, 2)  # [N, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        if x.shape[1] != self.positional_embedding.shape[0]:
            raise ValueError(
                f"feature map {h}x{w} does not match the attention pool's "
                f"{self.positional_embedding.shape[0] - 1} positions: wrong input resolution"
            )
        x = x + self.positional_embedding.to(x.dtype)
        d = c // self.heads
        # The query from a 2-D slice: a strided [N, 1, C] input sends bfloat16 linear to a batched matmul
        # that copies the weight once per image (0.4 s per RN50 step on a CPU).
        q = self.q_proj(x[:, 0]).reshape(n, 1, self.heads, d).transpose(1, 2)
        k = self.k_proj(x).reshape(n, -1, self.heads, d).transpose(1, 2)
        v = self.v_proj(x).reshape(n, -1, self.heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, 1, d]
        return self.c_proj(out.transpose(1, 2).reshape(n, c))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: a 3-conv stem with avgpool, anti-aliased strides, attention pooling."""

    def __init__(self, layers: tuple[int, ...], output_dim: int, heads: int, input_resolution: int, width: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        stages = []
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stage = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


class VisionTransformer(nn.Module):
    """ViT: patch embedding, class token, pre-LN transformer, projection of the class token."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [N, grid*grid, W]
        if x.shape[1] + 1 != self.positional_embedding.shape[0]:
            raise ValueError(
                f"{x.shape[1]} patches do not match the {self.positional_embedding.shape[0] - 1} positions: "
                f"wrong input resolution (expected {self.input_resolution})"
            )
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class PlainCNN(nn.Module):
    """A plain convolutional image tower: `layers` conv-BN-ReLU blocks, each but the last followed by a 2x2 max
    pool that halves the map, the channels doubling from `width` block by block; then global average pooling
    and a linear projection. No residual connections, no attention."""

    def __init__(self, input_resolution: int, layers: int, width: int, output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        blocks, channels = [], 3
        for i in range(layers):
            out = width * 2**i
            block = OrderedDict([
                ("conv", nn.Conv2d(channels, out, 3, padding=1, bias=False)),
                ("bn", nn.BatchNorm2d(out)),
                ("relu", nn.ReLU()),
            ])
            if i < layers - 1:
                block["pool"] = nn.MaxPool2d(2)
            blocks.append(nn.Sequential(block))
            channels = out
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Parameter(channels**-0.5 * torch.randn(channels, output_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.input_resolution, self.input_resolution):
            # Global pooling would accept any size; a wrong one is refused as the other towers refuse it.
            raise ValueError(f"images of {x.shape[-2]}x{x.shape[-1]}: wrong input resolution "
                             f"(expected {self.input_resolution})")
        return self.blocks(x).mean(dim=(2, 3)) @ self.proj


# ----------------------------------------------------------------------------------------------
# The model


class CLIP(nn.Module):
    """Image and text towers into one embedding space, compared by cosine similarity."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.context_length = config.context_length
        self.vocab_size = config.vocab_size
        if config.is_plain_cnn:
            self.visual = PlainCNN(
                input_resolution=config.image_resolution, layers=config.vision_layers, width=config.vision_width,
                output_dim=config.embed_dim,
            )
        elif config.is_resnet:
            self.visual = ModifiedResNet(
                layers=tuple(config.vision_layers), output_dim=config.embed_dim,
                heads=config.vision_width * 32 // 64, input_resolution=config.image_resolution,
                width=config.vision_width,
            )
        else:
            self.visual = VisionTransformer(
                input_resolution=config.image_resolution, patch_size=config.vision_patch_size,
                width=config.vision_width, layers=config.vision_layers, heads=config.vision_width // 64,
                output_dim=config.embed_dim,
            )
        self.transformer = Transformer(
            config.transformer_width, config.transformer_layers, config.transformer_heads, causal=True
        )
        self.token_embedding = nn.Embedding(config.vocab_size, config.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.transformer_width))
        self.ln_final = LayerNorm(config.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(config.transformer_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    @property
    def image_resolution(self) -> int:
        return self.config.image_resolution

    @property
    def dtype(self) -> torch.dtype:
        """The image tower's dtype (fp16 for OpenAI's checkpoints as published), which images are cast to."""
        return next(self.visual.parameters()).dtype

    def initialize_parameters(self) -> None:
        """CLIP's initialisation: small embeddings, depth-scaled residual projections."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features**-0.5
            for layer in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(layer.weight, std=std)
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for name, param in stage.named_parameters():
                    if name.endswith("bn3.weight"):  # each residual branch starts as the identity
                        nn.init.zeros_(param)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def encode_image(self, images: Tensor) -> Tensor:
        """Normalised float [N, 3, H, W] (see normalize_images) -> [N, embed_dim], not L2-normalised."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_image expects float [N, 3, H, W], got {list(images.shape)}")
        if not images.is_floating_point():
            raise ValueError("encode_image expects normalised float images; use normalize_images on uint8 input")
        return self.visual(images.to(self.dtype))

    def encode_text(self, tokens: Tensor, token_embeddings: Tensor | None = None) -> Tensor:
        """Token ids [N, L] -> [N, embed_dim], read at the end-of-text position.

        The end-of-text token is the largest id of the vocabulary (as in CLIP's), so its position is
        the argmax of each row. token_embeddings [N, L, W], when given, is used instead of
        token_embedding(tokens), so that gradients with respect to the embeddings of trigger tokens
        can be taken; tokens then only locate the end of text.
        """
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"encode_text expects tokens [N, {self.context_length}], got {list(tokens.shape)}")
        if token_embeddings is None:
            x = self.token_embedding(tokens)
        else:
            expected = (*tokens.shape, self.config.transformer_width)
            if tuple(token_embeddings.shape) != expected:
                raise ValueError(f"token_embeddings must be {list(expected)}, got {list(token_embeddings.shape)}")
            x = token_embeddings
        x = x.to(self.dtype) + self.positional_embedding.to(self.dtype)
        x = self.ln_final(self.transformer(x))
        eot = tokens.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(logits_per_image [N_img, N_txt], logits_per_text [N_txt, N_img]) scaled cosine similarities."""
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE: row i of each batch is the positive pair of row i of the other.

    logit_scale is the model's LOG scale parameter (model.logit_scale); it is exponentiated here and
    capped at 100 as in CLIP. The features are L2-normalised here.
    """
    if image_features.shape != text_features.shape:
        raise ValueError(f"feature shapes differ: {list(image_features.shape)} vs {list(text_features.shape)}")
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE) * image_features @ text_features.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def normalize_images(images: Tensor | np.ndarray) -> Tensor:
    """uint8 [N, H, W, 3] RGB, or float [N, 3, H, W] in [0, 1] -> float [N, 3, H, W] normalised with CLIP's mean/std.

    Float input stays in the autograd graph, so noise added in [0, 1] space can be optimised through it.
    """
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be NHWC [N, H, W, 3], got {list(images.shape)}")
        images = images.permute(0, 3, 1, 2).float().div(255.0)
    elif images.is_floating_point():
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"float images must be NCHW [N, 3, H, W] in [0, 1], got {list(images.shape)}")
    else:
        raise ValueError(f"images must be uint8 NHWC or float NCHW, got {images.dtype}")
    mean = torch.tensor(IMAGE_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def build_clip(preset_or_config: str | CLIPConfig, vocab_size: int | None = None) -> CLIP:
    """A randomly initialised CLIP from a preset name or a config; vocab_size overrides the config's."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"unknown CLIP preset {preset_or_config!r}; known: {', '.join(PRESETS)}")
        config = PRESETS[preset_or_config]
    elif isinstance(preset_or_config, CLIPConfig):
        config = preset_or_config
    else:
        raise TypeError(f"expected a preset name or a CLIPConfig, got {type(preset_or_config).__name__}")
    if vocab_size is not None:
        config = replace(config, vocab_size=int(vocab_size))
    return CLIP(config)


# ----------------------------------------------------------------------------------------------
# OpenAI-format checkpoints

# Entries of OpenAI's TorchScript state dicts that are attributes, not weights.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")


def config_from_state_dict(state_dict: dict[str, Tensor]) -> CLIPConfig:
    """Recover the hyper-parameters from the shapes of an OpenAI-format state dict."""
    sd = state_dict
    try:
        if "visual.proj" in sd:
            vision_width = sd["visual.conv1.weight"].shape[0]
            vision_layers: tuple[int, ...] | int = len(
                [k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")]
            )
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            resolution = patch * grid
        else:
            vision_layers = tuple(
                len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)
            )
            vision_width = sd["visual.layer1.0.conv1.weight"].shape[0]
            grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            patch = None
            resolution = grid * 32
        width = sd["ln_final.weight"].shape[0]
        return CLIPConfig(
            embed_dim=sd["text_projection"].shape[1],
            image_resolution=resolution,
            vision_layers=vision_layers,
            vision_width=vision_width,
            vision_patch_size=patch,
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            transformer_width=width,
            transformer_heads=max(1, width // 64),
            transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
        )
    except KeyError as exc:
        raise ValueError(f"not an OpenAI-format CLIP state dict: missing {exc}") from None


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def read_state_dict(path: str | Path, allow_torchscript: bool = False) -> dict[str, Tensor]:
    """Tensors of a local checkpoint, never unpickling arbitrary objects.

    .safetensors, or a torch.save'd state dict (loaded with weights_only=True). OpenAI's own
    downloads are TorchScript archives: they load only with allow_torchscript=True, which runs
    torch.jit.load on a file the user vouches for.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_torchscript(path):
        if not allow_torchscript:
            raise ValueError(
                f"{path} is a TorchScript archive (OpenAI's download format). Convert it once with "
                f"`torch.jit.load(path, map_location='cpu').state_dict()` saved via safetensors, or pass "
                f"allow_torchscript=True if you trust the file."
            )
        return {k: v for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return loaded


def load_openai_state_dict(path: str | Path | dict[str, Tensor], allow_torchscript: bool = False) -> CLIP:
    """A float32 CLIP in eval mode from an OpenAI-format state dict (a local file, or the dict itself)."""
    sd = dict(path) if isinstance(path, dict) else read_state_dict(path, allow_torchscript=allow_torchscript)
    sd = {k.removeprefix("module."): v for k, v in sd.items() if k not in _NON_WEIGHT_KEYS}
    model = CLIP(config_from_state_dict(sd))
    expected = model.state_dict()
    # BatchNorm's step counter is absent from some exports; it does not affect outputs.
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {list(sd[k].shape)} != {list(expected[k].shape)}" for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            "state dict does not match the inferred CLIP config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=False)
    return model.float().eval()
