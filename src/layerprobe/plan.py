"""Dry run of a params file: every task, each feature cache's size on disk, and what the study will cost in time,
before any work.

Nothing is downloaded and no weights are loaded: backbones are instantiated on PyTorch's `meta` device (shapes
only), datasets are checked against the source registry, and sizes come from each dataset entry's recorded image
counts (or its prepared splits). Each task's batch size and steps come from the training code's own `batch_plan`.
Times are priced by `layerprobe.estimate` from measurements of the real code on the chosen device
(`layerprobe.calibration`, cached in a calibration file); `--images-per-second` instead scales extraction by each
backbone's forward FLOPs from a ViT-B/16 rate the user gives.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from layerprobe.config import MANIFEST_FILE, SPLITS_FILE, BackboneConfig, DatasetConfig, PrepareConfig
from layerprobe.estimate import GPU_HOURS_NOTE, Figure, ProbeTask, ProbeTimings, StudyEstimate, TaskEstimate
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
    """Block count, width, tokens and forward GFLOPs of a timm ViT, built on the meta device (no memory, no weights).

    Remembered per architecture: building one still runs its weight initialisers (about a second for a ViT-L)."""
    key = json.dumps([config.model, config.model_kwargs, config.final_projection, config.pretrained], sort_keys=True)
    if key not in _SHAPES:
        _SHAPES[key] = _backbone_shape(config)
    return _SHAPES[key]


_SHAPES: dict[str, BackboneShape] = {}


def _backbone_shape(config: BackboneConfig) -> BackboneShape:
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
    """Images to extract: the prepared split index if present, else the entry's recorded counts, else its options,
    else (a source made here) the source's own count."""
    splits_file = prepared_dir / SPLITS_FILE
    if splits_file.is_file():
        return int(sum(len(ix) for ix in json.loads(splits_file.read_text())["splits"].values()))
    if config.num_images:
        return int(sum(config.num_images.values()))
    if "num_images" in config.options:
        return int(config.options["num_images"])
    from layerprobe.data import create_dataset, is_materialised

    if is_materialised(config.source):  # generated or bundled here (digits): make it to count it
        return len(create_dataset(config.source, **config.options))
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
    extraction_basis: str | None = None,
) -> str:
    """The plan as text: the suite, one row per feature cache, totals; with `list_tasks` every probe task, with its
    batch size and steps where `training` (`plan_training`) is given. `extraction_basis` says how the extraction
    times were made (default: scaled from `gflops_per_second`)."""
    probes = params.suite.probes
    patches = params.extract.final_patch_tokens
    basis = extraction_basis or f"throughput basis: {gflops_per_second:.0f} GFLOP/s"
    lines = [
        f"suite {params.suite.name}: {len(params.suite.backbones)} backbones x {len(params.suite.datasets)} datasets"
        f" x {len(probes)} probes = {len(plans) * len(probes)} probe tasks",
        f"{basis}; features as {params.extract.dtype}, tap {params.extract.tap}",
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


# ---------------------------------------------------------------------------------------------- pricing the study


def default_calibration_path(params: Params, device: str) -> Path:
    """Where plan keeps its measurements when no `--calibration` file is named: one file per device type."""
    return Path(params.paths.results) / "plan" / f"calibration-{device}.json"


def dataset_classes(name: str, config: DatasetConfig, prepared_dir: Path) -> int:
    """Classes of a dataset: its entry's count, else its prepared split index, else the source itself (generated
    sources make their images to say)."""
    if config.num_classes:
        return int(config.num_classes)
    splits_file = prepared_dir / SPLITS_FILE
    if splits_file.is_file():
        return len(json.loads(splits_file.read_text())["class_names"])
    from layerprobe.data import create_dataset

    try:
        return len(create_dataset(config.source, **config.options).class_names)
    except (OSError, ValueError) as e:
        raise ValueError(f"dataset {name!r}: class count unknown before preparing; record it as "
                         f"datasets.{name}.num_classes ({e})") from e  # fmt: skip


def test_size(name: str, config: DatasetConfig, prepared_dir: Path, *, prepare: PrepareConfig) -> int:
    """Test images of a dataset: its prepared split, else the entry's official test count, else cut as prepare cuts."""
    splits_file = prepared_dir / SPLITS_FILE
    if splits_file.is_file():
        return len(json.loads(splits_file.read_text())["splits"]["test"])
    if config.num_images and "test" in config.num_images:
        return int(config.num_images["test"])
    return math.ceil(prepare.test_fraction * dataset_size(name, config, prepared_dir))


def probe_tasks(params: Params, training: list[TrainingPlan], *, precision: str) -> list[ProbeTask]:
    """Every (backbone, dataset, probe) with the shape its probe trains at (selected on a cache of the backbone's
    layers, as training selects it), its step counts and the images it predicts on."""
    from layerprobe.calibration import ProbeShape
    from layerprobe.probes import get_probe_spec, reading_widths, select_token_positions
    from layerprobe.train import make_grid

    value_bytes = BYTES_PER_VALUE[params.extract.dtype]
    by_dataset = {plan.dataset: plan for plan in training}
    tasks = []
    for backbone in params.suite.backbones:
        shape = backbone_shape(params.backbones[backbone])
        layer_names = [f"block{i}" for i in range(shape.num_blocks)] + ["final"]
        widths = [shape.dim] * shape.num_blocks + [shape.final_width]
        for dataset in params.suite.datasets:
            config, prepared = params.datasets[dataset], params.paths.prepared_dir(dataset)
            classes = dataset_classes(dataset, config, prepared)
            tests = test_size(dataset, config, prepared, prepare=params.prepare)
            plan = by_dataset[dataset]
            for probe in params.suite.probes:
                spec = get_probe_spec(probe, **params.probe_config(probe).overrides())
                patches = shape.num_patches if spec.reads_patches else 0
                positions = select_token_positions(layer_names, list(NUM_TOKEN_NAMES), layers=spec.layers,
                                                   tokens=spec.tokens, num_patches=patches)  # fmt: skip
                width, token_widths = reading_widths(spec, widths, positions)
                width = width or shape.dim
                attentive = spec.head == "attentive"
                grid = make_grid(params.train.lrs, params.train.weight_decays,
                                 params.train.attn_dropouts if attentive else [0.0])  # fmt: skip
                probe_shape = ProbeShape(
                    head=spec.head, tokens=len(positions), width=width, grid=len(grid), precision=precision,
                    heads=(spec.num_heads or len(positions)) if attentive else 0,
                    token_widths=None if token_widths is None else tuple(token_widths),
                )  # fmt: skip
                patch_row = shape.num_patches * shape.final_width if spec.reads_patches else 0
                tasks.append(ProbeTask(
                    backbone=backbone, dataset=dataset, probe=probe, shape=probe_shape, classes=classes,
                    sweep_batch=plan.sweep.batch_size, sweep_steps=plan.sweep.steps, refit_batch=plan.refit.batch_size,
                    refit_steps=plan.refit.steps, val_images=plan.refit.images - plan.sweep.images, test_images=tests,
                    seeds=len(params.train.seeds),
                    selection_bytes=plan.refit.images * len(positions) * width * value_bytes,
                    row_bytes=((shape.num_blocks + 1) * NUM_TOKENS * shape.dim + patch_row) * value_bytes,
                    selected_row_bytes=len(positions) * width * value_bytes,
                ))  # fmt: skip
    return tasks


NUM_TOKEN_NAMES = ("cls", "ap")


def _matmul_precision(precision: str, device: torch.device) -> str:
    """The probe matmuls' dtype on `device`, as training resolves it ("auto" on a GPU this machine does not have:
    bfloat16, which every GPU the study targets, Ampere on, multiplies natively)."""
    from layerprobe.device import dtype_name, resolve_matmul_dtype

    if precision == "auto" and device.type == "cuda" and not torch.cuda.is_available():
        return "bfloat16"
    return dtype_name(resolve_matmul_dtype(precision, device))


def price_study(
    params: Params,
    caches: list[CachePlan],
    training: list[TrainingPlan],
    *,
    calibration: dict,
    device: torch.device,
    max_batch: int | None,
    max_grid: int | None = None,
    images_per_second: float | None = None,
    save: Callable[[], None] | None = None,
) -> StudyEstimate:
    """Every figure of the study (`estimate.StudyEstimate`), from the calibration's measurements; what it lacks is
    measured here on `device` when this machine has it (and stored in `calibration`, calling `save` after each), else
    scaled from what it has."""
    from layerprobe.calibration import (
        cached,
        device_description,
        time_concurrent_speedup,
        time_host_batches,
        time_process_start,
        time_steps_fixed,
        time_streamed_reads,
        warm_up,
    )
    from layerprobe.estimate import estimate_task, stage_times
    from layerprobe.selection import memory_budget

    can_measure = device.type == "cpu" or torch.cuda.is_available()
    if "device" not in calibration:
        if not can_measure:
            raise ValueError(
                f"no calibration for {device.type} here and no {device.type} to measure one: run "
                f"`layerprobe plan --device {device.type} --calibration FILE` where there is one"
            )
        description = device_description(device)
        description["memory_budget"] = memory_budget()
        if device.type == "cuda":
            description["device_memory"] = torch.cuda.mem_get_info(device)[0]
        calibration["device"] = description
    elif calibration["device"]["type"] != device.type:
        raise ValueError(f"the calibration file holds {calibration['device']['type']} figures, not {device.type}: "
                         "name another file with --calibration")  # fmt: skip
    constants_section = calibration.setdefault("constants", {})
    # A process's first training loads what torch's optimiser needs: once, before any step is timed.
    if can_measure:
        warm_up(device)
    precision = _matmul_precision(params.train.precision, device)
    cache_dtype = torch.float16 if params.extract.dtype == "float16" else torch.float32
    train = dataclasses.replace(params.train, precision=precision)
    tasks = probe_tasks(params, training, precision=precision)
    probes = calibration.setdefault("probes", {})
    timings = ProbeTimings(probes, device=device, can_measure=can_measure, train=train, max_batch=max_batch,
                           cache_dtype=cache_dtype, save=save, max_grid=max_grid)  # fmt: skip
    needs: dict = defaultdict(set)
    for task in tasks:
        needs[task.shape].add((task.sweep_batch, task.classes))
        needs[task.shape.member()].add((task.refit_batch, task.classes))
    timings.prepare(needs)
    if device.type == "cpu":
        cpu = timings
    else:  # the evaluate step predicts on the CPU (it loads probes there)
        cpu = ProbeTimings(probes, device=torch.device("cpu"), can_measure=True, train=train, max_batch=256,
                           cache_dtype=cache_dtype, predict_only=True, save=save)  # fmt: skip
        cpu.prepare({shape.member(): {(params.evaluate.batch_size, c) for _, c in points}
                     for shape, points in needs.items()})  # fmt: skip
    start_key = f"{device.type}|process_start,mlflow_import,first_training"
    if start_key in constants_section or can_measure:
        constants = dict(cached(constants_section, start_key, lambda: time_process_start(device), save)[0])
    else:  # a GPU's file without them (a CPU measures its own)
        constants = dict(cached(constants_section, "cpu|process_start,mlflow_import,first_training",
                                lambda: time_process_start(torch.device("cpu")), save)[0])  # fmt: skip
    constants.update(cached(constants_section, "cpu|steps_fixed",
                            lambda: time_steps_fixed(train=train, evaluate=params.evaluate), save)[0])  # fmt: skip
    constants["stream_bytes_per_second"] = cached(constants_section, "cpu|stream_bytes_per_second",
                                                  time_streamed_reads, save)[0]  # fmt: skip
    constants["host_batch_bytes_per_second"] = (
        cached(constants_section, "cuda|host_batch_bytes_per_second", lambda: time_host_batches(device), save)[0]
        if device.type == "cuda" and can_measure or "cuda|host_batch_bytes_per_second" in constants_section
        else float("inf")
    )
    concurrency, runs = 1.0, None
    if device.type == "cpu":  # a stage's flow runs two tasks at a time; on a CPU they share the cores
        runs = _heaviest_runs(tasks, timings)
        if runs is not None:
            key = "cpu|concurrency|" + " + ".join(f"{shape.key} b{b} c{c}" for shape, b, c, _ in runs)
            concurrency = cached(constants_section, key, lambda: time_concurrent_speedup(
                runs, train=train, cache_dtype=cache_dtype), save)[0]  # fmt: skip
    extraction, prepare = _price_extraction(params, caches, calibration, device=device, can_measure=can_measure,
                                            images_per_second=images_per_second,
                                            save=save)  # fmt: skip
    pretrain = _price_pretrain(params, calibration, device=device, can_measure=can_measure, save=save)
    description = calibration["device"]
    estimates = [estimate_task(task, timings, cpu, constants, memory=description.get("memory_budget"),
                               device_memory=description.get("device_memory")) for task in tasks]  # fmt: skip
    stages, overheads = stage_times(pretrain=pretrain, prepare=prepare, extraction=extraction, tasks=estimates,
                                    constants=constants, concurrency=concurrency,
                                    accelerated=device.type == "cuda")  # fmt: skip
    study = StudyEstimate(tasks=estimates, extraction=extraction, prepare=prepare, pretrain=pretrain, stages=stages,
                          overheads=overheads, constants=constants, concurrency=concurrency, device=description,
                          concurrency_measured=runs is not None,
                          measured_now=timings.measured_now + (cpu.measured_now if cpu is not timings else 0),
                          reused=timings.reused)  # fmt: skip
    study.notes.extend(_notes(study, device=device))
    return study


def _heaviest_runs(tasks: list[ProbeTask], timings: ProbeTimings) -> list[tuple] | None:
    """The two sweep shapes that take most of the training time, each with its first task's batch and classes and
    the steps that take it about a second: what `calibration.time_concurrent_speedup` runs side by side. None when
    their steps take over half a second (compute-bound: two at a time share the cores, as one after the other)."""
    totals: dict = defaultdict(float)
    first: dict = {}
    for task in tasks:
        step = timings.figure(task.shape, task.sweep_batch, task.classes, "step_seconds").seconds
        totals[task.shape] += step * task.sweep_steps
        first.setdefault(task.shape, (task.sweep_batch, task.classes, step))
    heaviest = sorted(totals, key=totals.get, reverse=True)[:2]
    if len(heaviest) < 2 or any(first[shape][2] > 0.5 for shape in heaviest):
        return None
    return [(shape, first[shape][0], first[shape][1], max(10, min(60, math.ceil(1.0 / max(first[shape][2], 1e-3)))))
            for shape in heaviest]  # fmt: skip


def _price_extraction(
    params: Params,
    caches: list[CachePlan],
    calibration: dict,
    *,
    device: torch.device,
    can_measure: bool,
    images_per_second: float | None,
    save: Callable[[], None] | None = None,
) -> tuple[dict[tuple[str, str], Figure], dict[str, Figure]]:
    """Extraction per cache and preparation per dataset. A generated dataset is prepared and extracted for real at
    two small sizes (both steps timed); a webdataset's images cannot be made here, so its extraction is the
    backbone's measured forward and shard writes on random pixels, and the decode and resize of a photo-sized JPEG
    spread over the DataLoader's workers (whichever is slower is the pace), and its preparation is not priced."""
    from layerprobe.calibration import cached, time_backbone_forward, time_decode, time_prepare_and_extract
    from layerprobe.data import is_materialised

    section = calibration.setdefault("extract", {})
    extract = dataclasses.replace(params.extract, device=device.type)
    extraction, prepare = {}, {}
    for cache in caches:
        backbone, dataset = params.backbones[cache.backbone], params.datasets[cache.dataset]
        if images_per_second:
            extraction[(cache.backbone, cache.dataset)] = Figure(cache.seconds, "scaled")
            continue
        model = json.dumps([backbone.model, backbone.model_kwargs, backbone.final_projection], sort_keys=True)
        settings = json.dumps([extract.tap, extract.precision, extract.dtype, extract.batch_size,
                               extract.final_patch_tokens], sort_keys=True)  # fmt: skip
        if is_materialised(dataset.source):
            source = json.dumps([dataset.source, dataset.options], sort_keys=True)
            key = f"{device.type}|steps|{model}|{settings}|{source}"
            if key not in section and not can_measure:
                extraction[(cache.backbone, cache.dataset)] = Figure(0.0, "not priced")
                continue
            figures, _ = cached(section, key, lambda b=backbone, d=dataset, n=cache.dataset: time_prepare_and_extract(
                n, d, b, extract=extract, prepare=params.prepare), save)  # fmt: skip
            extraction[(cache.backbone, cache.dataset)] = Figure(
                figures["extract_fixed"] + cache.num_images * figures["extract_per_image"], "measured"
            )
            prepare.setdefault(cache.dataset, Figure(
                figures["prepare_fixed"] + cache.num_images * figures["prepare_per_image"], "measured"))  # fmt: skip
            continue
        prepare.setdefault(cache.dataset, Figure(0.0, "not priced"))
        key = f"{device.type}|forward|{model}|{settings}"
        if key in section or can_measure:
            # A CPU times a few images (a ViT-L forward at 224 px takes a second each on two cores): per image,
            # the forward's cost hardly depends on the batch there.
            forward_batch = extract.batch_size if device.type == "cuda" else min(extract.batch_size, 8)
            forward, _ = cached(section, key, lambda b=backbone, n=forward_batch: time_backbone_forward(
                b, extract, device=device, max_batch=n), save)  # fmt: skip
            if "gflops_per_image" not in forward:  # what another machine's plan scales a missing backbone by
                forward["gflops_per_image"] = backbone_shape(backbone).gflops_per_image
            basis = "measured"
        else:  # another machine's calibration without this backbone: scaled by forward FLOPs from one it has
            forward, basis = _forward_from_flops(section, params, cache.backbone, device=device), "scaled (shape)"
        decode_key = f"cpu|decode|{json.dumps([backbone.model, backbone.preprocessing()], sort_keys=True)}"
        decode, _ = cached(section, decode_key, lambda b=backbone: time_decode(backbone=b), save)
        workers = min(extract.num_workers, os.cpu_count() or 1)
        per_image = forward["seconds_per_image"]
        per_image = max(per_image, decode / workers) if workers else per_image + decode
        extraction[(cache.backbone, cache.dataset)] = Figure(forward.get("build_seconds", 0.0)
                                                             + cache.num_images * per_image, basis)  # fmt: skip
    return extraction, prepare


def _forward_from_flops(section: dict, params: Params, backbone: str, *, device: torch.device) -> dict:
    target = backbone_shape(params.backbones[backbone]).gflops_per_image
    for key, figures in section.items():
        if key.startswith(f"{device.type}|forward|") and "gflops_per_image" in figures:
            return {"seconds_per_image": figures["seconds_per_image"] * target / figures["gflops_per_image"]}
    raise ValueError(f"the calibration file has no {device.type} backbone forward to scale {backbone!r} from")


def _price_pretrain(
    params: Params,
    calibration: dict,
    *,
    device: torch.device,
    can_measure: bool,
    save: Callable[[], None] | None = None,
) -> dict[str, Figure]:
    """Pretraining per backbone with a `pretrain` recipe: its steps, its images' generation and the held-out check."""
    from layerprobe.calibration import cached, time_pretrain

    section = calibration.setdefault("pretrain", {})
    priced = {}
    for name in params.suite.backbones:
        backbone = params.backbones[name]
        recipe = backbone.pretrain
        if recipe is None:
            continue
        what = json.dumps([backbone.model, backbone.model_kwargs, dataclasses.asdict(recipe)], sort_keys=True)
        key = f"{device.type}|{what}"
        if key not in section and not can_measure:
            priced[name] = Figure(0.0, "not priced")
            continue
        figures, _ = cached(section, key, lambda b=backbone: time_pretrain(b, device=device), save)
        images = int(recipe.options.get("num_images", 0)) or 1
        held_out = max(1, int(round(recipe.held_out * images)))
        forward_per_image = figures["step_seconds"] / recipe.batch_size / 3  # a forward is about a third of a step
        seconds = (figures["fixed_seconds"] + recipe.steps * figures["step_seconds"] + images * figures["image_seconds"]
                   + held_out * forward_per_image)  # fmt: skip
        priced[name] = Figure(seconds, "measured")
    return priced


def _notes(study: StudyEstimate, *, device: torch.device) -> list[str]:
    """What a reader must know to use the figures: what was not priced, what streams, and, for a GPU estimate over
    eight hours, what dominates it and what its floor is."""
    notes = []
    unpriced = sorted({d for d, f in study.prepare.items() if f.basis == "not priced"})
    if unpriced:
        notes.append(f"prepare is not priced for {len(unpriced)} dataset(s) whose images cannot be made here "
                     f"({', '.join(unpriced[:4])}{', ...' if len(unpriced) > 4 else ''}): it reads each one's labels "
                     "once (minutes for ImageNet-1k)")  # fmt: skip
    streamed = [t for t in study.tasks if t.streamed]
    if streamed:
        names = sorted({f"{t.task.backbone}/{t.task.dataset}/{t.task.probe}" for t in streamed})
        notes.append(f"{len(streamed)} task(s) select more than the measuring machine's memory "
                     f"({format_bytes(study.device.get('memory_budget') or 0)}) and read their batches from the cache "
                     f"as they train: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")  # fmt: skip
    work = sum(t.train.seconds for t in study.tasks) + sum(f.seconds for f in study.extraction.values())
    if device.type == "cuda" and work / 3600 > GPU_HOURS_NOTE:
        by_part: dict[str, float] = defaultdict(float)
        data: dict[str, float] = defaultdict(float)
        for t in study.tasks:
            by_part[f"{t.task.probe} training"] += t.train.seconds
            data[f"{t.task.probe} training"] += t.data_seconds
        by_part["extraction"] = sum(f.seconds for f in study.extraction.values())
        top = max(by_part, key=by_part.get)
        share = by_part[top] / work
        if top == "extraction":
            floor = "the backbone forward and the image data path"
        elif data[top] > 0.5 * by_part[top]:
            floor = (f"the data path (gathering, copying and reading its batches: {data[top] / by_part[top]:.0%} of "
                     "its time) is the floor, not the grid-at-once training")  # fmt: skip
        else:
            floor = (f"the grid-at-once training is the floor (its data path is {data[top] / by_part[top]:.0%} of "
                     "its time)")  # fmt: skip
        notes.append(f"one GPU needs {format_duration(work)} of extraction and training, over {GPU_HOURS_NOTE:.0f} h: "
                     f"{top} is {share:.0%} of it; {floor}")  # fmt: skip
    return notes


def format_estimate(
    params: Params, study: StudyEstimate, *, workers: int = 1, training: list[TrainingPlan] | None = None
) -> list[str]:
    """The study's time as text: per task (with its batch size and steps when `training` is given), per backbone,
    per stage and in total, with N workers; which figures were measured and which scaled, and the fixed overheads."""
    from layerprobe.estimate import OVERHEADS, STAGES, workers_wall

    device = study.device
    lines = [
        "",
        f"time estimate for {device['type']} ({device.get('name', '?')}, {device.get('threads', '?')} threads, torch "
        f"{device.get('torch', '?')}): probe steps timed with the training code, {study.measured_now} point(s) "
        f"measured now, {study.reused} reused from the calibration file",
    ]
    by_task = {(t.task.backbone, t.task.dataset, t.task.probe): t for t in study.tasks}
    if training is not None:
        plans = {plan.dataset: plan for plan in training}
        lines += [
            f"probe tasks (train.batch_plan: {params.train.batch_plan}; the grid trains on the tuning split, the best "
            "member is refit on train + val; steps = per epoch x epochs; training = seeds x (sweep + validation + "
            "refit); evaluation on the CPU):",
            "| task | sweep images | batch | steps | refit images | batch | steps | training | evaluation | basis |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for key, estimate in by_task.items():
            plan = plans[key[1]]
            lines.append(f"| {'/'.join(key)} | {_run_cells(plan.sweep)} | {_run_cells(plan.refit)} | "
                         f"{_task_cells(estimate)} |")  # fmt: skip
    else:
        lines += ["| task | training | evaluation | basis |", "|---|---:|---:|---|"]
        lines += [f"| {'/'.join(key)} | {_task_cells(estimate)} |" for key, estimate in by_task.items()]
    lines += ["", "| backbone | extraction | training | evaluation |", "|---|---:|---:|---:|"]
    for backbone in params.suite.backbones:
        mine = [t for t in study.tasks if t.task.backbone == backbone]
        extraction = sum(f.seconds for (b, _), f in study.extraction.items() if b == backbone)
        lines.append(f"| {backbone} | {_hours(extraction)} | {_hours(sum(t.train.seconds for t in mine))} | "
                     f"{_hours(sum(t.evaluate.seconds for t in mine))} |")  # fmt: skip
    extraction = sum(f.seconds for f in study.extraction.values())
    trained, evaluated = sum(t.train.seconds for t in study.tasks), sum(t.evaluate.seconds for t in study.tasks)
    counts = defaultdict(int)
    for t in study.tasks:
        counts[t.train.basis] += 1
    bases = ", ".join(f"{n} {basis}" for basis, n in counts.items())
    lines += [
        "",
        f"study: extraction {_hours(extraction)}, training {_hours(trained)}, evaluation {_hours(evaluated)}, "
        f"pretrain {_hours(sum(f.seconds for f in study.pretrain.values()))}, prepare "
        f"{_hours(sum(f.seconds for f in study.prepare.values()))} (task training figures: {bases})",
        "per stage on one machine (dvc repro; a stage runs two tasks at a time, "
        + (
            "taking turns on the GPU"
            if device["type"] == "cuda"
            else f"{study.concurrency:.2f}x faster than one after the other on this CPU, measured"
            if study.concurrency_measured
            else "as fast as one after the other: steps this long keep both cores busy"
        )  # fmt: skip
        + "; fixed overheads included):",
        " | ".join(f"{stage} {format_duration(study.stages[stage])}" for stage in STAGES)
        + f" | total {format_duration(study.total())}"
        + (f" ({study.total() / 86400:.1f} days)" if study.total() >= 48 * 3600 else ""),
        f"fixed overheads: {format_duration(sum(study.overheads.values()))} in all; process start-up "
        f"{study.constants['process_start']:.1f} s per stage, MLflow's import {study.constants['mlflow_import']:.1f} s "
        f"more in pretrain, evaluate and report, a first optimiser step {study.constants['first_training']:.1f} s "
        "(measured here); constants measured on the project's 2-core "
        "CPU box: " + ", ".join(f"{key.removesuffix('_seconds')} {value:g} s" for key, value in OVERHEADS.items()),
        f"with {workers} worker(s) (layerprobe run --pool: each backbone x dataset unit extracts, trains and scores "
        "its probes on one worker; pretrain before, the MLflow recording and the report after, once): "
        f"{format_duration(workers_wall(study, workers))}",
    ]
    lines += [f"note: {note}" for note in study.notes]
    return lines


def _task_cells(estimate: TaskEstimate) -> str:
    basis = estimate.train.basis + (", streamed" if estimate.streamed else "")
    return f"{_hours(estimate.train.seconds)} | {_hours(estimate.evaluate.seconds)} | {basis}"


def _hours(seconds: float) -> str:
    return format_duration(seconds)


def estimate_json(study: StudyEstimate) -> dict:
    """The study's figures for a program (`--json`): per stage, per task, totals."""
    return {
        "device": study.device,
        "stages": study.stages,
        "overheads": study.overheads,
        "total": study.total(),
        "training": sum(t.train.seconds for t in study.tasks),
        "evaluation": sum(t.evaluate.seconds for t in study.tasks),
        "extraction": sum(f.seconds for f in study.extraction.values()),
        "tasks": [
            {
                "task": f"{t.task.backbone}/{t.task.dataset}/{t.task.probe}",
                "training": t.train.seconds,
                "evaluation": t.evaluate.seconds,
                "basis": t.train.basis,
                "streamed": t.streamed,
            }
            for t in study.tasks
        ],  # fmt: skip
        "notes": study.notes,
    }
