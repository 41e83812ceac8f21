"""The params sections that steps read, as frozen, validated dataclasses, and the artifact names and formats.

These decide results, so they are part of every step's code key: the sections that only orchestrate (suite, flow,
serve, tracking) and the reading of params.yaml live in `layerprobe.params`, outside every key. Each section
validates itself in `__post_init__` with a one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TAPS = ("norm2", "block")  # extract.tap: the paper's norm2 hook, or each block's output (residual stream)
DTYPES = ("float16", "float32")  # extract.dtype: the feature cache's storage type
PRECISIONS = ("auto", "float32", "bfloat16")  # train.precision: the probe matmuls' dtype
EXTRACT_PRECISIONS = ("float32", "bfloat16")  # extract.precision: the backbone forward's dtype
TOKENS = ("cls", "ap")  # per-layer tokens of the feature cache, in cache order
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # backbones.*.interpolation: the eval resize filter
# backbones.*.pos_embed_resample: how a checkpoint's position-embedding table is fitted to the model's patch grid at
# load: timm's (bicubic, antialiased) or DINOv2's own run-time rule (bicubic, no antialias, scale (n + 0.1) / N)
POS_EMBED_RESAMPLES = ("timm", "dinov2")
PATCHES = "patches"  # a probe token group: every patch token of the final layer (extract.final_patch_tokens)
PROBE_TOKENS = (*TOKENS, PATCHES)  # what a probe may read
# probes.*.normalize: L2-normalise each selected token over its width (ours, and the reference's for every per-layer
# token), or each feature over the selected tokens (the reference's all-final-tokens baseline, F.normalize(x, dim=1))
NORMALIZATIONS = ("token", "across_tokens")
# train.batch_plan: batches evened out, re-planned for the tuning split (ours), or the reference's adjust_batch_size
# (at least 5 full batches, a remainder of at least half a batch, the tuning split inheriting the full set's size)
BATCH_PLANS = ("even", "reference")
TRUNCATION_MARGIN = 0.01  # probes.alf_truncated.truncation_margin's default: 1 point of balanced accuracy

# Artifact file names: the one place they are spelled; PathsConfig and the modules that read and write each
# artifact use these. Completion markers are written last and record the fingerprint of what made the output.
SPLITS_FILE = "splits.json"  # prepare's completion marker
IMAGES_TAR = "images.tar"  # a materialised dataset's pixels
MANIFEST_FILE = "manifest.json"  # extract's completion marker
TRAIN_MARKER = "train.json"  # train's completion marker, per probe
PROBE_WEIGHTS = "probe.safetensors"
PROBE_CONFIG = "probe.json"
SWEEP_FILE = "sweep.json"  # every grid member's validation scores
HISTORY_FILE = "history.json"  # the refit's training curves
METRICS_FILE = "metrics.json"  # evaluate's completion marker per probe, and the suite's summary
PREDICTIONS_FILE = "predictions.npz"  # per probe: test labels and every seed's predicted labels
HEATMAP_JSON = "heatmap.json"  # per attentive probe: its attention over layers (or patch positions)
# The on-disk format of each kind of output, in its marker and its fingerprint: a change of format (not of unrelated
# code) is what makes an old output unreadable. Bump a version when the files a marker lists change meaning.
FORMATS = {
    "pretrained": "layerprobe-pretrained/1",
    "prepared": "layerprobe-prepared/1",
    "features": "layerprobe-features/1",
    "probes": "layerprobe-probes/1",
    "evaluation": "layerprobe-evaluation/1",
}


class ParamsError(ValueError):
    """A params file that does not fit the schema; the message names the file and the key."""


@dataclass(frozen=True)
class PathsConfig:
    """Where each stage writes; relative paths are relative to the project root (where dvc.yaml lives)."""

    datasets: str = "datasets"  # local image folders and webdatasets; the prepare stage's DVC deps watch it
    checkpoints: str = "checkpoints"  # local backbone weight files; the extract stage's DVC deps watch it
    data: str = "data/prepared"
    features: str = "features"
    probes: str = "probes"
    results: str = "results"
    mlruns: str = "mlruns"

    def __post_init__(self) -> None:
        for key, value in dataclasses.asdict(self).items():
            if not value.strip():  # "" would be the working folder itself
                raise ParamsError(f"paths.{key} must name a folder, got {value!r}")

    @property
    def pretrained_dir(self) -> Path:
        """Where the pretrain stage's checkpoints go (its DVC output); a backbone's `checkpoint` points inside."""
        return Path(self.checkpoints) / "pretrained"

    def prepared_dir(self, dataset: str) -> Path:
        return Path(self.data) / dataset

    def splits_file(self, dataset: str) -> Path:
        return self.prepared_dir(dataset) / SPLITS_FILE

    def features_dir(self, backbone: str, dataset: str) -> Path:
        return Path(self.features) / backbone / dataset

    def manifest_file(self, backbone: str, dataset: str) -> Path:
        return self.features_dir(backbone, dataset) / MANIFEST_FILE

    def probe_dir(self, backbone: str, dataset: str, probe: str) -> Path:
        return Path(self.probes) / backbone / dataset / probe

    def train_marker(self, backbone: str, dataset: str, probe: str) -> Path:
        return self.probe_dir(backbone, dataset, probe) / TRAIN_MARKER

    def seed_dir(self, backbone: str, dataset: str, probe: str, seed: int) -> Path:
        return self.probe_dir(backbone, dataset, probe) / f"seed-{seed}"

    def evaluation_dir(self, backbone: str, dataset: str, probe: str) -> Path:
        return Path(self.results) / "evaluate" / backbone / dataset / probe

    def evaluation_marker(self, backbone: str, dataset: str, probe: str) -> Path:
        return self.evaluation_dir(backbone, dataset, probe) / METRICS_FILE

    @property
    def metrics_file(self) -> Path:
        return Path(self.results) / METRICS_FILE

    @property
    def units_file(self) -> Path:
        """The pipeline's record of its last fan-out: each unit's state, worker, slot, times and step statuses."""
        return Path(self.results) / "units.json"

    @property
    def pipeline_run_file(self) -> Path:
        """Records the MLflow parent run of the last evaluate stage, which the report stage logs into."""
        return Path(self.results) / "evaluate" / "run.json"

    @property
    def report_dir(self) -> Path:
        return Path(self.results) / "report"


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset: a registered source name and its options (see `layerprobe.data.list_sources()`)."""

    source: str
    options: dict[str, Any] = field(default_factory=dict)
    group: str | None = None  # domain group for the report (natural multi-domain, structured, ...)
    description: str | None = None
    num_classes: int | None = None
    num_images: dict[str, int] | None = None  # per official split, so `layerprobe plan` can size caches up front

    def __post_init__(self) -> None:
        if self.num_classes is not None:
            _check_range("num_classes", self.num_classes, 1)
        for split, count in (self.num_images or {}).items():
            _check_range(f"num_images.{split}", count, 0)


