"""`layerprobe plan`: the paper's whole suite resolves offline (timm names, dataset entries), sizes add up,
and caches that would not fit on disk are refused before anything runs."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import pytest
import timm

from layerprobe.cli import main
from layerprobe.params import load_params
from layerprobe.plan import backbone_shape, check_disk, plan_suite, training_sizes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper():
    return load_params(ROOT / "params.paper.yaml")


FAKE_POINT = {"setup_seconds": 0.5, "predict_seconds_per_image": 1e-5, "steps_timed": 3}


def fake_step_seconds(shape, batch: int, classes: int) -> float:
    """A step time affine in the batch and the classes, as the estimate assumes: 0.01 s + work at 1 TMAC/s."""
    return 0.01 + shape.work(batch, classes) / 1e12


@pytest.fixture
def fake_timers(monkeypatch):
    """Every measurement plan makes, replaced by a fixed figure (the real ones are tested in test_calibration.py);
    returns the list of (shape, batch, classes) points plan asked to time."""
    import layerprobe.calibration as calibration

    timed = []

    def time_probe(shape, *, batch, classes, **_):
        timed.append((shape, batch, classes))
        step = fake_step_seconds(shape, batch, classes)
        return {**FAKE_POINT, "step_seconds": step, "data_seconds": 0.2 * step}

    fakes = {
        "time_probe": time_probe,
        "time_predict": lambda *a, **k: 1e-5,
        "time_process_start": lambda device: {"process_start": 5.0, "mlflow_import": 2.0, "first_training": 3.0},
        "time_steps_fixed": lambda **k: {
            "train_step_fixed": 0.1,
            "evaluate_step_fixed": 0.1,
            "bootstrap_per_image": 1e-6,
        },  # fmt: skip
        "time_streamed_reads": lambda: 1e9,
        "time_host_batches": lambda *a, **k: 1e10,
        "time_concurrent_speedup": lambda *a, **k: 1.5,
        "time_backbone_forward": lambda *a, **k: {"seconds_per_image": 1e-3, "build_seconds": 2.0},
        "time_decode": lambda **k: 4e-3,
        "time_prepare_and_extract": lambda *a, **k: {
            "prepare_per_image": 1e-3,
            "prepare_fixed": 1.0,
            "extract_per_image": 2e-3,
            "extract_fixed": 1.0,
        },  # fmt: skip
        "time_pretrain": lambda *a, **k: {"step_seconds": 0.1, "image_seconds": 1e-4, "fixed_seconds": 1.0},
        "warm_up": lambda device: 3.0,
    }
    for name, fake in fakes.items():
        monkeypatch.setattr(calibration, name, fake)
    return timed


def test_paper_suite_names_the_papers_backbones_and_datasets(paper):
    assert len(paper.suite.backbones) == 9 and len(paper.suite.datasets) == 20
    pretrained = set(timm.list_pretrained())
    for name, backbone in paper.backbones.items():  # the 9 plus the MAE extra set
        assert backbone.model in pretrained, name
    groups = {paper.datasets[d].group for d in paper.suite.datasets}
    assert groups == {"natural multi-domain", "natural single-domain", "specialized", "structured"}
    for name in paper.suite.datasets:
        entry = paper.datasets[name]
        assert entry.source == "wds" and entry.num_classes and set(entry.num_images) == {"train", "test"}, name
    assert paper.probe_config("alf").overrides() == {"layers": "paper", "tokens": ["cls", "ap"]}


def test_plan_resolves_every_task_of_the_paper_suite_in_dry_mode(paper):
    plans = plan_suite(paper, gflops_per_second=400_000.0)
    assert len(plans) == 9 * 20
    vit_b_imagenet = next(p for p in plans if p.backbone == "vit_b16" and p.dataset == "imagenet1k")
    assert vit_b_imagenet.num_layers == 13 and vit_b_imagenet.dim == 768
    patch_bytes = (1_281_167 + 50_000) * 196 * 768 * 2  # final_patch_tokens: 196 patches x 768 x float16
    assert vit_b_imagenet.patch_bytes == patch_bytes
    assert vit_b_imagenet.bytes == (1_281_167 + 50_000) * 13 * 2 * 768 * 2 + patch_bytes
    large = next(p for p in plans if p.backbone == "vit_l16" and p.dataset == "cifar10")
    assert (
        large.num_layers == 25
        and large.seconds > next(p for p in plans if p.backbone == "vit_s16" and p.dataset == "cifar10").seconds
    )


def test_patch_tokens_add_p_x_final_width_per_image_only_when_asked_for(paper):
    import dataclasses

    def cache(params, backbone: str):
        suite = dataclasses.replace(params.suite, backbones=[backbone], datasets=["flowers"])
        (plan,) = plan_suite(dataclasses.replace(params, suite=suite), gflops_per_second=1e5)
        return plan

    without = dataclasses.replace(paper, extract=dataclasses.replace(paper.extract, final_patch_tokens=False))
    images = 1020 + 6149
    for backbone, patches, width in [("vit_b16", 196, 768), ("clip_b16", 196, 512), ("dinov2_l14", 256, 1024)]:
        # the final layer's own width: CLIP's projection (512), not the padded 768
        with_patches, plain = cache(paper, backbone), cache(without, backbone)
        assert plain.patch_bytes == 0
        assert with_patches.patch_bytes == images * patches * width * 2, backbone
        assert with_patches.bytes == plain.bytes + with_patches.patch_bytes
    # ViT-B/16: 301 KB per image of patch tokens against 40 KB for the 13 x 2 per-layer tokens
    assert cache(paper, "vit_b16").patch_bytes / images == 301_056
    assert cache(without, "vit_b16").bytes / images == 39_936


def test_vit_b16_flops_match_the_published_figure():
    shape = backbone_shape(load_params(ROOT / "params.paper.yaml").backbones["vit_b16"])
    assert shape.num_tokens == 197
    assert 33 < shape.gflops_per_image < 37  # ~17.6 GMACs per image for ViT-B/16 at 224


def test_caches_that_do_not_fit_are_refused_up_front(paper, tmp_path, monkeypatch):
    plans = plan_suite(paper, gflops_per_second=1000.0)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**12, 0, 10**9))
    with pytest.raises(ValueError, match=r"feature caches need .* TB but .* has 1.0 GB free"):
        check_disk(plans, tmp_path / "features")


def test_unknown_backbone_or_source_is_named(paper, tmp_path):
    import dataclasses

    bad = dataclasses.replace(paper.backbones["vit_b16"], model="vit_base_patch16_2244")
    with pytest.raises(ValueError, match="vit_base_patch16_2244"):
        backbone_shape(bad)
    from layerprobe.plan import check_dataset_entry

    with pytest.raises(ValueError, match="wdss"):
        check_dataset_entry("x", dataclasses.replace(paper.datasets["cifar10"], source="wdss"))
    with pytest.raises(ValueError, match="datasets.x.options.rooot"):
        check_dataset_entry("x", dataclasses.replace(paper.datasets["cifar10"], options={"rooot": "a"}))


def test_plan_command_prints_every_task(capsys, monkeypatch, fake_timers, tmp_path):
    monkeypatch.chdir(ROOT)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**14, 0, 10**13))  # a 10 TB disk
    assert main(["plan", "--params", "params.paper.yaml", "--images-per-second", "3000", "--calibration",
                 str(tmp_path / "calibration.json")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "1080 probe tasks" in out
    assert "| vit_b16 | imagenet1k | 1,331,167 | 13 x 2 x 768 | 453.9 GB | " in out
    assert "| 400.8 GB |" in out  # of which the final layer's patch tokens (the paper params cache them)
    assert "final-layer patch tokens (extract.final_patch_tokens): " in out


def test_plan_lists_each_tasks_batch_size_and_steps_as_training_plans_them(capsys, monkeypatch, fake_timers,
                                                                           tmp_path):  # fmt: skip
    monkeypatch.chdir(ROOT)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**14, 0, 10**13))
    assert main(["plan", "--params", "params.paper.yaml", "--images-per-second", "3000", "--tasks", "--calibration",
                 str(tmp_path / "calibration.json")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "probe tasks (train.batch_plan: reference;" in out
    assert sum(line.startswith("| clip_b16/") for line in out.splitlines()) == 20 * 6  # every task of one backbone
    # the reference's plan (tests/test_train.py REFERENCE_BATCH_PLANS): the grid on 80 %, the refit on train + val
    assert "| clip_b16/flowers/alf | 816 | 204 | 4 x 250 = 1,000 | 1,020 | 204 | 5 x 200 = 1,000 |" in out
    assert "| vit_s16/dmlab/alf | 52,440 | 2,016 | 27 x 40 = 1,080 | 65,550 | 2,016 | 33 x 40 = 1,320 |" in out
    assert "| 1,024,933 | 2,048 | 501 x 40 = 20,040 | 1,281,167 | 2,048 | 626 x 40 = 25,040 |" in out  # ImageNet-1k


def test_training_sizes_come_from_the_prepared_splits_else_are_cut_as_prepare_cuts(tmp_path):
    offline = load_params(ROOT / "params.yaml")
    texture = offline.datasets["texture"]  # 1,500 generated images, no official test split
    assert training_sizes("texture", texture, tmp_path, prepare=offline.prepare) == (960, 1200)
    (tmp_path / "splits.json").write_text(json.dumps({"splits": {"train": list(range(7)), "val": [7, 8],
                                                                 "test": [9]}}))  # fmt: skip
    assert training_sizes("texture", texture, tmp_path, prepare=offline.prepare) == (7, 9)


def test_plan_command_on_a_short_disk_prints_the_plan_then_refuses(capsys, monkeypatch, fake_timers, tmp_path):
    monkeypatch.chdir(ROOT)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**12, 0, 10**9))  # 1 GB free, TBs needed
    assert main(["plan", "--params", "params.paper.yaml", "--images-per-second", "3000", "--calibration",
                 str(tmp_path / "calibration.json")]) == 2  # fmt: skip
    captured = capsys.readouterr()
    assert "| vit_b16 | imagenet1k | 1,331,167 | 13 x 2 x 768 |" in captured.out  # the whole plan first
    assert "total still to write:" in captured.out and "of 1.0 GB free" in captured.out
    refusal = captured.err.strip().splitlines()
    assert len(refusal) == 1
    assert refusal[0].startswith("layerprobe plan: error: feature caches need ") and "has 1.0 GB free" in refusal[0]


# ------------------------------------------------------------------------------------------- pricing every task


def test_plan_prices_every_paper_task_and_reuses_its_calibration(capsys, monkeypatch, fake_timers, tmp_path):
    monkeypatch.chdir(ROOT)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**14, 0, 10**13))
    calibration, figures = tmp_path / "calibration.json", tmp_path / "plan.json"
    command = ["plan", "--params", "params.paper.yaml", "--device", "cpu", "--calibration", str(calibration),
               "--json", str(figures), "--workers", "8"]  # fmt: skip
    assert main(command) == 0
    out = capsys.readouterr().out
    study = json.loads(figures.read_text())
    assert len(study["tasks"]) == 1080 and all(t["training"] > 0 and t["evaluation"] > 0 for t in study["tasks"])
    assert "| vit_b16/imagenet1k/alf | " in out and "| vit_b16 | " in out  # per task and per backbone
    assert "study: extraction " in out and "with 8 worker(s)" in out and "total " in out
    # On a CPU the batches are timed up to 256 and the paper's (mostly 2048) read off the fit along the batch.
    assert {t["basis"] for t in study["tasks"]} == {"scaled"}
    # The all-tokens probe on ImageNet-1k selects 385 GB of train + val tokens: it streams, and plan says so.
    imagenet = next(t for t in study["tasks"] if t["task"] == "vit_b16/imagenet1k/attentive_last_all_tokens")
    assert imagenet["streamed"] and "read their batches from the cache" in out
    asked = len(fake_timers)
    # A CPU times batches of up to 256 images (--max-batch) and grids of up to 4 members (--max-grid).
    assert asked and all(batch <= 256 and shape.grid <= 4 for shape, batch, _ in fake_timers)

    # Once measured, a second plan reuses every figure; a CPU-only machine prices another device from the file.
    assert main(command) == 0
    assert len(fake_timers) == asked and " 0 point(s) measured now" in capsys.readouterr().out
    assert json.loads(figures.read_text())["total"] == pytest.approx(study["total"])


def test_a_tasks_training_is_its_step_counts_times_the_timed_steps(paper, fake_timers):
    import dataclasses

    import torch

    from layerprobe.estimate import ProbeTimings, estimate_task
    from layerprobe.plan import plan_training, probe_tasks

    suite = dataclasses.replace(paper.suite, backbones=["vit_b16"], datasets=["flowers", "cifar10"], probes=["alf"])
    params = dataclasses.replace(paper, suite=suite, train=dataclasses.replace(paper.train, seeds=[0, 1]))
    tasks = probe_tasks(params, plan_training(params), precision="float32")
    flowers, cifar = tasks
    assert flowers.shape.grid == 63 and flowers.shape.tokens == 24 and flowers.shape.heads == 24
    assert (flowers.sweep_batch, flowers.sweep_steps, flowers.refit_batch, flowers.refit_steps) == (204, 1000, 204,
                                                                                                    1000)  # fmt: skip
    timings = ProbeTimings({}, device=torch.device("cpu"), can_measure=True, train=params.train, max_batch=None,
                           cache_dtype=torch.float16)  # fmt: skip
    timings.prepare({flowers.shape: {(204, 102), (cifar.sweep_batch, 10)},
                     flowers.shape.member(): {(204, 102), (cifar.refit_batch, 10)}})  # fmt: skip
    constants = {"train_step_fixed": 0.1, "evaluate_step_fixed": 0.1, "bootstrap_per_image": 0.0,
                 "stream_bytes_per_second": 1e9, "host_batch_bytes_per_second": 1e10}  # fmt: skip
    estimate = estimate_task(flowers, timings, timings, constants, memory=None, device_memory=None)
    grid, member = flowers.shape, flowers.shape.member()
    per_seed = (0.5 + 1000 * fake_step_seconds(grid, 204, 102) + flowers.val_images * 1e-5
                + 0.5 + 1000 * fake_step_seconds(member, 204, 102))  # fmt: skip
    assert estimate.train.seconds == pytest.approx(2 * per_seed + 0.1)  # two seeds, then the step's own cost
    assert estimate.train.basis == "measured"
    # A point between the timed corners is read off the fit: the fake is affine in batch and classes, so exactly.
    middle = timings.figure(grid, 1000, 50, "step_seconds")
    assert middle.basis == "scaled" and middle.seconds == pytest.approx(fake_step_seconds(grid, 1000, 50), rel=1e-6)
    # A grid timed at 4 members and alone is read off the line through them: a shared part plus one per member.
    small = ProbeTimings({}, device=torch.device("cpu"), can_measure=True, train=params.train, max_batch=None,
                         cache_dtype=torch.float16, max_grid=4)  # fmt: skip
    small.prepare({grid: {(204, 102)}})
    assert {shape.grid for shape, _, _ in fake_timers[-2:]} == {4, 1}
    scaled = small.figure(grid, 204, 102, "step_seconds")
    assert scaled.basis == "scaled" and scaled.seconds == pytest.approx(fake_step_seconds(grid, 204, 102), rel=1e-6)


def test_corners_time_the_extremes_and_cap_the_batch():
    import torch

    from layerprobe.estimate import ProbeTimings

    timings = ProbeTimings({}, device=torch.device("cpu"), can_measure=False, train=None, max_batch=256,
                           cache_dtype=torch.float16)  # fmt: skip
    assert timings.corners({(204, 102), (2048, 10), (2048, 1000)}) == [(64, 10), (64, 1000), (256, 10), (256, 1000)]
    assert timings.corners({(63, 6), (64, 10)}) == [(64, 6), (64, 10)]  # within 20 %: one batch
    assert timings.corners({(64, 6), (64, 7)}) == [(64, 7)]


def test_units_carry_their_probes_scoring_and_the_head_node_only_records():
    """`--workers N`: each unit's extraction, training and test scoring split over the workers; pretraining, the
    MLflow recording (per probe) and the report once, whatever N."""
    from layerprobe.calibration import ProbeShape
    from layerprobe.estimate import OVERHEADS, Figure, ProbeTask, StudyEstimate, TaskEstimate, workers_wall

    shape = ProbeShape(head="linear", tokens=1, width=8, heads=0, grid=2, precision="float32")

    def task(dataset: str) -> TaskEstimate:
        probe = ProbeTask("b", dataset, "linear", shape, classes=2, sweep_batch=8, sweep_steps=1, refit_batch=8,
                          refit_steps=1, val_images=1, test_images=1, seeds=1, selection_bytes=1, row_bytes=1,
                          selected_row_bytes=1)  # fmt: skip
        return TaskEstimate(probe, train=Figure(100.0), evaluate=Figure(40.0 + OVERHEADS["evaluate_probe_seconds"]))

    stages = {"pretrain": 7.0, "prepare": 0.0, "extract": 0.0, "train": 0.0, "evaluate": 999.0, "report": 3.0}
    study = StudyEstimate(tasks=[task("d1"), task("d2")], extraction={("b", "d1"): Figure(10.0), ("b", "d2"):
                          Figure(10.0)}, prepare={}, pretrain={}, stages=stages, overheads=dict.fromkeys(stages, 1.0),
                          constants={}, concurrency=1.0, device={})  # fmt: skip
    once = 7.0 + 3.0 + 1.0 + 1.0 + OVERHEADS["mlflow_setup_seconds"] + 2 * OVERHEADS["evaluate_probe_seconds"]
    assert workers_wall(study, 1) == pytest.approx(once + 2 * (10.0 + 100.0 + 40.0))
    assert workers_wall(study, 2) == pytest.approx(once + (10.0 + 100.0 + 40.0))  # scoring halves with the units
