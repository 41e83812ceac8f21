"""Shared test set-up: offline, quiet, and isolated from the user's Prefect and MLflow state."""

from __future__ import annotations

import os
import tempfile

# Set before anything imports prefect or mlflow: telemetry cannot reach out, state stays in a temp folder.
_STATE = tempfile.mkdtemp(prefix="layerprobe-tests-")
os.environ.setdefault("PREFECT_HOME", os.path.join(_STATE, "prefect"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
