"""Dry run of a params file: every task, each feature cache's size on disk, and a time estimate, before any work.

Nothing is downloaded and no weights are loaded: backbones are instantiated on PyTorch's `meta` device (shapes
only), datasets are checked against the source registry, and sizes come from each dataset entry's recorded image
counts (or its prepared splits). The time estimate scales a throughput measured on this machine (a short matrix
product benchmark, or `--images-per-second` given by the user) by each backbone's forward FLOPs. Each task's batch
size and steps come from the training code's own `batch_plan`.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from layerprobe.config import MANIFEST_FILE, SPLITS_FILE, BackboneConfig, DatasetConfig, PrepareConfig
from layerprobe.params import Params

BYTES_PER_VALUE = {"float16": 2, "float32": 4}
NUM_TOKENS = 2  # cls and ap per layer


@dataclass(frozen=True)
class BackboneShape:
    num_blocks: int
    dim: int
    num_tokens: int  # prefix + patch tokens per image
    gflops_per_image: float
    num_patches: int = 0  # patch tokens per image (prefix excluded)
    final_width: int = 0  # width of the final layer's tokens: the projection's for CLIP ports, else dim


@dataclass(frozen=True)
class CachePlan:
    backbone: str
    dataset: str
    num_images: int
    num_layers: int
    dim: int
    bytes: int  # everything the cache holds, patch tokens included
    seconds: float
    patch_bytes: int = 0  # of which the final layer's patch tokens (extract.final_patch_tokens)


@dataclass(frozen=True)
class TrainingRun:
    """One training run of a probe: images, batch size, steps per epoch and epochs (`train.batch_plan`)."""

    images: int
    batch_size: int
    steps_per_epoch: int
    epochs: int

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs


@dataclass(frozen=True)
class TrainingPlan:
    """How every probe trains on one dataset: its grid on the tuning split, then the refit on train + val."""

    dataset: str
    sweep: TrainingRun
    refit: TrainingRun


def backbone_shape(config: BackboneConfig) -> BackboneShape:
    """Block count, width, tokens and forward GFLOPs of a timm ViT, built on the meta device (no memory, no weights)."""
    import timm

    from layerprobe.registry import unknown_name_error

    base = config.model.split(".")[0]
    if not timm.is_model(base):
        raise unknown_name_error("timm model", config.model, timm.list_models())
    if config.pretrained and config.model not in timm.list_pretrained() and base not in timm.list_pretrained():
        raise unknown_name_error("timm pretrained tag", config.model, timm.list_pretrained(base + "*"))
    with torch.device("meta"):
        # The full name with its tag when it has one: the tag's config sets the head (CLIP's projection width).
        name = config.model if config.model in timm.list_pretrained() else base
        model = timm.create_model(name, pretrained=False, **config.model_kwargs)
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed"):
        raise ValueError(f"backbone {config.model!r} is not a ViT with blocks and patch tokens")
    num_patches = int(model.patch_embed.num_patches)
    tokens = num_patches + getattr(model, "num_prefix_tokens", 1)
    dim = int(model.embed_dim)
    head = getattr(model, "head", None)
    final_width = int(head.out_features) if config.final_projection and isinstance(head, torch.nn.Linear) else dim
    block_params = sum(p.numel() for p in blocks.parameters())
    # 2 FLOPs per weight per token for the linear layers, plus QK^T and AV (2 * 2 * tokens^2 * dim per block).
    flops = 2 * block_params * tokens + 4 * len(blocks) * tokens * tokens * dim
    return BackboneShape(num_blocks=len(blocks), dim=dim, num_tokens=tokens, gflops_per_image=flops / 1e9,
                         num_patches=num_patches, final_width=final_width)  # fmt: skip


def dataset_size(name: str, config: DatasetConfig, prepared_dir: Path) -> int:
    """Images to extract: the prepared split index if present, else the entry's recorded counts, else its options."""
    splits_file = prepared_dir / SPLITS_FILE
    if splits_file.is_file():
        return int(sum(len(ix) for ix in json.loads(splits_file.read_text())["splits"].values()))
    if config.num_images:
        return int(sum(config.num_images.values()))
    if "num_images" in config.options:
        return int(config.options["num_images"])
    raise ValueError(f"dataset {name!r}: size unknown before preparing; record it as datasets.{name}.num_images")


