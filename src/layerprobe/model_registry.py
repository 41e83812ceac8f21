"""The MLflow model registry: one registered model per (dataset, backbone), one version per trained probe's weights,
and `@champion` on the best version by validation balanced accuracy (never by test). Called by `layerprobe.tracking`
while it holds the experiment's recording lock."""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from layerprobe.params import Params, registered_model_name  # noqa: F401 - the name is decided where params check it

if TYPE_CHECKING:
    from layerprobe.tracking import EvaluatedProbe


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


def registered_versions(names: set[str]) -> dict[tuple[str, str], ModelVersion]:
    """{(registered model, probe hash): its first version} over `names`."""
    listed = ", ".join(f"'{name}'" for name in sorted(names))
    versions = mlflow.search_model_versions(filter_string=f"name IN ({listed})") if names else []
    return {(v.name, v.tags.get("probe_hash")): v for v in sorted(versions, key=lambda v: -int(v.version))}


def register(params: Params, probe: EvaluatedProbe, model, *, run_id: str, description: str) -> ModelVersion:
    """A new version of the probe's registered model (created on its first) from its logged `model`, named on the
    model as `mlflow.register_model` names it (the runs table's Models column reads it)."""
    client, dataset, name = MlflowClient(), params.datasets[probe.dataset], probe.registered_model
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # it exists already
        client.create_registered_model(name, tags={"backbone": probe.backbone, "dataset": probe.dataset})
    task = (dataset.description or f"{dataset.source} images") + (f", {dataset.group}" if dataset.group else "")
    client.update_registered_model(  # described anew: the dataset's description or the alias may have changed
        name,
        f"Probes classifying {probe.dataset} ({task}; {len(probe.evaluation['class_names'])} classes) from the layer "
        f"tokens of the frozen backbone {probe.backbone}. One version per trained probe's weights, its tags giving the "
        f"probe, seeds, scores and features' hash. @{params.evaluate.champion_alias}: the best by validation balanced "
        "accuracy, never by test.",
    )
    new = {"description": description, "await_creation_for": 0, "model_id": model.model_id}
    version = client.create_model_version(name, model.model_uri, run_id, version_tags(probe), **new)
    registered = [{"name": name, "version": str(version.version)}]
    client.set_logged_model_tags(model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(registered)})
    return version


def crown_champions(results: list[dict], alias: str, suite_probes: list[str]) -> dict[str, dict]:
    """Give `alias` to the best probe per registered model by validation balanced accuracy, among `results` and the
    version holding it now when its probe is in the suite but not recorded now. Returns {model: {probe, version}}."""
    client, champions = MlflowClient(), {}
    for name in {r["registered_model"] for r in results}:
        candidates = [r for r in results if r["registered_model"] == name]
        try:
            current = client.get_model_version_by_alias(name, alias)
        except mlflow.exceptions.MlflowException:  # no champion yet
            current = None
        kept = current.tags.get("probe") if current else None  # a champion not recorded now stays a rival
        if kept in set(suite_probes) - {r["probe"] for r in candidates}:
            val = float(current.tags["val_balanced_accuracy"])
            candidates.append({"probe": kept, "version": current.version, "val_balanced_accuracy": val})
        best = max(candidates, key=lambda r: r["val_balanced_accuracy"])
        champions[name] = {"probe": best["probe"], "version": str(best["version"])}
        if current is None or str(current.version) != champions[name]["version"]:
            client.set_registered_model_alias(name, alias, champions[name]["version"])
    return champions
