"""End to end: `dvc repro` on a tiny suite in a temporary git repository holding a copy of this project.

The stages run the repository's own copy of the code (PYTHONPATH), so a test can change that code and check what
`dvc repro` does: a change of behaviour recomputes the outputs it decides, a comment does not, new data and
replaced weights re-prepare and re-extract, an unchanged rerun runs nothing, and a killed run loses no finished
work. Both tests start from copies of one project run once with `dvc repro` per test session (`built`). Stage
processes share the test session's Prefect server (PREFECT_API_URL). Slow: about a minute to build, then one each.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    TINY_BACKBONE,
    built_once,
    make_dvc_repo,
    run,
    session_repo_env,
    tiny_params,
    write_params,
)
from mlflow.tracking import MlflowClient
from PIL import Image

from layerprobe.files import PAUSE_ENV

# One worker runs every test of the module, so none waits while another builds the project they share.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness"), pytest.mark.xdist_group("pipeline-built")]


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
    params = tiny_params()  # the kill below waits at a pause point, not on a training long enough to race
    params["suite"]["datasets"] = ["shapes"]
    params["datasets"] = {"shapes": {"source": "imagefolder", "options": {"root": "datasets/shapes"}}}
    params["backbones"]["tiny_vit"] = {**TINY_BACKBONE, "checkpoint": "checkpoints/tiny.safetensors"}
    return params


@pytest.fixture(scope="session")
def built(tmp_path_factory, migrated_mlflow_db, prefect_harness) -> Path:
    """The tiny suite of `staleness_params`, run once with `dvc repro` per test session; its output is kept beside it
    (`first_repro`)."""

    def build(repo: Path) -> None:
        env = session_repo_env(repo, repo.parent / f"{repo.name}-prefect")
        make_dvc_repo(repo, migrated_mlflow_db, env)
        write_image_folder(repo / "datasets/shapes", num_images=120)
        save_checkpoint(repo / "checkpoints/tiny.safetensors", seed=0)
        write_params(repo, staleness_params())
        first_repro(repo).write_text(run(["dvc", "repro"], repo, env).stdout)

    return built_once(tmp_path_factory, "pipeline-built", build)


def first_repro(built: Path) -> Path:
    return built.with_name(f"{built.name}.first-repro.txt")


def test_dvc_repro_recomputes_exactly_what_code_data_weights_and_params_decide(built, project):
    repo, env = project
    probe = repo / "probes/tiny_vit/shapes/alf/seed-0/probe.safetensors"
    other_probe = repo / "probes/tiny_vit/shapes/linear_last_cls/seed-0/probe.safetensors"
    manifest = repo / "features/tiny_vit/shapes/manifest.json"

    def features() -> dict:
        return json.loads(manifest.read_text())

    # The first run (shared by the tests here, in the project this one copied): every stage, and MLflow holds what
    # happened.
    assert re.findall(r"Running stage '([^']+)'", first_repro(built).read_text()) == [
        "pretrain",
        "prepare",
        "extract",
        "train",
        "evaluate",
        "report",
    ]
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
    run(["dvc", "metrics", "diff"], repo, env)  # compares with the last committed dvc.lock; must not error

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

    # A change of behaviour in training code (every learning rate halved): the probes are retrained. `dvc repro` is
    # killed once the linear probe is done and alf is trained but not yet swapped in (a pause point, not a race): the
    # rerun keeps the one, finishes the other.
    edit(train_code, "    return min_lr + 0.5 * (1 + math.cos", "    return 0.5 * min_lr + 0.25 * (1 + math.cos")
    other_marker, marker = other_probe.parent.parent / "train.json", probe.parent.parent / "train.json"
    old_code = json.loads(other_marker.read_text())["fingerprint"]["code"]
    old_probe = probe.read_bytes()
    flag = repo.parent / "alf-trained.flag"
    killed = subprocess.Popen(
        ["dvc", "repro", "train"],
        cwd=repo,
        env={**env, PAUSE_ENV: f"train-swap-alf:{flag}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (flag.is_file() and json.loads(other_marker.read_text())["fingerprint"]["code"] != old_code):
        assert killed.poll() is None and time.monotonic() < deadline, "the linear probe was never retrained"
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    flag.unlink()
    # alf's new output never landed: its old one stands whole, certified for the old code only, so it is retrained.
    assert json.loads(marker.read_text())["fingerprint"]["code"] == old_code and probe.read_bytes() == old_probe
    kept = other_probe.stat().st_mtime_ns
    assert stages_run(run(["dvc", "repro", "train"], repo, env)) == ["train"]
    assert other_probe.stat().st_mtime_ns == kept  # finished work was not redone
    assert probe.read_bytes() != before
    cli = run(
        [
            sys.executable,
            "-m",
            "layerprobe.cli",
            "train",
            "--backbone",
            "tiny_vit",
            "--dataset",
            "shapes",
            "--probe",
            "alf",
        ],
        repo,
        env,
    )
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

    # Training follows the new features: every probe is retrained.
    other_before = other_probe.read_bytes()
    assert stages_run(run(["dvc", "repro", "train"], repo, env)) == ["train"]
    assert other_probe.read_bytes() != other_before


def test_reruns_that_change_no_evaluation_add_no_probe_runs_and_no_registered_versions(project):
    repo, env = project  # a copy of the project after its first `dvc repro`
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("tiny").experiment_id

    def recorded() -> dict:
        runs = client.search_runs([experiment_id])
        models = [m.name for m in client.search_registered_models()]
        return {
            "probe runs": sum(r.data.tags.get("layerprobe.kind") == "probe" for r in runs),
            "parent runs": sum(r.data.tags.get("layerprobe.kind") == "evaluation" for r in runs),
            **{m: len(client.search_model_versions(f"name = '{m}'")) for m in models},
        }

    first = recorded()
    assert first == {"probe runs": 2, "parent runs": 1, "layerprobe-shapes-tiny-vit": 2}
    parent = json.loads((repo / "results/evaluate/run.json").read_text())["parent_run_id"]

    # A change to the report only. report.py is also in the evaluate stage's closure (its Markdown table), so DVC
    # reruns evaluate too: every probe's evaluation is reused and already recorded, and nothing is added to MLflow.
    edit(repo / "src/layerprobe/report.py", '"# Results: test balanced', '"# Results (edited): test balanced')
    assert stages_run(run(["dvc", "repro"], repo, env)) == ["evaluate", "report"]
    assert recorded() == first
    assert "Results (edited)" in (repo / "results/report/report.md").read_text()

    # `layerprobe run` twice, nothing changed: every probe's evaluation is reused and already recorded, so MLflow
    # gains no probe run, no version and no parent run (the first one stays the record, and is marked confirmed).
    for _ in range(2):
        run([sys.executable, "-m", "layerprobe.cli", "run"], repo, env)
        assert recorded() == first
        assert json.loads((repo / "results/evaluate/run.json").read_text())["parent_run_id"] == parent
    assert "layerprobe.confirmed" in client.get_run(parent).data.tags
    assert "up to date" in run(["dvc", "status"], repo, env).stdout
