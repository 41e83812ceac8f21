"""dvc.yaml lists, for every stage, the modules that decide its output: the import closure of the flow it runs."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from layerprobe.code_key import import_closure

ROOT = Path(__file__).resolve().parents[1]
# Files a stage depends on without importing them.
ALSO_DECIDES = {"evaluate": ("src/layerprobe/mlflow_model.py",)}  # loaded by MLflow from its path


def stage_modules() -> dict[str, tuple[str, list[str]]]:
    """{stage: (the module its cmd runs, its deps)} from dvc.yaml."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    found = {}
    for name, stage in stages.items():
        match = re.search(r"python -m ([\w.]+)", stage["cmd"])
        assert match, f"stage {name}: cmd {stage['cmd']!r} does not run a module with `python -m`"
        found[name] = (match.group(1), stage.get("deps", []))
    return found


def test_every_stage_lists_its_whole_import_closure():
    missing = {}
    for name, (module, deps) in stage_modules().items():
        listed = [ROOT / dep for dep in deps if "${" not in dep]
        closure = import_closure(module)
        absent = [p for p in closure if not any(p == dep or p.is_relative_to(dep) for dep in listed)]
        if absent:
            missing[name] = [str(p.relative_to(ROOT)) for p in absent]
    assert not missing, f"dvc.yaml deps miss modules that decide these stages' outputs: {missing}"


def test_every_listed_dependency_exists():
    for name, (_, deps) in stage_modules().items():
        for dep in deps:
            if "${" not in dep:
                assert (ROOT / dep).exists(), f"stage {name}: dep {dep} does not exist"


def test_the_closure_check_would_catch_a_missing_module():
    module, deps = stage_modules()["train"]
    closure = import_closure(module)
    without = [dep for dep in deps if dep != "src/layerprobe/attention_pool.py"]
    listed = [ROOT / dep for dep in without if "${" not in dep]
    assert any(not any(p == dep or p.is_relative_to(dep) for dep in listed) for p in closure)


def test_no_stage_lists_code_it_does_not_run():
    """Extra modules in deps would rerun a stage for nothing; folders are fine when the closure uses them."""
    extra = {}
    for name, (module, deps) in stage_modules().items():
        closure = import_closure(module)
        unused = [
            dep
            for dep in deps
            if dep.endswith(".py") and ROOT / dep not in closure and dep not in ALSO_DECIDES.get(name, ())
        ]
        if unused:
            extra[name] = unused
    assert not extra, f"dvc.yaml deps list modules these stages never import: {extra}"
