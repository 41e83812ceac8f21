"""Train stage: for each (backbone, dataset, probe), sweep the grid on the validation split and refit the best.

Run:  python -m flows.train [--params params.yaml] [--backbone NAME ...] [--dataset NAME ...] [--probe NAME ...]
Cost: the whole lr x wd (x attention-dropout) grid trains at once on cached features; on 2 CPU cores a tiny
backbone's probes take seconds each. Finished probes are cached (keyed on the feature cache's content hash and
the probe's settings), so a rerun after a kill, or after changing one probe, trains only what changed.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.common import cached, gpu_slot, load_params, parse_stage_args, select
from layerprobe.features import cache_content_hash
from layerprobe.workflow import train_step


@task(name="train-probe", task_run_name="train-{backbone}-{dataset}-{probe}")
def train_probe_task(
    backbone: str,
    dataset: str,
    probe: str,
    *,
    features_dir: str,
    features_hash: str,
    out_dir: str,
    probe_overrides: dict,
    grid: dict,
    seeds: list[int],
    settings: dict,
    gpu_limit: int,
) -> dict:
    # backbone/dataset/features_hash only name the run and key the cache; the features are read from features_dir.
    with gpu_slot(settings["device"], gpu_limit):
        summary = train_step(
            probe,
            features_dir=Path(features_dir),
            out_dir=Path(out_dir),
            probe_overrides=probe_overrides,
            seeds=seeds,
            settings=settings,
            **grid,
        )
    for seed in summary["seeds"]:
        get_run_logger().info(
            "%s/%s/%s seed %d: best %s, val balanced accuracy %.4f",
            backbone,
            dataset,
            probe,
            seed["seed"],
            seed["best"],
            seed["val_balanced_accuracy"],
        )
    return summary


@flow(name="train", log_prints=True)
def train_flow(
    params_path: str = "params.yaml",
    backbones: list[str] | None = None,
    datasets: list[str] | None = None,
    probes: list[str] | None = None,
) -> list[dict]:
    params = load_params(params_path)
    grid = {
        "lrs": params.train.lrs,
        "weight_decays": params.train.weight_decays,
        "attn_dropouts": params.train.attn_dropouts,
    }
    futures = []
    for backbone in select(params.suite.backbones, backbones, "backbone"):
        for dataset in select(params.suite.datasets, datasets, "dataset"):
            features_dir = params.paths.features_dir(backbone, dataset)
            features_hash = cache_content_hash(features_dir)  # fails here, naming the dir, if extraction is missing
            for probe in select(params.suite.probes, probes, "probe"):
                out_dir = params.paths.probe_dir(backbone, dataset, probe)
                train = cached(train_probe_task, params, output_marker=out_dir / "train.json")
                futures.append(
                    train.submit(
                        backbone,
                        dataset,
                        probe,
                        features_dir=str(features_dir),
                        features_hash=features_hash,
                        out_dir=str(out_dir),
                        probe_overrides=params.probe_overrides(probe),
                        grid=grid,
                        seeds=params.train.seeds,
                        settings=params.train.recipe(),
                        gpu_limit=params.flow.gpu_concurrency,
                    )
                )
    return [future.result() for future in futures]


if __name__ == "__main__":
    args = parse_stage_args(__doc__.splitlines()[0], filters=("backbone", "dataset", "probe"))
    train_flow(args.params, backbones=args.backbones, datasets=args.datasets, probes=args.probes)
