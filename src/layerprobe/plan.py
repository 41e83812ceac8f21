"""Dry run of a params file: every task, each feature cache's size on disk and what the study costs in time.

Nothing is downloaded and no weights are loaded: backbones are built on the `meta` device, sizes come from the dataset
entries' counts (or their prepared splits), each task's batch size and steps from the training code's `batch_plan`.
Time = steps x the step time of the probe's shape, timed with the training step on the chosen device, + predictions,
+ images / the backbone's images per second (one timed forward, or a given ViT-B/16 rate scaled by FLOPs), +
pretraining's steps x a timed step, + DVC stages' fixed costs. Timings are kept in a calibration file keyed by device
and shape: a later plan, or a machine without that device, reuses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import inspect
import itertools
import json
import math
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from layerprobe.config import MANIFEST_FILE, SPLITS_FILE, BackboneConfig, DatasetConfig, PrepareConfig
from layerprobe.params import Params
from layerprobe.probes import ProbeSpec

FORMAT = "layerprobe-calibration/2"
BYTES_PER_VALUE = {"float16": 2, "float32": 4}
NUM_TOKENS = 2  # cls and ap per layer
# A CPU times steps of at most CPU_MAX_BATCH images, and a grid of more than CPU_MAX_GRID members as one member,
# scaling both in proportion: a paper-sized step takes minutes there, and a dry run must answer in seconds.
CPU_MAX_BATCH, CPU_MAX_GRID = 64, 4
# What a run costs beyond its work, read off benchmarks/plan.py's time-stamped `dvc repro` of the default suite
# (2-core AMD EPYC, 2026-12-07): without them, that run's estimate is half of what it takes.
STAGE_SECONDS = 10.0  # per DVC stage: a Python importing torch, timm and Prefect; DVC hashing, its lock
FIRST_STAGE_SECONDS = 45.0  # once: the Prefect server starting, MLflow making its store, the recipe's images made
TASK_SECONDS = 0.25  # per task trained: reading its cache, writing the probe
RECORD_SECONDS = 0.7  # per task evaluated: its figures and MLflow run
STAGES = ("pretrain", "prepare", "extract", "train", "evaluate", "report")


@dataclass(frozen=True)
class BackboneShape:
    num_blocks: int
    dim: int
    num_tokens: int  # prefix + patch tokens per image
    gflops_per_image: float
    num_patches: int  # patch tokens per image (prefix excluded)
    final_width: int  # width of the final layer's tokens: the projection's for CLIP ports, else dim


@dataclass(frozen=True)
class CachePlan:
    backbone: str
    dataset: str
    num_images: int
    num_layers: int
    dim: int
    bytes: int  # everything the cache holds, patch tokens included
    patch_bytes: int  # of which the final layer's patch tokens (extract.final_patch_tokens)


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
class Shape:
    """What decides a probe step's cost apart from its batch and classes."""

    spec: ProbeSpec
    tokens: int  # K
    width: int  # W, the width tokens are read at
    grid: int  # G, members trained at once
    token_widths: tuple[int, ...] | None = None  # a linear head's unpadded per-token widths

    @property
    def key(self) -> str:
        heads = f" H{self.spec.num_heads or self.tokens}" if self.spec.head == "attentive" else ""
        widths = "" if self.token_widths is None else " widths " + ",".join(map(str, self.token_widths))
        return f"{self.spec.head} K{self.tokens} W{self.width}{heads} G{self.grid}{widths}"


@dataclass(frozen=True)
class Task:
    backbone: str
    dataset: str
    probe: str
    shape: Shape  # the sweep's grid; the refit trains one member of it
    classes: int
    sweep: TrainingRun  # the grid on the tuning split
    refit: TrainingRun  # the best member on train + val
    test_images: int

    @property
    def key(self) -> tuple[str, str, str]:
        return self.backbone, self.dataset, self.probe


