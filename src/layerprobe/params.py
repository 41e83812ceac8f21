"""params.yaml → one validated `Params`, read once per run: the file, and the sections that only orchestrate.

`load_params` is the only YAML reader. Every section is a frozen dataclass: the ones steps read (and whose code
decides results) live in `layerprobe.config`; the suite, flow, serve and tracking sections live here, outside every
step's code key, so changing how runs are scheduled or recorded never recomputes a cache. Unknown or missing keys
fail at load time with a one-line message naming the key (and the nearest valid one), so a typo never silently
falls back to a default. A run reads the file once and passes `Params` down; a unit on a work pool gets it as JSON
(`params_from_dict`), so every machine runs what the head node read.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from layerprobe.config import (
    BackboneConfig,
    DatasetConfig,
    EvaluateConfig,
    ExtractConfig,
    ParamsError,
    PathsConfig,
    PrepareConfig,
    ProbeConfig,
    TrainConfig,
    check_name,
)
from layerprobe.registry import unknown_name_error


@dataclass(frozen=True)
class SuiteConfig:
    """Which tasks run: every (backbone, dataset, probe) combination of these names."""

    name: str
    backbones: list[str]
    datasets: list[str]
    probes: list[str]

    def __post_init__(self) -> None:
        for key in ("backbones", "datasets", "probes"):
            names = getattr(self, key)
            if not names:
                raise ParamsError(f"suite.{key} must name at least one {key[:-1]}")
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ParamsError(f"suite.{key} names {repeated[0]!r} twice")


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "layerprobe"
    tracking_uri: str | None = None  # default sqlite:///<paths.mlruns>/mlflow.db; MLFLOW_TRACKING_URI wins

    def __post_init__(self) -> None:
        if not self.experiment.strip():
            raise ParamsError("tracking.experiment must not be empty")


_CRON_NICKNAMES = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


@dataclass(frozen=True)
class ServeConfig:
    name: str = "layerprobe-scheduled"
    cron: str = "0 3 * * *"

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ParamsError("flow.serve.name must not be empty")
        # Checked when the params are read, not when a server is asked to serve it. cronsim (a dependency of
        # Prefect's) parses the five-field form in milliseconds; importing Prefect for its own check costs 1.4 s.
        from cronsim import CronSim, CronSimError

        if self.cron.strip() in _CRON_NICKNAMES:
            return
        try:
            CronSim(self.cron, dt.datetime.now())
        except CronSimError as e:
            raise ParamsError(
                f"flow.serve.cron {self.cron!r} is not a cron string ({e}; five fields: minute hour day-of-month "
                "month day-of-week, e.g. '0 3 * * *', or @hourly/@daily/@weekly/@monthly/@yearly)"
            ) from None


# Tasks of a stage run two at a time: every task is torch code using all cores, and running all of a stage's tasks
# at once only makes their threads fight (measured on 2 cores: 25 probes in 82 s at once, 41 s two at a time).
# A worker given one core (OMP_NUM_THREADS=1, several workers per machine) sets LAYERPROBE_TASK_WORKERS=1, so its
# units stay on that core.
TASK_WORKERS = 2


def task_workers() -> int:
    """How many of a stage's tasks run at once (the flows' task runner; `layerprobe plan` prices the train stage so)."""
    return int(os.environ.get("LAYERPROBE_TASK_WORKERS", TASK_WORKERS))


@dataclass(frozen=True)
class FlowConfig:
    """How Prefect runs the work: retries, GPU slots, schedules, and where units run (in process or on a pool)."""

    retries: int = 2
    retry_delay_seconds: float = 2.0
    gpu_concurrency: int = 1  # in-process runs: tasks that use the GPU share one global limit of this many slots
    serve: ServeConfig = field(default_factory=ServeConfig)
    # Units (backbone x dataset: extract, then every probe) run on this Prefect work pool, one per worker (and GPU);
    # null runs them in this process. Outputs must then live on a filesystem every worker sees (paths.*).
    work_pool: str | None = None
    unit_deployment: str = "layerprobe-unit"  # the deployment of flows/unit.py that the pipeline creates on the pool
    worker_wait_seconds: float = 120.0  # fail (not hang) when units wait this long with no live worker in the pool

    def __post_init__(self) -> None:
        if self.work_pool is not None and not self.work_pool.strip():
            raise ParamsError("flow.work_pool must be a work pool name or null (run units in this process)")
        for key, value, low in (
            ("retries", self.retries, 0),
            ("gpu_concurrency", self.gpu_concurrency, 1),
            ("retry_delay_seconds", self.retry_delay_seconds, 0),
        ):
            if not value >= low:  # also refuses NaN
                raise ParamsError(f"flow.{key} must be >= {low}, got {value!r}")
        if not 0 < self.worker_wait_seconds < math.inf:
            raise ParamsError(f"flow.worker_wait_seconds must be > 0, got {self.worker_wait_seconds!r}")
        if not self.unit_deployment.strip():
            raise ParamsError("flow.unit_deployment must not be empty")


@dataclass(frozen=True)
class Params:
    suite: SuiteConfig
    datasets: dict[str, DatasetConfig]
    backbones: dict[str, BackboneConfig]
    probes: dict[str, ProbeConfig] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)

    def __post_init__(self) -> None:
        """What no single section can check: names across sections, and that each task keeps its own folders and
        its own registered model. Everything runs before any step, so a bad name never costs a computed output."""
        from layerprobe.data import list_sources
        from layerprobe.probes import list_probes

        for section, defined in (("datasets", self.datasets), ("backbones", self.backbones)):
            for name in defined:
                check_name(f"{section}:", name)
        probes, sources = list_probes(), list_sources()
        for key, kind, names, known in (
            ("suite.backbones", "backbone", self.suite.backbones, list(self.backbones)),
            ("suite.datasets", "dataset", self.suite.datasets, list(self.datasets)),
            ("suite.probes", "probe", self.suite.probes, probes),
            ("probes", "probe", list(self.probes), probes),
            *((f"datasets.{name}.source", "source", [d.source], sources) for name, d in self.datasets.items()),
            *(
                (f"backbones.{name}.pretrain.source", "source", [b.pretrain.source], sources)
                for name, b in self.backbones.items()
                if b.pretrain
            ),
        ):
            for name in names:
                if name not in known:
                    raise ParamsError(f"{key}: {unknown_name_error(kind, name, known)}")
        from layerprobe.data.catalogue import check_options
        from layerprobe.probes import TRAINED_FROM

        sourced = [(f"datasets.{name}", dataset) for name, dataset in self.datasets.items()]
        sourced += [(f"backbones.{name}.pretrain", b.pretrain) for name, b in self.backbones.items() if b.pretrain]
        for key, entry in sourced:  # a source's options, refused here rather than at its step
            try:
                check_options(entry.source, entry.options)
            except ValueError as e:
                raise ParamsError(f"{key}.options: {e}") from e
        for name, source in TRAINED_FROM.items():
            if name in self.suite.probes and source not in self.suite.probes:
                raise ParamsError(f"suite.probes lists {name} without {source}, which it is trained from")
        for name, probe in self.probes.items():
            if probe is not None and name in TRAINED_FROM and probe.overrides():
                key, source = next(iter(probe.overrides())), TRAINED_FROM[name]
                raise ParamsError(f"probes.{name}.{key}: {name} reads what {source} reads; set it on probes.{source}")
            if probe is not None and name not in TRAINED_FROM and probe.truncation_margin is not None:
                raise ParamsError(f"probes.{name}.truncation_margin: only {', '.join(TRAINED_FROM)} has a margin")
        from layerprobe.probes import FAMILY_SETTINGS

        for name, settings in FAMILY_SETTINGS.items():
            family = self.probes.get(name)
            if family is not None and (fixed := [key for key in family.overrides() if key not in settings]):
                raise ParamsError(
                    f"probes.{name}.{fixed[0]}: {name} reads every layer's cls, ap and both, linearly, at the "
                    f"cache's width; only {', '.join(settings)} can be set"
                )
        owners: dict[str, tuple[str, str]] = {}
        for backbone in self.suite.backbones:
            for dataset in self.suite.datasets:
                model = registered_model_name(self.evaluate.registry_prefix, dataset, backbone)
                if model in owners:  # they would share versions, and one @champion would be crowned across both
                    first = owners[model]
                    raise ParamsError(
                        f"tasks {first[1]}/{first[0]} and {dataset}/{backbone} (dataset/backbone) would share the "
                        f"registered model {model!r}: rename a dataset or backbone"
                    )
                owners[model] = (backbone, dataset)

    def tasks(self) -> list[tuple[str, str, str]]:
        """Every (backbone, dataset, probe) of the suite, in a stable order."""
        return [(b, d, p) for b in self.suite.backbones for d in self.suite.datasets for p in self.suite.probes]

    def probe_config(self, probe: str) -> ProbeConfig:
        """The params' overrides of a registered probe (none when the probe has no entry)."""
        return self.probes.get(probe) or ProbeConfig()


