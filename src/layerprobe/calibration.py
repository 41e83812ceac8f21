"""Measured costs that `layerprobe plan` multiplies out, each timed with the code that will do the work.

- probe steps: `train.train_selected` (the grid of a sweep, the G=1 refit) on random tensors of a task's shape for a
  few optimisation steps after a warm-up step, and `train.predict_selected` (the validation pass, evaluation);
- extraction: the extract step on a small prepared copy of a generated dataset (prepare + extract, timed at two
  sizes), or, where the images cannot be made here (webdatasets), the backbone forward and shard writes on random
  pixel batches (`extract.write_token_shards`) plus the decode and resize of a photo-sized JPEG;
- pretraining: `pretrain.pretrain` steps and the recipe's image generation;
- the train and evaluate steps' own costs (reading, scoring, bootstrap, writing) on a tiny cache, and a process's
  start-up (Python importing torch, timm and Prefect), which every stage pays.

Measurements are kept in a JSON file (`--calibration FILE`: device, shapes, step times, images/s), keyed by device
and shape, so a second plan reuses them and a CPU-only head node can price a study from a file a GPU machine wrote.
Cost: seconds for the default suite; minutes for the paper's on a CPU (shapes are timed at batches up to
`max_batch` and the step time extrapolated along the batch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerprobe.config import (
    BackboneConfig,
    DatasetConfig,
    EvaluateConfig,
    ExtractConfig,
    PrepareConfig,
    TrainConfig,
)

FORMAT = "layerprobe-calibration/1"
TIMED_STEPS = (3, 40)  # at least / at most this many timed steps after the warm-up step...
# ...stopping after the first number that has taken this long: a GPU's steps are steady, a shared CPU's are not
TIMED_SECONDS = {"cpu": 1.0, "cuda": 0.25}


@dataclass(frozen=True)
class ProbeShape:
    """What decides a probe step's cost, apart from its batch and classes (which are measured points)."""

    head: str  # linear | attentive
    tokens: int  # K
    width: int  # W, the width tokens are read at
    heads: int  # attentive heads (0 for a linear head)
    grid: int  # G, members trained at once
    precision: str  # the probe matmuls' dtype
    token_widths: tuple[int, ...] | None = None  # a linear head's unpadded per-token widths

    @property
    def key(self) -> str:
        widths = "" if self.token_widths is None else " widths " + ",".join(map(str, self.token_widths))
        heads = f" H{self.heads}" if self.head == "attentive" else ""
        return f"{self.head} K{self.tokens} W{self.width}{heads} G{self.grid} {self.precision}{widths}"

    def member(self) -> ProbeShape:
        """The same probe alone (the refit)."""
        return dataclasses.replace(self, grid=1)

    def work(self, batch: int, classes: int) -> float:
        """Multiply-adds of one step (forward and backward), to scale a measured shape to an unmeasured one."""
        if self.head == "linear":
            features = sum(self.token_widths) if self.token_widths else self.tokens * self.width
            per_image = features * classes
        else:
            head_width = 2 * (self.width // self.heads)
            per_image = (2 * self.heads * self.tokens * self.width + 2 * self.heads * head_width * self.width
                         + self.width * classes)  # fmt: skip
        return 3.0 * batch * self.grid * per_image + batch * self.tokens * self.width


def device_description(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model() or platform.processor() or platform.machine()
    return {"type": device.type, "name": name, "threads": torch.get_num_threads(), "torch": torch.__version__}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Enough(Exception):
    """Raised from the step callback once enough steps were timed."""


def _spec(shape: ProbeShape):
    from layerprobe.probes import ProbeSpec

    return ProbeSpec("plan", layers="last", tokens=("cls",), head=shape.head,
                     num_heads=shape.heads if shape.head == "attentive" else None)  # fmt: skip


def _grid(shape: ProbeShape):
    from layerprobe.train import HParams

    # Attention dropout on every member but the first, as a grid over {0, 0.1, 0.3} mostly has it.
    return [HParams(1e-3, 1e-4, 0.0 if member == 0 or shape.head == "linear" else 0.1) for member in range(shape.grid)]


def _features(shape: ProbeShape, rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn((rows, shape.tokens, shape.width), generator=generator, device=device).to(dtype)


_FIRST_TRAINING: dict[str, float] = {}


def warm_up(device: torch.device) -> float:
    """Seconds of this process's first training run on `device`, a tiny one: torch loads what its optimiser step
    needs (torch._dynamo, ~5-10 s on a 2-core machine), and CUDA makes its context. Every process that trains pays
    it once, and no step timed after it does. Later calls return the first figure without training."""
    if device.type not in _FIRST_TRAINING:
        from layerprobe.train import predict_selected, train_selected

        tiny = ProbeShape(head="attentive", tokens=2, width=8, heads=2, grid=2, precision="float32")
        config = TrainConfig(epochs=1, min_steps=3, batch_size=8, min_batches=1, device=str(device),
                             precision="float32")  # fmt: skip
        start = time.perf_counter()
        trained = train_selected(_spec(tiny), torch.randn(16, 2, 8, device=device), torch.arange(16) % 2,
                                 num_classes=2, grid=_grid(tiny), config=config)  # fmt: skip
        predict_selected(trained.probe, torch.randn(16, 2, 8))
        synchronize(device)
        _FIRST_TRAINING[device.type] = time.perf_counter() - start
    return _FIRST_TRAINING[device.type]


def time_probe(
    shape: ProbeShape, *, batch: int, classes: int, device: torch.device, train: TrainConfig, cache_dtype: torch.dtype
) -> dict[str, float]:
    """Seconds per optimisation step of `train.train_selected` for this shape at this batch and class count (median
    of the timed steps after one warm-up step), the seconds before the first step beyond a step (building the probe
    and optimizer), the seconds of a step's data path alone (gathering the batch, copying it to the device,
    normalising and jittering it, as the step does), and the seconds per image of `train.predict_selected` (eval
    mode, all members)."""
    from layerprobe.train import train_selected

    warm_up(device)
    features = _features(shape, 2 * batch, device, cache_dtype)  # two batches an epoch
    labels = torch.arange(2 * batch, device=device) % classes
    config = dataclasses.replace(train, epochs=1, min_steps=1 + TIMED_STEPS[1], batch_size=batch, min_batches=1,
                                 batch_plan="even", device=str(device), seeds=[0])  # fmt: skip
    marks: list[float] = []

    def on_step(step: int) -> None:
        synchronize(device)
        marks.append(time.perf_counter())
        timed, elapsed, enough = len(marks) - 1, marks[-1] - marks[0], TIMED_SECONDS[device.type]
        # Steps of several seconds (a CPU timing the paper's shapes) vary little: two of them suffice.
        if (timed >= TIMED_STEPS[0] and elapsed >= enough) or (timed >= 2 and elapsed >= 5 * enough):
            raise _Enough

    synchronize(device)
    start = time.perf_counter()
    try:
        train_selected(_spec(shape), features, labels, num_classes=classes, grid=_grid(shape), config=config,
                       seed=0, token_widths=shape.token_widths, on_step=on_step)  # fmt: skip
    except _Enough:
        pass
    steps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    step = statistics.median(steps)
    setup = max(0.0, marks[0] - start - step)
    data = time_data_path(features, batch=batch, device=device, train=config)
    predict = time_predict(shape, batch=batch, classes=classes, device=device, cache_dtype=cache_dtype)
    del features
    return {"step_seconds": step, "setup_seconds": setup, "data_seconds": min(data, step),
            "predict_seconds_per_image": predict, "steps_timed": len(steps)}  # fmt: skip


def time_data_path(features: torch.Tensor, *, batch: int, device: torch.device, train: TrainConfig) -> float:
    """Seconds of one step's data path as `train.train_selected` runs it: a shuffled batch gathered, moved to the
    device, made float32, normalised and jittered (median of five after a warm-up)."""
    from layerprobe.probes import normalize_selection
    from layerprobe.train import jitter_tokens, read_rows

    shuffle, jitter = torch.Generator().manual_seed(0), torch.Generator(device=device).manual_seed(1)
    times = []
    for _ in range(6):
        synchronize(device)
        start = time.perf_counter()
        rows = torch.randperm(len(features), generator=shuffle)[:batch].to(device)
        x = normalize_selection(read_rows(features, rows).to(device).float())
        jitter_tokens(x, std=train.jitter_std, prob=train.jitter_prob, generator=jitter)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def time_host_batches(device: torch.device, *, rows: int = 512, tokens: int = 197, width: int = 768) -> float:
    """Bytes per second of a step's batch gathered on the host and copied to `device` (a selection too large for
    half the device's memory stays on the host)."""
    from layerprobe.train import read_rows

    features = torch.randn((4 * rows, tokens, width)).half()
    shuffle = torch.Generator().manual_seed(0)
    times = []
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        read_rows(features, torch.randperm(len(features), generator=shuffle)[:rows]).to(device)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return rows * tokens * width * 2 / statistics.median(times[1:])


def time_streamed_reads(*, rows: int = 2048, patches: int = 64, width: int = 256, batch: int = 256) -> float:
    """Bytes per second the batch-by-batch reader (`selection.StreamedSelection`) reads shuffled rows of a cache
    written just before (so from the page cache: a cold disk reads slower)."""
    import numpy as np

    from layerprobe.features import patch_shard_name, shard_name, write_manifest, write_patch_shard, write_shard
    from layerprobe.probes import gather_raw
    from layerprobe.selection import open_selection

    rng = np.random.default_rng(0)
    provenance = {"layer_names": ["final"], "token_names": ["cls", "ap"], "dtype": "float16",
                  "final_patch_tokens": True}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="layerprobe-plan-") as root:
        shards, patch_files = [], []
        for number in range(4):
            indices = np.arange(number * rows // 4, (number + 1) * rows // 4)
            name = shard_name(number)
            tokens = rng.standard_normal((len(indices), 1, 2, width)).astype(np.float16)
            sha = write_shard(Path(root) / name, tokens=tokens, labels=indices % 2, indices=indices,
                              splits=np.full(len(indices), "train"), metadata=provenance)  # fmt: skip
            grid = rng.standard_normal((len(indices), patches, width)).astype(np.float16)
            patch_sha = write_patch_shard(Path(root) / patch_shard_name(name), patches=grid, indices=indices,
                                          metadata=provenance)  # fmt: skip
            shards.append((name, len(indices), sha))
            patch_files.append((patch_shard_name(name), patch_sha))
        write_manifest(root, provenance=provenance, shards=shards, splits=["train"], plan_sha256="plan",
                       patch_shards=patch_files)  # fmt: skip
        positions = [(0, 0), *[(0, 2 + p) for p in range(patches)]]
        selection = open_selection(root, splits=["train"], patches=True, stream=True,
                                   select=lambda t, p: gather_raw(t, positions, patches=p))  # fmt: skip
        shuffle = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for _ in range(rows // batch):
            selection.features.read(torch.randperm(rows, generator=shuffle)[:batch])
        seconds = time.perf_counter() - start
    row_bytes = (2 * width + patches * width) * 2
    return rows * row_bytes / seconds


def time_predict(
    shape: ProbeShape, *, batch: int, classes: int, device: torch.device, cache_dtype: torch.dtype
) -> float:
    """Seconds per image of `train.predict_selected` (eval mode, every member) on a batch of `batch` images."""
    from layerprobe.probes import build_probe
    from layerprobe.train import predict_selected

    warm_up(device)
    features = _features(shape, batch, torch.device("cpu"), cache_dtype)
    probe = build_probe(_spec(shape), num_tokens=shape.tokens, dim=shape.width, num_classes=classes,
                        grid_size=shape.grid, token_widths=shape.token_widths).to(device).eval()  # fmt: skip
    times = []
    for _ in range(3):  # the first pays for allocations
        synchronize(device)
        start = time.perf_counter()
        predict_selected(probe, features, batch_size=batch)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times[1:]) / batch


def time_concurrent_speedup(
    runs: list[tuple[ProbeShape, int, int, int]], *, train: TrainConfig, cache_dtype: torch.dtype
) -> float:
    """How much faster two CPU trainings run side by side in one process, as a stage's flow runs its tasks two at a
    time, than one after the other: their times alone over their time together. `runs` holds two (shape, batch,
    classes, steps), the shapes that take most of the training time."""
    from layerprobe.train import train_selected

    device = torch.device("cpu")
    warm_up(device)

    def trainer(shape: ProbeShape, batch: int, classes: int, steps: int) -> Callable[[], None]:
        features = _features(shape, 2 * batch, device, cache_dtype)
        labels = torch.arange(2 * batch) % classes
        config = dataclasses.replace(train, epochs=1, min_steps=steps, batch_size=batch, min_batches=1,
                                     batch_plan="even", device="cpu", seeds=[0])  # fmt: skip
        return lambda: train_selected(_spec(shape), features, labels, num_classes=classes, grid=_grid(shape),
                                      config=config, token_widths=shape.token_widths)  # fmt: skip

    jobs = [trainer(*run) for run in runs]
    for job in jobs:
        job()  # warm-up
    alone, together = [], []
    for _ in range(2):  # alternated, so a change in the machine's load hits both
        start = time.perf_counter()
        for job in jobs:
            job()
        alone.append(time.perf_counter() - start)
        threads = [threading.Thread(target=job) for job in jobs]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        together.append(time.perf_counter() - start)
    # Two tasks can at most halve the time; more than that was the load changing, not the tasks overlapping.
    return min(2.0, max(0.5, sum(alone) / sum(together)))


def time_process_start(device: torch.device) -> dict[str, float]:
    """What a fresh stage process pays before its work, timed in one: importing torch, timm, Prefect and the training
    code; importing MLflow (the stages that log: pretrain, evaluate, report); its first training on `device`
    (`warm_up`: torch._dynamo loads at the first optimiser step, unless timm loaded it already, which the train
    stage does not import: so it trains before importing timm here)."""
    code = (
        "import time; import prefect, torch; import layerprobe.workflow.train, layerprobe.train\n"
        "from layerprobe.calibration import warm_up\n"
        f"first = warm_up(torch.device({device.type!r}))\n"
        "import timm; start = time.perf_counter(); import mlflow; print(time.perf_counter() - start, first)"
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env={**os.environ})
    wall = time.perf_counter() - start
    mlflow_import, first_training = (float(value) for value in done.stdout.split()[-2:])
    return {"process_start": wall - mlflow_import - first_training, "mlflow_import": mlflow_import,
            "first_training": first_training}  # fmt: skip


def time_backbone_forward(
    backbone: BackboneConfig, extract: ExtractConfig, *, device: torch.device, max_batch: int
) -> dict[str, float]:
    """Seconds per image of the extraction's tensor path (backbone forward at the tap, pooling, host copy, shard
    writes: `extract.write_token_shards`) on random pixel batches, for a randomly initialised copy of `backbone`."""
    import numpy as np

    from layerprobe.backbone import create_backbone, model_data_config
    from layerprobe.extract import LayerTokenExtractor, ShardPlan, write_token_shards
    from layerprobe.features import shard_name

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        model = create_backbone(backbone.model, pretrained=False, model_kwargs=backbone.model_kwargs).to(device)
    build = time.perf_counter() - start
    size = model_data_config(model)["input_size"][-1]
    extractor = LayerTokenExtractor(model, tap=extract.tap, final_projection=backbone.final_projection,
                                    precision=extract.precision,
                                    final_patch_tokens=extract.final_patch_tokens)  # fmt: skip
    batch = min(extract.batch_size, max_batch)
    rounds = 3 if device.type == "cuda" else 2
    generator = torch.Generator(device=device).manual_seed(0)
    pixels = torch.randn((batch, 3, size, size), generator=generator, device=device)
    extractor.forward_all(pixels)  # warm-up
    count = batch * rounds
    indices = np.arange(count)
    plans = [ShardPlan(file=shard_name(0), indices=indices, labels=np.zeros(count, dtype=np.int64),
                       splits=np.full(count, "train", dtype=object))]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="layerprobe-plan-") as out_dir:
        synchronize(device)
        start = time.perf_counter()
        write_token_shards((pixels for _ in range(rounds)), extractor=extractor, shards=plans, out_dir=out_dir,
                           metadata={"plan": True}, dtype=extract.dtype, device=device, batch_size=batch,
                           progress=False)  # fmt: skip
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"seconds_per_image": seconds / count, "build_seconds": build, "batch": batch, "input_size": size}


def time_decode(*, backbone: BackboneConfig, width: int = 500, height: int = 375) -> float:
    """CPU seconds to decode a photo-sized JPEG and apply `backbone`'s eval transform (the data path a DataLoader
    worker runs per image of a webdataset)."""
    import io

    import numpy as np
    from PIL import Image

    from layerprobe.backbone import create_backbone, create_eval_transform
    from layerprobe.data.catalogue import decode_image

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="JPEG", quality=90)
    data = encoded.getvalue()
    with torch.device("meta"):
        model = create_backbone(backbone.model, pretrained=False, model_kwargs=backbone.model_kwargs)
    transform = create_eval_transform(model, **backbone.preprocessing())
    repeats = 20
    transform(decode_image(data, name="plan"))
    start = time.perf_counter()
    for _ in range(repeats):
        transform(decode_image(data, name="plan"))
    return (time.perf_counter() - start) / repeats


