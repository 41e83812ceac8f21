"""Prefect flows on a tiny suite: retries on transient errors, caching on rerun, MLflow runs and the registry.

One session-scoped Prefect test server serves every test here (see conftest.prefect_harness); the tests of a trained
project each take a copy of one trained once per test session (`trained_once`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import built_once, copy_project, tiny_params, write_params
from mlflow.tracking import MlflowClient
from prefect import flow, task

from flows.common import task_options
from layerprobe.params import load_params

# One worker runs every test of the module, so none waits while another builds the project they share.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness"), pytest.mark.xdist_group("flows-trained")]


def test_task_failing_once_with_a_transient_error_is_retried_and_succeeds(project_dir):
    params = load_params("params.yaml")
    attempts = []

    @task(**{**task_options(params), "persist_result": False})
    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("shared filesystem hiccup")
        return "done"

    @flow
    def run_flaky() -> str:
        return flaky()

    assert run_flaky() == "done"
    assert len(attempts) == 2


def test_bad_input_is_not_retried(project_dir):
    params = load_params("params.yaml")
    attempts = []

    @task(**{**task_options(params), "persist_result": False})
    def bad() -> None:
        attempts.append(1)
        raise ValueError("unknown dataset 'x'")

    @flow
    def run_bad() -> None:
        bad()

    with pytest.raises(ValueError, match="unknown dataset"):
        run_bad()
    assert len(attempts) == 1


@pytest.fixture(scope="session")
def trained_once(tmp_path_factory, migrated_mlflow_db, prefect_harness) -> Path:
    """The tiny project after prepare → extract → train through the flows, in process, once per test session."""
    from flows.extract import extract_flow
    from flows.prepare import prepare_flow
    from flows.train import train_flow

    def build(folder: Path) -> None:
        (folder / "mlruns").mkdir(parents=True)
        shutil.copy(migrated_mlflow_db, folder / "mlruns" / "mlflow.db")
        write_params(folder, tiny_params())
        with contextlib.chdir(folder):
            prepare_flow("params.yaml")
            extract_flow("params.yaml")
            train_flow("params.yaml")

    return built_once(tmp_path_factory, "flows-trained", build)


@pytest.fixture
def trained_project(trained_once, tmp_path, monkeypatch) -> Path:
    """A copy of the trained project (its times kept) as the working directory."""
    copy_project(trained_once, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_rerun_of_the_stages_reuses_every_output_whose_fingerprint_matches(trained_project):
    from flows.extract import extract_flow
    from flows.prepare import prepare_flow
    from flows.train import train_flow

    probe_file = Path("probes/tiny_vit/count/alf/seed-0/probe.safetensors")
    before = probe_file.stat().st_mtime_ns
    summaries = prepare_flow("params.yaml") + extract_flow("params.yaml") + train_flow("params.yaml")
    assert [s["status"] for s in summaries] == ["reused"] * 4  # 1 dataset, 1 cache, 2 probes
    assert probe_file.stat().st_mtime_ns == before


def test_a_probe_parameter_retrains_that_probe_only(trained_project):
    import yaml

    from flows.train import train_flow

    data = yaml.safe_load(Path("params.yaml").read_text())
    data["probes"]["alf"]["num_heads"] = 2
    Path("params.yaml").write_text(yaml.safe_dump(data))
    status = {s["probe"]: (s["status"], s["reason"]) for s in train_flow("params.yaml")}
    assert status == {"linear_last_cls": ("reused", None), "alf": ("computed", "params changed")}


def test_deleted_output_is_recomputed(trained_project):
    from flows.train import train_flow

    shutil.rmtree("probes/tiny_vit/count/alf")
    train_flow("params.yaml", probes=["alf"])
    assert Path("probes/tiny_vit/count/alf/train.json").is_file()


def test_evaluate_records_runs_metrics_heatmaps_and_champion(trained_project):
    from flows.evaluate import evaluate_flow

    summary = evaluate_flow("params.yaml")
    assert set(summary["tiny_vit"]["count"]) == {"linear_last_cls", "alf"}
    client = MlflowClient()
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    alf = next(r for r in children if r.data.tags["probe"] == "alf")
    assert alf.info.run_name == "tiny_vit/count/alf"
    assert 0.0 <= alf.data.metrics["test/balanced_accuracy"] <= 1.0
    low, high = alf.data.metrics["test/balanced_accuracy_ci_low"], alf.data.metrics["test/balanced_accuracy_ci_high"]
    assert low <= alf.data.metrics["test/balanced_accuracy"] <= high
    assert alf.data.params["tap"] == "norm2"
    assert len(client.get_metric_history(alf.info.run_id, "train/loss")) > 1
    artifacts = {a.path for a in client.list_artifacts(alf.info.run_id, "evaluation")}
    assert {
        "evaluation/heatmap.png",
        "evaluation/heatmap.json",
        "evaluation/confusion.png",
        "evaluation/predictions.npz",
    } <= artifacts

    # Each probe run names its input: the feature cache, by content hash, with its splits and shape.
    features_hash = json.loads(Path("probes/tiny_vit/count/alf/train.json").read_text())["features_hash"]
    (dataset,) = [i.dataset for i in alf.inputs.dataset_inputs]
    assert (dataset.name, dataset.digest) == ("tiny_vit/count features", features_hash[:16])
    profile = json.loads(dataset.profile)
    assert sum(profile["splits"].values()) == profile["num_rows"] == 240 and set(profile["splits"]) == {
        "train",
        "val",
        "test",
    }
    assert profile["shape"] == [240, 4, 2, 32]  # 3 blocks + final, cls/ap, width 32
    other = next(r for r in children if r.data.tags["probe"] == "linear_last_cls")
    assert [i.dataset.digest for i in other.inputs.dataset_inputs] == [dataset.digest]

    # The registry says what each version is: the probe, its scores, seeds and features; the model says the task.
    name = "layerprobe-count-tiny-vit"
    versions = {v.tags["probe"]: v for v in client.search_model_versions(f"name = '{name}'")}
    assert set(versions) == {"alf", "linear_last_cls"}
    version = versions["alf"]
    score = alf.data.metrics["test/balanced_accuracy"]
    val = alf.data.metrics["val/balanced_accuracy"]
    assert version.description == (
        f"alf on tiny_vit / count: val {100 * val:.1f}, test {100 * score:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    )
    assert version.tags["test_balanced_accuracy"] == f"{score:.4f}" and version.tags["seeds"] == "0"
    assert version.tags["features.content_hash"] == features_hash and version.run_id == alf.info.run_id
    registered = client.get_registered_model(name)
    assert "count" in registered.description and "@champion" in registered.description
    champion = client.get_model_version_by_alias(name, "champion")
    best = max(children, key=lambda r: r.data.metrics["val/balanced_accuracy"])
    assert str(champion.version) == best.data.tags["registered_version"]
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    from layerprobe.features import read_features

    test = read_features(Path("features/tiny_vit/count"), split="test")
    predictions = loaded.predict(test.tokens[:5].float().numpy())
    assert predictions.shape == (5,)
    # A fresh process loads it from the model's own copy of the package (only the modules its pyfunc imports), and
    # every layerprobe module it imports comes from there.
    import subprocess
    import sys

    np.save("rows.npy", test.tokens[:5].float().numpy())
    script = """import json, sys, mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
