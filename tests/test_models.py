"""Backbones: pretrained weights give right answers, timm names load, LoRA merges exactly, bad files fail clearly."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from aigis.models import (BACKBONES, Backbone, ImageInput, WeightsError, build_backbone, load_weights_file,
                          state_dict_sha256)
from aigis.models.convit import GPSA, relative_positions
from aigis.models.efficientnet_lite import SamePadConv2d
from aigis.models.vit import resize_pos_embed

peft = pytest.importorskip("peft")


def photo_224(name: str) -> torch.Tensor:
    """A scikit-image photo as uint8 [1, 224, 224, 3]: short side resized to 224, then centre-cropped."""
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)())
    scale = 224 / min(image.size)
    image = image.resize((max(224, round(image.width * scale)), max(224, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    array = np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.uint8)
    return torch.from_numpy(array.copy())[None]


def perturbed(model: nn.Module, seed: int = 1) -> nn.Module:
    """Move every float tensor away from the seeded init, so that a loaded copy must really load."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.randn(tensor.shape, generator=generator))
    return model


# ---- pretrained EfficientNet-Lite0 ---------------------------------------------------------------------

def test_efficientnet_lite0_package_weights_recognise_photos():
    model = build_backbone("efficientnet_lite0")
    images = torch.cat([photo_224("chelsea"), photo_224("coffee")])
    with torch.no_grad():
        logits = model.forward_logits(model.image_input()(images))
        features = model(model.image_input()(images))
    top5 = logits.topk(5).indices.tolist()
    assert set(top5[0]) & {281, 282, 283, 284, 285}, f"chelsea (a cat) got ImageNet classes {top5[0]}"
    assert 967 in top5[1], f"coffee (an espresso) got ImageNet classes {top5[1]}"
    assert features.shape == (2, 1280) and model.feature_dim == 1280
    assert (features >= 0).all() and (features <= 6).all()   # pooled ReLU6


def test_efficientnet_lite0_normalisation_is_minus_127_over_128():
    model = build_backbone("efficientnet_lite0", weights=None)
    images = torch.arange(256, dtype=torch.uint8).repeat(3, 1).T.reshape(1, 16, 16, 3)
    expected = (images.permute(0, 3, 1, 2).float() - 127) / 128
    assert torch.equal(model.image_input()(images), expected)


def test_same_padding_gives_ceil_of_input_over_stride():
    conv = SamePadConv2d(2, 2, kernel_size=5, stride=2)
    for size in (7, 8, 64, 65):
        out = conv(torch.zeros(1, 2, size, size + 1))
        assert out.shape[-2:] == ((size + 1) // 2, (size + 2) // 2)


def test_efficientnet_batch_norm_statistics_stay_frozen_in_train_mode():
    model = build_backbone("efficientnet_lite0")
    before = state_dict_sha256(model)
    model.train()
    assert model.training and not model._bn0.training
    model(torch.randn(4, 3, 32, 32))
    assert state_dict_sha256(model) == before


# ---- timm-format ViT and ConViT -----------------------------------------------------------------------

def timm_vit_tiny_shapes() -> dict[str, tuple[int, ...]]:
    """timm's vit_tiny_patch16_224: dim 192, 12 blocks, qkv with bias, class token in pos_embed."""
    dim, hidden = 192, 768
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 197, dim), "patch_embed.proj.weight": (dim, 3, 16, 16),
              "patch_embed.proj.bias": (dim,), "norm.weight": (dim,), "norm.bias": (dim,),
              "head.weight": (1000, dim), "head.bias": (1000,)}
    for i in range(12):
        block = f"blocks.{i}."
        shapes.update({
            block + "norm1.weight": (dim,), block + "norm1.bias": (dim,),
            block + "attn.qkv.weight": (3 * dim, dim), block + "attn.qkv.bias": (3 * dim,),
            block + "attn.proj.weight": (dim, dim), block + "attn.proj.bias": (dim,),
            block + "norm2.weight": (dim,), block + "norm2.bias": (dim,),
            block + "mlp.fc1.weight": (hidden, dim), block + "mlp.fc1.bias": (hidden,),
            block + "mlp.fc2.weight": (dim, hidden), block + "mlp.fc2.bias": (dim,),
        })
    return shapes


