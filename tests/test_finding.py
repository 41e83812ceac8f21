"""The default suite shows the paper's finding, on a scaled-down copy of params.yaml run step by step in process.

The copy keeps the default's backbone, recipe and datasets but pretrains 400 steps on 6,000 images (instead of
900 on 12,000), probes 900 images per generated dataset with 200 steps, and keeps two probes and three datasets:
`shapes` (the pretraining task on new images) and two far from it (`texture`, real `digits`). What it must show:
far from pretraining, alf beats the last-layer linear probe by a clear margin and reads intermediate layers more than
the final one; on the pretraining task the gap is small. (The full default run also reads the final layer most on
`shapes` and less on every far task; at this scale that margin is too thin to test.)
Slow: about a minute on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from layerprobe.files import read_json
from layerprobe.params import load_params
from layerprobe.report import layer_reading, metrics_summary, write_report
from layerprobe.steps.evaluate import evaluate_step
from layerprobe.steps.extract import extract_step
from layerprobe.steps.prepare import prepare_step
from layerprobe.steps.pretrain import pretrain_step
from layerprobe.steps.train import train_step

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "vit_shapes_d6"
NEAR, FAR = "shapes", ["texture", "digits"]
PROBES = ["linear_last_cls", "alf"]

pytestmark = pytest.mark.slow


def scaled_down_default(root: Path):
    """params.yaml with the sizes cut; names, architecture, recipe shape and datasets as the default run has them."""
    params = load_params(ROOT / "params.yaml")
    paths = dataclasses.replace(
        params.paths,
        **{
            key: str(root / getattr(params.paths, key))
            for key in ("checkpoints", "data", "features", "probes", "results")
        },
    )
    backbone = params.backbones[BACKBONE]
    pretrain = dataclasses.replace(
        backbone.pretrain, steps=400, warmup_steps=20, options={**backbone.pretrain.options, "num_images": 6000}
    )
    checkpoint = str(root / backbone.checkpoint)
    backbone = dataclasses.replace(backbone, pretrain=pretrain, checkpoint=checkpoint)
    datasets = {
        name: dataclasses.replace(config, options={**config.options, "num_images": 900})
        if "num_images" in config.options
        else config
        for name, config in params.datasets.items()
    }
    train = dataclasses.replace(params.train, min_steps=200, device="cpu", precision="float32")
    return paths, backbone, datasets, train, params


def test_far_tasks_read_intermediate_layers_and_gain_near_tasks_do_not(tmp_path):
    paths, backbone, datasets, train, params = scaled_down_default(tmp_path)
    pretrained = pretrain_step(BACKBONE, backbone=backbone, progress=False)
    assert pretrained["held_out_accuracy"] > 0.5  # six classes: it learned the pretraining task
    evaluations, heatmaps = [], {}
    for dataset in [NEAR, *FAR]:
        prepare_step(dataset, dataset=datasets[dataset], prepare=params.prepare, paths=paths)
        extract_step(BACKBONE, dataset, backbone=backbone, extract=params.extract, paths=paths, progress=False)
        for probe in PROBES:
            train_step(BACKBONE, dataset, probe, probe=params.probe_config(probe), train=train, paths=paths)
            evaluations.append(evaluate_step(BACKBONE, dataset, probe, evaluate=params.evaluate, paths=paths))
        heatmaps[dataset] = read_json(paths.evaluation_dir(BACKBONE, dataset, "alf") / "heatmap.json")
    accuracy = {(e["dataset"], e["probe"]): 100 * e["test"]["balanced_accuracy"] for e in evaluations}
    gain = {d: accuracy[d, "alf"] - accuracy[d, "linear_last_cls"] for d in [NEAR, *FAR]}
    read = {d: layer_reading(heatmaps[d]) for d in [NEAR, *FAR]}
    summary = f"gains {gain}, reading {read}"

    for dataset in FAR:
        assert gain[dataset] >= 10, f"{dataset}: alf should beat linear_last_cls clearly; {summary}"
        assert read[dataset]["intermediate"] > read[dataset]["final"], f"{dataset} reads the final layer; {summary}"
    assert abs(gain[NEAR]) <= 5, f"the pretraining task should not need other layers; {summary}"

    # The report says the same: its reading table and one attention matrix for the backbone.
    groups = {name: config.group for name, config in datasets.items()}
    files = write_report(
        metrics_summary([{**e, "version": "1"} for e in evaluations]),
        tmp_path / "report",
        probes=PROBES,
        groups=groups,
        heatmaps={BACKBONE: heatmaps},
    )
    assert f"attention/{BACKBONE}" in files and "Where alf reads" in files["markdown"].read_text()
