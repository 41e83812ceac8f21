"""Wall time of the default suite on a Prefect work pool with 1 worker vs 2 workers, and their ratio.

What: a copy of this project (its params.yaml: the default suite, 5 units of one backbone x 5 datasets), a Prefect
server of its own (`prefect server start` on 127.0.0.1), a `process` work pool, and N workers started as a GPU node
would start them (`prefect worker start --limit 1`, CUDA hidden), each given one core: OMP_NUM_THREADS=1 (one torch
thread) and LAYERPROBE_TASK_WORKERS=1 (its unit's probes one after another). For N = 1 then 2, from empty caches
(prepared datasets, features, probes, results; the pretrained checkpoint is made once before and reused by both),
it times `layerprobe run --pool bench --no-commit` (the pipeline: units fanned out, each training and scoring its
probes on its worker, then the MLflow recording and the report once, in the calling process, as the head node
would). Prints both wall times and their ratio (target <= 0.65), the same for
the units phase alone (first unit start to last unit finish, from results/units.json), which is what workers speed
up, and the lowest whole-run ratio any scheduling could reach (Amdahl): the serial part as measured (run minus units
phase: start-up, deployment, MLflow recording and report) plus the units phase divided by the worker ratio.
How:  python benchmarks/scale.py [--workers 1 2] [--keep DIR]
Cost: about 6-8 minutes on 2 CPU cores (a pretrain of about a minute, then one run per worker count).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from layerprobe.plan import makespan

ROOT = Path(__file__).resolve().parents[1]
POOL = "bench"
# What a fresh run recomputes; the pretrained checkpoint (checkpoints/) is kept between runs.
OUTPUTS = ("data/prepared", "features", "probes", "results", "mlruns")
ONE_CORE = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LAYERPROBE_TASK_WORKERS": "1"}


def copy_project(destination: Path) -> None:
    """The project's tracked sources and params (no outputs), plus a pretrained checkpoint if this checkout has one."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    pretrained = ROOT / "checkpoints" / "pretrained"
    if pretrained.is_dir():
        shutil.copytree(pretrained, destination / "checkpoints" / "pretrained", dirs_exist_ok=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"prefect server exited: see {log}") from None
            time.sleep(1)
    raise RuntimeError(f"prefect server did not answer in 180 s: see {log}")


def start_worker(name: str, env: dict, log: Path) -> subprocess.Popen:
    worker_env = {
        **env,
        **ONE_CORE,
        "CUDA_VISIBLE_DEVICES": "",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
    }
    command = ["prefect", "worker", "start", "--pool", POOL, "--type", "process", "--name", name, "--limit", "1"]
    return subprocess.Popen(
        command, env=worker_env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for_workers(env: dict, count: int) -> None:
    """Until `count` workers of the pool have sent a heartbeat (a unit submitted before would wait anyway)."""
    probe = (
        "import sys; from prefect.client.orchestration import get_client\n"
        "from flows.fanout import live_workers\n"
        f"with get_client(sync_client=True) as c: sys.exit(0 if len(live_workers(c, {POOL!r})) >= {count} else 1)"
    )
    deadline = time.monotonic() + 120
    while subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} workers did not come up in 120 s")
        time.sleep(2)


def units_span(project: Path) -> tuple[float, list[float]]:
    """First unit start to last unit finish, as the units recorded them, and each unit's own seconds."""
    outcomes = json.loads((project / "results" / "units.json").read_text())
    starts = [dt.datetime.fromisoformat(o["summary"]["started"]) for o in outcomes]
    ends = [dt.datetime.fromisoformat(o["summary"]["finished"]) for o in outcomes]
    return (max(ends) - min(starts)).total_seconds(), [
        (e - s).total_seconds() for s, e in zip(starts, ends, strict=True)
    ]


def timed_run(project: Path, env: dict, workers: int, logs: Path) -> tuple[float, float, list[float]]:
    for name in OUTPUTS:
        shutil.rmtree(project / name, ignore_errors=True)
    processes = [start_worker(f"gpu{i}", env, logs / f"worker-{workers}-{i}.log") for i in range(workers)]
    try:
        wait_for_workers(env, workers)
        start = time.perf_counter()
        command = ["layerprobe", "run", "--pool", POOL, "--no-commit"]
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode:
            output = f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            raise RuntimeError(f"run with {workers} worker(s) failed:\n{output}")
        return (wall, *units_span(project))
    finally:
        for process in processes:
            stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs=2, default=[1, 2], help="the two worker counts to compare")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()

    project = args.keep or Path(tempfile.mkdtemp(prefix="layerprobe-scale-"))
    project.mkdir(parents=True, exist_ok=True)
    logs = project / "logs"
    logs.mkdir(exist_ok=True)
    copy_project(project)
    env = {
        **os.environ,
        "PREFECT_HOME": str(project / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PYTHONPATH": os.pathsep.join([str(project / "src"), str(project)]),
    }
    server, url = start_server(env, logs / "server.log")
    env["PREFECT_API_URL"] = url
    try:
        subprocess.run(
            ["prefect", "work-pool", "create", POOL, "--type", "process"], env=env, check=True, capture_output=True
        )
        pretrain = subprocess.run(
            [sys.executable, "-m", "flows.pretrain"], cwd=project, env=env, capture_output=True, text=True
        )
        if pretrain.returncode:
            raise RuntimeError(f"pretrain failed:\n{pretrain.stderr[-2000:]}")
        figures = {n: timed_run(project, env, n, logs) for n in args.workers}
    finally:
        stop(server)
        if args.keep is None:
            shutil.rmtree(project, ignore_errors=True)

    few, many = args.workers
    print("default suite on a process work pool, each worker one core (OMP_NUM_THREADS=1), pretrain cached")
    for n, (wall, span, _) in figures.items():
        print(f"{n} worker(s): run {wall:7.1f} s   units phase {span:7.1f} s   serial part {wall - span:6.1f} s")
    wall_ratio, span_ratio = figures[many][0] / figures[few][0], figures[many][1] / figures[few][1]
    verdict = "met" if wall_ratio <= 0.65 else "not met"
    print(f"ratio {many}/{few} workers: run {wall_ratio:.3f} (target <= 0.65: {verdict}), units phase {span_ratio:.3f}")
    wall, span, durations = figures[few]
    floor = (wall - span + span * few / many) / wall
    print(
        f"lowest run ratio {many} workers can reach (serial part as measured, units phase {many / few:g}x faster): "
        f"{floor:.3f}"
    )
    if few == 1:  # whole units cannot be split: the busiest worker runs ceil(units / workers) of them
        gap = (span - sum(durations)) / max(1, len(durations) - 1)  # a worker's hand-over from one unit to the next
        best = makespan([d + gap for d in durations], many) - gap
        print(
            f"lowest with whole units ({len(durations)} units of {min(durations):.1f}-{max(durations):.1f} s, "
            f"{gap:.1f} s between units on a worker, the longest first on whichever worker is free): units phase "
            f"{best:.1f} s, run ratio {(wall - span + best) / wall:.3f}"
        )


if __name__ == "__main__":
    main()
