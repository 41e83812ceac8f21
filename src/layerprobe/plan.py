"""Dry run of a params file: every task, each feature cache's size on disk and what the study costs in time, which is
each task's steps (`train.batch_plan`) x its probe shape's step, timed with the training step on random features, +
images / a backbone's images per second (one timed forward, or a given ViT-B/16 rate scaled by FLOPs), + pretraining,
+ DVC stages' fixed costs. Timings are kept by device and shape in a calibration file that another machine can read."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import itertools
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerprobe.config import MANIFEST_FILE, BackboneConfig, DatasetConfig
from layerprobe.params import Params, task_workers
from layerprobe.per_layer import PER_LAYER
from layerprobe.probes import ProbeSpec

FORMAT = "layerprobe-calibration/3"
NUM_TOKENS = 2  # cls and ap per layer
# A CPU times steps of at most CPU_MAX_BATCH images, and a grid of more than CPU_MAX_GRID members as one member,
# scaling both in proportion: a paper-sized step takes minutes there, and a dry run must answer in seconds.
CPU_MAX_BATCH, CPU_MAX_GRID = 64, 4
# What a run costs beyond its work, read off benchmarks/plan.py's time-stamped `dvc repro` of the default suite
# (2-core AMD EPYC, 2026-12-07): without them, that run's estimate is half of what it takes.
STAGE_SECONDS = 10.0  # per DVC stage: a Python importing torch, timm and Prefect; DVC hashing, its lock
FIRST_STAGE_SECONDS = 45.0  # once: the Prefect server starting, MLflow making its store, the recipe's images made
TASK_SECONDS = 0.25  # per task trained: reading its cache, writing the probe
RECORD_SECONDS = 0.7  # per task evaluated: predicting its test split, its figures and MLflow run
CPU_TASKS_OVERLAP = 1.4  # a CPU's train stage, two tasks at a time (`params.task_workers`): 1.3-1.6x one by one
STAGES = ("pretrain", "prepare", "extract", "train", "evaluate", "report")


@dataclass(frozen=True)
class BackboneShape:
    num_blocks: int
    dim: int
    num_patches: int  # patch tokens per image (prefix tokens excluded)
    final_width: int  # the final layer's token width: the projection's for CLIP ports, else dim
    gflops_per_image: float


@dataclass(frozen=True)
class CachePlan:
    backbone: str
    dataset: str
    num_images: int
    num_layers: int
    dim: int
    bytes: int  # everything the cache holds, patch tokens included
    patch_bytes: int  # of which the final layer's patch tokens (extract.final_patch_tokens)

    @property
    def key(self) -> tuple[str, str]:
        return self.backbone, self.dataset


@dataclass(frozen=True)
class TrainingRun:
    images: int
    batch_size: int
    steps_per_epoch: int
    epochs: int

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs


@dataclass(frozen=True)
class Shape:
    spec: ProbeSpec
    tokens: int  # K
    width: int  # W, the width tokens are read at
    grid: int  # G, members trained at once
    token_widths: tuple[int, ...] | None = None  # a linear head's unpadded per-token widths

    @property
    def key(self) -> str:
        heads = f" H{self.spec.num_heads or self.tokens}" if self.spec.head == "attentive" else ""
        runs = "".join(f" {w}x{len(list(same))}" for w, same in itertools.groupby(self.token_widths or ()))
        head = PER_LAYER if self.spec.name == PER_LAYER else self.spec.head  # 3 heads a layer, not one linear
        return f"{head} K{self.tokens} W{self.width}{heads} G{self.grid}" + (runs and " widths" + runs)


@dataclass(frozen=True)
class Task:
    backbone: str
    dataset: str
    probe: str
    shape: Shape  # the sweep's grid; the refit trains one member of it
    classes: int
    sweep: TrainingRun  # the grid on the tuning split
    refit: TrainingRun  # the best member on train + val

    @property
    def key(self) -> tuple[str, str, str]:
        return self.backbone, self.dataset, self.probe


@dataclass
class Estimate:
    caches: list[CachePlan]
    tasks: list[Task]
    train: dict[tuple[str, str, str], float] = field(default_factory=dict)  # per task, every seed
    extraction: dict[tuple[str, str], float] = field(default_factory=dict)  # per cache
    pretrain: dict[str, float] = field(default_factory=dict)  # per backbone with a recipe
    measured: int = 0
    reused: int = 0
    overlap: float = 1.0  # how much faster a stage's training tasks run together than one after another

    def stages(self) -> dict[str, float]:
        """Wall seconds per `dvc repro` stage on one machine, fixed costs included."""
        work = {"pretrain": FIRST_STAGE_SECONDS + sum(self.pretrain.values()), "extract": sum(self.extraction.values())}
        work |= {"train": sum(self.train.values()) / self.overlap, "evaluate": RECORD_SECONDS * len(self.tasks)}
        return {stage: STAGE_SECONDS + work.get(stage, 0.0) for stage in STAGES}

    def workers_wall(self, workers: int) -> float:
        """Wall seconds of `layerprobe run --pool`: units (backbone x dataset: extraction, training) on `workers`."""
        units = dict(self.extraction)
        for key, seconds in self.train.items():
            units[key[:2]] += seconds
        stages = self.stages()
        once = stages["pretrain"] + STAGE_SECONDS + stages["evaluate"] + stages["report"]
        return once + makespan(list(units.values()), workers)


def makespan(durations: list[float], workers: int) -> float:
    """Wall time of jobs handed longest first to whichever of `workers` is free first (LPT scheduling)."""
    loads = [0.0] * max(1, workers)
    for duration in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + duration)
    return max(loads)


_SHAPES: dict[str, BackboneShape] = {}


def backbone_shape(config: BackboneConfig) -> BackboneShape:
    """Blocks, width, patches and forward GFLOPs of a timm ViT built on the meta device (no memory, no weights)."""
    key = json.dumps([config.model, config.model_kwargs, config.final_projection, config.pretrained], sort_keys=True)
    if key in _SHAPES:
        return _SHAPES[key]
    import timm

    from layerprobe.registry import unknown_name_error

    base = config.model.split(".")[0]
    if not timm.is_model(base):
        raise unknown_name_error("timm model", config.model, timm.list_models())
    tagged = config.model in timm.list_pretrained()
    if config.pretrained and not tagged and base not in timm.list_pretrained():
        raise unknown_name_error("timm pretrained tag", config.model, timm.list_pretrained(base + "*"))
    with torch.device("meta"):  # the full name when it has a tag: the tag's config sets CLIP's projection width
        model = timm.create_model(config.model if tagged else base, pretrained=False, **config.model_kwargs)
    blocks, head = getattr(model, "blocks", None), getattr(model, "head", None)
    if blocks is None or not hasattr(model, "patch_embed"):
        raise ValueError(f"backbone {config.model!r} is not a ViT with blocks and patch tokens")
    patches, dim = int(model.patch_embed.num_patches), int(model.embed_dim)
    tokens = patches + getattr(model, "num_prefix_tokens", 1)
    final_width = int(head.out_features) if config.final_projection and isinstance(head, torch.nn.Linear) else dim
    # 2 FLOPs per weight per token for the linear layers, plus QK^T and AV (2 * 2 * tokens^2 * dim per block).
    flops = 2 * sum(p.numel() for p in blocks.parameters()) * tokens + 4 * len(blocks) * tokens * tokens * dim
    _SHAPES[key] = BackboneShape(len(blocks), dim, patches, final_width, flops / 1e9)
    return _SHAPES[key]


def dataset_counts(name: str, config: DatasetConfig, params: Params) -> tuple[int, int, int, int]:
    """(images to extract, tuning split, train + val, classes) of a dataset entry: its recorded counts (else its
    source's, made to count them) cut as prepare cuts them (rounding up; a stratified cut can differ by an image)."""
    from layerprobe.data import create_dataset

    counts = config.num_images or {"all": config.options.get("num_images", 0)}
    if not (sum(counts.values()) and config.num_classes):
        try:
            made = create_dataset(config.source, **config.options)
        except (OSError, ValueError) as e:
            raise ValueError(f"dataset {name!r}: record datasets.{name}.num_images and num_classes ({e})") from e
        counts, classes = (counts if sum(counts.values()) else {"all": len(made)}), len(made.class_names)
    total, official = sum(counts.values()), {"train", "test"} <= set(counts)  # else prepare cuts a test split
    full = counts["train"] if official else total - math.ceil(params.prepare.test_fraction * total)
    return total, full - math.ceil(params.prepare.val_fraction * full), full, config.num_classes or classes


def plan_study(params: Params) -> Estimate:
    """Every cache (backbone x dataset) and task (x probe); a task's shape read off the layers as training reads it."""
    from layerprobe.probes import get_probe_spec, reading_widths, select_token_positions
    from layerprobe.train import batch_plan, make_grid

    value_bytes, caches, tasks = torch.finfo(getattr(torch, params.extract.dtype)).bits // 8, [], []
    counts = {name: dataset_counts(name, params.datasets[name], params) for name in params.suite.datasets}
    for backbone in params.suite.backbones:
        shape = backbone_shape(params.backbones[backbone])
        layers = [f"block{i}" for i in range(shape.num_blocks)] + ["final"]
        widths = [shape.dim] * shape.num_blocks + [shape.final_width]
        # The patch tokens are stored at the final layer's own width (unpadded), P of them per image.
        patch = shape.num_patches * shape.final_width * value_bytes if params.extract.final_patch_tokens else 0
        for dataset, (n, tuning, full, classes) in counts.items():
            per_image = len(layers) * NUM_TOKENS * shape.dim * value_bytes + patch
            caches.append(CachePlan(backbone, dataset, n, len(layers), shape.dim, n * per_image, n * patch))
            sweep, refit = (TrainingRun(m, *batch_plan(m, params.train, plan_size=full)) for m in (tuning, full))
            for probe in params.suite.probes:
                spec = get_probe_spec(probe, **params.probe_config(probe).overrides())
                patches = shape.num_patches if spec.reads_patches else 0
                positions = select_token_positions(
                    layers, ["cls", "ap"], layers=spec.layers, tokens=spec.tokens, num_patches=patches
                )
                width, token_widths = reading_widths(spec, widths, positions)
                dropouts = params.train.attn_dropouts if spec.head == "attentive" else [0.0]
                grid = len(make_grid(params.train.lrs, params.train.weight_decays, dropouts))
                kept = Shape(spec, len(positions), width or shape.dim, grid, token_widths and tuple(token_widths))
                tasks.append(Task(backbone, dataset, probe, kept, classes, sweep, refit))
    return Estimate(caches, tasks)


def disk_need(plans: list[CachePlan], features_root: Path, *, dtype: str) -> tuple[int, int, str | None]:
    """Bytes of the caches not yet written, bytes free on the features disk, and a one-line refusal if short."""
    needed = sum(p.bytes for p in plans if not (features_root / p.backbone / p.dataset / MANIFEST_FILE).is_file())
    where = next(folder for folder in (features_root, *features_root.parents) if folder.exists())
    free, hint = shutil.disk_usage(where).free, ", or set extract.dtype: float16" if dtype != "float16" else ""
    need, has = format_bytes(needed), format_bytes(free)
    refusal = f"feature caches need {need} but {where.resolve()} has {has} free; free space or point paths.features"
    return needed, free, refusal + f" at a larger disk{hint}" if needed > free else None


class _Enough(Exception):
    """Raised from the step callback once enough steps were timed."""


def time_step(shape: Shape, *, batch: int, classes: int, device: torch.device, params: Params) -> float:
    """Seconds per step of `train.train_selected` at this shape, batch and classes, on random features in memory: the
    fastest after a warm-up one, of 3 and a quarter second or of a second (a new shape's first steps set it up). The
    per-layer family's step is its one head's (every layer's cls, ap and cls‖ap heads, `per_layer.FamilyHead`)."""
    from layerprobe.per_layer import FamilyHead, family_jitter
    from layerprobe.train import HParams, train_selected

    features = torch.randn((batch, shape.tokens, shape.width), device=device).to(getattr(torch, params.extract.dtype))
    plan = {"epochs": 1, "min_steps": 40, "batch_size": batch, "batch_plan": "even", "min_batches": 1, "seeds": [0]}
    config = dataclasses.replace(params.train, device=str(device), **plan)
    layers, family = shape.tokens // 2, {}  # a per-layer family reads every layer's cls and ap
    if shape.spec.name == PER_LAYER:
        family = {"head": FamilyHead(layers, shape.grid, shape.width, classes), "jitter": family_jitter(layers)}
    members = family["head"].grid_size if family else shape.grid
    grid = [HParams(1e-3, 1e-4, 0.1 if member and shape.spec.head == "attentive" else 0.0) for member in range(members)]
    marks: list[float] = []

    def on_step(step: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        if len(marks) > 1 and marks[-1] - marks[0] > (1.0 if len(marks) < 4 else 0.25):
            raise _Enough

    head = {"num_classes": classes, "token_widths": shape.token_widths, "grid": grid, "config": config, **family}
    with contextlib.suppress(_Enough):
        train_selected(shape.spec, features, torch.arange(batch) % classes, on_step=on_step, **head)
    return min(b - a for a, b in itertools.pairwise(marks))


def time_forward(backbone: BackboneConfig, params: Params, *, device: torch.device) -> float:
    """Images per second of the extraction's forward (the fastest after a warm-up), random weights and pixels."""
    from layerprobe.backbone import create_backbone, model_data_config
    from layerprobe.extract import LayerTokenExtractor

    model = create_backbone(backbone.model, pretrained=False, model_kwargs=backbone.model_kwargs).to(device)
    extract, size = params.extract, model_data_config(model)["input_size"][-1]
    settings = {name: getattr(extract, name) for name in ("tap", "precision", "final_patch_tokens")}
    extractor = LayerTokenExtractor(model, final_projection=backbone.final_projection, **settings)
    pixels = torch.randn((extract.batch_size if device.type == "cuda" else 8, 3, size, size), device=device)
    seconds = [_seconds(lambda: extractor.forward_all(pixels), device)]  # the warm-up
    while len(seconds) < 4 and sum(seconds[1:]) < 1.0:  # a ViT-L's forward of 8 images takes seconds on a CPU
        seconds.append(_seconds(lambda: extractor.forward_all(pixels), device))
    return len(pixels) / min(seconds[1:])


def time_pretrain_step(backbone: BackboneConfig, *, device: torch.device) -> float:
    """Seconds per step of `pretrain.pretrain`: 8 steps less 2, over 6 (not below half the mean: a busy moment)."""
    from layerprobe.backbone import create_model, model_data_config
    from layerprobe.pretrain import pretrain

    model = create_model(backbone.model, pretrained=False, **{**backbone.model_kwargs, "num_classes": 10})
    recipe, size = backbone.pretrain, model_data_config(model, **backbone.preprocessing())["input_size"][-1]
    images, labels = torch.randn((recipe.batch_size, 3, size, size)), torch.arange(recipe.batch_size) % 10
    configs = [dataclasses.replace(recipe, steps=steps, warmup_steps=1) for steps in (2, 8)]
    run = {"held_out": (images[:2], labels[:2]), "device": device, "progress": False}
    two, eight = (_seconds(lambda c=c: pretrain(model, images, labels, config=c, **run), device) for c in configs)
    return max((eight - two) / 6, eight / 16)


def _seconds(work, device: torch.device) -> float:
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def estimate(params: Params, calibration: dict, *, device: torch.device, save=None, images_per_second=None) -> Estimate:
    """Every task's training, cache's extraction and recipe's pretraining, in seconds, timed on `device` or read from
    `calibration` (what is timed is added, `save` called after each). A probe shape is timed at the study's largest
    batch (on a CPU at most CPU_MAX_BATCH, and one member of a grid over CPU_MAX_GRID), scaled in proportion, and at
    its least and most classes, read off the line between (1000 classes step 75x slower than 2 on 48 tokens)."""
    from layerprobe.device import dtype_name, resolve_matmul_dtype

    can_measure = device.type == "cpu" or torch.cuda.is_available()
    name = torch.cuda.get_device_name(device) if can_measure and device.type == "cuda" else platform.processor()
    described = calibration.setdefault("device", {"type": device.type, "name": name, "torch": torch.__version__})
    if described["type"] != device.type:
        raise ValueError(f"calibration has {described['type']} figures, not {device.type}: name another --calibration")
    # "auto" on a GPU this machine lacks: bfloat16, which every GPU the study targets (Ampere on) multiplies natively
    auto = params.train.precision == "auto" and not can_measure
    precision = "bfloat16" if auto else dtype_name(resolve_matmul_dtype(params.train.precision, device))
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, precision=precision))
    figures, cpu, used = calibration.setdefault("figures", {}), device.type == "cpu", set()
    # Backbone shapes too: a later plan then needs neither timm nor the models (seconds of imports and builds).
    _SHAPES.update({key: BackboneShape(**shape) for key, shape in calibration.get("backbones", {}).items()})
    study = plan_study(params)
    study.overlap = CPU_TASKS_OVERLAP if cpu and task_workers() > 1 else 1.0

    def figure(key: str, measure, label: str) -> float:
        if key not in figures:
            if not can_measure:
                raise ValueError(f"the calibration has no {key!r}: run plan with --device {device.type} where it is")
            print(f"plan: timing {label} on {device.type} ({study.measured + 1})", file=sys.stderr, flush=True)
            figures[key] = measure()
            study.measured += 1
            if save is not None:
                save()
        used.add(key)
        study.reused = len(used) - study.measured
        return figures[key]

    rows = min(max((t.sweep.batch_size for t in study.tasks), default=1), CPU_MAX_BATCH if cpu else math.inf)
    ends = min((t.classes for t in study.tasks), default=1), max((t.classes for t in study.tasks), default=1)

    def step(shape: Shape, batch: int, classes: int) -> float:
        timed = dataclasses.replace(shape, grid=1) if cpu and shape.grid > CPU_MAX_GRID else shape
        timer = functools.partial(time_step, timed, batch=rows, device=device, params=params)
        key = f"{device.type} {precision}|{timed.key} b{rows} c"
        low, high = (figure(key + str(c), functools.partial(timer, classes=c), f"{timed.key} c{c}") for c in ends)
        seconds = low + (high - low) * (classes - ends[0]) / max(ends[1] - ends[0], 1)
        return seconds * batch / rows * shape.grid / timed.grid

    for t in study.tasks:
        sweep = t.sweep.steps * step(t.shape, t.sweep.batch_size, t.classes)
        refit = t.refit.steps * step(dataclasses.replace(t.shape, grid=1), t.refit.batch_size, t.classes)
        study.train[t.key] = len(params.train.seeds) * (sweep + refit) + TASK_SECONDS
    vit_b = images_per_second and backbone_shape(BackboneConfig(model="vit_base_patch16_224")).gflops_per_image
    for cache in study.caches:
        config = params.backbones[cache.backbone]
        if images_per_second:
            rate = images_per_second * vit_b / backbone_shape(config).gflops_per_image
        else:
            what = [config.model, config.model_kwargs, config.final_projection, dataclasses.asdict(params.extract)]
            measure = functools.partial(time_forward, config, params, device=device)
            key = f"{device.type}|forward {json.dumps(what, sort_keys=True)}"
            rate = figure(key, measure, f"{cache.backbone}'s forward")
        study.extraction[cache.key] = cache.num_images / rate
    for name in params.suite.backbones:
        if (config := params.backbones[name]).pretrain is not None:
            what = json.dumps([config.model, config.model_kwargs, config.pretrain.batch_size], sort_keys=True)
            measure = functools.partial(time_pretrain_step, config, device=device)
            seconds = figure(f"{device.type}|pretrain {what}", measure, f"{name}'s pretrain step")
            study.pretrain[name] = config.pretrain.steps * seconds
    calibration["backbones"] = {key: dataclasses.asdict(shape) for key, shape in _SHAPES.items()}
    return study


