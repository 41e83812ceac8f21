"""One gate for input: every bad params value and command-line value is one line naming it, before any work;
every exception class is one line at the CLI's boundary; a flow never retries a bad input."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import tiny_params, write_params

from layerprobe import cli
from layerprobe.config import FORMATS

ROOT = Path(__file__).resolve().parents[1]
TRACEBACK_ENV = "LAYERPROBE_TRACEBACK"


def layerprobe(cwd: Path, *argv: str, **env: str) -> subprocess.CompletedProcess:
    """The command as a user runs it, in `cwd`, with this checkout's code."""
    environ = {k: v for k, v in os.environ.items() if k != TRACEBACK_ENV}
    environ.update(PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]), **env)
    return subprocess.run(
        [sys.executable, "-m", "layerprobe.cli", *argv],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"layerprobe {command}: error: "), result.stderr[-3000:]
    return lines[0]


def _set(section: str, key: str, value) -> Callable[[dict], None]:
    def edit(params: dict) -> None:
        params.setdefault(section, {})[key] = value

    return edit


def _serve_cron(params: dict) -> None:
    params["flow"]["serve"] = {"cron": "61 3 * * *"}


def _backbone_named(name: str) -> Callable[[dict], None]:
    def edit(params: dict) -> None:
        params["backbones"][name] = params["backbones"].pop("tiny_vit")
        params["suite"]["backbones"] = [name]

    return edit


def _extra_dataset_named(params: dict) -> None:
    params["datasets"]["sub/count"] = params["datasets"]["count"]


def _two_tasks_on_one_registered_model(params: dict) -> None:
    params["datasets"]["count_shapes"] = params["datasets"]["count"]  # count_shapes x vit, count x shapes_vit
    params["backbones"] = {"vit": params["backbones"]["tiny_vit"], "shapes_vit": params["backbones"]["tiny_vit"]}
    params["suite"].update(datasets=["count_shapes", "count"], backbones=["vit", "shapes_vit"])


# (edit of the tiny params, what the one line must say: the key and the bad value, and the choices for names)
BAD_PARAMS = {
    "negative lr": (_set("train", "lrs", [1e-2, -1e-3]), "train.lrs[1] must be > 0, got -0.001"),
    "NaN lr": (_set("train", "lrs", [float("nan")]), "train.lrs[0] must be a finite number, got nan"),
    "negative weight decay": (_set("train", "weight_decays", [-1e-4]), "train.weight_decays[0] must be >= 0"),
    "infinite min_lr": (_set("train", "min_lr", float("inf")), "train.min_lr must be a finite number, got inf"),
    "duplicate seeds": (_set("train", "seeds", [0, 1, 0]), "train.seeds must be distinct, got [0, 1, 0]"),
    "empty suite.probes": (_set("suite", "probes", []), "suite.probes must name at least one probe"),
    "unknown probe": (
        _set("suite", "probes", ["alf", "alff"]),
        "suite.probes: unknown probe 'alff'. Did you mean 'alf'?",
    ),
    "evaluate batch 0": (_set("evaluate", "batch_size", 0), "evaluate.batch_size must be >= 1, got 0"),
    "negative delay": (_set("flow", "retry_delay_seconds", -1), "flow.retry_delay_seconds must be >= 0, got -1.0"),
    "bad cron": (_serve_cron, "flow.serve.cron '61 3 * * *' is not a cron string"),
    "device typo": (_set("extract", "device", "gpu0"), "extract.device must be auto, cpu or cuda[:n], got 'gpu0'"),
    "empty path": (_set("paths", "data", ""), "paths.data must name a folder, got ''"),
    "name with /": (_extra_dataset_named, "datasets: 'sub/count' cannot be a folder name"),
    "name with ..": (_backbone_named(".."), "backbones: '..' cannot be a folder name"),
    "hidden name": (_backbone_named(".vit"), "backbones: '.vit' cannot be a folder name"),
    "one registered model for two tasks": (
        _two_tasks_on_one_registered_model,
        "tasks count_shapes/vit and count/shapes_vit (dataset/backbone) would share the registered model "
        "'layerprobe-count-shapes-vit'",
    ),
}


