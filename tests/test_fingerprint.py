"""Fingerprints: what decides an output changes its fingerprint; what does not (comments, speed knobs) does not."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from layerprobe.config import (
    BackboneConfig,
    DatasetConfig,
    ExtractConfig,
    PrepareConfig,
    PretrainConfig,
    ProbeConfig,
    TrainConfig,
)
from layerprobe.files import write_json
from layerprobe.fingerprint import (
    _normalised_source,
    files_listing,
    import_closure,
    make_fingerprint,
    staleness,
)
from layerprobe.workflow.extract import extract_fingerprint
from layerprobe.workflow.prepare import prepare_fingerprint
from layerprobe.workflow.pretrain import pretrain_fingerprint
from layerprobe.workflow.train import train_fingerprint

SRC = Path(__file__).resolve().parents[1] / "src" / "layerprobe"


def names(module: str) -> set[str]:
    return {str(p.relative_to(SRC)) for p in import_closure(module) if p.is_relative_to(SRC)}


def test_import_closure_follows_lazy_imports_and_stays_within_the_step():
    extract = names("layerprobe.workflow.extract")
    assert {"backbone.py", "extract.py", "features.py", "data/sources.py", "__init__.py"} <= extract  # lazy imports
    assert "train.py" not in extract and "probes.py" not in extract  # training code never invalidates features
    train = names("layerprobe.workflow.train")
    assert {"train.py", "probes.py", "attention_pool.py", "checkpoint.py"} <= train
    assert "backbone.py" not in train and "extract.py" not in train


def test_comments_and_docstrings_do_not_change_a_modules_hash_but_code_does(tmp_path):
    original = tmp_path / "a.py"
    original.write_text('"""Doc."""\n\n\ndef rate(x):\n    """Half."""\n    return x * 0.5  # why\n')
    commented = tmp_path / "b.py"
    commented.write_text('"""Other doc."""\n# new comment\n\ndef rate(x):\n    return x * 0.5\n')
    changed = tmp_path / "c.py"
    changed.write_text('"""Doc."""\n\n\ndef rate(x):\n    """Half."""\n    return x * 0.25  # why\n')
    assert _normalised_source(original) == _normalised_source(commented)
    assert _normalised_source(original) != _normalised_source(changed)


def test_staleness_names_the_part_that_changed(tmp_path):
    marker = tmp_path / "marker.json"
    first = make_fingerprint("layerprobe.workflow.train", params={"lr": 1}, inputs={"features": "a"})
    assert staleness(marker, first) == "not computed yet"
    write_json(marker, {"fingerprint": first.as_dict()})
    assert staleness(marker, first) is None
    assert staleness(marker, make_fingerprint("layerprobe.workflow.train", params={"lr": 2}, inputs={"features": "a"}))
    assert staleness(
        marker, make_fingerprint("layerprobe.workflow.train", params={"lr": 1}, inputs={"features": "b"})
    ) == ("inputs changed")
    assert staleness(
        marker, make_fingerprint("layerprobe.workflow.extract", params={"lr": 1}, inputs={"features": "a"})
    ) == ("code changed")
    write_json(marker, {"no": "fingerprint"})
    assert staleness(marker, first) == "marker.json records no fingerprint"


def test_a_new_or_rewritten_file_changes_a_folders_listing(tmp_path):
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "1.png").write_bytes(b"one")
    before = files_listing([root])
    (root / "cat" / "2.png").write_bytes(b"two")
    added = files_listing([root])
    assert added != before and len(added) == 2
    (root / "cat" / "2.png").write_bytes(b"TWO")
    os.utime(root / "cat" / "2.png", ns=(1, 1))
    assert files_listing([root]) != added
    assert files_listing([tmp_path / "absent"]) == [[str(tmp_path / "absent"), None, None]]


def test_step_fingerprints_follow_params_and_inputs_but_not_speed_knobs(tmp_path):
    dataset = DatasetConfig(source="count_shapes", options={"num_images": 100})
    base = prepare_fingerprint(dataset, PrepareConfig())
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
    for change in ({"interpolation": "bilinear"}, {"mean": [0.4, 0.4, 0.4]}, {"std": [0.2, 0.2, 0.2]},
                   {"crop_pct": 1.0}, {"pos_embed_resample": "dinov2"}):  # fmt: skip
        changed = extract_fingerprint(dataclasses.replace(backbone, **change), ExtractConfig(), dataset_version="v1")
        assert staleness(marker, changed) == "params changed", change
    assert staleness(marker, extract_fingerprint(backbone, ExtractConfig(), dataset_version="v1")) is None

    pretrained = dataclasses.replace(backbone, checkpoint="c.safetensors", model_kwargs={"num_classes": 0},
                                     pretrain=PretrainConfig())  # fmt: skip
    assert pretrain_fingerprint(pretrained) != pretrain_fingerprint(
        dataclasses.replace(pretrained, interpolation="nearest")
    )

    train = TrainConfig(device="cpu", precision="float32")
    assert train_fingerprint("alf", ProbeConfig(), train, features_hash="f") != train_fingerprint(
        "alf", ProbeConfig(), dataclasses.replace(train, jitter_val=True), features_hash="f"
    )
