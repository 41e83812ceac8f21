"""A probe's selection left in its cache: read batch by batch it gives the rows held in memory, a probe trained and
evaluated on it is the in-memory probe, and training on a cache larger than the memory budget stays under it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from layerprobe.config import EvaluateConfig, PathsConfig, ProbeConfig, TrainConfig
from layerprobe.features import patch_shard_name, read_selection, shard_name, write_manifest, write_patch_shard
from layerprobe.features import write_shard as write_token_shard
from layerprobe.probes import gather_raw
from layerprobe.selection import MEMORY_BUDGET_ENV, StreamedSelection, open_selection, parse_bytes

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]
FAST = TrainConfig(
    lrs=[1e-2],
    weight_decays=[1e-4],
    attn_dropouts=[0.0, 0.1],
    epochs=1,
    min_steps=12,
    batch_size=32,
    device="cpu",
    precision="float32",
    jitter_val=True,
)


def write_cache(
    cache_dir: Path,
    *,
    num_images: int,
    patches: int = 16,
    dim: int = 32,
    shard_size: int = 50,
    val_every: int = 5,
    test_every: int = 7,
    seed: int = 0,
) -> Path:
    """A complete cache of random float16 tokens (block0 + final, cls/ap) and final patch tokens; the label is planted
    in patch 3. Row i is val when i % val_every == 1, test when i % test_every == 2, train otherwise."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((len(CLASSES), dim))
    cache_dir.mkdir(parents=True, exist_ok=True)
    provenance = {
        "layer_names": ["block0", "final"],
        "token_names": ["cls", "ap"],
        "dtype": "float16",
        "class_names": CLASSES,
        "final_patch_tokens": True,
        "patch_grid": None,
    }
    shards, patch_shards = [], []
    for number, start in enumerate(range(0, num_images, shard_size)):
        indices = np.arange(start, min(start + shard_size, num_images))
        labels = indices % len(CLASSES)
        splits = np.where(indices % test_every == 2, "test", np.where(indices % val_every == 1, "val", "train"))
        tokens = rng.standard_normal((len(indices), 2, 2, dim)).astype(np.float16)
        grid = rng.standard_normal((len(indices), patches, dim))
        grid[:, 3] += 2 * directions[labels]
        name = shard_name(number)
        sha = write_token_shard(
            cache_dir / name, tokens=tokens, labels=labels, indices=indices, splits=splits, metadata=provenance
        )
        patch_sha = write_patch_shard(
            cache_dir / patch_shard_name(name), patches=grid.astype(np.float16), indices=indices, metadata=provenance
        )
        shards.append((name, len(indices), sha))
        patch_shards.append((patch_shard_name(name), patch_sha))
    write_manifest(
        cache_dir,
        provenance=provenance,
        shards=shards,
        splits=["train", "val", "test"],
        plan_sha256="test",
        patch_shards=patch_shards,
    )
    return cache_dir


def all_tokens(tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """The all-tokens probe's selection: the final layer's cls and every patch token."""
    return gather_raw(tokens, [(1, 0), *[(1, 2 + p) for p in range(patches.shape[1])]], patches=patches)


def test_parse_bytes_reads_sizes_with_and_without_units():
    assert parse_bytes("1073741824") == 2**30 and parse_bytes("8GB") == 8 * 10**9 and parse_bytes("1.5GiB") == 3 * 2**29
    assert parse_bytes(" 512 mb ") == 512 * 10**6
    with pytest.raises(ValueError, match=r"LAYERPROBE_MEMORY_BUDGET='lots' is not a size"):
        parse_bytes("lots")


def test_a_streamed_selection_reads_the_rows_the_in_memory_one_holds(tmp_path, monkeypatch):
    cache = write_cache(tmp_path / "cache", num_images=230)
    in_memory = read_selection(cache, splits=["train", "val"], select=all_tokens, patches=True)
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "300KB")  # the selection takes 0.21 MB and a batch of 16 rows 0.14 MB
    streamed = open_selection(cache, splits=["train", "val"], select=all_tokens, patches=True, batch_rows=16)
    assert isinstance(streamed.features, StreamedSelection)
    assert streamed.counts == in_memory.counts and torch.equal(streamed.labels, in_memory.labels)
    assert streamed.features.shape == in_memory.features.shape and streamed.features.dtype == torch.float16
    order = torch.randperm(len(in_memory.labels), generator=torch.Generator().manual_seed(0))
    for rows in (order[:40], order, torch.tensor([5, 6, 7, 3, 3]), torch.tensor([], dtype=torch.long)):
        assert torch.equal(streamed.features.read(rows), in_memory.features[rows])  # across shards, in order asked
    val = streamed.features[streamed.rows("val")]  # a view of a range, as the sweep slices its splits
    assert len(val) == streamed.counts["val"]
    assert torch.equal(val.read(slice(3, 20)), in_memory.features[in_memory.rows("val")][3:20])
    with pytest.raises(TypeError, match="sliced by ranges"):
        streamed.features[::2]

    monkeypatch.setenv(MEMORY_BUDGET_ENV, "100KB")  # not even one batch fits: one line, both sizes
    with pytest.raises(MemoryError) as error:
        open_selection(cache, splits=["train", "val"], select=all_tokens, patches=True, batch_rows=16)
    assert "for one batch of 16 rows even read batch by batch" in str(error.value) and "\n" not in str(error.value)
    monkeypatch.delenv(MEMORY_BUDGET_ENV)
    kept = open_selection(cache, splits=["train", "val"], select=all_tokens, patches=True)
    assert isinstance(kept.features, torch.Tensor) and torch.equal(kept.features, in_memory.features)


