"""MLflow recording at study scale: seconds per probe run before and after batching, a rerun that changed nothing,
and how long the runs page of the resulting store takes to show in a browser.

What: a tiny real project (a tiny ViT, one generated dataset; `linear_last_cls` and `alf` trained and evaluated by the
steps), cloned into N evaluated probes as a study lays them out (9 backbones x 24 datasets x 5 probes = 1080, the
first N): each clone has its own probe weights (the trained ones plus seeded noise), feature cache (the shards
linked, its provenance renamed, so its content hash differs), scores, fingerprint, predictions, figures, sweep and
curves, so the real logging code logs real files, metrics and models.
- before: the logging code of commit BEFORE (`git show`), as its evaluate flow ran it (per probe `signature_example`
  then `log_probe_run`, two tasks at a time, under one parent run), on the first --before probes, into a fresh
  sqlite store; seconds per probe. Both codes first log the same 3 other probes, untimed (one-time costs).
- after: `tracking.record_evaluations` on the same first --before probes into a fresh store (the like-for-like
  figure), then on all N into another; seconds per probe. Then the same call again with nothing changed: its
  seconds and the probe runs, parent runs and registered versions it added (0, 0 and 0).
Every line ends with the machine's 1-minute load average: on a shared machine the figures move with it.
- page: `mlflow server` on the after store (`mlflow_ui.mlflow_server`, as `layerprobe ui`), a fresh headless
  Chromium opens `mlflow_ui.runs_url`; seconds until the runs table shows the parent run, then, after one click on
  its expander, until its first child rows show.
How:  python benchmarks/mlflow_logging.py [--num-probes 1000 --before 100 --keep DIR]
      (needs git, and /usr/bin/chromium + /usr/bin/chromedriver + selenium for the page; skipped without them)
Cost: about 5-8 minutes on 2 CPU cores and ~1 GB of disk (each logged model carries the package's code).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "e89126f"  # the last commit before batched recording (issue 21)
BACKBONES, DATASETS = 9, 24  # the paper's main table: 9 backbones x 20 datasets (+ a few more tasks)
PROBES = ["linear_last_cls", "linear_last_cls_ap", "linear_concat_all", "attentive_last_cls_ap", "alf"]
TINY = {
    "model": "vit_tiny_patch16_224",
    "pretrained": False,
    "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2},
}
DATASET = {"source": "count_shapes", "options": {"num_images": 240, "image_size": 32, "seed": 0}, "group": "structured"}


def study_params(num_probes: int) -> dict:
    """Params naming every cloned backbone and dataset (each a copy of the tiny one), the suite's five probes."""
    backbones = [f"vit_{i}" for i in range(BACKBONES)]
    datasets = [f"task_{i:02d}" for i in range(DATASETS)]
    return {
        "suite": {"name": "study", "backbones": backbones, "datasets": datasets, "probes": PROBES},
        "datasets": {name: DATASET for name in [*datasets, "count"]},
        "backbones": {name: TINY for name in [*backbones, "tiny"]},
        "probes": {"alf": {"num_heads": None}},
        "extract": {"batch_size": 64, "shard_size": 100, "device": "cpu"},
        "train": {
            "lrs": [1e-2],
            "weight_decays": [1e-4],
            "attn_dropouts": [0.0],
            "epochs": 1,
            "min_steps": 20,
            "batch_size": 64,
            "seeds": [0],
            "device": "cpu",
        },
        "tracking": {"experiment": "study"},
    }


