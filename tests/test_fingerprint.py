"""Fingerprints: what decides an output changes its fingerprint; what does not (comments, orchestration code, speed
knobs, modification times, where the project lies) does not; and computing one never crashes a run."""

from __future__ import annotations

import ast
import dataclasses
import gc
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from layerprobe import code_key, file_hashes
from layerprobe.code_key import (
    KEYING_MODULES,
    closure_modules,
    code_fingerprint,
    import_closure,
    imported_modules,
    normalised_tokens,
)
from layerprobe.config import (
    FORMATS,
    BackboneConfig,
    DatasetConfig,
    ExtractConfig,
    PrepareConfig,
    PretrainConfig,
    ProbeConfig,
    TrainConfig,
)
from layerprobe.file_hashes import input_listing
from layerprobe.files import write_json
from layerprobe.fingerprint import listed_files, make_fingerprint, staleness
from layerprobe.steps.extract import extract_fingerprint
from layerprobe.steps.prepare import prepare_fingerprint
from layerprobe.steps.pretrain import pretrain_fingerprint
from layerprobe.steps.train import train_fingerprint

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "layerprobe"
STEPS = [f"layerprobe.steps.{step}" for step in ("pretrain", "prepare", "extract", "train", "evaluate")]
# Every module of ours is one of three kinds. Results modules decide numbers (or the on-disk format) and make up the
# steps' code keys; keying modules compute the keys (in every closure, in no key); orchestration modules only move,
# record or show results and must stay out of every step's closure. A new module must be put in one of them.
RESULTS = {
    "layerprobe",
    "layerprobe.attention_pool",
    "layerprobe.backbone",
    "layerprobe.checkpoint",
    "layerprobe.config",
    "layerprobe.data",
    "layerprobe.data.catalogue",
    "layerprobe.data.generated",
    "layerprobe.data.prepared",
    "layerprobe.data.sources",
    "layerprobe.data.splits",
    "layerprobe.device",
    "layerprobe.extract",
    "layerprobe.features",
    "layerprobe.files",
    "layerprobe.metrics",
    "layerprobe.pretrain",
    "layerprobe.probes",
    "layerprobe.registry",
    "layerprobe.selection",
    "layerprobe.train",
    "layerprobe.truncation",
    "layerprobe.layer_evaluation",
    "layerprobe.per_layer",
    "layerprobe.steps",
    *STEPS,
}
ORCHESTRATION = {
    "layerprobe.cli",
    "layerprobe.layer_report",
    "layerprobe.locks",
    "layerprobe.mlflow_model",
    "layerprobe.mlflow_ui",
    "layerprobe.model_registry",
    "layerprobe.mounts",
    "layerprobe.params",
    "layerprobe.plan",
    "layerprobe.plots",
    "layerprobe.predict",
    "layerprobe.report",
    "layerprobe.tracking",
    "layerprobe.verify",
}


def all_modules() -> set[str]:
    return {name for top in code_key.PACKAGES for name, _ in code_key._modules_under(top, code_key._package_dir(top))}


# ----------------------------------------------------------------------------------------------------- code keys


def test_every_module_is_results_keying_or_orchestration_and_no_step_imports_orchestration():
    modules = all_modules()
    orchestration = ORCHESTRATION | {name for name in modules if name.split(".")[0] == "flows"}
    unclassified = modules - RESULTS - orchestration - set(KEYING_MODULES)
    assert not unclassified, f"classify these modules in tests/test_fingerprint.py: {sorted(unclassified)}"
    for step in STEPS:
        closure = set(closure_modules(step))
        assert not closure & orchestration, f"{step} imports orchestration code: {sorted(closure & orchestration)}"


def test_import_closure_follows_lazy_imports_and_stays_within_the_step():
    def names(module: str) -> set[str]:
        return {str(p.relative_to(SRC)) for p in import_closure(module) if p.is_relative_to(SRC)}

    extract = names("layerprobe.steps.extract")
    assert {"backbone.py", "extract.py", "features.py", "data/sources.py", "__init__.py"} <= extract  # lazy imports
    assert "train.py" not in extract and "probes.py" not in extract  # training code never invalidates features
    train = names("layerprobe.steps.train")
    assert {"train.py", "probes.py", "attention_pool.py", "checkpoint.py"} <= train
    assert "backbone.py" not in train and "extract.py" not in train