predictions = mlflow.pyfunc.load_model(sys.argv[2]).predict(np.load("rows.npy")).tolist()
files = sorted({m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "layerprobe"})
print(json.dumps({"predictions": predictions, "files": files}))"""
    command = [sys.executable, "-c", script, mlflow.get_tracking_uri(), f"models:/{name}@champion"]
    elsewhere = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    shown = json.loads(elsewhere.stdout.strip().splitlines()[-1])
    assert shown["predictions"] == predictions.tolist()
    assert shown["files"] and all("/artifacts/code/layerprobe/" in f for f in shown["files"]), shown["files"]
    assert json.loads(Path("results/evaluate/run.json").read_text())["parent_run_id"] == parents[0].info.run_id

    # The report pairs the two probes' test predictions: the gain and its interval on the parent run and in the table,
    # and the mean gain per backbone as the parent run's description.
    from flows.report import report_flow

    report_flow("params.yaml")
    parent = client.get_run(parents[0].info.run_id)
    gain = parent.data.metrics["test/balanced_accuracy_gain/tiny_vit/count"]
    by_probe = {r.data.tags["probe"]: r.data.metrics["test/balanced_accuracy"] for r in children}
    assert gain == pytest.approx(by_probe["alf"] - by_probe["linear_last_cls"])
    low, high = (
        parent.data.metrics[f"test/balanced_accuracy_gain_ci_{bound}/tiny_vit/count"] for bound in ("low", "high")
    )
    assert low <= gain <= high
    assert f"{100 * gain:+.2f} [{100 * low:.1f}, {100 * high:.1f}] |" in Path("results/report/report.md").read_text()
    description = parent.data.tags["mlflow.note.content"]
    assert description.startswith("Mean gain of alf") and f"- tiny_vit: {100 * gain:+.2f}" in description

    # Nothing changed: no run, no version is added; the first parent stays the record.
    evaluate_flow("params.yaml")
    assert len(client.search_runs([experiment.experiment_id])) == 3
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    assert json.loads(Path("results/evaluate/run.json").read_text())["parent_run_id"] == parents[0].info.run_id
    assert "layerprobe.confirmed" in client.get_run(parents[0].info.run_id).data.tags


def test_a_retrained_probe_is_logged_again_and_the_unchanged_one_is_referenced(trained_project):
    import yaml

    from flows.evaluate import evaluate_flow
    from flows.train import train_flow

    evaluate_flow("params.yaml")
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("tiny").experiment_id
    first = {r.data.tags["probe"]: r for r in client.search_runs([experiment_id]) if "probe" in r.data.tags}
    data = yaml.safe_load(Path("params.yaml").read_text())
    data["probes"]["alf"]["num_heads"] = 2
    Path("params.yaml").write_text(yaml.safe_dump(data))
    train_flow("params.yaml")  # alf retrained, linear_last_cls reused
    evaluate_flow("params.yaml")

    parent_id = json.loads(Path("results/evaluate/run.json").read_text())["parent_run_id"]
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert [r.data.tags["probe"] for r in children] == ["alf"]  # only the changed probe is logged again
    table = json.loads(Path(client.download_artifacts(parent_id, "probe_runs.json")).read_text())
    rows = {
        row[table["columns"].index("probe")]: dict(zip(table["columns"], row, strict=True)) for row in table["data"]
    }
    assert rows["linear_last_cls"]["run_id"] == first["linear_last_cls"].info.run_id  # referenced, not copied
    assert rows["linear_last_cls"]["recorded"] == "referenced" and rows["alf"]["recorded"] == "logged"
    assert rows["alf"]["run_id"] == children[0].info.run_id != first["alf"].info.run_id
    versions = client.search_model_versions("name = 'layerprobe-count-tiny-vit'")
    assert sorted(v.tags["probe"] for v in versions) == ["alf", "alf", "linear_last_cls"]


def test_failed_evaluation_leaves_no_run_dangling(trained_project, monkeypatch):
    from flows.evaluate import evaluate_flow

    # A probe that cannot be scored: the flow fails before recording anything.
    weights = Path("probes/tiny_vit/count/alf/seed-0/probe.safetensors")
    good = weights.read_bytes()
    weights.write_bytes(b"not safetensors")
    with pytest.raises(Exception, match="probe"):
        evaluate_flow("params.yaml", probes=["alf"])
    client = MlflowClient(tracking_uri=f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("tiny")
    assert experiment is None or not client.search_runs([experiment.experiment_id])

    # Logging that fails half-way: the child and its parent end FAILED, with the error.
    weights.write_bytes(good)

    def refused(*args, **kwargs):
        raise RuntimeError("the artifact store refused the model")

    monkeypatch.setattr(mlflow.models.Model, "log", refused)
    with pytest.raises(RuntimeError, match="refused"):
        evaluate_flow("params.yaml", probes=["alf"])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FAILED" for r in runs)
    assert all("refused the model" in r.data.tags["layerprobe.error"] for r in runs)


def test_gpu_tasks_hold_a_slot_that_a_killed_holder_frees(project_dir):
    import subprocess
    import sys
    import threading
    import time

    from flows.common import concurrency_slot

    inside, overlaps = [], []

    @flow
    def hold_once() -> None:
        with concurrency_slot("layerprobe-test-gpu", 1):
            overlaps.append(len(inside))
            inside.append(1)
            time.sleep(0.3)
            inside.pop()

    threads = [threading.Thread(target=hold_once) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [0, 0, 0]  # never two holders at once

    # A process killed while it holds the slot (a cancelled unit) frees it: the next holder does not wait forever.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom layerprobe.locks import host_slot\n"
            "with host_slot('layerprobe-test-gpu', 1):\n    print('held', flush=True)\n"
            "    time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    start = time.monotonic()
    hold_once()
    assert time.monotonic() - start < 30


def test_served_pipeline_uses_the_cron_schedule_from_params(project_dir):
    import yaml

    from flows.serve import scheduled_deployment

    data = yaml.safe_load(Path("params.yaml").read_text())
    data["flow"]["serve"] = {"name": "nightly-test", "cron": "15 4 * * *"}
    Path("params.yaml").write_text(yaml.safe_dump(data))
    deployment = scheduled_deployment("params.yaml")
    assert deployment.name == "nightly-test"
    assert deployment.parameters == {"params": "params.yaml"}
    assert [s.schedule.cron for s in deployment.schedules] == ["15 4 * * *"]


def test_the_pipeline_reads_params_once_and_passes_them_down(trained_project, monkeypatch):
    import layerprobe.params
    from flows import common
    from flows.pipeline import pipeline

    params = load_params("params.yaml")
    reads = []
    real = layerprobe.params.load_params

    def counting(path="params.yaml"):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(common, "load_params", counting)  # what every flow would call to read the file again
    summary = pipeline(params)
    assert reads == []  # pretrain, the units, evaluate and report all ran on the Params they were given
    assert [unit["summary"]["status"]["extract"] for unit in summary["units"]] == ["reused"]
