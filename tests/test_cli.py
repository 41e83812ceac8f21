"""The `layerprobe` command: each step works alone, errors are one line naming the culprit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_params, write_params
from PIL import Image

from layerprobe.cli import main
from layerprobe.features import read_features
from layerprobe.files import read_arrays
from layerprobe.metrics import classification_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = '{"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}'


def test_every_subcommand_has_help(capsys):
    for command in ("pretrain", "prepare", "extract", "train", "evaluate", "run", "predict", "plan", "ui", "list"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "--params" in capsys.readouterr().out
    help_text = subprocess.run(
        [sys.executable, "-m", "layerprobe.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert help_text.returncode == 0 and "layerprobe run" in help_text.stdout


def test_unknown_model_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["extract", "--backbone", "vit_tiny_patch16_2244", "--dataset", "digits", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "vit_tiny_patch16_2244" in err and "vit_tiny_patch16_224" in err
    assert not (tmp_path / "features").exists()


def test_unknown_dataset_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["extract", "--backbone", "vit_tiny_patch16_224", "--dataset", "digitz", "--no-progress"])
    assert code == 2
    line = _one_error_line(capsys, "extract")
    assert "unknown dataset 'digitz'. Did you mean 'digits'?" in line
    assert not (tmp_path / "features").exists() and not (tmp_path / "data").exists()


def test_extract_train_evaluate_predict_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["--backbone", "vit_tiny_patch16_224", "--dataset", "count_shapes"]
    options = ["--option", "num_images=120", "--option", "image_size=32"]
    assert main(["extract", *common, *options, "--model-kwargs", TINY, "--no-progress", "--device", "cpu"]) == 0
    features = tmp_path / "features/vit_tiny_patch16_224/count_shapes"
    assert json.loads((features / "manifest.json").read_text())["num_images"] == 120
    assert (
        main(["train", *common, "--probe", "alf", "--lr", "0.01", "--weight-decay", "0.0001", "--min-steps", "20"]) == 0
    )
    assert main(["evaluate", *common, "--probe", "alf"]) == 0
    capsys.readouterr()
    evaluation = tmp_path / "results/evaluate/vit_tiny_patch16_224/count_shapes/alf"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["balanced_accuracy"] <= 1.0
    # every seed's test predictions, for the report to pair probes; written before the marker
    saved = read_arrays(evaluation / "predictions.npz")
    assert saved["predictions"].shape == (1, len(saved["labels"])) and saved["predictions"].dtype == np.uint8
    np.testing.assert_array_equal(saved["labels"], read_features(features, split="test").labels.numpy())
    scored = classification_metrics(saved["labels"], saved["predictions"][0], int(saved["num_classes"]))
    assert scored["balanced_accuracy"] == pytest.approx(metrics["test"]["balanced_accuracy"])
    low, high = metrics["test_ci"]["balanced_accuracy"]
    assert low <= metrics["test"]["balanced_accuracy"] <= high and high - low > 0
    assert (evaluation / "predictions.npz").stat().st_mtime_ns <= (evaluation / "metrics.json").stat().st_mtime_ns

    rng = np.random.default_rng(0)
    images = []
    for i, mode in enumerate(["RGB", "L", "RGBA"]):
        path = tmp_path / f"image{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).convert(mode).save(path)
        images.append(str(path))
    probe = tmp_path / "probes/vit_tiny_patch16_224/count_shapes/alf/seed-0"
    assert main(["predict", "--probe", str(probe), "--images", *images]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == images

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["predict", "--probe", str(probe), "--images", str(broken)]) == 2
    assert "broken.png" in capsys.readouterr().err


def _one_error_line(capsys, command: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"layerprobe {command}: error: "), lines
    return lines[0]


def test_hostile_images_are_one_bad_file_line_and_nothing_is_prepared(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = _image_folder(tmp_path / "folder", ["cat", "dog"], seed=0)  # 32 x 32 = 1,024 pixels each: at the cap
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(root / "cat" / "big.png")
    (root / "dog" / "notes.png").write_text("text named like an image")
    argv = ["prepare", "--dataset", "imagefolder", "--option", f"root={root}", "--option", "max_image_pixels=1024"]
    assert main(argv) == 2
    line = _one_error_line(capsys, "prepare")
    assert "2 bad file(s)" in line and "big.png: declares 40x40 = 1,600 pixels, over the cap of 1,024" in line
    assert "notes.png: not an image" in line
    assert not (tmp_path / "data/prepared/imagefolder").exists()


def test_a_model_kwargs_typo_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [
        "extract",
        "--backbone",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        '{"img_size": 32, "dpeth": 2}',
        "--dataset",
        "count_shapes",
        "--option",
        "num_images=20",
        "--option",
        "image_size=16",
    ]
    assert main(argv) == 2
    line = _one_error_line(capsys, "extract")
    assert "model_kwargs key of 'vit_tiny_patch16_224' (VisionTransformer) 'dpeth'. Did you mean 'depth'?" in line
    assert not list((tmp_path / "features").rglob("*.arrow"))  # nothing but the unit's lock file


def test_an_unknown_model_in_a_pretrain_recipe_is_one_line_before_any_image_is_made(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # its lock lies beside the checkpoint: here, not in the checkout
    params = tiny_params()
    params["backbones"]["tiny_vit"] = {
        "model": "vit_tiny_patch16_2244",
        "checkpoint": "checkpoints/pretrained/tiny.safetensors",
        "model_kwargs": {"img_size": 32, "num_classes": 0},
        "pretrain": {"source": "shapes", "options": {"num_images": 10_000_000}},  # never made: fails first
    }
    path = write_params(tmp_path, params)
    assert main(["pretrain", "--params", str(path), "--backbone", "tiny_vit", "--no-progress"]) == 2
    line = _one_error_line(capsys, "pretrain")
    assert "unknown model 'vit_tiny_patch16_2244'. Did you mean 'vit_tiny_patch16_224'?" in line
    assert [p.name for p in (tmp_path / "checkpoints").rglob("*")] == ["pretrained", ".tiny.safetensors.pretrain.lock"]


def test_list_probes_and_sources(capsys):
    from layerprobe.probes import get_probe_spec

    assert main(["list", "probes"]) == 0
    probes = capsys.readouterr().out.splitlines()
    paper = yaml.safe_load((ROOT / "params.paper.yaml").read_text())["suite"]["probes"]
    assert set(paper) <= set(probes) and len(set(probes)) == len(probes)  # every probe of the paper's study, once
    assert all(get_probe_spec(name).name == name for name in probes)  # each line one probe, by its name
    assert main(["list", "sources"]) == 0
    sources = capsys.readouterr().out.splitlines()
    assert {"digits", "imagefolder", "torchvision", "wds", "count_shapes", "shapes", "texture"} <= set(sources)


@pytest.mark.parametrize("path", ["params.yaml", "params.paper.yaml"])
def test_list_names_from_params_files(path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    data = yaml.safe_load((ROOT / path).read_text())
    for what in ("backbones", "datasets"):
        assert main(["list", what, "--params", path]) == 0
        assert capsys.readouterr().out.splitlines() == list(data[what]), what  # every name, in the file's order


def _image_folder(root: Path, classes: list[str], *, seed: int, per_class: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _extract_image_folder(root: Path, capsys) -> dict:
    """`layerprobe extract` of the image folder `root` with the tiny ViT; its printed summary."""
    argv = ["extract", "--backbone", "vit_tiny_patch16_224", "--dataset", "imagefolder", "--option", f"root={root}"]
    assert main([*argv, "--model-kwargs", TINY, "--no-progress", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_another_image_folder_or_a_new_file_re_prepares_and_re_extracts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = _image_folder(tmp_path / "A", ["cat", "dog"], seed=0)
    second = _image_folder(tmp_path / "B", ["bird", "fish", "frog"], seed=1)

    def extract(root: Path) -> dict:
        return _extract_image_folder(root, capsys)

    cache = tmp_path / "features/vit_tiny_patch16_224/imagefolder"
    from_first = extract(first)
    assert from_first["status"] == "computed"
    assert extract(first)["status"] == "reused"
    from_second = extract(second)  # same dataset name, other folder: never A's splits or features under B's name
    assert from_second["status"] == "computed" and from_second["content_hash"] != from_first["content_hash"]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["provenance"]["class_names"] == ["bird", "fish", "frog"] and manifest["num_images"] == 12
    splits = json.loads((tmp_path / "data/prepared/imagefolder/splits.json").read_text())
    assert splits["class_names"] == ["bird", "fish", "frog"]

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(second / "fish" / "new.png")
    with_new_file = extract(second)
    assert with_new_file["status"] == "computed" and with_new_file["content_hash"] != from_second["content_hash"]
    assert json.loads((cache / "manifest.json").read_text())["num_images"] == 13


def test_a_replaced_image_behind_a_symlinked_class_folder_re_extracts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shared = _image_folder(tmp_path / "shared", ["dog"], seed=2)
    root = _image_folder(tmp_path / "A", ["cat"], seed=0)
    (root / "dog").symlink_to(shared / "dog", target_is_directory=True)  # a class folder that is a link

    def extract() -> dict:
        return _extract_image_folder(root, capsys)

    first = extract()
    manifest = json.loads((tmp_path / "features/vit_tiny_patch16_224/imagefolder/manifest.json").read_text())
    assert first["status"] == "computed" and manifest["num_images"] == 8  # the linked class is read
    assert manifest["provenance"]["class_names"] == ["cat", "dog"]
    assert extract()["status"] == "reused"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(shared / "dog" / "0.png")  # replaced behind the link
    again = extract()
    assert again["status"] == "computed" and again["content_hash"] != first["content_hash"]


def test_pool_and_schedule_without_a_prefect_server_are_one_line_errors(tmp_path):
    """A work pool and a schedule both need a real Prefect server; without PREFECT_API_URL each says so and stops."""
    import os

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root)])
    (tmp_path / "params.yaml").write_text((root / "params.yaml").read_text())
    (tmp_path / "flows").symlink_to(root / "flows")
    for command, needle in (
        ([sys.executable, "-m", "layerprobe.cli", "run", "--pool", "gpu"], "work pool 'gpu' needs the Prefect server"),
        ([sys.executable, "-m", "flows.serve"], "schedules need a Prefect server"),
    ):
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and needle in lines[0], result.stderr[-1500:]
        assert "PREFECT_API_URL" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flows", "params.yaml"]  # nothing computed or written


def _colour_images(root: Path, count: int, *, seed: int, mode: str = "RGB") -> dict[str, list[Path]]:
    """Images whose class is their colour (a plain red, green or blue with pixel noise), one folder per class."""
    rng = np.random.default_rng(seed)
    made: dict[str, list[Path]] = {}
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.clip(np.array(colour) + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            path = root / name / f"{seed}-{i}.png"
            Image.fromarray(pixels).convert(mode).save(path)
            made.setdefault(name, []).append(path)
    return made


COLOURS = {"blue": (30, 40, 200), "green": (30, 190, 40), "red": (210, 30, 30)}


def test_predict_names_the_colour_a_trained_probe_learned_on_held_out_images(tmp_path, monkeypatch, capsys):
    """A planted signal: trained on images whose class is their colour, the probe must name the colour of new ones."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "colours"
    _colour_images(root, 12, seed=0)
    common = ["--backbone", "vit_tiny_patch16_224", "--dataset", "imagefolder"]
    assert main(["extract", *common, "--option", f"root={root}", "--model-kwargs", TINY, "--no-progress"]) == 0
    assert (
        main(["train", *common, "--probe", "alf", "--lr", "0.01", "--weight-decay", "0.0001", "--min-steps", "60"]) == 0
    )
    capsys.readouterr()
    new = _colour_images(tmp_path / "new", 2, seed=1)  # new noise: images the probe never saw
    rgba = _colour_images(tmp_path / "rgba", 1, seed=2, mode="RGBA")  # converted to RGB as the training images were
    known = {str(path): name for made in (new, rgba) for name, paths in made.items() for path in paths}
    images = list(known)
    probe = tmp_path / "probes/vit_tiny_patch16_224/imagefolder/alf/seed-0"
    assert main(["predict", "--probe", str(probe), "--images", *images]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [(path, label) for path, label, _ in rows] == [(path, known[path]) for path in images]
    assert all(1 / 3 < float(probability) <= 1 for *_, probability in rows)
