"""Units fanned out over a Prefect `process` work pool served by two workers, as on a GPU cluster (here on CPU).

The test session's Prefect server plays the shared server; two `prefect worker start` subprocesses (CUDA hidden)
play two GPUs. `layerprobe run --pool` runs the tiny suite as units (backbone x dataset). The first run holds two
units of a dataset whose folder is missing and loses one worker mid-run: those units fail alone, named in the
error, while the others finish and are evaluated. The rerun, with a fresh second worker, picks the lost unit up,
reuses everything that was finished, and commits to DVC, after which `dvc repro` has nothing to do.
Slow: about two minutes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run, tiny_params, write_params
from prefect.client.schemas.sorting import FlowRunSort

from flows.fanout import MIN_SILENCE_ENV, MIN_SILENCE_SECONDS, min_silence_seconds
from layerprobe.files import PAUSE_ENV

pytestmark = pytest.mark.slow

POOL = "test-gpus"
# The newest flow runs first: the session's server also holds every earlier test's (its default order is by id).
NEWEST = FlowRunSort.EXPECTED_START_TIME_DESC
# Two backbones on one dataset: their units prepare it at the same time on two workers (the prepare lock decides).
BACKBONES, DATASETS = ["tiny_vit", "tiny_vit_b"], ["count"]


def suite_params(*, broken: bool) -> dict:
    """The tiny suite as 2 backbones x 1 dataset (2 units), plus a dataset whose folder does not exist."""
    params = tiny_params()
    tiny = params["backbones"]["tiny_vit"]
    params["backbones"]["tiny_vit_b"] = {**tiny, "model_kwargs": {**tiny["model_kwargs"], "depth": 2}}
    params["datasets"]["broken"] = {"source": "imagefolder", "options": {"root": "datasets/missing"}}
    params["suite"].update(
        backbones=BACKBONES, datasets=DATASETS + (["broken"] if broken else []), probes=["linear_last_cls"]
    )
    return params


def start_worker(name: str, env: dict) -> subprocess.Popen:
    """`prefect worker start` as a GPU node would run it: one unit at a time, its device pinned (here: none)."""
    worker_env = {
        **env,
        "CUDA_VISIBLE_DEVICES": "",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "2",
    }
    command = ["prefect", "worker", "start", "--pool", POOL, "--type", "process", "--name", name, "--limit", "1"]
    return subprocess.Popen(
        command, env=worker_env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )


def restart_workers(workers: dict[str, subprocess.Popen], names, env: dict) -> None:
    """Stop the workers `names` (those running) and start them again in `env`."""
    for name in names:
        if name in workers:
            stop(workers[name])
        workers[name] = start_worker(name, env)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (its units, and theirs), from each process's parent in /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def stop(process: subprocess.Popen) -> None:
    """Kill a worker this test started and the unit it runs at once, as a lost machine: nobody is left to report the
    unit's end. Only that worker's own processes: a unit runs in a session of its own, so it is found as a child."""
    if process.poll() is None:
        doomed = descendants(process.pid)
        os.killpg(process.pid, signal.SIGKILL)
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    process.wait()


def running_units(worker: str) -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=50, sort=NEWEST)
    return [r.name for r in runs if r.labels.get("prefect.worker.name") == worker and r.state and r.state.is_running()]


def unfinished_units() -> list[str]:
    """Unit flow runs queued, pending, running or being cancelled."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200, sort=NEWEST)
    return [
        f"{r.name}: {r.state.name}" for r in runs if r.name.startswith("unit-") and r.state and not r.state.is_final()
    ]


def assert_each_slot_held_one_unit_at_a_time(outcomes: list[dict]) -> None:
    by_slot: dict[str, list[tuple]] = {}
    for outcome in outcomes:
        if outcome["state"] == "COMPLETED":
            summary = outcome["summary"]
            assert summary["slot"] == f"gpu:{summary['worker']}"
            times = (dt.datetime.fromisoformat(summary["started"]), dt.datetime.fromisoformat(summary["finished"]))
            by_slot.setdefault(summary["slot"], []).append(times)
    for slot, spans in by_slot.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, f"two units held {slot} at once"


