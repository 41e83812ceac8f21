"""Dataset catalogue: named image sources, stratified splits and the prepared-dataset folder.

    create_dataset("digits")                          # any registered source -> ImageDataset
    make_splits(labels, val_fraction=0.2, seed=0)    # {"train", "val", "test"} index arrays
    prepare_dataset("digits", source="digits", options={}, out_dir=..., val_fraction=0.2, test_fraction=0.2, seed=0)
    open_prepared(out_dir)                            # what the extract stage reads
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
]