def timm_convit_tiny_shapes() -> dict[str, tuple[int, ...]]:
    """timm's convit_tiny: 4 heads x 48 = 192, GPSA (qk, v, no bias) up to layer 10, then MHSA (qkv, no bias)."""
    dim, heads, hidden = 192, 4, 768
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 196, dim), "patch_embed.proj.weight": (dim, 3, 16, 16),
              "patch_embed.proj.bias": (dim,), "norm.weight": (dim,), "norm.bias": (dim,),
              "head.weight": (1000, dim), "head.bias": (1000,)}
    for i in range(12):
        block = f"blocks.{i}."
        shapes.update({
            block + "norm1.weight": (dim,), block + "norm1.bias": (dim,),
            block + "attn.proj.weight": (dim, dim), block + "attn.proj.bias": (dim,),
            block + "norm2.weight": (dim,), block + "norm2.bias": (dim,),
            block + "mlp.fc1.weight": (hidden, dim), block + "mlp.fc1.bias": (hidden,),
            block + "mlp.fc2.weight": (dim, hidden), block + "mlp.fc2.bias": (dim,),
        })
        if i < 10:
            shapes.update({
                block + "attn.qk.weight": (2 * dim, dim), block + "attn.v.weight": (dim, dim),
                block + "attn.pos_proj.weight": (heads, 3), block + "attn.pos_proj.bias": (heads,),
                block + "attn.gating_param": (heads,),
            })
        else:
            shapes[block + "attn.qkv.weight"] = (3 * dim, dim)
    return shapes


@pytest.mark.parametrize("name, expected", [("vit_tiny_patch16_224", timm_vit_tiny_shapes),
                                            ("convit_tiny", timm_convit_tiny_shapes)])
def test_state_dict_has_exactly_timm_names_and_shapes(name, expected):
    model = build_backbone(name, weights=None)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == expected()


