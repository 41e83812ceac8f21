"""Recording in MLflow when recorders overlap or cover part of the suite: one version per weights, one champion.

The probes are prepared, extracted, trained and scored once per module through the CLI (in process, no Prefect),
on two datasets; each test records them into its own copy of that project.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from conftest import tiny_params, write_params
from mlflow.tracking import MlflowClient

from layerprobe import model_registry, tracking
from layerprobe.cli import main
from layerprobe.params import load_params

DATASETS = ["count", "shapes"]
PROBES = ["linear_last_cls", "alf"]
TASKS = [("tiny_vit", d, p) for d in DATASETS for p in PROBES]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, migrated_mlflow_db) -> Path:
    """Every probe of two datasets scored, nothing recorded yet."""
    folder = tmp_path_factory.mktemp("evaluated")
    params = tiny_params()
    params["suite"]["datasets"] = DATASETS
    options = {"num_images": 160, "image_size": 32, "seed": 1}
    params["datasets"]["shapes"] = {**params["datasets"]["count"], "options": options}
    write_params(folder, params)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for _, dataset, probe in TASKS:
            names = ["--backbone", "tiny_vit", "--dataset", dataset]
            if probe == PROBES[0]:
                assert main(["extract", *names]) == 0
            assert main(["train", *names, "--probe", probe]) == 0
            assert main(["evaluate", *names, "--probe", probe]) == 0
    (folder / "mlruns").mkdir()
    shutil.copy(migrated_mlflow_db, folder / "mlruns" / "mlflow.db")
    return folder


@pytest.fixture
def project(evaluated, tmp_path, monkeypatch) -> Path:
    """A copy of the evaluated project as the working directory, with its own MLflow store."""
    shutil.copytree(evaluated, tmp_path / "project")
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "project"


def registry_state(client: MlflowClient) -> dict:
    """{registered model: ({probe: [versions]}, the champion's probe)}."""
    state = {}
    for model in client.search_registered_models():
        versions = {}
        for version in client.search_model_versions(f"name = '{model.name}'"):
            versions.setdefault(version.tags["probe"], []).append(version.version)
        champion = client.get_model_version_by_alias(model.name, "champion").tags["probe"]
        state[model.name] = ({probe: sorted(v) for probe, v in versions.items()}, champion)
    return state


def best_probes(results: list[dict]) -> dict[str, str]:
    """The probe with the best validation balanced accuracy per registered model."""
    best = {}
    for row in results:
        name = row["registered_model"]
        if name not in best or row["val_balanced_accuracy"] > best[name]["val_balanced_accuracy"]:
            best[name] = row
    return {name: row["probe"] for name, row in best.items()}


def test_two_recordings_at_once_register_each_probes_weights_once(project, monkeypatch):
    params = load_params("params.yaml")
    # A pause point: a recorder that has read what the registry holds waits until the other has read it too, or
    # 3 s when the other cannot read it before this one has recorded.
    read, both_read, found = [], threading.Event(), model_registry.registered_versions

    def read_then_pause(names):
        versions = found(names)
        read.append(names)
        if len(read) == 2:
            both_read.set()
        both_read.wait(timeout=3)
        return versions

    monkeypatch.setattr(model_registry, "registered_versions", read_then_pause)
    outcomes, errors = [], []

    def record() -> None:
        try:
            outcomes.append(tracking.record_evaluations(params, TASKS))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=record) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors and len(outcomes) == 2, errors

    client = MlflowClient()
    state = registry_state(client)
    assert set(state) == {"layerprobe-count-tiny-vit", "layerprobe-shapes-tiny-vit"}
    for name, (versions, champion) in state.items():
        assert {probe: len(v) for probe, v in versions.items()} == {p: 1 for p in PROBES}, name  # one per weights
        assert champion == best_probes(outcomes[0]["results"])[name]
    first, second = ({(r["dataset"], r["probe"]): r["version"] for r in o["results"]} for o in outcomes)
    assert first == second  # both recordings name the same version of each probe
    assert sorted(o["parent"] for o in outcomes) == ["new", "unchanged"]
    runs = client.search_runs([outcomes[0]["experiment_id"]])
    assert sorted(r.data.tags["layerprobe.kind"] for r in runs) == ["evaluation"] + ["probe"] * len(TASKS)


def test_runs_a_killed_recorder_left_running_are_closed_by_the_next_recording(project):
    params = load_params("params.yaml")
    experiment_id = tracking.setup_experiment("tiny", mlruns_dir="mlruns")
    left = tracking.start_run(experiment_id, "tiny-killed", tags={tracking.KIND_TAG: "evaluation"})
    other = tracking.start_run(experiment_id, "pretrain/tiny_vit", tags={"stage": "pretrain"})
    tracking.record_evaluations(params, TASKS[:1])
    client = MlflowClient()
    assert client.get_run(left).info.status == "FAILED"
    assert "recorder ended" in client.get_run(left).data.tags["layerprobe.error"]
    assert client.get_run(other).info.status == "RUNNING"  # not a recording's run: left alone


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_filtered_evaluate_keeps_the_other_rows_and_the_suites_champion(project):
    from flows.evaluate import evaluate_flow

    summary, run = Path("results/metrics.json"), Path("results/evaluate/run.json")
    evaluate_flow("params.yaml")
    full, champions = json.loads(summary.read_text()), json.loads(run.read_text())["champions"]
    assert set(full["tiny_vit"]) == set(DATASETS)

    # One dataset: the other's rows and champion stay in both summaries.
    evaluate_flow("params.yaml", datasets=["count"])
    assert json.loads(summary.read_text()) == full
    assert json.loads(run.read_text())["champions"] == champions

    # One probe, the one that is not the champion: the champion stays the best of the suite's probes.
    state = registry_state(MlflowClient())
    name = "layerprobe-count-tiny-vit"
    other = next(p for p in PROBES if p != champions[name]["probe"])
    evaluate_flow("params.yaml", datasets=["count"], probes=[other])
    assert registry_state(MlflowClient()) == state
    assert json.loads(summary.read_text()) == full
    assert json.loads(run.read_text())["champions"] == champions
