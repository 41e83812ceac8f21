"""Evaluate stage: score every trained probe once on test, record it all in MLflow, register the probes.

Run:  python -m flows.evaluate [--params params.yaml] [--backbone NAME ...] [--dataset NAME ...] [--probe NAME ...]
Cost: one forward pass of each probe over the cached test features (seconds) plus MLflow logging (about a second
per probe). Opens one MLflow parent run per invocation with a child run per (backbone, dataset, probe); a failed
child ends FAILED, and runs left RUNNING by a killed process are closed as FAILED on the next start.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.common import load_params, parse_stage_args, select, task_options
from layerprobe import tracking
from layerprobe.config import Params
from layerprobe.workflow import evaluate_step, signature_example, write_json


@task(name="evaluate-probe", task_run_name="evaluate-{backbone}-{dataset}-{probe}")
def evaluate_probe_task(
    backbone: str,
    dataset: str,
    probe: str,
    *,
    probe_dir: str,
    features_dir: str,
    out_dir: str,
    batch_size: int,
    experiment_id: str,
    parent_run_id: str,
    run_params: dict,
    registered_name: str,
) -> dict:
    run_id = tracking.start_run(experiment_id, f"{backbone}/{dataset}/{probe}", parent_run_id=parent_run_id)
    try:
        result = evaluate_step(
            probe_dir=Path(probe_dir), features_dir=Path(features_dir), out_dir=Path(out_dir), batch_size=batch_size
        )
        trained = json.loads((Path(probe_dir) / "train.json").read_text())
        first_seed_dir = Path(trained["seeds"][0]["dir"])
        probe_config = json.loads((first_seed_dir / "probe.json").read_text())
        tracking.log_params(
            run_id,
            {
                **run_params,
                "best": result["best"],
                "probe_spec": probe_config["spec"],
                "num_seeds": result["num_seeds"],
                "training": probe_config.get("training", {}),  # device and matmul precision actually used
            },
        )
        tracking.log_tags(
            run_id,
            {
                "backbone": backbone,
                "dataset": dataset,
                "probe": probe,
                "features.content_hash": trained["features_hash"],
                "dvc.dataset_version": probe_config["provenance"].get("dataset_version", ""),
            },
        )
        metrics = {f"test/{k}": v for k, v in result["test"].items()}
        metrics.update({f"test/{k}_std": v for k, v in result["test_std"].items()})
        metrics["val/balanced_accuracy"] = result["val_balanced_accuracy"]
        tracking.log_metrics(run_id, metrics)
        tracking.log_curves(run_id, _curves(first_seed_dir / "history.json"))
        tracking.log_artifacts(
            run_id,
            {"evaluation": Path(out_dir), "sweep": first_seed_dir / "sweep.json"},
        )
        inputs, outputs = signature_example(probe_dir=first_seed_dir, features_dir=Path(features_dir))
        model_uri, version = tracking.log_probe_model(
            run_id,
            probe_dir=first_seed_dir,
            input_example=inputs,
            output_example=outputs,
            registered_name=registered_name,
        )
        tracking.log_tags(run_id, {"registered_model": registered_name, "registered_version": version})
        tracking.end_run(run_id)
    except BaseException as error:
        tracking.end_run(run_id, failed=True, error=repr(error))
        raise
    return {**result, "run_id": run_id, "registered_model": registered_name, "version": version, "model_uri": model_uri}


def _curves(history_file: Path) -> dict[str, list[tuple[int, float]]]:
    """Training curves of the refit (the probe that was saved, G=1): loss and learning rate per logged step."""
    history = json.loads(history_file.read_text())
    return {
        f"train/{key}": [(int(row["step"]), float(row[key][0])) for row in history]
        for key in ("loss", "lr")
        if history and key in history[0]
    }


def _run_params(params: Params, backbone: str, dataset: str, probe: str) -> dict:
    backbone_config = params.backbones[backbone]
    return {
        "backbone": backbone,
        "model": backbone_config.model,
        "pretrained": backbone_config.pretrained,
        "checkpoint": backbone_config.checkpoint,
        "model_kwargs": backbone_config.model_kwargs,
        "dataset": dataset,
        "dataset_source": params.datasets[dataset].source,
        "probe": probe,
        "tap": params.extract.tap,
        "feature_dtype": params.extract.dtype,
        "train": {
            "lrs": params.train.lrs,
            "weight_decays": params.train.weight_decays,
            "attn_dropouts": params.train.attn_dropouts,
            "epochs": params.train.epochs,
            "min_steps": params.train.min_steps,
            "batch_size": params.train.batch_size,
            "seeds": params.train.seeds,
            "precision": params.train.precision,
        },
    }


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    params_path: str = "params.yaml",
    backbones: list[str] | None = None,
    datasets: list[str] | None = None,
    probes: list[str] | None = None,
) -> dict:
    params = load_params(params_path)
    experiment_id = tracking.setup_experiment(
        params.tracking.experiment, mlruns_dir=params.paths.mlruns, tracking_uri=params.tracking.tracking_uri
    )
    tracking.fail_dangling_runs(experiment_id)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    parent_run_id = tracking.start_run(experiment_id, f"{params.suite.name}-{stamp}", tags={"suite": params.suite.name})
    try:
        tracking.log_params(parent_run_id, {"suite": params.suite.name, "params_file": params_path})
        futures = []
        for backbone in select(params.suite.backbones, backbones, "backbone"):
            for dataset in select(params.suite.datasets, datasets, "dataset"):
                for probe in select(params.suite.probes, probes, "probe"):
                    evaluate = evaluate_probe_task.with_options(**{**task_options(params), "persist_result": False})
                    futures.append(
                        evaluate.submit(
                            backbone,
                            dataset,
                            probe,
                            probe_dir=str(params.paths.probe_dir(backbone, dataset, probe)),
                            features_dir=str(params.paths.features_dir(backbone, dataset)),
                            out_dir=str(params.paths.evaluation_dir(backbone, dataset, probe)),
                            batch_size=params.evaluate.batch_size,
                            experiment_id=experiment_id,
                            parent_run_id=parent_run_id,
                            run_params=_run_params(params, backbone, dataset, probe),
                            registered_name=tracking.registered_model_name(
                                params.evaluate.registry_prefix, dataset, backbone
                            ),
                        )
                    )
        results = [future.result() for future in futures]
        champions = _crown_champions(results, alias=params.evaluate.champion_alias)
        summary = _metrics_summary(results)
        write_json(params.paths.metrics_file, summary)
        write_json(
            params.paths.pipeline_run_file,
            {"parent_run_id": parent_run_id, "experiment_id": experiment_id, "champions": champions},
        )
        tracking.log_metrics(parent_run_id, _flat_metrics(summary))
        tracking.log_artifacts(parent_run_id, {"": params.paths.metrics_file})
        create_markdown_artifact(
            key="layerprobe-evaluation", markdown=_markdown(results, champions), description="Test metrics per probe"
        )
        tracking.end_run(parent_run_id)
    except BaseException as error:
        tracking.end_run(parent_run_id, failed=True, error=repr(error))
        raise
    return summary


def _crown_champions(results: list[dict], *, alias: str) -> dict[str, dict]:
    """The best probe per (dataset, backbone) by validation balanced accuracy (never chosen on test) gets `alias`."""
    best: dict[str, dict] = {}
    for result in results:
        name = result["registered_model"]
        if name not in best or result["val_balanced_accuracy"] > best[name]["val_balanced_accuracy"]:
            best[name] = result
    for name, result in best.items():
        tracking.set_alias(name, alias, result["version"])
    return {name: {"probe": r["probe"], "version": r["version"]} for name, r in best.items()}


def _metrics_summary(results: list[dict]) -> dict:
    summary: dict = {}
    for r in results:
        summary.setdefault(r["backbone"], {}).setdefault(r["dataset"], {})[r["probe"]] = {
            "test_balanced_accuracy": r["test"]["balanced_accuracy"],
            "test_accuracy": r["test"]["accuracy"],
            "val_balanced_accuracy": r["val_balanced_accuracy"],
        }
    return summary


def _flat_metrics(summary: dict) -> dict[str, float]:
    return {
        f"test/balanced_accuracy/{b}/{d}/{p}": v["test_balanced_accuracy"]
        for b, datasets in summary.items()
        for d, probes in datasets.items()
        for p, v in probes.items()
    }


def _markdown(results: list[dict], champions: dict) -> str:
    lines = [
        "| backbone | dataset | probe | test balanced acc | test acc | val balanced acc | version |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        crown = " (champion)" if champions.get(r["registered_model"], {}).get("probe") == r["probe"] else ""
        lines.append(
            f"| {r['backbone']} | {r['dataset']} | {r['probe']} | {100 * r['test']['balanced_accuracy']:.2f} | "
            f"{100 * r['test']['accuracy']:.2f} | {100 * r['val_balanced_accuracy']:.2f} | {r['version']}{crown} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    args = parse_stage_args(__doc__.splitlines()[0], filters=("backbone", "dataset", "probe"))
    evaluate_flow(args.params, backbones=args.backbones, datasets=args.datasets, probes=args.probes)
