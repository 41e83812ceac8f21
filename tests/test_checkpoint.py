"""Probes round-trip through safetensors + JSON; broken directories fail with messages that name the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerprobe.checkpoint import load_probe, save_probe
from layerprobe.probes import build_probe, extract_member, get_probe_spec, normalize_tokens
from layerprobe.train import HParams


def trained_like(name: str) -> torch.nn.Module:
    head = build_probe(
        get_probe_spec(name), num_tokens=4, dim=8, num_classes=3, grid_size=2, attn_dropouts=[0.0, 0.1], seed=3
    )
    with torch.no_grad():
        for value in head.state_dict().values():
            if value.is_floating_point():
                value.add_(0.1 * torch.randn(value.shape).abs())
    return extract_member(head, 1).eval()


@pytest.mark.parametrize("name", ["alf", "linear_concat_all"])
def test_saved_probe_predicts_the_same_after_loading(tmp_path, name):
    probe = trained_like(name)
    config = {
        "spec": get_probe_spec(name),
        "hparams": HParams(1e-3, 1e-2, 0.1),
        "positions": [(1, 0), (1, 1)],
        "class_names": ["a", "b", "c"],
        "features": {"backbone": "vit_tiny", "tap": "norm2"},
    }
    save_probe(tmp_path / "probe", probe, config)
    loaded, saved = load_probe(tmp_path / "probe")
    x = normalize_tokens(torch.randn(10, 4, 8))
    assert torch.equal(loaded(x), probe(x))
    assert saved["spec"]["name"] == name and saved["hparams"]["lr"] == 1e-3
    assert saved["class_names"] == ["a", "b", "c"] and saved["head"]["grid_size"] == 1
    assert not any(p.name.startswith(".") for p in (tmp_path / "probe").iterdir())  # no temporaries left


def test_broken_directories_fail_with_messages_naming_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_probe(tmp_path / "nowhere")
    directory = save_probe(tmp_path / "p", trained_like("alf"), {"spec": get_probe_spec("alf")})
    weights, config_path = directory / "probe.safetensors", directory / "probe.json"
    good_config = config_path.read_text()

    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="probe.json is not valid JSON"):
        load_probe(directory)

    for key, value in (("num_heads", 0), ("num_classes", -3)):  # hand-edited: the head's arithmetic, torch's sizes
        document = json.loads(good_config)
        document["head"][key] = value
        config_path.write_text(json.dumps(document))
        with pytest.raises(ValueError, match="probe.json: cannot build the head") as excinfo:
            load_probe(directory)
        assert "\n" not in str(excinfo.value)

    document = json.loads(good_config)
    document["head"]["dim"] = 16
    config_path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="key 'bn_bias' has shape|key '.*' has shape"):
        load_probe(directory)

    config_path.write_text(good_config)
    tensors = load_file(str(weights))
    del tensors["query"]
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"missing keys \['query'\]"):
        load_probe(directory)

    weights.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_probe(directory)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        load_probe(directory)
    config_path.unlink()
    with pytest.raises(FileNotFoundError, match="holds no saved probe"):
        load_probe(directory)
