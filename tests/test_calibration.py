"""plan's measurements run the real code: probe steps of the training loop, the prepare and extract steps, the
streamed reader; the step time they give multiplies out to what training takes; and the GPU check's dry run writes
its section in RESULTS.md's format."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from layerprobe.calibration import (
    ProbeShape,
    load_calibration,
    save_calibration,
    time_prepare_and_extract,
    time_probe,
    time_steps_fixed,
    time_streamed_reads,
)
from layerprobe.config import BackboneConfig, DatasetConfig, EvaluateConfig, ExtractConfig, PrepareConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TRAIN = TrainConfig(device="cpu", precision="float32")
ALF = ProbeShape(head="attentive", tokens=12, width=32, heads=12, grid=4, precision="float32")


def test_a_timed_step_multiplies_out_to_what_the_training_loop_takes():
    from layerprobe.calibration import _grid, _spec
    from layerprobe.train import train_selected

    figures = time_probe(ALF, batch=64, classes=10, device=torch.device("cpu"), train=TRAIN,
                         cache_dtype=torch.float16)  # fmt: skip
    assert figures["steps_timed"] >= 3 and figures["step_seconds"] > 0 and figures["predict_seconds_per_image"] > 0
    assert 0 < figures["data_seconds"] <= figures["step_seconds"]
    features = torch.randn(640, 12, 32).half()
    config = dataclasses.replace(TRAIN, epochs=1, min_steps=100, batch_size=64, batch_plan="even")
    start = time.perf_counter()
    trained = train_selected(_spec(ALF), features, torch.arange(640) % 10, num_classes=10, grid=_grid(ALF),
                             config=config)  # fmt: skip
    seconds = time.perf_counter() - start
    assert trained.steps == 100
    estimate = figures["setup_seconds"] + 100 * figures["step_seconds"]
    assert 0.33 < estimate / seconds < 3.0, (estimate, seconds)  # a shared 2-core machine's noise, not a model's


def test_the_steps_and_the_streamed_reader_are_timed_for_real(tmp_path):
    fixed = time_steps_fixed(train=TRAIN, evaluate=EvaluateConfig())
    assert fixed["train_step_fixed"] > 0 and fixed["evaluate_step_fixed"] > 0 and fixed["bootstrap_per_image"] > 0
    assert time_streamed_reads(rows=256, patches=8, width=32, batch=64) > 1e6  # bytes per second

    dataset = DatasetConfig(source="shapes", options={"num_images": 60, "image_size": 32, "seed": 0})
    backbone = BackboneConfig(model="vit_tiny_patch16_224", model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2,
                                                                          "embed_dim": 32, "num_heads": 2})  # fmt: skip
    figures = time_prepare_and_extract("shapes", dataset, backbone, extract=ExtractConfig(device="cpu"),
                                       prepare=PrepareConfig())  # fmt: skip
    assert set(figures) == {"prepare_per_image", "prepare_fixed", "extract_per_image", "extract_fixed"}
    assert figures["extract_per_image"] + figures["extract_fixed"] > 0


def test_a_calibration_file_round_trips_and_a_foreign_one_is_named(tmp_path):
    path = tmp_path / "calibration.json"
    assert load_calibration(path) == {}
    save_calibration(path, {"device": {"type": "cpu"}, "probes": {}})
    assert load_calibration(path)["device"] == {"type": "cpu"}
    path.write_text('{"format": "something-else/1"}')
    with pytest.raises(ValueError, match="is in format 'something-else/1'"):
        load_calibration(path)


@pytest.mark.slow  # four fresh Pythons importing torch (and Prefect): 1-3 minutes on 2 busy cores
def test_the_gpu_checks_dry_run_appends_every_section_to_results(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--quick", "--results",
                           str(results), "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = results.read_text()
    assert (
        text.startswith("# Benchmark results\n") and "\n## GPU check — `benchmarks/gpu.py` --quick (dry run)\n" in text
    )
    for title in ("Extraction vs a bare timm forward", "Probe steps at the paper's shapes", "`layerprobe plan --device "
                  "cpu`", "Two process workers on one device"):  # fmt: skip
        assert title in text, title
    assert "ratio (a)/(b)" in text and "grid step" in text and "study: extraction" in text and "throughput" in text
    assert "(exit" not in text and "(stopped" not in text
    assert load_calibration(tmp_path / "out" / "calibration-cpu.json")["device"]["type"] == "cpu"
