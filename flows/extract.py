"""Extract stage: run each frozen backbone once over each prepared dataset into a per-layer feature cache.

Run:  python -m flows.extract [--params params.yaml] [--backbone NAME ...] [--dataset NAME ...]
Cost: one forward pass per image per backbone (GPU and bf16 when present); the offline suite takes about a minute
on 2 CPU cores. Resumable: a killed run keeps its finished shards, and a rerun recomputes none of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.common import cached, gpu_slot, load_params, parse_stage_args, select
from layerprobe.workflow import extract_step


@task(name="extract-features", task_run_name="extract-{backbone}-{dataset}")
def extract_features_task(
    backbone: str,
    dataset: str,
    *,
    dataset_version: str,
    prepared_dir: str,
    out_dir: str,
    backbone_config: dict,
    extract_config: dict,
    gpu_limit: int,
) -> dict:
    # dataset_version is unused in the body on purpose: it is part of the cache key, so new data means new features.
    with gpu_slot(extract_config["device"], gpu_limit):
        summary = extract_step(
            backbone,
            dataset,
            prepared_dir=Path(prepared_dir),
            out_dir=Path(out_dir),
            **backbone_config,
            **extract_config,
        )
    get_run_logger().info(
        "features %s/%s: %s (content hash %s)", backbone, dataset, out_dir, summary["content_hash"][:12]
    )
    return summary


@flow(name="extract", log_prints=True)
def extract_flow(
    params_path: str = "params.yaml", backbones: list[str] | None = None, datasets: list[str] | None = None
) -> list[dict]:
    params = load_params(params_path)
    futures = []
    for backbone in select(params.suite.backbones, backbones, "backbone"):
        for dataset in select(params.suite.datasets, datasets, "dataset"):
            prepared_dir = params.paths.prepared_dir(dataset)
            out_dir = params.paths.features_dir(backbone, dataset)
            extract = cached(extract_features_task, params, output_marker=out_dir / "manifest.json")
            futures.append(
                extract.submit(
                    backbone,
                    dataset,
                    dataset_version=_dataset_version(prepared_dir),
                    prepared_dir=str(prepared_dir),
                    out_dir=str(out_dir),
                    backbone_config=_backbone_kwargs(params.backbones[backbone]),
                    extract_config=_extract_kwargs(params.extract),
                    gpu_limit=params.flow.gpu_concurrency,
                )
            )
    return [future.result() for future in futures]


def _dataset_version(prepared_dir: Path) -> str:
    splits = prepared_dir / "splits.json"
    if not splits.is_file():
        raise FileNotFoundError(f"dataset not prepared: {splits} is missing (run the prepare stage first)")
    return json.loads(splits.read_text())["version"]


def _backbone_kwargs(config) -> dict:
    return {
        "model": config.model,
        "pretrained": config.pretrained,
        "checkpoint": config.checkpoint,
        "model_kwargs": dict(config.model_kwargs),
        "crop_pct": config.crop_pct,
        "final_projection": config.final_projection,
    }


def _extract_kwargs(config) -> dict:
    return {
        "tap": config.tap,
        "dtype": config.dtype,
        "batch_size": config.batch_size,
        "num_workers": config.num_workers,
        "shard_size": config.shard_size,
        "device": config.device,
    }


if __name__ == "__main__":
    args = parse_stage_args(__doc__.splitlines()[0], filters=("backbone", "dataset"))
    extract_flow(args.params, backbones=args.backbones, datasets=args.datasets)
