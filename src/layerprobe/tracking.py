"""Every MLflow call: tracking store, parent/child runs, metrics, artifacts, logged models and the registry.

Called by flows, never by the science modules. Runs are addressed by id through `MlflowClient` so Prefect tasks in
threads never share MLflow's fluent "active run" state. Metadata lives in `sqlite:///<mlruns>/mlflow.db` (MLflow's
file store is deprecated and refused by 3.13+); artifacts live under `<mlruns>/artifacts`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import RunOperations
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    Metric,
    Param,
    Run,
    RunStatus,
    RunTag,
)
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import Model
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from layerprobe.config import HISTORY_FILE, PROBE_CONFIG, SWEEP_FILE
from layerprobe.files import read_json, stable_hash
from layerprobe.locks import process_alive
from layerprobe.params import Params, registered_model_name

# A progress bar per copied model folder is noise when a study logs a thousand probes.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
PID_TAG = "layerprobe.pid"
HOST_TAG = "layerprobe.host"
# MLflow 3's UI opens an experiment in its GenAI (traces) view unless told it holds model-training runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# The runs table as `layerprobe ui` opens it: a view MLflow's UI loads from an experiment tag when the URL names it
# (`viewStateShareKey`), so a fresh browser shows each probe's scores, description, registered model and dataset
# (without it, only Source, Models and Dataset). Keys as the UI stores its own views.
VIEW_KEY = "layerprobe"
VIEW_COLUMNS = ["metrics.`test/balanced_accuracy`", "metrics.`val/balanced_accuracy`", "attributes.`Description`",
                "attributes.`Models`", "attributes.`Dataset`"]  # fmt: skip
RUNS_VIEW = {
    "selectedColumns": VIEW_COLUMNS,
    "columnOrder": VIEW_COLUMNS,
    "columnWidths": {"attributes.`Run Name`": 260, VIEW_COLUMNS[0]: 170, VIEW_COLUMNS[1]: 170, VIEW_COLUMNS[2]: 460},
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
}
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"


def resolve_tracking_uri(mlruns_dir: str | Path, configured: str | None = None) -> str:
    """MLFLOW_TRACKING_URI wins, then params' `tracking.tracking_uri`, then a sqlite DB inside `mlruns/`."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if configured:
        return configured
    mlruns = Path(mlruns_dir).resolve()
    mlruns.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{mlruns / 'mlflow.db'}"


def setup_experiment(experiment: str, *, mlruns_dir: str | Path, tracking_uri: str | None = None) -> str:
    """Point MLflow at the store and return the experiment id, creating it with artifacts under `mlruns/`."""
    mlflow.set_tracking_uri(resolve_tracking_uri(mlruns_dir, tracking_uri))
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        artifacts = (Path(mlruns_dir).resolve() / "artifacts" / experiment).as_uri()
        try:
            tags = {**EXPERIMENT_KIND, VIEW_TAG: json.dumps(RUNS_VIEW)}
            return client.create_experiment(experiment, artifact_location=artifacts, tags=tags)
        except mlflow.exceptions.MlflowException:  # another process created it between the two calls
            found = client.get_experiment_by_name(experiment)
    for key, value in EXPERIMENT_KIND.items():
        if key not in found.tags:  # an experiment made by an older version (or by hand)
            client.set_experiment_tag(found.experiment_id, key, value)
    _store_view(client, found)
    return found.experiment_id


def _store_view(client: MlflowClient, experiment) -> None:
    """Store (or update) the runs view `layerprobe ui` opens on `experiment` (an experiment tag)."""
    if experiment.tags.get(VIEW_TAG) != json.dumps(RUNS_VIEW):
        client.set_experiment_tag(experiment.experiment_id, VIEW_TAG, json.dumps(RUNS_VIEW))


def run_tags() -> dict[str, str]:
    """Tags every run carries: git commit, DVC experiment name, and who owns it (to find dangling runs)."""
    tags = {PID_TAG: str(os.getpid()), HOST_TAG: os.uname().nodename}
    commit = _git(["rev-parse", "HEAD"])
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    lock = Path("dvc.lock")
    if lock.is_file():
        tags["dvc.lock_md5"] = hashlib.md5(lock.read_bytes()).hexdigest()
    return tags


def _git(args: list[str]) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def fail_dangling_runs(experiment_id: str) -> list[str]:
    """Mark RUNNING runs whose owning process is gone (killed pipeline) as FAILED, so none dangle in the UI."""
    client = MlflowClient()
    failed = []
    host = os.uname().nodename
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        pid = run.data.tags.get(PID_TAG)
        if run.data.tags.get(HOST_TAG) != host or not pid or process_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "layerprobe.failure", "owning process ended without closing the run")
        client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.FAILED))
        failed.append(run.info.run_id)
    return failed


