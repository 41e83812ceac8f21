"""Extract stage: run each frozen backbone once over each prepared dataset into a per-layer feature cache.

Run:  python -m flows.extract [--params params.yaml] [--backbone NAME ...] [--dataset NAME ...]
Cost: one forward pass per image per backbone (GPU when present); the offline suite takes seconds per cache on
2 CPU cores. A cache whose manifest records the same fingerprint (backbone section and weights' bytes, extraction
settings, dataset version, the code) is reused; a killed run keeps its finished shards.
"""

from __future__ import annotations

from prefect import flow, task

from flows.common import (
    FLOW_OPTIONS,
    Params,
    as_params,
    gpu_slot,
    log_step,
    run_stage,
    select,
    task_options,
    task_runner,
    unit_lock,
)
from layerprobe.config import BackboneConfig, ExtractConfig, PathsConfig
from layerprobe.steps.extract import extract_step


@task(name="extract-features", task_run_name="extract-{backbone_name}-{dataset_name}")
def extract_task(
    backbone_name: str,
    dataset_name: str,
    backbone: BackboneConfig,
    extract: ExtractConfig,
    paths: PathsConfig,
    gpu_limit: int = 1,
) -> dict:
    with unit_lock(paths, "extract", backbone_name, dataset_name), gpu_slot(extract.device, gpu_limit):
        summary = extract_step(backbone_name, dataset_name, backbone=backbone, extract=extract, paths=paths)
    log_step(summary, f"features {backbone_name}/{dataset_name} (content hash {summary['content_hash'][:12]})")
    return summary


@flow(name="extract", task_runner=task_runner(), **FLOW_OPTIONS)
def extract_flow(
    params: Params | str = "params.yaml", backbones: list[str] | None = None, datasets: list[str] | None = None
) -> list[dict]:
    params = as_params(params)
    extract = extract_task.with_options(**task_options(params))
    futures = [
        extract.submit(b, d, params.backbones[b], params.extract, params.paths, params.flow.gpu_concurrency)
        for b in select(params.suite.backbones, backbones, "backbone")
        for d in select(params.suite.datasets, datasets, "dataset")
    ]
    return [future.result() for future in futures]


if __name__ == "__main__":
    run_stage(extract_flow, __doc__.splitlines()[0], filters=("backbone", "dataset"))
