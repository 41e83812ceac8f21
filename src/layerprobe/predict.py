"""Backbone + saved probe → labels for new image files, end to end.

The probe's JSON config records how its features were made (timm model, weights, kwargs, tap, transform), so the
same frozen backbone is rebuilt, run over the images one batch at a time, and its tokens go through the probe. Before
any image is decoded, the checkpoint's bytes are checked against the weights the probe's features came from, and
every image's header against the pixel cap its training images were decoded with.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from layerprobe.checkpoint import load_probe
from layerprobe.config import PROBE_CONFIG, BackboneConfig
from layerprobe.data.catalogue import ImageFileError, decode_image, open_image
from layerprobe.steps.extract import weights_identity


def load_image_file(path: Path, *, max_pixels: int | None = None) -> Image.Image:
    """Open an image as RGB (grayscale and RGBA are converted); a missing, unreadable or over-cap file is named."""
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return decode_image(path, name=str(path), max_pixels=max_pixels)


def check_image_files(paths: list[Path], *, max_pixels: int | None = None) -> None:
    """Read every file's header (no pixels): one error naming each missing, non-image or over-cap file."""
    problems = []
    for path in paths:
        if not path.is_file():
            problems.append(f"{path}: not found")
            continue
        try:
            with open_image(path, name=str(path), max_pixels=max_pixels):
                pass
        except ImageFileError as e:
            problems.append(str(e))
    if problems:
        raise ImageFileError(f"{len(problems)} bad image(s): {'; '.join(problems)}")


def probe_provenance(config: dict, probe_dir: Path) -> dict:
    """The part of probe.json that `predict` rebuilds the backbone from, checked: a hand-edited or foreign file fails
    naming the key, not with a KeyError deep inside."""
    where = Path(probe_dir) / PROBE_CONFIG
    fix = "re-run the train step for this probe"
    for key, kind in (("provenance", dict), ("positions", list), ("class_names", list)):
        if not isinstance(config.get(key), kind):
            raise ValueError(f"{where}: {key!r} is missing or not a {kind.__name__}; {fix}")
    for key in ("model", "tap"):
        if not isinstance(config["provenance"].get(key), str):
            raise ValueError(f"{where}: 'provenance.{key}' is missing or not a string; {fix}")
    if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(i, int) for i in p) for p in config["positions"]):
        raise ValueError(f"{where}: 'positions' must be [layer, token] index pairs; {fix}")
    return config["provenance"]


def check_weights(provenance: dict, probe_dir: Path) -> None:
    """The backbone weights now are the ones the probe's features were extracted with (a checkpoint by its sha256).

    A checkpoint re-pretrained or replaced at the same path builds a backbone whose tokens the probe never saw:
    its predictions would be wrong without any error, so this is one.
    """
    recorded = provenance.get("weights")
    if recorded is None:  # probes saved before weights were recorded
        return
    backbone = BackboneConfig(
        model=provenance["model"],
        pretrained=bool(provenance.get("pretrained")),
        checkpoint=provenance.get("checkpoint"),
    )
    current = weights_identity(backbone)
    if current != recorded:
        raise ValueError(
            f"backbone weights changed since probe {probe_dir} was trained: checkpoint {backbone.checkpoint} is now "
            f"{current}, the probe's features came from {recorded}; re-run extract and train for it (or restore the "
            "checkpoint it was trained on)"
        )


def iter_predictions(
    probe_dir: Path, image_paths: list[Path], *, device: str = "cpu", batch_size: int = 32
) -> Iterator[dict]:
    """Classify image files with a saved probe, one batch at a time; yields {path, label, class_name, probability}
    in input order. Decoded images live for one batch only, whatever the number of files."""
    from layerprobe.backbone import create_eval_transform
    from layerprobe.layer_evaluation import build_extractor, classify_pixels
    from layerprobe.truncation import num_blocks, probe_depth

    probe_dir, paths = Path(probe_dir), [Path(p) for p in image_paths]
    probe, config = load_probe(probe_dir)
    source = probe_provenance(config, probe_dir)
    check_weights(source, probe_dir)
    max_pixels = source.get("max_image_pixels")  # the cap its training images were decoded with (None: PIL's)
    check_image_files(paths, max_pixels=max_pixels)  # cheap, and before the backbone is built
    extractor = build_extractor(config, depth=probe_depth(config))  # blocks past the deepest layer read never run
    trained_on = source.get("layer_names", extractor.layer_names)
    if extractor.layer_names != trained_on[: len(extractor.layer_names)] or extractor.num_blocks != num_blocks(
        trained_on
    ):
        raise ValueError(
            f"probe {probe_dir} was trained on layers {trained_on}, backbone gives {extractor.layer_names}"
        )
    network = extractor.model
    # Caches written before `preprocessing` was recorded name only their crop_pct.
    transform = create_eval_transform(network, **(source.get("preprocessing") or {"crop_pct": source.get("crop_pct")}))
    extractor.to(device)
    names = config["class_names"]
    for start in range(0, len(paths), batch_size):
        batch = paths[start : start + batch_size]
        pixels = torch.stack([transform(load_image_file(p, max_pixels=max_pixels)) for p in batch]).to(device)
        labels, logits = classify_pixels(extractor, probe, config, pixels)
        probabilities = torch.as_tensor(logits).float().softmax(-1)
        for i, (path, label) in enumerate(zip(batch, labels, strict=True)):
            yield {
                "path": str(path),
                "label": int(label),
                "class_name": names[int(label)],
                "probability": float(probabilities[i, int(label)]),
            }


def predict_images(
    probe_dir: Path, image_paths: list[Path], *, device: str = "cpu", batch_size: int = 32
) -> list[dict]:
    """Classify image files with a saved probe; returns [{path, label, class_name, probability}] in input order."""
    return list(iter_predictions(probe_dir, image_paths, device=device, batch_size=batch_size))