def train_templates(project: Path) -> None:
    """Prepare, extract, train and evaluate `linear_last_cls` and `alf` on tiny/count: the files every clone copies."""
    from layerprobe.params import load_params
    from layerprobe.plots import draw_evaluation
    from layerprobe.steps.evaluate import evaluate_step
    from layerprobe.steps.extract import extract_step
    from layerprobe.steps.prepare import prepare_step
    from layerprobe.steps.train import train_step

    params = load_params(project / "params.yaml")
    prepare_step("count", dataset=params.datasets["count"], prepare=params.prepare, paths=params.paths)
    extract_step(
        "tiny", "count", backbone=params.backbones["tiny"], extract=params.extract, paths=params.paths, progress=False
    )
    for probe in ("linear_last_cls", "alf"):
        train_step("tiny", "count", probe, probe=params.probe_config(probe), train=params.train, paths=params.paths)
        evaluation = evaluate_step("tiny", "count", probe, evaluate=params.evaluate, paths=params.paths)
        draw_evaluation(evaluation, params.paths.evaluation_dir("tiny", "count", probe), title=probe)


def clone_study(project: Path, num_probes: int) -> list[tuple[str, str, str]]:
    """N evaluated probes laid out as `layerprobe` writes them, from the two templates; returns their names."""
    from safetensors.numpy import load_file, save_file

    from layerprobe.config import PROBE_WEIGHTS
    from layerprobe.files import read_json, stable_hash, write_json
    from layerprobe.params import load_params

    params = study_params(num_probes)
    paths = load_params(project / "params.yaml").paths
    tasks = [(b, d, p) for b in params["suite"]["backbones"] for d in params["suite"]["datasets"] for p in PROBES]
    tasks = tasks[:num_probes]
    rng = np.random.default_rng(0)
    template_features = project / paths.features_dir("tiny", "count")
    from layerprobe.features import cache_content_hash

    for backbone, dataset, probe in tasks:
        features = project / paths.features_dir(backbone, dataset)
        if not features.is_dir():  # one cache per (backbone, dataset): its shards linked, its provenance renamed
            features.mkdir(parents=True)
            for shard in template_features.glob("*.arrow"):
                (features / shard.name).symlink_to(shard)
            manifest = read_json(template_features / "manifest.json")
            manifest["provenance"] = {**manifest["provenance"], "backbone": backbone, "dataset": dataset}
            write_json(features / "manifest.json", manifest)
        features_hash = cache_content_hash(features)
        template = "alf" if "attentive" in probe or probe == "alf" else "linear_last_cls"
        source_probe, target_probe = (
            project / paths.probe_dir(*names) for names in (("tiny", "count", template), (backbone, dataset, probe))
        )
        shutil.copytree(source_probe, target_probe)
        seed_dir = target_probe / "seed-0"
        weights = load_file(str(seed_dir / PROBE_WEIGHTS))
        save_file(
            {
                k: v + rng.normal(0, 1e-3, v.shape).astype(v.dtype) if v.dtype.kind == "f" else v
                for k, v in weights.items()
            },
            str(seed_dir / PROBE_WEIGHTS),
        )
        trained = read_json(target_probe / "train.json")
        trained["features_hash"] = features_hash
        trained["seeds"][0]["dir"] = str(paths.seed_dir(backbone, dataset, probe, 0))
        write_json(target_probe / "train.json", trained)
        source_eval = project / paths.evaluation_dir("tiny", "count", template)
        target_eval = project / paths.evaluation_dir(backbone, dataset, probe)
        shutil.copytree(source_eval, target_eval)
        evaluation = read_json(target_eval / "metrics.json")
        score, val = rng.uniform(0.2, 0.9), rng.uniform(0.2, 0.9)
        width = rng.uniform(0.02, 0.06)
        evaluation.update(
            backbone=backbone,
            dataset=dataset,
            probe=probe,
            val_balanced_accuracy=val,
            test={"accuracy": score, "balanced_accuracy": score},
        )
        evaluation["test_ci"]["balanced_accuracy"] = [score - width, score + width]
        evaluation["fingerprint"] = {**evaluation["fingerprint"], "value": stable_hash([backbone, dataset, probe])}
        write_json(target_eval / "metrics.json", evaluation)
    return tasks


