"""The prepare stage's output: split indices and class names (and, for small sources, the pixels) in one folder.

Layout of `out_dir` (DVC tracks it):
    splits.json  {name, source, options, class_names, num_images, version, splits: {train, val, test}, ...},
                 written atomically and last, so its presence means the folder is complete;
    images.tar   only for materialised sources (digits, generated tasks): CLIP-benchmark webdataset members
                 `<key>.png` + `<key>.cls`, read back through the same tar reader as the `wds` source.
Large sources (imagefolder, torchvision, wds) are referenced by their options, never copied. Every byte written is a
function of the inputs (fixed tar headers, sorted JSON), so preparing twice leaves DVC nothing to see.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layerprobe.config import FORMATS, IMAGES_TAR, SPLITS_FILE
from layerprobe.data.catalogue import ImageDataset, create_dataset, is_materialised
from layerprobe.data.sources import TarImageDataset
from layerprobe.data.splits import SPLIT_NAMES, make_splits
from layerprobe.files import canonical_json, read_json, write_bytes_atomic
from layerprobe.fingerprint import listed_files

_REQUIRED_KEYS = ("name", "source", "options", "class_names", "num_images", "version", "splits", "materialised")


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset: its images (`dataset`), split indices, class names and content version."""

    name: str
    path: Path
    dataset: ImageDataset
    splits: dict[str, np.ndarray]
    class_names: list[str]
    version: str  # short content hash: changes whenever splits, class names, source or pixels change


def _write_tar(dataset: ImageDataset, path: Path) -> str:
    """Write every image as `<key>.png` + `<key>.cls` with fixed headers; returns the tar's sha256."""
    width = max(6, len(str(len(dataset) - 1)))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(len(dataset)):
            png = io.BytesIO()
            dataset.load_image(index).save(png, format="PNG")
            key = f"{index:0{width}d}"
            for member, data in (
                (f"{key}.png", png.getvalue()),
                (f"{key}.cls", str(int(dataset.labels[index])).encode()),
            ):
                # mtime, owner and mode fixed: the bytes depend on the pixels only.
                info = tarfile.TarInfo(member)
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(data),
                    0,
                    0o644,
                    0,
                    0,
                    "",
                    "",
                )
                tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def _version(
    splits: dict[str, list[int]], class_names: list[str], description: dict, images: str | None, inputs: str | None
) -> str:
    """Short content hash of the prepared dataset: its splits, classes and source, and its pixels (the tar's sha256
    for materialised sources, the fingerprint of the source's files otherwise)."""
    content = {
        "splits": splits,
        "class_names": class_names,
        "description": description,
        "images": images,
        "inputs": inputs,
    }
    return hashlib.sha256(canonical_json(content).encode()).hexdigest()[:12]


def prepare_dataset(
    name: str,
    *,
    source: str,
    options: dict[str, Any],
    out_dir: Path,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    fingerprint: dict | None = None,
    recorded: dict | None = None,
) -> PreparedDataset:
    """Build the source, cut its splits and write `out_dir` (see the module docstring for the layout).

    `fingerprint` (from `layerprobe.fingerprint`) is recorded in splits.json, and its `inputs` part (the source
    files' contents) enters the dataset's version, so features made from other files never pass for these;
    `recorded` (what made it: host, library builds) is kept beside it and decides nothing.
    """
    out_dir = Path(out_dir)
    dataset = create_dataset(source, **options)
    verify = getattr(dataset, "verify_images", None)
    if verify is not None:  # file-backed sources: every broken file reported at once, before anything is written
        verify()
    splits = make_splits(
        dataset.labels,
        official_splits=dataset.official_splits,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    marker, tar_path = out_dir / SPLITS_FILE, out_dir / IMAGES_TAR
    marker.unlink(missing_ok=True)  # the folder is incomplete until the marker is rewritten, last
    materialised = is_materialised(source)
    if materialised:
        images_sha256: str | None = _write_tar(dataset, tar_path)
    else:
        tar_path.unlink(missing_ok=True)  # left from an earlier materialised source: DVC must not track stale pixels
        images_sha256 = None
    split_lists = {key: splits[key].tolist() for key in SPLIT_NAMES}
    description = dataset.describe()
    payload = {
        "name": name,
        "source": source,
        "options": options,
        "description": description,
        "class_names": list(dataset.class_names),
        "num_images": len(dataset),
        "materialised": materialised,
        "images_sha256": images_sha256,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "version": _version(
            split_lists, list(dataset.class_names), description, images_sha256, (fingerprint or {}).get("inputs")
        ),
        "format": FORMATS["prepared"],
        # vouched for (size and sha256) before any reuse
        "files": listed_files(out_dir, [IMAGES_TAR], sha256={IMAGES_TAR: images_sha256}) if materialised else {},
        "fingerprint": fingerprint,
        "recorded": recorded,
        "splits": split_lists,
    }
    write_bytes_atomic(marker, (canonical_json(payload) + "\n").encode())
    if materialised:  # hand back what open_prepared will give, so downstream code sees one kind of dataset
        dataset = TarImageDataset([tar_path], list(dataset.class_names), description=description)
    return PreparedDataset(name, out_dir, dataset, splits, list(dataset.class_names), payload["version"])


def open_prepared(out_dir: Path) -> PreparedDataset:
    """Read a folder written by `prepare_dataset`; a missing or corrupt splits.json fails naming its path."""
    out_dir = Path(out_dir)
    marker = out_dir / SPLITS_FILE
    if not marker.is_file():
        raise FileNotFoundError(f"{str(marker)!r} is missing: run the prepare stage for this dataset first")
    try:
        payload = read_json(marker)
    except ValueError as e:
        raise ValueError(f"{e}; re-run the prepare stage") from e
    missing = [key for key in _REQUIRED_KEYS if not isinstance(payload, dict) or key not in payload]
    missing += [f"splits.{key}" for key in SPLIT_NAMES if not missing and key not in payload["splits"]]
    if missing:
        raise ValueError(f"{str(marker)!r} is corrupt (missing {', '.join(missing)}); re-run the prepare stage")
    if payload.get("format") != FORMATS["prepared"]:
        raise ValueError(
            f"{str(marker)!r} is in format {payload.get('format')!r}, this code reads "
            f"{FORMATS['prepared']!r}; re-run the prepare stage"
        )
    class_names = list(payload["class_names"])
    if payload["materialised"]:
        tar_path = out_dir / IMAGES_TAR
        if not tar_path.is_file():
            raise FileNotFoundError(f"{str(tar_path)!r} is missing (listed by {str(marker)!r}); re-run prepare")
        description = payload.get("description") or {"source": payload["source"], "options": payload["options"]}
        dataset: ImageDataset = TarImageDataset([tar_path], class_names, description=description)
    else:
        dataset = create_dataset(payload["source"], **payload["options"])
    if len(dataset) != payload["num_images"] or list(dataset.class_names) != class_names:
        raise ValueError(
            f"{str(marker)!r} was prepared for {payload['num_images']} images in {len(class_names)} classes, but the "
            f"source now has {len(dataset)} in {len(dataset.class_names)}; re-run the prepare stage"
        )
    splits = {key: np.asarray(payload["splits"][key], dtype=np.int64) for key in SPLIT_NAMES}
    return PreparedDataset(payload["name"], out_dir, dataset, splits, class_names, payload["version"])