@dataclass
class Estimate:
    """Seconds of every part of a study (training includes each task's reading and writing), and how many figures
    were measured now and how many reused."""

    caches: list[CachePlan]
    tasks: list[Task]
    train: dict[tuple[str, str, str], float] = dataclasses.field(default_factory=dict)  # per task
    evaluate: dict[tuple[str, str, str], float] = dataclasses.field(default_factory=dict)
    extraction: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)  # per cache
    pretrain: dict[str, float] = dataclasses.field(default_factory=dict)  # per backbone with a recipe
    measured: int = 0
    reused: int = 0

    def stages(self) -> dict[str, float]:
        """Wall seconds per `dvc repro` stage on one machine, tasks one after the other, fixed costs included."""
        work = {"pretrain": FIRST_STAGE_SECONDS + sum(self.pretrain.values()), "extract": sum(self.extraction.values())}
        work |= {"train": sum(self.train.values()), "evaluate": sum(self.evaluate.values()) + self.recording}
        return {stage: STAGE_SECONDS + work.get(stage, 0.0) for stage in STAGES}

    recording = property(lambda self: RECORD_SECONDS * len(self.tasks))  # the evaluate step's MLflow runs

    def workers_wall(self, workers: int) -> float:
        """Wall seconds of `layerprobe run --pool`: each backbone x dataset unit extracts, trains and scores its probes
        on one of `workers`; pretraining before them, and the MLflow recording and the report after, run once."""
        units = dict(self.extraction)
        for key, seconds in self.train.items():
            units[key[:2]] += seconds + self.evaluate[key]
        head = self.stages()["pretrain"] + 3 * STAGE_SECONDS + self.recording  # a unit's start, evaluate, report
        return head + makespan(list(units.values()), workers)


def makespan(durations: list[float], workers: int) -> float:
    """Wall time of jobs handed longest first to whichever of `workers` is free first (LPT scheduling)."""
    loads = [0.0] * max(1, workers)
    for duration in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + duration)
    return max(loads)


def backbone_shape(config: BackboneConfig) -> BackboneShape:
    """Block count, width, tokens and forward GFLOPs of a timm ViT, built on the meta device (no memory, no weights);
    remembered per architecture (building one still runs its initialisers: about a second for a ViT-L)."""
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
    with torch.device("meta"):  # the full name when it has a tag: the tag's config sets CLIP's projection width
        name = config.model if config.model in timm.list_pretrained() else base
        model = timm.create_model(name, pretrained=False, **config.model_kwargs)
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed"):
        raise ValueError(f"backbone {config.model!r} is not a ViT with blocks and patch tokens")
    patches, dim, head = int(model.patch_embed.num_patches), int(model.embed_dim), getattr(model, "head", None)
    tokens = patches + getattr(model, "num_prefix_tokens", 1)
    final_width = int(head.out_features) if config.final_projection and isinstance(head, torch.nn.Linear) else dim
    # 2 FLOPs per weight per token for the linear layers, plus QK^T and AV (2 * 2 * tokens^2 * dim per block).
    flops = 2 * sum(p.numel() for p in blocks.parameters()) * tokens + 4 * len(blocks) * tokens * tokens * dim
    return BackboneShape(len(blocks), dim, tokens, flops / 1e9, patches, final_width)


def _splits(prepared_dir: Path) -> dict | None:
    path = prepared_dir / SPLITS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def dataset_size(name: str, config: DatasetConfig, prepared_dir: Path) -> int:
    """Images to extract: the prepared split index if present, else the entry's recorded counts, else its options,
    else (a source made here) the source's own count."""
    if splits := _splits(prepared_dir):
        return int(sum(len(ix) for ix in splits["splits"].values()))
    if config.num_images or "num_images" in config.options:
        return int(sum(config.num_images.values()) if config.num_images else config.options["num_images"])
    from layerprobe.data import create_dataset, is_materialised

    if is_materialised(config.source):  # generated or bundled here (digits): make it to count it
        return len(create_dataset(config.source, **config.options))
    raise ValueError(f"dataset {name!r}: size unknown before preparing; record it as datasets.{name}.num_images")


def split_sizes(name: str, config: DatasetConfig, prepared_dir: Path, *, prepare: PrepareConfig) -> tuple[int, ...]:
    """(tuning split, train + val, test) images: from the prepared split index if present, else cut from the entry's
    counts as prepare cuts them (`train_test_split` rounds the cut up; a stratified cut can differ by an image)."""
    if splits := _splits(prepared_dir):
        train, val, test = (len(splits["splits"][split]) for split in ("train", "val", "test"))
        return train, train + val, test
    if config.num_images and {"train", "test"} <= set(config.num_images):  # an official test split
        full, test = int(config.num_images["train"]), int(config.num_images["test"])
    else:
        total = dataset_size(name, config, prepared_dir)
        test = math.ceil(prepare.test_fraction * total)
        full = total - test
    return full - math.ceil(prepare.val_fraction * full), full, test


