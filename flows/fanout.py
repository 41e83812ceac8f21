"""Fan units (backbone x dataset) out: in this process, or as runs of the unit deployment on a Prefect work pool.

On a pool, the pipeline creates (or updates) the deployment `unit/<flow.unit_deployment>` from this project's
folder, which every worker must see at the same path (a shared filesystem), submits one run per unit with
`run_deployment(timeout=0)`, and waits for all of them. It never hangs on a pool nobody serves: a missing pool is
an error at once, and units left waiting `flow.worker_wait_seconds` with no live worker fail the wait. A worker
is taken for gone after `MIN_SILENCE_SECONDS` without a heartbeat (at least three of its heartbeat intervals);
LAYERPROBE_MIN_SILENCE_SECONDS overrides it (the tests, whose workers beat every 2 s, wait less for a lost one).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import time
from pathlib import Path
from uuid import UUID

from prefect import get_run_logger

from flows.unit import WORKER_SLOT_ENV, unit_flow
from layerprobe.config import PathsConfig
from layerprobe.locks import lock_held, unit_lock_path
from layerprobe.params import Params

ROOT = Path(__file__).resolve().parents[1]
POLL_SECONDS = 2.0
# A worker is gone after missing three heartbeats, and never sooner than this: a worker on a machine whose cores are
# all busy (its own units) can be late by seconds, and calling it gone would run its units twice.
MIN_SILENCE_SECONDS = 20.0
MIN_SILENCE_ENV = "LAYERPROBE_MIN_SILENCE_SECONDS"


def run_units(params: Params, units: list[tuple[str, str]]) -> list[dict]:
    """Run every unit and return one outcome each: {backbone, dataset, state, summary (the unit's return) | error}."""
    if params.flow.work_pool is None:
        return [_run_in_process(params, backbone, dataset) for backbone, dataset in units]
    return _run_on_pool(params, units)


def _run_in_process(params: Params, backbone: str, dataset: str) -> dict:
    state = unit_flow(params, backbone=backbone, dataset=dataset, return_state=True)
    return _outcome(backbone, dataset, state)


def _outcome(backbone: str, dataset: str, state, *, flow_run_id: UUID | None = None) -> dict:
    """A unit's final state as a JSON-able record; a failure keeps its error's first line."""
    outcome = {"backbone": backbone, "dataset": dataset, "state": state.type.value, "flow_run_id": str(flow_run_id)}
    if state.is_completed():
        outcome["summary"] = state.result()
    else:
        error = state.result(raise_on_failure=False)
        text = str(error) if isinstance(error, BaseException) else (state.message or state.name)
        outcome["error"] = " ".join(text.split())[:500]
    return outcome


# ------------------------------------------------------------------------------------------------ work pool


def live_workers(client, pool: str) -> list[str]:
    """Names of the pool's workers with a recent heartbeat (servers without background services never mark a
    vanished worker OFFLINE, so the heartbeat's age decides)."""
    now, least = dt.datetime.now(dt.timezone.utc), min_silence_seconds()
    alive = []
    for worker in client.read_workers_for_work_pool(work_pool_name=pool):
        interval = worker.heartbeat_interval_seconds or 30
        silence = max(3 * interval, least)
        if worker.last_heartbeat_time and (now - worker.last_heartbeat_time).total_seconds() < silence:
            alive.append(worker.name)
    return alive


def min_silence_seconds() -> float:
    """MIN_SILENCE_SECONDS, or LAYERPROBE_MIN_SILENCE_SECONDS where set: a positive number of seconds."""
    text = os.environ.get(MIN_SILENCE_ENV)
    if text is None:
        return MIN_SILENCE_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{MIN_SILENCE_ENV}={text!r} is not a positive number of seconds")
    return seconds


def check_pool(client, pool: str) -> tuple[str, list[str]]:
    """The pool exists and someone serves it; returns its type and live workers' names, or raises a one-line error."""
    from prefect.exceptions import ObjectNotFound

    try:
        pool_type = client.read_work_pool(pool).type
    except ObjectNotFound:
        raise ValueError(
            f"work pool {pool!r} does not exist on the Prefect server: create it with "
            f"`prefect work-pool create {pool} --type process` and start workers (docs/many-machines.md)"
        ) from None
    workers = live_workers(client, pool)
    if not workers:
        raise ValueError(f"work pool {pool!r} has no live worker: start one with `prefect worker start --pool {pool}`")
    return pool_type, workers


def deploy_unit(params: Params, pool_type: str) -> UUID:
    """Create or update the unit deployment on the pool: this folder as the code, run in it, results kept in it.

    On a `process` pool a worker is one GPU (pinned with CUDA_VISIBLE_DEVICES), so its units take turns on the
    worker's slot `gpu:<worker>`. On container pools (kubernetes, docker) each unit is its own job that asks the
    cluster for a GPU (the pool's base job template), so units of one worker run side by side, holding no slot.
    """
    env = result_settings(params)
    job_variables: dict = {"env": env}
    if pool_type == "process":
        env[WORKER_SLOT_ENV] = "1"
        job_variables["working_dir"] = str(ROOT)
    source = unit_flow.from_source(source=str(ROOT), entrypoint="flows/unit.py:unit_flow")
    return source.deploy(
        name=params.flow.unit_deployment,
        work_pool_name=params.flow.work_pool,
        build=False,
        push=False,
        print_next_steps=False,
        job_variables=job_variables,
    )


def result_settings(params: Params) -> dict[str, str]:
    """Units on a pool persist their small summary as JSON under paths.results, where any machine can read it."""
    return {
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
        "PREFECT_LOCAL_STORAGE_PATH": str(results_storage(params)),
    }


def results_storage(params: Params) -> Path:
    """Where units' Prefect results go: under paths.results, on the filesystem every worker sees."""
    return (ROOT / params.paths.results / "prefect").resolve()


def _crash_if_orphaned(client, run, alive: list[str], unit_lock: Path) -> None:
    """A run whose worker is gone (killed machine or worker) would stay RUNNING forever: mark it Crashed, so the wait
    ends and a rerun picks the unit up (finished steps inside it are kept by their markers). Gone means both: no
    heartbeat from its worker, and the unit's lock free (a unit process that still runs, on a machine whose worker
    stopped answering, still holds it: that unit is not lost, and running it again beside itself would be a waste)."""
    from prefect.states import Crashed

    worker = run.labels.get("prefect.worker.name")
    if worker and worker not in alive and not run.state.is_scheduled() and not lock_held(unit_lock):
        message = f"worker {worker!r} stopped answering while running this unit"
        client.set_flow_run_state(run.id, Crashed(message=message), force=True)


def _run_on_pool(params: Params, units: list[tuple[str, str]]) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    pool, wait = params.flow.work_pool, params.flow.worker_wait_seconds
    with get_client(sync_client=True) as client:
        pool_type, workers = check_pool(client, pool)
        deployment_id = deploy_unit(params, pool_type)
        logger.info("%d units on work pool %r (live workers: %s)", len(units), pool, ", ".join(workers))
        params_json = dataclasses.asdict(params)
        runs: dict[UUID, tuple[str, str]] = {}
        finished: dict[UUID, dict] = {}
        try:
            for backbone, dataset in units:
                run = run_deployment(
                    deployment_id,
                    # the params the head node read, as JSON: every worker runs exactly these, whatever its params.yaml
                    parameters={"params": params_json, "backbone": backbone, "dataset": dataset},
                    timeout=0,  # submit and return: all units are queued at once, the workers take them
                    flow_run_name=f"unit-{backbone}-{dataset}",
                )
                runs[run.id] = (backbone, dataset)
            _wait_for_units(client, params.paths, pool, wait, runs, finished, logger)
        except BaseException:
            # Ctrl-C, the worker-wait error or any failure here: the pipeline owns what it submitted, so nothing it
            # started is left queued or running for a worker to pick up after it has gone.
            cancelled = cancel_unfinished(client, [run_id for run_id in runs if run_id not in finished], logger=logger)
            if cancelled:
                logger.warning(
                    "cancelled %d submitted units that had not finished: %s",
                    len(cancelled),
                    ", ".join(f"{b}/{d}" for b, d in (runs[i] for i in cancelled)),
                )
            raise
    return [finished[run_id] for run_id in runs]


def _wait_for_units(client, paths: PathsConfig, pool: str, wait: float, runs: dict, finished: dict, logger) -> None:
    """Poll until every submitted unit is final, marking units of vanished workers Crashed; fail when no worker has
    been alive for `wait` seconds."""
    last_live = time.monotonic()
    while len(finished) < len(runs):
        time.sleep(POLL_SECONDS)
        alive = live_workers(client, pool)
        for run_id, (backbone, dataset) in runs.items():
            if run_id in finished:
                continue
            run = client.read_flow_run(run_id)
            if run.state is not None and not run.state.is_final():
                _crash_if_orphaned(client, run, alive, unit_lock_path(paths, "unit", backbone, dataset))
                run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                finished[run_id] = _outcome(backbone, dataset, run.state, flow_run_id=run_id)
                logger.info("unit %s/%s: %s", backbone, dataset, run.state.type.value)
        if alive:
            last_live = time.monotonic()
        elif time.monotonic() - last_live > wait:
            waiting = [f"{b}/{d}" for run_id, (b, d) in runs.items() if run_id not in finished]
            raise RuntimeError(
                f"work pool {pool!r} has had no live worker for {wait:g} s; units not finished: "
                f"{', '.join(waiting)} (start workers and run again: finished units are kept)"
            )


def cancel_unfinished(client, run_ids: list[UUID], *, logger) -> list[UUID]:
    """Cancel these flow runs unless already final: a queued one at once; a running one through its worker
    (Cancelling: the worker stops its process, which releases the unit's locks), or at once when its worker is gone.
    Returns the ids it cancelled."""
    from prefect.states import Cancelled, Cancelling

    cancelled = []
    for run_id in run_ids:
        try:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                continue
            running = run.state is not None and (run.state.is_running() or run.state.is_pending())
            worker = run.labels.get("prefect.worker.name")
            pool = run.work_pool_name
            through_worker = running and worker and pool and worker in live_workers(client, pool)
            state = (
                Cancelling(message="layerprobe run stopped")
                if through_worker
                else Cancelled(message="layerprobe run stopped before this unit finished")
            )
            client.set_flow_run_state(run_id, state, force=True)
            cancelled.append(run_id)
        except Exception as error:  # noqa: BLE001 - one unit we cannot cancel must not stop cancelling the others
            logger.error("could not cancel flow run %s (cancel it in the Prefect UI): %s", run_id, error)
    return cancelled
