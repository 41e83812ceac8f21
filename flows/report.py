"""Report stage: the paper-style table (datasets x probes per backbone, gain of alf over the backbone's baseline,
linear_last_cls or for MAE linear_last_ap, bootstrap intervals) and, per backbone, a layer-attention matrix
(datasets x layers), written for DVC and logged to the evaluate stage's MLflow parent run (with each gain and its
paired-bootstrap interval as metrics, and the mean gain per backbone as the run's description).

Run:  python -m flows.report [--params params.yaml]
Cost: seconds (reads metrics and predictions files, 1000 bootstrap resamples per task, draws two figures).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.common import FLOW_OPTIONS, Params, as_params, run_stage
from layerprobe import tracking
from layerprobe.config import HEATMAP_JSON, PREDICTIONS_FILE
from layerprobe.files import read_arrays, read_json
from layerprobe.report import (
    HEADLINE,
    baseline_probe,
    gain_intervals,
    gain_metrics,
    headline,
    results_rows,
    write_report,
)


@task(name="write-report")
def write_report_task(
    summary: dict, out_dir: Path, probes: list[str], groups: dict, heatmaps: dict, intervals: dict, baselines: dict
) -> dict:
    files = write_report(
        summary, out_dir, probes=probes, groups=groups, heatmaps=heatmaps, intervals=intervals, baselines=baselines
    )
    return {name: str(path) for name, path in files.items()}


@flow(name="report", **FLOW_OPTIONS)
def report_flow(params: Params | str = "params.yaml") -> dict:
    params = as_params(params)
    metrics_file = params.paths.metrics_file
    if not metrics_file.is_file():
        raise FileNotFoundError(f"no evaluation results at {metrics_file} (run the evaluate stage first)")
    summary = read_json(metrics_file)
    baselines = {b: baseline_probe(params.backbones[b].family) for b in params.suite.backbones}
    heatmaps = {}  # backbone -> dataset -> the headline probe's layer attention
    predictions = {}  # backbone -> dataset -> probe -> test labels and predictions, to pair the two probes
    for b in params.suite.backbones:
        for d in params.suite.datasets:
            path = params.paths.evaluation_dir(b, d, HEADLINE) / HEATMAP_JSON
            if path.is_file():
                heatmaps.setdefault(b, {})[d] = read_json(path)
            for p in (HEADLINE, baselines[b]):
                path = params.paths.evaluation_dir(b, d, p) / PREDICTIONS_FILE
                if d in summary.get(b, {}) and path.is_file():  # only tasks this summary (and parent run) holds
                    predictions.setdefault(b, {}).setdefault(d, {})[p] = read_arrays(path)
    intervals = gain_intervals(predictions, baselines=baselines)
    groups = {name: dataset.group for name, dataset in params.datasets.items()}
    files = write_report_task(
        summary, params.paths.report_dir, params.suite.probes, groups, heatmaps, intervals, baselines
    )
    markdown = Path(files["markdown"]).read_text()
    create_markdown_artifact(key="layerprobe-report", markdown=markdown, description=f"{params.suite.name} results")
    run_file = params.paths.pipeline_run_file
    if run_file.is_file():  # attach the report (tables, gains, attention matrices) to the evaluate stage's parent run
        tracking.setup_experiment(
            params.tracking.experiment, mlruns_dir=params.paths.mlruns, tracking_uri=params.tracking.tracking_uri
        )
        parent_run_id = read_json(run_file)["parent_run_id"]
        tracking.log_metrics(parent_run_id, gain_metrics(intervals))
        tracking.log_artifacts(parent_run_id, {"report": params.paths.report_dir})
        rows = results_rows(
            summary, probes=params.suite.probes, groups=groups, intervals=intervals, baselines=baselines
        )
        tracking.describe_run(parent_run_id, headline(rows, params.suite.probes, intervals=intervals))
    print(markdown)
    return files


if __name__ == "__main__":
    run_stage(report_flow, __doc__.splitlines()[0], compute=False)
