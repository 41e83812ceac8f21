"""Report stage: the paper-style table (datasets x probes per backbone, gain of alf over the backbone's baseline,
linear_last_cls or for MAE linear_last_ap, bootstrap intervals), per backbone a layer-attention matrix (datasets x
layers) and, where the suite's probes wrote layer findings, which layers matter per (backbone, dataset), written for
DVC and logged to the evaluate stage's MLflow parent run (with the suite's mean scores, each gain and its
paired-bootstrap interval and the layer curves as metrics, and the mean gain per backbone as the run's description).

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
from layerprobe.layer_report import layer_findings, layer_metrics
from layerprobe.report import (
    HEADLINE,
    baseline_probe,
    gain_intervals,
    gain_metrics,
    headline,
    results_rows,
    suite_metrics,
    write_report,
)


@task(name="write-report")
def write_report_task(
    summary: dict,
    out_dir: Path,
    probes: list[str],
    groups: dict,
    heatmaps: dict,
    intervals: dict,
    baselines: dict,
    layers: dict,
) -> dict:
    files = write_report(
        summary,
        out_dir,
        probes=probes,
        groups=groups,
        heatmaps=heatmaps,
        intervals=intervals,
        baselines=baselines,
        layers=layers,
    )
    return {name: str(path) for name, path in files.items()}


@flow(name="report", **FLOW_OPTIONS)
def report_flow(params: Params | str = "params.yaml") -> dict:
    params = as_params(params)
    results = read_results(params)
    groups = {name: dataset.group for name, dataset in params.datasets.items()}
    files = write_report_task(
        results["summary"],
        params.paths.report_dir,
        params.suite.probes,
        groups,
        results["heatmaps"],
        results["intervals"],
        results["baselines"],
        results["layers"],
    )
    markdown = Path(files["markdown"]).read_text()
    create_markdown_artifact(key="layerprobe-report", markdown=markdown, description=f"{params.suite.name} results")
    if params.paths.pipeline_run_file.is_file():
        record_report(params, results)
    print(markdown)
    return files


def read_results(params: Params) -> dict:
    """What the report is made of, for the tasks the evaluate stage's summary (and parent run) holds: `summary`,
    each backbone's gain `baselines`, HEADLINE's layer `heatmaps`, the gains' paired `intervals` (from both probes'
    test predictions) and the `layers` findings (from the suite probes' evaluation markers)."""
    if not params.paths.metrics_file.is_file():
        raise FileNotFoundError(f"no evaluation results at {params.paths.metrics_file} (run the evaluate stage first)")
    summary = read_json(params.paths.metrics_file)
    baselines = {b: baseline_probe(params.backbones[b].family) for b in params.suite.backbones}
    heatmaps = {}  # backbone -> dataset -> the headline probe's layer attention
    predictions = {}  # backbone -> dataset -> probe -> test labels and predictions, to pair the two probes
    markers = {}  # backbone -> dataset -> probe -> its evaluation marker, for the layer blocks some probes write
    for b in params.suite.backbones:
        for d in params.suite.datasets:
            path = params.paths.evaluation_dir(b, d, HEADLINE) / HEATMAP_JSON
            if path.is_file():
                heatmaps.setdefault(b, {})[d] = read_json(path)
            if d not in summary.get(b, {}):
                continue
            for p in params.suite.probes:
                if (path := params.paths.evaluation_marker(b, d, p)).is_file():
                    markers.setdefault(b, {}).setdefault(d, {})[p] = read_json(path)
            for p in (HEADLINE, baselines[b]):
                if (path := params.paths.evaluation_dir(b, d, p) / PREDICTIONS_FILE).is_file():
                    predictions.setdefault(b, {}).setdefault(d, {})[p] = read_arrays(path)
    intervals = gain_intervals(predictions, baselines=baselines)
    layers = layer_findings(markers, heatmaps)
    return {"summary": summary, "baselines": baselines, "heatmaps": heatmaps, "intervals": intervals, "layers": layers}


def record_report(params: Params, results: dict) -> None:
    """Attach the written report (tables, gains, attention matrices, layer pictures) to the evaluate stage's parent
    run, finished by then, with its own scores (`suite_metrics`), each gain with its interval (`gain_metrics`) and
    the layer curves (`layer_metrics`) as metrics, and the mean gain per backbone as its description."""
    tracking.setup_experiment(
        params.tracking.experiment, mlruns_dir=params.paths.mlruns, tracking_uri=params.tracking.tracking_uri
    )
    parent_run_id = read_json(params.paths.pipeline_run_file)["parent_run_id"]
    summary, intervals = results["summary"], results["intervals"]
    metrics = suite_metrics(summary, intervals) | gain_metrics(intervals) | layer_metrics(results["layers"])
    tracking.log_metrics(parent_run_id, metrics)
    tracking.log_artifacts(parent_run_id, {"report": params.paths.report_dir})
    rows = results_rows(summary, probes=params.suite.probes, intervals=intervals, baselines=results["baselines"])
    tracking.describe_run(parent_run_id, headline(rows, params.suite.probes, intervals=intervals))


if __name__ == "__main__":
    run_stage(report_flow, __doc__.splitlines()[0], compute=False)