@pytest.mark.parametrize("name", ["vit_micro", "convit_micro"])
def test_weights_round_trip_through_safetensors_and_pth(name, tmp_path):
    source = perturbed(build_backbone(name, weights=None))
    state = {key: value.contiguous() for key, value in source.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    torch.save({"model": state}, tmp_path / "wrapped_model.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped_state_dict.pth")

    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = source(images)
        assert not torch.equal(expected, build_backbone(name, weights=None)(images))   # perturbation shows
        for file in ("w.safetensors", "w.pth", "wrapped_model.pt", "wrapped_state_dict.pth"):
            loaded = build_backbone(name, weights=tmp_path / file)
            assert not loaded.training
            assert torch.equal(loaded(images), expected), file
            assert state_dict_sha256(loaded) == state_dict_sha256(source), file


def test_convit_local_init_makes_heads_look_at_their_own_offsets():
    gpsa = GPSA(dim=18, num_heads=9)                         # heads on a 3x3 grid of offsets
    gpsa.local_init()
    rel = relative_positions((5, 5), torch.device("cpu"), torch.float32)
    centre = 12                                              # patch (row 2, col 2) of the 5x5 grid
    favourite = gpsa.pos_proj(rel[centre]).argmax(dim=0)     # the key patch each head attends to most
    for i in range(3):
        for j in range(3):
            key = int(favourite[i + 3 * j])
            assert (key % 5 - 2, key // 5 - 2) == (j - 1, i - 1)    # (dx, dy), as in the paper's code
    assert torch.equal(gpsa.v.weight, torch.eye(18))


def test_gpsa_in_its_convolutional_limit_copies_each_heads_neighbour():
    """Paper: with the gate open (sigmoid -> 1) and strong locality, head h attends only to offset h."""
    gpsa = GPSA(dim=18, num_heads=9, locality_strength=50.0)
    gpsa.local_init()
    with torch.no_grad():
        gpsa.gating_param.fill_(30.0)
        gpsa.proj.weight.copy_(torch.eye(18))
        gpsa.proj.bias.zero_()
    tokens = torch.randn(1, 25, 18)                          # a 5x5 patch grid, 2 channels per head
    out = gpsa(tokens, relative_positions((5, 5), torch.device("cpu"), torch.float32))
    row, col = 2, 2
    for i in range(3):
        for j in range(3):
            head = i + 3 * j
            dx, dy = j - 1, i - 1
            neighbour = (row + dy) * 5 + (col + dx)
            channels = slice(2 * head, 2 * head + 2)
            assert torch.allclose(out[0, row * 5 + col, channels], tokens[0, neighbour, channels], atol=1e-4)


def test_relative_positions_of_a_non_square_grid():
    rel = relative_positions((2, 3), torch.device("cpu"), torch.float32)     # patches in row-major order
    assert rel.shape == (6, 6, 3)
    # From patch 1 = (row 0, col 1) to patch 5 = (row 1, col 2): dx = 1, dy = 1, d^2 = 2.
    assert rel[1, 5].tolist() == [1.0, 1.0, 2.0]
    assert rel[5, 1].tolist() == [-1.0, -1.0, 2.0]
    assert torch.equal(rel[:, :, 2], rel[:, :, 0] ** 2 + rel[:, :, 1] ** 2)


def test_position_embeddings_resample_to_other_grids():
    table = torch.randn(1, 16, 8)
    assert resize_pos_embed(table, (4, 4), (4, 4)) is table
    constant = torch.full((1, 16, 8), 0.25)
    assert torch.allclose(resize_pos_embed(constant, (4, 4), (2, 3)), torch.full((1, 6, 8), 0.25), atol=1e-6)
    model = build_backbone("vit_micro")                       # learnt at 32 px (4x4 patches)
    assert model(torch.randn(2, 3, 64, 48)).shape == (2, 48)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registered_backbone_pools_to_its_feature_dim(name):
    with torch.device("meta"):    # shapes only: the base sizes are too slow to initialise in a unit test
        model = BACKBONES[name]()
        features = model(torch.empty(2, 3, 48, 64))
    assert isinstance(model, Backbone) and model.name == name
    assert len(model.mean) == 3 and len(model.std) == 3 and model.default_lora_targets
    assert features.shape == (2, model.feature_dim)


def test_random_init_is_seeded_and_hash_tracks_every_tensor():
    first, second = build_backbone("convit_micro", weights=None), build_backbone("convit_micro", weights=None)
    assert state_dict_sha256(first) == state_dict_sha256(second)
    assert len(state_dict_sha256(first)) == 64
    with torch.no_grad():
        second.blocks[1].attn.gating_param[0] += 1e-3
    assert state_dict_sha256(first) != state_dict_sha256(second)


# ---- LoRA on the default targets -----------------------------------------------------------------------

LORA_CASES = [
    # name, weights, input size, module names LoRA must wrap (exactly)
    ("vit_micro", "default", 32, {f"blocks.{i}.attn.qkv" for i in range(4)}),
    ("convit_micro", "default", 32, {f"blocks.{i}.attn.{p}" for i in range(2) for p in ("qk", "v")}),
    ("convit_tiny", None, 32, {f"blocks.{i}.attn.{p}" for i in range(10) for p in ("qk", "v")}),
    ("vit_tiny_patch16_224", None, 32, {f"blocks.{i}.attn.qkv" for i in range(12)}),
    ("efficientnet_lite0", "default", 64,
     {f"_blocks.{i}._expand_conv" for i in range(1, 16)} | {f"_blocks.{i}._project_conv" for i in range(16)}
     | {"_conv_head"}),
]


def peft_targets(backbone: Backbone) -> str | list[str]:
    """A one-element list holding a regex goes to peft as the bare string (peft's regex form)."""
    targets = backbone.default_lora_targets
    return targets[0] if len(targets) == 1 else targets


@pytest.mark.parametrize("name, weights, size, expected", LORA_CASES, ids=[case[0] for case in LORA_CASES])
def test_lora_on_default_targets_merges_exactly(name, weights, size, expected):
    backbone = build_backbone(name, weights=weights)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = backbone(images)

    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=peft_targets(backbone))
    model = peft.get_peft_model(backbone, config)
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == expected
    # The same targets still match when the backbone sits inside another module (e.g. model.backbone).
    assert all(re.fullmatch(backbone.default_lora_targets[0], "backbone." + name) for name in expected)

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module_name, parameter in model.named_parameters():
            if "lora_B" in module_name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
        model.eval()
        unmerged = model(images)
        assert (unmerged - plain).abs().max() > 1e-3, "the adapter should change the features"
        merged_model = model.merge_and_unload()
        merged = merged_model(images)

    # Merging only re-associates float32 sums: a few ULPs of features up to ~6 (EfficientNet sees ~1e-5).
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert not [n for n, _ in merged_model.named_modules() if "lora" in n.lower()]
    assert not [k for k in merged_model.state_dict() if "lora" in k.lower()]
    assert set(merged_model.state_dict()) == set(build_backbone(name, weights=None).state_dict())


# ---- ImageInput ----------------------------------------------------------------------------------------

def test_image_input_normalises_uint8_nhwc_to_float_nchw():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    out = ImageInput(mean, std)(torch.from_numpy(images))
    expected = (images.astype(np.float64) / 255 - np.array(mean)) / np.array(std)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 5, 7)
    assert np.allclose(out.numpy(), expected.transpose(0, 3, 1, 2), atol=1e-5)
    assert ImageInput(mean, std).state_dict() == {}      # nothing to load or hash


