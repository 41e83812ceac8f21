"""Feature cache: uncompressed Arrow IPC shards (one record batch each), a manifest written last, and a reader.

Layout of a cache directory:
    shard-00000.arrow ...  columns index int64, label int64, split string, tokens fixed_size_list<f16|f32>[L*T*D];
                           schema metadata holds the provenance JSON and the [L, T, D] shape
    patches-00000.arrow .. only with extract.final_patch_tokens: the same rows' final-layer patch tokens, columns
                           index int64, patches fixed_size_list<f16|f32>[P*D_final]; shape [P, D_final] (the final
                           layer's true width, unpadded). Separate files, so a probe that does not read them never
                           touches them.
    manifest.json          completion marker: provenance, shard files (and their patch files) with rows and sha256,
                           content_hash, and `files` (each file's size and sha256), against which every read vouches
                           for the files it opens (`fingerprint.vouch`: a stat when unchanged, else a re-hash)

Uncompressed single-batch IPC memory-maps and converts to numpy without a copy (0.005 s to open 0.8 GB, measured in
the design notes); Parquet and compressed IPC decode and copy. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from layerprobe.config import FORMATS, MANIFEST_FILE
from layerprobe.files import canonical_json, read_json, replace_durably, sha256_file, tmp_path, write_json
from layerprobe.fingerprint import listed_files, vouch
from layerprobe.registry import unknown_name_error

FORMAT = FORMATS["features"]
PROVENANCE_KEY = b"layerprobe.provenance"
SHAPE_KEY = b"layerprobe.shape"
DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}


@dataclass
class FeatureSet:
    """Cached per-layer tokens of a set of images (and the final layer's patch tokens when asked for)."""

    tokens: torch.Tensor  # [N, L, T, D] in the cache dtype
    labels: torch.Tensor  # [N] int64
    indices: np.ndarray  # [N] dataset indices
    layer_names: list[str]
    token_names: list[str]
    metadata: dict  # manifest provenance
    patches: torch.Tensor | None = None  # [N, P, D_final] in the cache dtype; None unless read_features(patches=True)


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.arrow"


def patch_shard_name(shard_file: str) -> str:
    """The patch-token file that goes with token shard `shard_file` (same number, same rows)."""
    if not shard_file.startswith("shard-"):
        raise ValueError(f"{shard_file!r} is not a token shard name (shard-<n>.arrow)")
    return "patches-" + shard_file.removeprefix("shard-")


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
    label_values = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if not values.shape[0] == len(label_values) == len(indices) == len(splits):
        raise ValueError(
            f"shard {path}: {values.shape[0]} token rows but {len(label_values)} labels, {len(indices)} indices, "
            f"{len(splits)} splits"
        )
    columns = {
        "index": pa.array(np.asarray(indices, dtype=np.int64)),
        "label": pa.array(label_values.astype(np.int64)),
        "split": pa.array([str(s) for s in splits], type=pa.string()),
    }
    return _write_batch(path, columns, "tokens", values, metadata)


def write_patch_shard(path: Path, *, patches: np.ndarray | torch.Tensor, indices: np.ndarray, metadata: dict) -> str:
    """Write one shard of final-layer patch tokens `[n, P, D_final]` atomically and return its sha256.

    Its rows are those of the token shard of the same number (`patch_shard_name`); `index` repeats their dataset
    indices so a reader can check that the two files belong together.
    """
    path = Path(path)
    values = patches.numpy() if isinstance(patches, torch.Tensor) else np.asarray(patches)
    if values.ndim != 3:
        raise ValueError(f"patch tokens for {path} must be [n, P, D], got shape {values.shape}")
    if values.shape[0] != len(indices):
        raise ValueError(f"patch shard {path}: {values.shape[0]} rows but {len(indices)} indices")
    return _write_batch(path, {"index": pa.array(np.asarray(indices, dtype=np.int64))}, "patches", values, metadata)


def _write_batch(path: Path, columns: dict, name: str, values: np.ndarray, metadata: dict) -> str:
    """`columns` plus `values` flattened per row as column `name`, one record batch, temp name then rename."""
    dtype_name = str(values.dtype)
    if dtype_name not in DTYPES:
        raise ValueError(f"{name} for {path} must be float16 or float32, got {dtype_name}")
    width = int(np.prod(values.shape[1:]))
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=DTYPES[dtype_name][1])
    batch = pa.record_batch({**columns, name: pa.FixedSizeListArray.from_arrays(flat, width)})
    schema = batch.schema.with_metadata(
        {PROVENANCE_KEY: canonical_json(metadata), SHAPE_KEY: json.dumps(list(values.shape[1:]))}
    )
    tmp = tmp_path(path)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(batch)
    replace_durably(tmp, path)
    return sha256_file(path)


