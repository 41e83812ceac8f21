"""One writer per unit, readers beside it, one write path, markers checked against their files.

Two processes of one unit at once: one computes, the other waits (saying on whom) and reuses; the cache is whole and
nothing temporary is left. A marker whose files were deleted is not trusted: the next run recomputes exactly that.
Outputs are written beside their target and swapped in whole: a killed or changed run costs no old output, a folder
of other files is never written, and a reader waits for the writer of what it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from conftest import built_once, copy_project, tiny_params, write_params

from layerprobe.cli import main
from layerprobe.config import PathsConfig
from layerprobe.features import cache_content_hash, read_manifest
from layerprobe.files import PAUSE_ENV, begin_output, is_temporary, read_json, staging_path, swap_in, write_bytes_atomic
from layerprobe.files import tmp_path as temporary_name
from layerprobe.locks import LockUnavailableError, file_lock, unit_lock

ROOT = Path(__file__).resolve().parents[1]


def project_params(num_images: int = 240) -> dict:
    params = tiny_params()
    params["datasets"]["count"]["options"]["num_images"] = num_images
    return params


def cli(command: list[str], cwd: Path, *, pause: tuple[str, Path] | None = None) -> subprocess.Popen:
    """`layerprobe COMMAND` in a process of its own; with `pause` (a point, a flag file) it stops there
    (`layerprobe.files.pause_point`) until the flag file is deleted."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    if pause:
        env[PAUSE_ENV] = f"{pause[0]}:{pause[1]}"
    return subprocess.Popen(
        [sys.executable, "-m", "layerprobe.cli", *command],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_second_while_first_holds(command: list[str], cwd: Path, point: str) -> list[tuple[dict, str]]:
    """The same command in two processes: the first stops at pause point `point`, inside the unit's lock; the second
    starts then, and once it says it waits, the first goes on. Both must exit 0; returns (summary, stderr) of each."""
    flag = cwd / "first-paused"
    first = cli(command, cwd, pause=(point, flag))
    wait_for_pause(flag, first)
    second, said = cli(command, cwd), ""
    while "waiting for pid" not in said:
        line = second.stderr.readline()
        assert line, f"the second run did not wait for the first: {said}{second.communicate()[1][-2000:]}"
        said += line
    assert f"waiting for pid {first.pid} " in said, said  # on the first run, named
    flag.unlink()
    results = []
    for process, before in ((first, ""), (second, said)):
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        results.append((json.loads(out), before + err))
    return results


def temporaries(root: Path) -> list[Path]:
    return [path for path in root.rglob(".*") if is_temporary(path)]


@pytest.mark.slow
def test_two_runs_of_one_unit_at_once_compute_once_and_the_second_waits_and_reuses(tmp_path):
    write_params(tmp_path, project_params(num_images=240))  # 3 shards: the first run stops after one
    unit = ["--backbone", "tiny_vit", "--dataset", "count"]
    extracted = run_second_while_first_holds(["extract", *unit, "--no-progress"], tmp_path, "extract-shard-1")
    assert [summary["status"] for summary, _ in extracted] == ["computed", "reused"]
    waiter_err = extracted[1][1]
    assert "extract tiny_vit/count: waiting for pid" in waiter_err, waiter_err[-2000:]
    manifest = json.loads((tmp_path / "features/tiny_vit/count/manifest.json").read_text())
    for entry in manifest["shards"]:  # whole: every shard is the one its manifest hashed
        assert (
            hashlib.sha256((tmp_path / "features/tiny_vit/count" / entry["file"]).read_bytes()).hexdigest()
            == (entry["sha256"])
        )

    trained = run_second_while_first_holds(["train", *unit, "--probe", "alf"], tmp_path, "train-swap-alf")
    assert [summary["status"] for summary, _ in trained] == ["computed", "reused"]
    waiter_err = trained[1][1]
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


def run_ok(command: list[str], cwd: Path) -> dict:
    out, err = cli(command, cwd).communicate(timeout=600)
    assert out.strip(), err[-3000:]
    return json.loads(out)


def wait_for_pause(flag: Path, process: subprocess.Popen) -> None:
    """Until `process` stands at its pause point (it has written `flag`); fails if it ends first."""
    while not flag.exists():
        if process.poll() is not None:
            pytest.fail(f"the process ended without reaching its pause point: {process.communicate()[1][-3000:]}")
        time.sleep(0.05)


def lock_files(root: Path) -> set[Path]:
    return {path for path in root.rglob(".*.lock") if ".venv" not in path.parts}


def test_a_webdataset_folder_as_extract_out_keeps_every_file_and_the_command_is_refused_in_one_line(tmp_path):
    shards = tmp_path / "webdataset" / "train"
    shards.mkdir(parents=True)
    for number in range(2):  # named as webdataset's ShardWriter names them
        with tarfile.open(shards / f"shard-{number:06d}.tar", "w") as tar:
            (tmp_path / "000000.cls").write_text(str(number))
            tar.add(tmp_path / "000000.cls", arcname="000000.cls")
    kept = {path.name: path.read_bytes() for path in shards.iterdir()}
    work = tmp_path / "work"
    work.mkdir()
    tiny = '{"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}'
    command = [
        "extract",
        "--backbone",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        tiny,
        "--dataset",
        "count_shapes",
        "--option",
        "num_images=20",
        "--option",
        "image_size=32",
        "--device",
        "cpu",
        "--no-progress",
    ]
    refused = cli([*command, "--out", str(shards)], work)
    out, err = refused.communicate(timeout=600)
    assert refused.returncode == 2 and not out
    assert err.strip().splitlines() == [
        f"layerprobe extract: error: {shards} holds files that are not a layerprobe output (shard-000000.tar, "
        "shard-000001.tar): layerprobe writes only into a new folder or over its own output; move or delete them, or "
        "choose another folder"
    ]
    assert {path.name: path.read_bytes() for path in shards.iterdir()} == kept
    assert sorted(path.name for path in shards.parent.iterdir()) == ["train"] and not list(work.iterdir())

    # A new folder: the cache there, its lock and the dataset it needs beside it, nothing in the working folder.
    cache = tmp_path / "elsewhere" / "cache"
    assert run_ok([*command, "--out", str(cache)], work)["status"] == "computed"
    assert read_manifest(cache)["num_images"] == 20 and not list(work.iterdir())
    assert sorted(path.name for path in cache.parent.iterdir()) == [".cache.extract.lock", ".cache.prepared", "cache"]


EXTRACT = ["extract", "--backbone", "tiny_vit", "--dataset", "count", "--no-progress"]


@pytest.fixture(scope="session")
def extracted_once(tmp_path_factory) -> Path:
    """A project of 240 images (3 shards of 100 rows) whose features `layerprobe extract` computed, once per test
    session."""

    def build(folder: Path) -> None:
        folder.mkdir(parents=True)
        write_params(folder, project_params(num_images=240))
        assert run_ok(EXTRACT, folder)["status"] == "computed"

    return built_once(tmp_path_factory, "one-writer-extracted", build)


@pytest.fixture
def extracted(extracted_once, tmp_path) -> Path:
    """A copy of the extracted project (its times kept) in `tmp_path`."""
    return copy_project(extracted_once, tmp_path)


@pytest.mark.xdist_group("one-writer-extracted")  # with the other test of `extracted`
def test_a_changed_tap_killed_halfway_keeps_the_old_cache_which_the_old_tap_then_reuses_untouched(extracted):
    tmp_path, unit = extracted, EXTRACT  # its features computed with the default tap
    cache = tmp_path / "features/tiny_vit/count"

    def files() -> dict[str, tuple[int, int]]:
        return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in cache.iterdir()}

    old, old_hash = files(), cache_content_hash(cache)
    assert len(old) == 4

    flag = tmp_path / "paused"
    changed = cli([*unit, "--tap", "block"], tmp_path, pause=("extract-shard-1", flag))
    wait_for_pause(flag, changed)  # one shard of the block tap written
    os.kill(changed.pid, signal.SIGKILL)
    changed.communicate(timeout=60)
    assert files() == old and cache_content_hash(cache) == old_hash  # the old cache is whole
    (staging,) = cache.parent.glob(".count.staging-*.tmp")
    assert sorted(path.name for path in staging.iterdir()) == ["shard-00000.arrow"]

    again = run_ok(unit, tmp_path)
    assert again["status"] == "reused" and again["content_hash"] == old_hash
    assert files() == old  # no shard rewritten, none touched

    finished = (staging / "shard-00000.arrow").stat().st_ino
    resumed = run_ok([*unit, "--tap", "block"], tmp_path)  # asked again, the block tap resumes from its shard
    assert resumed["status"] == "computed" and read_manifest(cache)["provenance"]["tap"] == "block"
    assert (cache / "shard-00000.arrow").stat().st_ino == finished
    assert not list(cache.parent.glob(".count.staging-*")) and not list(cache.parent.glob(".count.previous*"))


