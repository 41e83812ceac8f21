"""`layerprobe plan`: the paper's whole suite resolves offline (timm names, dataset entries), sizes add up, caches that
would not fit on disk are refused before anything runs, a task's time is its steps x its shape's timed step, and a
calibration file once written prices the study again (here or on a machine without the device) measuring nothing."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import namedtuple
from pathlib import Path

import pytest
import timm
import torch
import yaml

import layerprobe.plan as plan
from layerprobe.cli import main
from layerprobe.config import MANIFEST_FILE
from layerprobe.params import load_params
from layerprobe.plan import backbone_shape, dataset_counts, disk_need, plan_study

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper():
    return load_params(ROOT / "params.paper.yaml")


def step_seconds(shape, batch: int, classes: int) -> float:
    """A step time affine in the batch and the classes: 10 ms + 1 us per image x member x (tokens + classes)."""
    return 0.01 + 1e-6 * batch * shape.grid * (shape.tokens + classes)


@pytest.fixture
def timed_steps(monkeypatch):
    """plan's step timer replaced by `step_seconds` (the paper's 54 timings take half a minute on 2 cores); returns
    the (shape, batch, classes) points plan asked for."""
    asked = []

    def time_step(shape, *, batch, classes, **_):
        asked.append((shape, batch, classes))
        return step_seconds(shape, batch, classes)

    monkeypatch.setattr(plan, "time_step", time_step)
    return asked


@pytest.fixture
def big_disk(monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**14, 0, 10**13))  # a 10 TB disk


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


def test_plan_resolves_every_cache_of_the_paper_suite_in_dry_mode(paper):
    plans = plan_study(paper).caches
    assert len(plans) == 9 * 20
    vit_b_imagenet = next(p for p in plans if p.backbone == "vit_b16" and p.dataset == "imagenet1k")
    assert vit_b_imagenet.num_layers == 13 and vit_b_imagenet.dim == 768
    patch_bytes = (1_281_167 + 50_000) * 196 * 768 * 2  # final_patch_tokens: 196 patches x 768 x float16
    assert vit_b_imagenet.patch_bytes == patch_bytes
    assert vit_b_imagenet.bytes == (1_281_167 + 50_000) * 13 * 2 * 768 * 2 + patch_bytes
    assert next(p for p in plans if p.backbone == "vit_l16").num_layers == 25


def test_patch_tokens_add_p_x_final_width_per_image_only_when_asked_for(paper):
    def cache(params, backbone: str):
        suite = dataclasses.replace(params.suite, backbones=[backbone], datasets=["flowers"])
        (planned,) = plan_study(dataclasses.replace(params, suite=suite)).caches
        return planned

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


def test_vit_b16_flops_match_the_published_figure(paper):
    shape = backbone_shape(paper.backbones["vit_b16"])
    assert shape.num_patches == 196
    assert 33 < shape.gflops_per_image < 37  # ~17.6 GMACs per image for ViT-B/16 at 224
    assert backbone_shape(paper.backbones["vit_l16"]).gflops_per_image > 3 * shape.gflops_per_image


def test_caches_that_do_not_fit_are_refused_up_front(paper, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**12, 0, 10**9))
    needed, free, refusal = disk_need(plan_study(paper).caches, tmp_path / "features", dtype="float16")
    assert free == 10**9 and needed > 7 * 10**12
    assert re.fullmatch(r"feature caches need 7.0 TB but .* has 1.0 GB free; free space or point .*", refusal)
    caches = plan_study(paper).caches
    for cache in caches[1:]:  # written already: only the first still needs its space
        (tmp_path / "features" / cache.backbone / cache.dataset).mkdir(parents=True)
        (tmp_path / "features" / cache.backbone / cache.dataset / MANIFEST_FILE).touch()
    assert disk_need(caches, tmp_path / "features", dtype="float16")[:2] == (caches[0].bytes, 10**9)


def test_unknown_backbone_is_named(paper):  # sources and their options: the params check (test_config)
    bad = dataclasses.replace(paper.backbones["vit_b16"], model="vit_base_patch16_2244")
    with pytest.raises(ValueError, match="vit_base_patch16_2244"):
        backbone_shape(bad)


def test_dataset_counts_are_cut_as_prepare_cuts_them(paper):
    offline = load_params(ROOT / "params.yaml")
    # 1,500 generated images, no official test split: 300 for test, 20 % of the rest for validation; 6 classes
    assert dataset_counts("texture", offline.datasets["texture"], offline) == (1500, 960, 1200, 6)
    assert dataset_counts("digits", offline.datasets["digits"], offline)[::3] == (1797, 10)  # counted by making it
    # an official test split: train is the full training set
    assert dataset_counts("flowers", paper.datasets["flowers"], paper) == (7169, 816, 1020, 102)


def paper_plan(tmp_path, *extra: str) -> list[str]:
    return [
        "plan",
        "--params",
        "params.paper.yaml",
        "--images-per-second",
        "3000",
        "--calibration",
        str(tmp_path / "calibration.json"),
        *extra,
    ]


def test_plan_prints_the_per_backbone_summary_and_with_tasks_every_row(
    capsys, monkeypatch, timed_steps, big_disk, tmp_path
):
    monkeypatch.chdir(ROOT)
    assert main(paper_plan(tmp_path, "--workers", "8")) == 0
    summary = capsys.readouterr().out.splitlines()
    assert len(summary) < 25 and "1080 probe tasks" in summary[0]
    assert sum(line.startswith(("| vit_b16 | 2,253,881 |", "| clip_l14 | ")) for line in summary) == 2
    assert not any("/flowers/" in line for line in summary)  # no task rows
    assert any(line.startswith("study: ") for line in summary)
    assert any(line.startswith("with 8 worker(s)") for line in summary)

    assert main(paper_plan(tmp_path, "--tasks")) == 0
    out = capsys.readouterr().out
    assert "| vit_b16 | imagenet1k | 1,331,167 | 13 x 2 x 768 | 453.9 GB | 400.8 GB | " in out  # patch tokens
    assert sum(line.startswith("| clip_b16/") for line in out.splitlines()) == 20 * 6  # every task of one backbone
    # the reference's plan (tests/test_train.py REFERENCE_BATCH_PLANS): the grid on 80 %, the refit on train + val
    assert "| clip_b16/flowers/alf | 816 | 204 | 4 x 250 = 1,000 | 1,020 | 204 | 5 x 200 = 1,000 |" in out
    assert "| vit_s16/dmlab/alf | 52,440 | 2,016 | 27 x 40 = 1,080 | 65,550 | 2,016 | 33 x 40 = 1,320 |" in out
    assert "| 1,024,933 | 2,048 | 501 x 40 = 20,040 | 1,281,167 | 2,048 | 626 x 40 = 25,040 |" in out  # ImageNet-1k


def test_plan_on_a_short_disk_prints_the_plan_then_refuses_in_one_line(capsys, monkeypatch, timed_steps, tmp_path):
    monkeypatch.chdir(ROOT)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**12, 0, 10**9))  # 1 GB free, TBs needed
    assert main(paper_plan(tmp_path)) == 2
    captured = capsys.readouterr()
    assert "| vit_b16 | 2,253,881 |" in captured.out and "7.0 TB of caches still to write, 1.0 GB free" in captured.out
    refusal = captured.err.strip().splitlines()[-1]
    assert refusal.startswith("layerprobe plan: error: feature caches need ") and "has 1.0 GB free" in refusal
    assert not any("error" in line for line in captured.err.strip().splitlines()[:-1])


def test_a_tasks_training_is_its_step_counts_times_its_shapes_timed_step(paper, timed_steps):
    suite = dataclasses.replace(paper.suite, backbones=["vit_b16"], datasets=["flowers", "cifar10"], probes=["alf"])
    params = dataclasses.replace(paper, suite=suite, train=dataclasses.replace(paper.train, seeds=[0, 1]))
    study = plan.estimate(params, {}, device=torch.device("cpu"), images_per_second=3000.0)
    flowers = study.tasks[0]
    assert (flowers.shape.grid, flowers.shape.tokens, flowers.classes) == (63, 24, 102)
    assert (flowers.sweep.batch_size, flowers.sweep.steps, flowers.refit.steps) == (204, 1000, 1000)
    # A CPU times the 63-member grid as one member at 64 images, at the least and the most classes of the suite
    # (10 and 102), and scales in proportion; the refit's member is that same timing.
    assert {(shape.grid, batch, classes) for shape, batch, classes in timed_steps} == {(1, 64, 10), (1, 64, 102)}
    member = dataclasses.replace(flowers.shape, grid=1)
    for task in study.tasks:  # cifar10 trains at batches of 2,048 and 10 classes: its timed point, scaled
        step = step_seconds(member, 64, task.classes)
        sweep, refit = 63 * task.sweep.batch_size / 64 * step, task.refit.batch_size / 64 * step
        assert study.train[task.key] == pytest.approx(2 * (task.sweep.steps * sweep + task.refit.steps * refit) + 0.25)

    # Twice the steps (min_steps 2,000 where both tasks train for 1,000 or fewer): twice the time, nothing re-timed
    longer = dataclasses.replace(params, train=dataclasses.replace(params.train, min_steps=2000))
    timed_steps.clear()
    again = plan.estimate(longer, {}, device=torch.device("cpu"), images_per_second=3000.0)
    assert again.tasks[0].sweep.steps == 2000
    ratio = (again.train[flowers.key] - 0.25) / (study.train[flowers.key] - 0.25)
    assert ratio == pytest.approx((again.tasks[0].sweep.steps + again.tasks[0].refit.steps) / 2000)


def test_the_train_stage_runs_its_tasks_as_many_at_once_as_the_flows_do(paper, timed_steps, monkeypatch):
    suite = dataclasses.replace(paper.suite, backbones=["vit_b16"], datasets=["flowers", "cifar10"], probes=["alf"])
    params = dataclasses.replace(paper, suite=suite)
    study = plan.estimate(params, {}, device=torch.device("cpu"), images_per_second=3000.0)
    tasks = sum(study.train.values())  # the flows' task runner: two at a time, measured 1.3-1.6x one by one on 2 cores
    assert study.stages()["train"] == pytest.approx(plan.STAGE_SECONDS + tasks / plan.CPU_TASKS_OVERLAP)
    monkeypatch.setenv("LAYERPROBE_TASK_WORKERS", "1")  # a worker given one core: one after the other
    study = plan.estimate(params, {}, device=torch.device("cpu"), images_per_second=3000.0)
    assert study.stages()["train"] == pytest.approx(plan.STAGE_SECONDS + tasks)


def test_units_carry_their_probes_and_the_head_node_pretrains_evaluates_and_reports():
    """`--workers N`: each backbone x dataset unit's extraction and training split over the workers; pretraining,
    the evaluation and the report once, whatever N."""
    study = plan.Estimate(caches=[], tasks=[None, None], extraction={("b", "d1"): 10.0, ("b", "d2"): 10.0})
    study.train = {("b", "d1", "p"): 100.0, ("b", "d2", "p"): 100.0}
    study.pretrain = {"b": 7.0}
    stages = study.stages()
    assert stages["train"] == 10 + 200 and stages["pretrain"] == 10 + 45 + 7 and stages["evaluate"] == 10 + 2 * 0.7
    once = stages["pretrain"] + 10 + stages["evaluate"] + stages["report"]
    assert study.workers_wall(1) == pytest.approx(once + 2 * 110.0)
    assert study.workers_wall(2) == pytest.approx(once + 110.0)
    assert study.workers_wall(8) == study.workers_wall(2)


def tiny_params(tmp_path: Path) -> Path:
    """The default suite cut to one generated dataset, two probes and the random-init backbone (no pretraining)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["suite"] = {
        "name": "tiny",
        "backbones": ["vit_tiny_d6"],
        "datasets": ["shapes"],
        "probes": ["linear_last_cls", "alf"],
    }
    params["datasets"]["shapes"]["options"]["num_images"] = 200
    params["train"]["precision"] = "float32"  # as a GPU's file names it too, whatever this CPU's bfloat16
    params["paths"] = {key: str(tmp_path / value) for key, value in params["paths"].items()}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_a_calibration_file_prices_the_study_again_measuring_nothing(capsys, tmp_path, monkeypatch):
    command = ["plan", "--params", str(tiny_params(tmp_path)), "--json", str(tmp_path / "plan.json")]
    # Timed for real, on random features in memory: 2 probe shapes x (grid, member) and the backbone's forward, with
    # a progress line each. Nothing is written but the calibration, at its default place under paths.results.
    assert main(command) == 0
    captured = capsys.readouterr()
    assert "5 timing(s) measured now, 0 read" in captured.out
    assert [line.split(" (")[-1] for line in captured.err.splitlines()] == ["1)", "2)", "3)", "4)", "5)"]
    calibration = tmp_path / "results" / "plan" / "calibration-cpu.json"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == [
        Path("params.yaml"),
        Path("plan.json"),
        calibration.relative_to(tmp_path),
    ]
    first = json.loads((tmp_path / "plan.json").read_text())
    assert set(first["tasks"]) == {"vit_tiny_d6/shapes/linear_last_cls", "vit_tiny_d6/shapes/alf"}
    assert all(task["training"] > plan.TASK_SECONDS for task in first["tasks"].values())

    def no_timing(*args, **kwargs):
        raise AssertionError("a second plan timed or built something")

    for timer in ("time_step", "time_forward", "time_pretrain_step"):
        monkeypatch.setattr(plan, timer, no_timing)
    monkeypatch.setattr(timm, "create_model", no_timing)
    plan._SHAPES.clear()  # the backbones' shapes come from the file too
    assert main(command) == 0
    captured = capsys.readouterr()
    assert "0 timing(s) measured now, 5 read" in captured.out and captured.err == ""
    assert json.loads((tmp_path / "plan.json").read_text()) == first

    # Another machine's file: the same figures as a GPU's price the study here, where there is no GPU to time.
    if torch.cuda.is_available():
        return
    data = json.loads(calibration.read_text())
    data["device"]["type"] = "cuda"
    data["figures"] = {key.replace("cpu", "cuda", 1): value for key, value in data["figures"].items()}
    other = tmp_path / "calibration-cuda.json"
    other.write_text(json.dumps(data))
    assert main([*command, "--calibration", str(other), "--device", "cuda"]) == 0
    assert "0 timing(s) measured now, 5 read" in capsys.readouterr().out
    assert json.loads((tmp_path / "plan.json").read_text())["tasks"] == first["tasks"]
    del data["figures"][next(iter(data["figures"]))]  # a file that lacks a timing names it; nothing can time it here
    other.write_text(json.dumps(data))
    assert main([*command, "--calibration", str(other), "--device", "cuda"]) == 2
    assert "the calibration has no 'cuda " in capsys.readouterr().err
    assert main([*command, "--calibration", str(calibration), "--device", "cuda"]) == 2
    assert "calibration has cpu figures, not cuda" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["not json", '{"format": "layerprobe-calibration/1"}', "[]", None])
def test_a_bad_calibration_file_is_named_in_one_line_before_any_timing(capsys, tmp_path, timed_steps, content):
    path = tmp_path / "calibration.json"
    if content is None:
        path.mkdir()  # a folder where the file should be
    else:
        path.write_text(content)
    assert main(["plan", "--params", str(tiny_params(tmp_path)), "--calibration", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"layerprobe plan: error: calibration file {path} is ") and err.count("\n") == 1
    assert "delete it to measure again" in err and timed_steps == []
    assert plan.load_calibration(tmp_path / "none.json") == {"format": plan.FORMAT}
