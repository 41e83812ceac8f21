"""Evaluate stage: score every trained probe once on test, record it all in MLflow, register the probes.

Run:  python -m flows.evaluate [--params params.yaml] [--backbone NAME ...] [--dataset NAME ...] [--probe NAME ...]
Cost: one forward pass of each probe over the cached test features (seconds; reused when the probe and features
are unchanged) plus MLflow logging (about a second per probe). Opens one MLflow parent run per invocation with a
child run per (backbone, dataset, probe); a failed child ends FAILED, and runs left RUNNING by a killed process are
closed as FAILED on the next start.
"""

from __future__ import annotations

import datetime as dt

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.common import (
    FLOW_OPTIONS,
    Params,
    as_params,
    log_step,
    run_stage,
    select,
    task_options,
    task_runner,
    unit_lock,
)
from layerprobe import tracking
from layerprobe.config import EvaluateConfig, PathsConfig
from layerprobe.files import read_json, write_json
from layerprobe.plots import draw_evaluation
from layerprobe.report import evaluation_markdown, flat_metrics, metrics_summary
from layerprobe.workflow.evaluate import evaluate_step, signature_example


@task(name="evaluate-probe", task_run_name="evaluate-{backbone_name}-{dataset_name}-{probe_name}")
def evaluate_task(
    backbone_name: str,
    dataset_name: str,
    probe_name: str,
    evaluate: EvaluateConfig,
    paths: PathsConfig,
    *,
    experiment_id: str,
    parent_run_id: str,
    run_params: dict,
) -> dict:
    evaluation_dir = paths.evaluation_dir(backbone_name, dataset_name, probe_name)
    with unit_lock(paths, "evaluate", backbone_name, dataset_name, probe_name):
        evaluation = evaluate_step(backbone_name, dataset_name, probe_name, evaluate=evaluate, paths=paths)
        figures = draw_evaluation(evaluation, evaluation_dir, title=f"{backbone_name} / {dataset_name} / {probe_name}",
                                  redraw=evaluation["status"] == "computed")  # fmt: skip
    evaluation = {**evaluation, "outputs": {**evaluation["outputs"], **figures}}
    log_step(evaluation, f"evaluation {backbone_name}/{dataset_name}/{probe_name}")
    trained = read_json(paths.train_marker(backbone_name, dataset_name, probe_name))
    run = tracking.log_probe_run(
        experiment_id,
        parent_run_id,
        evaluation,
        trained=trained,
        run_params=run_params,
        evaluation_dir=evaluation_dir,
        signature_example=signature_example(
            probe_dir=paths.seed_dir(backbone_name, dataset_name, probe_name, trained["seeds"][0]["seed"]),
            features_dir=paths.features_dir(backbone_name, dataset_name),
        ),
        registered_name=tracking.registered_model_name(evaluate.registry_prefix, dataset_name, backbone_name),
    )
    return {**evaluation, **run}


@flow(name="evaluate", task_runner=task_runner(), **FLOW_OPTIONS)
def evaluate_flow(
    params: Params | str = "params.yaml",
    backbones: list[str] | None = None,
    datasets: list[str] | None = None,
    probes: list[str] | None = None,
    units: list[list[str]] | None = None,
) -> dict:
    """Evaluate the suite's probes (narrowed by the name filters, or to `units`: [backbone, dataset] pairs)."""
    params = as_params(params)
    experiment_id = tracking.setup_experiment(
        params.tracking.experiment, mlruns_dir=params.paths.mlruns, tracking_uri=params.tracking.tracking_uri
    )
    tracking.fail_dangling_runs(experiment_id)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    parent_run_id = tracking.start_run(experiment_id, f"{params.suite.name}-{stamp}", tags={"suite": params.suite.name})
    try:
        tracking.log_params(parent_run_id, {"suite": params.suite.name})
        evaluate = evaluate_task.with_options(**task_options(params))
        futures = [
            evaluate.submit(
                b,
                d,
                p,
                params.evaluate,
                params.paths,
                experiment_id=experiment_id,
                parent_run_id=parent_run_id,
                run_params=tracking.run_params(params, b, d, p),
            )  # fmt: skip
            for b in select(params.suite.backbones, backbones, "backbone")
            for d in select(params.suite.datasets, datasets, "dataset")
            if units is None or [b, d] in units
            for p in select(params.suite.probes, probes, "probe")
        ]
        results = [future.result() for future in futures]
        champions = tracking.crown_champions(results, alias=params.evaluate.champion_alias)
        summary = metrics_summary(results)
        write_json(params.paths.metrics_file, summary)
        write_json(
            params.paths.pipeline_run_file,
            {"parent_run_id": parent_run_id, "experiment_id": experiment_id, "champions": champions},
        )
        tracking.log_metrics(parent_run_id, flat_metrics(summary))
        tracking.log_artifacts(parent_run_id, {"": params.paths.metrics_file})
        create_markdown_artifact(
            key="layerprobe-evaluation",
            markdown=evaluation_markdown(results, champions),
            description="Test metrics per probe",
        )
        tracking.end_run(parent_run_id)
    except BaseException as error:
        tracking.end_run(parent_run_id, failed=True, error=repr(error))
        raise
    return summary


if __name__ == "__main__":
    run_stage(evaluate_flow, __doc__.splitlines()[0], filters=("backbone", "dataset", "probe"))