def test_a_pretrain_aimed_outside_checkpoints_pretrained_is_refused_and_the_file_kept(tmp_path):
    params = tiny_params()
    params["backbones"]["tiny_vit"] = {
        "model": "vit_tiny_patch16_224",
        "checkpoint": "checkpoints/downloaded.safetensors",
        "model_kwargs": {
            "img_size": 32,
            "patch_size": 8,
            "depth": 1,
            "embed_dim": 16,
            "num_heads": 1,
            "num_classes": 0,
        },
        "pretrain": {
            "source": "shapes",
            "options": {"num_images": 16, "image_size": 32},
            "steps": 2,
            "batch_size": 8,
            "warmup_steps": 1,
            "device": "cpu",
        },
    }
    write_params(tmp_path, params)
    downloaded = tmp_path / "checkpoints/downloaded.safetensors"
    downloaded.parent.mkdir()
    downloaded.write_bytes(b"weights someone downloaded")
    locks_before = lock_files(ROOT)
    process = cli(["pretrain", "--backbone", "tiny_vit", "--no-progress"], tmp_path)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 2 and not out
    assert err.strip().splitlines() == [
        "layerprobe pretrain: error: backbones.tiny_vit.checkpoint checkpoints/downloaded.safetensors is outside "
        "checkpoints/pretrained/, where pretrain writes (the stage's output that DVC tracks): it is not overwritten"
    ]
    assert downloaded.read_bytes() == b"weights someone downloaded"
    assert not lock_files(tmp_path) and lock_files(ROOT) <= locks_before  # no lock here, none in the checkout


