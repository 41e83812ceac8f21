"""Which layers an ALF needs: the knock-out mask, a planted signal found by the knock-out and by alf_truncated, the
truncated backbone's features and `predict` through it, and the margin's check at params load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm.models.vision_transformer as vit
import torch
from PIL import Image

from layerprobe.config import EvaluateConfig, ParamsError, PathsConfig, ProbeConfig, TrainConfig
from layerprobe.extract import LayerTokenExtractor
from layerprobe.probes import ReferenceAttentiveHead, StackedAttentiveHead
from tests.conftest import built_once, copy_project, tiny_params

MODEL = "vit_tiny_patch16_224"
BLOCKS = 4
WIDTH = 16
TINY = {"img_size": 32, "patch_size": 8, "depth": BLOCKS, "embed_dim": WIDTH, "num_heads": 2}
PLANTED = "block2"  # the one layer whose tokens carry the class: depth 3 of 4


# ---------------------------------------------------------------- (a) the knock-out mask


def _trained_like_head(seed: int = 0) -> StackedAttentiveHead:
    """A 2-member head with non-trivial weights and BatchNorm statistics, in eval mode."""
    head = StackedAttentiveHead(2, dim=WIDTH, num_heads=4, num_classes=3)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
        head.bn_running_mean.normal_(0, 0.1, generator=generator)
        head.bn_running_var.uniform_(0.5, 2.0, generator=generator)
    return head.eval()


def test_a_masked_token_is_as_if_the_alf_never_saw_it():
    head = _trained_like_head()
    x = torch.randn(5, 6, WIDTH, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([True, False, True, True, False, True])
    logits, attention = head(x, return_attention=True, keep=keep)
    alone, alone_attention = head(x[:, keep], return_attention=True)  # the tokens left: softmax over them only
    torch.testing.assert_close(logits, alone, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(attention[..., keep], alone_attention, atol=1e-6, rtol=1e-5)
    assert torch.all(attention[..., ~keep] == 0)
    for member in range(2):  # and the straightforward ALF (per-token K, V) on the kept tokens
        reference = ReferenceAttentiveHead.from_member(head, member)
        torch.testing.assert_close(logits[member], reference(x[:, keep]), atol=2e-5, rtol=1e-5)
    everything = torch.ones(6, dtype=torch.bool)
    assert torch.equal(head(x, keep=everything), head(x))
    with pytest.raises(ValueError, match="a token kept"):
        head(x, keep=torch.zeros(6, dtype=torch.bool))


# ---------------------------------------------------------------- (b) a planted signal, end to end


def _write_planted_cache(cache: Path, *, num_images: int = 600, num_classes: int = 3) -> None:
    """A feature cache of a 4-block tiny ViT (its provenance names the real model, so evaluate can time it) whose
    tokens are noise, but for `PLANTED`'s cls and ap, which carry the class."""
    from layerprobe.features import shard_name, write_manifest, write_shard

    cache.mkdir(parents=True)
    layer_names = [f"block{i}" for i in range(BLOCKS)] + ["final"]
    provenance = {
        "model": MODEL,
        "pretrained": False,
        "model_kwargs": TINY,
        "tap": "norm2",
        "layer_names": layer_names,
        "token_names": ["cls", "ap"],
        "layer_widths": [WIDTH] * len(layer_names),
        "dim": WIDTH,
        "dtype": "float32",
        "class_names": [f"c{c}" for c in range(num_classes)],
        "final_patch_tokens": False,
        "patch_grid": [4, 4],
    }
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((num_classes, WIDTH))
    indices = np.arange(num_images)
    labels = indices % num_classes
    part = (indices // num_classes) % 5
    splits = np.where(part < 3, "train", np.where(part < 4, "val", "test"))
    tokens = rng.standard_normal((num_images, len(layer_names), 2, WIDTH))
    tokens[:, layer_names.index(PLANTED)] += 6 * directions[labels][:, None, :]
    sha = write_shard(
        cache / shard_name(0),
        tokens=tokens.astype(np.float32),
        labels=labels,
        indices=indices,
        splits=splits,
        metadata=provenance,
    )
    write_manifest(
        cache,
        provenance=provenance,
        shards=[(shard_name(0), num_images, sha)],
        splits=["train", "val", "test"],
        plan_sha256="planted",
    )


def _build_planted(folder: Path) -> None:
    from layerprobe.steps.evaluate import evaluate_step
    from layerprobe.steps.train import train_step

    paths = _paths(folder)
    _write_planted_cache(paths.features_dir("tiny", "planted"))
    train = PLANTED_RECIPE
    for probe in ("alf", "alf_truncated"):
        train_step("tiny", "planted", probe, probe=ProbeConfig(), train=train, paths=paths)
        evaluate_step("tiny", "planted", probe, evaluate=EvaluateConfig(), paths=paths)


# One grid point, so alf's selection is fixed and the planted layer alone decides the truncation.
PLANTED_RECIPE = TrainConfig(
    lrs=[1e-2],
    weight_decays=[1e-4],
    attn_dropouts=[0.0],
    epochs=1,
    min_steps=150,
    batch_size=64,
    seeds=[0],
    device="cpu",
    precision="float32",
)


def _paths(folder: Path) -> PathsConfig:
    return PathsConfig(
        features=str(folder / "features"), probes=str(folder / "probes"), results=str(folder / "results")
    )


@pytest.fixture
def planted(tmp_path_factory) -> PathsConfig:
    """alf and alf_truncated trained and evaluated on the planted cache, once per session."""
    return _paths(built_once(tmp_path_factory, "truncation-planted", _build_planted))


def _metrics(paths: PathsConfig, probe: str) -> dict:
    return json.loads(paths.evaluation_marker("tiny", "planted", probe).read_text())


def test_the_knockout_finds_the_planted_layer(planted):
    knockout = _metrics(planted, "alf")["knockout"]
    print({layer: round(drop, 3) for layer, drop in zip(knockout["layers"], knockout["drop"], strict=True)})
    assert knockout["layers"] == ["block1", "block2", "block3", "final"]  # the paper preset's layers
    planted_at = knockout["layers"].index(PLANTED)
    drops = np.array(knockout["drop"])
    assert drops.argmax() == planted_at and knockout["interval"][planted_at][0] > 0
    others = np.delete(drops, planted_at)
    assert np.all(np.abs(others) < 0.1)  # the layers that carry nothing cost nothing


def test_the_truncation_stops_at_the_planted_layer_and_is_a_standard_probe(planted):
    from layerprobe.checkpoint import load_probe

    metrics = _metrics(planted, "alf_truncated")
    record = metrics["truncation"]
    print(record)
    assert record["depth"] == 3 and record["blocks"] == BLOCKS  # block2 needs blocks 0..2: not 2, not 4
    assert record["layers"] == ["block1", "block2"] and record["margin"] == 0.01
    assert [depth for depth, _ in record["val_by_depth"]] == [2, 3]  # stopped at the first within the margin
    assert record["val_by_depth"][0][1] < 0.6 < record["val_by_depth"][1][1]  # block1 alone is near chance
    assert record["val_by_depth"][1][1] >= record["full_val_balanced_accuracy"] - 0.01
    assert all(set(record[key]) == {"extract", "predict"} for key in ("speedup", "speedup_wall"))
    assert all(v > 0 for v in record["speedup"].values())
    assert metrics["test"]["balanced_accuracy"] > 0.9 and "knockout" in metrics  # scored like any ALF
    _, config = load_probe(planted.seed_dir("tiny", "planted", "alf_truncated", 0))
    assert config["token_labels"] == ["block1/cls", "block1/ap", "block2/cls", "block2/ap"]


def test_retraining_alf_makes_alf_truncated_stale(planted, tmp_path):
    from layerprobe.steps.train import train_step

    paths = _paths(copy_project(Path(planted.features).parent, tmp_path / "copy"))
    train = PLANTED_RECIPE
    reused = train_step("tiny", "planted", "alf_truncated", probe=ProbeConfig(), train=train, paths=paths)
    assert reused["status"] == "reused"
    marker = paths.train_marker("tiny", "planted", "alf")
    alf = json.loads(marker.read_text())
    alf["fingerprint"]["value"] = "alf retrained"  # as a retrained alf's marker records (its files unchanged)
    marker.write_text(json.dumps(alf))
    again = train_step("tiny", "planted", "alf_truncated", probe=ProbeConfig(), train=train, paths=paths)
    assert again["status"] == "computed" and again["reason"] == "inputs changed"


# ---------------------------------------------------------------- (c) the truncated backbone's features


@pytest.mark.parametrize("tap", ["norm2", "block"])
def test_a_truncated_backbone_gives_the_full_ones_features_at_its_layers(tap, monkeypatch):
    model = timm_model()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    full = LayerTokenExtractor(model, tap=tap)
    expected = full(images)
    ran = count_block_forwards(monkeypatch)
    for depth in range(1, BLOCKS):
        ran.clear()
        truncated = LayerTokenExtractor(model, tap=tap, depth=depth)
        tokens = truncated(images)
        assert truncated.layer_names == full.layer_names[:depth] and tokens.shape == (3, depth, 2, WIDTH)
        assert torch.equal(tokens, expected[:, :depth])
        assert len(ran) == depth  # blocks past depth never ran
    assert torch.equal(LayerTokenExtractor(model, tap=tap, depth=BLOCKS)(images), expected)  # all of it: final too
    with pytest.raises(ValueError, match="depth 5 is outside 1..4"):
        LayerTokenExtractor(model, tap=tap, depth=BLOCKS + 1)


def timm_model():
    from layerprobe.backbone import create_backbone

    return create_backbone(MODEL, model_kwargs=TINY)


def count_block_forwards(monkeypatch) -> list:
    """Every timm ViT block forward from now on appends to the returned list."""
    ran, forward = [], vit.Block.forward

    def counted(self, *args, **kwargs):
        ran.append(self)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(vit.Block, "forward", counted)
    return ran


# ---------------------------------------------------------------- (d) predict through the truncated backbone


def test_predict_runs_the_backbone_only_as_deep_as_the_probe_reads(planted, tmp_path, monkeypatch):
    from layerprobe.backbone import create_eval_transform
    from layerprobe.checkpoint import load_probe
    from layerprobe.layer_evaluation import build_extractor, classify_pixels
    from layerprobe.predict import predict_images

    probe_dir = planted.seed_dir("tiny", "planted", "alf_truncated", 0)
    images = []
    rng = np.random.default_rng(0)
    for i in range(4):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images[-1])
    ran = count_block_forwards(monkeypatch)
    predicted = predict_images(probe_dir, images, batch_size=4)
    assert len(ran) == 3  # blocks 0..2 for block1 and block2, not the 4th
    probe, config = load_probe(probe_dir)
    full = build_extractor(config)  # the whole backbone, as predict ran it before
    transform = create_eval_transform(full.model, crop_pct=None)
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    ran.clear()
    labels, logits = classify_pixels(full, probe, config, pixels)
    assert len(ran) == BLOCKS
    assert [p["label"] for p in predicted] == labels.tolist()
    probabilities = torch.as_tensor(logits).softmax(-1)[torch.arange(4), labels]
    np.testing.assert_allclose([p["probability"] for p in predicted], probabilities.numpy(), rtol=1e-5)


