"""Does `dvc repro` ever fail at random? N fresh clones of this repository, each running a tiny suite end to end.

What: a run used to fail now and then on Python 3.11 (`SystemError: AST constructor recursion depth mismatch`,
raised while a code fingerprint parsed a module in a task thread while another thread compiled): 4 of 10 fresh-clone
runs failed on a busy machine. Code keys are now read with `tokenize` (no AST objects), so none may fail. Each run:
`git clone` of HEAD into a new folder, a tiny params.yaml (one random-init backbone, digits, two probes), a fresh
Prefect home and stat cache, then `dvc repro`, timed; its output is searched for `SystemError` and tracebacks.
With --busy, two processes spin on both cores for the whole benchmark (the condition the failures were seen in).
How:  python benchmarks/repro_repeat.py [--runs 20] [--busy]
Cost: about a minute per run on 2 CPU cores (twice that with --busy).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def tiny_params() -> dict:
    """The default params narrowed to one random-init backbone, digits and two probes."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["suite"].update(backbones=["vit_tiny_d6"], datasets=["digits"], probes=["linear_last_cls", "alf"])
    return params


def spin() -> None:
    while True:
        pass


def one_run(scratch: Path, commit: str) -> tuple[int, float, str]:
    clone = scratch / "project"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)  # every run of one commit
    (clone / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{clone / 'src'}{os.pathsep}{clone}",  # the clone's code, as a fresh checkout runs it
        "PREFECT_HOME": str(scratch / "prefect"),
        "LAYERPROBE_STATE_DIR": str(scratch / "state"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("PREFECT_API_URL", None)
    start = time.perf_counter()
    result = subprocess.run(["dvc", "repro"], cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
    return result.returncode, time.perf_counter() - start, result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--busy", action="store_true", help="keep both cores busy with two spinning processes")
    args = parser.parse_args()
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(2 if args.busy else 0)]
    for process in spinners:
        process.start()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(
        f"{args.runs} fresh-clone `dvc repro` runs of {head.strip()}, Python {platform.python_version()}, "
        f"{cpu_name()}{', both cores kept busy' if args.busy else ''}",
        flush=True,
    )
    failures = []
    try:
        for number in range(1, args.runs + 1):
            with tempfile.TemporaryDirectory(prefix="layerprobe-repro-") as scratch:
                code, seconds, output = one_run(Path(scratch), head.strip())
            ast_error = "AST constructor" in output or "SystemError" in output
            print(f"run {number:2d}: exit {code}, {seconds:6.1f} s{', SystemError' if ast_error else ''}", flush=True)
            if code or ast_error:
                failures.append(number)
                print("\n".join(output.splitlines()[-15:]), flush=True)
    finally:
        for process in spinners:
            process.terminate()
    print(f"{args.runs - len(failures)} of {args.runs} runs succeeded; failed: {failures or 'none'}")


if __name__ == "__main__":
    main()