@pytest.mark.xdist_group("one-writer-extracted")  # with the other test of `extracted`
def test_evaluate_while_its_probe_retrains_waits_and_scores_the_weights_it_then_reads(extracted, monkeypatch):
    from layerprobe.steps.evaluate import evaluate_fingerprint

    tmp_path, unit = extracted, ["--backbone", "tiny_vit", "--dataset", "count"]  # its features computed
    run_ok(["train", *unit, "--probe", "alf", "--lr", "0.01"], tmp_path)
    assert run_ok(["evaluate", *unit, "--probe", "alf"], tmp_path)["status"] == "computed"

    flag = tmp_path / "paused"
    retrain = cli(["train", *unit, "--probe", "alf", "--lr", "0.001"], tmp_path, pause=("train-swap-alf", flag))
    wait_for_pause(flag, retrain)  # the new probe written, not yet in place; train holds the probe's lock
    evaluate = cli(["evaluate", *unit, "--probe", "alf"], tmp_path)
    said = ""
    while "waiting for pid" not in said:  # it waits for the training before reading anything of the probe
        line = evaluate.stderr.readline()
        assert line, f"evaluate did not wait for the training: {said}{evaluate.communicate()[0][-2000:]}"
        said += line
    assert "layerprobe evaluate: train tiny_vit/count/alf: waiting for pid " in said
    flag.unlink()
    out, err = retrain.communicate(timeout=600)
    assert retrain.returncode == 0, err[-3000:]
    out, err = evaluate.communicate(timeout=600)
    assert evaluate.returncode == 0 and json.loads(out)["status"] == "computed", err[-3000:]

    monkeypatch.chdir(tmp_path)  # train.json names its seed folders relative to the project
    trained = read_json("probes/tiny_vit/count/alf/train.json")
    metrics = read_json("results/evaluate/tiny_vit/count/alf/metrics.json")
    assert trained["seeds"][0]["best"]["lr"] == 0.001 and metrics["best"] == trained["seeds"][0]["best"]
    assert metrics["val_balanced_accuracy"] == trained["seeds"][0]["val_balanced_accuracy"]
    # its fingerprint holds the bytes of the weights it scored: those in place now
    features_hash = cache_content_hash(Path("features/tiny_vit/count"))
    assert metrics["fingerprint"]["value"] == evaluate_fingerprint(trained, features_hash=features_hash).value