def before_module():
    """`layerprobe.tracking` as it was at commit BEFORE, loaded beside today's package (its imports still exist)."""
    text = subprocess.run(
        ["git", "show", f"{BEFORE}:src/layerprobe/tracking.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="tracking-before-")) / "tracking_before.py"
    path.write_text(
        text.replace(
            'Path(__file__).with_name("mlflow_model.py")', f"Path({str(ROOT / 'src/layerprobe/mlflow_model.py')!r})"
        ).replace("code_paths=[str(Path(__file__).parent)]", f"code_paths=[{str(ROOT / 'src/layerprobe')!r}]")
    )
    spec = importlib.util.spec_from_file_location("tracking_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log_before(project: Path, tasks: list[tuple[str, str, str]], *, warm_up: list[tuple[str, str, str]]) -> float:
    """The evaluate flow's logging at BEFORE: one parent run, per probe `signature_example` + `log_probe_run`, two
    tasks at a time (its TASK_WORKERS). Returns the seconds `tasks` took, after `warm_up` was logged."""
    from layerprobe.files import read_json
    from layerprobe.params import load_params
    from layerprobe.steps.evaluate import signature_example

    old = before_module()
    params = load_params(project / "params.yaml")
    paths = params.paths
    experiment_id = old.setup_experiment("study", mlruns_dir=project / "mlruns-before")
    parent = old.start_run(experiment_id, "before")

    def log(task: tuple[str, str, str]) -> None:
        backbone, dataset, probe = task
        trained = read_json(paths.train_marker(*task))
        old.log_probe_run(
            experiment_id,
            parent,
            read_json(paths.evaluation_marker(*task)),
            trained=trained,
            run_params=old.run_params(params, *task),
            evaluation_dir=paths.evaluation_dir(*task),
            signature_example=signature_example(
                probe_dir=paths.seed_dir(*task, trained["seeds"][0]["seed"]),
                features_dir=paths.features_dir(backbone, dataset),
            ),
            registered_name=old.registered_model_name("layerprobe", dataset, backbone),
        )

    for task in warm_up:  # one-time costs (imports, MLflow's first requirements check) paid before the clock starts
        log(task)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(log, tasks))
    seconds = time.perf_counter() - start
    old.end_run(parent)
    return seconds


def record(tracking, params, tasks: list[tuple[str, str, str]]) -> tuple[float, dict]:
    """Seconds `tracking.record_evaluations` takes on `tasks` into the (fresh) store of `params` (its migrations,
    made first, not counted), and what it returned."""
    tracking.setup_experiment("study", mlruns_dir=params.paths.mlruns)
    start = time.perf_counter()
    result = tracking.record_evaluations(params, tasks)
    return time.perf_counter() - start, result


def load() -> str:
    """` (load 1.52)`: the 1-minute load average, printed with each figure (the machine may be shared)."""
    return f" (load {os.getloadavg()[0]:.2f})"


def count_store(tracking_uri: str, experiment: str) -> tuple[int, int, int]:
    """(probe runs, parent runs, registered versions) in a store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], max_results=50_000)
    children = sum("mlflow.parentRunId" in r.data.tags for r in runs)
    versions = len(client.search_model_versions("name LIKE 'layerprobe-%'", max_results=50_000))
    return children, len(runs) - children, versions


def page_load(project: Path, experiment: str) -> tuple[float, float] | None:
    """Seconds until a fresh Chromium shows the runs table's parent row, and its first children after one click."""
    if not all(Path(p).is_file() for p in ("/usr/bin/chromium", "/usr/bin/chromedriver")):
        print("page: skipped (no /usr/bin/chromium or /usr/bin/chromedriver)")
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from layerprobe import mlflow_ui

    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    port = 5000 + int(time.time()) % 1000
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
        f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}",
    ):
        options.add_argument(flag)
    driver = None
    serving = mlflow_ui.mlflow_server(
        uri,
        artifacts_dir=project / "mlruns" / "artifacts",
        host="127.0.0.1",
        port=port,
        log=project / "mlflow-server.log",
    )
    try:
        with serving:
            base = f"http://127.0.0.1:{port}"
            driver = webdriver.Chrome(
                service=Service("/usr/bin/chromedriver", log_output=subprocess.DEVNULL), options=options
            )
            url = mlflow_ui.runs_url(base, mlflow_ui.find_experiment(experiment, uri))
            wait = WebDriverWait(driver, 300, poll_frequency=0.05)
            start = time.perf_counter()
            driver.get(url)
            parent = wait.until(lambda d: d.find_elements(By.XPATH, "//a[contains(@href,'/runs/')]"))[0]
            table = time.perf_counter() - start
            expander = parent.find_element(By.XPATH, "./ancestor::*[@role='gridcell'][1]//button")
            start = time.perf_counter()
            expander.click()
            wait.until(lambda d: len(d.find_elements(By.XPATH, "//a[contains(@href,'/runs/')]")) > 2)
            return table, time.perf_counter() - start
    finally:
        if driver is not None:
            driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-probes", type=int, default=1000)
    parser.add_argument("--before", type=int, default=100, help="probes logged by the code at BEFORE (0: skip)")
    parser.add_argument("--keep", type=Path, help="build the project here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    project = args.keep or Path(tempfile.mkdtemp(prefix="mlflow-logging-"))
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(study_params(args.num_probes), sort_keys=False))
    os.chdir(project)  # paths in params and markers are relative to the project, as in a real run
    from layerprobe import tracking
    from layerprobe.params import load_params

    start = time.perf_counter()
    train_templates(project)
    tasks = clone_study(project, args.num_probes)
    print(f"setup: {len(tasks)} evaluated probes in {time.perf_counter() - start:.0f} s ({project})", flush=True)

    if args.before:
        seconds = log_before(project, tasks[: args.before], warm_up=tasks[-3:])
        print(
            f"before ({BEFORE}, {args.before} probes, 2 at a time): {seconds:.1f} s, "
            f"{seconds / args.before:.3f} s per probe{load()}",
            flush=True,
        )
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # `mlflow.set_tracking_uri` exports it: the before store's
    params = load_params(project / "params.yaml")
    if args.before:
        small = dataclasses.replace(params, paths=dataclasses.replace(params.paths, mlruns="mlruns-after-small"))
        record(tracking, small, tasks[-3:])  # the same warm-up, untimed
        seconds, _ = record(tracking, small, tasks[: args.before] + tasks[-3:])  # the warm-up's 3 are referenced
        print(
            f"after ({args.before} probes, the same): {seconds:.1f} s, {seconds / args.before:.3f} s per probe{load()}",
            flush=True,
        )
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    uri = tracking.resolve_tracking_uri(params.paths.mlruns)
    seconds, first = record(tracking, params, tasks)
    print(f"after ({len(tasks)} probes): {seconds:.1f} s, {seconds / len(tasks):.3f} s per probe{load()}", flush=True)
    counts = count_store(uri, "study")
    start = time.perf_counter()
    again = tracking.record_evaluations(params, tasks)
    seconds = time.perf_counter() - start
    added = [b - a for a, b in zip(counts, count_store(uri, "study"), strict=True)]
    print(
        f"rerun with nothing changed: {seconds:.1f} s; probe runs added {added[0]}, parent runs added {added[1]}, "
        f"registered versions added {added[2]} (parent {again['parent']}: {again['parent_run_id']} = "
        f"{first['parent_run_id']}){load()}",
        flush=True,
    )
    loaded = page_load(project, "study")
    if loaded:
        print(
            f"page ({counts[0]} probe runs under one parent): runs table shown {loaded[0]:.1f} s after opening "
            f"the URL; children shown {loaded[1]:.1f} s after expanding the parent{load()}"
        )
    if not args.keep:
        shutil.rmtree(project, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
