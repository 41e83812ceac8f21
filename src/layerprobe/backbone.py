"""Frozen timm ViT backbones and their eval transforms.

Weights come from timm's own pretrained path, so a local `.safetensors` / `.pth` / `.bin` file goes through the same
key filtering (position-embedding resampling, CLIP key remapping) as a hub download would.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image

from layerprobe.registry import unknown_name_error


def create_backbone(
    model_name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    model_kwargs: dict | None = None,
    init_seed: int = 0,
) -> torch.nn.Module:
    """Create a frozen timm model in eval mode.

    Random initialisation (no weights loaded) is seeded with `init_seed`, so a random-init backbone is the same
    network every time: its cached features are reproducible and `predict` rebuilds the backbone a probe saw.

    Args:
        model_name: timm model name, optionally with a weights tag (`vit_base_patch16_clip_224.openai`).
        pretrained: Load timm's published weights (needs the hub or a warm cache).
        checkpoint: Local weights file (`.safetensors`, `.pth`, `.bin`); implies pretrained.
        model_kwargs: Extra `timm.create_model` arguments (`img_size`, `depth`, ...).
        init_seed: Seed of the random initialisation (irrelevant when weights are loaded).

    Raises:
        ValueError: Unknown model name (with the nearest match) or a checkpoint that does not fit the model.
        FileNotFoundError: `checkpoint` does not exist.
    """
    kwargs = dict(model_kwargs or {})
    check_model_name(model_name)
    if checkpoint is None:
        try:
            with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG stream
                torch.manual_seed(init_seed)
                model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        except Exception as e:
            if not pretrained:
                raise
            raise ValueError(
                f"could not load pretrained weights for {model_name!r} (offline? pass a local checkpoint file): "
                f"{_first_line(e)}"
            ) from e
    else:
        model = _create_from_checkpoint(model_name, Path(checkpoint), kwargs)
    model.eval()
    model.requires_grad_(False)
    return model


def check_model_name(model_name: str) -> None:
    """A timm model name (with or without a weights tag); an unknown one fails with the nearest match."""
    if not timm.is_model(timm.models.split_model_name_tag(model_name)[0]):
        raise unknown_name_error("model", model_name, timm.list_models())


def _create_from_checkpoint(model_name: str, path: Path, kwargs: dict) -> torch.nn.Module:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    overlay: dict[str, Any] = {"file": str(path)}
    # timm drops the classifier when num_classes differs from the registry's; a head the caller asked for by size must
    # come from the checkpoint too (CLIP's projection lives in `head`), so declare the checkpoint's class count.
    if kwargs.get("num_classes"):
        overlay["num_classes"] = kwargs["num_classes"]
    try:
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as e:
        raise ValueError(_describe_misfit(model_name, path, kwargs, e)) from e


def _describe_misfit(model_name: str, path: Path, kwargs: dict, error: Exception) -> str:
    """One line naming the checkpoint and the first key whose shape (or presence) does not fit."""
    try:
        loaded = timm.models.load_state_dict(str(path))
        expected = timm.create_model(model_name, pretrained=False, **kwargs).state_dict()
    except Exception:
        return f"checkpoint {path} could not be loaded into {model_name!r}: {_first_line(error)}"
    for key, value in expected.items():  # model order: the first mismatch is the earliest layer that differs
        if key in loaded and tuple(loaded[key].shape) != tuple(value.shape):
            return (
                f"checkpoint {path} does not fit {model_name!r}: {key!r} has shape {tuple(loaded[key].shape)} in the "
                f"checkpoint but {tuple(value.shape)} in the model"
            )
    missing = [key for key in expected if key not in loaded]
    if missing:
        return f"checkpoint {path} does not fit {model_name!r}: model key {missing[0]!r} is missing from the checkpoint"
    unexpected = [key for key in loaded if key not in expected]
    if unexpected:
        return f"checkpoint {path} does not fit {model_name!r}: checkpoint key {unexpected[0]!r} is not in the model"
    return f"checkpoint {path} could not be loaded into {model_name!r}: {_first_line(error)}"


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())[:300]


def _data_config(model: torch.nn.Module, crop_pct: float | None) -> dict:
    args: dict[str, Any] = {}
    # resolve_data_config reads the registry's input size (224 for vit_*_224) even when the model was built with
    # another img_size; a fixed-size ViT rejects that, so take the size the patch embedding was built for.
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and not getattr(patch_embed, "dynamic_img_size", False):
        args["input_size"] = (3, *img_size)
    if crop_pct is not None:
        args["crop_pct"] = crop_pct
    return timm.data.resolve_data_config(args, model=model)


def create_eval_transform(
    model: torch.nn.Module, *, crop_pct: float | None = None
) -> Callable[[Image.Image], torch.Tensor]:
    """The model's own eval preprocessing (resize, centre crop, normalise) as a PIL → tensor callable."""
    return timm.data.create_transform(**_data_config(model, crop_pct), is_training=False)


def describe_transform(model: torch.nn.Module, *, crop_pct: float | None = None) -> dict:
    """JSON-able description of `create_eval_transform(model, crop_pct=...)` for cache provenance."""
    config = _data_config(model, crop_pct)
    return {
        "input_size": list(config["input_size"]),
        "interpolation": config["interpolation"],
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "crop_pct": float(config["crop_pct"]),
        "crop_mode": config.get("crop_mode", "center"),
    }
