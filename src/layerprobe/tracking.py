"""Every MLflow call: tracking store, parent/child runs, metrics, artifacts, logged models and the registry.

Called by flows, never by the science modules. Runs are addressed by id through `MlflowClient` so Prefect tasks in
threads never share MLflow's fluent "active run" state. Metadata lives in `sqlite:///<mlruns>/mlflow.db` (MLflow's
file store is deprecated and refused by 3.13+); artifacts live under `<mlruns>/artifacts`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from layerprobe.config import HISTORY_FILE, PROBE_CONFIG, SWEEP_FILE
from layerprobe.files import read_json
from layerprobe.locks import process_alive
from layerprobe.params import Params

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
PID_TAG = "layerprobe.pid"
HOST_TAG = "layerprobe.host"
# MLflow 3's UI opens an experiment in its GenAI (traces) view unless told it holds model-training runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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
            return client.create_experiment(experiment, artifact_location=artifacts, tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException:  # another process created it between the two calls
            found = client.get_experiment_by_name(experiment)
    for key, value in EXPERIMENT_KIND.items():
        if key not in found.tags:  # an experiment made by an older version (or by hand)
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


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


def log_probe_model(
    run_id: str, *, probe_dir: Path, input_example: np.ndarray, output_example: np.ndarray, registered_name: str
) -> tuple[str, str]:
    """Log the probe as a pickle-free pyfunc (models from code + safetensors) and register a version.

    A version whose probe weights are byte-identical to an existing version's is reused instead of duplicated, so a
    rerun that changed nothing adds no registry noise. Returns (model uri, registered version).
    """
    probe_hash = _dir_hash(Path(probe_dir))
    client = MlflowClient()
    for version in _model_versions(registered_name):
        if version.tags.get("probe_hash") == probe_hash:
            return version.source, str(version.version)
    signature = mlflow.models.infer_signature(input_example, output_example)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="probe",
            python_model=str(MODEL_CODE),
            artifacts={"probe": str(probe_dir)},
            signature=signature,
            input_example=input_example,
            # The package travels with the model, so `models:/...` loads where layerprobe is not installed.
            code_paths=[str(Path(__file__).parent)],
            # Stated, not inferred: inference imports the model in a subprocess (~3 s per probe).
            pip_requirements=_model_requirements(),
        )
    version = mlflow.register_model(info.model_uri, registered_name, tags={"probe_hash": probe_hash, "run_id": run_id})
    client.set_model_version_tag(registered_name, version.version, "probe_hash", probe_hash)
    return info.model_uri, str(version.version)


def _model_requirements() -> list[str]:
    """What the pyfunc imports at load time, pinned to the versions it was logged with."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "numpy", "safetensors", "scikit-learn")]


def _model_versions(name: str) -> list:
    client = MlflowClient()
    try:
        return list(client.search_model_versions(f"name = '{name}'"))
    except mlflow.exceptions.MlflowException:
        return []


def _dir_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def set_alias(registered_name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(registered_name, alias, version)


def registered_model_name(prefix: str, dataset: str, backbone: str) -> str:
    """`layerprobe-<dataset>-<backbone>`: one registered model per (dataset, backbone); probes are its versions."""
    return f"{prefix}-{dataset}-{backbone}".replace("/", "-").replace("_", "-")


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


def log_probe_run(
    experiment_id: str,
    parent_run_id: str,
    evaluation: dict,
    *,
    trained: dict,
    run_params: dict[str, Any],
    evaluation_dir: Path,
    signature_example: tuple[np.ndarray, np.ndarray],
    registered_name: str,
) -> dict[str, str]:
    """One child run for an evaluated probe: params, tags, test metrics, training curves, the evaluation folder
    and sweep as artifacts, and the probe as a registered model version. Returns run id, version and model uri.

    `signature_example` is a few input rows and the probe's predictions on them (the model's signature).
    The run ends FAILED (with the error as a tag) if anything here fails, so no run is left dangling.
    """
    backbone, dataset, probe = evaluation["backbone"], evaluation["dataset"], evaluation["probe"]
    run_id = start_run(experiment_id, f"{backbone}/{dataset}/{probe}", parent_run_id=parent_run_id)
    try:
        seed_dir = Path(trained["seeds"][0]["dir"])
        probe_config = read_json(seed_dir / PROBE_CONFIG)
        log_params(run_id, {**run_params, "best": evaluation["best"], "probe_spec": probe_config["spec"],
                            "num_seeds": evaluation["num_seeds"],
                            "training": trained.get("training", {})})  # fmt: skip
        log_tags(run_id, {"backbone": backbone, "dataset": dataset, "probe": probe,
                          "features.content_hash": trained["features_hash"],
                          "dvc.dataset_version": probe_config["provenance"].get("dataset_version", "")})  # fmt: skip
        metrics = {f"test/{k}": v for k, v in evaluation["test"].items()}
        metrics.update({f"test/{k}_std": v for k, v in evaluation["test_std"].items()})
        low, high = evaluation["test_ci"]["balanced_accuracy"]  # bootstrap over test images (metrics.CI_LEVEL)
        metrics.update({"test/balanced_accuracy_ci_low": low, "test/balanced_accuracy_ci_high": high})
        metrics["val/balanced_accuracy"] = evaluation["val_balanced_accuracy"]
        log_metrics(run_id, metrics)
        log_curves(run_id, training_curves(read_json(seed_dir / HISTORY_FILE)))
        log_artifacts(run_id, {"evaluation": evaluation_dir, "sweep": seed_dir / SWEEP_FILE})
        inputs, outputs = signature_example
        model_uri, version = log_probe_model(run_id, probe_dir=seed_dir, input_example=inputs,
                                             output_example=outputs, registered_name=registered_name)  # fmt: skip
        log_tags(run_id, {"registered_model": registered_name, "registered_version": version})
        end_run(run_id)
    except BaseException as error:
        end_run(run_id, failed=True, error=repr(error))
        raise
    return {"run_id": run_id, "registered_model": registered_name, "version": version, "model_uri": model_uri}


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
    never by test. Returns {registered model: {probe, version}}."""
    best: dict[str, dict] = {}
    for result in results:
        name = result["registered_model"]
        if name not in best or result["val_balanced_accuracy"] > best[name]["val_balanced_accuracy"]:
            best[name] = result
    for name, result in best.items():
        set_alias(name, alias, result["version"])
    return {name: {"probe": r["probe"], "version": r["version"]} for name, r in best.items()}
