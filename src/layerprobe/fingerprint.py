"""One rule for every cache: an output is reused only when its fingerprint matches, and its fingerprint holds only
what decides its numbers.

A fingerprint has four parts:
    format  the on-disk format of the output (`layerprobe-features/1`, ...): a change of format, not of unrelated
            code, is what makes old outputs unreadable;
    code    the sources that compute the output (the step module's import closure, normalised: comments, docstrings
            and formatting do not count) and the release versions of the libraries that decide numbers
            (`layerprobe.code_key`). Orchestration (flows, tracking, CLI, plots, locks, the flow/serve/tracking
            config) is never in a step's closure, so editing it reuses everything;
    params  the params section(s) that apply, minus knobs that only change speed (batch sizes, devices, workers);
    inputs  the contents of what the step reads: upstream content hashes, a checkpoint's sha256, every input file's
            sha256 (`layerprobe.file_hashes`): never a modification time or an absolute path, so a project moved,
            cloned or copied to another machine reuses its caches.
Each step writes its fingerprint into its completion marker (splits.json, manifest.json, train.json, metrics.json)
and recomputes only when the recorded one differs. The marker also lists the files of the output with their size
and sha256 (`listed_files`), and nothing is read or reused unvouched (`vouch`): a file whose stat the machine's stat
cache knows costs a `stat`, any other is hashed first, and one changed in place makes the output stale, naming it.
Beside it the marker records, for the record only, what made it: the whole code's hash, the exact library builds,
Python and the host (`provenance_record`).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any

from layerprobe.code_key import code_fingerprint, full_code_hash, library_versions
from layerprobe.file_hashes import file_digests
from layerprobe.files import read_json, stable_hash

PARTS = ("format", "code", "params", "inputs")


@dataclass(frozen=True)
class Fingerprint:
    """What decides an output: its format and hashes of the code, the params and the inputs, and their combination."""

    format: str
    code: str
    params: str
    inputs: str

    @property
    def value(self) -> str:
        return stable_hash([getattr(self, part) for part in PARTS])

    def as_dict(self) -> dict[str, str]:
        return {"value": self.value, **{part: getattr(self, part) for part in PARTS}}


def make_fingerprint(step_module: str, *, format: str, params: Any, inputs: Any) -> Fingerprint:
    """The fingerprint of an output in `format` computed by `step_module` from `params` and `inputs` (JSON-able)."""
    return Fingerprint(
        format=format, code=code_fingerprint(step_module), params=stable_hash(params), inputs=stable_hash(inputs)
    )


def staleness(marker: Path, fingerprint: Fingerprint) -> str | None:
    """None when `marker` records `fingerprint` and every file it lists is vouched for (`vouch`); otherwise why the
    output must be recomputed (for the logs). An unchanged file costs a `stat`; only a changed one is read."""
    marker = Path(marker)
    if not marker.is_file():
        return "not computed yet"
    try:
        document = read_json(marker)
        recorded = document.get("fingerprint")
    except (ValueError, AttributeError):
        return f"{marker.name} is unreadable"
    if not isinstance(recorded, dict):
        return f"{marker.name} records no fingerprint"
    if recorded.get("value") != fingerprint.value:
        changed = [part for part in PARTS if recorded.get(part) != getattr(fingerprint, part)]
        return f"{' and '.join(changed) or 'fingerprint'} changed"
    return vouch(marker, document).first_problem()


def listed_files(folder: Path, names: list[str], *, sha256: dict[str, str] | None = None) -> dict[str, dict]:
    """{name: {"bytes": size, "sha256": digest}} of the files (relative to `folder`, the marker's) that a marker
    lists as its output: what every later read vouches for. `sha256` holds digests the writer already computed, so a
    file just written is not read again."""
    folder, known = Path(folder), dict(sha256 or {})
    unknown = [name for name in names if name not in known]
    digests = file_digests([(os.path.abspath(folder / name), (folder / name).stat()) for name in unknown])
    known.update((name, digest) for name, (_, digest) in zip(unknown, digests, strict=True))
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": known[name]} for name in names}


@dataclass(frozen=True)
class Vouched:
    """What a marker's listed files hold now: the sha256 of each one there, and why each bad one is not what the
    marker recorded (`changed`: there, with other bytes)."""

    hashes: dict[str, str]
    problems: dict[str, str]  # file name -> why, e.g. "changed in place: sha256 differs from manifest.json's"
    changed: list[str]

    def first_problem(self) -> str | None:
        return next((f"{name} {why}" for name, why in self.problems.items()), None)


def vouch(
    marker: Path,
    document: dict | None = None,
    *,
    names: Iterable[str] | None = None,
    reread: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Vouched:
    """Check the files `marker` (its JSON: `document`) lists, or `names` among them, against their recorded sizes and
    sha256s: the one check every read of an output goes through.

    A file whose stat (size, mtime, ctime, inode) the machine's stat cache holds with its sha256 costs a `stat`; any
    other is read and hashed before its values are used (`layerprobe.file_hashes`, with its racy-clean rule);
    `reread` hashes every file (`layerprobe verify`), calling `progress` with each file's bytes.
    """
    marker = Path(marker)
    document = read_json(marker) if document is None else document
    files = document.get("files") if isinstance(document, dict) else None
    files = files if isinstance(files, dict) else {}
    problems: dict[str, str] = {}
    changed: list[str] = []
    present: list[tuple[str, str, os.stat_result]] = []
    folder = os.path.abspath(marker.parent)
    for name in files if names is None else names:
        record, path = files.get(name), os.path.join(folder, name)
        try:
            stat = os.stat(path)  # the one stat a vouched-for file costs (beside its share of one stat-cache query)
        except OSError:
            stat = None
        if os.path.isabs(name) or ".." in name.split("/"):  # an edited marker must not reach outside its output
            problems[name] = f"is not a file under {marker.parent}"
        elif not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            problems[name] = f"has no sha256 in {marker.name}" if name in files else f"is not listed in {marker.name}"
        elif stat is None or not S_ISREG(stat.st_mode):
            problems[name] = "is missing"
        elif stat.st_size != record.get("bytes"):
            problems[name] = f"changed size ({record.get('bytes')} bytes recorded, {stat.st_size} now)"
            changed.append(name)
        else:
            present.append((name, path, stat))
    digests = file_digests([(path, stat) for _, path, stat in present], reread=reread, progress=progress)
    hashes = {name: digest for (name, _, _), (_, digest) in zip(present, digests, strict=True)}
    for name, digest in hashes.items():
        if digest != files[name]["sha256"]:
            problems[name] = f"changed in place: sha256 differs from {marker.name}'s"
            changed.append(name)
    return Vouched(hashes=hashes, problems=problems, changed=changed)


def provenance_record() -> dict[str, Any]:
    """What made an output, kept in its marker for the record and never compared: the hash of all our code, the
    libraries as installed (with their CUDA/CPU build label), Python, the host and the time."""
    return {
        "code": full_code_hash(),
        "libraries": library_versions(),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
