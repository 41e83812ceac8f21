"""Pretrain stage: train each backbone that has a `pretrain` recipe from scratch and save it as a local checkpoint.

Run:  python -m flows.pretrain [--params params.yaml] [--backbone NAME ...]
Cost: the offline suite's one backbone takes about a minute on 2 CPU cores (900 steps of 128 generated images).
A checkpoint whose marker (`<checkpoint>.json`) records the same fingerprint (architecture, recipe, the code) is
reused. Each run is also an MLflow run (`pretrain/<backbone>`): recipe, loss curve and held-out accuracy.
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
from layerprobe import tracking
from layerprobe.config import BackboneConfig, PathsConfig
from layerprobe.steps.pretrain import pretrain_checkpoint, pretrain_step


@task(name="pretrain-backbone", task_run_name="pretrain-{backbone_name}")
def pretrain_task(backbone_name: str, backbone: BackboneConfig, paths: PathsConfig, gpu_limit: int = 1) -> dict:
    checkpoint = pretrain_checkpoint(backbone_name, backbone, paths)
    with unit_lock(paths, "pretrain", backbone_name, out=checkpoint), gpu_slot(backbone.pretrain.device, gpu_limit):
        summary = pretrain_step(backbone_name, backbone=backbone)
    log_step(summary, f"backbone {backbone_name} (held-out accuracy {summary['held_out_accuracy']:.3f})")
    return summary


@flow(name="pretrain", task_runner=task_runner(), **FLOW_OPTIONS)
def pretrain_flow(params: Params | str = "params.yaml", backbones: list[str] | None = None) -> list[dict]:
    params = as_params(params)
    params.paths.pretrained_dir.mkdir(parents=True, exist_ok=True)  # the stage's output, even with nothing to train
    names = [b for b in select(params.suite.backbones, backbones, "backbone") if params.backbones[b].pretrain]
    for name in names:  # every checkpoint checked before any is trained
        pretrain_checkpoint(name, params.backbones[name], params.paths)
    pretrain = pretrain_task.with_options(**task_options(params))
    futures = [pretrain.submit(b, params.backbones[b], params.paths, params.flow.gpu_concurrency) for b in names]
    summaries = [future.result() for future in futures]
    computed = [s for s in summaries if s["status"] == "computed"]
    if computed:  # a reused checkpoint was recorded when it was made
        experiment_id = tracking.setup_experiment(
            params.tracking.experiment, mlruns_dir=params.paths.mlruns, tracking_uri=params.tracking.tracking_uri
        )
        for summary in computed:
            tracking.log_pretrain_run(experiment_id, summary, recipe=params.backbones[summary["backbone"]].pretrain)
    return summaries


if __name__ == "__main__":
    run_stage(pretrain_flow, __doc__.splitlines()[0], filters=("backbone",))
