"""Recording in MLflow: runs with their params, metrics and artifacts, and each evaluated probe as a child run with its
logged model and registered version (`layerprobe.model_registry`). Called by flows, never by the science. Runs are
addressed by id through `MlflowClient`: Prefect's task threads never share MLflow's fluent "active run"."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from layerprobe import model_registry
from layerprobe.code_key import import_closure
from layerprobe.config import HISTORY_FILE, PROBE_CONFIG, SWEEP_FILE
from layerprobe.files import read_json, stable_hash
from layerprobe.locks import file_lock
from layerprobe.params import Params

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model folder is noise

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
# What the pyfunc imports, pinned as installed: stated, since inferring them loads each model in a subprocess.
MODEL_REQUIREMENTS = ("torch", "numpy", "safetensors", "scikit-learn")
# MLflow 3's UI opens an experiment in its GenAI (traces) view unless told it holds model-training runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
KIND_TAG = "layerprobe.kind"  # "evaluation" (a parent run) or "probe" (its children)
# A probe run's key: what decided its scores (its evaluation's fingerprint) and its weights' hash.
EVALUATION_TAG = "layerprobe.evaluation"
EVALUATION_SET_TAG = "layerprobe.evaluation_set"  # a parent's probe set: a rerun covering the same set adds no run
SUMMARY_TAG = "layerprobe.summary"  # a parent's own description, below the report's headline
NOTE_TAG = "mlflow.note.content"  # a run's description: MLflow's UI shows it on the run page
PROBE_RUNS_FILE = "probe_runs.json"  # a parent's table: each probe it covers and the run that holds it
TRAIN_GRID = ("lrs", "weight_decays", "attn_dropouts", "epochs", "min_steps", "batch_size", "seeds", "precision")


def resolve_tracking_uri(mlruns_dir: str | Path, configured: str | None = None) -> str:
    """MLFLOW_TRACKING_URI wins, then params' `tracking.tracking_uri`, then a sqlite DB inside `mlruns/`."""
    if os.environ.get("MLFLOW_TRACKING_URI") or configured:
        return os.environ.get("MLFLOW_TRACKING_URI") or configured
    Path(mlruns_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(mlruns_dir).resolve() / 'mlflow.db'}"


def setup_experiment(experiment: str, *, mlruns_dir: str | Path, tracking_uri: str | None = None) -> str:
    """Point MLflow at the store and return the experiment id, creating it with artifacts under `mlruns/`."""
    mlflow.set_tracking_uri(resolve_tracking_uri(mlruns_dir, tracking_uri))
    if (found := MlflowClient().get_experiment_by_name(experiment)) is not None:
        return found.experiment_id
    artifacts = (Path(mlruns_dir).resolve() / "artifacts" / experiment).as_uri()
    try:
        return MlflowClient().create_experiment(experiment, artifact_location=artifacts, tags=EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException:  # another process created it between the two calls
        return MlflowClient().get_experiment_by_name(experiment).experiment_id


@contextlib.contextmanager
def recording(params: Params) -> Iterator[str]:
    """Hold the experiment's recording lock (beside the store) and yield its id. One recorder at a time: two would
    both register a probe's weights. So in a store beside the lock, a probe or parent run still RUNNING was left by a
    killed recorder: it is closed FAILED. (A tracking server's recorders share the lock through one `paths.mlruns`.)"""
    uri = resolve_tracking_uri(params.paths.mlruns, params.tracking.tracking_uri)
    experiment, local = params.tracking.experiment, uri.startswith("sqlite:///")
    store = Path(uri.removeprefix("sqlite:///")).parent if local else Path(params.paths.mlruns)
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in experiment)
    with file_lock(store / f".{name}.record.lock", what=f"recording in MLflow experiment {experiment!r}", log=print):
        experiment_id = setup_experiment(experiment, mlruns_dir=params.paths.mlruns, tracking_uri=uri)
        left = f"attributes.status = 'RUNNING' and tags.`{KIND_TAG}` IS NOT NULL"
        for found in mlflow.search_runs([experiment_id], left, output_format="list") if local else []:
            end_run(found.info.run_id, error="its recorder ended without closing it")
        yield experiment_id