def start_run(experiment_id: str, run_name: str, *, parent_run_id: str | None = None, tags: dict | None = None) -> str:
    """Create a RUNNING run (a child when `parent_run_id` is given) and return its id."""
    all_tags = {**run_tags(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = MlflowClient().create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def end_run(run_id: str, *, failed: bool = False, error: str | None = None) -> None:
    client = MlflowClient()
    if error:
        client.set_tag(run_id, "layerprobe.error", error[:5000])
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log flat params (nested dicts are joined with '.'); values are stringified as MLflow stores them."""
    flat = _flatten(_plain(params))
    batch = [Param(k, str(v)[:6000]) for k, v in flat.items()]
    client = MlflowClient()
    for start in range(0, len(batch), 100):  # MLflow's batch limit for params
        client.log_batch(run_id, params=batch[start : start + 100])


def log_metrics(run_id: str, metrics: dict[str, float], *, step: int = 0) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and np.isfinite(v)]
    MlflowClient().log_batch(run_id, metrics=batch)


def log_curves(run_id: str, curves: dict[str, list[tuple[int, float]]]) -> None:
    """Log per-step training curves: {metric key: [(step, value), ...]} in batches of MLflow's 1000-metric limit."""
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, int(step)) for key, points in curves.items() for step, value in points]
    client = MlflowClient()
    for start in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[start : start + 1000])


def log_tags(run_id: str, tags: dict[str, str]) -> None:
    MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifacts(run_id: str, files: dict[str, str | Path]) -> None:
    """Log files: {artifact sub-folder: local path}; a folder is logged whole."""
    client = MlflowClient()
    for folder, path in files.items():
        path = Path(path)
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=folder)
        elif path.is_file():
            client.log_artifact(run_id, str(path), artifact_path=folder or None)


def model_code(folder: Path) -> Path:
    """`folder/layerprobe`: the package as a logged model carries it, the modules its pyfunc imports (the import
    closure of `mlflow_model`, lazy imports included: 9 of the package's files), so `models:/...` loads where
    layerprobe is not installed; each model copies it twice (saved, then uploaded), so the rest stays out."""
    import shutil

    from layerprobe.code_key import import_closure

    package = Path(__file__).parent
    code_dir = Path(folder) / "layerprobe"
    for path in import_closure("layerprobe.mlflow_model"):
        if path.is_relative_to(package):
            (code_dir / path.relative_to(package)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, code_dir / path.relative_to(package))
    return code_dir


def _model_requirements() -> list[str]:
    """What the pyfunc imports at load time, pinned to the versions it was logged with."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "numpy", "safetensors", "scikit-learn")]


def _dir_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def set_alias(registered_name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(registered_name, alias, version)


def _plain(value: Any) -> Any:
    """Config dataclasses as dicts, so they flatten into `section.key` params."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


# --------------------------------------------------------------------------------------------------- evaluation runs


def run_params(params: Params, backbone: str, dataset: str, probe: str) -> dict[str, Any]:
    """What a probe's MLflow run records as params: backbone, dataset, probe, extraction and the training grid."""
    backbone_config = params.backbones[backbone]
    train = params.train
    return {
        "backbone": backbone,
        "model": backbone_config.model,
        "pretrained": backbone_config.pretrained,
        "checkpoint": backbone_config.checkpoint,
        "model_kwargs": backbone_config.model_kwargs,
        "dataset": dataset,
        "dataset_source": params.datasets[dataset].source,
        "probe": probe,
        "tap": params.extract.tap,
        "feature_dtype": params.extract.dtype,
        "extract_precision": params.extract.precision,
        "train": {key: getattr(train, key) for key in ("lrs", "weight_decays", "attn_dropouts", "epochs",
                                                        "min_steps", "batch_size", "seeds", "precision")},
    }  # fmt: skip


# What decided a probe run's numbers: its evaluation fingerprint (probe weights, features, evaluation code) and the
# hash of the registered weights. A probe whose key the store already holds is referenced, never logged again.
EVALUATION_TAG = "layerprobe.evaluation"
# A parent run's probe set (every probe it covers, logged or referenced): a rerun covering the same set adds no run.
EVALUATION_SET_TAG = "layerprobe.evaluation_set"
KIND_TAG = "layerprobe.kind"  # "evaluation" (a parent run), "probe" (its children), "pretrain"
CONFIRMED_TAG = "layerprobe.confirmed"  # on a parent: when a rerun last found its probe set unchanged
NOTE_TAG = "mlflow.note.content"  # a run's description: MLflow's UI shows it on the run page
PROBE_RUNS_FILE = "probe_runs.json"  # a parent's table: each probe it covers and the run that holds it
DATASET_CONTEXT = "training"  # the probes were trained (and tested) on their feature cache's splits


