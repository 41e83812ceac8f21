"""Mounts whose file locks are local to each host, found in the mount table before a lock is taken.

On NFS mounted `nolock` or `local_lock=flock|all`, and on Lustre mounted `localflock`, `flock(2)` succeeds but only
this host sees the lock: two hosts would both hold a unit's lock, write one output at once and sweep each other's
temporaries. Nothing fails to warn of it, so the mount table is read instead.
"""

from __future__ import annotations

import os
from pathlib import Path

MOUNT_TABLE_ENV = "LAYERPROBE_MOUNT_TABLE"  # another mount table to read (tests; a container's view of the host's)
MOUNT_TABLE = "/proc/self/mountinfo"


def host_local_lock_option(fstype: str, options: set[str]) -> str | None:
    """The mount option that makes `flock` host-local on a filesystem of this type, or None."""
    if fstype.startswith("nfs"):
        for option in ("nolock", "local_lock=flock", "local_lock=all"):
            if option in options:
                return option
    if fstype == "lustre" and "localflock" in options:
        return "localflock"
    return None


def mount_of(path: str | Path, table: str | Path | None = None) -> tuple[str, str, set[str]] | None:
    """(mount point, filesystem type, options) of the mount holding `path`: the longest mount point that is a
    prefix of its real path (the last mounted, where several share it); None when the table cannot be read.

    Reads `/proc/self/mountinfo` (both the per-mount and the filesystem's options) or a `/proc/mounts`-style table.
    """
    table = Path(table or os.environ.get(MOUNT_TABLE_ENV) or MOUNT_TABLE)
    try:
        lines = table.read_text(errors="replace").splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    found, length = None, -1
    for line in lines:
        entry = _parse(line)
        if entry is None:
            continue
        point = entry[0]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= length:
            found, length = entry, len(point)
    return found


def refuse_host_local_locks(path: str | Path, table: str | Path | None = None) -> None:
    """Raise ValueError, in one line naming the path, the mount point and the option, when `path` lies on a mount
    where `flock` is local to this host."""
    mount = mount_of(path, table)
    option = None if mount is None else host_local_lock_option(mount[1], mount[2])
    if option is not None:
        raise ValueError(
            f"cannot lock {path}: {mount[0]} is {mount[1]} mounted with `{option}`, where a lock is seen by this host "
            f"only, so two hosts could both hold it; remount {mount[0]} without `{option}` or put paths.* on a "
            "local disk"
        )


def _parse(line: str) -> tuple[str, str, set[str]] | None:
    """One mountinfo line (`id parent dev root point options [optional...] - type source super-options`) or one
    /proc/mounts line (`source point type options dump pass`)."""
    fields = line.split()
    if "-" in fields[6:]:
        separator = fields.index("-", 6)
        if len(fields) < separator + 3:
            return None
        point, fstype = fields[4], fields[separator + 1]
        options = fields[5].split(",") + (fields[separator + 3].split(",") if len(fields) > separator + 3 else [])
    elif len(fields) >= 4:
        point, fstype, options = fields[1], fields[2], fields[3].split(",")
    else:
        return None
    return _unescape(point), fstype, set(options)


def _unescape(field: str) -> str:
    """The kernel writes a space, tab, newline or backslash in a mount point as an octal escape (`\\040`)."""
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field
