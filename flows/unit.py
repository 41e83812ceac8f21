"""A unit of work: one (backbone, dataset) on one device. Prepare the dataset if needed, extract its features, then
train every probe of the suite on them and score each on the test split (its metrics, predictions, heatmap and
figures), so that all the work of a unit runs on its worker and the head node only records.

Run:  python -m flows.unit --params params.yaml --backbone NAME --dataset NAME     (in process)
The pipeline (flows/pipeline.py) fans units out: in process by default, or, with `flow.work_pool`, as runs of the
deployment `unit/<flow.unit_deployment>` that Prefect workers pick up (`prefect worker start --pool <pool>`).
Under a `process` worker the unit holds the worker's slot `gpu:<worker>` (a lock file on its machine) for its whole
run, so two units never share a worker's GPU; it holds its own unit lock too, so a rerun never runs it beside an
earlier run of itself (units sharing a dataset prepare it once: the prepare step locks it). Every step reuses outputs
whose fingerprint matches, so a rerun after a kill resumes.
Cost: one backbone pass over the dataset, plus the probes' sweeps and one test pass each.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os

from prefect import flow

from flows.common import (
    FLOW_OPTIONS,
    Params,
    as_params,
    concurrency_slot,
    run_stage,
    task_options,
    task_runner,
    unit_lock,
    worker_name,
)
from flows.evaluate import evaluate_task
from flows.extract import extract_task
from flows.prepare import prepare_task
from flows.train import train_task
from layerprobe.probes import TRAINED_FROM

# Set by the unit deployment on `process` pools, where a worker is one GPU and its units take turns on `gpu:<worker>`.
WORKER_SLOT_ENV = "LAYERPROBE_WORKER_SLOT"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


@flow(name="unit", task_runner=task_runner(), flow_run_name="unit-{backbone}-{dataset}", **FLOW_OPTIONS)
def unit_flow(params: Params | dict | str = "params.yaml", backbone: str = "", dataset: str = "") -> dict:
    """Run one unit; `params` is the run's Params (in process), its JSON (on a work pool) or a params file's path."""
    params = as_params(params)
    if backbone not in params.backbones or dataset not in params.datasets:
        from layerprobe.registry import unknown_name_error

        bad, kind, known = (
            (backbone, "backbone", params.backbones)
            if backbone not in params.backbones
            else (dataset, "dataset", params.datasets)
        )
        raise unknown_name_error(kind, bad, list(known))
    check_patch_tokens(params)  # before the backbone pass, not after it
    options = task_options(params)
    worker = worker_name()
    slot = f"gpu:{worker}" if worker and os.environ.get(WORKER_SLOT_ENV) else None
    # The whole unit under its lock (before the GPU slot: a unit waiting on an earlier run of itself holds no GPU):
    # a rerun never runs a unit beside its earlier run that still works; it waits, then reuses what that one wrote.
    with (
        unit_lock(params.paths, "unit", backbone, dataset),
        concurrency_slot(slot, 1) if slot else contextlib.nullcontext(),
    ):
        started = _now()
        prepared = prepare_task.with_options(**options)(dataset, params.datasets[dataset], params.prepare, params.paths)
        features = extract_task.with_options(**options)(
            backbone, dataset, params.backbones[backbone], params.extract, params.paths, params.flow.gpu_concurrency
        )
        train, score = train_task.with_options(**options), evaluate_task.with_options(**options)
        trained = {}
        # A probe trained from another's (alf_truncated from alf's) is submitted after it and waits for it.
        for p in sorted(params.suite.probes, key=lambda name: name in TRAINED_FROM):
            trained[p] = train.submit(
                backbone,
                dataset,
                p,
                params.probe_config(p),
                params.train,
                params.paths,
                params.flow.gpu_concurrency,
                wait_for=[trained[TRAINED_FROM[p]]] if p in TRAINED_FROM else [],
            )
        # Each probe is scored here, on this worker, as soon as it is trained: the head node only records the scores.
        scored = {
            p: score.submit(backbone, dataset, p, params.evaluate, params.paths, wait_for=[trained[p]])
            for p in params.suite.probes
        }
        probes = {p: future.result()["status"] for p, future in trained.items()}
        evaluations = {p: future.result()["status"] for p, future in scored.items()}
        finished = _now()
    return {
        "backbone": backbone,
        "dataset": dataset,
        "worker": worker,
        "slot": slot,
        "started": started,
        "finished": finished,
        "status": {
            "prepare": prepared["status"],
            "extract": features["status"],
            "train": probes,
            "evaluate": evaluations,
        },
    }


def check_patch_tokens(params: Params) -> None:
    """Fail before any extraction when a probe of the suite reads patch tokens that extraction will not cache."""
    from layerprobe.probes import get_probe_spec

    if params.extract.final_patch_tokens:
        return
    for name in params.suite.probes:
        if get_probe_spec(name, **params.probe_config(name).overrides()).reads_patches:
            raise ValueError(
                f"probe {name!r} reads the final layer's patch tokens, which extraction does not cache: "
                "set `extract.final_patch_tokens: true` in params"
            )


if __name__ == "__main__":
    run_stage(unit_flow, __doc__.splitlines()[0], required=("backbone", "dataset"))