def load_calibration(path: Path) -> dict:
    """The figures a calibration file holds (none where there is no file yet)."""
    try:
        data = json.loads(Path(path).read_text()) if Path(path).exists() else {"format": FORMAT}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"calibration file {path} is not readable JSON ({e}); delete it to measure again") from e
    found = data.get("format") if isinstance(data, dict) else type(data).__name__
    if found != FORMAT:
        raise ValueError(f"calibration file {path} is in format {found!r}, not {FORMAT!r}: delete it to measure again")
    return data


def format_bytes(count: float) -> str:
    power = min(int(math.log10(max(count, 1)) // 3), 4)
    return f"{int(count)} B" if power == 0 else f"{count / 1000**power:.1f} {'BKMGT'[power]}B"


def format_duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" + (f" ({seconds / 86400:.1f} days)" if seconds >= 48 * 3600 else "")


def format_plan(params: Params, study: Estimate, *, workers: int = 1, list_tasks: bool = False) -> str:
    """The per-backbone and study summary; with `list_tasks` one row per cache and per task first."""
    suite, d, b, stages = params.suite, format_duration, format_bytes, study.stages()
    lines = [
        f"suite {suite.name}: {len(suite.backbones)} backbones x {len(suite.datasets)} datasets x "
        f"{len(suite.probes)} probes = {len(study.tasks)} probe tasks; features as {params.extract.dtype}\n"
    ]
    if list_tasks:
        header = "| backbone | dataset | images | layers x tokens x dim | cache | of which patch tokens | extraction |"
        lines += [header, "|---|---|---:|---|---:|---:|---:|"]
        for c in study.caches:
            sizes = f"{c.num_layers} x {NUM_TOKENS} x {c.dim} | {b(c.bytes)} | {b(c.patch_bytes)}"
            lines += [f"| {c.backbone} | {c.dataset} | {c.num_images:,} | {sizes} | {d(study.extraction[c.key])} |"]
        lines += [f"\nprobe tasks (train.batch_plan: {params.train.batch_plan}; steps = per epoch x epochs)"]
        lines += ["| task | sweep images | batch | steps | refit images | batch | steps | training |"]
        lines += ["|---|---:|---:|---:|---:|---:|---:|---:|"]
        for t in study.tasks:
            lines += [f"| {'/'.join(t.key)} | {_cells(t.sweep)} | {_cells(t.refit)} | {d(study.train[t.key])} |"]
        lines.append("")
    lines += ["| backbone | images | cache | extraction | training |", "|---|---:|---:|---:|---:|"]
    for name in suite.backbones:
        mine = [c for c in study.caches if c.backbone == name]
        cells = [f"{sum(c.num_images for c in mine):,}", b(sum(c.bytes for c in mine))]
        cells += [d(sum(s for k, s in part.items() if k[0] == name)) for part in (study.extraction, study.train)]
        lines += [f"| {name} | " + " | ".join(cells) + " |"]
    parts = {"pretrain": study.pretrain, "extraction": study.extraction, "training": study.train}
    needed, free, _ = disk_need(study.caches, Path(params.paths.features), dtype=params.extract.dtype)
    fixed = f"{STAGE_SECONDS:.0f} s a stage, {FIRST_STAGE_SECONDS:.0f} s once, {TASK_SECONDS + RECORD_SECONDS} s a task"
    runs = " | ".join(f"{s} {d(stages[s])}" for s in STAGES) + f" | total {d(sum(stages.values()))}"
    lines += [
        "\nstudy: " + ", ".join(f"{part} {d(sum(s.values()))}" for part, s in parts.items()),
        f"dvc repro on one machine: {runs} (fixed costs included: {fixed})",
        f"with {workers} worker(s) (layerprobe run --pool): {d(study.workers_wall(workers))}",
        f"disk: {b(needed)} of caches still to write, {b(free)} free",
    ]
    return "\n".join(lines)


def _cells(run: TrainingRun) -> str:
    return f"{run.images:,} | {run.batch_size:,} | {run.steps_per_epoch:,} x {run.epochs:,} = {run.steps:,}"


def estimate_json(study: Estimate, *, workers: int) -> dict:
    """The study's figures for a program (`--json`): per stage, per task, totals."""
    stages, wall = study.stages(), study.workers_wall(workers)
    tasks = {"/".join(key): {"training": seconds} for key, seconds in study.train.items()}
    return {"stages": stages, "total": sum(stages.values()), "workers_wall": wall, "tasks": tasks}
