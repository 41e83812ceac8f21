"""Train stage: for each (backbone, dataset, probe), sweep the grid on the validation split and refit the best.

Run:  python -m flows.train [--params params.yaml] [--backbone NAME ...] [--dataset NAME ...] [--probe NAME ...]
Cost: the whole lr x wd (x attention-dropout) grid trains at once on cached features; on 2 CPU cores a tiny
backbone's probes take seconds each. A probe whose train.json records the same fingerprint (probe and recipe
params, the feature cache's content hash, the code) is reused, so a rerun trains only what changed.
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
from layerprobe.config import PathsConfig, ProbeConfig, TrainConfig
from layerprobe.probes import TRAINED_FROM
from layerprobe.steps.train import train_step


@task(name="train-probe", task_run_name="train-{backbone_name}-{dataset_name}-{probe_name}")
def train_task(
    backbone_name: str,
    dataset_name: str,
    probe_name: str,
    probe: ProbeConfig,
    train: TrainConfig,
    paths: PathsConfig,
    gpu_limit: int = 1,
) -> dict:
    with unit_lock(paths, "train", backbone_name, dataset_name, probe_name), gpu_slot(train.device, gpu_limit):
        summary = train_step(backbone_name, dataset_name, probe_name, probe=probe, train=train, paths=paths)
    best = ", ".join(f"seed {s['seed']}: {s['best']} val {s['val_balanced_accuracy']:.4f}" for s in summary["seeds"])
    log_step(summary, f"probe {backbone_name}/{dataset_name}/{probe_name} ({best})")
    return summary


@flow(name="train", task_runner=task_runner(), **FLOW_OPTIONS)
def train_flow(
    params: Params | str = "params.yaml",
    backbones: list[str] | None = None,
    datasets: list[str] | None = None,
    probes: list[str] | None = None,
) -> list[dict]:
    params = as_params(params)
    train = train_task.with_options(**task_options(params))
    futures: dict[tuple[str, str, str], object] = {}
    for b in select(params.suite.backbones, backbones, "backbone"):
        for d in select(params.suite.datasets, datasets, "dataset"):
            # A probe trained from another's (alf_truncated from alf's) is submitted after it and waits for it.
            for p in sorted(select(params.suite.probes, probes, "probe"), key=lambda name: name in TRAINED_FROM):
                after = [futures[key] for key in [(b, d, TRAINED_FROM.get(p))] if key in futures]
                futures[b, d, p] = train.submit(
                    b,
                    d,
                    p,
                    params.probe_config(p),
                    params.train,
                    params.paths,
                    params.flow.gpu_concurrency,
                    wait_for=after,
                )
    return [future.result() for future in futures.values()]


if __name__ == "__main__":
    run_stage(train_flow, __doc__.splitlines()[0], filters=("backbone", "dataset", "probe"))
