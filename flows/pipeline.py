"""The whole pipeline as one Prefect flow: pretrain, then every unit (backbone x dataset: prepare, extract, train and
score every probe, on its worker), then record in MLflow and report once, on this (head) node.

Run:  layerprobe run [--pool NAME] [--no-commit]    (= python -m flows.pipeline: the flow, then `dvc commit` so DVC
                                                  records it; `flows/serve.py` schedules the flow itself)
Units run in this process unless `flow.work_pool` (or --pool) names a Prefect work pool: then each is a run of the
unit deployment that the pool's workers pick up, one per GPU (flows/fanout.py). A unit that fails fails alone: the
others finish, are evaluated and reported, and the pipeline then fails naming every failed unit and its error.
Under DVC, `dvc repro` runs the stage flows instead; either way completion markers decide what is recomputed.
Cost: the sum of the stages (the offline suite: a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger

from flows.common import FLOW_OPTIONS, Params, as_params
from flows.evaluate import evaluate_flow
from flows.fanout import run_units
from flows.pretrain import pretrain_flow
from flows.report import report_flow
from layerprobe.cli import guarded
from layerprobe.files import write_json
from layerprobe.params import load_params


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
            "unit %s/%s: %s%s",
            outcome["backbone"],
            outcome["dataset"],
            outcome["state"],
            f" ({outcome['error']})" if "error" in outcome else "",
        )
    if failed:
        listed = "; ".join(f"{o['backbone']}/{o['dataset']}: {o['error']}" for o in failed)
        raise RuntimeError(f"{len(failed)} of {len(outcomes)} units failed (the others are evaluated): {listed}")
    return summary


def run_and_commit(args: argparse.Namespace) -> int:
    """The pipeline on `--params`, each unit's outcome in a line, then `dvc commit` (unless --no-commit)."""
    from prefect.settings import PREFECT_API_URL

    from flows.local_server import prefect_api

    root = Path.cwd()
    params = load_params(args.params)  # read once: the pipeline passes it down to every flow and unit
    pool = args.pool or params.flow.work_pool
    if pool and not PREFECT_API_URL.value():
        raise ValueError(
            f"work pool {pool!r} needs the Prefect server its workers use: set PREFECT_API_URL "
            "(e.g. http://<host>:4200/api of `prefect server start`)"
        )
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_api():
        try:
            summary = pipeline(params, work_pool=args.pool)
        except RuntimeError as error:  # failed units: the rest is evaluated, nothing is recorded in dvc.lock
            print(f"layerprobe run: error: {error}", file=sys.stderr)
            return 1
    for outcome in summary["units"]:
        status = outcome["summary"]["status"]
        trained = ", ".join(f"{probe} {state}" for probe, state in status["train"].items())
        where = outcome["summary"]["worker"] or "this process"
        print(f"{outcome['backbone']}/{outcome['dataset']} on {where}: extract {status['extract']}; {trained}")
    if not args.no_commit and (root / "dvc.yaml").is_file():
        # The outputs were made outside `dvc repro`: commit records them in dvc.lock (DVC's pattern for that), so
        # `dvc status` is clean and a later `dvc repro` reruns nothing.
        committed = subprocess.run(["dvc", "commit", "--force"], cwd=root, capture_output=True, text=True)
        if committed.returncode:
            raise ValueError(f"`dvc commit` failed: {' '.join(committed.stderr.split())[:400]}")
        print("dvc commit: dvc.lock records this run; `dvc status` is clean")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layerprobe run", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--pool", help="Prefect work pool for the units (default: params flow.work_pool; null: here)")
    parser.add_argument("--no-commit", action="store_true", help="leave dvc.lock as it is")
    parser.add_argument("--traceback", action="store_true", help="show an error's whole traceback, not one line")
    args = parser.parse_args(argv)
    return guarded("layerprobe run", lambda: run_and_commit(args), compute=True, show_traceback=args.traceback)


if __name__ == "__main__":
    sys.exit(main())