def open_shard(path: Path) -> tuple[pa.RecordBatch, dict, list[int]]:
    """Memory-map a shard (tokens or patches): its single record batch, provenance and per-row shape ([L, T, D] or
    [P, D_final]); no data is read yet."""
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


MANIFEST_KEYS = ("format", "provenance", "shards", "splits", "num_images", "dtype")  # what readers index


def read_manifest(cache_dir: Path) -> dict:
    """The manifest of a complete cache; a directory without one is an incomplete (or foreign) cache."""
    path = Path(cache_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"feature cache {cache_dir} is incomplete or missing: no {MANIFEST_FILE} (run extract)")
    manifest = read_json(path)
    missing = [key for key in MANIFEST_KEYS if key not in manifest] if isinstance(manifest, dict) else ["format"]
    if missing:  # an edited or foreign file: one line naming it, not a KeyError wherever the key is first read
        raise ValueError(f"{path} has no {missing[0]!r}: it is not a whole manifest (re-run extract)")
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"feature cache {cache_dir} is in format {manifest.get('format')!r}, this code reads "
            f"{FORMAT!r}: re-run extract"
        )
    return manifest


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
    patch_shards: Sequence[tuple[str, str]] | None = None,
    recorded: dict | None = None,
) -> dict:
    """Write `manifest.json` atomically; call it last, after every shard is in place (its presence means complete).

    Args:
        cache_dir: The cache directory.
        provenance: JSON-able provenance; must hold `layer_names`, `token_names` and `dtype`.
        shards: (file name, rows, sha256) of every shard, in row order.
        splits: Split names present in the cache.
        plan_sha256: Hash of the planned rows, so a rerun can tell whether the cache covers what is asked.
        patch_shards: (file name, sha256) of each shard's final-layer patch-token file, in the same order; None when
            the cache holds no patch tokens.
        recorded: what made the cache (host, library builds, ...), kept for the record: not part of the content hash.
    """
    if patch_shards is not None and len(patch_shards) != len(shards):
        raise ValueError(f"{len(patch_shards)} patch-token files for {len(shards)} shards in {cache_dir}")
    entries = []
    for number, (file, rows, sha) in enumerate(shards):
        entry = {"file": file, "rows": int(rows), "sha256": sha, "bytes": (Path(cache_dir) / file).stat().st_size}
        if patch_shards is not None:
            patch_file, patch_sha = patch_shards[number]
            size = (Path(cache_dir) / patch_file).stat().st_size
            entry["patches"] = {"file": patch_file, "sha256": patch_sha, "bytes": size}
        entries.append(entry)
    listed = _listed_hashes(entries)
    manifest = {
        "format": FORMAT,
        "fingerprint": provenance.get("fingerprint"),  # what made the cache (layerprobe.fingerprint)
        "provenance": provenance,
        "num_images": int(sum(rows for _, rows, _ in shards)),
        "splits": list(splits),
        "dtype": provenance["dtype"],
        "plan_sha256": plan_sha256,
        "shards": entries,
        "content_hash": content_hash(provenance, [sha for _, sha in listed]),
        # every file of the cache with its size and sha256: each read and reuse vouches for them (`fingerprint.vouch`)
        "files": listed_files(cache_dir, [name for name, _ in listed], sha256=dict(listed)),
        "recorded": recorded,
    }
    write_json(Path(cache_dir) / MANIFEST_FILE, manifest)
    return manifest


