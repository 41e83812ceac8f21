"""Pretrain step: train one backbone from scratch on its `pretrain` recipe and save its encoder as `checkpoint`."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from layerprobe.config import FORMATS, BackboneConfig, PathsConfig
from layerprobe.data import create_dataset, source_inputs
from layerprobe.file_hashes import input_listing
from layerprobe.files import read_json, replace_durably, tmp_path, write_json
from layerprobe.fingerprint import Fingerprint, listed_files, make_fingerprint, provenance_record, staleness


def pretrain_fingerprint(backbone: BackboneConfig) -> Fingerprint:
    """The architecture, preprocessing and recipe (not the device), and the contents of any files the source reads."""
    recipe = backbone.pretrain
    params = {
        "model": backbone.model,
        "model_kwargs": backbone.model_kwargs,
        "preprocessing": backbone.preprocessing(),
        "pretrain": {k: v for k, v in dataclasses.asdict(recipe).items() if k != "device"},
    }
    inputs = input_listing(source_inputs(recipe.source, recipe.options))
    return make_fingerprint(__name__, format=FORMATS["pretrained"], params=params, inputs=inputs)


def pretrain_checkpoint(backbone_name: str, backbone: BackboneConfig, paths: PathsConfig) -> Path:
    """The file pretraining `backbone_name` writes: its `checkpoint`, refused in one line unless it lies in
    `paths.pretrained_dir` (the stage's output, which DVC tracks), so no downloaded checkpoint is ever overwritten."""
    if backbone.pretrain is None:
        raise ValueError(f"backbone {backbone_name!r} has no `pretrain` section: nothing to pretrain")
    checkpoint = Path(backbone.checkpoint)
    if not checkpoint.resolve().is_relative_to(paths.pretrained_dir.resolve()):
        raise ValueError(
            f"backbones.{backbone_name}.checkpoint {checkpoint} is outside {paths.pretrained_dir}/, where pretrain "
            "writes (the stage's output that DVC tracks): it is not overwritten"
        )
    return checkpoint


def marker_path(backbone: BackboneConfig) -> Path:
    """The checkpoint's completion marker, next to it: `<checkpoint stem>.json`."""
    return Path(backbone.checkpoint).with_suffix(".json")


def pretrain_step(backbone_name: str, *, backbone: BackboneConfig, progress: bool = True) -> dict:
    """Pretrain (or reuse) the checkpoint of `backbone_name`; returns its path, sha256 and held-out accuracy."""
    if backbone.pretrain is None:
        raise ValueError(f"backbone {backbone_name!r} has no `pretrain` section: nothing to pretrain")
    fingerprint = pretrain_fingerprint(backbone)
    marker, checkpoint = marker_path(backbone), Path(backbone.checkpoint)
    reason = staleness(marker, fingerprint)
    if reason is None:
        return {**read_json(marker), "status": "reused", "reason": None}

    import torch
    from safetensors.torch import save_file

    from layerprobe.backbone import check_model_name, create_eval_transform, create_model
    from layerprobe.device import resolve_device
    from layerprobe.files import sha256_file
    from layerprobe.pretrain import encoder_state, pretrain

    check_model_name(backbone.model)  # a typo fails in one line, before the recipe's images are made
    recipe = backbone.pretrain
    dataset = create_dataset(recipe.source, **recipe.options)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, without disturbing the caller's RNG
        torch.manual_seed(recipe.seed)
        kwargs = {**backbone.model_kwargs, "num_classes": len(dataset.class_names)}
        model = create_model(backbone.model, pretrained=False, **kwargs)  # a model_kwargs typo: one line too
    # The extraction's own preprocessing, so pretraining sees images exactly as the probes' features will.
    transform = create_eval_transform(model, **backbone.preprocessing())
    images = torch.stack([transform(dataset.load_image(i)) for i in range(len(dataset))])  # [N, 3, H, W]
    labels = torch.as_tensor(dataset.labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(recipe.seed))
    cut = max(1, int(round(recipe.held_out * len(labels))))
    held, train = order[:cut], order[cut:]
    start = time.perf_counter()
    result = pretrain(
        model,
        images[train],
        labels[train],
        held_out=(images[held], labels[held]),
        config=recipe,
        device=resolve_device(recipe.device),
        progress=progress,
    )
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(checkpoint)
    save_file(encoder_state(model), str(tmp), metadata={"layerprobe.backbone": backbone_name})
    replace_durably(tmp, checkpoint)  # the old checkpoint stays whole until this rename
    summary = {
        "backbone": backbone_name,
        "checkpoint": str(checkpoint),
        "sha256": sha256_file(checkpoint),
        "source": recipe.source,
        "classes": list(dataset.class_names),
        "num_images": {"train": len(train), "held_out": len(held)},
        "held_out_accuracy": result.held_out_accuracy,
        "history": result.history,
        "seconds": round(time.perf_counter() - start, 1),
        "format": FORMATS["pretrained"],
        "files": listed_files(marker.parent, [checkpoint.name]),
        "fingerprint": fingerprint.as_dict(),
        "recorded": provenance_record(),
    }
    write_json(marker, summary)
    return {**summary, "status": "computed", "reason": reason}