def start_run(experiment_id: str, run_name: str, *, tags: dict[str, str]) -> str:
    """A RUNNING run with `tags` and the DVC experiment's name (`dvc exp run`)."""
    tags = {"dvc.exp_name": os.environ["DVC_EXP_NAME"], **tags} if os.environ.get("DVC_EXP_NAME") else tags
    return MlflowClient().create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


def end_run(run_id: str, *, error: str | None = None) -> None:
    if error:
        MlflowClient().set_tag(run_id, "layerprobe.error", error[:5000])
    MlflowClient().set_terminated(run_id, status="FAILED" if error else "FINISHED")


@contextlib.contextmanager
def run(experiment_id: str, run_name: str, tags: dict[str, str]) -> Iterator[str]:
    """A run (`start_run`) that ends with its block: FINISHED, or FAILED with the error that ended the block."""
    run_id = start_run(experiment_id, run_name, tags=tags)
    try:
        yield run_id
    except BaseException as error:
        end_run(run_id, error=repr(error))
        raise
    end_run(run_id)


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Flat params: nested dicts' keys joined with '.'."""
    MlflowClient().log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in _flatten(params).items()])


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(values, dict):
        return {prefix: values}
    return {k: v for key, value in values.items() for k, v in _flatten(value, f"{prefix}.{key}".strip(".")).items()}


def log_metrics(run_id: str, metrics: dict[str, float | list[tuple[int, float]]], **linked: str) -> None:
    """Scores {key: value} (missing and non-finite ones left out) and curves {key: [(step, value), ...]}; `linked`:
    the `model_id`, `dataset_name` and `dataset_digest` the scores belong to."""
    now = int(dt.datetime.now().timestamp() * 1000)
    batch = [Metric(k, float(v), now, int(step)) for k, c in metrics.items() if isinstance(c, list) for step, v in c]
    scores = {k: v for k, v in metrics.items() if not isinstance(v, list) and v is not None and np.isfinite(v)}
    MlflowClient().log_batch(run_id, metrics=batch + [Metric(k, float(v), now, 0, **linked) for k, v in scores.items()])


def log_artifacts(run_id: str, files: dict[str, str | Path]) -> None:
    """Log files: {artifact folder: local path}; a folder is logged whole."""
    for folder, path in files.items():
        log = MlflowClient().log_artifacts if Path(path).is_dir() else MlflowClient().log_artifact
        log(run_id, str(path), artifact_path=folder)


def describe_run(run_id: str, headline: str) -> None:
    """Put `headline` (Markdown) at the top of a parent run's description, above its evaluation summary."""
    summary = MlflowClient().get_run(run_id).data.tags.get(SUMMARY_TAG, "")
    MlflowClient().set_tag(run_id, NOTE_TAG, f"{headline}\n\n{summary}".strip())


def log_pretrain_run(experiment_id: str, summary: dict, *, recipe: Any) -> str:
    """One run `pretrain/<backbone>`: the recipe as params, held-out accuracy, the loss curve, the checkpoint's hash."""
    tags = {"backbone": summary["backbone"], "stage": "pretrain"}
    tags |= {"checkpoint": summary["checkpoint"], "checkpoint.sha256": summary["sha256"]}
    with run(experiment_id, f"pretrain/{summary['backbone']}", tags) as run_id:
        data = {"classes": summary["classes"], "num_images": summary["num_images"]}
        log_params(run_id, {"pretrain": dataclasses.asdict(recipe)} | data)
        metrics = {f"pretrain/{k}": summary[k] for k in ("held_out_accuracy", "seconds")}
        metrics |= {f"pretrain/{k}": [(row["step"], row[k]) for row in summary["history"]] for k in ("loss", "lr")}
        log_metrics(run_id, metrics)
    return run_id


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

    @property
    def names(self) -> dict[str, str]:
        return {key: getattr(self, key) for key in ("backbone", "dataset", "probe", "registered_model")}