def _train_and_evaluate(tmp_path: Path, name: str) -> tuple[dict, dict, dict]:
    from layerprobe.steps.evaluate import evaluate_step
    from layerprobe.steps.train import train_step

    paths = PathsConfig(
        features=str(tmp_path / "features"),
        probes=str(tmp_path / name / "probes"),
        results=str(tmp_path / name / "results"),
    )
    if not paths.features_dir("tiny", "planted").exists():
        write_cache(paths.features_dir("tiny", "planted"), num_images=300)
    train = dataclasses.replace(FAST, seeds=[0, 1])
    train_step("tiny", "planted", "attentive_last_all_tokens", probe=ProbeConfig(), train=train, paths=paths)
    result = evaluate_step(
        "tiny", "planted", "attentive_last_all_tokens", evaluate=EvaluateConfig(batch_size=40), paths=paths
    )
    weights = {
        seed: load_file(str(paths.seed_dir("tiny", "planted", "attentive_last_all_tokens", seed) / "probe.safetensors"))
        for seed in (0, 1)
    }
    sweep = json.loads((paths.seed_dir("tiny", "planted", "attentive_last_all_tokens", 0) / "sweep.json").read_text())
    return weights, sweep, result


def test_the_all_tokens_probe_trained_and_evaluated_streamed_is_the_one_trained_in_memory(tmp_path, monkeypatch):
    reads = []
    original = StreamedSelection.read
    monkeypatch.setattr(StreamedSelection, "read", lambda self, rows: reads.append(1) or original(self, rows))
    in_memory = _train_and_evaluate(tmp_path, "in-memory")
    assert not reads
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "1KB")  # no selection fits...
    monkeypatch.setattr("layerprobe.selection.working_bytes", lambda *args, **kwargs: 0)  # ...but every batch does
    streamed = _train_and_evaluate(tmp_path, "streamed")
    assert reads  # the sweep, its validation pass, the refit and evaluation read from the shards
    (weights, sweep, result), (weights_streamed, sweep_streamed, result_streamed) = in_memory, streamed
    for seed in (0, 1):
        assert weights[seed].keys() == weights_streamed[seed].keys()
        assert all(torch.equal(weights[seed][k], weights_streamed[seed][k]) for k in weights[seed])  # bit for bit
    assert sweep == sweep_streamed
    assert result["test"] == result_streamed["test"] and result["seeds"] == result_streamed["seeds"]
    assert result["test"]["balanced_accuracy"] > 0.6  # the planted patch is found (chance: 1/3)


RSS_SCRIPT = r"""
import dataclasses, json, resource, sys
from pathlib import Path
import layerprobe  # first: it sets OpenMP's wait policy before torch loads
import torch
from layerprobe.config import PathsConfig, ProbeConfig, TrainConfig
from layerprobe.probes import get_probe_spec
from layerprobe.selection import StreamedSelection
from layerprobe.train import make_grid, predict_selected, sweep_selected
from layerprobe.steps.train import train_step

reads = []
original = StreamedSelection.read
StreamedSelection.read = lambda self, rows: reads.append(1) or original(self, rows)
root = Path(sys.argv[1])
paths = PathsConfig(features=str(root / "features"), probes=str(root / "probes"), results=str(root / "results"))
train = TrainConfig(lrs=[1e-2], weight_decays=[1e-4], attn_dropouts=[0.0, 0.1], epochs=1, min_steps=1,
                    batch_size=256, device="cpu", precision="float32")
# A first training step faults in ~180 MB of torch's code pages (shared-library pages count as RSS): warm up on a
# tiny in-memory selection first, so the growth measured below is the data's.
tiny = torch.randn(64, 65, 64).half()
sweep_selected(get_probe_spec("attentive_last_all_tokens"), tiny, torch.arange(64) % 3, num_train=48, num_classes=3,
               grid=make_grid(train.lrs, train.weight_decays, train.attn_dropouts),
               config=dataclasses.replace(train, batch_size=16, min_steps=3))
def status(key: str) -> int:
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
# Importing and warming up can peak higher than anything after (freed memory goes back to the system), so the peak
# is restarted from here: Linux resets VmHWM to the current RSS when "5" is written to clear_refs.
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    reset = True
except OSError:
    reset = False
before = status("VmRSS:")
train_step("tiny", "big", "attentive_last_all_tokens", probe=ProbeConfig(), train=train, paths=paths)
peak = status("VmHWM:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "reset": reset, "reads": len(reads)}))
"""


@pytest.mark.slow  # a fresh Python importing torch, and ~120 steps on a 140 MB cache: 25-70 s on 2 cores
def test_training_on_a_cache_larger_than_the_memory_budget_stays_under_it(tmp_path):
    budget = 96 * 2**20
    cache = write_cache(
        tmp_path / "features" / "tiny" / "big",
        num_images=16_000,
        patches=64,
        dim=64,
        shard_size=2000,
        val_every=20,
        test_every=1000,
    )
    cache_bytes = sum(p.stat().st_size for p in cache.glob("*.arrow"))
    assert cache_bytes > 1.35 * budget  # 140 MB of shards against a 101 MB budget; the probe selects 133 MB
    environment = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}",
        MEMORY_BUDGET_ENV: str(budget),
        "OMP_NUM_THREADS": "2",
    }
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path)], env=environment, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    if not figures["reset"]:
        pytest.skip("this kernel does not let a process restart its peak RSS (/proc/self/clear_refs)")
    assert figures["reads"] > 100  # every batch came from the shards
    grown = figures["peak"] - figures["before"]
    assert grown < budget, f"peak RSS grew by {grown / 2**20:.0f} MiB, over the {budget / 2**20:.0f} MiB budget"
    assert (tmp_path / "probes" / "tiny" / "big" / "attentive_last_all_tokens" / "train.json").is_file()
