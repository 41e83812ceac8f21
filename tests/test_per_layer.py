"""The per-layer family: each member is that layer's linear probe trained alone, a planted layer is found by the
curve and saved as the standard probe, predict reads it, and evaluate's `per_layer` block is what the report reads."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from layerprobe.config import EvaluateConfig, ProbeConfig, TrainConfig
from layerprobe.per_layer import KINDS, sweep_family
from layerprobe.probes import ProbeSpec, gather_raw, get_probe_spec, select_token_positions
from layerprobe.train import make_grid, sweep_selected
from tests.conftest import built_once
from tests.test_train import LAYERS, TOKENS, planted
from tests.test_truncation import BLOCKS, PLANTED, PLANTED_RECIPE, _paths, _write_planted_cache

# ---------------------------------------------------------------- (a) each member is its layer's probe alone


@pytest.mark.parametrize("jitter_val", [False, True])
def test_every_member_equals_its_layers_linear_probe_trained_alone(jitter_val):
    tokens, labels = planted(160, signal={2: 0}, num_classes=3, seed=4)
    num_train = 110
    family = get_probe_spec("per_layer")
    positions = select_token_positions(LAYERS, TOKENS, layers=family.layers, tokens=("cls", "ap"))
    features = gather_raw(tokens, positions)  # [N, 2L, D]: what the train step selects
    config = TrainConfig(
        epochs=1, min_steps=20, batch_size=32, device="cpu", precision="float32", jitter_val=jitter_val
    )
    grid = make_grid([1e-2, 1e-1], [1e-4, 1e-1])
    together = sweep_family(
        family,
        features,
        labels,
        num_train=num_train,
        num_layers=len(LAYERS),
        num_classes=3,
        grid=grid,
        config=config,
        seed=5,
    )
    for kind, kind_tokens in KINDS.items():
        for layer in range(len(LAYERS)):
            spec = ProbeSpec("alone", layers=(layer,), tokens=kind_tokens, head="linear")
            slots = select_token_positions(LAYERS, TOKENS, layers=spec.layers, tokens=spec.tokens)
            alone = sweep_selected(
                spec,
                gather_raw(tokens, slots),
                labels,
                num_train=num_train,
                num_classes=3,
                grid=grid,
                config=config,
                seed=5,
            )
            where = f"{kind} layer {layer}"
            assert [s["balanced_accuracy"] for s in together.val_scores[kind][layer]] == [
                s["balanced_accuracy"] for s in alone.val_scores
            ], where
            assert together.best_index[kind][layer] == alone.best_index, where
            member = together.refit.member(kind, layer).state_dict()
            for key, value in alone.probe.state_dict().items():
                torch.testing.assert_close(member[key], value, atol=1e-5, rtol=1e-5, msg=where)
    single = 2 * len(LAYERS)  # the cls and ap heads use their first D columns only: the rest stay exactly zero
    assert torch.all(together.refit.weight[:single, :, tokens.shape[-1] :] == 0)
    scores = [s["balanced_accuracy"] for s in together.val_scores["ap"][2]]
    assert max(scores) > 0.9 > max(s["balanced_accuracy"] for s in together.val_scores["ap"][0])  # they differ


# ---------------------------------------------------------------- (b) a planted layer, through train and evaluate


def _build_planted(folder: Path) -> None:
    from layerprobe.steps.evaluate import evaluate_step
    from layerprobe.steps.train import train_step

    paths = _paths(folder)
    _write_planted_cache(paths.features_dir("tiny", "planted"))
    recipe = replace(PLANTED_RECIPE, lrs=[1e-2, 1e-1], weight_decays=[1e-4], seeds=[0, 1])
    train_step("tiny", "planted", "per_layer", probe=ProbeConfig(), train=recipe, paths=paths)
    evaluate_step("tiny", "planted", "per_layer", evaluate=EvaluateConfig(), paths=paths)


@pytest.fixture
def family(tmp_path_factory):
    """per_layer trained (two seeds, a grid of two) and evaluated on test_truncation's planted cache, once."""
    return _paths(built_once(tmp_path_factory, "per-layer-planted", _build_planted))


def _metrics(paths) -> dict:
    return json.loads(paths.evaluation_marker("tiny", "planted", "per_layer").read_text())