def _ast_imports(text: str, name: str, *, is_package: bool) -> set[str]:
    """The import statements' modules as `ast` reads them (in the main thread, in a test: the reference)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")}
    return found


def test_imports_read_from_tokens_equal_the_syntax_trees_for_every_module_and_tricky_forms():
    for top in code_key.PACKAGES:
        for name, path in code_key._modules_under(top, code_key._package_dir(top)):
            text, is_package = path.read_text(), path.name == "__init__.py"
            assert set(imported_modules(text, name, is_package=is_package)) == _ast_imports(
                text, name, is_package=is_package
            ), name
    tricky = (
        "import a.b as c, d\nfrom . import (x,\n    y as z)\nfrom ..up import w; import e.f\n"
        "def f():\n    from .lazy import thing  # a comment\n    return f'{thing!r} import not_me'\n"
        "s = 'from nowhere import nothing'\nfrom ... import top\nfrom .star import *\n"
    )
    assert set(imported_modules(tricky, "pkg.sub.mod", is_package=False)) == _ast_imports(
        tricky, "pkg.sub.mod", is_package=False
    )


def test_comments_docstrings_and_line_wrapping_do_not_change_a_modules_tokens_but_code_does():
    original = '"""Doc."""\n\n\ndef rate(x):\n    """Half."""\n    return max(x * 0.5, 0)  # why\n'
    commented = '"""Other doc."""\n# new comment\n\ndef rate(x):\n    return max(\n        x * 0.5,\n        0)\n'
    changed = '"""Doc."""\n\n\ndef rate(x):\n    """Half."""\n    return max(x * 0.25, 0)  # why\n'
    assert normalised_tokens(original) == normalised_tokens(commented)
    assert normalised_tokens(original) != normalised_tokens(changed)
    # a string that is not a docstring is code; an f-string keeps its text on every Python version
    assert normalised_tokens("x = 1\n'not a docstring'\n") != normalised_tokens("x = 1\n")
    assert normalised_tokens("y = f'{a!r:>{w}}'\n") != normalised_tokens("y = f'{a!s:>{w}}'\n")
    assert "f'{a!r:>{w}}'" in normalised_tokens("y = f'{a!r:>{w}}'\n")


class _SwitchesThreads:
    """Cyclic garbage whose finaliser yields the GIL: a collection inside another thread's `ast.parse` then lets a
    third thread parse in the middle of it, which is what breaks CPython 3.11's AST constructor."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        time.sleep(0)


