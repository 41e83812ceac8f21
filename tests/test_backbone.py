"""Backbone creation: did-you-mean names, local checkpoints through timm's pretrained path, eval transforms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from layerprobe.backbone import (
    create_backbone,
    create_eval_transform,
    describe_transform,
    eval_data_config,
    model_data_config,
    transform_from_data_config,
)
from layerprobe.params import load_params

NAME = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
PAPER = load_params(Path(__file__).resolve().parents[1] / "params.paper.yaml")

# What the reference ran, per family (issue 14): (resize, interpolation, mean, std); every crop is 224.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REFERENCE_PREPROCESSING = {
    "supervised": (248, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # timm's config: crop 0.9
    "clip": (224, "bicubic", CLIP_MEAN, CLIP_STD),  # open_clip's: resize 224, crop 224
    "dinov2": (256, "bilinear", IMAGENET_MEAN, IMAGENET_STD),  # torchvision's default
    "mae": (256, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
}


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


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_a_model_kwargs_typo_is_one_line_naming_the_key_the_model_and_the_nearest_argument(tmp_path, with_checkpoint):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(timm.create_model(NAME, pretrained=False, **TINY).state_dict(), str(path))
    with pytest.raises(ValueError) as info:
        create_backbone(NAME, checkpoint=path if with_checkpoint else None, model_kwargs=dict(TINY, dpeth=2))
    message = str(info.value)
    assert "\n" not in message and "checkpoint" not in message  # the key is wrong, not the weights file
    assert f"model_kwargs key of {NAME!r} (VisionTransformer) 'dpeth'. Did you mean 'depth'?" in message


def test_a_failed_hub_download_is_one_line_saying_it_needs_network(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file (simulated)")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)  # where timm fetches hub weights
    with pytest.raises(ValueError) as info:
        create_backbone(NAME, pretrained=True, model_kwargs=TINY)
    message = str(info.value)
    assert "\n" not in message and f"could not load pretrained weights for {NAME!r}" in message
    assert "needs network" in message and "local checkpoint file" in message and "(simulated)" in message


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


@pytest.mark.parametrize("name", sorted(PAPER.backbones))
def test_each_paper_backbone_preprocesses_as_the_reference_ran_it(name):
    backbone = PAPER.backbones[name]
    preprocessing = backbone.preprocessing()
    assert None not in preprocessing.values(), f"{name}: set every preprocessing key, not timm's default"
    # The production path (eval_data_config + transform_from_data_config), from the registry's config: no model built.
    config = eval_data_config(
        timm.models.get_pretrained_cfg(backbone.model), img_size=backbone.model_kwargs.get("img_size"), **preprocessing
    )
    resize, crop, _, normalize = transform_from_data_config(config).transforms
    size, interpolation, mean, std = REFERENCE_PREPROCESSING[backbone.family]
    assert isinstance(resize, transforms.Resize) and resize.size == size  # short side
    assert resize.interpolation == transforms.InterpolationMode(interpolation)
    assert isinstance(crop, transforms.CenterCrop) and tuple(crop.size) == (224, 224)
    assert isinstance(normalize, transforms.Normalize)
    assert torch.allclose(torch.as_tensor(normalize.mean, dtype=torch.float64), torch.tensor(mean, dtype=torch.float64))
    assert torch.allclose(torch.as_tensor(normalize.std, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))
    assert (backbone.pos_embed_resample == "dinov2") == (backbone.family == "dinov2")


@pytest.mark.parametrize(
    ("model_name", "kwargs"),
    [(NAME, TINY), ("vit_small_patch14_dinov2.lvd142m", dict(img_size=224, depth=1, embed_dim=48, num_heads=3))],
)
def test_data_config_from_the_registry_equals_the_built_models(model_name, kwargs):
    preprocessing = {"crop_pct": 0.875, "interpolation": "bilinear", "mean": None, "std": [0.2, 0.3, 0.4]}
    built = model_data_config(create_backbone(model_name, model_kwargs=kwargs), **preprocessing)
    registry = eval_data_config(
        timm.models.get_pretrained_cfg(model_name), img_size=kwargs["img_size"], **preprocessing
    )
    assert built == registry
    assert built["input_size"] == (3, kwargs["img_size"], kwargs["img_size"])  # not DINOv2's registered 518
    assert built["std"] == (0.2, 0.3, 0.4) and built["interpolation"] == "bilinear"


def test_overrides_reach_the_transform_and_its_description():
    model = create_backbone(NAME, model_kwargs=TINY)
    own = describe_transform(model)
    assert own["interpolation"] == "bicubic" and own["mean"] == [0.5, 0.5, 0.5]  # the model's own pretrained_cfg
    description = describe_transform(
        model, crop_pct=0.5, interpolation="nearest", mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0]
    )
    assert description["interpolation"] == "nearest" and description["crop_pct"] == 0.5
    resize = create_eval_transform(model, crop_pct=0.5, interpolation="nearest").transforms[0]
    assert resize.size == 64 and resize.interpolation == transforms.InterpolationMode.NEAREST  # floor(32 / 0.5)
    image = Image.new("RGB", (40, 40), color=(255, 0, 0))
    tensor = create_eval_transform(model, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])(image)
    assert torch.allclose(tensor[0], torch.ones(32, 32)) and torch.allclose(tensor[1], torch.zeros(32, 32))


# ---------------------------------------------------------------- DINOv2 position embeddings

DINOV2 = "vit_small_patch14_dinov2"
DINOV2_SMALL = dict(depth=1, embed_dim=48, num_heads=3)


def dinov2_formula(table: torch.Tensor, size: int) -> torch.Tensor:
    """DINOv2's `interpolate_pos_encoding` (facebookresearch/dinov2, non-register models), written out here."""
    side = int((table.shape[1] - 1) ** 0.5)
    grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = (size + 0.1) / side
    grid = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, size * size, -1)], dim=1)