def dataset_classes(name: str, config: DatasetConfig, prepared_dir: Path) -> int:
    """Classes of a dataset: its entry's count, else its prepared split index, else the source itself."""
    if config.num_classes or (splits := _splits(prepared_dir)):
        return int(config.num_classes or len(splits["class_names"]))
    from layerprobe.data import create_dataset

    try:
        return len(create_dataset(config.source, **config.options).class_names)
    except (OSError, ValueError) as e:
        raise ValueError(f"dataset {name!r}: class count unknown; record it as datasets.{name}.num_classes") from e


def check_dataset_entry(name: str, config: DatasetConfig) -> None:
    """A dataset entry is complete: its source is registered and accepts the given options."""
    from layerprobe.data import source_factory

    parameters = inspect.signature(source_factory(config.source)).parameters  # unknown source: did-you-mean error
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    for key in set(config.options) - set(parameters):
        choices = ", ".join(parameters)
        raise ValueError(f"datasets.{name}.options.{key}: source {config.source!r} takes no such option ({choices})")


def plan_suite(params: Params) -> list[CachePlan]:
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
        # The patch tokens are stored at the final layer's own width (unpadded), P of them per image.
        patch = shape.num_patches * shape.final_width * value_bytes if params.extract.final_patch_tokens else 0
        for dataset, n in sizes.items():
            cache = n * layers * NUM_TOKENS * shape.dim * value_bytes + n * patch
            plans.append(CachePlan(backbone, dataset, n, layers, shape.dim, cache, n * patch))
    return plans


def disk_need(plans: list[CachePlan], features_root: Path) -> tuple[int, int, Path]:
    """Bytes of the caches not yet written, bytes free on the features disk, and the nearest existing folder there."""
    needed = sum(p.bytes for p in plans if not (features_root / p.backbone / p.dataset / MANIFEST_FILE).is_file())
    existing = features_root
    while not existing.exists():
        existing = existing.parent
    return needed, shutil.disk_usage(existing).free, existing


def check_disk(plans: list[CachePlan], features_root: Path, *, dtype: str = "float16") -> tuple[int, int]:
    """Refuse, in one line, caches still to write that would not fit on the features disk; else (needed, free)."""
    needed, free, where = disk_need(plans, features_root)
    if needed > free:
        hint = ", or set extract.dtype: float16" if dtype != "float16" else ""
        raise ValueError(
            f"feature caches need {format_bytes(needed)} but {where.resolve()} has {format_bytes(free)} free; "
            f"free space or point paths.features at a larger disk{hint}"
        )
    return needed, free


def probe_tasks(params: Params) -> list[Task]:
    """Every (backbone, dataset, probe): the shape its probe trains at (selected from the backbone's layers as
    training selects them), its sweep's and refit's steps (`train.batch_plan`) and its test images."""
    from layerprobe.probes import get_probe_spec, reading_widths, select_token_positions
    from layerprobe.train import batch_plan, make_grid

    tasks = []
    for backbone in params.suite.backbones:
        shape = backbone_shape(params.backbones[backbone])
        layers = [f"block{i}" for i in range(shape.num_blocks)] + ["final"]
        widths = [shape.dim] * shape.num_blocks + [shape.final_width]
        for dataset in params.suite.datasets:
            config, prepared = params.datasets[dataset], params.paths.prepared_dir(dataset)
            tuning, full, test = split_sizes(dataset, config, prepared, prepare=params.prepare)
            sweep, refit = (TrainingRun(n, *batch_plan(n, params.train, plan_size=full)) for n in (tuning, full))
            classes = dataset_classes(dataset, config, prepared)
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
                tasks.append(Task(backbone, dataset, probe, kept, classes, sweep, refit, test))
    return tasks


# ---------------------------------------------------------------------------------------------- timing the work


class _Enough(Exception):
    """Raised from the step callback once enough steps were timed."""