@dataclass(frozen=True)
class PretrainConfig:
    """How the pretrain stage trains a backbone from scratch (DVC-tracked, offline, float32, deterministic).

    The images come from a registered dataset source (`source` + `options`, usually a generated task); the saved
    checkpoint holds the encoder only (no classifier), so the backbone sets `model_kwargs.num_classes: 0`.
    """

    source: str = "shapes"
    options: dict[str, Any] = field(default_factory=dict)
    objective: str = "supervised"  # layerprobe.pretrain.list_objectives()
    steps: int = 900
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 45  # linear warm-up, then cosine decay to 0
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    held_out: float = 0.1  # share of the images kept out of training to report accuracy
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size"):
            _check_positive(f"pretrain.{key}", getattr(self, key))
        _check_range("pretrain.lr", self.lr, 0, above=True)
        _check_range("pretrain.grad_clip", self.grad_clip, 0, above=True)
        _check_range("pretrain.weight_decay", self.weight_decay, 0)
        _check_range("pretrain.warmup_steps", self.warmup_steps, 0)
        _check_range("pretrain.label_smoothing", self.label_smoothing, 0, 1, below=True)
        _check_range("pretrain.held_out", self.held_out, 0, 1, above=True, below=True)
        check_device("pretrain.device", self.device)