def test_code_keys_computed_in_threads_beside_parses_compiles_and_imports_never_fail():
    errors: list[str] = []
    stop = threading.Event()
    text = (SRC / "probes.py").read_text()

    def ours() -> None:
        while not stop.is_set():
            try:
                code_fingerprint.cache_clear()
                for step in STEPS:
                    code_fingerprint(step)
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(f"{type(e).__name__}: {e}")

    def another_library() -> None:  # parses and compiles, as other libraries do in Prefect's threads
        while not stop.is_set():
            try:
                ast.parse(text)
            except SystemError:
                pass  # its own failure, under CPython < 3.13, is not ours to judge
            compile(text, "other.py", "exec")

    def importer() -> None:  # imports compile modules
        while not stop.is_set():
            sys.modules.pop("json.tool", None)
            __import__("json.tool")
            time.sleep(0.01)

    def garbage() -> None:
        while not stop.is_set():
            for _ in range(100):
                _SwitchesThreads()
            time.sleep(0.001)

    threshold = gc.get_threshold()
    gc.set_threshold(10)  # collections (and so finalisers) inside the parses, often
    threads = [threading.Thread(target=f) for f in (ours, ours, another_library, importer, garbage)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(8)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        gc.set_threshold(*threshold)
    assert not errors, errors[:3]


def test_library_releases_drop_the_build_label(monkeypatch):
    monkeypatch.setattr(code_key, "library_versions", lambda: {"torch": "2.5.1+cu121", "timm": "1.0.9"})
    assert code_key.library_releases() == {"torch": "2.5.1", "timm": "1.0.9"}


def _step_keys(tree: Path, monkeypatch, *, steps: list[str] = STEPS) -> dict[str, str]:
    """Every step's code key computed on the code under `tree` (its src/layerprobe and flows)."""
    where = {"layerprobe": tree / "src" / "layerprobe", "flows": tree / "flows"}
    monkeypatch.setattr(code_key, "_package_dir", lambda top: where.get(top))
    code_fingerprint.cache_clear()
    try:
        return {step: code_fingerprint(step) for step in steps}
    finally:
        code_fingerprint.cache_clear()


NEW_FUNCTION = "\n\ndef _added_helper(x):\n    return x + 1\n"
# (file, old text, new text or None to append NEW_FUNCTION, steps whose key must change)
EDITS = [
    ("flows/extract.py", None, None, set()),
    ("flows/unit.py", None, None, set()),
    ("flows/local_server.py", 'print(f"Prefect API: local server', 'print(f"Prefect API (edited): local server', set()),
    ("flows/common.py", '"%s: up to date (fingerprint matches), reused"', '"%s: reused (edited)"', set()),
    ("src/layerprobe/tracking.py", None, None, set()),
    ("src/layerprobe/cli.py", None, None, set()),
    ("src/layerprobe/plots.py", None, None, set()),
    ("src/layerprobe/report.py", None, None, set()),
    ("src/layerprobe/locks.py", None, None, set()),
    ("src/layerprobe/params.py", None, None, set()),
    ("src/layerprobe/fingerprint.py", None, None, set()),  # keying: in every closure, in no key
    ("src/layerprobe/file_hashes.py", "RACY_SECONDS = 2.0", "RACY_SECONDS = 3.0", set()),
    (
        "src/layerprobe/backbone.py",
        "return transform_from_data_config(model_data_config(model, **preprocessing))",
        "return transform_from_data_config(model_data_config(model, **{**preprocessing, 'crop_pct': 0.5}))",
        {"layerprobe.steps.pretrain", "layerprobe.steps.extract"},
    ),
    (
        "src/layerprobe/extract.py",
        "cls = tokens[:, 0].float()",
        "cls = 2.0 * tokens[:, 0].float()",
        {"layerprobe.steps.extract", "layerprobe.steps.evaluate"},  # evaluate times alf_truncated's extraction
    ),
    (
        "src/layerprobe/probes.py",
        "NORM_EPS = 1e-5",
        "NORM_EPS = 1e-6",
        {"layerprobe.steps.train", "layerprobe.steps.evaluate"},
    ),
    # the measured cases: an unused function appended to the modules every step imports recomputed it all
    ("src/layerprobe/files.py", None, None, set()),
    ("src/layerprobe/config.py", None, None, set()),
    ("src/layerprobe/probes.py", None, None, set()),
    # evaluation never runs the schedule: its key stays (the retrained probes' bytes are its inputs)
    (
        "src/layerprobe/train.py",
        "return min_lr + 0.5 * (1 + math.cos",
        "return 0.5 * min_lr + 0.25 * (1 + math.cos",
        {"layerprobe.steps.train"},
    ),
]


def test_orchestration_edits_keep_every_steps_code_key_and_results_edits_change_the_steps_they_decide(
    tmp_path, monkeypatch
):
    base = tmp_path / "base"
    for name in ("src", "flows"):
        shutil.copytree(ROOT / name, base / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    before = _step_keys(base, monkeypatch)
    for number, (file, old, new, changes) in enumerate(EDITS):
        tree = tmp_path / f"{number}-{file.replace('/', '_')}"
        shutil.copytree(base, tree)
        path = tree / file
        text = path.read_text()
        if old is None:
            path.write_text(text + NEW_FUNCTION)
        else:
            assert old in text, f"{old!r} not in {file}: update the test to the code"
            path.write_text(text.replace(old, new, 1))
        after = _step_keys(tree, monkeypatch)
        changed = {step for step in STEPS if after[step] != before[step]}
        assert changed == changes, f"editing {file}: keys changed for {sorted(changed)}, expected {sorted(changes)}"


def test_a_key_holds_what_the_step_can_reach_and_nothing_else(tmp_path, monkeypatch):
    """Unreached definitions are out of the key; reached ones, decorated ones and import-time statements are in."""
    package = tmp_path / "src" / "layerprobe"
    (package / "steps").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "steps" / "__init__.py").write_text("")
    (package / "helpers.py").write_text(
        "SCALE = 2\n\n\ndef used(x):\n    return inner(x) * SCALE\n\n\ndef inner(x):\n    return x + 1\n\n\n"
        "def unused(x):\n    return used(x)\n\n\n@register\ndef registered():\n    return 3\n"
    )
    (package / "steps" / "step.py").write_text(
        "from layerprobe.helpers import used\n\n\ndef step(x):\n    return used(x)\n"
    )
    helpers = package / "helpers.py"

    def key_after(old: str, new: str) -> str:
        text = helpers.read_text()
        helpers.write_text(text.replace(old, new) if old else text + new)
        try:
            return _step_keys(tmp_path, monkeypatch, steps=["layerprobe.steps.step"])["layerprobe.steps.step"]
        finally:
            helpers.write_text(text)

    base = key_after("", "")
    assert key_after("return used(x)", "return used(x) + 1") == base  # an unreached function
    assert key_after("", "\n\ndef another():\n    return 0\n") == base  # a new one nothing calls
    assert key_after("return x + 1", "return x + 2") != base  # reached through used()
    assert key_after("SCALE = 2", "SCALE = 3") != base  # import-time statement
    assert key_after("return 3", "return 4") != base  # decorated: runs at import


# ------------------------------------------------------------------------------------------------------ markers


def test_staleness_names_the_part_that_changed(tmp_path):
    marker = tmp_path / "marker.json"
    first = make_fingerprint("layerprobe.steps.train", format="f/1", params={"lr": 1}, inputs={"features": "a"})
    assert staleness(marker, first) == "not computed yet"
    write_json(marker, {"fingerprint": first.as_dict()})
    assert staleness(marker, first) is None
    assert (
        staleness(
            marker, make_fingerprint("layerprobe.steps.train", format="f/1", params={"lr": 2}, inputs={"features": "a"})
        )
        == "params changed"
    )
    assert (
        staleness(
            marker, make_fingerprint("layerprobe.steps.train", format="f/1", params={"lr": 1}, inputs={"features": "b"})
        )
        == "inputs changed"
    )
    assert (
        staleness(
            marker,
            make_fingerprint("layerprobe.steps.extract", format="f/1", params={"lr": 1}, inputs={"features": "a"}),
        )
        == "code changed"
    )
    assert (
        staleness(
            marker, make_fingerprint("layerprobe.steps.train", format="f/2", params={"lr": 1}, inputs={"features": "a"})
        )
        == "format changed"
    )
    write_json(marker, {"no": "fingerprint"})
    assert staleness(marker, first) == "marker.json records no fingerprint"


def test_staleness_vouches_for_every_listed_file_by_its_sha256_at_the_cost_of_a_stat(tmp_path, monkeypatch):
    fingerprint = make_fingerprint("layerprobe.steps.train", format="f/1", params={}, inputs={})
    output = tmp_path / "out.bin"
    output.write_bytes(b"the output")
    _settle(output)
    marker = tmp_path / "marker.json"
    write_json(marker, {"fingerprint": fingerprint.as_dict(), "files": listed_files(tmp_path, ["out.bin"])})
    reads = _count_reads(monkeypatch)
    assert staleness(marker, fingerprint) is None and reads == []  # recorded by listed_files: a stat, no read
    before = output.stat()
    output.write_bytes(b"THE OUTPUT")  # same size, and the old modification time put back
    os.utime(output, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert staleness(marker, fingerprint) == "out.bin changed in place: sha256 differs from marker.json's"
    assert reads == [output]  # its ctime moved: read before being trusted
    output.write_bytes(b"the output")  # back as recorded, but written just now: racy, so read on every check
    reads.clear()
    assert staleness(marker, fingerprint) is None and staleness(marker, fingerprint) is None
    assert reads == [output, output]
    output.write_bytes(b"shorter")
    assert staleness(marker, fingerprint) == "out.bin changed size (10 bytes recorded, 7 now)"
    output.unlink()
    assert staleness(marker, fingerprint) == "out.bin is missing"
    write_json(marker, {"fingerprint": fingerprint.as_dict(), "files": {"out.bin": 10}})  # sizes only: not trusted
    assert staleness(marker, fingerprint) == "out.bin has no sha256 in marker.json"


# ---------------------------------------------------------------------------------------------- input contents


def _count_reads(monkeypatch) -> list[Path]:
    reads: list[Path] = []
    real = file_hashes.sha256_file

    def counting(path):
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(file_hashes, "sha256_file", counting)
    return reads


def _settle(*paths: Path) -> None:
    """Age files past the racy window, so the stat cache may record them."""
    past = time.time_ns() - 10**10
    for path in paths:
        os.utime(path, ns=(past, past))


def test_an_input_folders_listing_is_its_contents_not_its_times_or_place(tmp_path, monkeypatch):
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "1.png").write_bytes(b"one")
    (root / "cat" / ".DS_Store").write_bytes(b"hidden: not an input")
    before = input_listing([root])
    assert before == [["cat/1.png", 3, file_hashes.sha256_file(root / "cat" / "1.png")]]
    (root / "cat" / "2.png").write_bytes(b"two")
    added = input_listing([root])
    assert added != before and len(added) == 2
    os.utime(root / "cat" / "2.png", ns=(1, 1))
    assert input_listing([root]) == added  # touched, not changed
    (root / "cat" / "2.png").write_bytes(b"TWO")
    os.utime(root / "cat" / "2.png", ns=(1, 1))
    assert input_listing([root]) != added  # same size and time, other bytes
    moved = tmp_path / "elsewhere" / "images"
    shutil.copytree(root, moved)  # new times, new inodes, new absolute path
    assert input_listing([moved]) == input_listing([root])
    assert input_listing([tmp_path / "absent"]) == [["absent", None, None]]


def test_the_stat_cache_reads_an_unchanged_file_never_and_a_touched_one_once(tmp_path, monkeypatch):
    root = tmp_path / "images"
    files = [root / "a" / f"{i}.png" for i in range(5)]
    for i, path in enumerate(files):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([i]) * 100)
    _settle(*files)
    reads = _count_reads(monkeypatch)
    first = input_listing([root])
    assert sorted(reads) == files  # the first run reads each file once
    reads.clear()
    assert input_listing([root]) == first and reads == []  # the second reads none
    os.utime(files[0])  # touched now: read again (racy, so not recorded yet), equal
    assert input_listing([root]) == first and reads == [files[0]]
    _settle(files[0])
    reads.clear()
    assert input_listing([root]) == first and reads == [files[0]]  # settled: read once more, recorded
    reads.clear()
    assert input_listing([root]) == first and reads == []
    files[1].write_bytes(b"x" * 100)  # same size, new bytes, settled time: its mtime changed, so it is read
    _settle(files[1])
    assert input_listing([root]) != first and files[1] in reads


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def test_a_symlinked_class_folder_is_listed_as_the_reader_reads_it(tmp_path):
    from layerprobe.data import create_dataset

    elsewhere = tmp_path / "shared" / "dogs"
    _image(elsewhere / "d1.png", 10)
    root = tmp_path / "images"
    _image(root / "cats" / "c1.png", 200)
    (root / "dogs").symlink_to(elsewhere, target_is_directory=True)
    (root / "cats" / "loop").symlink_to(root / "cats", target_is_directory=True)  # a cycle is not walked forever
    dataset = create_dataset("imagefolder", root=str(root))
    listed = [name for name, _, _ in input_listing([root])]
    assert [str(Path(p).relative_to(root)) for p in dataset.paths] == listed == ["cats/c1.png", "dogs/d1.png"]
    before = input_listing([root])
    _image(elsewhere / "d1.png", 11)  # replaced behind the link
    assert input_listing([root]) != before