def _listed_hashes(entries: Sequence[dict]) -> list[tuple[str, str]]:
    """(file, sha256) of every file in manifest order: the token shards, then their patch-token files (if any)."""
    return [(e["file"], e["sha256"]) for e in entries] + [
        (e["patches"]["file"], e["patches"]["sha256"]) for e in entries if "patches" in e
    ]


def cache_content_hash(cache_dir: Path) -> str:
    """The cache's content hash, from the sha256 of its files as they are now (each vouched for: a shard changed in
    place fails here, naming it) and its provenance."""
    manifest = read_manifest(cache_dir)
    names = [name for name, _ in _listed_hashes(manifest["shards"])]
    hashes = _vouched(Path(cache_dir), manifest, names)
    return content_hash(manifest["provenance"], [hashes[name] for name in names])


def _vouched(cache_dir: Path, manifest: dict, names: list[str]) -> dict[str, str]:
    """The sha256 of `names` (files of the cache), each vouched for against the manifest before it is read."""
    vouched = vouch(cache_dir / MANIFEST_FILE, manifest, names=names)
    if vouched.problems:
        raise ValueError(f"feature cache {cache_dir}: {vouched.first_problem()}; re-run extract")
    return vouched.hashes


def has_patch_tokens(provenance: dict) -> bool:
    """Whether a cache with this provenance holds the final layer's patch tokens (extract.final_patch_tokens)."""
    return bool(provenance.get("final_patch_tokens"))


def missing_patch_tokens_error(cache_dir: Path) -> ValueError:
    return ValueError(
        f"feature cache {cache_dir} holds no final-layer patch tokens, which this probe reads: "
        "set `extract.final_patch_tokens: true` in params and re-run extract"
    )


def read_features(
    cache_dir: Path, *, split: str | list[str] | None = None, patches: bool = False, max_rows: int | None = None
) -> FeatureSet:
    """Read a complete cache into one tensor, keeping rows of the requested split(s) in dataset-index order.

    `max_rows` keeps only the first rows (an example for a model signature without reading a whole split).

    Each shard is memory-mapped and its tokens viewed as numpy without a copy; rows are then copied exactly once into
    the preallocated output (np.compress with `out=`), so peak memory is the output plus page cache. The patch-token
    files are opened only with `patches=True` (they are P/(2L) times the size of the rest: 7.5x for ViT-B/16).
    """
    cache_dir = Path(cache_dir)
    wanted = None if split is None else ([split] if isinstance(split, str) else list(split))
    provenance, shards, shape, patch_shape = _open_cache(cache_dir, wanted, patches=patches)
    masks = []
    remaining = max_rows
    for _, batch, _ in shards:
        mask = None if wanted is None else _split_mask(batch, wanted)
        if remaining is not None:
            keep = np.ones(batch.num_rows, dtype=bool) if mask is None else mask
            mask = keep & (np.cumsum(keep) <= remaining)
            remaining -= int(mask.sum())
        masks.append(mask)
    total = sum(b.num_rows if m is None else int(m.sum()) for (_, b, _), m in zip(shards, masks, strict=True))
    dtype = _torch_dtype(provenance)
    tokens = torch.empty((total, *shape), dtype=dtype)  # [N, L, T, D]
    patch_tokens = torch.empty((total, *patch_shape), dtype=dtype) if patches else None  # [N, P, D_final]
    labels = torch.empty(total, dtype=torch.int64)
    indices = np.empty(total, dtype=np.int64)
    start = 0
    for (_, batch, patch_batch), mask in zip(shards, masks, strict=True):
        stop = start + (batch.num_rows if mask is None else int(mask.sum()))
        _take_rows(_rows_view(batch, "tokens"), mask, tokens.numpy().reshape(total, -1)[start:stop])
        _take_rows(batch.column("label").to_numpy(), mask, labels.numpy()[start:stop])
        _take_rows(batch.column("index").to_numpy(), mask, indices[start:stop])
        if patch_tokens is not None:
            _take_rows(_rows_view(patch_batch, "patches"), mask, patch_tokens.numpy().reshape(total, -1)[start:stop])
        start = stop
    return FeatureSet(
        tokens=tokens,
        labels=labels,
        indices=indices,
        layer_names=list(provenance["layer_names"]),
        token_names=list(provenance["token_names"]),
        metadata=provenance,
        patches=patch_tokens,
    )