@dataclasses.dataclass(frozen=True)
class EvaluatedProbe:
    """One evaluated probe as its outputs on disk describe it: everything MLflow records about it."""

    backbone: str
    dataset: str
    probe: str
    evaluation: dict  # the evaluate step's metrics.json
    trained: dict  # the train step's train.json
    probe_config: dict  # the first seed's probe.json
    evaluation_dir: Path
    seed_dir: Path  # the first seed's probe: the registered model
    features_dir: Path
    probe_hash: str  # of the first seed's folder (weights, config, sweep, curves)
    registered_model: str

    @property
    def key(self) -> str:
        return f"{self.evaluation['fingerprint']['value']}-{self.probe_hash}"

    @property
    def run_name(self) -> str:
        return f"{self.backbone}/{self.dataset}/{self.probe}"


def read_evaluated_probe(params: Params, backbone: str, dataset: str, probe: str) -> EvaluatedProbe:
    """The on-disk outputs of one evaluated probe (its evaluation and train markers, its first seed's folder)."""
    paths = params.paths
    marker = paths.evaluation_marker(backbone, dataset, probe)
    if not marker.is_file():
        raise FileNotFoundError(f"{backbone}/{dataset}/{probe} is not evaluated: {marker} is missing (run evaluate)")
    trained = read_json(paths.train_marker(backbone, dataset, probe))
    seed_dir = Path(trained["seeds"][0]["dir"])
    return EvaluatedProbe(
        backbone=backbone,
        dataset=dataset,
        probe=probe,
        evaluation=read_json(marker),
        trained=trained,
        probe_config=read_json(seed_dir / PROBE_CONFIG),
        evaluation_dir=paths.evaluation_dir(backbone, dataset, probe),
        seed_dir=seed_dir,
        features_dir=paths.features_dir(backbone, dataset),
        probe_hash=_dir_hash(seed_dir),
        registered_model=registered_model_name(params.evaluate.registry_prefix, dataset, backbone),
    )


def describe_probe(probe: EvaluatedProbe) -> str:
    """One line: `alf on vit_shapes_d6 / digits: val 71.0, test 67.7 [63.1, 72.5]` (balanced accuracy, %)."""
    evaluation = probe.evaluation
    low, high = evaluation["test_ci"]["balanced_accuracy"]
    test = f"{100 * evaluation['test']['balanced_accuracy']:.1f}"
    if evaluation["num_seeds"] > 1:
        test += f" ± {100 * evaluation['test_std']['balanced_accuracy']:.1f} ({evaluation['num_seeds']} seeds)"
    val = f"{100 * evaluation['val_balanced_accuracy']:.1f}"
    interval = f"[{100 * low:.1f}, {100 * high:.1f}]"
    return f"{probe.probe} on {probe.backbone} / {probe.dataset}: val {val}, test {test} {interval}"


def version_tags(probe: EvaluatedProbe) -> dict[str, str]:
    """What a registered version says about itself: probe, backbone, dataset, seeds, scores, the features' hash."""
    evaluation = probe.evaluation
    low, high = evaluation["test_ci"]["balanced_accuracy"]
    return {
        "probe": probe.probe,
        "backbone": probe.backbone,
        "dataset": probe.dataset,
        "seeds": ",".join(str(seed["seed"]) for seed in evaluation["seeds"]),
        "val_balanced_accuracy": f"{evaluation['val_balanced_accuracy']:.4f}",
        "test_balanced_accuracy": f"{evaluation['test']['balanced_accuracy']:.4f}",
        "test_balanced_accuracy_ci": f"[{low:.4f}, {high:.4f}]",
        "features.content_hash": probe.trained["features_hash"],
        "probe_hash": probe.probe_hash,  # one version per weights' hash; its source run is the version's run
    }


def describe_registered_model(params: Params, backbone: str, dataset: str, class_names: list[str]) -> str:
    """The registered model's description: the task, what a version is, and how `@champion` is chosen."""
    config = params.datasets[dataset]
    task = config.description or f"{config.source} images"
    group = f", {config.group}" if config.group else ""
    return (f"Probes classifying {dataset} ({task}{group}; {len(class_names)} classes) from the layer tokens of the "
            f"frozen backbone {backbone} (cached features). One version per trained probe: its tags and description "
            "give the probe, seeds, validation and test balanced accuracy (with its 95 % bootstrap interval) and the "
            f"features' content hash. @{params.evaluate.champion_alias} is the version with the best validation "
            "balanced accuracy among the probes of the latest evaluation; test scores never choose it.")  # fmt: skip


