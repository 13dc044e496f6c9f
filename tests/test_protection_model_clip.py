"""The CLIP model: OpenAI state-dict layout, checkpoint loading, text pooling, loss and normalisation."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from aigis.protection.clip import (
    IMAGE_MEAN,
    IMAGE_STD,
    PRESETS,
    CLIPConfig,
    build_clip,
    contrastive_loss,
    load_openai_state_dict,
    normalize_images,
)

RN = CLIPConfig(
    embed_dim=32, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=8, vision_patch_size=None,
    context_length=12, vocab_size=300, transformer_width=64, transformer_heads=1, transformer_layers=2,
)
VIT = CLIPConfig(
    embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
    context_length=12, vocab_size=300, transformer_width=128, transformer_heads=2, transformer_layers=1,
)


def _tokens(config: CLIPConfig, n: int, seed: int = 0) -> torch.Tensor:
    """Rows like the tokenizer's: SOT, words, EOT (the largest id), pad 0."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, config.context_length, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(1, config.context_length - 1, (1,), generator=g))
        tokens[i, 0] = config.vocab_size - 2
        tokens[i, 1 : 1 + length] = torch.randint(1, config.vocab_size - 2, (length,), generator=g)
        tokens[i, 1 + length] = config.vocab_size - 1
    return tokens


def _images(config: CLIPConfig, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, config.image_resolution, config.image_resolution, generator=g)


def _randomised(config: CLIPConfig) -> torch.nn.Module:
    """A model whose every parameter and BatchNorm statistic is non-trivial, so a load that drops or
    swaps anything changes the outputs."""
    torch.manual_seed(1)
    model = build_clip(config)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif name.endswith("running_mean") or name.endswith("bn3.weight") or name.endswith("bias"):
                tensor.normal_(0, 0.1)
    return model.eval()


# Shapes of entries of OpenAI's published checkpoints (RN50 and ViT-B/32), from their state dicts.
OPENAI_SHAPES = {
    "RN50": {
        "visual.conv1.weight": (32, 3, 3, 3),
        "visual.bn3.running_var": (64,),
        "visual.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "visual.layer3.5.conv3.weight": (1024, 256, 1, 1),
        "visual.layer4.2.bn3.weight": (2048,),
        "visual.attnpool.positional_embedding": (50, 2048),
        "visual.attnpool.q_proj.weight": (2048, 2048),
        "visual.attnpool.c_proj.weight": (1024, 2048),
        "token_embedding.weight": (49408, 512),
        "positional_embedding": (77, 512),
        "transformer.resblocks.11.attn.in_proj_weight": (1536, 512),
        "transformer.resblocks.11.attn.out_proj.bias": (512,),
        "transformer.resblocks.0.mlp.c_fc.weight": (2048, 512),
        "ln_final.weight": (512,),
        "text_projection": (512, 1024),
        "logit_scale": (),
    },
    "ViT-B/32": {
        "visual.conv1.weight": (768, 3, 32, 32),
        "visual.class_embedding": (768,),
        "visual.positional_embedding": (50, 768),
        "visual.ln_pre.weight": (768,),
        "visual.transformer.resblocks.11.attn.in_proj_weight": (2304, 768),
        "visual.transformer.resblocks.11.mlp.c_proj.weight": (768, 3072),
        "visual.ln_post.bias": (768,),
        "visual.proj": (768, 512),
        "transformer.resblocks.11.ln_2.weight": (512,),
        "text_projection": (512, 512),
        "token_embedding.weight": (49408, 512),
        "logit_scale": (),
    },
}


@pytest.mark.parametrize("preset", ["RN50", "ViT-B/32"])
def test_openai_sizes_have_openai_names_and_shapes(preset):
    with torch.device("meta"):
        model = build_clip(preset)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in OPENAI_SHAPES[preset].items():
        assert shapes.get(name) == shape, name
    assert not any("in_proj" in k and "visual.attnpool" in k for k in shapes)  # the pool has q/k/v_proj
    params = sum(v.numel() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k)
    assert params == {"RN50": 102_007_137, "ViT-B/32": 151_277_313}[preset]  # OpenAI's published counts


@pytest.mark.parametrize("config", [RN, VIT], ids=["resnet", "vit"])
@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-fp16"])
def test_openai_state_dict_round_trip(tmp_path, config, fmt):
    model = _randomised(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if fmt == "pt-fp16":  # OpenAI's checkpoints hold fp16 weights and extra attribute entries
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        state["context_length"] = torch.tensor(config.context_length)
    path = tmp_path / ("clip.safetensors" if fmt == "safetensors" else "clip.pt")
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)

    loaded = load_openai_state_dict(path)
    assert loaded.config == config
    assert not loaded.training
    images, tokens = _images(config, 3), _tokens(config, 3)
    with torch.no_grad():
        if fmt == "pt-fp16":
            model = load_openai_state_dict(dict(state))  # the same fp16-rounded weights, loaded from a dict
        expected_img, expected_txt = model.encode_image(images), model.encode_text(tokens)
        got_img, got_txt = loaded.encode_image(images), loaded.encode_text(tokens)
    torch.testing.assert_close(got_img, expected_img, rtol=0, atol=0)
    torch.testing.assert_close(got_txt, expected_txt, rtol=0, atol=0)