@pytest.mark.parametrize("bad", [torch.zeros(1, 8, 8, 3), torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
                                 torch.zeros(8, 8, 3, dtype=torch.uint8)])
def test_image_input_rejects_wrong_dtype_or_layout(bad):
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        ImageInput((0.5,) * 3, (0.5,) * 3)(bad)


# ---- bad weights ---------------------------------------------------------------------------------------

def test_missing_weights_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        build_backbone("vit_micro", weights=tmp_path / "nothere.safetensors")


def test_weights_of_another_model_list_missing_and_unexpected_keys(tmp_path):
    save_file(build_backbone("vit_micro").state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(WeightsError) as error:
        build_backbone("convit_micro", weights=tmp_path / "vit.safetensors")
    message = str(error.value)
    assert "vit.safetensors" in message and "convit_micro" in message
    assert "missing keys" in message and "blocks.0.attn.gating_param" in message
    assert "unexpected keys" in message and "blocks.0.attn.qkv.bias" in message


def test_wrong_shapes_are_named(tmp_path):
    state = build_backbone("vit_micro").state_dict()
    state["head.weight"] = torch.zeros(7, 48)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"head.weight \[7, 48\] != \[10, 48\]"):
        load_weights_file(tmp_path / "w.pth", build_backbone("vit_micro"))


class NotATensor:
    pass


def test_pickled_objects_and_garbage_are_refused(tmp_path):
    torch.save({"weight": torch.zeros(2), "config": NotATensor()}, tmp_path / "objects.pth")
    with pytest.raises(WeightsError, match="objects.pth: refused to load: it holds pickled objects"):
        load_weights_file(tmp_path / "objects.pth")
    with open(tmp_path / "plain_pickle.pth", "wb") as handle:
        pickle.dump({"weight": NotATensor()}, handle, protocol=2)
    with pytest.raises(WeightsError, match="plain_pickle.pth"):
        load_weights_file(tmp_path / "plain_pickle.pth")
    torch.save({"model": {"weight": torch.zeros(2)}, "note": "x"}, tmp_path / "ok.pth")
    assert set(load_weights_file(tmp_path / "ok.pth")) == {"weight"}
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00not safetensors at all")
    with pytest.raises(WeightsError, match="garbage.safetensors"):
        load_weights_file(tmp_path / "garbage.safetensors")
    (tmp_path / "garbage.pt").write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pt"):
        load_weights_file(tmp_path / "garbage.pt")


def test_unknown_name_and_unshipped_default_weights_fail_clearly():
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'.*efficientnet_lite0"):
        build_backbone("resnet50")
    with pytest.raises(FileNotFoundError, match="no weights ship with convit_base"):
        build_backbone("convit_base")