def read_evaluated_probe(params: Params, backbone: str, dataset: str, probe: str) -> EvaluatedProbe:
    paths, names = params.paths, (backbone, dataset, probe)
    if not paths.evaluation_marker(*names).is_file():
        raise FileNotFoundError(f"{'/'.join(names)} is not evaluated: {paths.evaluation_marker(*names)} is missing")
    trained = read_json(paths.train_marker(*names))
    seed_dir = Path(trained["seeds"][0]["dir"])
    files = sorted(p for p in seed_dir.rglob("*") if p.is_file())
    digest = hashlib.sha256(b"".join(p.relative_to(seed_dir).as_posix().encode() + p.read_bytes() for p in files))
    registered = model_registry.registered_model_name(params.evaluate.registry_prefix, dataset, backbone)
    outputs = (paths.evaluation_dir(*names), seed_dir, paths.features_dir(backbone, dataset))
    read = (read_json(paths.evaluation_marker(*names)), trained, read_json(seed_dir / PROBE_CONFIG))
    return EvaluatedProbe(*names, *read, *outputs, probe_hash=digest.hexdigest()[:16], registered_model=registered)


def describe_probe(probe: EvaluatedProbe) -> str:
    """One line: `alf on vit_shapes_d6 / digits: val 71.0, test 67.7 [63.1, 72.5]` (balanced accuracy, %)."""
    evaluation, seeds = probe.evaluation, probe.evaluation["num_seeds"]
    low, high = (f"{100 * bound:.1f}" for bound in evaluation["test_ci"]["balanced_accuracy"])
    test = f"{100 * evaluation['test']['balanced_accuracy']:.1f}"
    test += f" ± {100 * evaluation['test_std']['balanced_accuracy']:.1f} ({seeds} seeds)" if seeds > 1 else ""
    val = f"{100 * evaluation['val_balanced_accuracy']:.1f}"
    return f"{probe.probe} on {probe.backbone} / {probe.dataset}: val {val}, test {test} [{low}, {high}]"