def training_sizes(name: str, config: DatasetConfig, prepared_dir: Path, *, prepare: PrepareConfig) -> tuple[int, int]:
    """(tuning split, train + val): the images a sweep trains its grid on and those its refit trains on. From the
    prepared split index if present, else cut from the entry's counts as prepare cuts them (scikit-learn's
    `train_test_split` rounds the cut up; the stratified cut can differ by an image or two)."""
    splits_file = prepared_dir / SPLITS_FILE
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text())["splits"]
        return len(splits["train"]), len(splits["train"]) + len(splits["val"])
    if config.num_images and {"train", "test"} <= set(config.num_images):  # an official test split
        full = int(config.num_images["train"])
    else:
        total = dataset_size(name, config, prepared_dir)
        full = total - math.ceil(prepare.test_fraction * total)
    return full - math.ceil(prepare.val_fraction * full), full


def plan_training(params: Params) -> list[TrainingPlan]:
    """One TrainingPlan per dataset of the suite, by the training code's `batch_plan` (the same for every backbone
    and probe: they share `train:`)."""
    from layerprobe.train import batch_plan

    plans = []
    for name in params.suite.datasets:
        tuning, full = training_sizes(name, params.datasets[name], params.paths.prepared_dir(name),
                                      prepare=params.prepare)  # fmt: skip
        runs = [TrainingRun(images, *batch_plan(images, params.train, plan_size=full)) for images in (tuning, full)]
        plans.append(TrainingPlan(dataset=name, sweep=runs[0], refit=runs[1]))
    return plans


def check_dataset_entry(name: str, config: DatasetConfig) -> None:
    """A dataset entry is complete: its source is registered and accepts the given options."""
    from layerprobe.data import source_factory

    factory = source_factory(config.source)  # unknown source: did-you-mean error
    signature = inspect.signature(factory)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    for key in config.options:
        if key not in signature.parameters and not accepts_any:
            choices = ", ".join(signature.parameters)
            raise ValueError(
                f"datasets.{name}.options.{key}: source {config.source!r} takes no such option ({choices})"
            )


def measure_gflops_per_second(device: str = "cpu", *, size: int = 512, repeats: int = 5) -> float:
    """Dense matrix-product throughput of this device (bf16 on CUDA, float32 on CPU), the unit the plan scales."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def plan_suite(params: Params, *, gflops_per_second: float) -> list[CachePlan]:
    """One CachePlan per (backbone, dataset) of the suite; validates every backbone and dataset entry on the way."""
    value_bytes = BYTES_PER_VALUE[params.extract.dtype]
    shapes = {name: backbone_shape(params.backbones[name]) for name in params.suite.backbones}
    sizes = {}
    for name in params.suite.datasets:
        check_dataset_entry(name, params.datasets[name])
        sizes[name] = dataset_size(name, params.datasets[name], params.paths.prepared_dir(name))
    plans = []
    for backbone, shape in shapes.items():
        layers = shape.num_blocks + 1  # every block plus the final output
        for dataset, count in sizes.items():
            # The patch tokens are stored at the final layer's own width (unpadded), P of them per image.
            patch_bytes = count * patch_bytes_per_image(shape, value_bytes) if params.extract.final_patch_tokens else 0
            plans.append(
                CachePlan(
                    backbone=backbone,
                    dataset=dataset,
                    num_images=count,
                    num_layers=layers,
                    dim=shape.dim,
                    bytes=count * layers * NUM_TOKENS * shape.dim * value_bytes + patch_bytes,
                    seconds=count * shape.gflops_per_image / gflops_per_second,
                    patch_bytes=patch_bytes,
                )
            )
    return plans


def patch_bytes_per_image(shape: BackboneShape, value_bytes: int) -> int:
    """Bytes one image's final-layer patch tokens take in the cache: P x D_final x bytes per value."""
    return shape.num_patches * shape.final_width * value_bytes


def check_disk(plans: list[CachePlan], features_root: Path, *, dtype: str = "float16") -> tuple[int, int]:
    """Refuse up front when the caches still to write would not fit on the features disk. Returns (needed, free)."""
    needed, free, where = disk_need(plans, features_root)
    refusal = disk_refusal(needed, free, where, dtype=dtype)
    if refusal:
        raise ValueError(refusal)
    return needed, free


