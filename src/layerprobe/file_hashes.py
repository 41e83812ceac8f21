"""Files by content: sha256 of every file a step reads (its inputs, and the outputs it reuses: `fingerprint.vouch`),
with a local stat cache so unchanged files are not read again.

An input's identity is its bytes, never its modification time or absolute path: a project copied, cloned, pulled
with DVC or rsynced without `-t` keys its inputs the same, so nothing is recomputed. Hashing 1 TB on every run would
cost more than it saves, so each machine keeps a stat cache (as DVC's state database and git's index do): absolute
path, size, mtime, ctime and inode → sha256 (ctime too, as git's index: no one can set it back, so a rewrite that
restores the old mtime is still seen). A file whose stat is unchanged is not read; a touched file is read once, found
equal, and recorded again. The cache is local to the machine (`$LAYERPROBE_STATE_DIR`, default
`~/.cache/layerprobe`, one file per host, so a home shared by several hosts never mixes their inodes) and decides
nothing: deleting it costs one re-read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from layerprobe.files import sha256_file, visible_entries

STATE_DIR_ENV = "LAYERPROBE_STATE_DIR"
# A file modified this recently may still be being written within the same mtime tick: hash it, but do not record
# it (git's "racily clean" entries), so a later run reads it again instead of trusting a stale hash.
RACY_SECONDS = 2.0
HASH_THREADS = 4  # hashlib releases the GIL: a few files at once keep a network filesystem busy

log = logging.getLogger(__name__)


def state_dir() -> Path:
    """This machine's folder for layerprobe's local state (never part of a project, never a key)."""
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".cache" / "layerprobe").expanduser()


def input_listing(paths: Iterable[str | Path]) -> list[list]:
    """[name, size, sha256] of every file a step reads under `paths` (files or folders), in order.

    Folders list their visible files relative to themselves, following symlinks as the readers do; a path that does
    not exist is listed as [name, None, None], so its later appearance changes the listing. No absolute path and no
    time enters it.
    """
    listing: list[list] = []
    for root in map(Path, paths):
        if root.is_file():
            listing.append([root.name, *file_digests([(os.path.abspath(root), root.stat())])[0]])
        elif root.is_dir():
            top = os.path.abspath(root)
            entries = list(visible_entries(top))
            digests = file_digests([(entry.path, entry.stat()) for entry in entries])
            start = len(top) + 1
            listing += [[entry.path[start:], *digest] for entry, digest in zip(entries, digests, strict=True)]
        else:
            listing.append([root.name, None, None])
    return listing


def file_sha256(path: str | Path) -> str:
    """sha256 of one file's bytes, read only when the stat cache does not know it."""
    return file_digests([(os.path.abspath(path), Path(path).stat())])[0][1]


def file_digests(
    files: list[tuple[str, os.stat_result]], *, reread: bool = False, progress: Callable[[int], None] | None = None
) -> list[tuple[int, str]]:
    """(size, sha256) of each (absolute path, its stat) in order, reading only the files whose (size, mtime, ctime,
    inode) the stat cache has not seen (every file with `reread`); `progress` gets each read file's size."""
    known = {} if reread else _StatCache.lookup([path for path, _ in files])
    hashes: dict[str, str] = {}
    missing = []
    for path, stat in files:
        row = known.get(path)
        if row is not None and row[:4] == _stat_key(stat):
            hashes[path] = row[4]
        else:
            missing.append((path, stat))
    if missing:
        with ThreadPoolExecutor(max_workers=min(HASH_THREADS, len(missing))) as pool:
            for (path, stat), digest in zip(missing, pool.map(sha256_file, [p for p, _ in missing]), strict=True):
                hashes[path] = digest
                if progress is not None:
                    progress(stat.st_size)
        settled = time.time_ns() - int(RACY_SECONDS * 1e9)
        _StatCache.store(
            [(path, *_stat_key(stat), hashes[path]) for path, stat in missing if stat.st_mtime_ns < settled]
        )
    return [(stat.st_size, hashes[path]) for path, stat in files]


def _stat_key(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


class _StatCache:
    """The sqlite table of (path, size, mtime_ns, ctime_ns, inode, sha256); a failure to use it only costs a re-read."""

    @staticmethod
    @contextlib.contextmanager
    def _connect() -> Iterator[sqlite3.Connection]:
        folder = state_dir()
        folder.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(folder / f"stat-cache-{socket.gethostname()}.sqlite", timeout=30)
        try:
            connection.execute("PRAGMA journal_mode=WAL")  # readers never wait on a writer
            connection.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                "ctime_ns INTEGER, inode INTEGER, sha256 TEXT)"
            )
            yield connection
        finally:
            connection.close()

    @classmethod
    def lookup(cls, keys: list[str]) -> dict[str, tuple]:
        if not keys:
            return {}
        wanted = {_text(key): key for key in keys}
        keys = list(wanted)
        try:
            with cls._connect() as connection:
                if len(keys) == 1:
                    rows = connection.execute("SELECT * FROM files WHERE path = ?", keys)
                else:  # one range scan for a folder's files, not a query per file
                    rows = connection.execute("SELECT * FROM files WHERE path BETWEEN ? AND ?", (min(keys), max(keys)))
                return {wanted[row[0]]: row[1:] for row in rows if row[0] in wanted}
        except (sqlite3.Error, OSError) as error:
            log.warning("stat cache unavailable (%s): input files are read again", error)
            return {}

    @classmethod
    def store(cls, rows: list[tuple]) -> None:
        if not rows:
            return
        try:
            with cls._connect() as connection, connection:
                connection.executemany(
                    "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                    [(_text(row[0]), *row[1:]) for row in rows],
                )
        except (sqlite3.Error, OSError) as error:
            log.warning("stat cache not updated (%s): these files will be read again next time", error)


def _text(path: str) -> str:
    """`path` as sqlite can store it: a name that is not UTF-8 (its bytes kept by Python as surrogates) has them
    written as backslash escapes, instead of failing to encode."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
