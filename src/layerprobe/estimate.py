"""A study's time from its plan: every task's steps, as training counts them, times step times measured with the
training code (`layerprobe.calibration`), plus its evaluation, the caches' extraction, pretraining, preparation and
the run's fixed overheads; per task, per backbone, per stage, and its wall time on N workers.

How each figure is made, so a reader can judge it:
- a probe step's time is measured for each shape (head, tokens, width, heads, grid size, precision) at the corners
  of its tasks' (batch, classes) range, and read off the bilinear fit for each task: a step's cost is affine in the
  batch (images) and in the classes (the classifier's matmuls and its optimiser state). A task whose batch and
  classes were both timed is "measured", the others "scaled"; a shape that could not be timed here (another device's
  calibration file) is scaled from the nearest timed shape by its multiply-adds ("scaled (shape)");
- a task trains seeds x (the grid's sweep on the tuning split + its validation pass + the refit of the best member
  on train + val), each with its set-up, plus the train step's own costs; it evaluates seeds x its test images on the
  CPU (where the evaluate step loads probes), plus the evaluate step's own costs and its MLflow logging;
- a selection larger than the memory is read from the cache batch by batch (`layerprobe.selection`), at the read
  rate measured here (from the page cache: a cold disk reads slower); one that fits the host but not half the GPU's
  memory is gathered on the host each step, at the gather-and-copy rate measured on the GPU;
- fixed overheads a run pays whatever its size (process start-up, measured; DVC, Prefect and MLflow, constants
  measured as stated in `OVERHEADS`).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from layerprobe.calibration import ProbeShape
from layerprobe.config import TrainConfig

# Fixed costs of a run that plan does not time itself (it would need a Prefect server, DVC and an MLflow store),
# measured on the project's 2-core AMD EPYC box (no AVX-512, 24 GiB, shared) on 2026-12-02 from the log of a `dvc
# repro` of the default suite (2 datasets), each line's time stamped: what each stage took beyond its work and its
# process start-up (which plan measures itself).
OVERHEADS = {
    "stage_seconds": 7.5,  # per DVC stage: from its flow's end to dvc.lock updated (exit, DVC hashing, the lock)
    "server_start_seconds": 30.0,  # the shared local Prefect server, started by the first stage (a new database)
    "task_seconds": 0.4,  # per Prefect task: submission, state changes, logs
    "mlflow_database_seconds": 17.0,  # MLflow creating its sqlite tables, in the first stage that logs (a new store)
    "mlflow_setup_seconds": 5.0,  # the evaluate stage's experiment, parent run and dangling-run check
    "evaluate_probe_seconds": 2.1,  # per probe, two at a time: figures, child run, logged model, registry version
    "report_seconds": 19.0,  # the report stage's tables, figures and their MLflow logging
}
STAGES = ("pretrain", "prepare", "extract", "train", "evaluate", "report")
GPU_HOURS_NOTE = 8.0  # the estimate for one GPU above which plan says what dominates it


@dataclass(frozen=True)
class ProbeTask:
    """One (backbone, dataset, probe): its shape, how training runs it and the images it predicts on."""

    backbone: str
    dataset: str
    probe: str
    shape: ProbeShape  # the sweep's grid (the refit is `shape.member()`)
    classes: int
    sweep_batch: int
    sweep_steps: int
    refit_batch: int
    refit_steps: int
    val_images: int
    test_images: int
    seeds: int
    selection_bytes: int  # train + val as the probe selects them, in the cache dtype
    row_bytes: int  # cache bytes one streamed row reads (tokens, and patch tokens for a probe reading them)
    selected_row_bytes: int  # one row of the selection (K x W in the cache dtype)


@dataclass
class Figure:
    """Seconds and how they were made: "measured", "scaled", "scaled (shape)" or "not priced"."""

    seconds: float
    basis: str = "measured"

    def __add__(self, other: Figure) -> Figure:
        return Figure(self.seconds + other.seconds, _worse(self.basis, other.basis))


_BASES = ("measured", "scaled", "scaled (shape)", "not priced")


def _worse(a: str, b: str) -> str:
    return a if _BASES.index(a) >= _BASES.index(b) else b


@dataclass
class TaskEstimate:
    task: ProbeTask
    train: Figure
    evaluate: Figure
    streamed: bool = False
    data_seconds: float = 0.0  # of `train`, the data path (reading, gathering, copying, normalising, jitter)


@dataclass
class StudyEstimate:
    """Every figure of a plan: per task, per cache, per stage; which were measured now and which reused."""

    tasks: list[TaskEstimate]
    extraction: dict[tuple[str, str], Figure]  # (backbone, dataset) -> extraction
    prepare: dict[str, Figure]
    pretrain: dict[str, Figure]
    stages: dict[str, float]  # wall seconds per dvc stage, overheads included
    overheads: dict[str, float]  # of `stages`, the fixed overheads per stage
    constants: dict[str, float]  # the fixed costs used, measured now or constants
    concurrency: float  # how much faster a stage's two tasks at a time run than one after the other (CPU)
    device: dict[str, Any]
    concurrency_measured: bool = False  # False: steps too long to bother (compute-bound), or tasks on a GPU
    measured_now: int = 0
    reused: int = 0
    notes: list[str] = field(default_factory=list)

    def total(self) -> float:
        return sum(self.stages.values())


class ProbeTimings:
    """Probe step, set-up and prediction times per (shape, batch, classes), measured on demand into `section`."""

    def __init__(self, section: dict, *, device: torch.device, can_measure: bool, train: TrainConfig | None,
                 max_batch: int | None, cache_dtype: torch.dtype, predict_only: bool = False,
                 save: Callable[[], None] | None = None, max_grid: int | None = None) -> None:  # fmt: skip
        self.section, self.device, self.can_measure = section, device, can_measure
        self.train, self.max_batch, self.cache_dtype = train, max_batch, cache_dtype
        # Grids larger than this are timed at this size and alone, and scaled along the grid size: a grid's step is a
        # shared part plus one part per member (how `train.train_selected` computes it), so affine in G.
        self.max_grid = max_grid
        self.predict_only = predict_only  # only `predict_seconds_per_image` (evaluation on the CPU of a GPU study)
        self.prefix = f"{device.type}{'-predict' if predict_only else ''}|"
        self.save = save  # called after each new measurement, so a plan stopped half-way keeps them
        self.measured_now = self.reused = 0

    def _group(self, shape: ProbeShape) -> dict:
        return self.section.setdefault(f"{self.prefix}{shape.key}", {"shape": _shape_dict(shape), "points": {}})

    def _time(self, shape: ProbeShape, batch: int, classes: int) -> dict:
        from layerprobe.calibration import time_predict, time_probe

        if self.predict_only:
            return {"predict_seconds_per_image": time_predict(shape, batch=batch, classes=classes, device=self.device,
                                                              cache_dtype=self.cache_dtype)}  # fmt: skip
        return time_probe(shape, batch=batch, classes=classes, device=self.device, train=self.train,
                          cache_dtype=self.cache_dtype)  # fmt: skip

    def _capped(self, shape: ProbeShape) -> ProbeShape | None:
        """The smaller grid a large one is timed at (None: timed as it is)."""
        if self.max_grid is None or shape.grid <= self.max_grid:
            return None
        return dataclasses.replace(shape, grid=max(2, self.max_grid))

    def prepare(self, needs: dict[ProbeShape, set[tuple[int, int]]]) -> None:
        """Measure, for every shape, the corner points its tasks' (batch, classes) need (those not yet measured); a
        grid above `max_grid` at that size and alone, at the same corners."""
        timed: dict[ProbeShape, list[tuple[int, int]]] = defaultdict(list)
        for shape, points in needs.items():
            corners = self.corners(points)
            capped = self._capped(shape)
            for target in (shape,) if capped is None else (capped, shape.member()):
                timed[target] += [corner for corner in corners if corner not in timed[target]]
        for shape, corners in timed.items():
            group = self._group(shape)
            for batch, classes in corners:
                key = f"b{batch} c{classes}"
                if key in group["points"]:
                    self.reused += 1
                elif self.can_measure:
                    group["points"][key] = self._time(shape, batch, classes)
                    self.measured_now += 1
                    if self.save is not None:
                        self.save()

    def corners(self, points: set[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (batch, classes) points to time for tasks at `points`: the least and the most of each (one when they
        are within 20 % of each other), batches above `max_batch` timed at max_batch and a quarter of it."""
        batches = sorted({b for b, _ in points})
        classes = sorted({c for _, c in points})
        high = batches[-1] if self.max_batch is None else min(batches[-1], self.max_batch)
        low = batches[0] if batches[-1] == high else min(batches[0], max(2, high // 4))
        batch_points = [high] if high < 1.2 * low else [low, high]
        class_points = [classes[-1]] if classes[-1] < 1.2 * classes[0] else [classes[0], classes[-1]]
        return [(b, c) for b in batch_points for c in class_points]

    def measured(self, shape: ProbeShape) -> dict[tuple[int, int], dict] | None:
        points = self.section.get(f"{self.prefix}{shape.key}", {}).get("points", {})
        parsed = {}
        for key, value in points.items():
            batch, classes = (int(part[1:]) for part in key.split())
            parsed[(batch, classes)] = value
        return parsed or None

    def figure(self, shape: ProbeShape, batch: int, classes: int, what: str) -> Figure:
        """`what` ("step_seconds", "setup_seconds", "predict_seconds_per_image", "data_seconds") at this point."""
        points = self.measured(shape)
        capped = self._capped(shape)
        if points is None and capped is not None and self.measured(capped) is not None:
            alone, small = self.figure(shape.member(), batch, classes, what), self.figure(capped, batch, classes, what)
            if what == "data_seconds":  # the data path is shared by the members
                return Figure(small.seconds, "scaled")
            per_member = (small.seconds - alone.seconds) / (capped.grid - 1)
            return Figure(max(alone.seconds + (shape.grid - 1) * per_member, small.seconds), "scaled")
        if points is None:
            return self._from_other_shape(shape, batch, classes, what)
        if (batch, classes) in points:
            return Figure(points[(batch, classes)][what], "measured")
        value = _bilinear(points, batch, classes, what)
        return Figure(value, "scaled")

    def _from_other_shape(self, shape: ProbeShape, batch: int, classes: int, what: str) -> Figure:
        """Scaled by multiply-adds from the timed shape of the same head nearest in work."""
        candidates = []
        for key, group in self.section.items():
            if not key.startswith(self.prefix) or not group["points"]:
                continue
            other = ProbeShape(**{**group["shape"], "token_widths": _widths(group["shape"])})
            if other.head != shape.head:
                continue
            b, c = (int(part[1:]) for part in max(group["points"], key=lambda k: int(k.split()[0][1:])).split())
            value = group["points"][f"b{b} c{c}"][what]
            ratio = shape.work(batch, classes) / other.work(b, c)
            candidates.append((abs(math.log(ratio)), value * ratio))
        if not candidates:
            return Figure(0.0, "not priced")
        return Figure(min(candidates)[1], "scaled (shape)")


def _widths(shape: dict) -> tuple[int, ...] | None:
    return None if shape.get("token_widths") is None else tuple(shape["token_widths"])


def _shape_dict(shape: ProbeShape) -> dict:
    values = dataclasses.asdict(shape)
    values["token_widths"] = None if shape.token_widths is None else list(shape.token_widths)
    return values


def _bilinear(points: dict[tuple[int, int], dict], batch: int, classes: int, what: str) -> float:
    """The figure at (batch, classes), linear in each between (and beyond) the timed corners; never below a quarter
    of the smallest timed figure (an affine fit extrapolated down can reach zero).

    A slope is never negative (more images or classes never cost less), and along the batch never steeper than
    proportional (a step's cost does not grow faster than its images): on a busy machine two timed points can be
    off by tens of percent, and extrapolating eight times past them would multiply that.
    """
    batches = sorted({b for b, _ in points})
    class_points = sorted({c for _, c in points})

    def along(values: list[tuple[int, float]], x: int, *, proportional_cap: bool) -> float:
        if len(values) == 1:
            return values[0][1]
        (x0, y0), (x1, y1) = values[0], values[-1]
        slope = max(0.0, (y1 - y0) / (x1 - x0))
        if proportional_cap:
            slope = min(slope, y1 / x1)
        return y1 + slope * (x - x1)

    per_class = []
    for c in class_points:
        row = [(b, points[(b, c)][what]) for b in batches if (b, c) in points]
        if row:
            per_class.append((c, along(row, batch, proportional_cap=True)))
    value = along(per_class, classes, proportional_cap=False)
    floor = 0.25 * min(p[what] for p in points.values())
    return max(value, floor)


def estimate_task(task: ProbeTask, timings: ProbeTimings, cpu: ProbeTimings, constants: dict[str, float], *,
                  memory: int | None, device_memory: int | None) -> TaskEstimate:  # fmt: skip
    """Seconds to train and to evaluate one task, from its step counts and the measured figures."""
    grid, member = task.shape, task.shape.member()
    per_seed = (
        timings.figure(grid, task.sweep_batch, task.classes, "setup_seconds")
        + _times(timings.figure(grid, task.sweep_batch, task.classes, "step_seconds"), task.sweep_steps)
        + _times(timings.figure(grid, task.sweep_batch, task.classes, "predict_seconds_per_image"), task.val_images)
        + timings.figure(member, task.refit_batch, task.classes, "setup_seconds")
        + _times(timings.figure(member, task.refit_batch, task.classes, "step_seconds"), task.refit_steps)
    )
    data = task.seeds * (
        task.sweep_steps * timings.figure(grid, task.sweep_batch, task.classes, "data_seconds").seconds
        + task.refit_steps * timings.figure(member, task.refit_batch, task.classes, "data_seconds").seconds
    )
    train = _times(per_seed, task.seeds) + Figure(constants["train_step_fixed"], "measured")
    rows_read = task.seeds * (task.sweep_steps * task.sweep_batch + task.refit_steps * task.refit_batch
                              + task.val_images)  # fmt: skip
    streamed = memory is not None and task.selection_bytes > memory
    if streamed:  # read batch by batch from the cache
        extra = rows_read * task.row_bytes / constants["stream_bytes_per_second"]
        train, data = train + Figure(extra, "scaled"), data + extra
    elif device_memory is not None and task.selection_bytes > device_memory // 2:  # gathered on the host each step
        extra = rows_read * task.selected_row_bytes / constants["host_batch_bytes_per_second"]
        train, data = train + Figure(extra, "scaled"), data + extra
    predict = cpu.figure(member, task.refit_batch, task.classes, "predict_seconds_per_image")
    evaluate = (
        _times(predict, task.seeds * task.test_images)
        + Figure(constants["evaluate_step_fixed"] + constants["bootstrap_per_image"] * task.test_images, "measured")
        + Figure(OVERHEADS["evaluate_probe_seconds"], "measured")  # its share of the stage's MLflow logging
    )
    return TaskEstimate(task=task, train=train, evaluate=evaluate, streamed=streamed, data_seconds=data)


def _times(figure: Figure, count: float) -> Figure:
    return Figure(figure.seconds * count, figure.basis)


def makespan(durations: list[float], workers: int) -> float:
    """Wall time of jobs handed longest first to whichever of `workers` is free first (LPT scheduling)."""
    loads = [0.0] * max(1, workers)
    for duration in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + duration)
    return max(loads)


def stage_times(
    *,
    pretrain: dict[str, Figure],
    prepare: dict[str, Figure],
    extraction: dict[tuple[str, str], Figure],
    tasks: list[TaskEstimate],
    constants: dict[str, float],
    concurrency: float,
    accelerated: bool,
) -> tuple[dict[str, float], dict[str, float]]:
    """Wall seconds per `dvc repro` stage on one machine, and the fixed overheads included in each.

    A stage runs its tasks two at a time: on a CPU they share the cores (`concurrency` is how much faster that is
    than one after the other, measured), on a GPU they take turns on it (flow.gpu_concurrency).
    """
    overhead = constants["process_start"] + OVERHEADS["stage_seconds"]
    tasks_in = {"pretrain": len(pretrain), "prepare": len(prepare), "extract": len(extraction), "train": len(tasks),
                "evaluate": len(tasks), "report": 0}  # fmt: skip
    work = {
        "pretrain": sum(f.seconds for f in pretrain.values()),
        "prepare": sum(f.seconds for f in prepare.values()) / concurrency,
        "extract": sum(f.seconds for f in extraction.values()) / (1.0 if accelerated else concurrency),
        "train": sum(t.train.seconds for t in tasks) / (1.0 if accelerated else concurrency),
        # the per-probe MLflow share is wall time already measured two at a time; the rest is CPU work
        "evaluate": sum(t.evaluate.seconds - OVERHEADS["evaluate_probe_seconds"] for t in tasks) / concurrency
        + OVERHEADS["evaluate_probe_seconds"] * len(tasks)
        + OVERHEADS["mlflow_setup_seconds"],
        "report": OVERHEADS["report_seconds"],
    }
    overheads = {stage: overhead + OVERHEADS["task_seconds"] * tasks_in[stage] / 2 for stage in STAGES}
    overheads["pretrain"] += OVERHEADS["server_start_seconds"]  # the first stage starts the shared Prefect server
    for stage in ("pretrain", "evaluate", "report"):  # the stages that log to MLflow import it (measured)
        overheads[stage] += constants["mlflow_import"]
    for stage in ("pretrain", "train"):  # a process's first optimiser step loads torch._dynamo (measured)
        overheads[stage] += constants["first_training"] if (stage == "train" or pretrain) else 0.0
    overheads["pretrain" if pretrain else "evaluate"] += OVERHEADS["mlflow_database_seconds"]  # the first to log
    return {stage: work[stage] + overheads[stage] for stage in STAGES}, overheads


def workers_wall(estimate: StudyEstimate, workers: int) -> float:
    """Wall seconds of `layerprobe run` with units (a backbone x dataset: its extraction, then every probe's training
    and test scoring, on the worker) on `workers` workers; pretraining before them, and the MLflow recording and the
    report after them, run once on the head node, as the pipeline runs them."""
    recording = OVERHEADS["evaluate_probe_seconds"]  # per probe: what the head node still does for it
    units: dict[tuple[str, str], float] = defaultdict(float)
    for (backbone, dataset), figure in estimate.extraction.items():
        units[(backbone, dataset)] += figure.seconds
    for task in estimate.tasks:
        units[(task.task.backbone, task.task.dataset)] += task.train.seconds + task.evaluate.seconds - recording
    first_unit = {}
    for backbone, dataset in units:
        first_unit.setdefault(dataset, (backbone, dataset))
    for dataset, unit in first_unit.items():
        units[unit] += estimate.prepare.get(dataset, Figure(0.0)).seconds
    record = estimate.overheads["evaluate"] + OVERHEADS["mlflow_setup_seconds"] + recording * len(estimate.tasks)
    serial = estimate.stages["pretrain"] + record + estimate.stages["report"] + estimate.overheads["train"]
    return serial + makespan(list(units.values()), workers)
