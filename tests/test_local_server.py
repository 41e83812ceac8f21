"""The Prefect server shared by stage processes: started once, reused by the next process, gone when idle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ATTACH = """
from flows.local_server import prefect_api
from prefect import flow

@flow
def hello() -> int:
    return 42

with prefect_api() as url:
    print(url, hello())
"""

pytestmark = pytest.mark.slow


def attach(env: dict) -> str:
    result = subprocess.run([sys.executable, "-c", ATTACH], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    url, answer = result.stdout.split()[-2:]
    assert answer == "42"  # a flow really ran against it
    return url


def test_stage_processes_share_one_server_that_stops_when_idle(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "LAYERPROBE_SERVER_IDLE_SECONDS": "3"}
    env.pop("PREFECT_API_URL", None)
    first, second = attach(env), attach(env)
    assert first == second  # the second process attached to the first one's server
    pid = json.loads((tmp_path / "prefect/layerprobe-server/server.json").read_text())["pid"]
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists():  # no process attached any more: it exits after the idle time
        assert time.monotonic() < deadline, "the shared server did not stop when idle"
        time.sleep(0.5)
