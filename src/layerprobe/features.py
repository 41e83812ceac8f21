"""Feature cache: uncompressed Arrow IPC shards (one record batch each), a manifest written last, and a reader.

Layout of a cache directory:
    shard-00000.arrow ...  columns index int64, label int64, split string, tokens fixed_size_list<f16|f32>[L*T*D];
                           schema metadata holds the provenance JSON and the [L, T, D] shape
    manifest.json          completion marker: provenance, shard files with rows and sha256, content_hash

Uncompressed single-batch IPC memory-maps and converts to numpy without a copy (0.005 s to open 0.8 GB, measured in
the design notes); Parquet and compressed IPC decode and copy. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from layerprobe.config import MANIFEST_FILE
from layerprobe.files import canonical_json, read_json, sha256_file, tmp_path, write_json
from layerprobe.registry import unknown_name_error

FORMAT = "layerprobe-features/1"
PROVENANCE_KEY = b"layerprobe.provenance"
SHAPE_KEY = b"layerprobe.shape"
DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}


@dataclass
class FeatureSet:
    """Cached per-layer tokens of a set of images."""

    tokens: torch.Tensor  # [N, L, T, D] in the cache dtype
    labels: torch.Tensor  # [N] int64
    indices: np.ndarray  # [N] dataset indices
    layer_names: list[str]
    token_names: list[str]
    metadata: dict  # manifest provenance


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.arrow"


def write_shard(
    path: Path,
    *,
    tokens: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    indices: np.ndarray,
    splits: Sequence[str] | np.ndarray,
    metadata: dict,
) -> str:
    """Write one shard atomically (temp name, then rename) and return its sha256.

    Args:
        path: Final file name (`shard-00000.arrow`).
        tokens: [n, L, T, D] float16 or float32.
        labels: [n] class labels.
        indices: [n] dataset indices.
        splits: [n] split name of each row.
        metadata: Provenance stored (as JSON) in the schema metadata.
    """
    path = Path(path)
    values = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if values.ndim != 4:
        raise ValueError(f"tokens for {path} must be [n, L, T, D], got shape {values.shape}")
    dtype_name = str(values.dtype)
    if dtype_name not in DTYPES:
        raise ValueError(f"tokens for {path} must be float16 or float32, got {dtype_name}")
    rows, width = values.shape[0], int(np.prod(values.shape[1:]))
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=DTYPES[dtype_name][1])
    label_values = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if not rows == len(label_values) == len(indices) == len(splits):
        raise ValueError(
            f"shard {path}: {rows} token rows but {len(label_values)} labels, {len(indices)} indices, "
            f"{len(splits)} splits"
        )
    batch = pa.record_batch(
        {
            "index": pa.array(np.asarray(indices, dtype=np.int64)),
            "label": pa.array(label_values.astype(np.int64)),
            "split": pa.array([str(s) for s in splits], type=pa.string()),
            "tokens": pa.FixedSizeListArray.from_arrays(flat, width),
        }
    )
    schema = batch.schema.with_metadata(
        {PROVENANCE_KEY: canonical_json(metadata), SHAPE_KEY: json.dumps(list(values.shape[1:]))}
    )
    tmp = tmp_path(path)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(batch)
    os.replace(tmp, path)
    return sha256_file(path)


def open_shard(path: Path) -> tuple[pa.RecordBatch, dict, list[int]]:
    """Memory-map a shard: its single record batch, provenance and [L, T, D] shape (no data is read yet)."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        if reader.num_record_batches != 1:
            raise ValueError(f"expected 1 record batch, found {reader.num_record_batches}")
        metadata = reader.schema.metadata or {}
        provenance = json.loads(metadata[PROVENANCE_KEY])
        shape = json.loads(metadata[SHAPE_KEY])
        return reader.get_batch(0), provenance, shape
    except (OSError, KeyError, ValueError, pa.ArrowException) as e:
        raise ValueError(f"feature shard {path} is unreadable: {e}") from e


def read_manifest(cache_dir: Path) -> dict:
    """The manifest of a complete cache; a directory without one is an incomplete (or foreign) cache."""
    path = Path(cache_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"feature cache {cache_dir} is incomplete or missing: no {MANIFEST_FILE} (run extract)")
    return read_json(path)


def content_hash(provenance: dict, shard_hashes: Sequence[str]) -> str:
    """Hash over the provenance and the shard file hashes, in shard order."""
    return hashlib.sha256(canonical_json({"provenance": provenance, "shards": list(shard_hashes)}).encode()).hexdigest()


