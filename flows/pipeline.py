"""The whole pipeline as one Prefect flow: pretrain → prepare → extract → train → evaluate → report.

Run:  python -m flows.pipeline [--params params.yaml]      (what `flows/serve.py` schedules)
Under DVC, `dvc repro` runs the same stage flows one by one and decides which stages are stale; this entry point is
for Prefect deployments and schedules. Either way each unit's completion marker decides whether it is recomputed,
so a scheduled rerun redoes only what changed.
Cost: the sum of the stages (the offline suite: a few minutes on 2 CPU cores).
"""

from __future__ import annotations

from prefect import flow

from flows.common import run_stage
from flows.evaluate import evaluate_flow
from flows.extract import extract_flow
from flows.prepare import prepare_flow
from flows.pretrain import pretrain_flow
from flows.report import report_flow
from flows.train import train_flow


@flow(name="pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml") -> dict:
    pretrain_flow(params_path)
    prepare_flow(params_path)
    extract_flow(params_path)
    train_flow(params_path)
    evaluate_flow(params_path)
    return report_flow(params_path)


if __name__ == "__main__":
    run_stage(pipeline, __doc__.splitlines()[0])
