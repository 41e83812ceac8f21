"""Probe <-> directory with `probe.safetensors` (weights) and `probe.json` (everything needed to rebuild it).

Never pickle: the JSON says which head to build, safetensors fills its tensors, and every mismatch is an error
that names the directory and the offending key.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from layerprobe.config import PROBE_CONFIG, PROBE_WEIGHTS
from layerprobe.files import replace_durably, tmp_path, write_bytes_atomic
from layerprobe.probes import head_from_description

FORMAT_VERSION = 1


def _jsonable(value: Any) -> Any:
    """Dataclasses, tuples, paths and numpy/torch scalars as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def save_probe(directory: str | Path, probe: nn.Module, config: dict) -> Path:
    """Write `probe` to `directory` (created if needed); returns the directory.

    Args:
        directory: target folder; existing probe files there are replaced.
        probe: a head from `probes.build_probe` / `extract_member` (usually G=1).
        config: what the caller wants to keep with it (probe spec, hparams, positions, token labels, class names,
            feature provenance, ...); dataclasses are stored as dicts. The head's own description is added as
            "head".
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if "head" in config:
        raise ValueError("config key 'head' is reserved: save_probe stores the head's description there")
    document = {"format_version": FORMAT_VERSION, "head": probe.describe(), **_jsonable(config)}
    text = json.dumps(document, indent=2, sort_keys=False)
    tensors = {name: value.detach().cpu().contiguous() for name, value in probe.state_dict().items()}
    # Temporaries then rename; the JSON goes last, so a directory with probe.json has complete weights.
    weights_tmp = tmp_path(directory / PROBE_WEIGHTS)
    save_file(tensors, str(weights_tmp), metadata={"format_version": str(FORMAT_VERSION)})
    replace_durably(weights_tmp, directory / PROBE_WEIGHTS)
    write_bytes_atomic(directory / PROBE_CONFIG, text.encode())
    return directory


def reading_arguments(config: dict) -> dict[str, Any]:
    """How a saved probe reads a feature cache, as `train.predict` takes it: its slots, the width it gathers at and
    how it normalises them (probes saved before `normalize` was recorded normalised each token)."""
    return {
        "positions": [tuple(p) for p in config["positions"]],
        "width": config.get("width"),
        "normalize": config.get("normalize", "token"),
    }


def load_probe(directory: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a probe saved by `save_probe`; returns (probe in eval mode, the JSON config)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"probe directory {directory} does not exist")
    config_path, weights_path = directory / PROBE_CONFIG, directory / PROBE_WEIGHTS
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: {directory} holds no saved probe")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON ({e}); the probe directory is corrupt") from e
    if not isinstance(config, dict) or not isinstance(config.get("head"), dict):
        raise ValueError(f"{config_path} has no 'head' description; was it written by save_probe?")
    try:
        probe = head_from_description(config["head"])
    except (TypeError, ValueError, KeyError, ArithmeticError, RuntimeError) as e:
        # A hand-edited description fails in the head's own arithmetic (num_heads 0) or in torch (negative sizes).
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{config_path}: cannot build the head {config['head']}: {reason}") from e
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing: the probe in {directory} has no weights")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({e})") from e
    expected = probe.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match {config_path}: missing keys {missing}, unexpected keys {unexpected}"
        )
    for name, value in expected.items():
        if tuple(tensors[name].shape) != tuple(value.shape):
            raise ValueError(
                f"{weights_path}: key {name!r} has shape {tuple(tensors[name].shape)}, "
                f"but {config_path} describes {tuple(value.shape)}"
            )
    probe.load_state_dict(tensors)
    return probe.to(device).eval(), config
