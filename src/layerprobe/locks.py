"""One writer per unit: file locks held around a step, and process checks. Orchestration, never part of a code key.

Steps do not import this module: whoever runs a step (a flow's task, a CLI command) holds its locks around it through
`unit_lock`, the one place that knows what each step writes and reads. Readers share, writers exclude: a step holds
its output's lock exclusive, so two runs of one unit (a rerun while the last run's units still work, two people on one
project folder, two workers given the same unit) never write one output at once (the second waits, says on whom,
then finds the first's marker and reuses what it wrote), and its inputs' locks shared, so no input is rewritten while
it is read (train reads no cache that extract rebuilds; evaluate reads train.json and the weights of one training).

The lock is `flock(2)` on a hidden file beside the output (`--out DIR`: beside DIR; pretrain: beside its checkpoint):
the kernel releases it when its holder exits or dies, so there is no stale lock to break and no rule that could break a
live holder's. On NFS (v3 with lockd, v4 default mounts) Linux turns `flock` into an NFS byte-range lock, which the
server releases when the holder's lease lapses (a crashed host: about 90 s); Lustre honours it when mounted with `-o
flock` (the default `noflock` refuses it). A filesystem that refuses locks (NFS mounted `nolock`, Lustre without
`flock`, some FUSE mounts) is an error naming the path and the fix, not a silent run without a lock, and never retried
as a transient failure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from layerprobe.config import PathsConfig
from layerprobe.file_hashes import state_dir
from layerprobe.mounts import refuse_host_local_locks

WAIT_REPORT_SECONDS = 30.0  # while waiting on another writer, say so again this often


class LockUnavailableError(ValueError):
    """The filesystem refuses file locks: a permanent problem (a mount option), not worth a retry."""


@contextlib.contextmanager
def file_lock(
    path: str | Path, *, what: str | None = None, log: Callable[[str], None] | None = None, shared: bool = False
) -> Iterator[None]:
    """Hold a lock on `path` (created if needed) across processes and hosts; released even if the holder dies:
    exclusive (a writer), or `shared` with other readers (LOCK_SH). When another process holds it in a way that
    excludes this one, `log` says so (naming `what` and the holder) and this one waits."""
    path = Path(path)
    refuse_host_local_locks(path)  # NFS `nolock`, `local_lock=flock|all`: flock would succeed on this host only
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        if not _try_lock(handle, path, shared=shared):
            holder = _holder(path)
            say = log or (lambda message: None)
            say(f"{what or path}: waiting for {holder}, which {'writes' if shared else 'uses'} it")
            start = time.monotonic()
            while not _try_lock(handle, path, wait=WAIT_REPORT_SECONDS, shared=shared):
                say(f"{what or path}: still waiting for {_holder(path)} ({time.monotonic() - start:.0f} s)")
            say(f"{what or path}: {holder} finished after {time.monotonic() - start:.0f} s; checking what it wrote")
        try:
            _write_holder(handle)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _try_lock(handle, path: Path, *, wait: float = 0.0, shared: bool = False) -> bool:
    """Take the lock without blocking, or within `wait` seconds (polling, so the waiter can report)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        except OSError as error:
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise LockUnavailableError(
                    f"cannot lock {path}: its filesystem refuses file locks ({os.strerror(error.errno)}); mount it "
                    "with locking (NFS: not `nolock`; Lustre: `-o flock`) or put paths.* on a local disk"
                ) from None
            raise


def _write_holder(handle) -> None:
    """Record who holds the lock, for whoever waits on it (the lock itself is the kernel's, not this text)."""
    handle.seek(0)
    handle.truncate()
    handle.write(
        json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
        )
    )
    handle.flush()


def _holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text() or "{}")
        return f"pid {record['pid']} on {record['host']} (since {record['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