# ------------------------------------------------------------------------------------------------- step keys


def test_step_fingerprints_follow_params_and_inputs_but_not_speed_knobs(tmp_path):
    dataset = DatasetConfig(source="count_shapes", options={"num_images": 100})
    base = prepare_fingerprint(dataset, PrepareConfig())
    assert base.format == FORMATS["prepared"]
    assert prepare_fingerprint(dataset, PrepareConfig(seed=1)).value != base.value
    assert prepare_fingerprint(dataclasses.replace(dataset, group="structured"), PrepareConfig()).value == base.value

    backbone = BackboneConfig(model="vit_tiny_patch16_224", model_kwargs={"img_size": 32})
    extract = ExtractConfig()
    features = extract_fingerprint(backbone, extract, dataset_version="v1").value
    assert extract_fingerprint(backbone, extract, dataset_version="v2").value != features
    assert extract_fingerprint(backbone, dataclasses.replace(extract, tap="block"), dataset_version="v1").value != (
        features
    )
    fast = dataclasses.replace(extract, batch_size=7, num_workers=3, device="cpu")
    assert extract_fingerprint(backbone, fast, dataset_version="v1").value == features

    checkpoint = tmp_path / "w.safetensors"
    checkpoint.write_bytes(b"weights one")
    with_file = dataclasses.replace(backbone, checkpoint=str(checkpoint))
    first = extract_fingerprint(with_file, extract, dataset_version="v1").value
    checkpoint.write_bytes(b"weights two")
    assert extract_fingerprint(with_file, extract, dataset_version="v1").value != first  # replaced weights
    os.utime(checkpoint, ns=(1, 1))
    second = extract_fingerprint(with_file, extract, dataset_version="v1").value
    assert extract_fingerprint(with_file, extract, dataset_version="v1").value == second  # touched: the same

    train = TrainConfig(lrs=[0.01], weight_decays=[0.0], device="cpu", precision="float32")
    probe = train_fingerprint("alf", ProbeConfig(), train, features_hash="f").value
    assert train_fingerprint("alf", ProbeConfig(num_heads=2), train, features_hash="f").value != probe
    assert train_fingerprint(
        "alf", ProbeConfig(), dataclasses.replace(train, min_steps=5), features_hash="f"
    ).value != (probe)
    assert train_fingerprint("alf", ProbeConfig(), train, features_hash="g").value != probe
    assert train_fingerprint("alf", ProbeConfig(), dataclasses.replace(train, device="auto"), features_hash="f") == (
        train_fingerprint("alf", ProbeConfig(), train, features_hash="f")
    )