def test_the_pyfunc_takes_the_truncated_backbones_layers(planted):
    from types import SimpleNamespace

    from layerprobe.features import read_features
    from layerprobe.mlflow_model import ProbeModel
    from layerprobe.steps.evaluate import signature_example

    probe_dir = planted.seed_dir("tiny", "planted", "alf_truncated", 0)
    features_dir = planted.features_dir("tiny", "planted")
    example, predictions = signature_example(probe_dir=probe_dir, features_dir=features_dir, num_rows=4)
    assert example.shape == (4, 3, 2, WIDTH)  # block0..block2: what depth 3 yields
    model = ProbeModel()
    model.load_context(SimpleNamespace(artifacts={"probe": str(probe_dir)}))
    full = read_features(features_dir, split="test", max_rows=4).tokens.float().numpy()
    assert np.array_equal(model.predict(None, example), predictions)
    assert np.array_equal(model.predict(None, full), predictions)  # the full layout reads the same slots
    with pytest.raises(ValueError, match="at least 3 layers"):
        model.predict(None, example[:, :2])


# ---------------------------------------------------------------- (e) params


def test_the_margin_is_checked_at_params_load():
    from layerprobe.params import params_from_dict

    def load(probes: list[str], **settings):
        raw = tiny_params()
        raw["suite"]["probes"] = probes
        raw["probes"]["alf_truncated"] = settings
        return params_from_dict(raw, source="params.yaml")

    assert load(["alf", "alf_truncated"]).probe_config("alf_truncated").margin == 0.01
    assert load(["alf", "alf_truncated"], truncation_margin=0.05).probe_config("alf_truncated").margin == 0.05
    for bad, message in (
        (1.5, "params.yaml: probes.alf_truncated: probes.*.truncation_margin must be in [0, 1], got 1.5"),
        (-0.01, "params.yaml: probes.alf_truncated: probes.*.truncation_margin must be in [0, 1], got -0.01"),
    ):
        with pytest.raises(ParamsError) as error:
            load(["alf", "alf_truncated"], truncation_margin=bad)
        assert str(error.value) == message
    with pytest.raises(ParamsError, match="^params.yaml: suite.probes lists alf_truncated without alf, [^\n]*$"):
        load(["linear_last_cls", "alf_truncated"])
    with pytest.raises(ParamsError, match="^params.yaml: probes.alf_truncated.layers: alf_truncated reads what alf"):
        load(["alf", "alf_truncated"], layers="last")
