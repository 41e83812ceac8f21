"""One local Prefect API server shared by the stage processes of a run, instead of a temporary server per process.

`dvc repro` runs each stage as its own `python -m flows.<stage>` process, and without PREFECT_API_URL Prefect starts
a temporary server inside every one of them (5-10 s each, and on a busy machine it can miss its start-up deadline).
`prefect_api()` instead attaches to a server recorded under PREFECT_HOME (`layerprobe-server/<host>-<project>/
server.json`, one per project folder and host), starting it the first time; the server stops itself once no stage
process of its project has been attached for `IDLE_SECONDS`. With PREFECT_API_URL set (your own `prefect server
start`, a work pool's server, the test harness), that server is used.

Run by hand (what `prefect_api()` starts):  python -m flows.local_server --port 4300 --idle-seconds 60
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from layerprobe.locks import file_lock, process_alive

PROJECT = Path(__file__).resolve().parents[1]  # the project folder whose flows/ this is
# DVC starts the next stage within seconds; a minute also covers a slow machine (LAYERPROBE_SERVER_IDLE_SECONDS).
IDLE_SECONDS = float(os.environ.get("LAYERPROBE_SERVER_IDLE_SECONDS", 60))
# The settings that name a server's database (a user's own, e.g. Postgres, is kept).
DATABASE_SETTINGS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """The API this process talks to: PREFECT_API_URL if set, else the shared local server (started if needed)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    state = _state_dir()
    client = state / "clients" / str(os.getpid())
    client.parent.mkdir(parents=True, exist_ok=True)
    client.touch()  # attached (before any start): the server stays up while this process lives
    try:
        with file_lock(state / "lock"):  # one process starts the server; the others wait and attach
            url = _running_server(state) or _start_server(state)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        client.unlink(missing_ok=True)


def _state_dir() -> Path:
    """This project's server state on this host: two projects on one machine, or one home shared by several hosts,
    never stop or borrow each other's server (each idle watcher counts only its own project's stage processes)."""
    from prefect.settings import PREFECT_HOME

    project = hashlib.sha256(str(PROJECT).encode()).hexdigest()[:12]
    return Path(PREFECT_HOME.value()).expanduser() / "layerprobe-server" / f"{socket.gethostname()}-{project}"


def _running_server(state: Path) -> str | None:
    """The recorded server's API URL if it answers and runs this Prefect version, else None."""
    import prefect

    try:
        record = json.loads((state / "server.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("prefect") != prefect.__version__ or not _healthy(record["url"]):
        return None
    return record["url"]


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _start_server(state: Path) -> str:
    import prefect
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    with socket.socket() as probe:  # a free port now; the server binds it a moment later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    # PYTHONPATH: so `-m flows.local_server` imports from any working directory
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
    if not any(os.environ.get(name) for name in DATABASE_SETTINGS):
        # Its own database beside its state: Prefect's default ($PREFECT_HOME/prefect.db) is one file for every
        # server on the machine, so two projects' servers starting at once raced on its migration ("no such table:
        # block_data") and then on its write lock ("database is locked").
        env[DATABASE_SETTINGS[0]] = f"sqlite+aiosqlite:///{state / 'prefect.db'}"
    command = [
        sys.executable,
        "-m",
        "flows.local_server",
        "--port",
        str(port),
        "--state",
        str(state),
        "--idle-seconds",
        str(IDLE_SECONDS),
    ]
    with open(state / "server.log", "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    while not _healthy(url):
        if process.poll() is not None:
            raise RuntimeError(
                f"the local Prefect server exited with code {process.returncode}; see {state}/server.log"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the local Prefect server did not answer within the start-up timeout; see {state}")
        time.sleep(0.2)
    (state / "server.json").write_text(json.dumps({"url": url, "pid": process.pid, "prefect": prefect.__version__}))
    print(f"Prefect API: local server at {url}, shared by the stages (stops {IDLE_SECONDS:g} s after the last one)")
    return url


def serve(port: int, state: Path, idle_seconds: float) -> None:
    """Run Prefect's API (no UI, no background services, as its temporary server) until idle for `idle_seconds`."""
    import uvicorn
    from prefect.server.api.server import create_app

    server = uvicorn.Server(
        uvicorn.Config(create_app(ephemeral=True, final=True), host="127.0.0.1", port=port, log_level="error")
    )

    def stop_when_idle() -> None:
        last_attached = time.monotonic()
        while not server.should_exit:
            time.sleep(1.0)
            attached = [p for p in (state / "clients").glob("*") if p.name.isdigit()]
            for path in attached:
                if not process_alive(int(path.name)):
                    path.unlink(missing_ok=True)  # a killed stage never detached itself
            if any(path.exists() for path in attached):
                last_attached = time.monotonic()
            elif time.monotonic() - last_attached > idle_seconds:
                server.should_exit = True

    threading.Thread(target=stop_when_idle, daemon=True).start()
    server.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state", type=Path, required=True, help="folder of server.json and clients/")
    parser.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS)
    args = parser.parse_args()
    (args.state / "clients").mkdir(parents=True, exist_ok=True)
    serve(args.port, args.state, args.idle_seconds)
