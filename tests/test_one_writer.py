"""One writer per unit, markers checked against their files, temporaries unique to their writer.

Two processes of one unit at once: one computes, the other waits (saying on whom) and reuses; the cache is whole and
nothing temporary is left. A marker whose files were deleted is not trusted: the next run recomputes exactly that.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_params, write_params

from layerprobe.cli import main
from layerprobe.config import PathsConfig
from layerprobe.files import is_temporary, write_bytes_atomic
from layerprobe.files import tmp_path as temporary_name
from layerprobe.locks import LockUnavailableError, file_lock, unit_lock

ROOT = Path(__file__).resolve().parents[1]


def project_params(num_images: int = 240, min_steps: int = 40) -> dict:
    params = tiny_params(min_steps=min_steps)
    params["datasets"]["count"]["options"]["num_images"] = num_images
    return params


def cli(command: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    return subprocess.Popen([sys.executable, "-m", "layerprobe.cli", *command], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def run_twice_at_once(command: list[str], cwd: Path) -> list[tuple[dict, str]]:
    """The same command in two processes started together; both must exit 0."""
    processes = [cli(command, cwd) for _ in range(2)]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        results.append((json.loads(out), err))
    return results


def temporaries(root: Path) -> list[Path]:
    return [path for path in root.rglob(".*") if is_temporary(path)]


@pytest.mark.slow
def test_two_runs_of_one_unit_at_once_compute_once_and_the_second_waits_and_reuses(tmp_path):
    write_params(tmp_path, project_params(num_images=3000, min_steps=400))
    unit = ["--backbone", "tiny_vit", "--dataset", "count"]
    extracted = run_twice_at_once(["extract", *unit, "--no-progress"], tmp_path)
    assert sorted(summary["status"] for summary, _ in extracted) == ["computed", "reused"]
    ((_, waiter_err),) = [(s, err) for s, err in extracted if s["status"] == "reused"]
    assert "extract tiny_vit/count: waiting for pid" in waiter_err, waiter_err[-2000:]
    manifest = json.loads((tmp_path / "features/tiny_vit/count/manifest.json").read_text())
    for entry in manifest["shards"]:  # whole: every shard is the one its manifest hashed
        assert (
            hashlib.sha256((tmp_path / "features/tiny_vit/count" / entry["file"]).read_bytes()).hexdigest()
            == (entry["sha256"])
        )

    trained = run_twice_at_once(["train", *unit, "--probe", "alf"], tmp_path)
    assert sorted(summary["status"] for summary, _ in trained) == ["computed", "reused"]
    ((_, waiter_err),) = [(s, err) for s, err in trained if s["status"] == "reused"]
    assert "train tiny_vit/count/alf: waiting for pid" in waiter_err, waiter_err[-2000:]
    assert not temporaries(tmp_path)

    for command in (["extract", *unit, "--no-progress"], ["train", *unit, "--probe", "alf"]):  # a third: all reused
        out, err = cli(command, tmp_path).communicate(timeout=600)
        assert json.loads(out)["status"] == "reused", err[-2000:]


def step(command: list[str], capsys) -> dict:
    assert main([*command, "--no-progress"] if command[0] == "extract" else command) == 0
    return json.loads(capsys.readouterr().out)


def test_a_deleted_shard_probe_seed_or_image_tar_is_recomputed_exactly(project_dir, capsys):
    write_params(project_dir, project_params(num_images=240))
    unit = ["--backbone", "tiny_vit", "--dataset", "count"]
    step(["extract", *unit], capsys)
    step(["train", *unit, "--probe", "alf"], capsys)
    cache = project_dir / "features/tiny_vit/count"
    manifest = json.loads((cache / "manifest.json").read_text())
    kept = {entry["file"]: (cache / entry["file"]).stat().st_mtime_ns for entry in manifest["shards"]}
    assert len(kept) >= 2

    lost = manifest["shards"][1]["file"]
    (cache / lost).unlink()
    again = step(["extract", *unit], capsys)
    assert again["status"] == "computed" and again["reason"] == f"{lost} is missing"
    assert again["content_hash"] == manifest["content_hash"]  # the same cache, made whole
    assert all((cache / name).stat().st_mtime_ns == mtime for name, mtime in kept.items() if name != lost)
    assert step(["train", *unit, "--probe", "alf"], capsys)["status"] == "reused"  # no dead end downstream

    seed = project_dir / "probes/tiny_vit/count/alf/seed-0"
    weights = (seed / "probe.safetensors").read_bytes()
    for path in seed.iterdir():
        path.unlink()
    seed.rmdir()
    retrained = step(["train", *unit, "--probe", "alf"], capsys)
    assert retrained["status"] == "computed" and re.fullmatch(r"seed-0/\S+ is missing", retrained["reason"])
    assert (seed / "probe.safetensors").read_bytes() == weights  # deterministic: the same probe again

    tar = project_dir / "data/prepared/count/images.tar"
    tar.unlink()
    prepared = step(["prepare", "--dataset", "count"], capsys)
    assert prepared["status"] == "computed" and prepared["reason"] == "images.tar is missing"
    assert tar.is_file()
    assert step(["extract", *unit], capsys)["status"] == "reused"  # same pixels, same dataset version
    assert step(["prepare", "--dataset", "count"], capsys)["status"] == "reused"


def test_a_held_unit_lock_makes_the_next_writer_wait_and_say_on_whom(tmp_path):
    paths = PathsConfig(features=str(tmp_path / "features"))
    said: list[str] = []
    held, release = threading.Event(), threading.Event()

    def first() -> None:
        with unit_lock(paths, "extract", "b", "d"):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=first)
    holder.start()
    held.wait(10)
    threading.Timer(0.5, release.set).start()
    start = time.monotonic()
    with unit_lock(paths, "extract", "b", "d", log=said.append):
        waited = time.monotonic() - start
    holder.join()
    assert waited >= 0.4 and said and said[0].startswith(f"extract b/d: waiting for pid {os.getpid()} on ")


def test_temporaries_are_unique_per_writer_and_left_ones_are_removed_by_the_next_lock_holder(tmp_path):
    target = tmp_path / "features" / "b" / "d" / "shard-00000.arrow"
    names = {temporary_name(target).name for _ in range(50)}
    assert len(names) == 50 and all(name.startswith(".shard-00000.arrow.") for name in names)
    target.parent.mkdir(parents=True)
    abandoned = temporary_name(target)
    abandoned.write_bytes(b"half a shard of a writer that died")
    write_bytes_atomic(target.with_name("manifest.json"), b"{}")
    assert [p.name for p in target.parent.iterdir() if is_temporary(p)] == [abandoned.name]
    with unit_lock(PathsConfig(features=str(tmp_path / "features")), "extract", "b", "d"):
        assert not abandoned.exists()


def test_a_filesystem_that_refuses_locks_is_one_line_not_a_retry(tmp_path, monkeypatch):
    import errno
    import fcntl

    def refuse(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(LockUnavailableError, match=r"cannot lock .*refuses file locks.*Lustre: `-o flock`") as error:
        with file_lock(tmp_path / ".x.lock"):
            pass
    assert "\n" not in str(error.value) and not isinstance(error.value, OSError)  # never retried as transient
