"""Images → per-layer cls/ap tokens [N, L, T, D] at the chosen tap (and, as an option, the final layer's patch tokens
[N, P, D_final]), streamed into a resumable feature cache.

One forward pass per image; host memory holds at most one shard. The cache is written in a staging folder beside its
target and swapped in whole (`layerprobe.files.begin_output`); a rerun of a killed extraction keeps the shards it
finished there, recomputes the rest and writes `manifest.json` last (see `layerprobe.features`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from layerprobe.config import EXTRACT_PRECISIONS, MANIFEST_FILE, TAPS, TOKENS
from layerprobe.device import resolve_device
from layerprobe.features import (
    DTYPES,
    open_shard,
    patch_shard_name,
    shard_name,
    write_manifest,
    write_patch_shard,
    write_shard,
)
from layerprobe.files import begin_output, canonical_json, pause_point, read_json, sha256_file, stable_hash, swap_in
from layerprobe.fingerprint import vouch

_log = logging.getLogger(__name__)


def _model_name(model: torch.nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


class LayerTokenExtractor(torch.nn.Module):
    """Wraps a frozen timm ViT once and returns the cls and mean-patch (ap) token of every block and the final output.

    Args:
        model: timm VisionTransformer-like model with a class token and `blocks`.
        tap: `norm2` (the paper's: each block's `norm2` output, the normalised residual stream after attention) or
            `block` (each block's output, the residual stream, via `forward_intermediates`).
        final_projection: Apply the model's `head` Linear to the final tokens (OpenAI-CLIP ports, whose paper
            "final layer" is the projected image embedding); narrower widths are zero-padded to the common D.
        precision: `float32` (the reference's) or `bfloat16` (autocast: about 2x faster on recent GPUs); the pooled
            tokens are float32 either way.
        final_patch_tokens: Also return every patch token of the final layer (`forward_all`), the same tokens the
            final cls/ap are pooled from (projected for CLIP), at the final layer's own width (not padded).
        depth: Run blocks 0..depth-1 only (`layerprobe.truncation.probe_depth`: as deep as a probe reads) and return
            the first `depth` layers of the full layout, so a probe's slots stay valid; None or the number of blocks
            runs the whole backbone (the final layer needs every block and the final norm).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        tap: str = "norm2",
        final_projection: bool = False,
        precision: str = "float32",
        final_patch_tokens: bool = False,
        depth: int | None = None,
    ) -> None:
        super().__init__()
        name = _model_name(model)
        if tap not in TAPS:
            raise ValueError(f"unknown tap {tap!r}; choices: {', '.join(TAPS)}")
        if precision not in EXTRACT_PRECISIONS:
            raise ValueError(f"unknown extraction precision {precision!r}; choices: {', '.join(EXTRACT_PRECISIONS)}")
        blocks = getattr(model, "blocks", None)
        if blocks is None or len(blocks) == 0:
            raise ValueError(f"model {name!r} has no transformer blocks to read layers from")
        if getattr(model, "cls_token", None) is None:
            raise ValueError(f"model {name!r} has no class token; the cls/ap extraction needs one")
        if tap == "norm2" and not all(isinstance(getattr(b, "norm2", None), torch.nn.Module) for b in blocks):
            raise ValueError(f"model {name!r} has blocks without `norm2`; use tap='block'")
        self.num_blocks = len(blocks)
        self.depth = self.num_blocks if depth is None else int(depth)
        if not 1 <= self.depth <= self.num_blocks:
            raise ValueError(f"depth {depth} is outside 1..{self.num_blocks}, the blocks of model {name!r}")
        if self.depth < self.num_blocks and not hasattr(model, "forward_intermediates"):
            raise ValueError(f"model {name!r} has no forward_intermediates to stop after block {self.depth - 1}")
        if self.depth < self.num_blocks and final_patch_tokens:
            raise ValueError("final_patch_tokens are the final layer's: they need the whole backbone (depth None)")
        self.model = model.eval()
        self.tap = tap
        self.final_projection = final_projection
        self.precision = precision
        self.final_patch_tokens = final_patch_tokens
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        width = int(model.embed_dim)
        final_width = width
        if final_projection:
            head = getattr(model, "head", None)
            if not isinstance(head, torch.nn.Linear):
                raise ValueError(f"model {name!r} has no Linear `head` to project the final tokens with")
            if not isinstance(getattr(model, "fc_norm", torch.nn.Identity()), torch.nn.Identity):
                raise ValueError(f"model {name!r} normalises after pooling (fc_norm); final_projection expects CLIP")
            final_width = head.out_features
        self.layer_names = [f"block{i}" for i in range(len(blocks))] + ["final"]
        self.token_names = list(TOKENS)
        self.layer_widths = [width] * len(blocks) + [final_width]
        self.dim = max(self.layer_widths)  # the full layout's width, at every depth
        if self.depth < self.num_blocks:  # the first `depth` layers of the full layout
            self.layer_names, self.layer_widths = self.layer_names[: self.depth], self.layer_widths[: self.depth]
        # [rows, cols] of the patch grid, for the patch-attention heatmap; None when the model does not fix it.
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        self.patch_grid = None if grid is None or getattr(model, "dynamic_img_size", False) else [int(g) for g in grid]
        self._pooled: list[torch.Tensor] | None = None  # a list only during this extractor's own forward
        if tap == "norm2":
            # Registered once; pooling inside the hook keeps [B, 2, D] per block instead of every token sequence.
            for block in blocks:
                block.norm2.register_forward_hook(self._capture)

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, prefix + patches, D] → [B, 2, D] float32: class token and mean of the patch tokens (prefix excluded)."""
        cls = tokens[:, 0].float()
        ap = tokens[:, self.num_prefix_tokens :].mean(dim=1, dtype=torch.float32)
        return torch.stack([cls, ap], dim=1)

    def _capture(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self._pooled is not None:  # another extractor's forward of the same model is not this one's
            self._pooled.append(self._pool(output))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] → tokens [B, L, 2, D] float32 (L = blocks + final)."""
        return self.forward_all(images)[0]

    def forward_all(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images [B, 3, H, W] → (tokens [B, L, 2, D], final patch tokens [B, P, D_final] or None), float32; L is
        `depth` layers for a truncated extractor.

        The patch tokens come only with `final_patch_tokens`; prefix tokens (class, registers) are not among them.
        """
        self.model.eval()
        autocast = (
            torch.autocast(images.device.type, dtype=torch.bfloat16)
            if self.precision == "bfloat16"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            if self.depth < self.num_blocks:
                return self._forward_truncated(images), None
            if self.tap == "norm2":
                self._pooled = []
                try:
                    final = self.model.forward_features(images)
                    per_block = self._pooled
                finally:
                    self._pooled = None
            else:
                final, intermediates = self.model.forward_intermediates(
                    images,
                    indices=list(range(len(self.model.blocks))),
                    return_prefix_tokens=True,
                    output_fmt="NLC",
                    norm=False,
                )
                per_block = [
                    torch.stack([prefix[:, 0].float(), patches.mean(dim=1, dtype=torch.float32)], dim=1)
                    for patches, prefix in intermediates
                ]
            if len(per_block) != len(self.layer_names) - 1:
                raise RuntimeError(f"expected {len(self.layer_names) - 1} block outputs, captured {len(per_block)}")
            last = self._pool(final)
            patches = final[:, self.num_prefix_tokens :] if self.final_patch_tokens else None
            if self.final_projection:
                # The head is linear, so projecting the mean patch token equals the mean of projected patch tokens.
                head = self.model.head
                last = head(last.to(head.weight.dtype)).float()
                patches = None if patches is None else head(patches.to(head.weight.dtype))
            out = images.new_zeros((images.shape[0], len(self.layer_names), 2, self.dim), dtype=torch.float32)
            for i, pooled in enumerate(per_block):
                out[:, i, :, : pooled.shape[-1]] = pooled
            out[:, -1, :, : last.shape[-1]] = last
        return out, None if patches is None else patches.float()

    def _forward_truncated(self, images: torch.Tensor) -> torch.Tensor:
        """Blocks 0..depth-1 only (timm's `forward_intermediates` with `stop_early`): tokens [B, depth, 2, D]."""
        self._pooled = [] if self.tap == "norm2" else None
        try:
            intermediates = self.model.forward_intermediates(
                images,
                indices=list(range(self.depth)),
                return_prefix_tokens=True,
                output_fmt="NLC",
                norm=False,
                stop_early=True,
                intermediates_only=True,
            )
            per_block = self._pooled
        finally:
            self._pooled = None
        if per_block is None:
            per_block = [
                torch.stack([prefix[:, 0].float(), patches.mean(dim=1, dtype=torch.float32)], dim=1)
                for patches, prefix in intermediates
            ]
        if len(per_block) != self.depth:
            raise RuntimeError(f"expected {self.depth} block outputs, captured {len(per_block)}")
        out = images.new_zeros((images.shape[0], self.depth, 2, self.dim), dtype=torch.float32)
        for i, pooled in enumerate(per_block):
            out[:, i, :, : pooled.shape[-1]] = pooled
        return out


class ImageSource(Protocol):
    labels: np.ndarray

    def __len__(self) -> int: ...

    def load_image(self, index: int) -> Image.Image: ...


@dataclass
class ShardPlan:
    """The rows one shard file holds, in dataset-index order."""

    file: str
    indices: np.ndarray  # [n] int64
    labels: np.ndarray  # [n] int64
    splits: np.ndarray  # [n] split names


class _TransformedImages(torch.utils.data.Dataset):
    def __init__(self, images: ImageSource, indices: np.ndarray, transform: Callable) -> None:
        self.images, self.indices, self.transform = images, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> torch.Tensor:
        index = int(self.indices[position])
        image = self.images.load_image(index)  # the source's own error names the file
        try:
            return self.transform(image)
        except Exception as e:
            raise ValueError(f"image {index} could not be transformed: {e}") from e


def _forward_with_retry(
    extractor: LayerTokenExtractor, images: torch.Tensor, state: dict
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the extractor in chunks of state['batch_size'], halving it (for the rest of the run) on out-of-memory."""
    while True:
        size = state["batch_size"]
        try:
            chunks = [extractor.forward_all(images[i : i + size]) for i in range(0, len(images), size)]
            tokens = torch.cat([t for t, _ in chunks])
            return tokens, None if chunks[0][1] is None else torch.cat([p for _, p in chunks])
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            state["batch_size"] = size // 2
            _log.warning("out of memory at batch size %d; retrying with %d", size, size // 2)
            if images.is_cuda:
                torch.cuda.empty_cache()


def write_token_shards(
    batches: Iterable[torch.Tensor],
    *,
    extractor: LayerTokenExtractor,
    shards: Sequence[ShardPlan],
    out_dir: Path,
    metadata: dict,
    dtype: str = "float16",
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, str]:
    """The tensor-batch loop: forward, host copy into one reused shard buffer, atomic shard writes.

    `batches` yields transformed images for the rows of `shards`, in order. Returns file name → sha256 (with
    `extractor.final_patch_tokens`, each shard's patch-token file too, written together with its token shard).
    Host memory holds one shard buffer (rows × L·2·D in the cache dtype, plus rows × P·D_final for patch tokens)
    whatever the dataset size.
    """
    device = torch.device(device)
    np_dtype = DTYPES[dtype][0]
    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    row_shape = (len(extractor.layer_names), len(extractor.token_names), extractor.dim)
    max_rows = max((len(s.indices) for s in shards), default=0)
    buffer = np.empty((max_rows, *row_shape), dtype=np_dtype)
    patch_buffer = None  # allocated at the first batch, when the number of patches is known
    hashes: dict[str, str] = {}
    state = {"batch_size": batch_size}
    shard_iter = iter(shards)
    current = next(shard_iter, None)
    filled = 0
    total = sum(len(s.indices) for s in shards)
    with tqdm(total=total, unit="img", disable=not progress, desc="extract") as bar:
        for images in batches:
            images = images.to(device, non_blocking=True)
            tokens, patches = _forward_with_retry(extractor, images, state)
            tokens = tokens.to(torch_dtype).cpu().numpy()  # [b, L, T, D]
            if patches is not None:
                patches = patches.to(torch_dtype).cpu().numpy()  # [b, P, D_final]
                if patch_buffer is None:
                    patch_buffer = np.empty((max_rows, *patches.shape[1:]), dtype=np_dtype)
            taken = 0
            while taken < len(tokens):
                if current is None:
                    raise RuntimeError(f"more images than the {total} planned rows")
                count = min(len(tokens) - taken, len(current.indices) - filled)
                buffer[filled : filled + count] = tokens[taken : taken + count]
                if patches is not None:
                    patch_buffer[filled : filled + count] = patches[taken : taken + count]
                filled += count
                taken += count
                if filled == len(current.indices):
                    if patches is not None:
                        patch_file = patch_shard_name(current.file)
                        hashes[patch_file] = write_patch_shard(
                            Path(out_dir) / patch_file,
                            patches=patch_buffer[:filled],
                            indices=current.indices,
                            metadata=metadata,
                        )
                    hashes[current.file] = write_shard(
                        Path(out_dir) / current.file,
                        tokens=buffer[:filled],
                        labels=current.labels,
                        indices=current.indices,
                        splits=current.splits,
                        metadata=metadata,
                    )
                    current, filled = next(shard_iter, None), 0
                    pause_point(f"extract-shard-{len(hashes) // (2 if patches is not None else 1)}")
            bar.update(len(tokens))
    if current is not None:
        raise RuntimeError(f"image batches ended before shard {current.file} was complete")
    return hashes


def plan_shards(
    images: ImageSource, splits: dict[str, np.ndarray], shard_size: int
) -> tuple[list[ShardPlan], list[str]]:
    """Every index listed in `splits`, sorted, tagged with its split and cut into shards of `shard_size` rows."""
    if not splits:
        raise ValueError("splits is empty: nothing to extract")
    names, parts = [], []
    for name, members in splits.items():
        members = np.asarray(members, dtype=np.int64)
        parts.append(members)
        names.append(np.full(len(members), name, dtype=object))
    indices, split_of = np.concatenate(parts), np.concatenate(names)
    order = np.argsort(indices, kind="stable")
    indices, split_of = indices[order], split_of[order]
    if len(indices) == 0:
        raise ValueError("splits list no images: nothing to extract")
    if indices[0] < 0 or indices[-1] >= len(images):
        bad = indices[0] if indices[0] < 0 else indices[-1]
        raise ValueError(f"split index {int(bad)} is outside the dataset of {len(images)} images")
    repeated = indices[1:][indices[1:] == indices[:-1]]
    if len(repeated):
        raise ValueError(f"dataset index {int(repeated[0])} is listed more than once across splits")
    labels = np.asarray(images.labels, dtype=np.int64)[indices]
    plans = [
        ShardPlan(
            file=shard_name(number),
            indices=indices[start : start + shard_size],
            labels=labels[start : start + shard_size],
            splits=split_of[start : start + shard_size],
        )
        for number, start in enumerate(range(0, len(indices), shard_size))
    ]
    return plans, list(splits)


def _shard_is_current(path: Path, plan: ShardPlan, metadata: dict, row_shape: list[int], *, patches: bool) -> bool:
    """A finished shard is kept only if it was written with this provenance for exactly these rows (and, when patch
    tokens are cached, its patch-token file too)."""
    try:
        batch, provenance, shape = open_shard(path)
        current = (
            canonical_json(provenance) == canonical_json(metadata)
            and shape == row_shape
            and batch.num_rows == len(plan.indices)
            and np.array_equal(batch.column("index").to_numpy(), plan.indices)
            and batch.column("split").to_pylist() == [str(s) for s in plan.splits]
        )
        if current and patches:
            patch_batch, patch_provenance, _ = open_shard(path.with_name(patch_shard_name(path.name)))
            current = canonical_json(patch_provenance) == canonical_json(metadata) and np.array_equal(
                patch_batch.column("index").to_numpy(), plan.indices
            )
    except ValueError:
        return False
    return current


def _vouched_files(cache_dir: Path, manifest: dict) -> set[str]:
    """The files of the cache in place whose bytes are what its manifest records (`fingerprint.vouch`: a stat each
    when unchanged): only these may be reused or taken over; a shard changed in place is recomputed."""
    vouched = vouch(cache_dir / MANIFEST_FILE, manifest)
    return set(vouched.hashes) - set(vouched.problems)


def _take_over(
    cache_dir: Path,
    staging: Path,
    plan: ShardPlan,
    metadata: dict,
    row_shape: list[int],
    *,
    patches: bool,
    trusted: set[str],
):
    """Hard-link into `staging` the shard of `plan` (and its patch-token file) that the cache in place holds for
    exactly these rows and provenance, its bytes vouched for (`trusted`), so a cache missing one shard recomputes
    that one only (copied where the filesystem has no hard links; a copy cut short is unreadable, so recomputed)."""
    names = (plan.file, *([patch_shard_name(plan.file)] if patches else []))
    source = cache_dir / plan.file
    if not set(names) <= trusted or not _shard_is_current(source, plan, metadata, row_shape, patches=patches):
        return
    for name in names:
        try:
            os.link(cache_dir / name, staging / name)
        except OSError:
            shutil.copy2(cache_dir / name, staging / name)


def _worker_error_message(error: Exception) -> str | None:
    """The error of a DataLoader worker as it was raised there; None for an error raised in this process.

    The DataLoader re-raises a worker's error as "Caught X in DataLoader worker process N." followed by the worker's
    traceback, whose last line ("module.X: message") is the one a person needs: which file, and why.
    """
    lines = str(error).strip().splitlines()
    if len(lines) < 2 or "DataLoader worker" not in lines[0]:
        return None
    return lines[-1].partition(": ")[2] or lines[-1]


def build_provenance(provenance: dict, *, extractor: LayerTokenExtractor, transform: Callable, dtype: str) -> dict:
    """The caller's provenance plus what this extraction decides (tap, layers, tokens, widths, dtype, transform)."""
    full = dict(provenance)
    full.update(
        tap=extractor.tap,
        final_projection=extractor.final_projection,
        precision=extractor.precision,
        layer_names=list(extractor.layer_names),
        token_names=list(extractor.token_names),
        layer_widths=list(extractor.layer_widths),
        dim=extractor.dim,
        final_patch_tokens=extractor.final_patch_tokens,
        patch_grid=extractor.patch_grid,
        dtype=dtype,
        transform=provenance.get("transform", repr(transform)),
    )
    return json_roundtrip(full)


def json_roundtrip(value: dict) -> dict:
    return json.loads(canonical_json(value))


def extract_features(
    *,
    images: ImageSource,
    splits: dict[str, np.ndarray],
    extractor: LayerTokenExtractor,
    transform: Callable[[Image.Image], torch.Tensor],
    out_dir: Path,
    provenance: dict,
    shard_size: int = 1024,
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: str = "float16",
    device: str = "auto",
    progress: bool = True,
    recorded: dict | None = None,
) -> Path:
    """Extract every image listed in `splits` into a resumable feature cache at `out_dir` and return `out_dir`.

    A complete cache with the same provenance and rows is returned untouched. Otherwise the cache is written in a
    staging folder keyed on its provenance and rows, keeping the shards a killed run of it finished there, and swapped
    in complete: the cache at `out_dir` stays whole until then, and a folder of other files is refused untouched.
    Costs one forward pass per missing image; host memory holds one shard plus the DataLoader's prefetched batches.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown feature dtype {dtype!r}; choices: {', '.join(DTYPES)}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    target = resolve_device(device)
    plans, split_names = plan_shards(images, splits, shard_size)
    metadata = build_provenance(provenance, extractor=extractor, transform=transform, dtype=dtype)
    row_shape = [len(extractor.layer_names), len(extractor.token_names), extractor.dim]
    plan_hash = plan_sha256(plans)
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST_FILE

    trusted: set[str] = set()
    if manifest_path.is_file():
        try:
            manifest = read_json(manifest_path)
        except ValueError:
            manifest = {}
        trusted = _vouched_files(out_dir, manifest)
        if (
            canonical_json(manifest.get("provenance")) == canonical_json(metadata)
            and manifest.get("plan_sha256") == plan_hash
            and trusted == set(manifest.get("files") or {})
        ):
            return out_dir
    # Written beside out_dir and swapped in complete: the cache there stays whole until then. The staging folder is
    # keyed on what it computes, so a killed run resumes from its finished shards and other settings leave it be.
    key = stable_hash({"provenance": metadata, "plan": plan_hash})
    staging = begin_output(out_dir, key, marker=MANIFEST_FILE, resume=True)
    patches = extractor.final_patch_tokens

    hashes: dict[str, str] = {}
    todo: list[ShardPlan] = []
    for plan in plans:
        path = staging / plan.file
        patch_path = staging / patch_shard_name(plan.file)
        if not path.is_file():
            _take_over(out_dir, staging, plan, metadata, row_shape, patches=patches, trusted=trusted)
        if path.is_file() and _shard_is_current(path, plan, metadata, row_shape, patches=patches):
            hashes[plan.file] = sha256_file(path)
            if patches:
                hashes[patch_path.name] = sha256_file(patch_path)
        else:
            path.unlink(missing_ok=True)
            patch_path.unlink(missing_ok=True)
            todo.append(plan)

    if todo:
        todo_indices = np.concatenate([p.indices for p in todo])
        loader = torch.utils.data.DataLoader(
            _TransformedImages(images, todo_indices, transform),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=target.type == "cuda",
        )
        extractor.to(target)
        try:
            hashes.update(
                write_token_shards(
                    loader,
                    extractor=extractor,
                    shards=todo,
                    out_dir=staging,
                    metadata=metadata,
                    dtype=dtype,
                    device=target,
                    batch_size=batch_size,
                    progress=progress,
                )
            )
        except ValueError as e:  # a bad image (ImageFileError) or transform, possibly from a worker process
            message = _worker_error_message(e)
            if message is None:
                raise
            raise type(e)(message) from e

    patch_files = [patch_shard_name(p.file) for p in plans] if patches else None
    write_manifest(
        staging,
        provenance=metadata,
        shards=[(p.file, len(p.indices), hashes[p.file]) for p in plans],
        splits=split_names,
        plan_sha256=plan_hash,
        patch_shards=None if patch_files is None else [(name, hashes[name]) for name in patch_files],
        recorded=recorded,
    )
    return swap_in(staging, out_dir)


def plan_sha256(plans: Sequence[ShardPlan]) -> str:
    """Hash of the planned rows (dataset index and split of each, in order) and their cut into shards."""
    digest = hashlib.sha256()
    for plan in plans:
        digest.update(np.ascontiguousarray(plan.indices, dtype=np.int64).tobytes())
        digest.update(("\n".join(str(s) for s in plan.splits) + "\0").encode())
    return digest.hexdigest()
