"""`predict`: the probe's backbone weights are checked by hash, images are checked by header and decoded batch by batch,
and a malformed probe.json is one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import layerprobe.predict as predict_module
from layerprobe.backbone import create_backbone
from layerprobe.checkpoint import save_probe
from layerprobe.config import BackboneConfig
from layerprobe.data import ImageFileError
from layerprobe.extract import LayerTokenExtractor
from layerprobe.files import sha256_file
from layerprobe.predict import iter_predictions, predict_images
from layerprobe.probes import build_probe, extract_member, get_probe_spec, select_token_positions
from layerprobe.steps.extract import weights_identity

MODEL = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def _checkpoint(path: Path, seed: int) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        weights = create_backbone(MODEL, model_kwargs=TINY, init_seed=seed).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    return path


def _probe(tmp_path: Path, **provenance_overrides) -> tuple[Path, Path]:
    """A linear probe on the final cls token of a tiny ViT loaded from a local checkpoint, saved as train saves it."""
    checkpoint = _checkpoint(tmp_path / "backbone.safetensors", seed=1)
    backbone = BackboneConfig(model=MODEL, checkpoint=str(checkpoint), model_kwargs=TINY)
    extractor = LayerTokenExtractor(create_backbone(MODEL, checkpoint=checkpoint, model_kwargs=TINY))
    spec = get_probe_spec("linear_last_cls")
    positions = select_token_positions(
        extractor.layer_names, extractor.token_names, layers=spec.layers, tokens=spec.tokens
    )
    head = build_probe(spec, num_tokens=len(positions), dim=extractor.dim, num_classes=3)
    provenance = {
        "model": MODEL,
        "checkpoint": str(checkpoint),
        "weights": weights_identity(backbone),
        "model_kwargs": TINY,
        "tap": "norm2",
        "layer_names": extractor.layer_names,
    }
    provenance.update(provenance_overrides)
    config = {"class_names": ["a", "b", "c"], "positions": [list(p) for p in positions], "provenance": provenance}
    return save_probe(tmp_path / "probe", extract_member(head, 0), config), checkpoint


def _images(folder: Path, count: int, size: int = 32) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture
def decoded(monkeypatch) -> list[Path]:
    """Every image `predict` decodes, in order."""
    seen: list[Path] = []
    original = predict_module.load_image_file

    def load(path: Path, **kwargs):
        seen.append(path)
        return original(path, **kwargs)

    monkeypatch.setattr(predict_module, "load_image_file", load)
    return seen


def test_predict_decodes_one_batch_at_a_time_and_agrees_with_all_at_once(tmp_path, decoded):
    probe, _ = _probe(tmp_path)
    images = _images(tmp_path / "images", 5)
    rows = iter_predictions(probe, images, batch_size=2)
    first = next(rows)
    assert decoded == images[:2]  # the first batch only: the other three are not decoded yet
    streamed = [first, *rows]
    assert decoded == images
    together = predict_images(probe, images, batch_size=5)
    assert [r["path"] for r in streamed] == [r["path"] for r in together] == [str(p) for p in images]
    assert [r["label"] for r in streamed] == [r["label"] for r in together]
    assert [r["probability"] for r in streamed] == pytest.approx([r["probability"] for r in together], abs=1e-5)


def test_a_re_pretrained_checkpoint_is_an_error_naming_both_hashes_before_any_image_is_decoded(tmp_path, decoded):
    probe, checkpoint = _probe(tmp_path)
    trained_on = sha256_file(checkpoint)
    _checkpoint(checkpoint, seed=2)  # re-pretrained: same path, other weights
    with pytest.raises(ValueError) as excinfo:
        predict_images(probe, _images(tmp_path / "images", 2))
    message = str(excinfo.value)
    assert "\n" not in message and str(checkpoint) in message
    assert f"file:sha256:{sha256_file(checkpoint)}" in message and f"file:sha256:{trained_on}" in message
    assert decoded == []


def test_images_over_the_recorded_pixel_cap_or_not_images_are_one_error_before_decoding(tmp_path, decoded):
    probe, _ = _probe(tmp_path, max_image_pixels=32 * 32)  # the cap the training images were decoded with
    good = _images(tmp_path / "images", 1)
    big = _images(tmp_path / "big", 1, size=33)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageFileError) as excinfo:
        predict_images(probe, [*good, *big, text, tmp_path / "missing.png"])
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith("3 bad image(s): ")
    assert "0.png: declares 33x33 = 1,089 pixels, over the cap of 1,024" in message
    assert "notes.png: not an image" in message and "missing.png: not found" in message
    assert decoded == []


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda c: c.pop("provenance"), "'provenance' is missing"),
        (lambda c: c["provenance"].pop("tap"), "'provenance.tap' is missing"),
        (lambda c: c.update(positions=[[1]]), "'positions' must be [layer, token] index pairs"),
        (lambda c: c["head"].update(num_classes=-3), "cannot build the head"),
    ],
    ids=["no-provenance", "no-tap", "bad-positions", "negative-classes"],
)
def test_a_malformed_probe_json_is_one_line_naming_the_key(tmp_path, edit, named):
    probe, _ = _probe(tmp_path)
    config = json.loads((probe / "probe.json").read_text())
    edit(config)
    (probe / "probe.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as excinfo:
        predict_images(probe, _images(tmp_path / "images", 1))
    message = str(excinfo.value)
    assert "\n" not in message and "probe.json" in message and named in message


def test_predict_refuses_a_probe_whose_checkpoint_carries_a_code_payload_and_runs_none_of_it(
    tmp_path, capsys, unpickling_timm
):
    """Whoever can write a shared probe folder can point its probe.json at any checkpoint and record that file's
    hash: the hash then matches, so only loading without pickle keeps the payload from running."""
    from layerprobe.cli import main

    probe, checkpoint = _probe(tmp_path)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    shared = tmp_path / "shared.pth"
    torch.save({"state_dict": dict(create_backbone(MODEL, model_kwargs=TINY).state_dict()), "x": Payload()}, shared)
    config = json.loads((probe / "probe.json").read_text())
    config["provenance"].update(checkpoint=str(shared), weights=f"file:sha256:{sha256_file(shared)}")
    (probe / "probe.json").write_text(json.dumps(config))
    images = _images(tmp_path / "images", 2)
    assert main(["predict", "--probe", str(probe), "--images", *map(str, images)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(shared) in err and "(exec)" in err
    assert not marker.exists()
