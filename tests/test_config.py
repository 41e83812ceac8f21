"""params.yaml → typed, frozen config: unknown and missing keys are named; the shipped params files load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from layerprobe.config import ParamsError, TrainConfig
from layerprobe.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def minimal() -> dict:
    return {
        "suite": {"name": "t", "backbones": ["b"], "datasets": ["d"], "probes": ["alf"]},
        "datasets": {"d": {"source": "digits"}},
        "backbones": {"b": {"model": "vit_tiny_patch16_224", "model_kwargs": {"img_size": 32}}},
        "probes": {"alf": {"num_heads": None}},
        "train": {"lrs": ["1e-3", 0.01], "weight_decays": [0]},
    }


def test_shipped_params_files_load():
    params = load_params(ROOT / "params.yaml")
    assert {"linear_last_cls", "alf", "per_layer", "alf_truncated"} <= set(params.suite.probes)
    assert len(params.tasks()) == len(params.suite.backbones) * len(params.suite.datasets) * len(params.suite.probes)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lrs = [1.0]  # type: ignore[misc]


def test_minimal_params_fill_defaults_and_read_yaml_exponents_as_floats(tmp_path):
    params = load_params(write(tmp_path, minimal()))
    assert params.train.lrs == [1e-3, 0.01]
    assert params.train.weight_decays == [0.0]
    assert params.extract.tap == "norm2"
    assert params.train.precision == "auto"
    assert params.train.epochs == TrainConfig().epochs == 40  # one set of defaults: the reference's recipe
    assert params.paths.features_dir("b", "d") == Path("features/b/d")


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    data = minimal()
    data["extract"] = {"tapp": "block"}
    with pytest.raises(ParamsError, match=r"unknown key 'extract.tapp' \(did you mean 'extract.tap'\?\)"):
        load_params(write(tmp_path, data))


def test_missing_key_is_named(tmp_path):
    data = minimal()
    del data["suite"]["probes"]
    with pytest.raises(ParamsError, match="missing key 'suite.probes'"):
        load_params(write(tmp_path, data))


def test_train_values_are_checked_where_they_are_read(tmp_path):
    data = minimal()
    for key, value, message in [
        ("jitter_prob", 1.5, "train.jitter_prob must be in"),
        ("batch_size", 0, "train.batch_size must be >= 1"),
        ("device", "tpu", "train.device must be auto, cpu or cuda"),
        ("lrs", [], "train.lrs must not be empty"),
    ]:
        data["train"] = {key: value}
        with pytest.raises(ParamsError, match=message):
            load_params(write(tmp_path, data))


def test_wrong_type_and_bad_values_are_named(tmp_path):
    data = minimal()
    data["extract"] = {"batch_size": "big"}
    with pytest.raises(ParamsError, match="extract.batch_size must be int"):
        load_params(write(tmp_path, data))
    data["extract"] = {"tap": "mlp"}
    with pytest.raises(ParamsError, match="extract.tap must be one of"):
        load_params(write(tmp_path, data))
    data["extract"] = {}
    data["train"]["precision"] = "half"
    with pytest.raises(ParamsError, match="train.precision must be one of .*'half'"):
        load_params(write(tmp_path, data))


def test_suite_names_must_be_defined(tmp_path):
    data = minimal()
    data["suite"]["datasets"] = ["nope"]
    with pytest.raises(ParamsError, match=r"suite.datasets: unknown dataset 'nope'. Choices: d"):
        load_params(write(tmp_path, data))


def test_dataset_sources_and_options_are_checked_before_any_step(tmp_path):
    data = minimal()
    data["datasets"]["d"]["source"] = "digitz"
    with pytest.raises(ParamsError, match=r"datasets.d.source: unknown source 'digitz'. Did you mean 'digits'"):
        load_params(write(tmp_path, data))
    data["datasets"]["d"] = {"source": "digits", "options": {"num_imags": 10}}
    with pytest.raises(ParamsError, match=r"datasets.d.options: unknown option of source 'digits' 'num_imags'"):
        load_params(write(tmp_path, data))
    data["datasets"]["d"] = {"source": "imagefolder"}
    with pytest.raises(ParamsError, match=r"datasets.d.options: source 'imagefolder' needs option 'root'"):
        load_params(write(tmp_path, data))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="params file not found"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("suite: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_backbone_preprocessing_values_are_checked(tmp_path):
    data = minimal()
    for key, value, message in [
        ("interpolation", "lanczos", r"backbones.b: interpolation must be one of .*'lanczos'"),
        ("mean", [0.5, 0.5], r"backbones.b: mean must be 3 floats"),
        ("std", [0.5, 0.0, 0.5], r"backbones.b: std must be positive"),
        ("std", ["a", 1, 1], r"backbones.b.std\[0\] must be float"),
        ("crop_pct", 1.5, r"backbones.b: crop_pct must be in \(0, 1\]"),
        ("pos_embed_resample", "bicubic", r"backbones.b: pos_embed_resample must be one of"),
    ]:
        data["backbones"]["b"] = {"model": "vit_tiny_patch16_224", key: value}
        with pytest.raises(ParamsError, match=message):
            load_params(write(tmp_path, data))
    data["backbones"]["b"] = {"model": "vit_tiny_patch16_224", "interpolation": "bilinear", "mean": [0, 0.5, 1]}
    backbone = load_params(write(tmp_path, data)).backbones["b"]
    assert backbone.preprocessing() == {
        "crop_pct": None,
        "interpolation": "bilinear",
        "mean": [0.0, 0.5, 1.0],
        "std": None,
    }
    assert backbone.pos_embed_resample == "timm"


def test_jitter_val_is_a_bool_off_by_default_and_on_in_the_paper_params(tmp_path):
    data = minimal()
    assert load_params(write(tmp_path, data)).train.jitter_val is False
    data["train"]["jitter_val"] = "yes"
    with pytest.raises(ParamsError, match="train.jitter_val must be bool"):
        load_params(write(tmp_path, data))
    assert load_params(ROOT / "params.yaml").train.jitter_val is False
    assert load_params(ROOT / "params.paper.yaml").train.jitter_val is True


def test_reading_and_batching_choices_default_to_ours_and_the_paper_params_take_the_references(tmp_path):
    data = minimal()
    params = load_params(write(tmp_path, data))
    assert params.train.batch_plan == "even" and params.probe_config("alf").overrides() == {}  # null: the default
    data["probes"]["alf"] = {"normalize": "accross_tokens"}
    with pytest.raises(ParamsError, match=r"probes.alf: .*normalize must be one of \('token', 'across_tokens'\)"):
        load_params(write(tmp_path, data))
    data["probes"]["alf"] = {"pad_final": "yes"}
    with pytest.raises(ParamsError, match="probes.alf.pad_final"):
        load_params(write(tmp_path, data))
    paper = load_params(ROOT / "params.paper.yaml")
    assert paper.train.batch_plan == "reference"
    assert paper.probe_config("attentive_last_all_tokens").normalize == "across_tokens"
    assert paper.probe_config("attentive_last_cls_ap").pad_final is True
    assert paper.probe_config("linear_concat_all").pad_final is False
    offline = load_params(ROOT / "params.yaml")
    assert offline.train.batch_plan == "even" and all(
        (p.normalize, p.pad_final) == (None, None) for p in offline.probes.values()
    )