def disk_need(plans: list[CachePlan], features_root: Path) -> tuple[int, int, Path]:
    """Bytes of the caches not yet written, bytes free on the features disk, and the folder that was measured (the
    nearest existing one)."""
    missing = [p for p in plans if not (features_root / p.backbone / p.dataset / MANIFEST_FILE).is_file()]
    needed = sum(p.bytes for p in missing)
    existing = features_root
    while not existing.exists():
        existing = existing.parent
    return needed, shutil.disk_usage(existing).free, existing


def disk_refusal(needed: int, free: int, where: Path, *, dtype: str = "float16") -> str | None:
    """The one-line refusal when `needed` bytes do not fit in `free`; None when they do."""
    if needed <= free:
        return None
    hint = ", or set extract.dtype: float16" if dtype != "float16" else ""
    return (
        f"feature caches need {format_bytes(needed)} but {where.resolve()} has {format_bytes(free)} free; "
        f"free space or point paths.features at a larger disk{hint}"
    )


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(
    params: Params,
    plans: list[CachePlan],
    *,
    needed: int,
    free: int,
    gflops_per_second: float,
    list_tasks: bool = False,
    training: list[TrainingPlan] | None = None,
) -> str:
    """The plan as text: the suite, one row per feature cache, totals; with `list_tasks` every probe task, with its
    batch size and steps where `training` (`plan_training`) is given."""
    probes = params.suite.probes
    patches = params.extract.final_patch_tokens
    lines = [
        f"suite {params.suite.name}: {len(params.suite.backbones)} backbones x {len(params.suite.datasets)} datasets"
        f" x {len(probes)} probes = {len(plans) * len(probes)} probe tasks",
        f"throughput basis: {gflops_per_second:.0f} GFLOP/s; "
        f"features as {params.extract.dtype}, tap {params.extract.tap}",
        "",
        "| backbone | dataset | images | layers x tokens x dim | cache | extraction |"
        + (" of which final patch tokens |" if patches else ""),
        "|---|---|---:|---|---:|---:|" + ("---:|" if patches else ""),
    ]
    for p in plans:
        lines.append(
            f"| {p.backbone} | {p.dataset} | {p.num_images:,} | {p.num_layers} x {NUM_TOKENS} x {p.dim} | "
            f"{format_bytes(p.bytes)} | {format_duration(p.seconds)} |"
            + (f" {format_bytes(p.patch_bytes)} |" if patches else "")
        )
    lines.append("")
    for backbone in params.suite.backbones:
        mine = [p for p in plans if p.backbone == backbone]
        lines.append(
            f"{backbone}: {format_bytes(sum(p.bytes for p in mine))} on disk, "
            f"~{format_duration(sum(p.seconds for p in mine))} extraction"
            + (f" (final patch tokens: {format_bytes(sum(p.patch_bytes for p in mine))})" if patches else "")
        )
    lines.append(f"total still to write: {format_bytes(needed)} of {format_bytes(free)} free")
    if patches:
        lines.append(
            f"final-layer patch tokens (extract.final_patch_tokens): {format_bytes(sum(p.patch_bytes for p in plans))}"
            " of all caches"
        )
    if list_tasks and training is None:
        lines.append("probe tasks:")
        lines.extend(f"  {b}/{d}/{p}" for b, d, p in params.tasks())
    elif list_tasks:
        lines.extend(format_training(params, training))
    return "\n".join(lines)


def format_training(params: Params, training: list[TrainingPlan]) -> list[str]:
    """Every probe task with the batch size and steps (per epoch x epochs) of its sweep and its refit."""
    by_dataset = {plan.dataset: plan for plan in training}
    lines = [
        f"probe tasks (train.batch_plan: {params.train.batch_plan}; the grid trains on the tuning split, the best "
        "member is refit on train + val; steps = per epoch x epochs):",
        "| task | sweep images | batch | steps | refit images | batch | steps |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b, d, p in params.tasks():
        sweep, refit = by_dataset[d].sweep, by_dataset[d].refit
        lines.append(f"| {b}/{d}/{p} | {_run_cells(sweep)} | {_run_cells(refit)} |")
    return lines


def _run_cells(run: TrainingRun) -> str:
    return f"{run.images:,} | {run.batch_size:,} | {run.steps_per_epoch:,} x {run.epochs:,} = {run.steps:,}"
