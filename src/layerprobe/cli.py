"""`layerprobe` command: each subcommand runs one step on its own, without Prefect, DVC or MLflow.

    layerprobe pretrain --backbone vit_shapes_d6                         (a backbone with a `pretrain` recipe)
    layerprobe prepare  --dataset digits
    layerprobe extract  --backbone vit_tiny_d6 --dataset digits        (names from params.yaml, or a timm model
    layerprobe train    --backbone vit_tiny_d6 --dataset digits --probe alf      name and a dataset source name)
    layerprobe evaluate --backbone vit_tiny_d6 --dataset digits --probe alf
    layerprobe predict  --probe probes/vit_tiny_d6/digits/alf/seed-0 --images a.png b.png
    layerprobe run      [--pool gpu]     (the whole pipeline, units on a Prefect work pool, then `dvc commit`)
    layerprobe plan     --params params.paper.yaml
    layerprobe ui       [--port 5000]    (serve the MLflow store, print and open the experiment's runs page)
    layerprobe list     probes|sources|backbones|datasets
    layerprobe verify   [PATH ...]       (re-hash every output file its marker lists, as `git fsck`)

Outputs go where the pipeline puts them (paths: in params.yaml), so a CLI step and `dvc repro` share their work.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import sys
import traceback
from pathlib import Path

from layerprobe.config import (
    TAPS,
    BackboneConfig,
    DatasetConfig,
    EvaluateConfig,
    ExtractConfig,
    ParamsError,
    PathsConfig,
    PrepareConfig,
    ProbeConfig,
    TrainConfig,
    check_device,
    check_name,
)
from layerprobe.params import Params, load_params

TENSOR_COMMANDS = {"pretrain", "prepare", "extract", "train", "evaluate", "predict", "plan"}
TRACEBACK_ENV = "LAYERPROBE_TRACEBACK"  # set to 1 (as --traceback does) to see the whole traceback of an error


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # a bad value is one line from argparse, before anything runs
    return guarded(
        f"layerprobe {args.command}",
        lambda: args.run(args),
        compute=args.command in TENSOR_COMMANDS,
        show_traceback=args.traceback,
    )


def guarded(name: str, call, *, compute: bool, show_traceback: bool) -> int:
    """The one exception boundary (the CLI's and the project pipeline's entry): whatever `call` raises is one line
    `<name>: error: ...` and a non-zero exit (2: bad input or a failing file, 1: anything else), unless
    `show_traceback` (--traceback) or LAYERPROBE_TRACEBACK=1 asks for all of it."""
    try:
        if compute:  # importing torch costs seconds that `verify`, `ui`, `list` need not pay
            from layerprobe.device import flush_denormals

            flush_denormals()  # before any worker thread starts
        return call()
    except KeyboardInterrupt:  # finished units keep their markers; `layerprobe run` has cancelled what it submitted
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the boundary: every class becomes one line
        if show_traceback or os.environ.get(TRACEBACK_ENV, "0") not in ("", "0"):
            traceback.print_exc()
        else:
            print(f"{name}: error: {describe_error(error)}", file=sys.stderr)
        return 2 if isinstance(error, (ValueError, OSError)) else 1


def describe_error(error: BaseException) -> str:
    """One line for a person: our own errors say what is wrong already; an OS error names its path and errno
    (ENOSPC, EACCES, ...); anything else is named by its class, since it is likely a bug."""
    if isinstance(error, OSError) and error.strerror and error.errno is not None:
        where = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
        code = errno.errorcode.get(error.errno, str(error.errno))
        text = f"{where}: {error.strerror} ({code})" if where else f"{error.strerror} ({code})"
    elif isinstance(error, (ValueError, OSError)):
        text = str(error)
    elif isinstance(error, MemoryError):
        text = f"out of memory{f' ({error})' if str(error) else ''}: use smaller batches or a larger machine"
    else:
        text = f"{type(error).__name__}: {error} (unexpected: --traceback shows where)"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors in the same one line as every other error (the usage itself is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _port(text: str) -> int:
    port = _integer(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {text!r}")
    return port


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _device(text: str) -> str:
    """auto, cpu, cuda[:n], and CUDA present when asked for: a wrong device fails before any model is built."""
    try:
        check_device("device", text)
        from layerprobe.device import resolve_device

        resolve_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"img_size\": 32}}', got {text!r}")
    return value


def _name(text: str) -> str:
    """A backbone, dataset or probe name: it becomes a folder of every output."""
    try:
        check_name("name", text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="layerprobe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = _command(
        commands, "pretrain", "train a backbone from scratch on its params `pretrain` recipe", run_pretrain
    )
    pretrain.add_argument(
        "--backbone", required=True, type=_name, help="a backbones: name from params with a `pretrain` recipe"
    )
    pretrain.add_argument("--no-progress", action="store_true")

    prepare = _command(commands, "prepare", "materialise a dataset's train/val/test splits", run_prepare)
    _dataset_args(prepare)

    extract = _command(
        commands, "extract", "extract per-layer cls/ap features of every block into a cache", run_extract
    )
    _backbone_args(extract)
    _dataset_args(extract)
    extract.add_argument("--tap", choices=TAPS, help="tap point (default: params extract.tap)")
    extract.add_argument("--batch-size", type=_positive_int)
    extract.add_argument("--num-workers", type=_integer)
    extract.add_argument("--device", type=_device, help="cpu, cuda or auto")
    out_help = (
        "cache folder, new or a cache (default: paths.features/<backbone>/<dataset>); its lock and, without "
        "a params file, the prepared dataset go beside it"
    )
    extract.add_argument("--out", type=Path, help=out_help)
    extract.add_argument(
        "--final-patch-tokens",
        action="store_true",
        default=None,
        help="also cache the final layer's patch tokens (for attentive_last_all_tokens)",
    )
    extract.add_argument("--no-progress", action="store_true")

    train = _command(
        commands, "train", "sweep a probe on cached features and save the best (refit on train+val)", run_train
    )
    train.add_argument("--backbone", required=True, type=_name)
    train.add_argument("--dataset", required=True, type=_name)
    train.add_argument("--probe", required=True, type=_name, help="alf, linear_last_cls, ... (layerprobe list probes)")
    train.add_argument("--lr", type=float, action="append", help="learning rate(s) to sweep (repeatable)")
    train.add_argument("--weight-decay", type=float, action="append", help="weight decay(s) to sweep (repeatable)")
    train.add_argument("--min-steps", type=_integer)
    train.add_argument("--device", type=_device)

    evaluate = _command(
        commands, "evaluate", "score a trained probe on test: metrics, heatmap, confusion", run_evaluate
    )
    evaluate.add_argument("--backbone", required=True, type=_name)
    evaluate.add_argument("--dataset", required=True, type=_name)
    evaluate.add_argument("--probe", required=True, type=_name)

    predict = _command(commands, "predict", "classify image files with a saved probe and its backbone", run_predict)
    predict.add_argument(
        "--probe", type=Path, required=True, help="a saved probe folder (probe.json + probe.safetensors)"
    )
    predict.add_argument("--images", type=Path, nargs="+", required=True)
    predict.add_argument("--device", type=_device, default="cpu")

    run = _command(
        commands,
        "run",
        "the whole pipeline (pretrain, every backbone x dataset unit, evaluate, report), in process or on a Prefect "
        "work pool, then `dvc commit` so DVC records the outputs",
        run_pipeline,
    )
    run.add_argument("--pool", help="Prefect work pool for the units (default: params flow.work_pool; null: here)")
    run.add_argument("--no-commit", action="store_true", help="leave dvc.lock as it is")

    plan = _command(
        commands,
        "plan",
        "list every task with cache sizes and what it costs in time (measured on this machine); checks disk space",
        run_plan,
    )
    plan.add_argument(
        "--device", choices=["cpu", "cuda"], help="device to price for (default: the calibration file's, else cpu)"
    )
    plan.add_argument(
        "--calibration",
        type=Path,
        help="timings (JSON) to read and to add to (default: <paths.results>/plan/calibration-<device>.json); "
        "another machine's file prices the study for its device",
    )
    plan.add_argument("--workers", type=_positive_int, default=1, help="also give the wall time with this many workers")
    plan.add_argument(
        "--images-per-second",
        type=_positive_float,
        help="price extraction from this ViT-B/16@224 rate, scaled by each backbone's FLOPs, instead of timing a "
        "forward of each backbone",
    )
    plan.add_argument("--tasks", action="store_true", help="also give every cache's and every task's row")
    plan.add_argument("--json", type=Path, help="also write the estimate's figures to this file")

    ui = _command(
        commands,
        "ui",
        "serve the MLflow UI on the project's store (`mlflow server`; or use `tracking.tracking_uri` when it is a "
        "server) and print and open the experiment's runs page",
        run_ui,
    )
    ui.add_argument("--host", default="127.0.0.1", help="interface to serve on (default: 127.0.0.1)")
    ui.add_argument("--port", type=_port, default=5000, help="port to serve on (default: 5000)")
    ui.add_argument("--no-browser", action="store_true", help="only print the URL")

    listing = _command(commands, "list", "list registered probes or dataset sources, or the params' names", run_list)
    listing.add_argument("what", choices=["probes", "sources", "backbones", "datasets"])

    verify = _command(
        commands,
        "verify",
        "re-hash every file the outputs' markers list and name any that differ (as `git fsck`); exit status 1 if any",
        run_verify,
    )
    verify.add_argument(
        "path",
        type=Path,
        nargs="*",
        help="output folders or markers (default: the params' prepared data, features, probes, results and "
        "pretrained checkpoints)",
    )
    return parser


def _command(commands, name: str, help_text: str, run) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help_text, description=help_text)
    command.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    traceback_help = f"show an error's whole traceback, not one line (or set {TRACEBACK_ENV}=1)"
    command.add_argument("--traceback", action="store_true", help=traceback_help)
    command.set_defaults(run=run)
    return command


def _backbone_args(parser: argparse.ArgumentParser) -> None:
    backbone_help = "a backbones: name from params, or any timm model name"
    parser.add_argument("--backbone", required=True, type=_name, help=backbone_help)
    parser.add_argument("--pretrained", action="store_true", help="timm model name only: load hub weights")
    parser.add_argument("--checkpoint", help="timm model name only: a local weights file")
    parser.add_argument("--model-kwargs", type=_json_object, default=None, help="JSON, e.g. '{\"img_size\": 32}'")


def _dataset_args(parser: argparse.ArgumentParser) -> None:
    dataset_help = "a datasets: name from params, or a dataset source name"
    parser.add_argument("--dataset", required=True, type=_name, help=dataset_help)
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
    from layerprobe.backbone import check_model_name

    check_model_name(args.backbone)
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
    return BackboneConfig(
        model=args.backbone,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        model_kwargs=args.model_kwargs or {},
    )


def _paths(params: Params | None) -> PathsConfig:
    return params.paths if params else PathsConfig()


def _section(params: Params | None, name: str, default):
    """A params section, or its defaults when the CLI runs without a params file."""
    return getattr(params, name) if params else default


def _overrides(config, **values):
    """`config` with the command-line values that were given (None means "not given")."""
    return dataclasses.replace(config, **{k: v for k, v in values.items() if v is not None})


def run_pretrain(args) -> int:
    from layerprobe.steps.pretrain import pretrain_checkpoint, pretrain_step

    params = load_params(args.params)
    if args.backbone not in params.backbones:
        from layerprobe.registry import unknown_name_error

        raise unknown_name_error("backbone", args.backbone, list(params.backbones))
    backbone = params.backbones[args.backbone]
    checkpoint = pretrain_checkpoint(args.backbone, backbone, params.paths)  # only ever in paths.pretrained_dir
    with _unit_lock(args, params.paths, "pretrain", args.backbone, out=checkpoint):
        summary = pretrain_step(args.backbone, backbone=backbone, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0


def run_prepare(args) -> int:
    params = _params(args)
    print(json.dumps(_prepare(args, params, _paths(params)), indent=2))
    return 0


def _prepare(args, params: Params | None, paths: PathsConfig) -> dict:
    """The prepare step under its dataset's lock, as the flows run it."""
    from layerprobe.steps.prepare import prepare_step

    dataset, prepare = _resolve_dataset(args, params), _section(params, "prepare", PrepareConfig())
    with _unit_lock(args, paths, "prepare", args.dataset):
        return prepare_step(args.dataset, dataset=dataset, prepare=prepare, paths=paths)


