"""Evaluate stage: score every trained probe once on test, then record them all in MLflow and register the probes.

Run:  python -m flows.evaluate [--params params.yaml] [--backbone NAME ...] [--dataset NAME ...] [--probe NAME ...]
Cost: one forward pass of each probe over the cached test features (seconds; reused when the probe and features
are unchanged), then MLflow recording in one batch from the outputs on disk (0.3-0.7 s per probe logged on 2 CPU
cores, benchmarks/RESULTS.md; a probe already recorded with the same scores and weights is referenced, not logged
again: 1000 unchanged probes take about 12 s). A parent run holds the probes logged now as children and references
the others; a rerun that changed nothing adds no run. A failed child ends FAILED, and runs left RUNNING by a killed
recording are closed as FAILED by the next (recordings of one experiment take turns, holding its lock).
A filtered run replaces only its own rows of results/metrics.json and its champions in run.json.
"""

from __future__ import annotations

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
from layerprobe.config import EvaluateConfig, PathsConfig
from layerprobe.files import read_json, write_json
from layerprobe.plots import draw_evaluation
from layerprobe.report import evaluation_markdown, merge_summaries, metrics_summary
from layerprobe.steps.evaluate import evaluate_step


@task(name="evaluate-probe", task_run_name="evaluate-{backbone_name}-{dataset_name}-{probe_name}")
def evaluate_task(
    backbone_name: str, dataset_name: str, probe_name: str, evaluate: EvaluateConfig, paths: PathsConfig
) -> dict:
    evaluation_dir = paths.evaluation_dir(backbone_name, dataset_name, probe_name)
    with unit_lock(paths, "evaluate", backbone_name, dataset_name, probe_name):
        evaluation = evaluate_step(backbone_name, dataset_name, probe_name, evaluate=evaluate, paths=paths)
        figures = draw_evaluation(
            evaluation,
            evaluation_dir,
            title=f"{backbone_name} / {dataset_name} / {probe_name}",
            redraw=evaluation["status"] == "computed",
        )
    log_step(evaluation, f"evaluation {backbone_name}/{dataset_name}/{probe_name}")
    return {
        "backbone": backbone_name,
        "dataset": dataset_name,
        "probe": probe_name,
        "status": evaluation["status"],
        "figures": figures,
    }


@task(name="record-in-mlflow")
def record_task(params: Params, probes: list[tuple[str, str, str]]) -> dict:
    """Record the evaluated probes in MLflow from their outputs on disk (`tracking.record_evaluations`)."""
    from layerprobe import tracking  # MLflow is imported where it records, not by the units that score

    recorded = tracking.record_evaluations(params, probes)
    logged = sum(r["recorded"] == "logged" for r in recorded["results"])
    print(
        f"MLflow: {logged} probe runs logged, {len(probes) - logged} unchanged (referenced); parent run "
        f"{recorded['parent_run_id']} ({recorded['parent']})"
    )
    return recorded


@flow(name="evaluate", task_runner=task_runner(), **FLOW_OPTIONS)
def evaluate_flow(
    params: Params | str = "params.yaml",
    backbones: list[str] | None = None,
    datasets: list[str] | None = None,
    probes: list[str] | None = None,
    units: list[list[str]] | None = None,
    score: bool = True,
) -> dict:
    """Evaluate the suite's probes (narrowed by the name filters, or to `units`: [backbone, dataset] pairs): score
    each (reused when its unit scored it) and record them all; with `score=False` (the pipeline, whose units have
    scored their probes on their workers) only record."""
    params = as_params(params)
    tasks = [
        (b, d, p)
        for b in select(params.suite.backbones, backbones, "backbone")
        for d in select(params.suite.datasets, datasets, "dataset")
        if units is None or [b, d] in units
        for p in select(params.suite.probes, probes, "probe")
    ]
    if score:
        evaluate = evaluate_task.with_options(**task_options(params))
        futures = [evaluate.submit(b, d, p, params.evaluate, params.paths) for b, d, p in tasks]
        for future in futures:
            future.result()
    recorded = record_task.with_options(**task_options(params))(params, tasks)
    summary = write_summaries(params, recorded)
    create_markdown_artifact(
        key="layerprobe-evaluation",
        markdown=evaluation_markdown(recorded["results"], recorded["champions"]),
        description="Test metrics per probe",
    )
    return summary


def write_summaries(params: Params, recorded: dict) -> dict:
    """results/metrics.json and run.json: the recorded probes' rows and champions merged into the suite's last
    summaries, so a filtered evaluate replaces only its own rows (rows of tasks the suite no longer holds go)."""
    from layerprobe.model_registry import registered_model_name

    paths, suite = params.paths, params.suite
    earlier = read_json(paths.metrics_file) if paths.metrics_file.is_file() else {}
    summary = metrics_summary(recorded["results"])
    summary = merge_summaries(earlier, summary, suite.backbones, suite.datasets, suite.probes)
    write_json(paths.metrics_file, summary)
    names = {registered_model_name(params.evaluate.registry_prefix, d, b) for b in summary for d in summary[b]}
    champions = read_json(paths.pipeline_run_file).get("champions", {}) if paths.pipeline_run_file.is_file() else {}
    champions = {name: c for name, c in {**champions, **recorded["champions"]}.items() if name in names}
    run = {key: recorded[key] for key in ("parent_run_id", "experiment_id", "parent")}
    write_json(paths.pipeline_run_file, {**run, "champions": champions})
    return summary


if __name__ == "__main__":
    run_stage(evaluate_flow, __doc__.splitlines()[0], filters=("backbone", "dataset", "probe"))