def test_readers_share_and_a_writer_waits_for_them(tmp_path):
    paths = PathsConfig(
        features=str(tmp_path / "features"), data=str(tmp_path / "data"), probes=str(tmp_path / "probes")
    )
    with unit_lock(paths, "train", "b", "d", "alf"), unit_lock(paths, "train", "b", "d", "linear"):
        pass  # two probes of one cache train at once: both read it
    said, order = held_while(
        lambda: unit_lock(paths, "train", "b", "d", "alf"), lambda log: unit_lock(paths, "extract", "b", "d", log=log)
    )
    assert order == ["holder out", "next in"]  # the cache's writer waited for its reader
    assert said[0].startswith(f"extract b/d: waiting for pid {os.getpid()} on ")


def held_while(hold, take) -> tuple[list[str], list[str]]:
    """A thread holds the lock `hold()` until the lock `take(log)` says it waits (its `log`), then lets go; returns
    what `take` said and the order of the holder's release and the next holder's entry. No timer: a lock that did not
    wait never says so, and enters first."""
    said, order, held, release = [], [], threading.Event(), threading.Event()

    def holder() -> None:
        with hold():
            held.set()
            release.wait(30)
            order.append("holder out")

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(30)
    with take(lambda line: (said.append(line), release.set())):
        order.append("next in")
    release.set()
    thread.join()
    return said, order


def test_a_held_unit_lock_makes_the_next_writer_wait_and_say_on_whom(tmp_path):
    paths = PathsConfig(features=str(tmp_path / "features"), data=str(tmp_path / "data"))
    said, order = held_while(
        lambda: unit_lock(paths, "extract", "b", "d"), lambda log: unit_lock(paths, "extract", "b", "d", log=log)
    )
    assert order == ["holder out", "next in"]
    assert said and said[0].startswith(f"extract b/d: waiting for pid {os.getpid()} on ")


def test_temporaries_are_unique_per_writer_and_left_ones_are_removed_by_the_next_writer_of_their_staging(tmp_path):
    target = tmp_path / "features" / "b" / "d"
    names = {temporary_name(target / "shard-00000.arrow").name for _ in range(50)}
    assert len(names) == 50 and all(name.startswith(".shard-00000.arrow.") for name in names)
    staging = begin_output(target, "key", marker="manifest.json", resume=True)
    assert staging == staging_path(target, "key") and staging.parent == target.parent
    abandoned = temporary_name(staging / "shard-00000.arrow")
    abandoned.write_bytes(b"half a shard of a writer that died")
    write_bytes_atomic(staging / "shard-00001.arrow", b"a finished shard")
    assert begin_output(target, "key", marker="manifest.json", resume=True) == staging  # resumed: the shard stays
    assert [path.name for path in staging.iterdir()] == ["shard-00001.arrow"]
    other = begin_output(target, "other", marker="manifest.json", resume=True)  # another setting leaves it be
    assert staging.is_dir() and other.is_dir()
    write_bytes_atomic(other / "manifest.json", b'{"format": "layerprobe-features/1"}')
    swap_in(other, target)
    assert sorted(path.name for path in target.parent.iterdir()) == [staging.name, "d"]
    begin_output(target, "again", marker="manifest.json")  # not resumable: every staging folder of it goes
    assert sorted(path.name for path in target.parent.iterdir()) == [staging_path(target, "again").name, "d"]


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


def test_a_report_cut_short_leaves_the_last_report_whole(tmp_path, monkeypatch):
    from test_report import INTERVALS, PROBES, SUMMARY

    import layerprobe.plots
    from layerprobe.report import write_report

    heatmap = {"layers": ["final"], "tokens": ["cls", "ap"], "weights": [[0.5, 0.5]], "layer_means": [0.5]}
    options = {"probes": PROBES, "groups": {}, "heatmaps": {"vit": {"digits": heatmap}}}
    first = write_report(SUMMARY, tmp_path / "report", intervals=INTERVALS, **options)
    written = {path: path.read_bytes() for path in first.values()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process is stopped half-way through the new report

    monkeypatch.setattr(layerprobe.plots, "plot_attention_matrix", killed)
    with pytest.raises(KeyboardInterrupt):
        write_report(SUMMARY, tmp_path / "report", intervals=None, **options)  # other tables than the last report's
    assert {path: path.read_bytes() for path in first.values()} == written
    monkeypatch.undo()
    again = write_report(SUMMARY, tmp_path / "report", intervals=None, **options)
    assert set(again) == set(first) and again["markdown"].read_bytes() != written[first["markdown"]]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report"]  # no staging or old report left