@dataclass
class Selection:
    """What a probe reads from some splits of a cache, split after split (all rows of the first split, then ...)."""

    features: torch.Tensor  # [N, K, W] as `select` returned them
    labels: torch.Tensor  # [N] int64
    counts: dict[str, int]  # rows per split, in the order they are stored
    layer_names: list[str]
    token_names: list[str]
    metadata: dict  # manifest provenance

    def rows(self, split: str) -> slice:
        """The rows of `split`: `features[rows]` is a view, no copy."""
        names = list(self.counts)
        start = sum(self.counts[name] for name in names[: names.index(split)])
        return slice(start, start + self.counts[split])


def read_selection(
    cache_dir: Path,
    *,
    splits: Sequence[str],
    select: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    patches: bool = False,
) -> Selection:
    """Read only what a probe selects from the given splits, one shard at a time.

    Each shard's rows of a split are copied out of the memory map (`[n, L, T, D]` tokens and, with `patches`,
    `[n, P, D_final]` patch tokens), passed through `select` (returning `[n, K, W]`) and written into the
    preallocated output. Peak memory is the selection plus one shard, never the whole cache: the patch tokens of a
    large split need not fit in memory beside their selection. Rows are grouped by split in the order of `splits`
    (dataset-index order within a split), so each split is a contiguous view and all of them one tensor.
    """
    cache_dir = Path(cache_dir)
    provenance, shards, shape, patch_shape = _open_cache(cache_dir, list(splits), patches=patches)
    masks = {name: [_split_mask(batch, [name]) for _, batch, _ in shards] for name in splits}
    counts = {name: int(sum(mask.sum() for mask in masks[name])) for name in splits}
    total = sum(counts.values())
    features = labels = None
    start = 0
    for name in splits:
        for (_, batch, patch_batch), mask in zip(shards, masks[name], strict=True):
            count = int(mask.sum())
            if count == 0:
                continue
            tokens = torch.from_numpy(np.compress(mask, _rows_view(batch, "tokens"), axis=0)).view(count, *shape)
            chunk_patches = None
            if patch_batch is not None:
                chunk_patches = torch.from_numpy(np.compress(mask, _rows_view(patch_batch, "patches"), axis=0))
                chunk_patches = chunk_patches.view(count, *patch_shape)
            selected = select(tokens, chunk_patches)
            if features is None:  # the selection's shape is known from the first chunk
                _check_host_memory(cache_dir, total * selected[0].numel() * selected.element_size())
                features = selected.new_empty((total, *selected.shape[1:]))
                labels = torch.empty(total, dtype=torch.int64)
            features[start : start + count] = selected
            np.compress(mask, batch.column("label").to_numpy(), out=labels.numpy()[start : start + count])
            start += count
    if features is None:
        raise ValueError(f"feature cache {cache_dir} has no rows in splits {list(splits)}")
    return Selection(
        features=features,
        labels=labels,
        counts=counts,
        layer_names=list(provenance["layer_names"]),
        token_names=list(provenance["token_names"]),
        metadata=provenance,
    )