def time_step(shape: Shape, *, batch: int, classes: int, device: torch.device, params: Params) -> dict[str, float]:
    """Seconds per optimisation step of `train.train_selected` at this shape, batch and classes (the median of the
    steps after a warm-up one: at least 3 and a quarter second, or one past half a second), and per image predicted."""
    from layerprobe.probes import build_probe
    from layerprobe.train import HParams, predict_selected, train_selected

    dtype = torch.float16 if params.extract.dtype == "float16" else torch.float32
    features = torch.randn((batch, shape.tokens, shape.width), device=device).to(dtype)
    config = dataclasses.replace(params.train, epochs=1, min_steps=40, batch_size=batch, batch_plan="even")
    config = dataclasses.replace(config, min_batches=1, device=str(device), seeds=[0])
    attentive = shape.spec.head == "attentive"
    grid = [HParams(1e-3, 1e-4, 0.1 if member and attentive else 0.0) for member in range(shape.grid)]
    marks: list[float] = []

    def on_step(step: int) -> None:
        _synchronize(device)
        marks.append(time.perf_counter())
        elapsed = marks[-1] - marks[0]
        if (len(marks) > 3 and elapsed > 0.25) or (len(marks) > 1 and elapsed > 0.5):  # a long step varies little
            raise _Enough

    common = {"num_classes": classes, "token_widths": shape.token_widths}
    with contextlib.suppress(_Enough):
        train_selected(
            shape.spec, features, torch.arange(batch) % classes, grid=grid, config=config, on_step=on_step, **common
        )
    probe = build_probe(shape.spec, num_tokens=shape.tokens, dim=shape.width, grid_size=shape.grid, **common)
    probe = probe.to(device).eval()
    start = time.perf_counter()
    predict_selected(probe, features, batch_size=batch, normalize=shape.spec.normalize)
    _synchronize(device)
    step = statistics.median(b - a for a, b in itertools.pairwise(marks))
    return {"step": step, "predict": (time.perf_counter() - start) / batch}


def time_forward(backbone: BackboneConfig, params: Params, *, device: torch.device) -> float:
    """Images per second of the extraction's forward at its tap (the median of 3 after a warm-up one), for a randomly
    initialised copy of `backbone` on random pixels."""
    from layerprobe.backbone import create_backbone, model_data_config
    from layerprobe.extract import LayerTokenExtractor

    model = create_backbone(backbone.model, pretrained=False, model_kwargs=backbone.model_kwargs).to(device)
    extract, size = params.extract, model_data_config(model)["input_size"][-1]
    settings = {name: getattr(extract, name) for name in ("tap", "precision", "final_patch_tokens")}
    extractor = LayerTokenExtractor(model, final_projection=backbone.final_projection, **settings)
    pixels = torch.randn((extract.batch_size if device.type == "cuda" else 8, 3, size, size), device=device)
    seconds = []
    for _ in range(4):
        start = time.perf_counter()
        extractor.forward_all(pixels)
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return len(pixels) / statistics.median(seconds[1:])


def time_pretrain_step(backbone: BackboneConfig, *, device: torch.device) -> float:
    """Seconds per step of the backbone's pretrain recipe (`pretrain.pretrain` at 2 and 8 steps, random images)."""
    from layerprobe.backbone import create_model, model_data_config
    from layerprobe.pretrain import pretrain

    model = create_model(backbone.model, pretrained=False, **{**backbone.model_kwargs, "num_classes": 10})
    recipe, size = backbone.pretrain, model_data_config(model, **backbone.preprocessing())["input_size"][-1]
    images, labels = torch.randn((recipe.batch_size, 3, size, size)), torch.arange(recipe.batch_size) % 10
    seconds = []
    for steps in (2, 8):
        start = time.perf_counter()
        config = dataclasses.replace(recipe, steps=steps, warmup_steps=1)
        pretrain(model, images, labels, held_out=(images[:2], labels[:2]), config=config, device=device, progress=False)
        seconds.append(time.perf_counter() - start)
    return max((seconds[1] - seconds[0]) / 6, seconds[1] / 16)  # not below half the mean: a busy moment


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ the estimate