def test_the_curve_finds_the_planted_layer_and_saves_it_as_the_standard_probe(family):
    from layerprobe.checkpoint import load_probe

    metrics = _metrics(family)
    block = metrics["per_layer"]
    print({kind: [round(v, 3) for v in curve] for kind, curve in block["test_balanced_accuracy"].items()})
    layers = [f"block{i}" for i in range(BLOCKS)] + ["final"]
    assert block["layers"] == layers and block["kinds"] == ["cls", "ap", "cls_ap"]
    planted_at = layers.index(PLANTED)
    for kind in block["kinds"]:  # the planted layer's cls and ap both carry the class
        curve = np.array(block["test_balanced_accuracy"][kind])
        assert curve[planted_at] > 0.9 and np.all(np.delete(curve, planted_at) < 0.6), kind
        assert block["interval"][kind][planted_at][0] > 0.8
    assert block["selected"]["layer"] == PLANTED
    _, config = load_probe(family.seed_dir("tiny", "planted", "per_layer", 1))
    assert config["token_labels"] == [f"{PLANTED}/{t}" for t in KINDS[block["selected"]["kind"]]]
    assert config["head"]["kind"] == "linear" and config["spec"]["layers"] == [planted_at]
    assert metrics["test"]["balanced_accuracy"] > 0.9  # the headline: the selected head, scored like any probe
    history = json.loads((family.seed_dir("tiny", "planted", "per_layer", 1) / "history.json").read_text())
    assert history and all(len(row["loss"]) == len(row["lr"]) == 1 for row in history)  # a G=1 refit's, as MLflow reads


# ---------------------------------------------------------------- (c) predict through the selected layer's depth


def test_predict_reads_the_selected_head_through_its_layers_depth(family, tmp_path, monkeypatch):
    from PIL import Image

    from layerprobe.backbone import create_eval_transform
    from layerprobe.checkpoint import load_probe
    from layerprobe.layer_evaluation import build_extractor
    from layerprobe.per_layer import load_family
    from layerprobe.predict import predict_images
    from tests.test_truncation import count_block_forwards

    probe_dir = family.seed_dir("tiny", "planted", "per_layer", 0)
    rng = np.random.default_rng(0)
    images = []
    for i in range(6):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images[-1])
    ran = count_block_forwards(monkeypatch)
    predicted = predict_images(probe_dir, images, batch_size=6)
    assert len(ran) == int(PLANTED.removeprefix("block")) + 1  # block2 needs blocks 0..2 only
    _, config = load_probe(probe_dir)
    head, record = load_family(probe_dir)
    full = build_extractor(config)
    transform = create_eval_transform(full.model, crop_pct=None)
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    tokens, _ = full.forward_all(pixels)
    selected = record["selected"]
    features = gather_raw(tokens, [tuple(p) for p in record["positions"]], width=record["width"])
    logits = head(torch.nn.functional.normalize(features.float(), dim=-1))  # [3L, b, C]
    stacked = logits[head.index(selected["kind"], record["layers"].index(selected["layer"]))].argmax(-1)
    assert [p["label"] for p in predicted] == stacked.tolist()


# ---------------------------------------------------------------- (d) the metrics block and the report


def test_the_block_has_the_designs_format_and_the_report_reads_it(family):
    from layerprobe.layer_report import task_findings

    block = _metrics(family)["per_layer"]
    assert set(block) == {"layers", "kinds", "test_balanced_accuracy", "interval", "val_balanced_accuracy", "selected"}
    for key in ("test_balanced_accuracy", "interval", "val_balanced_accuracy"):
        assert set(block[key]) == set(block["kinds"]) and all(
            len(v) == len(block["layers"]) for v in block[key].values()
        )
    for kind in block["kinds"]:
        for score, (low, high) in zip(block["test_balanced_accuracy"][kind], block["interval"][kind], strict=True):
            assert 0 <= low <= high <= 1 and 0 <= score <= 1
    trained = json.loads(family.train_marker("tiny", "planted", "per_layer").read_text())
    seeds = [json.loads((Path(e["dir"]) / "per_layer.json").read_text()) for e in trained["seeds"]]
    kind = block["selected"]["kind"]
    at = block["layers"].index(block["selected"]["layer"])
    mean_val = np.mean([s["val_balanced_accuracy"][kind][at] for s in seeds])
    assert block["val_balanced_accuracy"][kind][at] == pytest.approx(mean_val)
    findings = task_findings({"per_layer": _metrics(family)}, None)
    assert findings["best"]["layer"] == block["selected"]["layer"] and findings["best"]["kind"] == kind
    assert findings["best"]["test"] == pytest.approx(100 * block["test_balanced_accuracy"][kind][at])


def test_params_refuse_per_layer_settings_it_cannot_honour():
    from layerprobe.config import ParamsError
    from layerprobe.params import params_from_dict
    from tests.conftest import tiny_params

    def load(**settings):
        raw = tiny_params()
        raw["suite"]["probes"] = ["linear_last_cls", "per_layer"]
        raw["probes"]["per_layer"] = settings
        return params_from_dict(raw, source="params.yaml")

    assert load(layers="paper").probe_config("per_layer").layers == "paper"
    for key, value in (("tokens", ["cls"]), ("normalize", "across_tokens"), ("num_heads", 2), ("pad_final", False)):
        with pytest.raises(ParamsError) as error:
            load(**{key: value})
        message = str(error.value)
        assert message.startswith(f"params.yaml: probes.per_layer.{key}: ") and "\n" not in message, message
