"""Backbone + saved probe → labels for new image files, end to end.

The probe's JSON config records how its features were made (timm model, weights, kwargs, tap, transform), so the
same frozen backbone is rebuilt, run once over the images, and its tokens go through the probe.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from layerprobe.checkpoint import load_probe, reading_arguments
from layerprobe.data.catalogue import decode_image
from layerprobe.train import predict


def load_image_file(path: Path) -> Image.Image:
    """Open an image as RGB (grayscale and RGBA are converted); a missing or unreadable file is named in the error."""
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return decode_image(path, name=str(path))


def predict_images(
    probe_dir: Path, image_paths: list[Path], *, device: str = "cpu", batch_size: int = 32
) -> list[dict]:
    """Classify image files with a saved probe; returns [{path, label, class_name, probability}] in input order."""
    from layerprobe.backbone import create_backbone, create_eval_transform
    from layerprobe.extract import LayerTokenExtractor

    probe, config = load_probe(Path(probe_dir))
    source = config["provenance"]
    images = [load_image_file(Path(p)) for p in image_paths]  # fail on a bad file before building the backbone
    network = create_backbone(
        source["model"],
        pretrained=bool(source.get("pretrained", False)),
        checkpoint=source.get("checkpoint"),
        model_kwargs=source.get("model_kwargs") or {},
        pos_embed_resample=source.get("pos_embed_resample", "timm"),
    )
    extractor = LayerTokenExtractor(
        network,
        tap=source["tap"],
        final_projection=bool(source.get("final_projection")),
        precision=source.get("precision", "float32"),
        final_patch_tokens=bool(config.get("patch_tokens")),
    )
    if extractor.layer_names != source.get("layer_names", extractor.layer_names):
        raise ValueError(
            f"probe {probe_dir} was trained on layers {source['layer_names']}, backbone gives {extractor.layer_names}"
        )
    # Caches written before `preprocessing` was recorded name only their crop_pct.
    transform = create_eval_transform(network, **(source.get("preprocessing") or {"crop_pct": source.get("crop_pct")}))
    extractor.to(device)
    batches, patch_batches = [], []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([transform(image) for image in images[start : start + batch_size]]).to(device)
        tokens, patches = extractor.forward_all(pixels)
        batches.append(tokens.cpu())
        if patches is not None:
            patch_batches.append(patches.cpu())
    tokens = torch.cat(batches)  # [N, L, T, D]
    patches = torch.cat(patch_batches) if patch_batches else None  # [N, P, D_final]
    labels, logits, _ = predict(probe, tokens, batch_size=batch_size, patches=patches, **reading_arguments(config))
    probabilities = torch.as_tensor(logits).float().softmax(-1)
    names = config["class_names"]
    return [
        {
            "path": str(path),
            "label": int(label),
            "class_name": names[int(label)],
            "probability": float(probabilities[i, int(label)]),
        }
        for i, (path, label) in enumerate(zip(image_paths, labels, strict=True))
    ]
