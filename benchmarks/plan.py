"""`layerprobe plan`'s estimate of the default suite against the default suite itself, per stage and in total.

What: a copy of this project's working tree (tracked and untracked files, no outputs) in a temporary folder, with its
own PREFECT_HOME, MLflow store and DVC state; there, `layerprobe plan --json` (a fresh calibration: every figure
measured on this machine now), then `dvc repro` of params.yaml from empty caches with every output line time-stamped.
A stage's measured time runs from its "Running stage" line to the next one (the last to dvc's exit), so it holds
what the estimate holds: process start-up, Prefect, the work, MLflow, DVC's own checks. Prints, per stage and in
total, plan's estimate, the measured time and measured / estimate (target 0.75-1.33 for the train stage and for
the whole run), with the machine and its load average before and after.
How:  python benchmarks/plan.py [--keep DIR]
Cost: the default suite's run (5-12 minutes on 2 cores, depending on their load) and plan's measurements (~20 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"Running stage '([\w-]+)'")
TARGET = (0.75, 1.33)


def copy_project(destination: Path) -> None:
    """The working tree's files that git sees (tracked and untracked, not ignored), committed to a fresh git repo
    there, as DVC needs one."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in listed.splitlines():
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    for command in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "copy"],
    ):
        subprocess.run(command, cwd=destination, check=True, capture_output=True)


def timed_lines(command: list[str], *, cwd: Path, env: dict, log: Path) -> tuple[list[tuple[float, str]], int]:
    """Run `command`, time-stamping each output line (seconds from its start); returns the lines and its exit code."""
    start = time.perf_counter()
    lines = []
    with log.open("w") as sink:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in process.stdout:
            stamp = time.perf_counter() - start
            lines.append((stamp, line.rstrip()))
            sink.write(f"{stamp:9.2f} {line}")
        code = process.wait()
    lines.append((time.perf_counter() - start, "<exit>"))
    return lines, code


def stage_seconds(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Each stage's wall time: from its "Running stage" line to the next stage's, the last one to the exit."""
    starts = [(stamp, match.group(1)) for stamp, line in lines if (match := STAGE_LINE.search(line))]
    ends = [stamp for stamp, _ in starts[1:]] + [lines[-1][0]]
    return {name: end - begin for (begin, name), end in zip(starts, ends, strict=True)}


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").is_file() else "?"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def verdict(ratio: float) -> str:
    return "met" if TARGET[0] <= ratio <= TARGET[1] else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()

    project = args.keep or Path(tempfile.mkdtemp(prefix="layerprobe-plan-bench-"))
    project.mkdir(parents=True, exist_ok=True)
    copy_project(project)
    env = {
        **os.environ,
        "PREFECT_HOME": str(project / ".prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PYTHONPATH": os.pathsep.join([str(project / "src"), str(project)]),
    }
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    before = load_average()
    try:
        start = time.perf_counter()
        planned = subprocess.run(
            [
                sys.executable,
                "-m",
                "layerprobe.cli",
                "plan",
                "--json",
                "plan.json",
                "--calibration",
                "calibration.json",
            ],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
        )
        plan_seconds = time.perf_counter() - start
        if planned.returncode:
            raise RuntimeError(f"plan failed:\n{planned.stderr[-3000:]}")
        estimate = json.loads((project / "plan.json").read_text())
        lines, code = timed_lines(["dvc", "repro"], cwd=project, env=env, log=project / "repro.log")
        if code:
            tail = "\n".join(line for _, line in lines[-40:])
            raise RuntimeError(f"dvc repro failed (log: {project / 'repro.log'}):\n{tail}")
        after = load_average()
    finally:
        if args.keep is None:
            shutil.rmtree(project, ignore_errors=True)

    measured = stage_seconds(lines)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; load average {before} before, {after} after")
    print(
        f"plan (calibrated now, {plan_seconds:.0f} s): "
        + "; ".join(line for line in planned.stdout.splitlines() if line.startswith(("study:", "dvc repro")))
    )
    print("| stage | plan's estimate | measured | measured / estimate |")
    print("|---|---:|---:|---:|")
    for stage, seconds in measured.items():
        planned_seconds = estimate["stages"].get(stage)
        ratio = f"{seconds / planned_seconds:.2f}" if planned_seconds else "-"
        shown = f"{planned_seconds:.1f} s" if planned_seconds is not None else "-"
        print(f"| {stage} | {shown} | {seconds:.1f} s | {ratio} |")
    total, planned_total = lines[-1][0], estimate["total"]
    print(f"| total (dvc repro) | {planned_total:.1f} s | {total:.1f} s | {total / planned_total:.2f} |")
    train_ratio = measured.get("train", 0.0) / estimate["stages"]["train"]
    print(
        f"train stage: measured / estimate {train_ratio:.2f} (target {TARGET[0]}-{TARGET[1]}: {verdict(train_ratio)})"
    )
    print(
        f"whole run: measured / estimate {total / planned_total:.2f} (target {TARGET[0]}-{TARGET[1]}: "
        f"{verdict(total / planned_total)})"
    )


if __name__ == "__main__":
    main()