def features_dataset(features_dir: Path, *, name: str) -> DatasetInput:
    """A feature cache as an MLflow input dataset: its content hash as digest, its folder as source, its split sizes
    and shape as profile, its tokens and labels as a tensor schema. The same cache is the same dataset in every run."""
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.types import Schema, TensorSpec

    from layerprobe.features import cache_content_hash, open_shard, read_manifest

    features_dir = Path(features_dir)
    manifest = read_manifest(features_dir)
    splits: dict[str, int] = {}
    shape = []
    for entry in manifest["shards"]:  # memory-mapped: only the split column is read
        batch, _, shape = open_shard(features_dir / entry["file"])
        names, counts = np.unique(batch.column("split").to_numpy(zero_copy_only=False), return_counts=True)
        for split, count in zip(names, counts, strict=True):
            splits[str(split)] = splits.get(str(split), 0) + int(count)
    dtype = np.dtype(manifest["dtype"])
    schema = TensorDatasetSchema(
        features=Schema([TensorSpec(dtype, (-1, *shape), "tokens")]),  # [N, L, T, D]
        targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "label")]),
    )
    profile = {"num_rows": manifest["num_images"], "splits": splits, "shape": [manifest["num_images"], *shape],
               "dtype": manifest["dtype"], "layers": manifest["provenance"]["layer_names"],
               "tokens": manifest["provenance"]["token_names"]}  # fmt: skip
    dataset = Dataset(
        name=name,
        digest=cache_content_hash(features_dir)[:16],  # MLflow stores up to 36 characters
        source_type="local",
        source=json.dumps({"uri": features_dir.resolve().as_uri()}),
        schema=json.dumps(schema.to_dict()),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset=dataset, tags=[InputTag(key="mlflow.data.context", value=DATASET_CONTEXT)])


def probe_signature(features_dir: Path, *, patch_tokens: bool) -> mlflow.models.ModelSignature:
    """The pyfunc's signature from the cache's shapes: tokens [-1, L, T, D] float32 (and, for a probe reading the final
    layer's patch tokens, patches [-1, P, D_final]) in, class indices [-1] out."""
    from mlflow.types import Schema, TensorSpec

    from layerprobe.features import open_shard, read_manifest

    features_dir = Path(features_dir)
    first = read_manifest(features_dir)["shards"][0]
    _, _, shape = open_shard(features_dir / first["file"])
    tokens = TensorSpec(np.dtype(np.float32), (-1, *shape), "tokens" if patch_tokens else None)
    inputs = [tokens]
    if patch_tokens:
        _, _, patch_shape = open_shard(features_dir / first["patches"]["file"])
        inputs.append(TensorSpec(np.dtype(np.float32), (-1, *patch_shape), "patches"))
    outputs = Schema([TensorSpec(np.dtype(np.int64), (-1,))])
    return mlflow.models.ModelSignature(inputs=Schema(inputs), outputs=outputs)


def _probe_metrics(probe: EvaluatedProbe, *, model_id: str, dataset: Dataset) -> list[Metric]:
    """Test and validation scores (linked to the logged model and the input dataset) and the refit's curves."""
    evaluation = probe.evaluation
    scores = {f"test/{k}": v for k, v in evaluation["test"].items()}
    scores.update({f"test/{k}_std": v for k, v in evaluation["test_std"].items()})
    low, high = evaluation["test_ci"]["balanced_accuracy"]  # bootstrap over test images (metrics.CI_LEVEL)
    scores.update({"test/balanced_accuracy_ci_low": low, "test/balanced_accuracy_ci_high": high})
    scores["val/balanced_accuracy"] = evaluation["val_balanced_accuracy"]
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0, model_id=model_id, dataset_name=dataset.name, dataset_digest=dataset.digest)
               for k, v in scores.items() if v is not None and np.isfinite(v)]  # fmt: skip
    curves = training_curves(read_json(probe.seed_dir / HISTORY_FILE))
    metrics += [Metric(k, float(v), now, int(step)) for k, points in curves.items() for step, v in points]
    return metrics


@contextlib.contextmanager
def _staged(files: dict[str, Path]) -> Iterator[Path]:
    """A temporary folder of links {artifact path: file}, so a run's artifacts go up in one `log_artifacts`."""
    with tempfile.TemporaryDirectory(prefix="layerprobe-artifacts-") as tmp:
        for name, path in files.items():
            link = Path(tmp) / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(path).resolve())  # MLflow copies the file a link points to
        yield Path(tmp)