def main_error_line(capsys, argv: list[str]) -> str:
    """`layerprobe ARGV` in this process (as tests/test_cli.py runs it): its one stderr line; every exception that
    escaped the boundary would fail the test instead."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:  # argparse's refusals
        code = exit_info.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code not in (0, None), captured.out[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"layerprobe {argv[0]}: error: "), captured.err[-3000:]
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_a_bad_params_value_is_one_line_before_any_work(case, tmp_path, monkeypatch, capsys):
    edit, message = BAD_PARAMS[case]
    params = tiny_params()
    edit(params)
    write_params(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    assert message in main_error_line(capsys, ["prepare", "--dataset", "count"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing prepared, no lock taken


def _manifest_without_shards(tmp_path: Path) -> list[str]:
    cache = tmp_path / "features/vit_tiny_patch16_224/digits"
    cache.mkdir(parents=True)
    manifest = {
        "format": FORMATS["features"],
        "provenance": {},
        "splits": ["train", "val", "test"],
        "num_images": 10,
        "dtype": "float16",
    }
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return ["train", "--backbone", "vit_tiny_patch16_224", "--dataset", "digits", "--probe", "alf"]


# (command line, or a function of the folder making its input and giving it; what the one line must say)
BAD_ARGUMENTS = {
    "port out of range": (["ui", "--port", "99999"], "argument --port: must be a TCP port in 1..65535, got '99999'"),
    "device typo": (["predict", "--probe", "p", "--images", "a.png", "--device", "gpu0"], "got 'gpu0'"),
    "model kwargs not an object": (
        ["extract", "--backbone", "vit_tiny_patch16_224", "--dataset", "digits", "--model-kwargs", "[1]"],
        "argument --model-kwargs: must be a JSON object",
    ),
    "batch size 0": (
        ["extract", "--backbone", "vit_tiny_patch16_224", "--dataset", "digits", "--batch-size", "0"],
        "argument --batch-size: must be >= 1, got '0'",
    ),
    "negative workers": (
        ["extract", "--backbone", "vit_tiny_patch16_224", "--dataset", "digits", "--num-workers", "-1"],
        "extract.num_workers must be >= 0, got -1",
    ),
    "NaN lr": (
        ["train", "--backbone", "b", "--dataset", "d", "--probe", "alf", "--lr", "nan"],
        "train.lrs[0] must be > 0, got nan",
    ),
    "unknown probe": (
        ["train", "--backbone", "b", "--dataset", "d", "--probe", "alff"],
        "unknown probe 'alff'. Did you mean 'alf'?",
    ),
    "name leaving its folder": (
        ["evaluate", "--backbone", "b", "--dataset", "../d", "--probe", "alf"],
        "argument --dataset: name '../d' cannot be a folder name",
    ),
    "zero workers to plan for": (["plan", "--workers", "0"], "argument --workers: must be >= 1, got '0'"),
    "manifest without shards": (_manifest_without_shards, "manifest.json has no 'shards'"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_a_bad_command_line_value_is_one_line_before_any_work(case, tmp_path, monkeypatch, capsys):
    argv, message = BAD_ARGUMENTS[case]
    argv = argv(tmp_path) if callable(argv) else argv
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert message in main_error_line(capsys, argv)
    made = [p for p in sorted(tmp_path.rglob("*")) if p not in before and p.is_file()]
    assert [p for p in made if not p.name.endswith(".lock")] == []  # no prepared data, features, probes or log


def test_an_os_error_names_its_path_and_traceback_shows_on_request(tmp_path):
    params = tiny_params()
    params["paths"]["data"] = "/dev/null/prepared"  # a file where a folder must be: ENOTDIR from the OS
    write_params(tmp_path, params)
    line = one_error_line(layerprobe(tmp_path, "prepare", "--dataset", "count"), "prepare")
    assert "/dev/null/prepared" in line and "(ENOTDIR)" in line
    for extra, env in (["--traceback"], {}), ([], {TRACEBACK_ENV: "1"}):
        shown = layerprobe(tmp_path, "prepare", "--dataset", "count", *extra, **env)
        assert shown.returncode != 0 and "Traceback (most recent call last)" in shown.stderr
        assert "NotADirectoryError" in shown.stderr


def test_every_exception_class_is_one_line_at_the_boundary(monkeypatch, capsys):
    unexpected = " (unexpected: --traceback shows where)"
    for error, expected, code in [
        (
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "features/b/d/shard-000.arrow"),
            "features/b/d/shard-000.arrow: No space left on device (ENOSPC)",
            2,
        ),
        (
            PermissionError(errno.EACCES, os.strerror(errno.EACCES), "probes/b"),
            "probes/b: Permission denied (EACCES)",
            2,
        ),
        (MemoryError(), "out of memory: use smaller batches or a larger machine", 1),
        (KeyError("shards"), "KeyError: 'shards'" + unexpected, 1),
        (TypeError("unhashable type: 'list'"), "TypeError: unhashable type: 'list'" + unexpected, 1),
        (
            RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB"),
            "RuntimeError: CUDA out of memory.; Tried to allocate 2.00 GiB" + unexpected,
            1,
        ),
    ]:

        def fail(args, error=error):
            raise error

        monkeypatch.delenv(TRACEBACK_ENV, raising=False)
        monkeypatch.setattr(cli, "run_list", fail)
        assert cli.main(["list", "probes"]) == code
        assert capsys.readouterr().err.splitlines() == [f"layerprobe list: error: {expected}"]


def test_a_flow_retries_only_what_may_pass_on_its_own():
    from prefect.states import Failed

    from flows.common import is_transient

    for error, retried in [
        (OSError(errno.ELOOP, "Too many levels of symbolic links", "datasets/x/loop"), False),
        (OSError(errno.ENOSPC, "No space left on device", "features/b/d"), False),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "datasets/x"), False),
        (ValueError("datasets/x/a.png: not an image"), False),
        (OSError(errno.EIO, "Input/output error", "features/b/d/shard-000.arrow"), True),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
    ]:
        assert is_transient(None, None, Failed(data=error)) is retried, error
