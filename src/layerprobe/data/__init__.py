"""Dataset catalogue: named image sources, stratified splits and the prepared-dataset folder.

Example:
    dataset = create_dataset("count_shapes", num_images=2000, seed=0)  # any registered source -> ImageDataset
    splits = make_splits(dataset.labels, val_fraction=0.2, test_fraction=0.2, seed=0)  # train/val/test indices
    prepare_dataset("shapes", source="count_shapes", options={}, out_dir=out, val_fraction=0.2,
                    test_fraction=0.2, seed=0)  # the prepare stage writes out/splits.json (+ images.tar)
    prepared = open_prepared(out)  # what the extract stage reads
"""

from layerprobe.data import generated as _generated  # noqa: F401  (registers the in-memory sources)
from layerprobe.data import sources as _sources  # noqa: F401  (registers imagefolder, torchvision, wds)
from layerprobe.data.catalogue import (
    ImageDataset,
    ImageFileError,
    create_dataset,
    is_materialised,
    list_sources,
    register_source,
    source_inputs,
)
from layerprobe.data.prepared import PreparedDataset, open_prepared, prepare_dataset
from layerprobe.data.splits import make_splits

__all__ = [
    "ImageDataset",
    "ImageFileError",
    "PreparedDataset",
    "create_dataset",
    "is_materialised",
    "list_sources",
    "make_splits",
    "open_prepared",
    "prepare_dataset",
    "register_source",
    "source_inputs",
]