def _unit_lock(args, paths: PathsConfig, step: str, *names: str, out: Path | None = None):
    """The step's locks, as the flows hold them (`layerprobe.locks.unit_lock`: its output exclusive, its inputs
    shared): a second run of the unit waits (saying on whom), then reuses."""
    from layerprobe.locks import unit_lock

    def log(line: str) -> None:
        print(f"layerprobe {args.command}: {line}", file=sys.stderr)

    return unit_lock(paths, step, *names, out=out, log=log)


def run_extract(args) -> int:
    from layerprobe.steps.extract import extract_step

    params = _params(args)
    backbone = _resolve_backbone(args, params)  # a wrong model name fails before any data is prepared
    paths = _paths(params)
    if args.out:
        from layerprobe.config import MANIFEST_FILE
        from layerprobe.files import refuse_foreign

        refuse_foreign(args.out, MANIFEST_FILE)  # before the dataset is prepared: a folder of other files is not ours
        if params is None:  # no project here: the dataset it needs goes beside the cache, not into the working folder
            paths = dataclasses.replace(paths, data=str(args.out.parent / f".{args.out.name}.prepared"))
    extract = _overrides(  # validated with the params' values, before any data is prepared
        _section(params, "extract", ExtractConfig()),
        tap=args.tap,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        final_patch_tokens=args.final_patch_tokens,
    )
    _prepare(args, params, paths)  # reused when its fingerprint (source, options, files' contents) matches
    with _unit_lock(args, paths, "extract", args.backbone, args.dataset, out=args.out):
        summary = extract_step(
            args.backbone,
            args.dataset,
            backbone=backbone,
            extract=extract,
            paths=paths,
            out_dir=args.out,
            progress=not args.no_progress,
        )
    print(json.dumps(summary, indent=2))
    return 0


