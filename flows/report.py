"""Report stage: the paper-style table (datasets x probes per backbone, gain of alf over linear_last_cls) and a
grid of layer-attention heatmaps, written for DVC and logged to the evaluate stage's MLflow parent run.

Run:  python -m flows.report [--params params.yaml]
Cost: seconds (reads metrics files, draws two figures).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.common import load_params, parse_stage_args
from layerprobe import tracking
from layerprobe.config import HEATMAP_JSON
from layerprobe.files import read_json
from layerprobe.report import write_report


@task(name="write-report")
def write_report_task(summary: dict, out_dir: str, probes: list[str], groups: dict, heatmaps: dict[str, str]) -> dict:
    files = write_report(
        summary, Path(out_dir), probes=probes, groups=groups, heatmaps={k: Path(v) for k, v in heatmaps.items()}
    )
    return {name: str(path) for name, path in files.items()}


@flow(name="report", log_prints=True)
def report_flow(params_path: str = "params.yaml") -> dict:
    params = load_params(params_path)
    metrics_file = params.paths.metrics_file
    if not metrics_file.is_file():
        raise FileNotFoundError(f"no evaluation results at {metrics_file} (run the evaluate stage first)")
    summary = read_json(metrics_file)
    heatmaps = {
        f"{b}/{d}": str(params.paths.evaluation_dir(b, d, "alf") / HEATMAP_JSON)
        for b in params.suite.backbones
        for d in params.suite.datasets
        if (params.paths.evaluation_dir(b, d, "alf") / HEATMAP_JSON).is_file()
    }
    groups = {name: dataset.group for name, dataset in params.datasets.items()}
    files = write_report_task(summary, str(params.paths.report_dir), params.suite.probes, groups, heatmaps)
    markdown = Path(files["markdown"]).read_text()
    create_markdown_artifact(key="layerprobe-report", markdown=markdown, description=f"{params.suite.name} results")
    run_file = params.paths.pipeline_run_file
    if run_file.is_file():  # attach the report to the evaluate stage's parent run
        tracking.setup_experiment(
            params.tracking.experiment, mlruns_dir=params.paths.mlruns, tracking_uri=params.tracking.tracking_uri
        )
        tracking.log_artifacts(read_json(run_file)["parent_run_id"], {"report": params.paths.report_dir})
    print(markdown)
    return files


if __name__ == "__main__":
    args = parse_stage_args(__doc__.splitlines()[0])
    report_flow(args.params)
