"""A study touched, moved, edited or cloned elsewhere keeps its caches: only what a change decides is recomputed.

A tiny suite in a temporary git + DVC repository, on an image folder and a webdataset under datasets/, is run once
with `dvc repro` per test session (`built`); each test takes a copy of it:
  (a) copied with its times kept, then every dataset file touched in place to a new modification time: each time
      the prepare and extract steps run (`layerprobe extract`), both reuse, and no cache file changes;
and, each time with the suite extended by one new dataset:
  (b) the project is copied to another path (`cp -r`: new times and inodes; its datasets touched later still) and
      every orchestration module of the copy gets a real edit (a new function, a changed log line), then
      `dvc repro` in the copy;
  (c) a fresh `git clone` + `dvc push` to a local remote + `dvc pull` + the datasets copied over, then
      `layerprobe run` in the clone.
Each time, every earlier prepared dataset, feature shard, manifest and probe file keeps its bytes and its mtime, and
the new dataset's units are computed. Slow: about a minute to build, then one to two minutes per test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import built_once, make_dvc_repo, run, session_repo_env, tiny_params, write_params

# One worker runs every test of the module, so none waits while another builds the project they share.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness"), pytest.mark.xdist_group("moves-built")]

TRACKED = ("data/prepared", "features", "probes")  # every cache a step reuses or recomputes
# (file, old text or None to append a function): a real edit in each orchestration module
ORCHESTRATION_EDITS = [
    ("flows/common.py", '"%s: up to date (fingerprint matches), reused"', '"%s: reused, fingerprint matches"'),
    ("flows/extract.py", None, None),
    ("flows/train.py", None, None),
    ("flows/evaluate.py", None, None),
    ("flows/unit.py", None, None),
    ("flows/local_server.py", 'print(f"Prefect API: local server', 'print(f"Prefect API: the local server'),
    ("src/layerprobe/tracking.py", None, None),
    ("src/layerprobe/cli.py", None, None),
    ("src/layerprobe/plots.py", None, None),
    ("src/layerprobe/report.py", None, None),
    ("src/layerprobe/locks.py", None, None),
    ("src/layerprobe/params.py", None, None),
]


def generated_images(num_images: int, seed: int):
    from layerprobe.data import create_dataset

    return create_dataset("count_shapes", num_images=num_images, image_size=32, seed=seed, max_count=2)


def write_image_folder(root: Path) -> None:
    dataset = generated_images(60, seed=0)
    for index in range(len(dataset)):
        path = root / dataset.class_names[dataset.labels[index]] / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.load_image(index).save(path)


def write_webdataset(root: Path) -> None:
    """CLIP-benchmark layout: train/ and test/ tars of `<key>.png` + `<key>.cls`, and classnames.txt."""
    dataset = generated_images(60, seed=1)
    for split, indices in (("train", range(0, 45)), ("test", range(45, 60))):
        path = root / split / "0000.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tar:
            for index in indices:
                png = io.BytesIO()
                dataset.load_image(index).save(png, format="PNG")
                for name, data in (
                    (f"{index:04d}.png", png.getvalue()),
                    (f"{index:04d}.cls", b"%d" % dataset.labels[index]),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "classnames.txt").write_text("\n".join(dataset.class_names) + "\n")


def params_for(datasets: list[str]) -> dict:
    params = tiny_params()
    params["suite"]["datasets"] = datasets
    params["datasets"] = {
        "folder": {"source": "imagefolder", "options": {"root": "datasets/folder"}},
        "shards": {"source": "wds", "options": {"root": "datasets/shards"}},
        **{
            name: {"source": "count_shapes", "options": {"num_images": 120, "image_size": 32, "seed": seed}}
            for seed, name in enumerate(("extra_a", "extra_b"), start=10)
        },
    }
    return params


def snapshot(repo: Path) -> dict[str, tuple[str, int]]:
    """{path: (sha256, mtime_ns)} of every cache file (prepared splits, shards, manifests, probes)."""
    found = {}
    for top in TRACKED:
        for path in sorted((repo / top).rglob("*")):
            if path.is_file() and not path.name.endswith(".lock"):
                found[str(path.relative_to(repo))] = (
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                    path.stat().st_mtime_ns,
                )
    return found


def assert_kept(before: dict, after: dict, new_dataset: str) -> None:
    """Every earlier cache file has its bytes and mtime; the new dataset's prepared data, features and probes exist."""
    changed = sorted(path for path, state in before.items() if after.get(path) != state)
    assert not changed, f"recomputed without cause: {changed[:10]}"
    added = [path for path in after if path not in before]
    for top in ("data/prepared/", "features/tiny_vit/", "probes/tiny_vit/"):
        assert any(path.startswith(f"{top}{new_dataset}/") for path in added), f"{new_dataset} not computed in {top}"
    assert all(f"/{new_dataset}/" in f"/{path}" for path in added), [p for p in added if new_dataset not in p]


