"""`layerprobe verify`: read every file every completion marker lists and compare it with the sha256 it records, as
`git fsck` does. The runs themselves trust a file whose stat the machine's stat cache knows (`fingerprint.vouch`);
this reads them all, so a bit flipped on disk behind an unchanged stat is found too."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from layerprobe.config import MANIFEST_FILE, METRICS_FILE, SPLITS_FILE, TRAIN_MARKER
from layerprobe.files import read_json
from layerprobe.fingerprint import vouch

MARKER_NAMES = (MANIFEST_FILE, SPLITS_FILE, TRAIN_MARKER, METRICS_FILE)  # an unreadable one of these is reported
PROGRESS_SECONDS = 2.0


def markers_under(root: Path) -> Iterator[tuple[Path, dict | None]]:
    """(path, document) of every completion marker under `root` (a folder, or one marker): a JSON file recording a
    fingerprint and the files it lists; None for a marker-named file that is not readable JSON. Hidden folders and
    files (staging folders, temporaries) are skipped, links to folders are not followed."""
    if root.is_file():
        candidates = [root]
    else:
        candidates = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            candidates += [Path(folder) / n for n in sorted(names) if n.endswith(".json") and not n.startswith(".")]
    for path in candidates:
        try:
            document = read_json(path)
        except (OSError, ValueError):
            if path.name in MARKER_NAMES:
                yield path, None
            continue
        if isinstance(document, dict) and "fingerprint" in document and isinstance(document.get("files"), dict):
            yield path, document


def verify(roots: list[Path], *, report: Callable[[str], None], progress: Callable[[str], None]) -> int:
    """Re-hash every file the markers under `roots` list; `report` a line per bad file and a summary; `progress`
    every few seconds while reading. Returns the number of bad files (an unreadable marker counts as one)."""
    markers = [marker for root in roots for marker in markers_under(root)]
    total = sum(r.get("bytes") or 0 for _, d in markers if d for r in d["files"].values() if isinstance(r, dict))
    count = sum(len(d["files"]) for _, d in markers if d)
    done, last, bad = [0, 0], [time.monotonic()], 0

    def read(size: int) -> None:
        done[0] += size
        done[1] += 1
        if time.monotonic() - last[0] >= PROGRESS_SECONDS:
            last[0] = time.monotonic()
            progress(f"{done[0] / 1e9:.2f} of {total / 1e9:.2f} GB read ({done[1]} of {count} files)")

    for marker, document in markers:
        if document is None:
            report(f"{marker} is unreadable")
            bad += 1
            continue
        problems = vouch(marker, document, reread=True, progress=read).problems
        for name, why in problems.items():
            report(f"{marker.parent / name} {why}")
        bad += len(problems)
    where = ", ".join(map(str, roots))
    if bad:
        report(f"{bad} of {count} files listed by {len(markers)} markers under {where} are not what they record")
    else:
        report(f"all {count} files listed by {len(markers)} markers under {where} match ({done[0] / 1e9:.2f} GB read)")
    return bad
