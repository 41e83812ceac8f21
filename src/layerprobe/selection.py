"""What a probe reads from a feature cache, in memory when it fits, else read batch by batch from the shards.

Training and evaluation read a probe's selection `[N, K, W]` from some splits of a cache. When the selection and one
batch's working set fit in the memory budget, it is read once, shard by shard, into one tensor
(`features.read_selection`). When they do not (the all-tokens probe on ImageNet-1k x ViT-B/16 selects 385 GB), it
stays on disk: a `StreamedSelection` knows where each of its rows lies in the shard files and reads the rows a batch
asks for when it asks, then selects from them. Either way a batch holds the same values, so a probe trained
streamed is the probe trained in memory (same seed, same shuffles, same batches). Only a selection whose single
batch does not fit is refused, in one line.

Rows are read with positional reads (`os.preadv`) of the memory-mapped shards' files at the offsets the memory map
gives, not through the map itself: pages of a map count as this process's resident memory while it is mapped, so
an epoch of random batches would grow it to the whole cache, whereas reads go through the page cache, which the
kernel reclaims as it needs.

The budget is the memory the kernel says is available (MemAvailable), capped by the environment variable
LAYERPROBE_MEMORY_BUDGET when it is set (bytes, or a number with a unit: 512MB, 8GB, 1.5GiB).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from layerprobe import features as cache

MEMORY_BUDGET_ENV = "LAYERPROBE_MEMORY_BUDGET"
PREDICT_ROWS = 4096  # `train.predict_selected`'s batch: the validation pass reads this many rows at once
# Bytes per selected value while a batch is in use: the cache's copy, its float32 copy, the normalised tokens and the
# jittered ones (train.train_selected; predict_selected holds one float32 copy fewer).
WORKING_BYTES_PER_VALUE = 14
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_bytes(text: str) -> int:
    """ "8GB" -> 8e9, "1.5GiB", "512MB", "1073741824"; a ValueError naming the value otherwise."""
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(
            f"{MEMORY_BUDGET_ENV}={text!r} is not a size: give bytes or a number with a unit (512MB, 8GB, 1.5GiB)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def memory_budget() -> int | None:
    """Bytes a selection may take: MemAvailable, capped by LAYERPROBE_MEMORY_BUDGET; None when neither is known."""
    available = cache.available_host_memory()
    cap = os.environ.get(MEMORY_BUDGET_ENV)
    if not cap:
        return available
    return parse_bytes(cap) if available is None else min(available, parse_bytes(cap))


@dataclass(frozen=True)
class _File:
    """Where a shard file's rows lie: row r's values are `row_bytes` bytes from `offset + r * row_bytes`."""

    path: Path
    offset: int
    row_bytes: int


def _locate_rows(path: Path, column: str) -> _File:
    """Where the rows of `column` (a fixed-size-list column of a one-batch shard) lie in the file."""
    source = pa.memory_map(str(path), "r")
    base = source.read_buffer(1).address  # the map's first byte
    source.seek(0)
    array = pa.ipc.open_file(source).get_batch(0).column(column)
    values = array.flatten()
    width = values.type.bit_width // 8
    offset = values.buffers()[1].address + values.offset * width - base
    return _File(path=path, offset=offset, row_bytes=array.type.list_size * width)


class StreamedSelection:
    """A selection `[N, K, W]` left in its cache: rows are read from the shard files when `read` asks for them.

    Slicing (`selection[a:b]`) gives a view of a range of rows, as a tensor slice would (the sweep's training and
    validation splits); `read(rows)` returns those rows as a tensor, in the order asked.
    """

    def __init__(
        self,
        *,
        token_files: Sequence[_File],
        patch_files: Sequence[_File] | None,
        shards: np.ndarray,
        rows: np.ndarray,
        select: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
        token_shape: Sequence[int],
        patch_shape: Sequence[int],
        cache_dtype: torch.dtype,
        selected_shape: Sequence[int],
        dtype: torch.dtype,
    ) -> None:
        self._token_files, self._patch_files = list(token_files), None if patch_files is None else list(patch_files)
        self._shards, self._rows = shards, rows  # [N]: each row's shard and its row within the shard
        self._select = select
        self._token_shape, self._patch_shape, self._cache_dtype = list(token_shape), list(patch_shape), cache_dtype
        self._selected_shape = tuple(selected_shape)
        self.dtype = dtype
        self.device = torch.device("cpu")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self._rows), *self._selected_shape))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * torch.empty((), dtype=self.dtype).element_size()

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, rows: slice) -> StreamedSelection:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("a streamed selection is sliced by ranges of rows (selection[a:b]); read rows with .read")
        view = object.__new__(StreamedSelection)
        view.__dict__.update(self.__dict__)
        view._shards, view._rows = self._shards[rows], self._rows[rows]
        return view

    def read(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """Rows `[n, K, W]` in the order of `rows` (positions in this selection, a tensor or a range)."""
        positions = np.arange(len(self))[rows] if isinstance(rows, slice) else rows.cpu().numpy()
        out = torch.empty((len(positions), *self._selected_shape), dtype=self.dtype)
        if not len(positions):
            return out
        shards, local = self._shards[positions], self._rows[positions]
        order = np.lexsort((local, shards))  # shard by shard, each in file order: runs of rows become one read
        starts = np.flatnonzero(np.diff(shards[order], prepend=-1))
        for first, stop in zip(starts, [*starts[1:], len(order)], strict=True):
            where = order[first:stop]
            shard, wanted = int(shards[where[0]]), local[where]
            tokens = self._read(self._token_files[shard], wanted).view(len(wanted), *self._token_shape)
            patches = None
            if self._patch_files is not None:
                patches = self._read(self._patch_files[shard], wanted).view(len(wanted), *self._patch_shape)
            out[torch.from_numpy(where)] = self._select(tokens, patches)
        return out

    def _read(self, file: _File, rows: np.ndarray) -> torch.Tensor:
        """Rows `rows` (sorted) of one shard file as `[n, row values]` in the cache dtype; one read per run of rows."""
        buffer = np.empty((len(rows), file.row_bytes), dtype=np.uint8)
        run_starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 2) != 1)
        descriptor = os.open(file.path, os.O_RDONLY)
        try:
            for first, stop in zip(run_starts, [*run_starts[1:], len(rows)], strict=True):
                target = memoryview(buffer[first:stop]).cast("B")
                offset = file.offset + int(rows[first]) * file.row_bytes
                while len(target):  # a regular file reads in full unless it ends early (truncated since listing)
                    count = os.preadv(descriptor, [target], offset)
                    if count == 0:
                        raise ValueError(f"feature shard {file.path} ended early: re-run extract")
                    target, offset = target[count:], offset + count
        finally:
            os.close(descriptor)
        return torch.from_numpy(buffer).view(self._cache_dtype)


def working_bytes(batch_rows: int, *, row_values: int, cache_row_bytes: int) -> int:
    """Memory one batch of `batch_rows` rows needs while in use: its cache rows and the copies made of its selection."""
    return batch_rows * (cache_row_bytes + row_values * WORKING_BYTES_PER_VALUE)


def open_selection(
    cache_dir: Path,
    *,
    splits: Sequence[str],
    select: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    patches: bool = False,
    batch_rows: int | Callable[[dict[str, int]], int] = PREDICT_ROWS,
    stream: bool | None = None,
) -> cache.Selection:
    """A probe's selection from `splits` of a cache (as `features.read_selection`), in memory when it and one batch
    fit in `memory_budget()`, else a `StreamedSelection` of the same rows in the same order.

    `batch_rows` is the most rows its reader asks for at once, or a function of the rows per split that gives it.
    Raises a one-line MemoryError when even one batch does not fit. `stream` True or False decides instead of the
    budget.
    """
    cache_dir = Path(cache_dir)
    provenance, shards, shape, patch_shape = cache._open_cache(cache_dir, list(splits), patches=patches)
    masks = {name: [cache._split_mask(batch, [name]) for _, batch, _ in shards] for name in splits}
    counts = {name: int(sum(mask.sum() for mask in masks[name])) for name in splits}
    total = sum(counts.values())
    first = next(((b, p, int(np.argmax(m))) for (_, b, p), m in zip(shards, _any(masks), strict=True) if m.any()), None)
    if first is None:
        raise ValueError(f"feature cache {cache_dir} has no rows in splits {list(splits)}")
    cache_dtype = cache._torch_dtype(provenance)
    selected = select(*_sample_rows(first, shape, patch_shape))  # [1, K, W]: the selection's shape
    row_values = selected[0].numel()
    cache_row_values = int(np.prod(shape)) + (int(np.prod(patch_shape)) if patches else 0)
    cache_row_bytes = cache_row_values * torch.empty((), dtype=cache_dtype).element_size()
    needed = total * row_values * selected.element_size()
    batch_rows = batch_rows(counts) if callable(batch_rows) else batch_rows
    working = working_bytes(batch_rows, row_values=row_values, cache_row_bytes=cache_row_bytes)
    budget = memory_budget()
    if stream is False or (stream is None and (budget is None or needed + working <= budget)):
        return cache.read_selection(cache_dir, splits=splits, select=select, patches=patches)
    if budget is not None and working > budget:
        raise MemoryError(
            f"the probe's tokens from {cache_dir} need {working / 1e9:.1f} GB for one batch of {batch_rows} rows even "
            f"read batch by batch, {budget / 1e9:.1f} GB is available: lower the batch size or use a machine with "
            "more memory"
        )
    shard_numbers, local_rows, labels = [], [], []
    for name in splits:
        for number, ((_, batch, _), mask) in enumerate(zip(shards, masks[name], strict=True)):
            rows = np.flatnonzero(mask)
            shard_numbers.append(np.full(len(rows), number, dtype=np.int32))
            local_rows.append(rows)
            labels.append(batch.column("label").to_numpy()[rows])
    entries = [entry for entry, _, _ in shards]
    del shards, first  # the memory maps: what is kept is where the rows lie
    streamed = StreamedSelection(
        token_files=[_locate_rows(cache_dir / e["file"], "tokens") for e in entries],
        patch_files=[_locate_rows(cache_dir / e["patches"]["file"], "patches") for e in entries] if patches else None,
        shards=np.concatenate(shard_numbers),
        rows=np.concatenate(local_rows),
        select=select,
        token_shape=shape,
        patch_shape=patch_shape,
        cache_dtype=cache_dtype,
        selected_shape=selected.shape[1:],
        dtype=selected.dtype,
    )
    return cache.Selection(
        features=streamed,
        labels=torch.from_numpy(np.concatenate(labels).astype(np.int64)),
        counts=counts,
        layer_names=list(provenance["layer_names"]),
        token_names=list(provenance["token_names"]),
        metadata=provenance,
    )


def _any(masks: dict[str, list[np.ndarray]]) -> list[np.ndarray]:
    """Per shard, the rows of any of the splits."""
    return [np.logical_or.reduce(per_split) for per_split in zip(*masks.values(), strict=True)]


def _sample_rows(first: tuple, shape: Sequence[int], patch_shape: Sequence[int]) -> tuple:
    """One row of the cache (and its patch tokens) as `select` takes them."""
    batch, patch_batch, row = first
    tokens = torch.from_numpy(cache._rows_view(batch, "tokens")[row : row + 1].copy()).view(1, *shape)
    if patch_batch is None:
        return tokens, None
    patches = torch.from_numpy(cache._rows_view(patch_batch, "patches")[row : row + 1].copy())
    return tokens, patches.view(1, *patch_shape)
