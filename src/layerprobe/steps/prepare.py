"""Prepare step: one dataset's splits (and, for small sources, its pixels) under `paths.data/<dataset>/`."""

from __future__ import annotations

from pathlib import Path

from layerprobe.config import FORMATS, SPLITS_FILE, DatasetConfig, PathsConfig, PrepareConfig
from layerprobe.data import prepare_dataset, source_inputs
from layerprobe.file_hashes import input_listing
from layerprobe.files import begin_output, read_json, swap_in
from layerprobe.fingerprint import Fingerprint, make_fingerprint, provenance_record, staleness


def prepare_fingerprint(dataset: DatasetConfig, prepare: PrepareConfig) -> Fingerprint:
    """Source, options and split settings; the content (name, size, sha256) of every file the source reads."""
    params = {"source": dataset.source, "options": dataset.options, "prepare": prepare}
    inputs = input_listing(source_inputs(dataset.source, dataset.options))
    return make_fingerprint(__name__, format=FORMATS["prepared"], params=params, inputs=inputs)


def prepare_step(name: str, *, dataset: DatasetConfig, prepare: PrepareConfig, paths: PathsConfig) -> dict:
    """Materialise dataset `name` unless its splits.json records the same fingerprint; returns a summary.

    Units of several backbones may prepare one dataset at once: the caller holds the dataset's lock around this
    (`layerprobe.locks`), so one prepares and the others then find it prepared.
    """
    out_dir = paths.prepared_dir(name)
    fingerprint = prepare_fingerprint(dataset, prepare)
    reason = staleness(paths.splits_file(name), fingerprint)
    if reason is not None:  # written beside the old one, which stays whole until this one replaces it
        staging = begin_output(out_dir, fingerprint.value, marker=SPLITS_FILE)
        prepare_dataset(
            name,
            source=dataset.source,
            options=dataset.options,
            out_dir=staging,
            val_fraction=prepare.val_fraction,
            test_fraction=prepare.test_fraction,
            seed=prepare.seed,
            fingerprint=fingerprint.as_dict(),
            recorded=provenance_record(),
        )
        swap_in(staging, out_dir)
    marker = read_json(paths.splits_file(name))
    return {
        "dataset": name,
        "path": str(out_dir),
        "version": marker["version"],
        "num_classes": len(marker["class_names"]),
        "split_sizes": {split: len(indices) for split, indices in marker["splits"].items()},
        "status": "reused" if reason is None else "computed",
        "reason": reason,
        "warnings": _unwatched_inputs(dataset, paths),
    }


def _unwatched_inputs(dataset: DatasetConfig, paths: PathsConfig) -> list[str]:
    """Inputs outside `paths.datasets`: the step sees their changes, but `dvc repro` does not know to run it."""
    watched = Path(paths.datasets).resolve()
    return [
        f"{path} is outside {paths.datasets}/: `dvc repro` will not notice changes in it "
        f"(move it there, or run `dvc repro -f -s prepare` after changing it)"
        for path in source_inputs(dataset.source, dataset.options)
        if not path.resolve().is_relative_to(watched)
    ]