def run_train(args) -> int:
    from layerprobe.steps.train import train_step

    params = _params(args)
    _check_probe(args.probe)
    train = _overrides(
        _section(params, "train", TrainConfig()),
        lrs=args.lr,
        weight_decays=args.weight_decay,
        min_steps=args.min_steps,
        device=args.device,
    )
    paths = _paths(params)
    with _unit_lock(args, paths, "train", args.backbone, args.dataset, args.probe):
        summary = train_step(
            args.backbone,
            args.dataset,
            args.probe,
            probe=params.probe_config(args.probe) if params else ProbeConfig(),
            train=train,
            paths=paths,
        )
    print(json.dumps(summary, indent=2))
    return 0


def _check_probe(name: str) -> None:
    from layerprobe.probes import list_probes
    from layerprobe.registry import unknown_name_error

    if name not in list_probes():
        raise unknown_name_error("probe", name, list_probes())


def run_evaluate(args) -> int:
    from layerprobe.plots import draw_evaluation
    from layerprobe.steps.evaluate import evaluate_step

    params = _params(args)
    _check_probe(args.probe)
    paths = _paths(params)
    with _unit_lock(args, paths, "evaluate", args.backbone, args.dataset, args.probe):
        result = evaluate_step(
            args.backbone,
            args.dataset,
            args.probe,
            evaluate=_section(params, "evaluate", EvaluateConfig()),
            paths=paths,
        )
        figures = draw_evaluation(
            result,
            paths.evaluation_dir(args.backbone, args.dataset, args.probe),
            title=f"{args.backbone} / {args.dataset} / {args.probe}",
            redraw=result["status"] == "computed",
        )
    result["outputs"] = {**result["outputs"], **figures}
    shown = ("probe", "backbone", "dataset", "test", "test_ci", "val_balanced_accuracy", "outputs", "status")
    print(json.dumps({k: result[k] for k in shown}, indent=2))
    return 0