def test_preprocessing_pos_embed_and_jitter_val_make_their_caches_stale(tmp_path):
    backbone = BackboneConfig(model="vit_small_patch14_dinov2", model_kwargs={"img_size": 224}, crop_pct=0.875)
    marker = tmp_path / "manifest.json"
    write_json(marker, {"fingerprint": extract_fingerprint(backbone, ExtractConfig(), dataset_version="v1").as_dict()})
    for change in (
        {"interpolation": "bilinear"},
        {"mean": [0.4, 0.4, 0.4]},
        {"std": [0.2, 0.2, 0.2]},
        {"crop_pct": 1.0},
        {"pos_embed_resample": "dinov2"},
    ):
        changed = extract_fingerprint(dataclasses.replace(backbone, **change), ExtractConfig(), dataset_version="v1")
        assert staleness(marker, changed) == "params changed", change
    assert staleness(marker, extract_fingerprint(backbone, ExtractConfig(), dataset_version="v1")) is None

    pretrained = dataclasses.replace(
        backbone, checkpoint="c.safetensors", model_kwargs={"num_classes": 0}, pretrain=PretrainConfig()
    )
    assert pretrain_fingerprint(pretrained) != pretrain_fingerprint(
        dataclasses.replace(pretrained, interpolation="nearest")
    )

    train = TrainConfig(device="cpu", precision="float32")
    assert train_fingerprint("alf", ProbeConfig(), train, features_hash="f") != train_fingerprint(
        "alf", ProbeConfig(), dataclasses.replace(train, jitter_val=True), features_hash="f"
    )
