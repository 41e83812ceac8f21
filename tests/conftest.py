"""Shared test set-up: offline, quiet, and isolated from the user's Prefect and MLflow state."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Set before anything imports prefect or mlflow: telemetry cannot reach out, state stays in a temp folder.
_STATE = tempfile.mkdtemp(prefix="layerprobe-tests-")
atexit.register(shutil.rmtree, _STATE, ignore_errors=True)  # by every process that made one (workers, spawned)
os.environ.setdefault("PREFECT_HOME", os.path.join(_STATE, "prefect"))
if os.environ.get("PYTEST_XDIST_WORKER"):  # each pytest-xdist worker has its own (it inherits the controller's)
    os.environ["PREFECT_HOME"] = os.path.join(_STATE, "prefect")
os.environ["LAYERPROBE_STATE_DIR"] = os.path.join(_STATE, "layerprobe")  # the stat cache of input files
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as layerprobe sets it, for test files that import torch first

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `flows` is a top-level package of the repo, not of the installed library
    sys.path.insert(0, str(ROOT))

TINY_BACKBONE = {
    "model": "vit_tiny_patch16_224",
    "pretrained": False,
    "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2},
}


def tiny_params(**train_overrides) -> dict:
    """A suite small enough for end-to-end tests: 1 tiny ViT x 1 generated dataset x 2 probes, few steps."""
    train = {
        "lrs": [1.0e-2, 1.0e-3],
        "weight_decays": [1.0e-4],
        "attn_dropouts": [0.0],
        "epochs": 1,
        "min_steps": 40,
        "batch_size": 64,
        "seeds": [0],
        "device": "cpu",
    }
    train.update(train_overrides)
    return {
        # dvc.yaml templates its paths from here, so they are spelled out even where they equal the defaults
        "paths": {
            "datasets": "datasets",
            "checkpoints": "checkpoints",
            "data": "data/prepared",
            "features": "features",
            "probes": "probes",
            "results": "results",
            "mlruns": "mlruns",
        },
        "suite": {
            "name": "tiny",
            "backbones": ["tiny_vit"],
            "datasets": ["count"],
            "probes": ["linear_last_cls", "alf"],
        },
        "datasets": {
            "count": {
                "source": "count_shapes",
                "options": {"num_images": 240, "image_size": 32, "seed": 0},
                "group": "structured",
            }
        },
        "backbones": {"tiny_vit": TINY_BACKBONE},
        "probes": {"alf": {"num_heads": None}, "linear_last_cls": {}},
        "prepare": {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 0},
        "extract": {"batch_size": 64, "shard_size": 100, "device": "cpu"},
        "train": train,
        "evaluate": {"registry_prefix": "layerprobe", "champion_alias": "champion"},
        "tracking": {"experiment": "tiny"},
        "flow": {"retries": 1, "retry_delay_seconds": 0.1},
    }


def write_params(directory: Path, data: dict) -> Path:
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole test session (a first start can take over a minute)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def migrated_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow sqlite DB migrated once; tests copy it (migrating per test costs seconds each)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def project_dir(tmp_path, monkeypatch, migrated_mlflow_db) -> Path:
    """An empty project folder as the working directory, with a tiny params.yaml and a ready MLflow store."""
    (tmp_path / "mlruns").mkdir()
    shutil.copy(migrated_mlflow_db, tmp_path / "mlruns" / "mlflow.db")
    write_params(tmp_path, tiny_params())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def run(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def make_dvc_repo(repo: Path, mlflow_db: Path, env: dict) -> Path:
    """A git + DVC repository at `repo` holding this project's pipeline, code and a tiny params.yaml."""
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("flows", "src", "datasets", "checkpoints"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / "mlruns").mkdir()
    shutil.copy(mlflow_db, repo / "mlruns" / "mlflow.db")
    write_params(repo, tiny_params())
    run(["git", "init", "-q"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tiny project"], repo, env)
    return repo


def repo_env(repo: Path, prefect_home: Path) -> dict:
    """The environment a stage of `repo` runs in: the copy's code (which tests edit), offline, quiet."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{repo / 'src'}{os.pathsep}{repo}",  # the copy's code, which the tests edit, is what runs
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    return env


def session_repo_env(repo: Path, prefect_home: Path) -> dict:
    """`repo_env`, its stages on the test session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    return {**repo_env(repo, prefect_home), "PREFECT_API_URL": PREFECT_API_URL.value()}


@pytest.fixture
def dvc_repo(tmp_path, migrated_mlflow_db, prefect_harness) -> tuple[Path, dict]:
    """A git + DVC repository holding this project's pipeline, code and a tiny params.yaml; its stages use the test
    session's Prefect server."""
    repo = tmp_path / "repo"
    env = session_repo_env(repo, tmp_path / "prefect")
    return make_dvc_repo(repo, migrated_mlflow_db, env), env


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `build(folder)` makes, built once per test session by whichever pytest-xdist worker asks first (the
    others wait for it): tests copy it (`copy_project`) and never change it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above every worker's own
    folder, done = root / name, root / f"{name}.built"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way
            build(folder)
            done.touch()
    return folder


# Where MLflow's store names a place by its absolute path: a copy's runs and versions must name the copy's artifacts.
MLFLOW_LOCATIONS = {
    "experiments": ("artifact_location",),
    "runs": ("artifact_uri",),
    "logged_models": ("artifact_location",),
    "model_versions": ("source", "storage_location"),
}


def copy_project(source: Path, target: Path) -> Path:
    """A copy with every file's modification time kept (new paths and inodes), as `cp -a` or `rsync -t` make; its
    MLflow store points at its own artifacts, so what a test records in the copy never lands in `source`."""
    import sqlite3

    shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    database = target / "mlruns" / "mlflow.db"
    if database.is_file():
        moved = (f"{source}/", f"{target}/")
        with contextlib.closing(sqlite3.connect(database)) as store, store:
            for table, columns in MLFLOW_LOCATIONS.items():
                for column in columns:
                    store.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", moved)
    return target


@pytest.fixture
def project(built, tmp_path) -> tuple[Path, dict]:
    """A copy of the module's `built` project (its times kept) and the environment its stages run in."""
    repo = copy_project(built, tmp_path / "repo")
    return repo, session_repo_env(repo, tmp_path / "prefect")


@pytest.fixture
def unpickling_timm(monkeypatch):
    """timm as 1.0.9-1.0.25 load a local `.pth`/`.bin`: `torch.load(weights_only=False)`, full pickle, whatever timm
    is installed; so a test shows that layerprobe never hands timm such a file to load."""
    import timm.models
    import timm.models._builder
    import torch

    def load_state_dict(checkpoint_path, use_ema=True, device="cpu", weights_only=False):
        checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=False)
        return timm.models.clean_state_dict(checkpoint.get("state_dict", checkpoint))

    monkeypatch.setattr(timm.models, "load_state_dict", load_state_dict)
    monkeypatch.setattr(timm.models._builder, "load_state_dict", load_state_dict)


# The suite's longest modules, longest first (measured on 2 cores): with `--dist loadgroup` each goes to whichever
# worker is free, so the two workers end together instead of one running the longest test alone at the end.
LONGEST_FIRST = ("test_work_pool.py", "test_moves.py", "test_pipeline.py", "test_flows.py", "test_finding.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest modules first, then the other slow tests, then the rest; each in its collected order."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        if name in LONGEST_FIRST:
            return LONGEST_FIRST.index(name)
        return len(LONGEST_FIRST) + (0 if item.get_closest_marker("slow") else 1)

    items.sort(key=rank)  # stable: a module's tests keep their order