@pytest.fixture(scope="module")
def dinov2_checkpoint(tmp_path_factory):
    """A random DINOv2-shaped checkpoint at its native 518 px (a 37x37 position table), like the hub's."""
    torch.manual_seed(3)
    model = timm.create_model(DINOV2, pretrained=False, img_size=518, **DINOV2_SMALL)
    with torch.no_grad():  # a smooth table, as trained ones are, so the two resamplings differ by their filters
        model.pos_embed[:, 1:] = F.interpolate(torch.randn(1, 48, 6, 6), size=(37, 37), mode="bicubic").flatten(2).mT
    path = tmp_path_factory.mktemp("dinov2") / "dinov2.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    return path, model.pos_embed.detach().clone()


def test_dinov2_resampling_equals_dinov2s_formula_and_differs_from_timms(dinov2_checkpoint):
    path, table = dinov2_checkpoint
    assert table.shape == (1, 1 + 37 * 37, 48)
    kwargs = dict(img_size=224, **DINOV2_SMALL)
    ours = create_backbone(DINOV2, checkpoint=path, model_kwargs=kwargs, pos_embed_resample="dinov2").pos_embed
    timms = create_backbone(DINOV2, checkpoint=path, model_kwargs=kwargs).pos_embed
    assert ours.shape == timms.shape == (1, 1 + 16 * 16, 48)
    torch.testing.assert_close(ours, dinov2_formula(table, 16), rtol=0, atol=0)
    timm_formula = torch.cat(
        [
            table[:, :1],
            F.interpolate(
                table[:, 1:].reshape(1, 37, 37, 48).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic", antialias=True
            )
            .permute(0, 2, 3, 1)
            .reshape(1, 256, 48),
        ],
        dim=1,
    )
    torch.testing.assert_close(timms, timm_formula)
    assert torch.equal(ours[:, 0], timms[:, 0])  # the class position is never resampled
    assert (ours - timms).abs().max() > 0.05 * table.std()


def test_dinov2_resampling_keeps_a_fitting_table_and_every_other_weight(dinov2_checkpoint):
    path, table = dinov2_checkpoint
    kwargs = dict(img_size=518, **DINOV2_SMALL)
    native = create_backbone(DINOV2, checkpoint=path, model_kwargs=kwargs, pos_embed_resample="dinov2")
    assert torch.equal(native.pos_embed, table)
    small = create_backbone(
        DINOV2, checkpoint=path, model_kwargs=dict(kwargs, img_size=224), pos_embed_resample="dinov2"
    )
    for (key, value), other in zip(small.state_dict().items(), native.state_dict().values(), strict=True):
        assert key == "pos_embed" or torch.equal(value, other), key
    with pytest.raises(ValueError, match="pos_embed_resample"):
        create_backbone(DINOV2, checkpoint=path, model_kwargs=kwargs, pos_embed_resample="bilinear")


class _Payload:
    """What a shared .pth can carry: unpickling it calls `exec` on code that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_plain_weights_load_and_a_checkpoint_carrying_a_code_payload_is_refused_before_it_runs(
    tmp_path, suffix, unpickling_timm
):
    torch.manual_seed(0)
    original = timm.create_model(NAME, pretrained=False, **TINY).eval()
    weights = original.state_dict()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / f"trained{suffix}")  # a DDP training checkpoint: tensors, ints, strings
    loaded = create_backbone(NAME, checkpoint=tmp_path / f"trained{suffix}", model_kwargs=TINY)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(loaded.forward_features(x), original.forward_features(x))  # unwrapped as timm does
    assert "state_dict" not in loaded.pretrained_cfg  # the loaded tensors are not kept twice

    marker = tmp_path / "payload-ran"
    path = tmp_path / f"shared{suffix}"
    torch.save({"state_dict": weights, "extra": _Payload(marker)}, path)
    with pytest.raises(ValueError) as info:
        create_backbone(NAME, checkpoint=path, model_kwargs=TINY)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "(exec)" in message
    assert not marker.exists()
