"""Frozen timm ViT backbones and their eval transforms.

Weights come from timm's own pretrained path, so a local `.safetensors` / `.pth` / `.bin` file goes through the same
key filtering (position-embedding resampling, CLIP key remapping) as a hub download would. Nothing is unpickled: a
`.pth` / `.bin` file is read here with `torch.load(weights_only=True)` (tensors and containers only) and handed to
timm as a state dict, since timm 1.0.9-1.0.25 `torch.load` a local file with full pickle, and a checkpoint path (with
its expected hash) comes from a probe.json that anyone who can write the probe folder can edit. With
`pos_embed_resample="dinov2"` a checkpoint's position-embedding table is fitted to the model's patch grid with
DINOv2's own rule instead of timm's (see `resample_pos_embed_dinov2`).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from PIL import Image

from layerprobe.config import POS_EMBED_RESAMPLES
from layerprobe.registry import unknown_name_error

# DINOv2's `interpolate_pos_encoding` (non-register models) scales by (n + 0.1) / N "to avoid floating point error"
# (facebookresearch/dino#8): the kernel then samples the table on a slightly different lattice than size=n would.
DINOV2_INTERPOLATE_OFFSET = 0.1


def create_backbone(
    model_name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    model_kwargs: dict | None = None,
    init_seed: int = 0,
    pos_embed_resample: str = "timm",
) -> torch.nn.Module:
    """Create a frozen timm model in eval mode.

    Random initialisation (no weights loaded) is seeded with `init_seed`, so a random-init backbone is the same
    network every time: its cached features are reproducible and `predict` rebuilds the backbone a probe saw.

    Args:
        model_name: timm model name, optionally with a weights tag (`vit_base_patch16_clip_224.openai`).
        pretrained: Load timm's published weights (needs the hub or a warm cache).
        checkpoint: Local weights file (`.safetensors`, `.pth`, `.bin`; never unpickled); implies pretrained.
        model_kwargs: Extra `timm.create_model` arguments (`img_size`, `depth`, ...).
        init_seed: Seed of the random initialisation (irrelevant when weights are loaded).
        pos_embed_resample: How loaded weights' position embeddings are fitted to the model's patch grid when they
            differ (DINOv2's 37x37 table at 518 px for a 224-px model): `timm` (its antialiased bicubic) or `dinov2`
            (DINOv2's own run-time interpolation, which the reference's DINOv2 models ran; timm ViTs only).

    Raises:
        ValueError: Unknown model name or `model_kwargs` key (with the nearest match), a checkpoint that does not fit
            the model, or hub weights that could not be downloaded.
        FileNotFoundError: `checkpoint` does not exist.
        ValueError: `checkpoint` holds more than tensors (a pickled object would have to run to load it).
    """
    kwargs = dict(model_kwargs or {})
    check_model_name(model_name)
    if pos_embed_resample not in POS_EMBED_RESAMPLES:
        raise ValueError(
            f"unknown pos_embed_resample {pos_embed_resample!r}; choices: {', '.join(POS_EMBED_RESAMPLES)}"
        )
    if checkpoint is None:
        try:
            with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG stream
                torch.manual_seed(init_seed)
                model = _create_model(model_name, pretrained, kwargs, {}, pos_embed_resample)
        except Exception as e:
            typo = model_kwargs_error(model_name, kwargs, e)
            if typo is not None:
                raise typo from e
            if not pretrained:
                raise
            raise ValueError(
                f"could not load pretrained weights for {model_name!r} from the Hugging Face hub: it needs network, or "
                f"the weights already in the hub cache (offline: set a local checkpoint file instead): {_first_line(e)}"
            ) from e
    else:
        model = _create_from_checkpoint(model_name, Path(checkpoint), kwargs, pos_embed_resample)
    model.eval()
    model.requires_grad_(False)
    return model


def _create_model(
    model_name: str, pretrained: bool, kwargs: dict, overlay: dict, pos_embed_resample: str
) -> torch.nn.Module:
    """timm.create_model, or, for `dinov2` resampling, the same load with DINOv2's rule ahead of timm's key filter."""
    if not pretrained or pos_embed_resample == "timm":
        return timm.create_model(model_name, pretrained=pretrained, pretrained_cfg_overlay=overlay or None, **kwargs)
    # timm hard-wires its filter (and so its resampling) into the model's entry point, so build without weights and
    # load them with timm's own loader (hub, url or file, classifier handling) through a filter that resamples first.
    model = timm.create_model(model_name, pretrained=False, pretrained_cfg_overlay=overlay or None, **kwargs)
    if not isinstance(model, timm.models.VisionTransformer):
        raise ValueError(
            f"pos_embed_resample 'dinov2' needs a timm VisionTransformer; {model_name!r} is {type(model).__name__}"
        )
    timm.models.load_pretrained(
        model, num_classes=model.num_classes, in_chans=kwargs.get("in_chans", 3), filter_fn=_dinov2_checkpoint_filter
    )
    return model


def _dinov2_checkpoint_filter(state_dict: dict, model: torch.nn.Module) -> dict:
    """Resample `pos_embed` to the model's grid the DINOv2 way; timm's filter then finds it fitting and keeps it."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state_dict = state_dict.get("model", state_dict)  # the wrappers timm's filter unwraps
    state_dict = dict(state_dict.get("state_dict", state_dict))
    if state_dict.get("pos_embed") is not None:
        state_dict["pos_embed"] = resample_pos_embed_dinov2(state_dict["pos_embed"], model.patch_embed.grid_size)
    return checkpoint_filter_fn(state_dict, model)


def resample_pos_embed_dinov2(table: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
    """A position-embedding table `[1, P + N*N, D]` (P = 0 or 1 prefix positions) at grid `grid_size`, by DINOv2's rule.

    DINOv2 (`DinoVisionTransformer.interpolate_pos_encoding`, non-register models) interpolates its square table at
    every forward: bicubic, no antialias, `scale_factor = (n + 0.1) / N`. With a fixed input size that is one
    resampling, done here once. timm's `resample_abs_pos_embed` instead asks for `size=n` with antialias, which
    low-pass filters the table when shrinking it (37 -> 16 for 224 px).
    """
    num_positions, dim = table.shape[1], table.shape[2]
    side = math.isqrt(num_positions)
    prefix = num_positions - side * side
    if prefix not in (0, 1):
        raise ValueError(f"position table of {num_positions} positions is not a square grid plus at most one prefix")
    rows, cols = int(grid_size[0]), int(grid_size[1])
    if (rows, cols) == (side, side):
        return table
    grid = table[:, prefix:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((rows + DINOV2_INTERPOLATE_OFFSET) / side, (cols + DINOV2_INTERPOLATE_OFFSET) / side)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
    assert grid.shape[-2:] == (rows, cols), f"DINOv2 rule gave {tuple(grid.shape[-2:])}, wanted {(rows, cols)}"
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(table.dtype)
    return torch.cat([table[:, :prefix], grid], dim=1)


def check_model_name(model_name: str) -> None:
    """A timm model name (with or without a weights tag); an unknown one fails with the nearest match."""
    if not timm.is_model(timm.models.split_model_name_tag(model_name)[0]):
        raise unknown_name_error("model", model_name, timm.list_models())


def create_model(model_name: str, **kwargs: Any) -> torch.nn.Module:
    """`timm.create_model` (random init) whose unknown model name or keyword argument fails in one line naming it."""
    check_model_name(model_name)
    try:
        return timm.create_model(model_name, **kwargs)
    except TypeError as e:
        typo = model_kwargs_error(model_name, kwargs, e)
        if typo is None:
            raise
        raise typo from e


# Python's TypeError for a keyword nobody takes: "VisionTransformer.__init__() got an unexpected keyword argument 'x'".
_UNEXPECTED_KEYWORD = re.compile(r"([\w.]+)\(\) got an unexpected keyword argument '(\w+)'")


def model_kwargs_error(model_name: str, kwargs: dict, error: BaseException) -> ValueError | None:
    """timm's TypeError for a `model_kwargs` key the model does not take, as a one-line error naming the key, the
    model and the nearest argument it does take; None for any other error."""
    match = _UNEXPECTED_KEYWORD.search(str(error)) if isinstance(error, TypeError) else None
    if match is None or match.group(2) not in kwargs:
        return None
    owner, key = match.group(1).removesuffix(".__init__"), match.group(2)
    return unknown_name_error(f"model_kwargs key of {model_name!r} ({owner})", key, _arguments_of(model_name, owner))


def _arguments_of(model_name: str, owner: str) -> list[str]:
    """Keyword arguments of the class `owner` that builds `model_name` (found beside its timm entry point)."""
    try:
        entrypoint = timm.models.model_entrypoint(timm.models.split_model_name_tag(model_name)[0])
        target = getattr(importlib.import_module(entrypoint.__module__), owner)
        parameters = inspect.signature(target).parameters.values()
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _create_from_checkpoint(model_name: str, path: Path, kwargs: dict, pos_embed_resample: str) -> torch.nn.Module:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    # timm reads a .safetensors file with safetensors (never pickle) in every version: handed over by its path.
    overlay: dict[str, Any] = {"file": str(path)}
    if path.suffix != ".safetensors":
        overlay = {"state_dict": read_weights(path)}
    # timm drops the classifier when num_classes differs from the registry's; a head the caller asked for by size must
    # come from the checkpoint too (CLIP's projection lives in `head`), so declare the checkpoint's class count.
    if kwargs.get("num_classes"):
        overlay["num_classes"] = kwargs["num_classes"]
    try:
        model = _create_model(model_name, True, kwargs, overlay, pos_embed_resample)
    except Exception as e:
        raise (
            model_kwargs_error(model_name, kwargs, e) or ValueError(_describe_misfit(model_name, path, kwargs, e))
        ) from e
    model.pretrained_cfg.pop("state_dict", None)  # the loaded tensors, which the model's config would keep alive
    return model


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a local weights file, never unpickling an object: `.safetensors` by safetensors, anything
    else by `torch.load(weights_only=True)`, unwrapped as timm unwraps training checkpoints (its EMA weights first,
    then `state_dict` or `model`; `module.` prefixes dropped). A file that needs more than tensors and containers to
    load (a pickled class, a code payload) is refused in one line, before anything of it runs."""
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"checkpoint {path} is not a readable safetensors file: {_first_line(e)}") from e
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise ValueError(
            f"checkpoint {path} holds more than weights ({found.group(1) if found else 'a pickled object'}), which "
            "only full unpickling would build, and unpickling can run code: it is not loaded; save its state dict "
            "as .safetensors (or as plain tensors with torch.save)"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"checkpoint {path} could not be read as weights: {_first_line(e)}") from e
    if isinstance(checkpoint, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"checkpoint {path} is not a state dict (names to tensors): {type(checkpoint).__name__}")
    return timm.models.clean_state_dict(checkpoint)


def _describe_misfit(model_name: str, path: Path, kwargs: dict, error: Exception) -> str:
    """One line naming the checkpoint and the first key whose shape (or presence) does not fit."""
    try:
        loaded = read_weights(path)
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


def eval_data_config(
    pretrained_cfg: Mapping[str, Any] | timm.models.PretrainedCfg,
    *,
    img_size: int | Sequence[int] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict:
    """timm's eval data config for a model's `pretrained_cfg` at the size it was built for, with overrides.

    The resize is to floor(size / crop_pct) on the short side, then a centre crop of `size`. Each override left None
    keeps the model's own value (its pretrained_cfg, else timm's default). Needs no model instance: a model's config
    comes from `timm.models.get_pretrained_cfg(name)` as well as from `model.pretrained_cfg`.

    Args:
        pretrained_cfg: The model's timm pretrained config (`model.pretrained_cfg` or `get_pretrained_cfg(name)`).
        img_size: The input size the model was built with (`model_kwargs.img_size`); None: the config's.
        crop_pct: Crop fraction (1.0: resize to the input size, no border lost).
        interpolation: Resize filter (`bilinear`, `bicubic`, `nearest`).
        mean: Per-channel normalisation mean (3 floats).
        std: Per-channel normalisation std (3 floats).
    """
    args: dict[str, Any] = {}
    if img_size is not None:
        args["input_size"] = (3, img_size, img_size) if isinstance(img_size, int) else (3, *img_size)
    overrides = {"crop_pct": crop_pct, "interpolation": interpolation, "mean": mean, "std": std}
    args.update({k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in overrides.items() if v is not None})
    if isinstance(pretrained_cfg, timm.models.PretrainedCfg):
        pretrained_cfg = pretrained_cfg.to_dict()
    return timm.data.resolve_data_config(args, pretrained_cfg=dict(pretrained_cfg))


def model_data_config(model: torch.nn.Module, **preprocessing: Any) -> dict:
    """`eval_data_config` of a built model; `preprocessing`: its overrides (`BackboneConfig.preprocessing()`)."""
    # The registry's input size (224 for vit_*_224, 518 for DINOv2) is not the size a model built with another
    # img_size takes, and a fixed-size ViT rejects it: take the size the patch embedding was built for.
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if getattr(patch_embed, "dynamic_img_size", False):
        img_size = None
    return eval_data_config(getattr(model, "pretrained_cfg", None) or {}, img_size=img_size, **preprocessing)


def transform_from_data_config(config: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """timm's eval transform (resize, centre crop, to tensor, normalise) for a resolved data config."""
    return timm.data.create_transform(**config, is_training=False)


def create_eval_transform(model: torch.nn.Module, **preprocessing: Any) -> Callable[[Image.Image], torch.Tensor]:
    """The model's eval preprocessing with `preprocessing` overrides (see `eval_data_config`), PIL → tensor."""
    return transform_from_data_config(model_data_config(model, **preprocessing))


def describe_transform(model: torch.nn.Module, **preprocessing: Any) -> dict:
    """JSON-able description of `create_eval_transform(model, **preprocessing)` for cache provenance."""
    config = model_data_config(model, **preprocessing)
    return {
        "input_size": list(config["input_size"]),
        "interpolation": config["interpolation"],
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "crop_pct": float(config["crop_pct"]),
        "crop_mode": config.get("crop_mode", "center"),
    }