@dataclass(frozen=True)
class BackboneConfig:
    """A frozen timm model: name, weights (hub `pretrained`, a local `checkpoint` file, or trained here by the
    pretrain stage into `checkpoint` when `pretrain` is set) and model kwargs."""

    model: str
    pretrained: bool = False
    checkpoint: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # Eval preprocessing (resize to floor(size / crop_pct), centre crop, normalise); null keeps the model's own
    # (its timm pretrained_cfg).
    crop_pct: float | None = None
    interpolation: str | None = None  # the resize filter: bilinear | bicubic | nearest
    mean: list[float] | None = None  # per-channel normalisation, 3 floats each
    std: list[float] | None = None
    pos_embed_resample: str = "timm"  # fitting a checkpoint's position embeddings to the model's grid: timm | dinov2
    final_projection: bool = False  # OpenAI-CLIP ports: the paper's last "layer" is the projected image tokens
    family: str | None = None
    pretrain: PretrainConfig | None = None

    def __post_init__(self) -> None:
        if self.crop_pct is not None:
            _check_range("crop_pct", self.crop_pct, 0, 1, above=True)
        if self.interpolation is not None:
            _check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and (len(value) != 3 or not all(map(math.isfinite, value))):
                raise ParamsError(f"{key} must be 3 floats (one per RGB channel, finite) or null, got {value}")
        if self.std is not None and min(self.std) <= 0:
            raise ParamsError(f"std must be positive, got {self.std}")
        _check_choice("pos_embed_resample", self.pos_embed_resample, POS_EMBED_RESAMPLES)
        if self.pretrain is None:
            return
        if not self.checkpoint or self.pretrained:
            raise ParamsError(
                "a backbone with `pretrain` needs `checkpoint` (where the stage saves its weights) "
                "and `pretrained: false`"
            )
        if self.model_kwargs.get("num_classes") != 0:
            raise ParamsError(
                "a backbone with `pretrain` needs model_kwargs.num_classes: 0 (its checkpoint holds the encoder only)"
            )

    def preprocessing(self) -> dict[str, Any]:
        """The eval-transform overrides, as `layerprobe.backbone.create_eval_transform` takes them (None: model's)."""
        return {"crop_pct": self.crop_pct, "interpolation": self.interpolation, "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class PrepareConfig:
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            if not 0.0 < value < 1.0:
                raise ParamsError(f"prepare.{key} must be in (0, 1), got {value}")


@dataclass(frozen=True)
class ExtractConfig:
    tap: str = "norm2"
    dtype: str = "float16"
    precision: str = "float32"  # the backbone forward: float32 (as the reference ran) or bfloat16 autocast
    batch_size: int = 64
    num_workers: int = 0
    shard_size: int = 1024
    device: str = "auto"
    # Also cache the final layer's patch tokens [N, P, D_final] (for `attentive_last_all_tokens`): P times the
    # final layer's share of the cache, e.g. 301 KB per image for ViT-B/16 at 224 in float16 against 40 KB.
    final_patch_tokens: bool = False

    def __post_init__(self) -> None:
        _check_choice("extract.tap", self.tap, TAPS)
        _check_choice("extract.dtype", self.dtype, DTYPES)
        _check_choice("extract.precision", self.precision, EXTRACT_PRECISIONS)
        for key in ("batch_size", "shard_size"):
            _check_positive(f"extract.{key}", getattr(self, key))
        _check_range("extract.num_workers", self.num_workers, 0)
        check_device("extract.device", self.device)

    def fingerprint_params(self) -> dict[str, Any]:
        """What decides the cached values and their layout; batch size, workers and device only change speed."""
        return {
            "tap": self.tap,
            "dtype": self.dtype,
            "precision": self.precision,
            "shard_size": self.shard_size,
            "final_patch_tokens": self.final_patch_tokens,
        }


@dataclass(frozen=True)
class ProbeConfig:
    """Overrides of a registered probe's defaults (`layerprobe.probes.list_probes()`); null keeps the default."""

    layers: str | list[int] | None = None
    tokens: list[str] | None = None
    num_heads: int | None = None
    normalize: str | None = None  # token | across_tokens (NORMALIZATIONS)
    # Zero-pad a narrower final layer (CLIP's projection) to the blocks' width: true pads it, false keeps its own
    # width (a linear head concatenates tokens unpadded), null pads only where the selection mixes widths.
    pad_final: bool | None = None
    # alf_truncated only: the smallest depth whose ALF is within this much balanced accuracy (absolute) of alf on
    # val is chosen; null = TRUNCATION_MARGIN. Not a spec setting: `overrides` leaves it out.
    truncation_margin: float | None = None

    def __post_init__(self) -> None:
        if self.truncation_margin is not None:
            _check_range("probes.*.truncation_margin", self.truncation_margin, 0, 1)
        if self.tokens is not None and (not self.tokens or set(self.tokens) - set(PROBE_TOKENS)):
            raise ParamsError(f"probes.*.tokens must be a non-empty subset of {PROBE_TOKENS}, got {self.tokens}")
        if self.normalize is not None:
            _check_choice("probes.*.normalize", self.normalize, NORMALIZATIONS)
        if self.num_heads is not None:
            _check_positive("probes.*.num_heads", self.num_heads)

    def overrides(self) -> dict[str, Any]:
        """What the probe reads, overridden (`probes.get_probe_spec`'s keys)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "truncation_margin"}

    @property
    def margin(self) -> float:
        return TRUNCATION_MARGIN if self.truncation_margin is None else self.truncation_margin


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe and its sweep grid; defaults are the reference code's (docs/design.md "Training recipe").

    Every member of the lr x weight decay (x attention dropout) grid trains with the same recipe and seed.
    """

    lrs: list[float] = field(default_factory=lambda: [1e-1, 1e-2, 1e-3])
    weight_decays: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    attn_dropouts: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3])
    epochs: int = 40  # passes over the training set, raised to reach min_steps
    min_steps: int = 1000  # the reference raises epochs until at least 1000 optimisation steps
    batch_size: int = 2048  # largest batch; `even` evens batches out so the last one is not a runt
    min_batches: int = 5  # at least this many batches per epoch (the reference shrinks batches on small sets)
    batch_plan: str = "even"  # even | reference (BATCH_PLANS; docs/paper-study.md, "Where the reference differs")
    grad_clip: float = 5.0  # per-member gradient-norm clip
    jitter_std: float = 0.05  # Gaussian noise on normalised training tokens...
    jitter_prob: float = 0.5  # ...for this share of the images
    # The same jitter (seeded) on the validation tokens that score the grid, as the reference's loader applies it
    # (its val subset shares the training set's noise transform); the refit and the test split never see it.
    jitter_val: bool = False
    min_lr: float = 1e-6  # end of the cosine decay (no warm-up)
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "auto"
    precision: str = "auto"  # probe matmuls: auto (bfloat16 where native) | float32 | bfloat16

    def __post_init__(self) -> None:
        _check_choice("train.precision", self.precision, PRECISIONS)
        _check_choice("train.batch_plan", self.batch_plan, BATCH_PLANS)
        for key in ("lrs", "weight_decays", "attn_dropouts", "seeds"):
            if not getattr(self, key):
                raise ParamsError(f"train.{key} must not be empty")
        for i, lr in enumerate(self.lrs):
            _check_range(f"train.lrs[{i}]", lr, 0, above=True)
        for i, weight_decay in enumerate(self.weight_decays):
            _check_range(f"train.weight_decays[{i}]", weight_decay, 0)
        for i, dropout in enumerate(self.attn_dropouts):
            _check_range(f"train.attn_dropouts[{i}]", dropout, 0, 1, below=True)
        repeated = sorted({seed for seed in self.seeds if self.seeds.count(seed) > 1})
        if repeated:  # a repeated seed trains the same probe twice and reports a spread of 0 across "seeds"
            raise ParamsError(f"train.seeds must be distinct, got {self.seeds} ({repeated[0]} repeated)")
        for key in ("epochs", "batch_size", "min_batches"):
            _check_positive(f"train.{key}", getattr(self, key))
        for key in ("min_steps", "jitter_std", "min_lr"):
            _check_range(f"train.{key}", getattr(self, key), 0)
        _check_range("train.grad_clip", self.grad_clip, 0, above=True)
        _check_range("train.jitter_prob", self.jitter_prob, 0, 1)
        check_device("train.device", self.device)

    @property
    def log_every(self) -> int:
        """Record the loss about 100 times per run, whatever its length."""
        return max(1, self.min_steps // 100)

    def fingerprint_params(self, *, matmul_precision: str) -> dict[str, Any]:
        """Everything that decides the trained probes: the recipe, grid and seeds with the precision "auto"
        resolved to (the device only changes speed)."""
        values = dataclasses.asdict(self)
        del values["device"]
        values["precision"] = matmul_precision
        return values


@dataclass(frozen=True)
class EvaluateConfig:
    registry_prefix: str = "layerprobe"
    champion_alias: str = "champion"
    batch_size: int = 1024

    def __post_init__(self) -> None:
        for key in ("registry_prefix", "champion_alias"):
            if not getattr(self, key).strip():
                raise ParamsError(f"evaluate.{key} must not be empty")
        _check_positive("evaluate.batch_size", self.batch_size)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ParamsError(f"{key} must be one of {choices}, got {value!r}")


def _check_positive(key: str, value: float) -> None:
    _check_range(key, value, 1)


def _check_range(
    key: str, value: float, low: float, high: float = math.inf, *, above: bool = False, below: bool = False
) -> None:
    """`value` in [low, high] (`above`: > low, `below`: < high); NaN and infinities never pass (every comparison
    with NaN is false, so a check written as `value < low` would let it through)."""
    inside = (value > low if above else value >= low) and (value < high if below else value <= high)
    if not (math.isfinite(value) and inside):
        if high == math.inf:
            bounds = f"{'>' if above else '>='} {low:g}"
        else:
            bounds = f"in {'(' if above else '['}{low:g}, {high:g}{')' if below else ']'}"
        raise ParamsError(f"{key} must be {bounds}, got {value!r}")


def check_device(key: str, value: str) -> None:
    """auto, cpu, cuda or cuda:<n>, as `layerprobe.device.resolve_device` reads it (whether CUDA exists is asked
    there, on the machine that runs the step)."""
    if value not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", value):
        raise ParamsError(f"{key} must be auto, cpu or cuda[:n], got {value!r}")


def check_name(key: str, name: str) -> None:
    """A name that becomes a folder (features/<backbone>/<dataset>, probes/.../<probe>): one path part that stays
    inside its parent and is not hidden."""
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise ParamsError(f"{key} {name!r} cannot be a folder name: use one without '/', '\\' or a leading '.'")