# What each step writes (its default target: `out` replaces it, and pretrain's checkpoint always comes as `out`)...
_OUTPUTS: dict[str, Callable[..., Path]] = {
    # a whole unit of `layerprobe run` (backbone x dataset), held by the unit flow around its steps
    "unit": lambda paths, backbone, dataset: paths.features_dir(backbone, dataset),
    "prepare": lambda paths, dataset: paths.prepared_dir(dataset),
    "extract": lambda paths, backbone, dataset: paths.features_dir(backbone, dataset),
    "train": lambda paths, backbone, dataset, probe: paths.probe_dir(backbone, dataset, probe),
    "evaluate": lambda paths, backbone, dataset, probe: paths.evaluation_dir(backbone, dataset, probe),
}
# ... and what it reads, as (the step writing it, its names), downstream before upstream: every process takes its locks
# in the pipeline's order backwards (evaluation, probe, features), so no two wait on each other. Extraction holds no
# lock on its prepared dataset: units of several backbones extract one dataset at once, and the prepare step that each
# of them runs first (to find it prepared) would wait for all the others' extractions.
_INPUTS: dict[str, Callable[..., list[tuple[str, tuple[str, ...]]]]] = {
    "train": lambda backbone, dataset, probe: [("extract", (backbone, dataset))],
    "evaluate": lambda backbone, dataset, probe: [
        ("train", (backbone, dataset, probe)),
        ("extract", (backbone, dataset)),
    ],
}


def unit_lock_path(paths: PathsConfig, step: str, *names: str, out: str | Path | None = None) -> Path:
    """The lock file of a step's output: hidden, beside it (`.<name>.<step>.lock`, which DVC ignores)."""
    if out is None and step not in _OUTPUTS:
        raise ValueError(f"the {step} step's lock needs the path it writes")
    target = Path(out) if out is not None else _OUTPUTS[step](paths, *names)
    return target.parent / f".{target.name}.{step}.lock"


def lock_held(path: Path) -> bool:
    """Whether some process (on any host sharing the filesystem) holds the lock at `path` now."""
    if not path.is_file():
        return False
    with open(path, "a+") as handle:
        if _try_lock(handle, path):
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    return True


@contextlib.contextmanager
def unit_lock(
    paths: PathsConfig,
    step: str,
    *names: str,
    out: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold what one unit of a step needs, for flows and CLI commands alike: its output's lock exclusive (`pretrain`
    (backbone; `out`: its checkpoint), `prepare` (dataset), `extract` (backbone, dataset; `out`: another cache
    folder), `train` and `evaluate` (backbone, dataset, probe)), then its inputs' locks shared (train: the feature
    cache; evaluate: the probe and the cache). A second writer waits; readers wait for a writer, and a writer for its
    readers."""
    with contextlib.ExitStack() as held:
        output = unit_lock_path(paths, step, *names, out=out)
        held.enter_context(file_lock(output, what=f"{step} {'/'.join(names)}", log=log))
        for writer, upstream in _INPUTS.get(step, lambda *_: [])(*names):
            path = unit_lock_path(paths, writer, *upstream)
            held.enter_context(file_lock(path, what=f"{writer} {'/'.join(upstream)}", log=log, shared=True))
        yield


@contextlib.contextmanager
def host_slot(name: str, limit: int, *, log: Callable[[str], None] | None = None) -> Iterator[int]:
    """Hold one of `limit` slots called `name` on this machine (a semaphore of lock files in its state folder);
    yields the slot's number. A holder that dies frees its slot with it, so no slot is ever leaked."""
    folder = state_dir() / "slots" / socket.gethostname()
    folder.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    said = False
    while True:
        for number in range(limit):
            path = folder / f"{stem}-{number}.lock"
            handle = open(path, "a+")  # noqa: SIM115 - held open for as long as the slot is
            if _try_lock(handle, path):
                try:
                    _write_holder(handle)
                    yield number
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    handle.close()
                return
            handle.close()
        if not said and log is not None:
            log(f"slot {name}: all {limit} taken ({_holder(folder / f'{stem}-0.lock')} among them); waiting")
            said = True
        time.sleep(0.2)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
