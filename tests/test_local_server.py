"""The Prefect server shared by stage processes: started by the first, used by the next, gone when idle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    holder = subprocess.Popen([sys.executable, "-c", ATTACH, str(release)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        line = holder.stdout.readline()
        while line and not line.rstrip().endswith(" 42"):  # a flow really ran against it (after the start notice)
            line = holder.stdout.readline()
        first_url = line.split()[0]
        second = subprocess.run([sys.executable, "-c", ATTACH], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"{first_url} 42" in second.stdout.splitlines()  # the next process used the same server, silently
        assert "Prefect API: local server" not in second.stdout
    finally:
        release.touch()
        holder.wait(timeout=60)
    pid = json.loads((tmp_path / "prefect/layerprobe-server/server.json").read_text())["pid"]
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists():  # nobody attached any more: it exits after the idle time
        assert time.monotonic() < deadline, "the shared server did not stop when idle"
        time.sleep(0.5)