def estimate(params: Params, calibration: dict, *, device: torch.device, save=None, images_per_second=None) -> Estimate:
    """Every task's training and evaluation, cache's extraction and recipe's pretraining, in seconds.

    A probe shape is timed at its tasks' largest batch (on a CPU at most CPU_MAX_BATCH images and CPU_MAX_GRID
    members, scaled in proportion) and at their least and most classes (read off the line between), on `device` when
    this machine has one, else read from `calibration` (another machine's file); what is measured is added to it, and
    `save` called after each figure, so a plan stopped half-way keeps what it measured."""
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
    figures, cpu, seeds = calibration.setdefault("figures", {}), device.type == "cpu", len(params.train.seeds)
    # Backbone shapes too: a later plan then needs neither timm nor the models (seconds of imports and builds).
    _SHAPES.update({key: BackboneShape(**shape) for key, shape in calibration.get("backbones", {}).items()})
    study, used = Estimate(plan_suite(params), probe_tasks(params)), set()

    def measured(key: str, measure, label: str = ""):
        if key in figures:
            study.reused += key not in used
        elif not can_measure:
            raise ValueError(f"the calibration has no {key!r}: run plan with --device {device.type} where there is one")
        else:
            print(f"plan: timing {label or key} on {device.type} ({study.measured + 1})", file=sys.stderr, flush=True)
            figures[key] = measure()
            study.measured += 1
            if save is not None:
                save()
        used.add(key)
        return figures[key]

    runs: dict[Shape, list[tuple[int, int]]] = {}  # every (batch, classes) each shape trains at
    for t in study.tasks:
        runs.setdefault(t.shape, []).append((t.sweep.batch_size, t.classes))
        runs.setdefault(dataclasses.replace(t.shape, grid=1), []).append((t.refit.batch_size, t.classes))

    def seconds(shape: Shape, batch: int, classes: int, what: str) -> float:
        timed = dataclasses.replace(shape, grid=1) if cpu and shape.grid > CPU_MAX_GRID else shape
        rows = min(max(b for b, _ in runs[shape]), CPU_MAX_BATCH if cpu else math.inf)
        points = {}
        for c in {min(c for _, c in runs[shape]), max(c for _, c in runs[shape])}:
            key = f"{device.type} {precision}|{timed.key} b{rows} c{c}"
            points[c] = measured(key, lambda c=c: time_step(timed, batch=rows, classes=c, device=device, params=params))
        (c0, y0), (c1, y1) = min(points.items()), max(points.items())
        at = y0[what] if c1 == c0 else y0[what] + (y1[what] - y0[what]) * (classes - c0) / (c1 - c0)
        return at * (batch / rows if what == "step" else 1.0) * shape.grid / timed.grid

    for t in study.tasks:
        member, sweep, refit = dataclasses.replace(t.shape, grid=1), t.sweep, t.refit
        train = sweep.steps * seconds(t.shape, sweep.batch_size, t.classes, "step")
        train += (refit.images - sweep.images) * seconds(t.shape, sweep.batch_size, t.classes, "predict")  # validation
        train += refit.steps * seconds(member, refit.batch_size, t.classes, "step")
        study.train[t.key] = seeds * train + TASK_SECONDS
        study.evaluate[t.key] = seeds * t.test_images * seconds(member, refit.batch_size, t.classes, "predict")
    vit_b = images_per_second and backbone_shape(BackboneConfig(model="vit_base_patch16_224")).gflops_per_image
    for cache in study.caches:
        config = params.backbones[cache.backbone]
        if images_per_second:
            rate = images_per_second * vit_b / backbone_shape(config).gflops_per_image
        else:
            what = [config.model, config.model_kwargs, config.final_projection, dataclasses.asdict(params.extract)]
            key = f"{device.type}|forward {json.dumps(what, sort_keys=True)}"
            rate = measured(key, lambda c=config: time_forward(c, params, device=device), f"{cache.backbone}'s forward")
        study.extraction[(cache.backbone, cache.dataset)] = cache.num_images / rate
    for name in params.suite.backbones:
        if (config := params.backbones[name]).pretrain is not None:
            what = json.dumps([config.model, config.model_kwargs, config.pretrain.batch_size], sort_keys=True)
            key, label = f"{device.type}|pretrain {what}", f"{name}'s pretrain step"
            step = measured(key, lambda c=config: time_pretrain_step(c, device=device), label)
            study.pretrain[name] = config.pretrain.steps * step
    calibration["backbones"] = {key: dataclasses.asdict(shape) for key, shape in _SHAPES.items()}
    return study


def load_calibration(path: Path) -> dict:
    """The figures a calibration file holds ({} when there is none yet)."""
    try:
        data = json.loads(Path(path).read_text()) if Path(path).is_file() else {"format": FORMAT}
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"calibration file {path} is not readable JSON ({e}); delete it to measure again") from e
    if data.get("format") != FORMAT:
        raise ValueError(f"calibration file {path} is in format {data.get('format')!r}, not {FORMAT!r}: delete it")
    return data


