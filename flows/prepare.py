"""Prepare stage: materialise each dataset's train/val/test splits (and small datasets' images) for DVC.

Run:  python -m flows.prepare [--params params.yaml] [--dataset NAME ...]
Cost: seconds for the offline suite (generated images and sklearn digits); for folder/torchvision/wds sources it
reads labels once and writes only the split index, never a copy of the images (an image folder's files are
decoded once, to report every broken one up front). A dataset whose splits.json records the same fingerprint
(source, options, split settings, the listing of its files, the code) is left as it is.
"""

from __future__ import annotations

from prefect import flow, task

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
from layerprobe.config import DatasetConfig, PathsConfig, PrepareConfig
from layerprobe.steps.prepare import prepare_step


@task(name="prepare-dataset", task_run_name="prepare-{name}")
def prepare_task(name: str, dataset: DatasetConfig, prepare: PrepareConfig, paths: PathsConfig) -> dict:
    with unit_lock(paths, "prepare", name):  # units of several backbones may prepare one dataset at once
        summary = prepare_step(name, dataset=dataset, prepare=prepare, paths=paths)
    log_step(summary, f"dataset {name}")
    return summary


@flow(name="prepare", task_runner=task_runner(), **FLOW_OPTIONS)
def prepare_flow(params: Params | str = "params.yaml", datasets: list[str] | None = None) -> list[dict]:
    params = as_params(params)
    prepare = prepare_task.with_options(**task_options(params))
    futures = [
        prepare.submit(name, params.datasets[name], params.prepare, params.paths)
        for name in select(params.suite.datasets, datasets, "dataset")
    ]
    return [future.result() for future in futures]


if __name__ == "__main__":
    run_stage(prepare_flow, __doc__.splitlines()[0], filters=("dataset",))
