"""What every flow shares: the run's params, the task retry policy, a GPU concurrency slot, name filters.

A run reads params.yaml once, at its entry point (`python -m flows.<stage>`, `layerprobe run`, a schedule), and passes
the validated `Params` down to every flow and task; a unit on a work pool receives it as JSON (`as_params`).

Staleness is decided by the steps' completion markers (`layerprobe.fingerprint`), not by Prefect's result cache:
a marker travels with its output (and with DVC), while Prefect's cache lives in the user's Prefect home and would
outlive the clone and the code that filled it. So tasks run with caching off and return small JSON summaries.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from typing import Any

from prefect import Task, get_run_logger  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.client.schemas.objects import TaskRun  # noqa: E402
from prefect.states import State  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from layerprobe.params import Params, load_params, params_from_dict, task_workers  # noqa: E402

GPU_LIMIT = "layerprobe-gpu"


def as_params(params: Params | dict | str) -> Params:
    """The run's params: passed down as they are, sent to a work pool as JSON (`dataclasses.asdict`), or a params
    file's path where a run starts (an entry point, a schedule)."""
    if isinstance(params, Params):
        return params
    if isinstance(params, dict):
        return params_from_dict(params, source="params sent with this flow run")
    return load_params(params)


# Flows take the run's `Params` object: Prefect need not validate it again (it was validated when read).
FLOW_OPTIONS = {"log_prints": True, "validate_parameters": False}


def task_runner() -> ThreadPoolTaskRunner:
    return ThreadPoolTaskRunner(max_workers=task_workers())


# Bad input (a missing path, a wrong key, a wrong value: every ValueError) fails fast; only what may pass on its own
# is retried. OS errors that say something about the input or the disk, not about a moment, never pass on their own.
_PERMANENT = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
_PERMANENT_ERRNOS = {
    errno.ELOOP,  # a symlink loop
    errno.ENAMETOOLONG,
    errno.EILSEQ,  # a file name the filesystem cannot encode
    errno.EROFS,
    errno.ENOSPC,  # a full disk stays full for the seconds between retries; the retry would only redo the work
    errno.EDQUOT,
    errno.EFBIG,
}


def is_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry condition: I/O hiccups, timeouts and CUDA out-of-memory (extraction halves its batch on retry)."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and transient(error)


def transient(error: BaseException) -> bool:
    """Whether `error` may pass on its own: never a bad input (ValueError, a missing or unreadable file, a loop)."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    if isinstance(error, _PERMANENT) or (isinstance(error, OSError) and error.errno in _PERMANENT_ERRNOS):
        return False
    return isinstance(error, (OSError, TimeoutError, ConnectionError))


def task_options(params: Params) -> dict[str, Any]:
    """Retries with exponential back-off on transient errors; no result cache (the steps' markers decide)."""
    return {
        "retries": params.flow.retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=params.flow.retry_delay_seconds),
        "retry_condition_fn": is_transient,
        "cache_policy": NO_CACHE,
        "persist_result": False,
    }


def unit_lock(paths, step: str, *names: str, out=None):
    """The step's locks (`layerprobe.locks.unit_lock`: its output exclusive, its inputs shared), saying in the run's
    log when it waits and on whom."""
    from layerprobe.locks import unit_lock as lock

    return lock(paths, step, *names, out=out, log=get_run_logger().info)


def log_step(summary: dict, what: str) -> None:
    """One line per step: reused or computed, and why (the fingerprint part that changed)."""
    logger = get_run_logger()
    if summary.get("status") == "reused":
        logger.info("%s: up to date (fingerprint matches), reused", what)
    else:
        logger.info("%s: computed (%s)", what, summary.get("reason") or "forced")
    for warning in summary.get("warnings", []):
        logger.warning("%s: %s", what, warning)


def worker_name() -> str | None:
    """The name of the Prefect worker running this flow (it sets PREFECT__WORKER_NAME), None when run in process."""
    return os.environ.get("PREFECT__WORKER_NAME") or None


@contextlib.contextmanager
def gpu_slot(device: str, limit: int) -> Iterator[None]:
    """Hold one of this machine's `layerprobe-gpu` slots while a task uses CUDA, so tasks never share a GPU.

    Under a worker the unit already holds its worker's own slot (`gpu:<worker>`, flows/unit.py), so no other slot
    is taken.
    """
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()) or worker_name():
        yield
        return
    with concurrency_slot(GPU_LIMIT, limit):
        yield


def concurrency_slot(name: str, limit: int) -> contextlib.AbstractContextManager[int]:
    """One of `limit` slots named `name` on this machine, held by the calling thread until it leaves.

    File locks (`layerprobe.locks.host_slot`), not Prefect's global concurrency limits: a process killed while
    holding one (a cancelled unit, a killed `dvc repro`) releases it with its death, where a Prefect slot's lease
    outlives it on a server without background services and blocks the next unit forever.
    """
    from layerprobe.locks import host_slot

    return host_slot(name, limit, log=get_run_logger().info)


def run_stage(
    flow: Callable[..., Any],
    description: str,
    *,
    filters: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
    compute: bool = True,
):
    """The `python -m flows.<stage>` entry: parse `--params`, the name filters and required names, attach to a
    Prefect API (the shared local server unless PREFECT_API_URL is set, see flows.local_server) and run `flow`."""
    from flows.local_server import prefect_api

    args = parse_stage_args(description, filters=filters, required=required)
    if compute:  # before any worker thread exists, so every thread inherits it
        from layerprobe.device import flush_denormals

        flush_denormals()
    names = {f"{name}s": getattr(args, f"{name}s") for name in filters}
    names.update({name: getattr(args, name) for name in required})
    params = load_params(args.params)  # the one read of the file in this process
    with prefect_api():
        return flow(params, **names)


def parse_stage_args(
    description: str, *, filters: tuple[str, ...] = (), required: tuple[str, ...] = ()
) -> argparse.Namespace:
    """`--params FILE`, optional name filters (`--backbone`, `--dataset`, `--probe`, each repeatable) and required
    single names."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for name in filters:
        parser.add_argument(f"--{name}", action="append", dest=f"{name}s", help=f"only this {name} (repeatable)")
    for name in required:
        parser.add_argument(f"--{name}", required=True, help=f"the {name}'s name in params")
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


__all__ = [
    "FLOW_OPTIONS",
    "Params",
    "as_params",
    "gpu_slot",
    "load_params",
    "log_step",
    "parse_stage_args",
    "run_stage",
    "select",
    "task_options",
    "task_runner",
    "unit_lock",
    "worker_name",
]