def log_probe_run(
    probe: EvaluatedProbe,
    *,
    experiment_id: str,
    parent_run_id: str,
    tags: dict[str, str],
    run_params: dict[str, Any],
    dataset: DatasetInput,
    code_dir: Path,
    version: ModelVersion | None = None,
) -> tuple[dict[str, str], RunOperations]:
    """One child run for an evaluated probe, batched: one `create_run` carrying every tag, the probe as a pickle-free
    pyfunc model, its feature cache as input dataset, params, scores and curves in one asynchronous `log_batch`, the
    evaluation folder and sweep in one artifact upload, and a registered version (unless `version`, the registry's
    version of the same weights, exists). Ends FAILED (the error as a tag) if anything here fails.

    `tags` are the batch's common run tags (`run_tags`); `code_dir` the package as models carry it (`model_code`).
    Returns (run id, registered model, version and model uri; the pending `log_batch`). The run stays RUNNING:
    `finish_runs` ends the batch's runs together, since ending a run stops MLflow's async queue (0.7 s a run).
    """
    client = MlflowClient()
    description = describe_probe(probe)
    run_tags_ = {**tags, "mlflow.parentRunId": parent_run_id, KIND_TAG: "probe", NOTE_TAG: description,
                 "backbone": probe.backbone, "dataset": probe.dataset, "probe": probe.probe,
                 EVALUATION_TAG: probe.key, "probe_hash": probe.probe_hash,
                 "features.content_hash": probe.trained["features_hash"],
                 "dvc.dataset_version": probe.probe_config["provenance"].get("dataset_version", "")}  # fmt: skip
    run = client.create_run(experiment_id, run_name=probe.run_name, tags=run_tags_).info
    run_id = run.run_id
    try:
        # Created here, in this experiment (left to `Model.log`, a model without an active run lands in the default
        # experiment), and linked to the run as its output here: given the run, `Model.log` would read the run back
        # twice to copy its metrics onto the model (0.07 s a probe); the metrics below name the model themselves.
        logged = client.create_logged_model(experiment_id, name=probe.run_name.replace("/", "-"), source_run_id=run_id,
                                            tags={"backbone": probe.backbone, "dataset": probe.dataset,
                                                  "probe": probe.probe})  # fmt: skip
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        model = Model.log(
            None,
            flavor=mlflow.pyfunc,
            name=logged.name,
            model_id=logged.model_id,
            python_model=str(MODEL_CODE),
            artifacts={"probe": str(probe.seed_dir)},
            # From the cache's shapes. No input example: MLflow would load the model to check it (0.1 s a probe).
            signature=probe_signature(probe.features_dir, patch_tokens=bool(probe.probe_config.get("patch_tokens"))),
            code_paths=[str(code_dir)],  # the modules the pyfunc imports (`model_code`)
            # Stated, not inferred: inference imports the model in a subprocess (~3 s per probe).
            pip_requirements=_model_requirements(),
        )
        if version is None:
            version = client.create_model_version(
                probe.registered_model, source=model.model_uri, run_id=run_id, model_id=model.model_id,
                tags=version_tags(probe), description=description, await_creation_for=0,
            )  # fmt: skip
            # What `mlflow.register_model` records on the logged model: the runs table's Models column reads it.
            registered = [{"name": probe.registered_model, "version": str(version.version)}]
            client.set_logged_model_tags(model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(registered)})
        client.log_inputs(run_id, datasets=[dataset])
        evaluation = probe.evaluation
        flat = _flatten(_plain({**run_params, "best": evaluation["best"], "probe_spec": probe.probe_config["spec"],
                                "num_seeds": evaluation["num_seeds"],
                                "training": probe.trained.get("training", {})}))  # fmt: skip
        operations = client.log_batch(
            run_id,
            metrics=_probe_metrics(probe, model_id=model.model_id, dataset=dataset.dataset),
            params=[Param(k, str(v)[:6000]) for k, v in flat.items()],
            tags=[RunTag("registered_model", probe.registered_model),
                  RunTag("registered_version", str(version.version)), RunTag("layerprobe.model_id", model.model_id)],
            synchronous=False,  # MLflow's queue writes it while the artifacts are copied
        )  # fmt: skip
        evaluation_files = {f"evaluation/{p.name}": p for p in sorted(probe.evaluation_dir.iterdir()) if p.is_file()}
        with _staged({**evaluation_files, f"sweep/{SWEEP_FILE}": probe.seed_dir / SWEEP_FILE}) as folder:
            # Straight to the run's artifact store: `client.log_artifacts` would read the whole run back to find it.
            get_artifact_repository(run.artifact_uri, tracking_uri=client.tracking_uri).log_artifacts(str(folder))
    except BaseException as error:
        end_run(run_id, failed=True, error=repr(error))
        raise
    return {"run_id": run_id, "registered_model": probe.registered_model, "version": str(version.version),
            "model_uri": model.model_uri}, operations  # fmt: skip