def registered_model_name(prefix: str, dataset: str, backbone: str) -> str:
    """`layerprobe-<dataset>-<backbone>`: one registered model per (dataset, backbone); probes are its versions.

    `_` and `/` read as `-`, so two tasks can meet on one name (`count_shapes` + `vit`, `count` + `shapes_vit`):
    `Params` refuses such a suite, which keeps every name already in a registry (and its @champion URIs) as it was.
    """
    return f"{prefix}-{dataset}-{backbone}".replace("/", "-").replace("_", "-")


def params_from_dict(raw: dict[str, Any], *, source: str = "params") -> Params:
    """Validate a params mapping (a parsed params file, or `dataclasses.asdict(params)` sent to a work pool)."""
    try:
        return _build(Params, raw, "")
    except ParamsError as e:
        raise ParamsError(f"{source}: {e}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raises ParamsError naming the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e.__class__.__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return params_from_dict(raw, source=str(path))


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and requiring keys without defaults."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{where or 'top level'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            nearest = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {_join(where, nearest[0])!r}?)" if nearest else ""
            raise ParamsError(f"unknown key {_join(where, key)!r}{hint}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"missing key {_join(where, name)!r}")
            continue
        values[name] = _convert(hints[name], raw[name], _join(where, name))
    try:
        return cls(**values)
    except ParamsError as e:
        # Name the section unless the message already does (sections' own checks name their keys).
        message = str(e)
        raise ParamsError(message if not where or message.startswith(where) else f"{where}: {message}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, where)
    if origin is dict:
        _, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ParamsError(f"{where} must be a mapping, got {type(value).__name__}")
        return {str(k): _convert(value_type, v, _join(where, str(k))) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(errors[0] if len(errors) == 1 else f"{where} has an unexpected value {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ParamsError(f"{where} must be a list, got {value!r}")
        return [_convert(item_type, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            number = float(value)
        except ValueError:
            number = None
        if number is not None and not math.isfinite(number):  # .nan, .inf, "nan": no key has a use for them
            raise ParamsError(f"{where} must be a finite number, got {value!r}")
        if number is not None:
            return number
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ParamsError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