def test_units_on_a_work_pool_fail_alone_resume_after_a_lost_worker_and_commit_to_dvc(dvc_repo):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    repo, env = dvc_repo
    # The workers beat every 2 s (start_worker): a lost one is called gone after 10 s of silence, not the default 20
    # (a heartbeat the busy test server fails to store now and then leaves 4 s gaps).
    env = {**env, MIN_SILENCE_ENV: "10"}
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
    write_params(repo, suite_params(broken=True))
    workers = {name: start_worker(name, env) for name in ("gpu0", "gpu1")}
    command = [sys.executable, "-m", "layerprobe.cli", "run", "--pool", POOL]
    try:
        first = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Lose gpu1 (the worker and the unit it runs) as soon as it runs a unit that would succeed.
        deadline, lost = time.monotonic() + 300, None
        while lost is None:
            if first.poll() is not None or time.monotonic() > deadline:
                first.kill()
                out, err = first.communicate()
                pytest.fail(f"gpu1 never ran a unit; the run printed:\n{out[-3000:]}\n{err[-3000:]}")
            names = [n for n in running_units("gpu1") if not n.endswith("-broken")]
            lost = names[0].removeprefix("unit-").replace("-", "/") if names else None
            time.sleep(0.2)
        stop(workers["gpu1"])
        out, err = first.communicate(timeout=600)
        assert first.returncode == 1, out[-2000:] + err[-2000:]
        error = err.strip().splitlines()[-1]
        assert "3 of 4 units failed" in error, error
        for unit in ("tiny_vit/broken", "tiny_vit_b/broken"):
            assert f"{unit}: source 'imagefolder': root" in error  # bad input fails its unit alone, named
        assert f"{lost}: worker 'gpu1' stopped answering" in error
        outcomes = json.loads((repo / "results/units.json").read_text())
        done = {f"{o['backbone']}/{o['dataset']}" for o in outcomes if o["state"] == "COMPLETED"}
        assert len(done) == 1 and lost not in done
        metrics = json.loads((repo / "results/metrics.json").read_text())  # the finished units were evaluated
        assert {f"{b}/{d}" for b, datasets in metrics.items() for d in datasets} == done
        assert_each_slot_held_one_unit_at_a_time(outcomes)
        for outcome in outcomes:  # each unit scored its probes on its worker: the head node only recorded them
            if outcome["state"] == "COMPLETED":
                assert outcome["summary"]["status"]["evaluate"] == {"linear_last_cls": "computed"}, outcome

        # Interrupted with Ctrl-C while units run, on gpu0 and a new gpu2: every flow run it submitted is cancelled,
        # none is left queued or running for a worker to pick up after it has gone. The units stop at a pause point
        # inside their train step (`layerprobe.files.pause_point`), so the run is surely mid-unit when interrupted.
        write_params(repo, suite_params(broken=False))
        paused = repo.parent / "unit-paused"
        restart_workers(workers, ("gpu0", "gpu2"), {**env, PAUSE_ENV: f"train-swap-linear_last_cls:{paused}"})
        interrupted = subprocess.Popen(
            command,
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Ctrl-C's default action in the run: a suite started in the background (bash `&` without job control)
            # ignores SIGINT, and a child inherits an ignored signal, so it would never see this one.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 300
        while not paused.exists():
            assert interrupted.poll() is None and time.monotonic() < deadline, "no unit reached its train step"
            time.sleep(0.2)
        interrupted.send_signal(signal.SIGINT)
        paused.unlink()  # the unit goes on (to be cancelled): nothing waits on the test from here
        _, err = interrupted.communicate(timeout=300)
        assert interrupted.returncode == 130 and "interrupted" in err, err[-2000:]
        deadline = time.monotonic() + 120
        while unfinished_units():  # the workers stop their cancelled units' processes
            assert time.monotonic() < deadline, f"left unfinished: {unfinished_units()}"
            paused.unlink(missing_ok=True)  # another unit that reached the pause point before its cancel
            time.sleep(0.5)
        restart_workers(workers, ("gpu0", "gpu2"), env)  # without the pause
        paused.unlink(missing_ok=True)

        # The rerun, on gpu0 and gpu2: the lost unit is picked up, everything finished is reused, and DVC records
        # it all.
        second = run(command, repo, env)
        assert "dvc.lock records this run" in second.stdout
        outcomes = json.loads((repo / "results/units.json").read_text())
        assert all(o["state"] == "COMPLETED" and o["summary"]["worker"] in ("gpu0", "gpu2") for o in outcomes)
        for outcome in outcomes:  # the units finished in the first run are reused whole
            unit, status = f"{outcome['backbone']}/{outcome['dataset']}", outcome["summary"]["status"]
            if unit != lost:
                assert {
                    status["prepare"],
                    status["extract"],
                    *status["train"].values(),
                    *status["evaluate"].values(),
                } == {"reused"}, unit
        assert_each_slot_held_one_unit_at_a_time(outcomes)
        for backbone in BACKBONES:
            for dataset in DATASETS:
                assert (repo / f"probes/{backbone}/{dataset}/linear_last_cls/train.json").is_file()
        assert "up to date" in run(["dvc", "status"], repo, env).stdout
        assert "Running stage" not in run(["dvc", "repro"], repo, env).stdout
    finally:
        for process in workers.values():
            stop(process)


def test_the_lost_worker_window_is_overridden_only_by_a_positive_number_of_seconds(monkeypatch):
    monkeypatch.delenv(MIN_SILENCE_ENV, raising=False)
    assert min_silence_seconds() == MIN_SILENCE_SECONDS
    monkeypatch.setenv(MIN_SILENCE_ENV, "8")
    assert min_silence_seconds() == 8.0
    for bad in ("0", "-1", "nan", "inf", "soon", ""):
        monkeypatch.setenv(MIN_SILENCE_ENV, bad)
        with pytest.raises(ValueError, match=rf"^{MIN_SILENCE_ENV}='{bad}' is not a positive number of seconds$"):
            min_silence_seconds()