def finish_runs(pending: list[tuple[str, RunOperations]]) -> None:
    """End runs left RUNNING by `log_probe_run` once their queued `log_batch` is written: FINISHED, or FAILED with
    the error when it was not."""
    errors = []
    for run_id, operations in pending:
        try:
            operations.wait()
        except Exception as error:  # noqa: BLE001 - recorded on its run; the first is raised once all are ended
            end_run(run_id, failed=True, error=repr(error))
            errors.append(error)
        else:
            end_run(run_id)
    if errors:
        raise errors[0]


def recorded_probe_runs(experiment_id: str) -> dict[str, Run]:
    """The experiment's finished probe runs by their key (`EVALUATION_TAG`), in one search (paged by MLflow)."""
    found: dict[str, Run] = {}
    token = None
    while True:
        page = MlflowClient().search_runs(
            [experiment_id],
            filter_string=f"tags.`{EVALUATION_TAG}` IS NOT NULL and attributes.status = 'FINISHED'",
            max_results=SEARCH_PAGE,
            order_by=["attributes.start_time ASC"],  # the earliest run of a key wins: the one first recorded
            page_token=token,
        )
        for run in page:
            found.setdefault(run.data.tags[EVALUATION_TAG], run)
        token = page.token
        if not token:
            return found


def registered_versions(names: set[str]) -> dict[tuple[str, str], ModelVersion]:
    """{(registered model, probe hash): its first version} over `names`, in one search (paged by MLflow)."""
    found: dict[tuple[str, str], ModelVersion] = {}
    if not names:
        return found
    listed = ", ".join(f"'{name}'" for name in sorted(names))
    token = None
    while True:
        page = MlflowClient().search_model_versions(f"name IN ({listed})", max_results=SEARCH_PAGE,
                                                    page_token=token)  # fmt: skip
        for version in sorted(page, key=lambda v: int(v.version)):
            if "probe_hash" in version.tags:
                found.setdefault((version.name, version.tags["probe_hash"]), version)
        token = page.token
        if not token:
            return found


SEARCH_PAGE = 1000


def describe_registered_models(params: Params, probes: list[EvaluatedProbe]) -> None:
    """Create each registered model the probes go to, or update its description where it changed."""
    client = MlflowClient()
    for name, probe in {p.registered_model: p for p in probes}.items():
        description = describe_registered_model(params, probe.backbone, probe.dataset, probe.evaluation["class_names"])
        try:
            current = client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(name, description=description,
                                           tags={"backbone": probe.backbone, "dataset": probe.dataset})  # fmt: skip
            continue
        if current.description != description:
            client.update_registered_model(name, description=description)


def record_evaluations(params: Params, probes: list[tuple[str, str, str]]) -> dict:
    """Record evaluated probes in MLflow from their outputs on disk (metrics.json, train.json, the probes, the feature
    caches), in one batch; callable wherever those files are, after the evaluations finished.

    A probe already recorded with the same key (`EVALUATION_TAG`: what decided its scores, and its weights' hash) is
    referenced, not logged again; a version is registered once per weights' hash. A new parent run holds the probes
    logged now as children and references the others (`probe_runs.json`, and the flat metrics of all of them); when
    every probe is referenced and an earlier parent covers exactly this set, no run is added at all: that parent is
    tagged `layerprobe.confirmed` and stays the record. Then `@champion` goes to the best probe by validation
    balanced accuracy per registered model.

    Returns {"experiment_id", "parent_run_id", "parent": "new" | "unchanged", "results": [evaluation + run id,
    registered model, version, model uri, "recorded": "logged" | "referenced"], "champions"}.
    """
    experiment_id = setup_experiment(params.tracking.experiment, mlruns_dir=params.paths.mlruns,
                                     tracking_uri=params.tracking.tracking_uri)  # fmt: skip
    fail_dangling_runs(experiment_id)
    evaluated = [read_evaluated_probe(params, *task) for task in probes]
    earlier = recorded_probe_runs(experiment_id)
    versions = registered_versions({p.registered_model for p in evaluated})
    set_key = stable_hash({"suite": params.suite.name, "probes": sorted(p.key for p in evaluated)})
    # Referenced: recorded before with the same key, and its version still in the registry.
    results: dict[str, dict] = {}
    for probe in evaluated:
        run, version = earlier.get(probe.key), versions.get((probe.registered_model, probe.probe_hash))
        if run is not None and version is not None:
            results[probe.key] = {"run_id": run.info.run_id, "registered_model": probe.registered_model,
                                  "version": str(version.version), "model_uri": version.source,
                                  "recorded": "referenced",
                                  "parent_run_id": run.data.tags.get("mlflow.parentRunId", "")}  # fmt: skip
    new = [p for p in evaluated if p.key not in results]
    parent = None if new else _parent_of_set(experiment_id, set_key)
    if parent is not None:
        parent_run_id = parent.info.run_id
        log_tags(parent_run_id, {CONFIRMED_TAG: _now()})
    else:
        parent_run_id = _record_new(params, experiment_id, evaluated, new, versions, results, set_key)
    rows = [{**p.evaluation, **results[p.key]} for p in evaluated]
    champions = crown_champions(rows, alias=params.evaluate.champion_alias)
    return {"experiment_id": experiment_id, "parent_run_id": parent_run_id, "results": rows, "champions": champions,
            "parent": "unchanged" if parent is not None else "new"}  # fmt: skip