def run_pipeline(args) -> int:
    """Becomes `python -m flows.pipeline` in the project folder: the pipeline is the project's (flows/ beside
    dvc.yaml), so the installed library hands over to it rather than importing it; the same process, so a Ctrl-C
    reaches the pipeline, which cancels what it submitted."""
    if not Path("flows/pipeline.py").is_file():
        where = Path.cwd()
        raise FileNotFoundError(f"`layerprobe run` runs in the project folder (with flows/pipeline.py), not in {where}")
    forwarded = ["--params", str(args.params), *(["--pool", args.pool] if args.pool else [])]
    forwarded += [flag for flag, wanted in (("--no-commit", args.no_commit), ("--traceback", args.traceback)) if wanted]
    os.execv(sys.executable, [sys.executable, "-m", "flows.pipeline", *forwarded])


def run_predict(args) -> int:
    from layerprobe.predict import iter_predictions

    for row in iter_predictions(args.probe, args.images, device=args.device):  # printed batch by batch
        print(f"{row['path']}\t{row['class_name']}\t{row['probability']:.3f}", flush=True)
    return 0


def run_plan(args) -> int:
    import functools

    import torch

    from layerprobe.files import write_json
    from layerprobe.plan import disk_need, estimate, estimate_json, format_plan, load_calibration

    params = load_params(args.params)
    path = args.calibration or Path(params.paths.results) / "plan" / f"calibration-{args.device or 'cpu'}.json"
    calibration = load_calibration(path)
    device = torch.device(args.device or calibration.get("device", {}).get("type") or "cpu")
    save = functools.partial(write_json, path, calibration)  # after each timing: a plan stopped half-way keeps them
    study = estimate(params, calibration, device=device, images_per_second=args.images_per_second, save=save)
    save()  # with the backbones' shapes, which spare a later plan building them
    print(format_plan(params, study, workers=args.workers, list_tasks=args.tasks))
    name = calibration["device"].get("name") or device.type
    print(f"calibration {path} ({name}): {study.measured} timing(s) measured now, {study.reused} read", flush=True)
    if args.json:
        write_json(args.json, estimate_json(study, workers=args.workers))
    _, _, refusal = disk_need(study.caches, Path(params.paths.features), dtype=params.extract.dtype)
    if refusal:  # after the plan, so whoever sizes the disk sees which caches need the space
        raise ValueError(refusal)
    return 0