def save_calibration(path: Path, data: dict) -> None:
    from layerprobe.files import write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(path), data)


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
    return f"{seconds / 3600:.1f} h" + (f" ({seconds / 86400:.1f} days)" if seconds >= 48 * 3600 else "")


def format_plan(params: Params, study: Estimate, *, workers: int = 1, list_tasks: bool = False) -> str:
    """The per-backbone and study summary; with `list_tasks` one row per cache and per task first."""
    suite, d, stages, lines = params.suite, format_duration, study.stages(), []
    lines.append(
        f"suite {suite.name}: {len(suite.backbones)} backbones x {len(suite.datasets)} datasets x "
        f"{len(suite.probes)} probes = {len(study.tasks)} probe tasks; features as {params.extract.dtype}\n"
    )
    if list_tasks:
        lines += [
            "| backbone | dataset | images | layers x tokens x dim | cache | of which patch tokens | extraction |"
        ]
        lines += ["|---|---|---:|---|---:|---:|---:|"]
        for c in study.caches:
            sizes = f"{format_bytes(c.bytes)} | {format_bytes(c.patch_bytes)}"
            lines.append(
                f"| {c.backbone} | {c.dataset} | {c.num_images:,} | {c.num_layers} x {NUM_TOKENS} x {c.dim} | "
                f"{sizes} | {d(study.extraction[c.backbone, c.dataset])} |"
            )
        lines += [f"\nprobe tasks (train.batch_plan: {params.train.batch_plan}; steps = per epoch x epochs)"]
        lines += ["| task | sweep images | batch | steps | refit images | batch | steps | training | evaluation |"]
        lines += ["|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for t in study.tasks:
            key = (t.backbone, t.dataset, t.probe)
            cells = f"{_run_cells(t.sweep)} | {_run_cells(t.refit)} | {d(study.train[key])} | {d(study.evaluate[key])}"
            lines.append(f"| {'/'.join(key)} | {cells} |")
        lines.append("")
    lines += ["| backbone | images | cache | extraction | training | evaluation |", "|---|---:|---:|---:|---:|---:|"]
    for b in suite.backbones:
        mine = [c for c in study.caches if c.backbone == b]
        extract, train, evaluate = (
            d(sum(s for k, s in part.items() if k[0] == b)) for part in (study.extraction, study.train, study.evaluate)
        )
        images, size = sum(c.num_images for c in mine), format_bytes(sum(c.bytes for c in mine))
        lines.append(f"| {b} | {images:,} | {size} | {extract} | {train} | {evaluate} |")
    parts = {"pretrain": study.pretrain, "extraction": study.extraction, "training": study.train}
    needed, free, _ = disk_need(study.caches, Path(params.paths.features))
    fixed = f"{STAGE_SECONDS:.0f} s a stage, {FIRST_STAGE_SECONDS:.0f} s once, {TASK_SECONDS + RECORD_SECONDS} s a task"
    lines += [
        "\nstudy: "
        + ", ".join(f"{part} {d(sum(s.values()))}" for part, s in parts.items())
        + f", evaluation {d(sum(study.evaluate.values()))}",
        "dvc repro on one machine: "
        + " | ".join(f"{s} {d(stages[s])}" for s in STAGES)
        + f" | total {d(sum(stages.values()))} (fixed costs included: {fixed})",
        f"with {workers} worker(s) (layerprobe run --pool): {d(study.workers_wall(workers))}",
        f"disk: {format_bytes(needed)} of caches still to write, {format_bytes(free)} free",
    ]
    return "\n".join(lines)


def _run_cells(run: TrainingRun) -> str:
    return f"{run.images:,} | {run.batch_size:,} | {run.steps_per_epoch:,} x {run.epochs:,} = {run.steps:,}"


def estimate_json(study: Estimate, *, workers: int) -> dict:
    """The study's figures for a program (`--json`): per stage, per task, totals."""
    tasks = {"/".join(k): {"training": s, "evaluation": study.evaluate[k]} for k, s in study.train.items()}
    stages = study.stages()
    return {
        "stages": stages,
        "total": sum(stages.values()),
        "workers_wall": study.workers_wall(workers),
        "tasks": tasks,
    }