def features_dataset(probe: EvaluatedProbe) -> DatasetInput:
    """The probe's feature cache as an MLflow input dataset: its content hash as digest, its split sizes and shape
    [N, L, T, D] as profile. The same cache is the same dataset in every run."""
    from layerprobe.features import cache_content_hash, open_shard, read_manifest

    manifest = read_manifest(probe.features_dir)
    shards = [open_shard(probe.features_dir / entry["file"]) for entry in manifest["shards"]]  # memory-mapped
    splits = Counter(str(split) for batch, _, _ in shards for split in batch.column("split").to_pylist())
    profile = {"num_rows": manifest["num_images"], "splits": splits, "shape": [manifest["num_images"], *shards[0][2]]}
    source, digest = json.dumps({"uri": probe.features_dir.resolve().as_uri()}), cache_content_hash(probe.features_dir)
    name = f"{probe.backbone}/{probe.dataset} features"
    dataset = Dataset(name, digest[:16], "local", source, profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


def log_probe_run(params: Params, probe: EvaluatedProbe, parent: tuple[str, str], *, cache, code_dir, version) -> dict:
    """What one probe records, as a child run of `parent` (experiment id, run id): its feature `cache` as input; the
    probe as a pickle-free pyfunc model, registered unless `version` (of the same weights) exists; params; scores
    linked to the model and the cache; the refit's curves; the evaluation folder (figures, predictions); the sweep."""
    (experiment_id, parent_id), evaluation, description = parent, probe.evaluation, describe_probe(probe)
    tags = probe.names | {"probe_hash": probe.probe_hash, "features.content_hash": probe.trained["features_hash"]}
    tags |= {"mlflow.parentRunId": parent_id, KIND_TAG: "probe", NOTE_TAG: description, EVALUATION_TAG: probe.key}
    with run(experiment_id, probe.run_name, tags) as run_id:
        client = MlflowClient()
        client.log_inputs(run_id, datasets=[cache])
        # Created in this experiment: left to `Model.log`, a model without an active run lands in experiment 0.
        model = client.create_logged_model(experiment_id, name=probe.run_name.replace("/", "-"), source_run_id=run_id)
        required = [f"{name}=={installed_version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS]
        pyfunc = {"python_model": str(MODEL_CODE), "artifacts": {"probe": str(probe.seed_dir)}, "name": model.name}
        pyfunc |= {"code_paths": [str(code_dir)], "pip_requirements": required, "model_id": model.model_id}
        model = Model.log(None, mlflow.pyfunc, run_id=run_id, **pyfunc)  # its input and output: `mlflow_model`
        version = version or model_registry.register(params, probe, model, run_id=run_id, description=description)
        client.set_tag(run_id, "registered_version", str(version.version))

        backbone, extract = params.backbones[probe.backbone], params.extract
        logged = {"backbone": probe.backbone, "dataset": probe.dataset, "probe": probe.probe, "tap": extract.tap}
        logged |= {key: getattr(backbone, key) for key in ("model", "pretrained", "checkpoint", "model_kwargs")}
        logged |= {"dataset_source": params.datasets[probe.dataset].source, "feature_dtype": extract.dtype}
        logged |= {"extract_precision": extract.precision, "train": {k: getattr(params.train, k) for k in TRAIN_GRID}}
        logged |= {"best": evaluation["best"], "num_seeds": evaluation["num_seeds"]}
        logged |= {"probe_spec": probe.probe_config["spec"], "training": probe.trained.get("training", {})}
        log_params(run_id, logged)

        low, high = evaluation["test_ci"]["balanced_accuracy"]  # bootstrap over test images (metrics.CI_LEVEL)
        scores = {f"test/{k}": v for k, v in evaluation["test"].items()}
        scores |= {f"test/{k}_std": v for k, v in evaluation["test_std"].items()}
        scores |= {"test/balanced_accuracy_ci_low": low, "test/balanced_accuracy_ci_high": high}
        scores |= {"val/balanced_accuracy": evaluation["val_balanced_accuracy"]}
        history = read_json(probe.seed_dir / HISTORY_FILE)  # the refit's curves (the probe that was saved)
        scores |= {f"train/{k}": [(row["step"], row[k][0]) for row in history] for k in ("loss", "lr")}
        data = cache.dataset
        log_metrics(run_id, scores, model_id=model.model_id, dataset_name=data.name, dataset_digest=data.digest)
        log_artifacts(run_id, {"evaluation": probe.evaluation_dir, "sweep": probe.seed_dir / SWEEP_FILE})
    return {"run_id": run_id, "version": str(version.version), "model_uri": model.model_uri, "recorded": "logged"}


def model_code(folder: Path) -> Path:
    """`folder/layerprobe`: the modules the pyfunc imports (the import closure of `mlflow_model`), so `models:/...`
    loads where layerprobe is not installed; the rest of the package stays out of every model."""
    package, code_dir = Path(__file__).parent, Path(folder) / "layerprobe"
    for path in import_closure("layerprobe.mlflow_model"):
        if path.is_relative_to(package):
            (code_dir / path.relative_to(package)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, code_dir / path.relative_to(package))
    return code_dir


def record_evaluations(params: Params, probes: list[tuple[str, str, str]]) -> dict:
    """Record evaluated probes (backbone, dataset, probe) from their outputs on disk, under the recording lock.

    A probe recorded before with its key (`EVALUATION_TAG`), its version still registered, is referenced, not logged
    again; a version is registered once per weights' hash. A new parent run holds the probes logged now and references
    the others (`probe_runs.json`), unless every probe is referenced and an earlier parent holds exactly this set: that
    one stays the record, tagged `layerprobe.confirmed`. `@champion`: the best by validation balanced accuracy.
    """
    evaluated = [read_evaluated_probe(params, *task) for task in probes]
    set_key = stable_hash({"suite": params.suite.name, "probes": sorted(p.key for p in evaluated)})
    with recording(params) as experiment_id:
        versions = model_registry.registered_versions({p.registered_model for p in evaluated})
        # Newest first, so each key keeps its earliest run: the one first recorded.
        earlier = {r.data.tags[EVALUATION_TAG]: r.info.run_id for r in _search(experiment_id, EVALUATION_TAG, None)}
        known = {p.key: versions.get((p.registered_model, p.probe_hash)) for p in evaluated if p.key in earlier}
        results = {
            key: {"run_id": earlier[key], "version": str(v.version), "model_uri": v.source, "recorded": "referenced"}
            for key, v in known.items()
            if v is not None
        }
        new = [p for p in evaluated if p.key not in results]
        same = [] if new else _search(experiment_id, EVALUATION_SET_TAG, set_key)
        if same:
            parent_id = same[0].info.run_id
            MlflowClient().set_tag(parent_id, "layerprobe.confirmed", dt.datetime.now(dt.timezone.utc).isoformat())
        else:
            parent_id = _record_new(params, experiment_id, evaluated, new, versions, results, set_key)
        rows = [p.evaluation | p.names | results[p.key] for p in evaluated]
        champions = model_registry.crown_champions(rows, params.evaluate.champion_alias, params.suite.probes)
    recorded = {"experiment_id": experiment_id, "parent_run_id": parent_id, "results": rows, "champions": champions}
    return recorded | {"parent": "unchanged" if same else "new"}


def _record_new(params: Params, experiment_id: str, evaluated, new, versions: dict, results: dict, set_key: str) -> str:
    """A new parent run: the `new` probes logged as its children, the others referenced. Fills `results`."""
    summary = f"{params.suite.name}: {len(evaluated)} probes; {len(new)} logged as child runs here, "
    summary += f"{len(evaluated) - len(new)} unchanged since earlier runs (referenced in {PROBE_RUNS_FILE})."
    tags = {"suite": params.suite.name, KIND_TAG: "evaluation", EVALUATION_SET_TAG: set_key, NOTE_TAG: summary}
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    with run(experiment_id, f"{params.suite.name}-{stamp}", tags | {SUMMARY_TAG: summary}) as parent_id:
        caches = {p.features_dir: features_dataset(p) for p in {p.features_dir: p for p in new}.values()}
        with tempfile.TemporaryDirectory(prefix="layerprobe-model-code-") as tmp:
            code_dir, parent = model_code(Path(tmp)), (experiment_id, parent_id)
            for p in new:  # the model code staged once for the batch, each cache read once
                version, cache = versions.get((p.registered_model, p.probe_hash)), caches[p.features_dir]
                results[p.key] = log_probe_run(params, p, parent, cache=cache, code_dir=code_dir, version=version)
        table = [p.names | results[p.key] for p in evaluated]  # the scores are the probe runs' own
        table = {"columns": list(table[0]), "data": [list(row.values()) for row in table]}
        MlflowClient().log_dict(parent_id, table, PROBE_RUNS_FILE)
    return parent_id


def _search(experiment_id: str, tag: str, value: str | None) -> list:
    """The finished runs carrying `tag` (with `value`, unless None), newest first, every page."""
    condition = f"tags.`{tag}` = '{value}'" if value is not None else f"tags.`{tag}` IS NOT NULL"
    condition += " and attributes.status = 'FINISHED'"
    return mlflow.search_runs([experiment_id], condition, order_by=["attributes.start_time DESC"], output_format="list")
