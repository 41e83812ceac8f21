"""Locks and process checks shared by the pipeline's processes: orchestration, never part of a code key.

Steps do not import this module: whoever runs a step (a flow's task, a CLI command) holds the lock around it, so
editing how locks work never makes a cache look stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from layerprobe.config import PathsConfig


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed) across processes; released even if the holder dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_lock(paths: PathsConfig, dataset: str) -> contextlib.AbstractContextManager[None]:
    """The lock of one dataset's prepare step: units of several backbones (on several machines of a work pool) may
    prepare one dataset at once; one does it, the others wait and then reuse it. A file lock, because the kernel
    drops it with a process that dies holding it."""
    return file_lock(paths.prepared_dir(dataset).parent / f".{dataset}.prepare.lock")


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
