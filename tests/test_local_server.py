"""The Prefect server shared by stage processes: started by the first, used by the next, gone when idle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_dvc_repo, repo_env

ROOT = Path(__file__).resolve().parents[1]
# Attach, run a flow against the API, then stay attached until `release` exists (when given).
ATTACH = """
import sys, time
from pathlib import Path
from flows.local_server import prefect_api
from prefect import flow

@flow
def hello() -> int:
    return 42

with prefect_api() as url:
    print(url, hello(), flush=True)
    release = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    while release is not None and not release.exists():
        time.sleep(0.2)
"""

pytestmark = pytest.mark.slow


def test_stage_processes_share_one_server_that_stops_when_idle(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "LAYERPROBE_SERVER_IDLE_SECONDS": "2"}
    env.pop("PREFECT_API_URL", None)
    release = tmp_path / "release"
    holder = subprocess.Popen(
        [sys.executable, "-c", ATTACH, str(release)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = holder.stdout.readline()
        while line and not line.rstrip().endswith(" 42"):  # a flow really ran against it (after the start notice)
            line = holder.stdout.readline()
        first_url = line.split()[0]
        second = subprocess.run(
            [sys.executable, "-c", ATTACH], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"{first_url} 42" in second.stdout.splitlines()  # the next process used the same server, silently
        assert "Prefect API: local server" not in second.stdout
    finally:
        release.touch()
        holder.wait(timeout=60)
    (record,) = (tmp_path / "prefect/layerprobe-server").glob("*/server.json")  # this project's, on this host
    pid = json.loads(record.read_text())["pid"]
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists():  # nobody attached any more: it exits after the idle time
        assert time.monotonic() < deadline, "the shared server did not stop when idle"
        time.sleep(0.5)


def test_two_projects_on_one_machine_run_at_once_each_on_its_own_server(tmp_path, migrated_mlflow_db):
    """Two project folders, one Prefect home, `dvc repro` in both at the same time, servers that stop 1 s after
    their last stage: each project runs on its own server and database, so neither stops, borrows or locks the
    other's (a shared database raced on its migration when both started at once)."""
    home = tmp_path / "prefect"
    repos = [make_dvc_repo(tmp_path / name, migrated_mlflow_db, repo_env(tmp_path / name, home)) for name in "ab"]
    processes = [
        subprocess.Popen(
            ["dvc", "repro", "prepare"],
            cwd=repo,
            env={**repo_env(repo, home), "LAYERPROBE_SERVER_IDLE_SECONDS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for repo in repos
    ]
    for process in processes:
        out, _ = process.communicate(timeout=600)
        assert process.returncode == 0, out[-3000:]
    servers = sorted((home / "layerprobe-server").glob("*/server.json"))
    assert len(servers) == 2 and len({json.loads(path.read_text())["url"] for path in servers}) == 2
    assert all((path.parent / "prefect.db").is_file() for path in servers)  # each its own database: no shared lock
    assert not (home / "prefect.db").exists()
    assert all((repo / "data/prepared/count/splits.json").is_file() for repo in repos)
