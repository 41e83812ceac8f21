"""End to end: `dvc repro` on a tiny params file in a temporary copy of the repository.

Checks MLflow (parent and child runs, metrics, heatmaps, registry with a champion), that a second `dvc repro` runs
nothing, that a changed probe parameter reruns only train/evaluate/report, and that killing the pipeline during
training loses no finished feature cache or probe. Slow (a Prefect server starts per stage): about 3 minutes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_params, write_params
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def run(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture
def repo(tmp_path, migrated_mlflow_db) -> tuple[Path, dict]:
    """A git + DVC repository holding this project's pipeline, code and a tiny params.yaml."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("flows", "src"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / "mlruns").mkdir()
    shutil.copy(migrated_mlflow_db, repo / "mlruns" / "mlflow.db")
    write_params(repo, tiny_params())
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    run(["git", "init", "-q"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tiny project"], repo, env)
    return repo, env


def test_dvc_repro_end_to_end(repo):
    repo, env = repo
    first = run(["dvc", "repro"], repo, env)
    assert stages_run(first.stdout) == [
        "prepare",
        "extract@tiny_vit-count",
        "train@tiny_vit-count",
        "evaluate",
        "report",
    ]
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    for child in children:
        assert "test/balanced_accuracy" in child.data.metrics
    alf = next(r for r in children if r.data.tags["probe"] == "alf")
    assert "evaluation/heatmap.png" in {a.path for a in client.list_artifacts(alf.info.run_id, "evaluation")}
    assert str(client.get_model_version_by_alias("layerprobe-count-tiny-vit", "champion").version) in {"1", "2"}
    assert (repo / "results/report/report.md").read_text().count("| count |") == 1
    assert "test_balanced_accuracy" in run(["dvc", "metrics", "show"], repo, env).stdout

    status = run(["dvc", "status"], repo, env)
    assert "up to date" in status.stdout
    assert stages_run(run(["dvc", "repro"], repo, env).stdout) == []

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["probes"]["alf"]["num_heads"] = 2
    write_params(repo, params)
    manifest = repo / "features/tiny_vit/count/manifest.json"
    before = manifest.stat().st_mtime_ns
    changed = run(["dvc", "repro"], repo, env)
    assert stages_run(changed.stdout) == ["train@tiny_vit-count", "evaluate", "report"]
    assert manifest.stat().st_mtime_ns == before
    run(["dvc", "metrics", "diff"], repo, env)  # compares with the last committed dvc.lock; must not error


def test_killing_the_pipeline_during_training_loses_no_finished_work(repo):
    repo, env = repo
    data = tiny_params(min_steps=1500)
    write_params(repo, data)
    process = subprocess.Popen(
        ["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    finished_probe = repo / "probes/tiny_vit/count/linear_last_cls/train.json"
    deadline = time.time() + 600
    while not finished_probe.exists():
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "training never finished a probe"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (repo / "results/metrics.json").exists()  # killed before evaluation
    manifest = repo / "features/tiny_vit/count/manifest.json"
    probe_weights = repo / "probes/tiny_vit/count/linear_last_cls/seed-0/probe.safetensors"
    stamps = (manifest.stat().st_mtime_ns, probe_weights.stat().st_mtime_ns)

    rerun = run(["dvc", "repro"], repo, env)
    assert "extract@tiny_vit-count" not in stages_run(rerun.stdout)
    assert (manifest.stat().st_mtime_ns, probe_weights.stat().st_mtime_ns) == stamps  # nothing finished was redone
    assert (repo / "probes/tiny_vit/count/alf/train.json").is_file()
    assert (repo / "results/metrics.json").is_file()
