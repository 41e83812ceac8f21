"""Feature cache format: atomic shards, manifest, split-filtered reads, content hashes."""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import pyarrow as pa
import pytest
import torch

from layerprobe.features import (
    cache_content_hash,
    open_shard,
    read_features,
    read_manifest,
    read_selection,
    write_manifest,
    write_shard,
)
from layerprobe.files import write_json

SHAPE = (3, 2, 5)  # L, T, D


def _provenance(dtype: str) -> dict:
    return {
        "backbone": "tiny",
        "layer_names": ["block0", "block1", "final"],
        "token_names": ["cls", "ap"],
        "dtype": dtype,
    }


def _write_cache(cache_dir, *, dtype="float16", shard_rows=(4, 3)):
    """Two shards of random tokens; rows in dataset-index order with interleaved splits. Returns the full arrays."""
    rng = np.random.default_rng(0)
    total = sum(shard_rows)
    tokens = rng.standard_normal((total, *SHAPE)).astype(dtype)
    indices = np.arange(total, dtype=np.int64) * 3 + 1
    labels = rng.integers(0, 4, total)
    splits = np.array(["train", "test", "val", "train", "test", "train", "val"][:total])
    entries, start = [], 0
    cache_dir.mkdir(parents=True, exist_ok=True)
    for number, rows in enumerate(shard_rows):
        stop = start + rows
        name = f"shard-{number:05d}.arrow"
        sha = write_shard(
            cache_dir / name,
            tokens=tokens[start:stop],
            labels=labels[start:stop],
            indices=indices[start:stop],
            splits=splits[start:stop],
            metadata=_provenance(dtype),
        )
        entries.append((name, rows, sha))
        start = stop
    write_manifest(
        cache_dir, provenance=_provenance(dtype), shards=entries, splits=["train", "val", "test"], plan_sha256="x"
    )
    return tokens, labels, indices, splits


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_read_features_returns_every_row_in_order(tmp_path, dtype):
    tokens, labels, indices, _ = _write_cache(tmp_path, dtype=dtype)
    features = read_features(tmp_path)
    assert features.tokens.shape == (7, *SHAPE)
    assert features.tokens.dtype == getattr(torch, dtype)
    assert np.array_equal(features.tokens.numpy(), tokens)
    assert features.labels.dtype == torch.int64 and np.array_equal(features.labels.numpy(), labels)
    assert np.array_equal(features.indices, indices)
    assert features.layer_names == ["block0", "block1", "final"] and features.token_names == ["cls", "ap"]
    assert features.metadata["backbone"] == "tiny"


@pytest.mark.parametrize("split", ["train", ["val", "test"]])
def test_read_features_keeps_only_the_requested_splits(tmp_path, split):
    tokens, labels, indices, splits = _write_cache(tmp_path)
    wanted = np.isin(splits, [split] if isinstance(split, str) else split)
    features = read_features(tmp_path, split=split)
    assert len(features.tokens) == wanted.sum()
    assert np.array_equal(features.tokens.numpy(), tokens[wanted])
    assert np.array_equal(features.labels.numpy(), labels[wanted])
    assert np.array_equal(features.indices, indices[wanted])
    assert np.all(np.diff(features.indices) > 0)


def test_unknown_split_is_named_with_a_suggestion(tmp_path):
    _write_cache(tmp_path)
    with pytest.raises(ValueError, match="'tests'.*Did you mean 'test'"):
        read_features(tmp_path, split="tests")


def test_incomplete_cache_error_names_the_directory(tmp_path):
    _write_cache(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_features(tmp_path)


def test_shard_is_one_uncompressed_record_batch_with_provenance(tmp_path):
    _write_cache(tmp_path)
    with pa.ipc.open_file(pa.memory_map(str(tmp_path / "shard-00000.arrow"))) as reader:
        assert reader.num_record_batches == 1
        assert reader.schema.field("tokens").type == pa.list_(pa.float16(), int(np.prod(SHAPE)))
        assert reader.schema.field("index").type == pa.int64()
    batch, provenance, shape = open_shard(tmp_path / "shard-00000.arrow")
    assert provenance == _provenance("float16") and shape == list(SHAPE) and batch.num_rows == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_content_hash_follows_the_shard_contents(tmp_path):
    _write_cache(tmp_path / "a")
    _write_cache(tmp_path / "b")
    assert cache_content_hash(tmp_path / "a") == cache_content_hash(tmp_path / "b")
    assert cache_content_hash(tmp_path / "a") == read_manifest(tmp_path / "a")["content_hash"]
    _write_cache(tmp_path / "c", shard_rows=(3, 4))  # same rows, cut differently: different shard files
    assert cache_content_hash(tmp_path / "c") != cache_content_hash(tmp_path / "a")


def test_a_shard_changed_in_place_is_neither_hashed_nor_read_as_the_manifest_recorded_it(tmp_path):
    _write_cache(tmp_path)
    recorded = cache_content_hash(tmp_path)
    shard = tmp_path / "shard-00001.arrow"
    before, original = shard.stat(), shard.read_bytes()
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0xFF  # one byte of the tokens, the size and modification time kept
    shard.write_bytes(bytes(changed))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    bad = "shard-00001.arrow changed in place: sha256 differs from manifest.json's; re-run extract"
    for read in (
        cache_content_hash,
        read_features,
        lambda cache: read_selection(cache, splits=["train"], select=lambda t, p: t[:, 0]),
    ):
        with pytest.raises(ValueError, match=re.escape(bad)):
            read(tmp_path)
    # A manifest whose files were re-certified by hand: the content hash is of the bytes there, not of its records.
    manifest = read_manifest(tmp_path)
    manifest["files"]["shard-00001.arrow"]["sha256"] = hashlib.sha256(changed).hexdigest()
    write_json(tmp_path / "manifest.json", manifest)
    assert cache_content_hash(tmp_path) != recorded
    shard.write_bytes(original)
    with pytest.raises(ValueError, match="shard-00001.arrow changed in place"):
        cache_content_hash(tmp_path)


def test_write_shard_rejects_mismatched_rows(tmp_path):
    with pytest.raises(ValueError, match="bad.arrow"):
        write_shard(
            tmp_path / "bad.arrow",
            tokens=np.zeros((2, *SHAPE), np.float16),
            labels=np.zeros(3),
            indices=np.arange(3),
            splits=["a", "a", "a"],
            metadata={},
        )
