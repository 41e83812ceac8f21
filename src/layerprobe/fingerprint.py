"""One rule for every cache: an output is reused only when its fingerprint matches.

A fingerprint has three parts, each a short hash:
    code    our sources that compute the output (the step module's import closure, comments and docstrings
            stripped, so a comment-only change keeps the cache) and the versions of the libraries that decide
            numbers (torch, torchvision, timm, numpy, scikit-learn, pillow);
    params  the params section(s) that apply, minus knobs that only change speed (batch sizes, devices, workers);
    inputs  the contents of what the step reads: upstream content hashes, a checkpoint file's sha256, an image
            folder's file list with sizes and modification times.
Each step writes its fingerprint into its completion marker (splits.json, manifest.json, train.json,
metrics.json) and, on the next run, recomputes only when the recorded one differs. The same import closure is
what `dvc.yaml` must list as a stage's deps (`tests/test_dvc_deps.py` checks it).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from layerprobe.files import read_json, stable_hash

PACKAGES = ("layerprobe", "flows")  # our own top-level packages: everything else is a library
LIBRARIES = ("torch", "torchvision", "timm", "numpy", "scikit-learn", "pillow")


@dataclass(frozen=True)
class Fingerprint:
    """What decides an output: hashes of the code, the params and the inputs, and their combination."""

    code: str
    params: str
    inputs: str

    @property
    def value(self) -> str:
        return stable_hash([self.code, self.params, self.inputs])

    def as_dict(self) -> dict[str, str]:
        return {"value": self.value, "code": self.code, "params": self.params, "inputs": self.inputs}


def make_fingerprint(step_module: str, *, params: Any, inputs: Any) -> Fingerprint:
    """The fingerprint of an output computed by `step_module` from `params` and `inputs` (JSON-able values)."""
    return Fingerprint(code=code_fingerprint(step_module), params=stable_hash(params), inputs=stable_hash(inputs))


def staleness(marker: Path, fingerprint: Fingerprint) -> str | None:
    """None when `marker` records `fingerprint`; otherwise why the output must be recomputed (for the logs)."""
    marker = Path(marker)
    if not marker.is_file():
        return "not computed yet"
    try:
        recorded = read_json(marker).get("fingerprint")
    except (ValueError, AttributeError):
        return f"{marker.name} is unreadable"
    if not isinstance(recorded, dict):
        return f"{marker.name} records no fingerprint"
    if recorded.get("value") == fingerprint.value:
        return None
    changed = [part for part in ("code", "params", "inputs") if recorded.get(part) != getattr(fingerprint, part)]
    return f"{' and '.join(changed) or 'fingerprint'} changed"


# --------------------------------------------------------------------------------------------------- code


# Steps run in Prefect's worker threads, and CPython 3.11's `ast` constructor is not thread-safe ("AST constructor
# recursion depth mismatch"): every parse goes through this lock.
_AST_LOCK = threading.RLock()


@functools.cache
def code_fingerprint(module: str) -> str:
    """Hash of `module`'s import closure (normalised sources) and of the library versions that decide numbers."""
    with _AST_LOCK:
        sources = {_module_name(path): _normalised_source(path) for path in import_closure(module)}
    return stable_hash({"sources": sources, "libraries": library_versions()})


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def import_closure(module: str) -> list[Path]:
    """Source files of `module` and of every module of ours it imports, at any depth, parents' `__init__` included.

    Imports are read from the source (`ast`), inside functions too, so lazily imported modules count; only modules
    of our own packages (`PACKAGES`) are followed.
    """
    with _AST_LOCK:
        return _closure(module)


def _closure(module: str) -> list[Path]:
    seen: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        for candidate in [*_parents(name), name]:
            if candidate in seen:
                continue
            path = _source_file(candidate)
            if path is None:
                continue
            seen[candidate] = path
            pending.extend(_imported_modules(path, candidate))
    if module not in seen:
        raise ValueError(f"module {module!r} is not a module of {', '.join(PACKAGES)}")
    return sorted(seen.values())


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.cache
def _package_dir(top: str) -> Path | None:
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _source_file(name: str) -> Path | None:
    """The .py file of module `name` if it is one of ours (a module file or a package's __init__)."""
    top, *rest = name.split(".")
    if top not in PACKAGES:
        return None
    base = _package_dir(top)
    if base is None:
        return None
    stem = base.joinpath(*rest) if rest else base
    for path in (stem.with_suffix(".py") if rest else None, stem / "__init__.py"):
        if path is not None and path.is_file():
            return path
    return None


def _module_name(path: Path) -> str:
    for top in PACKAGES:
        base = _package_dir(top)
        if base is not None and path.is_relative_to(base):
            parts = path.relative_to(base).with_suffix("").parts
            return ".".join([top, *(p for p in parts if p != "__init__")])
    raise AssertionError(f"{path} is not in our packages")


def _imported_modules(path: Path, name: str) -> Iterable[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            yield base
            # `from layerprobe.data import generated` imports a submodule; a name that is not one is skipped later.
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _normalised_source(path: Path) -> str:
    """The module's syntax tree without comments and docstrings: edits to either leave the hash unchanged."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return stable_hash(ast.dump(tree, include_attributes=False))


# --------------------------------------------------------------------------------------------------- inputs


def files_listing(paths: Iterable[str | Path]) -> list[list]:
    """[relative path, size, mtime_ns] of every file under `paths` (files or folders), sorted: what an input
    folder holds, cheaply (no file is read). A new, removed, resized or rewritten file changes it."""
    listing = []
    for root in paths:
        root = Path(root)
        if root.is_file():
            stat = root.stat()
            listing.append([str(root), stat.st_size, stat.st_mtime_ns])
            continue
        if not root.is_dir():
            listing.append([str(root), None, None])  # absent: a later appearance changes the fingerprint
            continue
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                path = Path(folder, name)
                stat = path.stat()
                listing.append([str(path.relative_to(root.parent)), stat.st_size, stat.st_mtime_ns])
    return listing