def time_prepare_and_extract(
    dataset_name: str,
    dataset: DatasetConfig,
    backbone: BackboneConfig,
    *,
    extract: ExtractConfig,
    prepare: PrepareConfig,
) -> dict[str, float]:
    """The prepare and extract steps themselves, on copies of a generated dataset of two sizes (a quarter of it and
    all of it, at most 150 and 600 images): seconds per image and fixed seconds of each (a source without a
    `num_images` option is prepared whole, once)."""
    from layerprobe.config import PathsConfig
    from layerprobe.workflow.extract import extract_step
    from layerprobe.workflow.prepare import prepare_step

    backbone = dataclasses.replace(backbone, checkpoint=None, pretrained=False, pretrain=None)  # random init
    scalable = "num_images" in dataset.options
    total = int(dataset.options.get("num_images", 0))
    counts = (max(10, min(150, total // 4)), max(20, min(600, total))) if scalable else (None,)
    figures = []
    with tempfile.TemporaryDirectory(prefix="layerprobe-plan-") as root:
        for count in counts:
            options = {**dataset.options, "num_images": count} if scalable else dataset.options
            paths = PathsConfig(data=f"{root}/data-{count}", features=f"{root}/features-{count}")
            start = time.perf_counter()
            prepared = prepare_step(dataset_name, dataset=dataclasses.replace(dataset, options=options),
                                    prepare=prepare, paths=paths)  # fmt: skip
            middle = time.perf_counter()
            extract_step("plan", dataset_name, backbone=backbone, extract=extract, paths=paths, progress=False)
            end = time.perf_counter()
            figures.append((sum(prepared["split_sizes"].values()), middle - start, end - middle))
    if len(figures) == 1:
        images, prepare_seconds, extract_seconds = figures[0]
        return {"prepare_per_image": prepare_seconds / images, "prepare_fixed": 0.0,
                "extract_per_image": extract_seconds / images, "extract_fixed": 0.0, "images": images}  # fmt: skip
    (n1, p1, e1), (n2, p2, e2) = figures
    prepare_rate, extract_rate = max(0.0, (p2 - p1) / (n2 - n1)), max(0.0, (e2 - e1) / (n2 - n1))
    return {"prepare_per_image": prepare_rate, "prepare_fixed": max(0.0, p1 - n1 * prepare_rate),
            "extract_per_image": extract_rate, "extract_fixed": max(0.0, e1 - n1 * extract_rate)}  # fmt: skip


def time_pretrain(
    backbone: BackboneConfig, *, device: torch.device, sizes: tuple[int, int] = (3, 13)
) -> dict[str, float]:
    """Seconds per step of the backbone's pretrain recipe (`pretrain.pretrain`, timed at two step counts), and seconds
    per image to generate and transform its images, as the pretrain step does."""
    from layerprobe.backbone import create_eval_transform, create_model
    from layerprobe.data import create_dataset
    from layerprobe.pretrain import pretrain

    recipe = backbone.pretrain
    options = dict(recipe.options)
    count = min(int(options.get("num_images", 512)), 512)
    if "num_images" in options:
        options["num_images"] = count
    start = time.perf_counter()
    dataset = create_dataset(recipe.source, **options)
    model = create_model(backbone.model, pretrained=False,
                         **{**backbone.model_kwargs, "num_classes": len(dataset.class_names)})  # fmt: skip
    transform = create_eval_transform(model, **backbone.preprocessing())
    images = torch.stack([transform(dataset.load_image(i)) for i in range(len(dataset))])
    per_image = (time.perf_counter() - start) / len(dataset)
    labels = torch.as_tensor(dataset.labels)
    held_out = (images[:64], labels[:64])
    seconds = []
    for steps in sizes:
        config = dataclasses.replace(recipe, steps=steps, warmup_steps=min(recipe.warmup_steps, steps))
        start = time.perf_counter()
        pretrain(model, images, labels, held_out=held_out, config=config, device=device, progress=False)
        seconds.append(time.perf_counter() - start)
    step = max(0.0, (seconds[1] - seconds[0]) / (sizes[1] - sizes[0]))
    return {"step_seconds": step, "image_seconds": per_image, "fixed_seconds": max(0.0, seconds[0] - sizes[0] * step)}


def time_steps_fixed(*, train: TrainConfig, evaluate: EvaluateConfig) -> dict[str, float]:
    """The train and evaluate steps' own seconds per task beyond training and predicting (reading the cache, scoring
    the grid, saving, the bootstrap interval, writing), on a tiny cache, and the bootstrap's seconds per test image."""
    import numpy as np

    from layerprobe.config import PathsConfig, ProbeConfig
    from layerprobe.features import shard_name, write_manifest, write_shard
    from layerprobe.metrics import bootstrap_balanced_accuracy
    from layerprobe.workflow.evaluate import evaluate_step
    from layerprobe.workflow.train import train_step

    rows = 64
    config = dataclasses.replace(train, lrs=[1e-2], weight_decays=[1e-4], attn_dropouts=[0.0], min_steps=1, epochs=1,
                                 batch_size=rows, seeds=[0], device="cpu")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="layerprobe-plan-") as root:
        paths = PathsConfig(features=f"{root}/features", probes=f"{root}/probes", results=f"{root}/results")
        cache = paths.features_dir("plan", "tiny")
        cache.mkdir(parents=True)
        provenance = {"layer_names": ["final"], "token_names": ["cls", "ap"], "dtype": "float16",
                      "class_names": ["a", "b"]}  # fmt: skip
        indices = np.arange(3 * rows)
        splits = np.array(["train", "val", "test"])[indices % 3]
        tokens = np.random.default_rng(0).standard_normal((len(indices), 1, 2, 8)).astype(np.float16)
        sha = write_shard(cache / shard_name(0), tokens=tokens, labels=indices % 2, indices=indices, splits=splits,
                          metadata=provenance)  # fmt: skip
        write_manifest(cache, provenance=provenance, shards=[(shard_name(0), len(indices), sha)],
                       splits=["train", "val", "test"], plan_sha256="plan")  # fmt: skip
        timings = []
        for _ in range(2):  # the first run pays for imports
            for name in ("train", "evaluate"):
                marker = paths.train_marker("plan", "tiny", "linear_last_cls")
                (marker if name == "train" else paths.evaluation_marker("plan", "tiny", "linear_last_cls")).unlink(
                    missing_ok=True)  # fmt: skip
            start = time.perf_counter()
            train_step("plan", "tiny", "linear_last_cls", probe=ProbeConfig(), train=config, paths=paths)
            middle = time.perf_counter()
            evaluate_step("plan", "tiny", "linear_last_cls", evaluate=evaluate, paths=paths)
            timings.append((middle - start, time.perf_counter() - middle))
    labels = np.arange(20_000) % 10
    start = time.perf_counter()
    bootstrap_balanced_accuracy(labels, labels[None], 10)
    return {"train_step_fixed": timings[-1][0], "evaluate_step_fixed": timings[-1][1],
            "bootstrap_per_image": (time.perf_counter() - start) / len(labels)}  # fmt: skip


def load_calibration(path: Path) -> dict[str, Any]:
    """The figures a calibration file holds ({} when there is none yet)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"calibration file {path} is not readable JSON ({e}); delete it to measure again") from e
    if data.get("format") != FORMAT:
        raise ValueError(f"calibration file {path} is in format {data.get('format')!r}, this plan reads {FORMAT!r}; "
                         "delete it to measure again")  # fmt: skip
    return data


def save_calibration(path: Path, data: dict[str, Any]) -> None:
    from layerprobe.files import write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**data, "format": FORMAT})


def cached(
    section: dict[str, Any], key: str, measure: Callable[[], Any], save: Callable[[], None] | None = None
) -> tuple[Any, bool]:
    """`section[key]`, measured (stored, and `save` called) when absent; returns (figure, whether it was measured
    just now)."""
    if key in section:
        return section[key], False
    section[key] = measure()
    if save is not None:
        save()  # a plan stopped half-way keeps what it measured
    return section[key], True
