"""Report stage: the paper-style table (datasets x probes per backbone, gain of alf over linear_last_cls) and, per
backbone, a layer-attention matrix (datasets x layers), written for DVC and logged to the evaluate stage's MLflow
parent run.

Run:  python -m flows.report [--params params.yaml]
Cost: seconds (reads metrics files, draws two figures).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.common import load_params, run_stage
from layerprobe import tracking
from layerprobe.config import HEATMAP_JSON
from layerprobe.files import read_json
from layerprobe.report import HEADLINE, write_report


@task(name="write-report")
def write_report_task(summary: dict, out_dir: Path, probes: list[str], groups: dict, heatmaps: dict) -> dict:
    return {name: str(path) for name, path in write_report(summary, out_dir, probes=probes, groups=groups,
                                                           heatmaps=heatmaps).items()}  # fmt: skip


@flow(name="report", log_prints=True)
def report_flow(params_path: str = "params.yaml") -> dict:
    params = load_params(params_path)
    metrics_file = params.paths.metrics_file
    if not metrics_file.is_file():
        raise FileNotFoundError(f"no evaluation results at {metrics_file} (run the evaluate stage first)")
    summary = read_json(metrics_file)
    heatmaps = {}  # backbone -> dataset -> the headline probe's layer attention
    for b in params.suite.backbones:
        for d in params.suite.datasets:
            path = params.paths.evaluation_dir(b, d, HEADLINE) / HEATMAP_JSON
            if path.is_file():
                heatmaps.setdefault(b, {})[d] = read_json(path)
    groups = {name: dataset.group for name, dataset in params.datasets.items()}
    files = write_report_task(summary, params.paths.report_dir, params.suite.probes, groups, heatmaps)
    markdown = Path(files["markdown"]).read_text()
    create_markdown_artifact(key="layerprobe-report", markdown=markdown, description=f"{params.suite.name} results")
    run_file = params.paths.pipeline_run_file
    if run_file.is_file():  # attach the report (tables, gains, attention matrices) to the evaluate stage's parent run
        tracking.setup_experiment(
            params.tracking.experiment, mlruns_dir=params.paths.mlruns, tracking_uri=params.tracking.tracking_uri
        )
        tracking.log_artifacts(read_json(run_file)["parent_run_id"], {"report": params.paths.report_dir})
    print(markdown)
    return files


if __name__ == "__main__":
    run_stage(report_flow, __doc__.splitlines()[0], compute=False)