def test_loading_refuses_pickled_objects_and_mismatched_dicts(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"weights": argparse.Namespace(x=1)}, evil)  # any non-tensor object must be refused
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_openai_state_dict(evil)

    state = build_clip(VIT).state_dict()
    del state["visual.ln_post.weight"]
    with pytest.raises(ValueError, match="visual.ln_post.weight"):
        load_openai_state_dict(state)
    with pytest.raises(FileNotFoundError):
        load_openai_state_dict(tmp_path / "absent.pt")


@pytest.mark.parametrize("config", [RN, VIT], ids=["resnet", "vit"])
def test_token_embeddings_path_equals_plain_path_and_pools_at_eot(config):
    torch.manual_seed(0)
    model = build_clip(config).eval()
    tokens = _tokens(config, 4)
    plain = model.encode_text(tokens)
    embeddings = model.token_embedding(tokens).detach().requires_grad_(True)
    via_embeddings = model.encode_text(tokens, token_embeddings=embeddings)
    torch.testing.assert_close(via_embeddings, plain, rtol=0, atol=0)

    via_embeddings.sum().backward()
    eot = tokens.argmax(dim=1)
    for row in range(len(tokens)):
        grad = embeddings.grad[row].abs().sum(dim=1)
        assert (grad[: eot[row] + 1] > 0).all()  # causal: everything up to EOT matters
        assert (grad[eot[row] + 1 :] == 0).all()  # and nothing after it

    # Padding after EOT does not change the text embedding.
    changed = tokens.clone()
    changed[changed == 0] = 5
    torch.testing.assert_close(model.encode_text(changed), plain)


def test_forward_and_contrastive_loss():
    torch.manual_seed(0)
    model = build_clip(VIT).eval()
    images, tokens = _images(VIT, 5), _tokens(VIT, 5)
    per_image, per_text = model(images, tokens)
    assert per_image.shape == (5, 5)
    torch.testing.assert_close(per_text, per_image.t())

    img, txt = torch.randn(6, 8), torch.randn(6, 8)
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    expected = sum(-torch.log_softmax(logits, 1)[i, i] - torch.log_softmax(logits, 0)[i, i] for i in range(6)) / 12
    torch.testing.assert_close(contrastive_loss(img, txt, scale), expected)
    # Aligned pairs at CLIP's capped scale: the loss is small; shuffled pairs are not.
    assert contrastive_loss(img, img * 3.0, torch.tensor(math.log(1000.0))) < 1e-3
    assert contrastive_loss(img, img.roll(1, 0), torch.tensor(math.log(100.0))) > 1.0


def test_normalize_images_uint8_and_float_agree_and_differentiate():
    rng = np.random.default_rng(0)
    uint8 = rng.integers(0, 256, size=(2, 4, 5, 3), dtype=np.uint8)
    a = normalize_images(torch.from_numpy(uint8))
    assert a.shape == (2, 3, 4, 5)
    floats = (torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 255).requires_grad_(True)
    b = normalize_images(floats)
    torch.testing.assert_close(a, b)
    assert a[0, 1, 2, 3].item() == pytest.approx((uint8[0, 2, 3, 1] / 255 - IMAGE_MEAN[1]) / IMAGE_STD[1], abs=1e-6)
    b.sum().backward()
    torch.testing.assert_close(floats.grad[0, 2], torch.full((4, 5), 1 / IMAGE_STD[2]))
    with pytest.raises(ValueError, match="NHWC|NCHW"):
        normalize_images(torch.zeros(2, 3, 4, 5, dtype=torch.uint8))


@pytest.mark.parametrize("preset", ["rn_tiny", "rn_wide", "vit_tiny"])
def test_tiny_presets_run_at_their_resolution_and_name_a_wrong_one(preset):
    model = build_clip(preset, vocab_size=600).eval()
    assert model.token_embedding.num_embeddings == 600
    config = PRESETS[preset]
    r = config.image_resolution
    out = model.encode_image(torch.zeros(2, 3, r, r))
    assert out.shape == (2, config.embed_dim)
    with pytest.raises(ValueError, match="resolution"):
        model.encode_image(torch.zeros(1, 3, 2 * r, 2 * r))
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        build_clip("RN51")


def test_bfloat16_attention_pool_never_copies_its_query_weight_per_image():
    """Under CPU autocast with frozen weights (MEM's PGD), a strided [N, 1, C] query input sent the pool's linear
    to a batched matmul over the weight expanded and copied once per image (0.4 s of every RN50 step): no op
    may see a [N, C, C] tensor."""
    torch.manual_seed(0)
    model = build_clip(RN).eval().requires_grad_(False)
    images = _images(RN, 4).requires_grad_(True)
    with torch.profiler.profile(record_shapes=True) as profile:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model.encode_image(images)
        features.float().sum().backward()
    width = model.visual.attnpool.q_proj.weight.shape[0]
    per_image = {e.key for e in profile.key_averages(group_by_input_shape=True) if [4, width, width] in e.input_shapes}
    assert not per_image, per_image
    assert features.dtype == torch.bfloat16 and images.grad is not None and torch.isfinite(images.grad).all()
