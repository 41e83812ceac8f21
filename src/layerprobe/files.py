"""Atomic writes, content hashes and walks of files: what every step uses to write outputs a killed run cannot corrupt
and to read its inputs."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import secrets
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

TMP_SUFFIX = ".tmp"


def canonical_json(value: Any) -> str:
    """Stable JSON text (sorted keys, no spaces) so equal values compare and hash equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)


def stable_hash(value: Any, *, length: int = 16) -> str:
    """Short sha256 of a JSON-able value (sorted keys): cache keys, versions and fingerprints."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
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
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


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
