"""An ImageNet-sized evaluation (1000 classes) stays small: the confusion figure has a capped canvas, metrics.json
holds no C² matrix, and the evaluation's peak memory stays under a stated bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from layerprobe.plots import DPI, confusion_figsize

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 1000
NUM_IMAGES = 20_000  # per class: 10 test images, 2 val, 8 train
# The evaluation's and its figures' growth over the resident size before them (measured: ~210 MiB, of which the
# bootstrap's chunks of draws ~140 MiB and the capped canvas's rendering ~200 MiB, one after the other); the uncapped
# figure alone was a 42,000-pixel, ~7 GB canvas.
MEMORY_BOUND = 320 * 2**20

SCRIPT = r"""
import json, resource, sys
from pathlib import Path
import layerprobe  # first: it sets OpenMP's wait policy before torch loads
import numpy as np
from layerprobe.config import EvaluateConfig, PathsConfig, ProbeConfig, TrainConfig
from layerprobe.features import shard_name, write_manifest, write_shard
from layerprobe.plots import draw_evaluation
from layerprobe.steps.evaluate import evaluate_step
from layerprobe.steps.train import train_step

root, num_classes, num_images = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
paths = PathsConfig(features=str(root / "features"), probes=str(root / "probes"), results=str(root / "results"))
cache = paths.features_dir("tiny", "many")
cache.mkdir(parents=True)
class_names = [f"class{c:04d}" for c in range(num_classes)]
provenance = {"layer_names": ["block0", "final"], "token_names": ["cls", "ap"], "dtype": "float16",
              "class_names": class_names, "final_patch_tokens": False, "patch_grid": None}
rng = np.random.default_rng(0)
directions = rng.standard_normal((num_classes, 64))
shards = []
for number, start in enumerate(range(0, num_images, 5000)):
    indices = np.arange(start, min(start + 5000, num_images))
    labels = indices % num_classes
    block = (indices // num_classes) % 20  # every block of num_classes rows holds each class once
    splits = np.where(block < 10, "test", np.where(block < 12, "val", "train"))
    tokens = rng.standard_normal((len(indices), 2, 2, 64))
    tokens[:, 1, 0] += 3 * directions[labels]  # the final CLS token carries the class
    sha = write_shard(cache / shard_name(number), tokens=tokens.astype(np.float16), labels=labels, indices=indices,
                      splits=splits, metadata=provenance)
    shards.append((shard_name(number), len(indices), sha))
write_manifest(cache, provenance=provenance, shards=shards, splits=["train", "val", "test"], plan_sha256="test")
train = TrainConfig(lrs=[1e-1], weight_decays=[1e-4], attn_dropouts=[0.0], epochs=1, min_steps=100, batch_size=1024,
                    seeds=[0, 1], device="cpu", precision="float32")
train_step("tiny", "many", "linear_last_cls", probe=ProbeConfig(), train=train, paths=paths)

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
# Importing and training peak higher than the evaluation may (freed memory goes back to the system): the peak is
# restarted here (Linux resets VmHWM to the current RSS when "5" is written to clear_refs), else ru_maxrss is used.
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    reset = True
except OSError:
    reset = False
before = status("VmRSS:")
result = evaluate_step("tiny", "many", "linear_last_cls", evaluate=EvaluateConfig(), paths=paths)
figures = draw_evaluation(result, paths.evaluation_dir("tiny", "many", "linear_last_cls"), title="many")
peak = status("VmHWM:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "reset": reset, "figures": figures,
                  "metrics": result["outputs"]["metrics"], "accuracy": result["test"]["accuracy"]}))
"""


@pytest.mark.slow  # a fresh Python importing torch, a 1000-class probe trained and evaluated: ~30 s on 2 cores
def test_a_1000_class_evaluation_stays_under_its_memory_bound_with_a_capped_figure(tmp_path):
    environment = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}",
        "OMP_NUM_THREADS": "2",
        "MPLBACKEND": "Agg",
        "LAYERPROBE_STATE_DIR": str(tmp_path / "state"),
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(NUM_CLASSES), str(NUM_IMAGES)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"peak RSS grew {(figures['peak'] - figures['before']) / 2**20:.0f} MiB over {figures['before'] / 2**20:.0f}"
        f" MiB; test accuracy {figures['accuracy']:.3f}; metrics.json {Path(figures['metrics']).stat().st_size} B"
    )
    assert figures["accuracy"] > 10 / NUM_CLASSES  # a real probe was scored (chance: 0.001)
    image = matplotlib.image.imread(figures["figures"]["confusion_png"])
    width, height = confusion_figsize(NUM_CLASSES)
    assert image.shape[:2] == (round(height * DPI), round(width * DPI)) and max(image.shape[:2]) <= 2500
    assert image.std() > 0.01  # not blank
    # 1000 per-class recalls per seed, not a million counts
    assert Path(figures["metrics"]).stat().st_size < 200_000
    if not figures["reset"]:
        pytest.skip("this kernel does not let a process restart its peak RSS (/proc/self/clear_refs)")
    grown = figures["peak"] - figures["before"]
    assert grown < MEMORY_BOUND, f"peak RSS grew by {grown / 2**20:.0f} MiB, over {MEMORY_BOUND / 2**20:.0f} MiB"


def test_the_confusion_figure_names_classes_only_while_they_fit(tmp_path):
    from layerprobe.plots import CONFUSION_NAMED, plot_confusion_matrix

    rng = np.random.default_rng(0)
    for classes in (5, CONFUSION_NAMED, 300):
        counts = rng.integers(0, 5, (classes, classes)) + 20 * np.eye(classes, dtype=int)
        path = plot_confusion_matrix(counts, [f"c{i}" for i in range(classes)], tmp_path / f"{classes}.png")
        shape = matplotlib.image.imread(path).shape[:2]
        width, height = confusion_figsize(classes)
        assert shape == (round(height * DPI), round(width * DPI))
    assert confusion_figsize(300) == confusion_figsize(CONFUSION_NAMED) == confusion_figsize(10**6)
