"""Backbone creation: did-you-mean names, local checkpoints through timm's pretrained path, eval transforms."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from layerprobe.backbone import create_backbone, create_eval_transform, describe_transform

NAME = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)


def test_create_backbone_is_frozen_and_in_eval_mode():
    model = create_backbone(NAME, model_kwargs=TINY)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert len(model.blocks) == 2 and model.embed_dim == 48


def test_unknown_model_name_suggests_the_nearest():
    with pytest.raises(ValueError) as info:
        create_backbone("vit_tiny_patch16_22", model_kwargs=TINY)
    message = str(info.value)
    assert "'vit_tiny_patch16_22'" in message and "Did you mean 'vit_tiny_patch16_224'" in message
    assert "\n" not in message


@pytest.mark.parametrize("num_classes", [0, 24])
def test_safetensors_checkpoint_loads_with_identical_outputs(tmp_path, num_classes):
    torch.manual_seed(0)
    kwargs = dict(TINY, num_classes=num_classes)
    original = timm.create_model(NAME, pretrained=False, **kwargs).eval()
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(original.state_dict(), str(path))
    loaded = create_backbone(NAME, checkpoint=path, model_kwargs=kwargs)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), original.forward_features(x))
        assert torch.equal(loaded(x), original(x))  # the head (CLIP's projection) came from the file too
    fresh = timm.create_model(NAME, pretrained=False, **kwargs)
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, loaded.blocks[0].attn.qkv.weight)


def test_checkpoint_with_wrong_shapes_names_the_file_and_key(tmp_path):
    path = tmp_path / "small.safetensors"
    safetensors.torch.save_file(timm.create_model(NAME, pretrained=False, **TINY).state_dict(), str(path))
    with pytest.raises(ValueError) as info:
        create_backbone(NAME, checkpoint=path, model_kwargs=dict(TINY, embed_dim=60))
    message = str(info.value)
    assert str(path) in message and "(1, 1, 48)" in message and "(1, 1, 60)" in message and "cls_token" in message
    assert "\n" not in message


def test_checkpoint_missing_blocks_names_the_missing_key(tmp_path):
    path = tmp_path / "shallow.safetensors"
    safetensors.torch.save_file(timm.create_model(NAME, pretrained=False, **TINY).state_dict(), str(path))
    with pytest.raises(ValueError, match=r"blocks\.2\.") as info:
        create_backbone(NAME, checkpoint=path, model_kwargs=dict(TINY, depth=3))
    assert str(path) in str(info.value)


def test_corrupt_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors"):
        create_backbone(NAME, checkpoint=path, model_kwargs=TINY)


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        create_backbone(NAME, checkpoint=path, model_kwargs=TINY)


def test_eval_transform_uses_the_models_input_size():
    model = create_backbone(NAME, model_kwargs=TINY)
    image = Image.new("RGB", (50, 40), color=(255, 0, 0))
    tensor = create_eval_transform(model)(image)
    assert tensor.shape == (3, 32, 32)
    assert torch.allclose(tensor[0], torch.ones(32, 32))  # red 255 normalised with mean 0.5, std 0.5
    description = describe_transform(model, crop_pct=1.0)
    assert json.loads(json.dumps(description)) == description
    assert description["input_size"] == [3, 32, 32] and description["crop_pct"] == 1.0
    assert describe_transform(model)["crop_pct"] == model.pretrained_cfg["crop_pct"]


def test_random_init_is_seeded_so_the_same_backbone_comes_back():
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
    first = create_backbone("vit_tiny_patch16_224", model_kwargs=kwargs)
    again = create_backbone("vit_tiny_patch16_224", model_kwargs=kwargs)
    other = create_backbone("vit_tiny_patch16_224", model_kwargs=kwargs, init_seed=1)
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    pairs = zip(first.state_dict().values(), other.state_dict().values(), strict=True)
    assert any(not torch.equal(a, c) for a, c in pairs)