def _record_new(
    params: Params,
    experiment_id: str,
    evaluated: list[EvaluatedProbe],
    new: list[EvaluatedProbe],
    versions: dict[tuple[str, str], ModelVersion],
    results: dict[str, dict],
    set_key: str,
) -> str:
    """A new parent run: the `new` probes logged as its children, the others referenced. Fills `results`."""
    tags = run_tags()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    referenced = len(evaluated) - len(new)
    summary = (f"{params.suite.name}: {len(evaluated)} probes; {len(new)} logged as child runs here, {referenced} "
               f"unchanged since earlier runs (referenced in {PROBE_RUNS_FILE}).")  # fmt: skip
    parent_run_id = start_run(experiment_id, f"{params.suite.name}-{stamp}", tags={
        "suite": params.suite.name, KIND_TAG: "evaluation", EVALUATION_SET_TAG: set_key, NOTE_TAG: summary,
        "layerprobe.summary": summary})  # fmt: skip
    pending: list[tuple[str, RunOperations]] = []
    try:
        log_params(parent_run_id, {"suite": params.suite.name})
        describe_registered_models(params, new)
        datasets: dict[Path, DatasetInput] = {}
        with tempfile.TemporaryDirectory(prefix="layerprobe-model-code-") as tmp:
            code_dir = model_code(Path(tmp))  # staged once for every model of the batch
            for probe in new:
                if probe.features_dir not in datasets:
                    name = f"{probe.backbone}/{probe.dataset} features"
                    datasets[probe.features_dir] = features_dataset(probe.features_dir, name=name)
                logged, operations = log_probe_run(
                    probe,
                    experiment_id=experiment_id,
                    parent_run_id=parent_run_id,
                    tags=tags,
                    run_params=run_params(params, probe.backbone, probe.dataset, probe.probe),
                    dataset=datasets[probe.features_dir],
                    code_dir=code_dir,
                    version=versions.get((probe.registered_model, probe.probe_hash)),
                )
                pending.append((logged["run_id"], operations))
                results[probe.key] = {**logged, "recorded": "logged", "parent_run_id": parent_run_id}
        finished, pending = pending, []
        finish_runs(finished)
        table = [{"backbone": p.backbone, "dataset": p.dataset, "probe": p.probe,
                  "test_balanced_accuracy": p.evaluation["test"]["balanced_accuracy"],
                  "val_balanced_accuracy": p.evaluation["val_balanced_accuracy"], **results[p.key]}
                 for p in evaluated]  # fmt: skip
        MlflowClient().log_dict(parent_run_id, {"columns": list(table[0]), "data": [list(r.values()) for r in table]},
                                PROBE_RUNS_FILE)  # fmt: skip
        log_metrics(parent_run_id, {f"test/balanced_accuracy/{p.run_name}": p.evaluation["test"]["balanced_accuracy"]
                                    for p in evaluated})  # fmt: skip
        log_tags(parent_run_id, {"layerprobe.probe_runs.logged": str(len(new)),
                                 "layerprobe.probe_runs.referenced": str(referenced)})  # fmt: skip
        end_run(parent_run_id)
    except BaseException as error:
        with contextlib.suppress(Exception):  # the children logged so far are complete: end them first
            finish_runs(pending)
        end_run(parent_run_id, failed=True, error=repr(error))
        raise
    return parent_run_id