def available_host_memory() -> int | None:
    """Bytes the kernel says a new allocation can get without swapping (MemAvailable), None where it does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_host_memory(cache_dir: Path, needed: int) -> None:
    """Fail with one line, before allocating, when a selection cannot fit in memory: the kernel would otherwise kill
    the process mid-task (the all-tokens probe on ImageNet-1k selects hundreds of GB)."""
    available = available_host_memory()
    if available is not None and needed > available:
        raise MemoryError(
            f"the probe's tokens from {cache_dir} need {needed / 1e9:.1f} GB of host memory, {available / 1e9:.1f} GB "
            "is available: use a machine with more memory or leave this probe out for this dataset"
        )


def num_patch_tokens(cache_dir: Path) -> int:
    """P, the final-layer patch tokens per image a cache holds (from a shard's header); fails when it holds none."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    if not has_patch_tokens(manifest["provenance"]) or not manifest["shards"]:
        raise missing_patch_tokens_error(cache_dir)
    first = manifest["shards"][0]["patches"]["file"]
    _vouched(cache_dir, manifest, [first])
    _, _, patch_shape = open_shard(cache_dir / first)
    return int(patch_shape[0])


def _open_cache(
    cache_dir: Path, wanted: list[str] | None, *, patches: bool
) -> tuple[dict, list[tuple[dict, pa.RecordBatch, pa.RecordBatch | None]], list[int], list[int]]:
    """Open every shard (and, with `patches`, its patch-token file) of a complete cache once, checking the request.

    Returns the provenance, (manifest entry, token batch, patch batch or None) per shard, and the per-row shapes
    [L, T, D] and [P, D_final] (empty when not read).
    """
    manifest = read_manifest(cache_dir)
    provenance = manifest["provenance"]
    for name in wanted or []:
        if name not in manifest["splits"]:
            raise unknown_name_error(f"split of feature cache {cache_dir}", name, manifest["splits"])
    if patches and not has_patch_tokens(provenance):
        raise missing_patch_tokens_error(cache_dir)
    read = []  # every file about to be read, vouched for first (the patch-token files only when they are read)
    for entry in manifest["shards"]:
        read.append(entry["file"])
        if patches:
            if "patches" not in entry:
                raise ValueError(
                    f"feature cache {cache_dir}: the manifest lists no patch tokens for {entry['file']}; re-run extract"
                )
            read.append(entry["patches"]["file"])
    _vouched(cache_dir, manifest, read)
    shards = []
    shape, patch_shape = [0, 0, 0], [0, 0]
    for entry in manifest["shards"]:
        batch, _, shape = open_shard(cache_dir / entry["file"])
        patch_batch = None
        if patches:
            patch_batch, _, patch_shape = open_shard(cache_dir / entry["patches"]["file"])
            if not np.array_equal(patch_batch.column("index").to_numpy(), batch.column("index").to_numpy()):
                raise ValueError(
                    f"feature cache {cache_dir}: {entry['patches']['file']} does not hold the rows of "
                    f"{entry['file']}; re-run extract"
                )
        shards.append((entry, batch, patch_batch))
    return provenance, shards, shape, patch_shape


def _split_mask(batch: pa.RecordBatch, wanted: list[str]) -> np.ndarray:
    return pc.is_in(batch.column("split"), value_set=pa.array(wanted)).to_numpy(zero_copy_only=False)


def _torch_dtype(provenance: dict) -> torch.dtype:
    return torch.float16 if provenance["dtype"] == "float16" else torch.float32


def _rows_view(batch: pa.RecordBatch, column: str) -> np.ndarray:
    """A fixed-size-list column as a [rows, width] numpy view of the memory map (no copy)."""
    return batch.column(column).flatten().to_numpy(zero_copy_only=True).reshape(batch.num_rows, -1)


def _take_rows(values: np.ndarray, mask: np.ndarray | None, out: np.ndarray) -> None:
    """Copy `values` (all rows, or those where `mask`) into `out` in one pass."""
    if mask is None:
        out[...] = values
    else:
        np.compress(mask, values, axis=0, out=out)
