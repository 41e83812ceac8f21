"""What every flow shares: params loading, task retry policy, caching keyed on inputs, a GPU concurrency slot."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Telemetry cannot reach out from our machines; set before prefect is imported anywhere.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import Task, get_run_logger  # noqa: E402
from prefect.client.schemas.objects import TaskRun  # noqa: E402
from prefect.states import State  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from layerprobe.config import Params, load_params  # noqa: E402
from layerprobe.train import flush_denormals  # noqa: E402
from layerprobe.workflow import stable_hash  # noqa: E402

GPU_LIMIT = "layerprobe-gpu"

flush_denormals()  # flows run in processes of their own: set before any worker thread exists

# Bad input (a missing path, a wrong key) fails fast; only what may pass on its own is retried.
_PERMANENT = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry condition: I/O hiccups, timeouts and CUDA out-of-memory (extraction halves its batch on retry)."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    if not isinstance(error, BaseException):
        return False
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, (OSError, TimeoutError, ConnectionError)) and not isinstance(error, _PERMANENT)


def task_options(params: Params) -> dict[str, Any]:
    """Retries with exponential back-off on transient errors; JSON results so nothing is pickled."""
    return {
        "retries": params.flow.retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=params.flow.retry_delay_seconds),
        "retry_condition_fn": is_transient,
        "persist_result": True,
        "result_serializer": "json",
    }


def input_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Cache on the task's own inputs (paths, configs and the upstream content hashes passed in)."""
    return f"{context.task.name}-{stable_hash(parameters)}"


def cached(task: Task, params: Params, *, output_marker: Path) -> Task:
    """`task` with retries and input caching; the cache is refreshed when its output marker no longer exists.

    Prefect's cache remembers a result, not the files it describes: if a user (or `dvc repro`) deleted the output,
    a cache hit would point at nothing, so such a run recomputes and overwrites the cache entry.
    """
    return task.with_options(
        cache_key_fn=input_cache_key, refresh_cache=not Path(output_marker).exists(), **task_options(params)
    )


@contextlib.contextmanager
def gpu_slot(device: str, limit: int) -> Iterator[None]:
    """Hold one slot of the global `layerprobe-gpu` limit while a task uses CUDA, so tasks never share a GPU."""
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        yield
        return
    with concurrency_slot(GPU_LIMIT, limit):
        yield


@contextlib.contextmanager
def concurrency_slot(name: str, limit: int) -> Iterator[None]:
    """One slot of Prefect's global concurrency limit `name`, created with `limit` slots if it does not exist."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except Exception:  # noqa: BLE001 - absent: create it (another task may have won the race)
            with contextlib.suppress(Exception):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
    with concurrency(name, occupy=1, strict=True):
        yield


def parse_stage_args(description: str, *, filters: tuple[str, ...] = ()) -> argparse.Namespace:
    """`--params FILE` plus optional name filters (`--backbone`, `--dataset`, `--probe`), each repeatable."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for name in filters:
        parser.add_argument(f"--{name}", action="append", dest=f"{name}s", help=f"only this {name} (repeatable)")
    return parser.parse_args()


def select(names: list[str], wanted: list[str] | None, kind: str) -> list[str]:
    """The suite's names, narrowed to `wanted`; an unknown one is a one-line error."""
    if not wanted:
        return list(names)
    from layerprobe.registry import unknown_name_error

    for name in wanted:
        if name not in names:
            raise unknown_name_error(kind, name, names)
    return [n for n in names if n in wanted]


def logger():
    return get_run_logger()


__all__ = ["Params", "load_params", "cached", "gpu_slot", "parse_stage_args", "select", "logger", "task_options"]