def _parent_of_set(experiment_id: str, set_key: str) -> Run | None:
    """The latest finished parent run that covers exactly the probe set `set_key`, if any."""
    found = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{EVALUATION_SET_TAG}` = '{set_key}' and attributes.status = 'FINISHED'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return found[0] if found else None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def describe_run(run_id: str, headline: str) -> None:
    """Put `headline` (Markdown) at the top of a parent run's description, above its evaluation summary."""
    summary = MlflowClient().get_run(run_id).data.tags.get("layerprobe.summary", "")
    log_tags(run_id, {NOTE_TAG: f"{headline}\n\n{summary}".strip()})


def training_curves(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The refit's curves (the probe that was saved, G=1): loss and learning rate per logged step."""
    return {
        f"train/{key}": [(int(row["step"]), float(row[key][0])) for row in history]
        for key in ("loss", "lr")
        if history and key in history[0]
    }


def log_pretrain_run(experiment_id: str, summary: dict, *, recipe: Any) -> str:
    """One run `pretrain/<backbone>`: the recipe as params, held-out accuracy, the loss curve, the checkpoint's hash."""
    run_id = start_run(experiment_id, f"pretrain/{summary['backbone']}", tags={"backbone": summary["backbone"],
                                                                              "stage": "pretrain"})  # fmt: skip
    try:
        log_params(run_id, {"pretrain": recipe, "classes": summary["classes"], "num_images": summary["num_images"]})
        log_metrics(run_id, {"pretrain/held_out_accuracy": summary["held_out_accuracy"],
                             "pretrain/seconds": summary["seconds"]})  # fmt: skip
        log_curves(run_id, {f"pretrain/{key}": [(row["step"], row[key]) for row in summary["history"]]
                            for key in ("loss", "lr")})  # fmt: skip
        log_tags(run_id, {"checkpoint": summary["checkpoint"], "checkpoint.sha256": summary["sha256"]})
        end_run(run_id)
    except BaseException as error:
        end_run(run_id, failed=True, error=repr(error))
        raise
    return run_id


def crown_champions(results: list[dict], *, alias: str) -> dict[str, dict]:
    """Give `alias` to the best probe per registered model (dataset, backbone) by validation balanced accuracy,
    never by test, where it is not there already. Returns {registered model: {probe, version}}."""
    best: dict[str, dict] = {}
    for result in results:
        name = result["registered_model"]
        if name not in best or result["val_balanced_accuracy"] > best[name]["val_balanced_accuracy"]:
            best[name] = result
    client = MlflowClient()
    for name, result in best.items():
        try:
            current = client.get_model_version_by_alias(name, alias).version
        except mlflow.exceptions.MlflowException:
            current = None
        if str(current) != str(result["version"]):
            set_alias(name, alias, result["version"])
    return {name: {"probe": r["probe"], "version": r["version"]} for name, r in best.items()}


# ------------------------------------------------------------------------------------------------------------- the UI

# MLflow's UI keeps its sidebar toggle (GenAI / Model training) in the browser's local storage, and a fresh browser
# starts on GenAI whatever the experiment's kind (mlflow/mlflow#24498); the UI reads this URL parameter first.
TRAINING_SIDEBAR = "workflowType=machine_learning"


def runs_url(base_url: str, experiment_id: str | None) -> str:
    """The experiment's runs table in the MLflow UI at `base_url`, in the "Model training" sidebar and the project's
    view (`RUNS_VIEW`); the experiments list when there is no experiment yet."""
    base = base_url.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?{TRAINING_SIDEBAR}"
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&{TRAINING_SIDEBAR}"


def find_experiment(experiment: str, tracking_uri: str) -> str | None:
    """The id of `experiment` in the store at `tracking_uri` (None when no run created it yet), with the runs view
    the URL names stored on it (a store filled by an older version gets it; a read-only server keeps what it has)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        _store_view(client, found)
    return found.experiment_id


def start_ui_server(backend_store_uri: str, *, artifacts_dir: Path, host: str, port: int, log: Path):
    """`mlflow server` on the project's store (one worker, no job runner), in its own process group, writing to `log`.

    The experiments' artifact locations are file URIs under `artifacts_dir`, which the server reads directly;
    `--artifacts-destination` only applies to mlflow-artifacts:/ locations and keeps anything from landing in
    ./mlartifacts. Returns the process (`stop_ui_server` ends it and its uvicorn child).
    """
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot serve the MLflow UI on {host}:{port} ({e.strerror}): give another --port") from e
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
        "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
    }  # the job runner would start ~8 huey consumer processes; telemetry cannot reach out from our machines
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri),
        *("--artifacts-destination", Path(artifacts_dir).resolve().as_uri()),
        *("--host", host, "--port", str(port), "--workers", "1"),
    ]
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_ui_server(server: subprocess.Popen, base_url: str, *, log: Path, timeout: float = 120.0) -> None:
    """Wait until the server answers /health; fail with its log's tail when it exits or stays silent."""
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}:\n{Path(log).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base_url.rstrip('/')}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"mlflow server did not answer in {timeout:.0f} s:\n{Path(log).read_text()[-3000:]}")
        time.sleep(0.5)


def stop_ui_server(server: subprocess.Popen) -> None:
    """End `mlflow server` and its uvicorn child (its process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
