"""End to end: `dvc repro` on a tiny suite in a temporary git repository holding a copy of this project.

The stages run the repository's own copy of the code (PYTHONPATH), so a test can change that code and check what
`dvc repro` does: a change of behaviour recomputes the outputs it decides, a comment does not, new data and
replaced weights re-prepare and re-extract, and an unchanged rerun runs nothing. Stage processes share the test
session's Prefect server (PREFECT_API_URL). Slow: about 3 minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY_BACKBONE, tiny_params, write_params
from mlflow.tracking import MlflowClient
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def run(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def stages_run(result: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", result.stdout)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}: update the test to the code"
    path.write_text(text.replace(old, new))


def save_checkpoint(path: Path, seed: int) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(TINY_BACKBONE["model"], **TINY_BACKBONE["model_kwargs"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def write_image_folder(root: Path, num_images: int) -> None:
    """Generated counting images (1 or 2 shapes) written as a class-per-folder image folder."""
    from layerprobe.data import create_dataset

    dataset = create_dataset("count_shapes", num_images=num_images, image_size=32, seed=0, max_count=2)
    for index in range(len(dataset)):
        path = root / dataset.class_names[dataset.labels[index]] / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.load_image(index).save(path)


def staleness_params() -> dict:
    """The tiny suite on an image folder under datasets/ and a backbone loading a checkpoint under checkpoints/."""
    params = tiny_params()
    params["suite"]["datasets"] = ["shapes"]
    params["datasets"] = {"shapes": {"source": "imagefolder", "options": {"root": "datasets/shapes"}}}
    params["backbones"]["tiny_vit"] = {**TINY_BACKBONE, "checkpoint": "checkpoints/tiny.safetensors"}
    return params


@pytest.fixture
def repo(tmp_path, migrated_mlflow_db) -> tuple[Path, dict]:
    """A git + DVC repository holding this project's pipeline, code and a tiny params.yaml."""
    from prefect.settings import PREFECT_API_URL

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("flows", "src", "datasets", "checkpoints"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / "mlruns").mkdir()
    shutil.copy(migrated_mlflow_db, repo / "mlruns" / "mlflow.db")
    write_params(repo, tiny_params())
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{repo / 'src'}{os.pathsep}{repo}",  # the copy's code, which the tests edit, is what runs
        "PREFECT_API_URL": PREFECT_API_URL.value(),  # the session's server: no temporary server per stage
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


def test_dvc_repro_recomputes_exactly_what_code_data_weights_and_params_decide(repo):
    repo, env = repo
    write_image_folder(repo / "datasets/shapes", num_images=120)
    save_checkpoint(repo / "checkpoints/tiny.safetensors", seed=0)
    write_params(repo, staleness_params())
    probe = repo / "probes/tiny_vit/shapes/alf/seed-0/probe.safetensors"
    other_probe = repo / "probes/tiny_vit/shapes/linear_last_cls/seed-0/probe.safetensors"
    manifest = repo / "features/tiny_vit/shapes/manifest.json"

    def features() -> dict:
        return json.loads(manifest.read_text())

    # The first run: every stage, and MLflow holds what happened.
    first = run(["dvc", "repro"], repo, env)
    assert stages_run(first) == ["prepare", "extract", "train", "evaluate", "report"]
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens in the runs view
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert all("test/balanced_accuracy" in child.data.metrics for child in children)
    alf = next(r for r in children if r.data.tags["probe"] == "alf")
    assert "evaluation/heatmap.png" in {a.path for a in client.list_artifacts(alf.info.run_id, "evaluation")}
    assert str(client.get_model_version_by_alias("layerprobe-shapes-tiny-vit", "champion").version) in {"1", "2"}
    assert "test_balanced_accuracy" in run(["dvc", "metrics", "show"], repo, env).stdout

    # Unchanged: nothing runs, in seconds.
    start = time.monotonic()
    assert stages_run(run(["dvc", "repro"], repo, env)) == []
    assert time.monotonic() - start < 30
    assert "up to date" in run(["dvc", "status"], repo, env).stdout

    # A comment in training code: DVC reruns the stage, and the fingerprint (same code) keeps the probes.
    train_code = repo / "src/layerprobe/train.py"
    before = probe.read_bytes()
    edit(train_code, '"""Cosine decay', '# an edit that changes nothing\n    """Cosine decay')
    assert stages_run(run(["dvc", "repro", "train"], repo, env)) == ["train"]
    assert probe.read_bytes() == before

    # A change of behaviour in training code (every learning rate halved): the probes are retrained.
    edit(train_code, "    return min_lr + 0.5 * (1 + math.cos", "    return 0.5 * min_lr + 0.25 * (1 + math.cos")
    assert stages_run(run(["dvc", "repro", "train"], repo, env)) == ["train"]
    assert probe.read_bytes() != before
    cli = run([sys.executable, "-m", "layerprobe.cli", "train", "--backbone", "tiny_vit", "--dataset", "shapes",
               "--probe", "alf"], repo, env)  # fmt: skip
    assert json.loads(cli.stdout)["status"] == "reused"  # the command line makes the same decision

    # A change in extraction code: the features are extracted again.
    cache_hash = features()["content_hash"]
    edit(repo / "src/layerprobe/extract.py", "cls = tokens[:, 0].float()", "cls = 2.0 * tokens[:, 0].float()")
    assert stages_run(run(["dvc", "repro", "extract"], repo, env)) == ["extract"]
    assert features()["content_hash"] != cache_hash

    # A new image in the dataset's folder: prepared and extracted again, with the new image.
    cache_hash = features()["content_hash"]
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(repo / "datasets/shapes/1 shape/new.png")
    assert stages_run(run(["dvc", "repro", "extract"], repo, env)) == ["prepare", "extract"]
    assert features()["content_hash"] != cache_hash and features()["num_images"] == 121

    # Replaced weights under the same file name: extracted again.
    cache_hash = features()["content_hash"]
    save_checkpoint(repo / "checkpoints/tiny.safetensors", seed=1)
    assert stages_run(run(["dvc", "repro", "extract"], repo, env)) == ["extract"]
    assert features()["content_hash"] != cache_hash

    # The rest follows the new features: every probe is retrained, and then all is up to date.
    other_before = other_probe.read_bytes()
    assert stages_run(run(["dvc", "repro"], repo, env)) == ["train", "evaluate", "report"]
    assert other_probe.read_bytes() != other_before
    assert "up to date" in run(["dvc", "status"], repo, env).stdout
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

    assert stages_run(run(["dvc", "repro", "train"], repo, env)) == ["train"]  # extraction had finished
    assert (manifest.stat().st_mtime_ns, probe_weights.stat().st_mtime_ns) == stamps  # nothing finished was redone
    assert (repo / "probes/tiny_vit/count/alf/train.json").is_file()