def edit(path: Path, old: str | None, new: str | None) -> None:
    text = path.read_text()
    if old is None:
        path.write_text(text + "\n\ndef _added_by_a_test(value):\n    return value\n")
        return
    assert old in text, f"{old!r} not in {path}: update the test to the code"
    path.write_text(text.replace(old, new, 1))


@pytest.fixture(scope="session")
def built(tmp_path_factory, migrated_mlflow_db, prefect_harness) -> Path:
    """The tiny study on an image folder and a webdataset, run once with `dvc repro`."""

    def build(repo: Path) -> None:
        env = session_repo_env(repo, repo.parent / f"{repo.name}-prefect")
        make_dvc_repo(repo, migrated_mlflow_db, env)
        write_image_folder(repo / "datasets/folder")
        write_webdataset(repo / "datasets/shards")
        write_params(repo, params_for(["folder", "shards"]))
        run(["dvc", "repro"], repo, env)

    return built_once(tmp_path_factory, "moves-built", build)


def test_a_copied_then_touched_project_reuses_every_prepared_dataset_and_feature_cache(built, project):
    repo, env = project
    first = snapshot(built)
    assert any(path.startswith("features/tiny_vit/shards/shard-") for path in first)
    assert snapshot(repo) == first  # the copy kept every time

    # Copied (new paths and inodes, times kept), then every dataset file touched in place (new mtimes; same bytes,
    # paths and inodes): each time, the steps that key on the files read them again once, find them equal and reuse
    # everything (the CLI runs them as the stages do).
    for touch in (False, True):
        if touch:
            later = time.time() + 5
            for path in (repo / "datasets").rglob("*"):
                os.utime(path, (later, later))
        for dataset in ("folder", "shards"):
            extracted = run(
                [
                    sys.executable,
                    "-m",
                    "layerprobe.cli",
                    "extract",
                    "--backbone",
                    "tiny_vit",
                    "--dataset",
                    dataset,
                    "--no-progress",
                ],
                repo,
                env,
            )
            assert json.loads(extracted.stdout)["status"] == "reused", extracted.stdout
        assert snapshot(repo) == first


def test_a_project_moved_with_cp_and_its_orchestration_code_edited_computes_only_a_new_dataset(built, tmp_path):
    # Copied elsewhere with `cp -r` (new paths, times and inodes), every orchestration module edited.
    first = snapshot(built)
    moved = tmp_path / "elsewhere" / "project"
    moved.parent.mkdir()
    subprocess.run(["cp", "-r", str(built), str(moved)], check=True)
    later = time.time() + 5  # later than any time the first run recorded, whatever the filesystem's resolution
    for path in (moved / "datasets").rglob("*"):
        os.utime(path, (later, later))
    for file, old, new in ORCHESTRATION_EDITS:
        edit(moved / file, old, new)
    write_params(moved, params_for(["folder", "shards", "extra_a"]))
    before_move = snapshot(moved)
    assert {p: s[0] for p, s in before_move.items()} == {p: s[0] for p, s in first.items()}
    run(["dvc", "repro"], moved, session_repo_env(moved, tmp_path / "prefect"))
    assert_kept(before_move, snapshot(moved), "extra_a")


def test_a_fresh_clone_pulled_from_a_dvc_remote_computes_only_a_new_dataset(built, project, tmp_path):
    # A fresh clone on "another machine": dvc push, git clone, the datasets copied, dvc pull, then `layerprobe run`.
    repo, env = project
    first = snapshot(built)
    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "-d", "local", str(remote)], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tiny study, run once"], repo, env)
    run(["dvc", "push", "-q"], repo, env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    shutil.copytree(repo / "datasets", clone / "datasets", dirs_exist_ok=True)
    (clone / "mlruns").mkdir(exist_ok=True)
    shutil.copy(repo / "mlruns" / "mlflow.db", clone / "mlruns" / "mlflow.db")  # a migrated store (saves the migration)
    clone_env = session_repo_env(clone, tmp_path / "prefect")
    run(["dvc", "pull", "-q"], clone, clone_env)
    pulled = snapshot(clone)
    assert {p: s[0] for p, s in pulled.items()} == {p: s[0] for p, s in first.items()}
    write_params(clone, params_for(["folder", "shards", "extra_b"]))
    result = run([sys.executable, "-m", "layerprobe.cli", "run"], clone, clone_env)
    assert_kept(pulled, snapshot(clone), "extra_b")
    units = dict(re.findall(r"^tiny_vit/(\w+) on this process: extract (\w+)", result.stdout, re.M))
    assert units == {"folder": "reused", "shards": "reused", "extra_b": "computed"}, result.stdout
    assert "up to date" in run(["dvc", "status"], clone, clone_env).stdout
