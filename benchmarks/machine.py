"""What machine a benchmark ran on, for the line above its figures (figures without their CPU mean little)."""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_name() -> str:
    """The CPU's model name as `lscpu` prints it (e.g. "AMD EPYC"), or what Python knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """`<CPU>, <n> cores, Python <version>`."""
    return f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}"
