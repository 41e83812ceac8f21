"""The whole pipeline as one Prefect flow: pretrain, then every unit (backbone x dataset: prepare, extract, train and
score every probe, on its worker), then record in MLflow and report once, on this (head) node.

Run:  python -m flows.pipeline [--params params.yaml]       (what `flows/serve.py` schedules)
      layerprobe run [--pool NAME]                          (the same, then `dvc commit` so DVC records it)
Units run in this process unless `flow.work_pool` (or --pool) names a Prefect work pool: then each is a run of the
unit deployment that the pool's workers pick up, one per GPU (flows/fanout.py). A unit that fails fails alone: the
others finish, are evaluated and reported, and the pipeline then fails naming every failed unit and its error.
Under DVC, `dvc repro` runs the stage flows instead; either way completion markers decide what is recomputed.
Cost: the sum of the stages (the offline suite: a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import dataclasses

from prefect import flow, get_run_logger

from flows.common import FLOW_OPTIONS, Params, as_params, run_stage
from flows.evaluate import evaluate_flow
from flows.fanout import run_units
from flows.pretrain import pretrain_flow
from flows.report import report_flow
from layerprobe.files import write_json


@flow(name="pipeline", **FLOW_OPTIONS)
def pipeline(params: Params | str = "params.yaml", work_pool: str | None = None) -> dict:
    """The whole run; `params` is read once here (a path, as a schedule passes it) and passed down."""
    params = as_params(params)
    if work_pool is not None:  # --pool overrides params' flow.work_pool
        params = dataclasses.replace(params, flow=dataclasses.replace(params.flow, work_pool=work_pool))
    pretrain_flow(params)
    units = [(b, d) for b in params.suite.backbones for d in params.suite.datasets]
    outcomes = run_units(params, units)
    completed = [(o["backbone"], o["dataset"]) for o in outcomes if o["state"] == "COMPLETED"]
    report = None
    if completed:
        evaluate_flow(params, units=[list(unit) for unit in completed], score=False)  # the units scored: record
        report = report_flow(params)
    summary = {"units": outcomes, "report": report}
    write_json(params.paths.units_file, outcomes)  # where every unit ran, when, and what it reused or recomputed
    failed = [o for o in outcomes if o["state"] != "COMPLETED"]
    for outcome in outcomes:
        get_run_logger().info(
            "unit %s/%s: %s%s", outcome["backbone"], outcome["dataset"], outcome["state"],
            f" ({outcome['error']})" if "error" in outcome else "",
        )  # fmt: skip
    if failed:
        listed = "; ".join(f"{o['backbone']}/{o['dataset']}: {o['error']}" for o in failed)
        raise RuntimeError(f"{len(failed)} of {len(outcomes)} units failed (the others are evaluated): {listed}")
    return summary


if __name__ == "__main__":
    run_stage(pipeline, __doc__.splitlines()[0])
