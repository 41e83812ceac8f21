"""`layerprobe ui`: `mlflow server` on the project's store, and the URL of the experiment's runs table in the view
the project stores on the experiment (each probe's scores, description, registered model and feature cache)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

# MLflow's UI loads a stored runs view from an experiment tag when the URL names it (`viewStateShareKey`); without
# it, a fresh browser shows only Source, Models and Dataset.
VIEW_KEY = "layerprobe"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_COLUMNS = [f"metrics.`{key}/balanced_accuracy`" for key in ("test", "val")]
VIEW_COLUMNS += [f"attributes.`{name}`" for name in ("Description", "Models", "Dataset")]
RUNS_VIEW = {"selectedColumns": VIEW_COLUMNS, "orderByKey": "attributes.start_time", "orderByAsc": False}
# A fresh browser starts on the GenAI sidebar whatever the experiment's kind (mlflow/mlflow#24498); the UI reads
# this URL parameter first.
TRAINING_SIDEBAR = "workflowType=machine_learning"


def runs_url(base_url: str, experiment_id: str | None) -> str:
    """The experiment's runs table in the "Model training" sidebar and the project's view (none yet: the list)."""
    base = base_url.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?{TRAINING_SIDEBAR}"
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&{TRAINING_SIDEBAR}"


def find_experiment(experiment: str, tracking_uri: str) -> str | None:
    """The id of `experiment` (None before its first run), its runs view stored (a read-only server keeps its own)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None and found.tags.get(VIEW_TAG) != json.dumps(RUNS_VIEW):
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.set_experiment_tag(found.experiment_id, VIEW_TAG, json.dumps(RUNS_VIEW))
    return None if found is None else found.experiment_id


@contextlib.contextmanager
def mlflow_server(store_uri: str, *, artifacts_dir: Path, host: str, port: int, log: Path) -> Iterator:
    """`mlflow server` on the store at http://host:port, writing to `log`: yields the process once it answers, ends it
    on exit. It reads artifacts' file URIs directly (`--artifacts-destination`: nothing lands in ./mlartifacts)."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot serve the MLflow UI on {host}:{port} ({e.strerror}): give another --port") from e
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri, "--workers", "1"]
    command += ["--artifacts-destination", Path(artifacts_dir).resolve().as_uri(), "--host", host, "--port", str(port)]
    # The job runner would start ~8 huey consumer processes; telemetry cannot reach out from our machines.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true", **os.environ}
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2):
                break  # it answers 200 (an error status raises)
            if server.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {server.returncode}" if server.poll() is not None else "did not answer in 120 s"
                raise RuntimeError(f"mlflow server {state}:\n{Path(log).read_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:  # the whole group: `mlflow server` runs uvicorn as its child
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
