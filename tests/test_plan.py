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


def test_plan_command_prints_every_task(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**14, 0, 10**13))  # a 10 TB disk
    assert main(["plan", "--params", "params.paper.yaml", "--images-per-second", "3000"]) == 0
    out = capsys.readouterr().out
    assert "1080 probe tasks" in out
    assert "| vit_b16 | imagenet1k | 1,331,167 | 13 x 2 x 768 | 453.9 GB | " in out
    assert "| 400.8 GB |" in out  # of which the final layer's patch tokens (the paper params cache them)
    assert "final-layer patch tokens (extract.final_patch_tokens): " in out


def test_plan_lists_each_tasks_batch_size_and_steps_as_training_plans_them(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**14, 0, 10**13))
    assert main(["plan", "--params", "params.paper.yaml", "--images-per-second", "3000", "--tasks"]) == 0
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


def test_plan_command_on_a_short_disk_prints_the_plan_then_refuses(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**12, 0, 10**9))  # 1 GB free, TBs needed
    assert main(["plan", "--params", "params.paper.yaml", "--images-per-second", "3000"]) == 2
    captured = capsys.readouterr()
    assert "| vit_b16 | imagenet1k | 1,331,167 | 13 x 2 x 768 |" in captured.out  # the whole plan first
    assert "total still to write:" in captured.out and "of 1.0 GB free" in captured.out
    refusal = captured.err.strip().splitlines()
    assert len(refusal) == 1
    assert refusal[0].startswith("layerprobe plan: error: feature caches need ") and "has 1.0 GB free" in refusal[0]
