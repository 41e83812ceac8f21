"""Atomic writes, content hashes and walks of files: what every step uses to write outputs a killed run cannot corrupt
and to read its inputs.

The one write path of a step's output folder (feature cache, probe, evaluation, prepared dataset): `begin_output`
gives a staging folder beside the target, the step writes everything there, marker last, and `swap_in` puts it in
place whole. Until then the previous output stays as it was, complete and readable, and a killed run leaves it so.
A step deletes only its own names (its staging folders, the output it replaces), and refuses a target that holds
files that are no layerprobe output. Every writer of one target runs under that target's lock
(`layerprobe.locks`), so a temporary in its staging folder is a dead writer's.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import hashlib
import itertools
import json
import os
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

TMP_SUFFIX = ".tmp"
PAUSE_ENV = "LAYERPROBE_PAUSE"  # `<point>:<flag file>`: stop at that point (`pause_point`), for tests of kills


def canonical_json(value: Any) -> str:
    """Stable JSON text (sorted keys, no spaces) so equal values compare and hash equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)


def stable_hash(value: Any, *, length: int = 16) -> str:
    """Short sha256 of a JSON-able value (sorted keys): cache keys, versions and fingerprints."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks: a few threads hash at once during training, and their
    buffers count against the memory budget (4 MiB blocks took it 2 MiB over in tests/test_selection.py)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tmp_path(path: str | Path) -> Path:
    """A hidden temporary name for `path`, unique to this writer (host, process, random): two writers of one file
    (on two machines sharing a filesystem) never write or rename each other's half-written bytes."""
    path = Path(path)
    host = socket.gethostname().replace(".", "_")
    return path.with_name(f".{path.name}.{host}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def is_temporary(path: Path) -> bool:
    """Whether `path` is a temporary of `tmp_path` (a file never renamed: its writer died or is still writing)."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


def replace_durably(tmp: Path, path: Path) -> Path:
    """Rename `tmp` to `path` once its bytes are on disk: fsync the data, rename, fsync the folder, so a crash of
    the machine leaves the old file or the whole new one, never a name pointing at unwritten blocks."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_folder(path.parent)
    return path


def staging_path(target: str | Path, key: str) -> Path:
    """Where the output `target` computed as `key` is written before it is swapped in: a hidden sibling (one rename
    away, on the same filesystem; ignored by DVC and by `visible_files` as a temporary)."""
    target = Path(target)
    return target.with_name(f".{target.name}.staging-{key}{TMP_SUFFIX}")


def _previous_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.previous{TMP_SUFFIX}")


def refuse_foreign(target: str | Path, marker: str) -> None:
    """Fail in one line when `target` holds files that are not a layerprobe output (one with its completion marker
    `marker`): writing the output there would replace them (a webdataset's `shard-000000.tar`, a user's notes)."""
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"{target} is a file, not an output folder: choose another folder")
    try:
        ours = str(read_json(target / marker).get("format", "")).startswith("layerprobe-")
    except (OSError, ValueError, AttributeError):
        ours = False
    foreign = [] if ours else [path.name for path in itertools.islice(visible_files(target), 4)]  # no full walk
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(
            f"{target} holds files that are not a layerprobe output ({shown}): layerprobe writes only into a new "
            "folder or over its own output; move or delete them, or choose another folder"
        )


def begin_output(target: str | Path, key: str, *, marker: str | None, resume: bool = False) -> Path:
    """The staging folder to write output folder `target` into (computed as `key`, completed by `marker`; None: a
    folder no command points at a user's folder, the report, which has no marker to check).

    With `resume`, what an earlier run computing the same `key` finished there is kept (its temporaries go: their
    writer died, as the caller holds the target's lock) and other keys' staging folders stay, to resume when asked
    again; without, the target's staging folders are removed and this one starts empty.
    """
    target = Path(target)
    if marker is not None:
        refuse_foreign(target, marker)
    previous = _previous_path(target)
    if previous.is_dir():  # a swap was cut between its two renames: the old output comes back or goes for good
        if target.exists():
            shutil.rmtree(previous)
        else:
            os.rename(previous, target)
    staging = staging_path(target, key)
    if not resume:
        for old in target.parent.glob(f".{glob.escape(target.name)}.staging-*{TMP_SUFFIX}"):
            shutil.rmtree(old)
    elif staging.is_dir():
        for path in staging.iterdir():
            if is_temporary(path):
                path.unlink()
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def swap_in(staging: Path, target: str | Path) -> Path:
    """Put the complete output `staging` (from `begin_output`) in place of `target`, then remove the old one.

    Two renames: a crash between them leaves the old output under a hidden name, which the next `begin_output` puts
    back. Readers are not in the gap, they wait on the target's lock, which the writer holds."""
    target = Path(target)
    previous = _previous_path(target)
    if target.exists():
        os.rename(target, previous)
    os.rename(staging, target)
    _fsync_folder(target.parent)
    if previous.exists():
        shutil.rmtree(previous)
    return target