def write_manifest(
    cache_dir: Path,
    *,
    provenance: dict,
    shards: Sequence[tuple[str, int, str]],
    splits: Sequence[str],
    plan_sha256: str,
) -> dict:
    """Write `manifest.json` atomically; call it last, after every shard is in place (its presence means complete).

    Args:
        cache_dir: The cache directory.
        provenance: JSON-able provenance; must hold `layer_names`, `token_names` and `dtype`.
        shards: (file name, rows, sha256) of every shard, in row order.
        splits: Split names present in the cache.
        plan_sha256: Hash of the planned rows, so a rerun can tell whether the cache covers what is asked.
    """
    shard_hashes = [sha for _, _, sha in shards]
    manifest = {
        "format": FORMAT,
        "fingerprint": provenance.get("fingerprint"),  # what made the cache (layerprobe.fingerprint)
        "provenance": provenance,
        "num_images": int(sum(rows for _, rows, _ in shards)),
        "splits": list(splits),
        "dtype": provenance["dtype"],
        "plan_sha256": plan_sha256,
        "shards": [
            {"file": file, "rows": int(rows), "sha256": sha, "bytes": (Path(cache_dir) / file).stat().st_size}
            for file, rows, sha in shards
        ],
        "content_hash": content_hash(provenance, shard_hashes),
    }
    write_json(Path(cache_dir) / MANIFEST_FILE, manifest)
    return manifest


def cache_content_hash(cache_dir: Path) -> str:
    """The cache's content hash, recomputed from its manifest (shard sha256s and provenance)."""
    manifest = read_manifest(cache_dir)
    return content_hash(manifest["provenance"], [shard["sha256"] for shard in manifest["shards"]])


def read_features(cache_dir: Path, *, split: str | list[str] | None = None) -> FeatureSet:
    """Read a complete cache into one tensor, keeping rows of the requested split(s) in dataset-index order.

    Each shard is memory-mapped and its tokens viewed as numpy without a copy; rows are then copied exactly once into
    the preallocated output (np.compress with `out=`), so peak memory is the output plus page cache.
    """
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    provenance = manifest["provenance"]
    wanted = None if split is None else ([split] if isinstance(split, str) else list(split))
    for name in wanted or []:
        if name not in manifest["splits"]:
            raise unknown_name_error(f"split of feature cache {cache_dir}", name, manifest["splits"])

    shards = []  # (batch, row mask or None) for every shard, opened once
    for entry in manifest["shards"]:
        path = cache_dir / entry["file"]
        if not path.is_file() or ("bytes" in entry and path.stat().st_size != entry["bytes"]):
            raise ValueError(f"feature cache {cache_dir}: {entry['file']} is missing or changed since extraction; "
                             "re-run extract")  # fmt: skip
        batch, _, shape = open_shard(path)
        mask = None
        if wanted is not None:
            mask = pc.is_in(batch.column("split"), value_set=pa.array(wanted)).to_numpy(zero_copy_only=False)
        shards.append((batch, mask))
    total = sum(batch.num_rows if mask is None else int(mask.sum()) for batch, mask in shards)
    dtype = torch.float16 if manifest["dtype"] == "float16" else torch.float32
    tokens = torch.empty((total, *shape), dtype=dtype)  # [N, L, T, D]
    labels = torch.empty(total, dtype=torch.int64)
    indices = np.empty(total, dtype=np.int64)
    out = tokens.numpy().reshape(total, -1)
    start = 0
    for batch, mask in shards:
        column = batch.column("tokens")
        values = column.flatten().to_numpy(zero_copy_only=True).reshape(batch.num_rows, -1)  # view of the mmap
        shard_labels = batch.column("label").to_numpy()
        shard_indices = batch.column("index").to_numpy()
        count = batch.num_rows if mask is None else int(mask.sum())
        stop = start + count
        if mask is None:
            out[start:stop] = values
            labels.numpy()[start:stop] = shard_labels
            indices[start:stop] = shard_indices
        else:
            np.compress(mask, values, axis=0, out=out[start:stop])
            np.compress(mask, shard_labels, out=labels.numpy()[start:stop])
            np.compress(mask, shard_indices, out=indices[start:stop])
        start = stop
    return FeatureSet(
        tokens=tokens,
        labels=labels,
        indices=indices,
        layer_names=list(provenance["layer_names"]),
        token_names=list(provenance["token_names"]),
        metadata=provenance,
    )