def run_ui(args) -> int:
    import contextlib
    import signal
    import webbrowser

    from layerprobe.mlflow_ui import find_experiment, mlflow_server, runs_url
    from layerprobe.tracking import resolve_tracking_uri

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` too ends the server (on leaving `mlflow_server`)
    params = load_params(args.params)
    uri = resolve_tracking_uri(params.paths.mlruns, params.tracking.tracking_uri)
    remote = uri.startswith(("http://", "https://"))  # a tracking server: it serves the UI already
    log = Path(params.paths.mlruns) / "mlflow-server.log"
    artifacts = Path(params.paths.mlruns) / "artifacts"
    serving = mlflow_server(uri, artifacts_dir=artifacts, host=args.host, port=args.port, log=log)
    with contextlib.suppress(KeyboardInterrupt), contextlib.nullcontext() if remote else serving as server:
        experiment_id = find_experiment(params.tracking.experiment, uri)
        url = runs_url(uri if remote else f"http://{args.host}:{args.port}", experiment_id)
        print(url, flush=True)
        if experiment_id is None:
            print(f"(no experiment {params.tracking.experiment!r} yet: run the pipeline first)", file=sys.stderr)
        if not args.no_browser:
            webbrowser.open(url)
        if server is not None:
            print(f"serving {uri} (log: {log}); Ctrl-C stops it", file=sys.stderr, flush=True)
            server.wait()
    return 0


def run_verify(args) -> int:
    from layerprobe.verify import verify

    for path in args.path:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    paths = _paths(_params(args))
    default = [paths.data, paths.features, paths.probes, paths.results, paths.pretrained_dir]
    roots = args.path or [Path(p) for p in default if Path(p).exists()]
    if not roots:
        raise FileNotFoundError(f"no outputs here to verify (none of {', '.join(map(str, default))}): give a PATH")

    def progress(line: str) -> None:
        print(f"layerprobe verify: {line}", file=sys.stderr, flush=True)

    return 1 if verify(roots, report=print, progress=progress) else 0


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