def _fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def pause_point(name: str) -> None:
    """A deterministic stop for tests of kills and concurrent runs: with `LAYERPROBE_PAUSE=<name>:<flag file>` the
    process writes the flag file (its pid) when it reaches point `name` and waits until the file is deleted."""
    point, _, flag = os.environ.get(PAUSE_ENV, "").partition(":")
    if point != name or not flag:
        return
    Path(flag).write_text(str(os.getpid()))
    while Path(flag).exists():
        time.sleep(0.05)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write to a temporary name, then rename durably: a killed run or a crashed machine never leaves half a file
    under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    tmp.write_bytes(data)
    return replace_durably(tmp, path)


def write_json(path: str | Path, value: Any) -> Path:
    """Write JSON atomically (indented, sorted keys); numpy values and paths are converted."""
    text = json.dumps(value, indent=2, sort_keys=True, default=_json_default) + "\n"
    return write_bytes_atomic(path, text.encode())


def write_arrays(path: str | Path, **arrays: np.ndarray) -> Path:
    """Write numeric arrays as one compressed `.npz`, atomically (no pickled objects, so reading needs none)."""
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
    return write_bytes_atomic(path, buffer.getvalue())


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a `write_arrays` file; a corrupt one fails naming its path."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{str(path)!r} is corrupt (not an .npz of arrays: {e})") from e


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a corrupt one fails naming its path."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is corrupt (not JSON: {e})") from e


def visible_files(root: str | Path, problems: list[str] | None = None) -> Iterator[Path]:
    """Every file under `root` with no hidden part (`.DS_Store`, `.git/`) in its path below `root`, sorted by path.

    Symlinked folders and files are followed, as reading them follows them (a class folder that is a link is read, so
    it is listed); a link back to a folder being walked is not entered twice. Entries no reader could read are
    problems, never skipped in silence: see `visible_entries`.
    """
    return (Path(entry.path) for entry in visible_entries(root, problems))


def visible_entries(root: str | Path, problems: list[str] | None = None) -> Iterator[os.DirEntry]:
    """`visible_files` as `os.DirEntry`s: their `path` is a string under `root`, their `stat()` follows links and is
    cached, so a listing of 50,000 files costs little more than their `os.stat` calls.

    A symbolic link loop, a link to nothing, and a folder or file this user may not read are each a line appended to
    `problems`; without a list, all of them are one ValueError once the walk is done (every bad file named at once,
    as bad input, which a flow does not retry). Names that are not UTF-8 are kept as Python decodes them and shown
    with their escapes (`repr`).
    """
    found: list[str] = [] if problems is None else problems

    def walk(folder: str, ancestors: frozenset[tuple[int, int]]) -> Iterator[os.DirEntry]:
        try:
            info = os.stat(folder)
            here = (info.st_dev, info.st_ino)
            if here in ancestors:
                return
            with os.scandir(folder) as scan:
                entries = sorted((entry for entry in scan if not entry.name.startswith(".")), key=lambda e: e.name)
        except OSError as e:
            found.append(f"{folder!r} is a folder that cannot be read ({e.strerror})")
            return
        for entry in entries:
            try:  # is_dir and is_file answer False for a link to nothing, and raise for a loop
                is_dir = entry.is_dir()
                is_file = not is_dir and entry.is_file()
                # World-readable files (most) need no access call: their stat is the one the listing uses anyway.
                readable = is_file and bool(entry.stat().st_mode & stat.S_IROTH or os.access(entry.path, os.R_OK))
            except OSError as e:
                why = "is a symbolic link loop" if e.errno == errno.ELOOP else f"cannot be followed ({e.strerror})"
                found.append(f"{entry.path!r} {why}")
                continue
            if is_dir:
                yield from walk(entry.path, ancestors | {here})
            elif readable:
                yield entry
            elif is_file:
                found.append(f"{entry.path!r} cannot be read (permission denied)")
            elif entry.is_symlink():
                found.append(f"{entry.path!r} is a symbolic link to {os.readlink(entry.path)!r}, which does not exist")
            # anything else (a socket, a fifo, a device) is no file and is not read

    yield from walk(os.fspath(root), frozenset())
    if problems is None and found:
        shown = "; ".join(found[:20]) + (f"; ... and {len(found) - 20} more" if len(found) > 20 else "")
        raise ValueError(
            f"{len(found)} bad file(s) under {os.fspath(root)!r} (fix or remove them; names starting with '.' are "
            f"skipped): {shown}"
        )


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
