"""The project's DVC config links outputs into the cache instead of copying them (one copy of a 7 TB study on disk,
not two), and the way layerprobe writes (a temporary, then a rename) keeps that safe: a changed output is a new
file, so the cached version it replaces is never written through its link."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WRITER = """
import sys
from pathlib import Path
from layerprobe.files import write_bytes_atomic
for name in ("shard-0.arrow", "manifest.json"):
    write_bytes_atomic(Path("features") / name, (sys.argv[1] + name).encode() * 4096)
"""
STAGES = """stages:
  extract:
    cmd: python write.py ${version}
    params: [version]
    outs:
      - features:
          persist: true
"""


def dvc(repo: Path, *args: str) -> str:
    environment = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(ROOT / "src"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(["dvc", *args], cwd=repo, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


def cached_objects(repo: Path) -> dict[Path, str]:
    """Every file object in the DVC cache and the md5 of its bytes (its name, while it is intact)."""
    return {
        path: hashlib.md5(path.read_bytes()).hexdigest()
        for path in (repo / ".dvc" / "cache" / "files" / "md5").rglob("*")
        if path.is_file() and not path.name.endswith(".dir")
    }


@pytest.mark.slow  # four `dvc repro` runs in a fresh project: ~15 s
def test_outputs_are_linked_into_the_cache_and_a_changed_output_leaves_the_cached_one_whole(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    (repo / ".dvc" / "config").write_bytes((ROOT / ".dvc" / "config").read_bytes())  # the project's own setting
    (repo / "write.py").write_text(WRITER)
    (repo / "dvc.yaml").write_text(STAGES)
    (repo / "params.yaml").write_text("version: one\n")
    dvc(repo, "repro", "-q")
    shard = repo / "features" / "shard-0.arrow"
    objects = cached_objects(repo)
    assert shard.stat().st_nlink == 2 and shard.stat().st_ino in {p.stat().st_ino for p in objects}  # not copied
    first = dict(objects)

    (repo / "params.yaml").write_text("version: two\n")
    dvc(repo, "repro", "-q")
    assert shard.read_bytes().startswith(b"twoshard-0.arrow") and shard.stat().st_nlink == 2
    objects = cached_objects(repo)
    assert all(objects[path] == digest == path.parent.name + path.name for path, digest in first.items())
    assert all(digest == path.parent.name + path.name for path, digest in objects.items())  # no object rewritten

    assert "didn't change" in dvc(repo, "repro") or "up to date" in dvc(repo, "status")
    (repo / "params.yaml").write_text("version: one\n")
    dvc(repo, "repro", "-q")
    assert shard.read_bytes().startswith(b"oneshard-0.arrow")
    assert "up to date" in dvc(repo, "status")
