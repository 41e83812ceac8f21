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
and recomputes only when the recorded one differs. Beside it the marker records, for the record only, what made it:
the whole code's hash, the exact library builds, Python and the host (`provenance_record`).
"""

from __future__ import annotations

import datetime as dt
import platform
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerprobe.code_key import code_fingerprint, full_code_hash, library_versions
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
    return Fingerprint(format=format, code=code_fingerprint(step_module), params=stable_hash(params),
                       inputs=stable_hash(inputs))  # fmt: skip


def staleness(marker: Path, fingerprint: Fingerprint) -> str | None:
    """None when `marker` records `fingerprint` and every file it lists is there with its recorded size; otherwise
    why the output must be recomputed (for the logs). Checking sizes costs a `stat` per file, never a read."""
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
    return missing_files(marker.parent, document.get("files") or {})


def listed_files(folder: Path, names: list[str]) -> dict[str, int]:
    """{name: size} of the files (relative to `folder`, the marker's) that a marker lists as its output."""
    return {name: (Path(folder) / name).stat().st_size for name in names}


def missing_files(folder: Path, files: dict[str, int]) -> str | None:
    """Why the files a marker lists are not its output any more (the first one missing or resized), or None."""
    for name, size in files.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} changed size ({size} bytes recorded, {path.stat().st_size} now)"
    return None


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
