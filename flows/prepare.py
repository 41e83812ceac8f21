"""Prepare stage: materialise each dataset's train/val/test splits (and small datasets' images) for DVC.

Run:  python -m flows.prepare [--params params.yaml] [--dataset NAME ...]
Cost: seconds for the offline suite (generated images and sklearn digits); for folder/torchvision/wds sources it
reads labels once and writes only the split index, never a copy of the images.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows.common import cached, load_params, parse_stage_args, select
from layerprobe.workflow import prepare_step


@task(name="prepare-dataset", task_run_name="prepare-{name}")
def prepare_dataset_task(
    name: str, *, source: str, options: dict, out_dir: str, val_fraction: float, test_fraction: float, seed: int
) -> dict:
    return prepare_step(
        name,
        source=source,
        options=options,
        out_dir=Path(out_dir),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )


@flow(name="prepare", log_prints=True)
def prepare_flow(params_path: str = "params.yaml", datasets: list[str] | None = None) -> list[dict]:
    params = load_params(params_path)
    futures = []
    for name in select(params.suite.datasets, datasets, "dataset"):
        dataset, out_dir = params.datasets[name], params.paths.prepared_dir(name)
        prepare = cached(prepare_dataset_task, params, output_marker=out_dir / "splits.json")
        futures.append(
            prepare.submit(
                name,
                source=dataset.source,
                options=dataset.options,
                out_dir=str(out_dir),
                val_fraction=params.prepare.val_fraction,
                test_fraction=params.prepare.test_fraction,
                seed=params.prepare.seed,
            )
        )
    return [future.result() for future in futures]


if __name__ == "__main__":
    args = parse_stage_args(__doc__.splitlines()[0], filters=("dataset",))
    prepare_flow(args.params, datasets=args.datasets)
