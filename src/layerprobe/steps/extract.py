"""Extract step: run one frozen backbone once over one prepared dataset into its per-layer cls/ap feature cache
(plus the final layer's patch tokens with `extract.final_patch_tokens`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from layerprobe.config import FORMATS, MANIFEST_FILE, BackboneConfig, ExtractConfig, PathsConfig
from layerprobe.file_hashes import file_sha256
from layerprobe.files import read_json, refuse_foreign
from layerprobe.fingerprint import Fingerprint, make_fingerprint, provenance_record, staleness


def extract_fingerprint(backbone: BackboneConfig, extract: ExtractConfig, *, dataset_version: str) -> Fingerprint:
    """The backbone section (its weights by content), the extraction settings and the prepared dataset's version."""
    settings = {k: v for k, v in dataclasses.asdict(backbone).items() if k not in ("checkpoint", "family")}
    params = {"backbone": settings, "extract": extract.fingerprint_params()}
    inputs = {"dataset_version": dataset_version, "weights": weights_identity(backbone)}
    return make_fingerprint(__name__, format=FORMATS["features"], params=params, inputs=inputs)


def weights_identity(backbone: BackboneConfig) -> str:
    """A local checkpoint by its bytes (replacing the file re-extracts), hub weights by their tag, else random."""
    if backbone.checkpoint:
        path = Path(backbone.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return f"file:sha256:{file_sha256(path)}"  # read once per machine, then known by its stat
    return f"hub:{backbone.model}" if backbone.pretrained else "random-init"


def extract_step(
    backbone_name: str,
    dataset_name: str,
    *,
    backbone: BackboneConfig,
    extract: ExtractConfig,
    paths: PathsConfig,
    out_dir: Path | None = None,
    progress: bool = True,
) -> dict:
    """Write (or reuse) the feature cache of (backbone, dataset); returns its path and content hash.

    A cache whose manifest records the same fingerprint is reused without building the model; otherwise the
    extractor keeps finished shards of this very fingerprint (a killed run resumes) and recomputes the rest, beside
    the old cache, which stays whole until the new one replaces it.
    """
    from layerprobe.features import cache_content_hash

    out_dir = Path(out_dir) if out_dir else paths.features_dir(backbone_name, dataset_name)
    refuse_foreign(out_dir, MANIFEST_FILE)  # before any work: an --out of other files is never written
    splits_file = paths.splits_file(dataset_name)
    if not splits_file.is_file():
        raise FileNotFoundError(f"dataset {dataset_name!r} is not prepared: {splits_file} is missing (run prepare)")
    dataset_version = read_json(splits_file)["version"]
    fingerprint = extract_fingerprint(backbone, extract, dataset_version=dataset_version)
    reason = staleness(out_dir / MANIFEST_FILE, fingerprint)
    if reason is not None:
        # Imported only when there is work: timm alone costs a reused cache seconds.
        from layerprobe.backbone import create_backbone, create_eval_transform, describe_transform
        from layerprobe.data import open_prepared
        from layerprobe.extract import LayerTokenExtractor, extract_features

        prepared = open_prepared(paths.prepared_dir(dataset_name))  # fails on a broken dataset before the model
        network = create_backbone(
            backbone.model,
            pretrained=backbone.pretrained,
            checkpoint=backbone.checkpoint,
            model_kwargs=backbone.model_kwargs,
            pos_embed_resample=backbone.pos_embed_resample,
        )
        extractor = LayerTokenExtractor(
            network,
            tap=extract.tap,
            final_projection=backbone.final_projection,
            precision=extract.precision,
            final_patch_tokens=extract.final_patch_tokens,
        )
        provenance = {
            "backbone": backbone_name,
            "model": backbone.model,
            "weights": weights_identity(backbone),
            "pretrained": backbone.pretrained,
            "checkpoint": backbone.checkpoint,
            "model_kwargs": backbone.model_kwargs,
            "pos_embed_resample": backbone.pos_embed_resample,
            "preprocessing": backbone.preprocessing(),
            "transform": describe_transform(network, **backbone.preprocessing()),
            "dataset": dataset_name,
            "dataset_version": prepared.version,
            # the pixel cap its images were decoded with, so `predict` refuses what extraction would have (None: PIL's)
            "max_image_pixels": getattr(prepared.dataset, "max_pixels", None),
            "class_names": prepared.class_names,
            "fingerprint": fingerprint.as_dict(),
        }
        extract_features(
            images=prepared.dataset,
            splits=prepared.splits,
            extractor=extractor,
            transform=create_eval_transform(network, **backbone.preprocessing()),
            out_dir=out_dir,
            provenance=provenance,
            shard_size=extract.shard_size,
            batch_size=extract.batch_size,
            num_workers=extract.num_workers,
            dtype=extract.dtype,
            device=extract.device,
            progress=progress,
            recorded=provenance_record(),
        )
    return {
        "backbone": backbone_name,
        "dataset": dataset_name,
        "path": str(out_dir),
        "content_hash": cache_content_hash(out_dir),
        "status": "reused" if reason is None else "computed",
        "reason": reason,
        "warnings": _unwatched_checkpoint(backbone, paths),
    }


def _unwatched_checkpoint(backbone: BackboneConfig, paths: PathsConfig) -> list[str]:
    """A checkpoint outside `paths.checkpoints`: the step sees a replaced file, but `dvc repro` does not run it."""
    if not backbone.checkpoint or Path(backbone.checkpoint).resolve().is_relative_to(Path(paths.checkpoints).resolve()):
        return []
    return [
        f"{backbone.checkpoint} is outside {paths.checkpoints}/: `dvc repro` will not notice it being replaced "
        "(move it there, or run `dvc repro -f -s extract` after replacing it)"
    ]
