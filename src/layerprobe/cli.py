"""`layerprobe` command: each subcommand runs one step on its own, without Prefect, DVC or MLflow.

    layerprobe prepare  --dataset digits
    layerprobe extract  --backbone vit_tiny_d6 --dataset digits        (names from params.yaml, or a timm model
    layerprobe train    --backbone vit_tiny_d6 --dataset digits --probe alf      name and a dataset source name)
    layerprobe evaluate --backbone vit_tiny_d6 --dataset digits --probe alf
    layerprobe predict  --probe probes/vit_tiny_d6/digits/alf/seed-0 --images a.png b.png
    layerprobe plan     --params params.paper.yaml
    layerprobe list     probes|sources|backbones|datasets

Outputs go where the pipeline puts them (paths: in params.yaml), so a CLI step and `dvc repro` share their work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from layerprobe.config import BackboneConfig, DatasetConfig, Params, ParamsError, load_params


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_flush_denormal(True)  # as layerprobe.train.flush_denormals; before any worker thread starts
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        # Bad input: one line naming what is wrong; the traceback helps nobody who typed a wrong name.
        print(f"layerprobe {args.command}: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerprobe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = _command(commands, "prepare", "materialise a dataset's train/val/test splits", run_prepare)
    _dataset_args(prepare)

    extract = _command(
        commands, "extract", "extract per-layer cls/ap features of every block into a cache", run_extract
    )
    _backbone_args(extract)
    _dataset_args(extract)
    extract.add_argument("--tap", choices=["norm2", "block"], help="tap point (default: params extract.tap)")
    extract.add_argument("--batch-size", type=int)
    extract.add_argument("--num-workers", type=int)
    extract.add_argument("--device", help="cpu, cuda or auto")
    extract.add_argument("--out", type=Path, help="cache folder (default: paths.features/<backbone>/<dataset>)")
    extract.add_argument("--no-progress", action="store_true")

    train = _command(
        commands, "train", "sweep a probe on cached features and save the best (refit on train+val)", run_train
    )
    train.add_argument("--backbone", required=True)
    train.add_argument("--dataset", required=True)
    train.add_argument("--probe", required=True, help="alf, linear_last_cls, ... (layerprobe list probes)")
    train.add_argument("--lr", type=float, action="append", help="learning rate(s) to sweep (repeatable)")
    train.add_argument("--weight-decay", type=float, action="append", help="weight decay(s) to sweep (repeatable)")
    train.add_argument("--min-steps", type=int)
    train.add_argument("--device")

    evaluate = _command(
        commands, "evaluate", "score a trained probe on test: metrics, heatmap, confusion", run_evaluate
    )
    evaluate.add_argument("--backbone", required=True)
    evaluate.add_argument("--dataset", required=True)
    evaluate.add_argument("--probe", required=True)

    predict = _command(commands, "predict", "classify image files with a saved probe and its backbone", run_predict)
    predict.add_argument(
        "--probe", type=Path, required=True, help="a saved probe folder (probe.json + probe.safetensors)"
    )
    predict.add_argument("--images", type=Path, nargs="+", required=True)
    predict.add_argument("--device", default="cpu")

    plan = _command(
        commands, "plan", "list every task with cache sizes and time estimates; checks disk space", run_plan
    )
    plan.add_argument("--images-per-second", type=float, help="skip the device measurement: ViT-B/16@224 images/s")
    plan.add_argument("--device", default="cpu", help="device whose throughput to measure (cpu or cuda)")
    plan.add_argument("--tasks", action="store_true", help="also list every (backbone, dataset, probe) task")

    listing = _command(commands, "list", "list registered probes or dataset sources, or the params' names", run_list)
    listing.add_argument("what", choices=["probes", "sources", "backbones", "datasets"])
    return parser


def _command(commands, name: str, help_text: str, run) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help_text, description=help_text)
    command.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    command.set_defaults(run=run)
    return command


def _backbone_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, help="a backbones: name from params, or any timm model name")
    parser.add_argument("--pretrained", action="store_true", help="timm model name only: load hub weights")
    parser.add_argument("--checkpoint", help="timm model name only: a local weights file")
    parser.add_argument("--model-kwargs", type=json.loads, default=None, help="JSON, e.g. '{\"img_size\": 32}'")


def _dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="a datasets: name from params, or a dataset source name")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="source option (JSON value)")


def _params(args) -> Params | None:
    """The params file if there is one (a CLI step also works in an empty folder, with names given in full)."""
    if args.params.is_file():
        return load_params(args.params)
    if args.params != Path("params.yaml"):
        raise FileNotFoundError(f"params file not found: {args.params}")
    return None


def _resolve_dataset(args, params: Params | None) -> DatasetConfig:
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if params and args.dataset in params.datasets:
        config = params.datasets[args.dataset]
        return DatasetConfig(source=config.source, options={**config.options, **options}, group=config.group)
    from layerprobe.data import list_sources

    if args.dataset not in list_sources():
        from layerprobe.registry import unknown_name_error

        known = list_sources() + (list(params.datasets) if params else [])
        raise unknown_name_error("dataset", args.dataset, known)
    return DatasetConfig(source=args.dataset, options=options)


def _resolve_backbone(args, params: Params | None) -> BackboneConfig:
    if params and args.backbone in params.backbones:
        return params.backbones[args.backbone]
    return BackboneConfig(
        model=args.backbone,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        model_kwargs=args.model_kwargs or {},
    )


def _paths(params: Params | None):
    from layerprobe.config import PathsConfig

    return params.paths if params else PathsConfig()


def run_prepare(args) -> int:
    from layerprobe.config import PrepareConfig
    from layerprobe.workflow import prepare_step

    params = _params(args)
    dataset = _resolve_dataset(args, params)
    prepare = params.prepare if params else PrepareConfig()
    summary = prepare_step(
        args.dataset,
        source=dataset.source,
        options=dataset.options,
        out_dir=_paths(params).prepared_dir(args.dataset),
        val_fraction=prepare.val_fraction,
        test_fraction=prepare.test_fraction,
        seed=prepare.seed,
    )
    print(json.dumps(summary, indent=2))
    return 0


def run_extract(args) -> int:
    from layerprobe.config import ExtractConfig
    from layerprobe.workflow import extract_step

    params = _params(args)
    backbone = _resolve_backbone(args, params)
    paths = _paths(params)
    prepared_dir = paths.prepared_dir(args.dataset)
    if not (prepared_dir / "splits.json").is_file():
        run_prepare(args)
    extract = params.extract if params else ExtractConfig()
    summary = extract_step(
        args.backbone,
        args.dataset,
        prepared_dir=prepared_dir,
        out_dir=args.out or paths.features_dir(args.backbone, args.dataset),
        model=backbone.model,
        pretrained=backbone.pretrained,
        checkpoint=backbone.checkpoint,
        model_kwargs=dict(backbone.model_kwargs),
        crop_pct=backbone.crop_pct,
        final_projection=backbone.final_projection,
        tap=args.tap or extract.tap,
        dtype=extract.dtype,
        batch_size=args.batch_size or extract.batch_size,
        num_workers=extract.num_workers if args.num_workers is None else args.num_workers,
        shard_size=extract.shard_size,
        device=args.device or extract.device,
        progress=not args.no_progress,
    )
    print(json.dumps(summary, indent=2))
    return 0


def run_train(args) -> int:
    from layerprobe.config import TrainConfig
    from layerprobe.workflow import train_step

    params = _params(args)
    config = params.train if params else TrainConfig(lrs=[1e-2, 1e-3], weight_decays=[1e-4, 1e-2])
    paths = _paths(params)
    settings = config.recipe()
    settings["min_steps"] = args.min_steps or config.min_steps
    settings["device"] = args.device or config.device
    summary = train_step(
        args.probe,
        features_dir=paths.features_dir(args.backbone, args.dataset),
        out_dir=paths.probe_dir(args.backbone, args.dataset, args.probe),
        probe_overrides=params.probe_overrides(args.probe) if params else {},
        lrs=args.lr or config.lrs,
        weight_decays=args.weight_decay or config.weight_decays,
        attn_dropouts=config.attn_dropouts,
        seeds=config.seeds,
        settings=settings,
    )
    print(json.dumps(summary, indent=2))
    return 0


def run_evaluate(args) -> int:
    from layerprobe.workflow import evaluate_step

    paths = _paths(_params(args))
    result = evaluate_step(
        probe_dir=paths.probe_dir(args.backbone, args.dataset, args.probe),
        features_dir=paths.features_dir(args.backbone, args.dataset),
        out_dir=paths.evaluation_dir(args.backbone, args.dataset, args.probe),
    )
    print(
        json.dumps(
            {k: result[k] for k in ("probe", "backbone", "dataset", "test", "val_balanced_accuracy", "outputs")},
            indent=2,
        )
    )
    return 0


def run_predict(args) -> int:
    from layerprobe.predict import predict_images

    for row in predict_images(args.probe, args.images, device=args.device):
        print(f"{row['path']}\t{row['class_name']}\t{row['probability']:.3f}")
    return 0


def run_plan(args) -> int:
    from layerprobe.plan import check_disk, format_plan, measure_gflops_per_second, plan_suite

    params = load_params(args.params)
    if args.images_per_second:
        from layerprobe.config import BackboneConfig as _Backbone
        from layerprobe.plan import backbone_shape

        reference = backbone_shape(_Backbone(model="vit_base_patch16_224"))
        gflops_per_second = args.images_per_second * reference.gflops_per_image
    else:
        gflops_per_second = measure_gflops_per_second(args.device)
    plans = plan_suite(params, gflops_per_second=gflops_per_second)
    needed, free = check_disk(plans, Path(params.paths.features), dtype=params.extract.dtype)
    print(
        format_plan(params, plans, needed=needed, free=free, gflops_per_second=gflops_per_second, list_tasks=args.tasks)
    )
    return 0


def run_list(args) -> int:
    if args.what == "probes":
        from layerprobe.probes import list_probes

        names = list_probes()
    elif args.what == "sources":
        from layerprobe.data import list_sources

        names = list_sources()
    else:
        params = load_params(args.params)
        names = list(params.backbones if args.what == "backbones" else params.datasets)
    print("\n".join(names))
    return 0


__all__ = ["main", "build_parser", "ParamsError"]

if __name__ == "__main__":
    raise SystemExit(main())
