"""The dataset catalogue: every source round-trips files the test writes, splits are sound, prepare is reproducible."""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from layerprobe.data import (
    ImageDataset,
    ImageFileError,
    create_dataset,
    list_sources,
    make_splits,
    open_prepared,
    prepare_dataset,
)

GENERATED = ["count_shapes", "shape_position", "shape_orientation", "texture"]


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def _pixels(dataset: ImageDataset) -> np.ndarray:
    return np.stack([np.asarray(dataset.load_image(i)) for i in range(len(dataset))])


# ------------------------------------------------------------------------------------------------ files for sources
def _rgb(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _rgba_half_transparent() -> Image.Image:
    """Left half opaque red, right half fully transparent green (which must come out black)."""
    array = np.zeros((8, 8, 4), dtype=np.uint8)
    array[:, :4] = (255, 0, 0, 255)
    array[:, 4:] = (0, 255, 0, 0)
    return Image.fromarray(array, mode="RGBA")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of `width` x `height` black pixels, compressed row by row: a few kilobytes on disk (48 KB for
    20000 x 20000) and no memory to write, whatever it declares. PIL holds such an image at a byte a pixel or more."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte, then the row's bits
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale, no interlace
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------------------------------------------- registry
def test_every_source_is_registered():
    assert {"digits", "imagefolder", "torchvision", "wds", *GENERATED} <= set(list_sources())


def test_unknown_source_suggests_the_nearest_name():
    with pytest.raises(ValueError, match=r"unknown dataset source 'digit'\. Did you mean 'digits'\?") as excinfo:
        create_dataset("digit")
    assert "imagefolder" in _one_line(excinfo)


def test_unknown_or_missing_option_is_named():
    with pytest.raises(ValueError, match=r"'img_size'.*Did you mean 'image_size'") as excinfo:
        create_dataset("digits", img_size=32)
    _one_line(excinfo)
    with pytest.raises(ValueError, match=r"source 'imagefolder' needs option 'root'"):
        create_dataset("imagefolder")


# ---------------------------------------------------------------------------------------------- in-memory sources
@pytest.mark.parametrize("source", GENERATED)
def test_generated_tasks_are_deterministic_balanced_and_differ_between_seeds(source):
    first = create_dataset(source, num_images=90, image_size=32, seed=3)
    again = create_dataset(source, num_images=90, image_size=32, seed=3)
    other = create_dataset(source, num_images=90, image_size=32, seed=4)
    assert isinstance(first, ImageDataset) and len(first) == 90 and first.official_splits is None
    np.testing.assert_array_equal(_pixels(first), _pixels(again))
    np.testing.assert_array_equal(first.labels, again.labels)
    assert not np.array_equal(_pixels(first), _pixels(other))
    counts = np.bincount(first.labels, minlength=len(first.class_names))
    assert counts.max() - counts.min() <= 1 and len(first.class_names) >= 4
    image = first.load_image(0)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert first.describe() == {"source": source, "options": first.describe()["options"]}
    assert first.describe()["options"]["seed"] == 3
    json.dumps(first.describe())


@pytest.mark.parametrize("source", GENERATED)
def test_generated_label_is_not_in_any_single_pixel(source):
    # A nearest-class-mean on one pixel's colour must not solve the task: structure, not colour, carries the label.
    dataset = create_dataset(source, num_images=600, seed=0)
    pixels = _pixels(dataset).astype(np.float32)  # [N, H, W, 3]
    best = 0.0
    for y, x in [(16, 16), (8, 8), (24, 24), (0, 0)]:
        values = pixels[:, y, x]
        means = np.stack([values[dataset.labels == c].mean(0) for c in range(len(dataset.class_names))])
        guess = np.argmin(((values[:, None] - means[None]) ** 2).sum(-1), axis=1)
        best = max(best, float((guess == dataset.labels).mean()))
    assert best < 0.5, best


def test_count_shapes_draws_as_many_separate_squares_as_the_label_says():
    from scipy import ndimage

    dataset = create_dataset("count_shapes", num_images=60, image_size=32, seed=0)
    for index in range(len(dataset)):
        image = np.asarray(dataset.load_image(index)).astype(np.float32)
        background = np.median(image.reshape(-1, 3), axis=0)
        # Squares differ from the background by >= 0.3 * 255 in every channel; noise is 0.08 * 255 per channel.
        foreground = np.abs(image - background).mean(-1) > 45
        foreground = ndimage.binary_opening(foreground, np.ones((2, 2)))
        _, count = ndimage.label(foreground)
        assert count == dataset.labels[index] + 1, (index, count)


def test_digits_are_the_real_sklearn_digits_upscaled_to_rgb():
    from sklearn.datasets import load_digits

    dataset = create_dataset("digits", image_size=32)
    assert len(dataset) == 1797 and dataset.class_names == [str(d) for d in range(10)]
    np.testing.assert_array_equal(dataset.labels, load_digits().target)
    image = np.asarray(dataset.load_image(5))
    assert image.shape == (32, 32, 3) and (image[..., 0] == image[..., 2]).all()
    # Nearest upscaling: each 4x4 block is one source pixel.
    np.testing.assert_array_equal(image[::4, ::4, 0], np.rint(load_digits().images[5] * 255 / 16))
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 8"):
        create_dataset("digits", image_size=30)


# ---------------------------------------------------------------------------------------------------- imagefolder
def test_imagefolder_reads_classes_in_sorted_order_and_converts_to_rgb(tmp_path):
    root = tmp_path / "folder"
    _save(Image.fromarray(_rgb(0)), root / "cat" / "b.png")
    _save(Image.fromarray(_rgb(1)[..., 0], mode="L"), root / "cat" / "a.png")
    _save(_rgba_half_transparent(), root / "dog" / "x.png")
    _save(Image.fromarray(_rgb(2)), root / "dog" / "y.JPG")
    (root / "dog" / ".DS_Store").write_bytes(b"not an image, but hidden")
    (root / "README.txt").write_text("files beside the class folders are not classes")
    dataset = create_dataset("imagefolder", root=str(root))
    assert dataset.class_names == ["cat", "dog"] and dataset.official_splits is None
    np.testing.assert_array_equal(dataset.labels, [0, 0, 1, 1])
    assert [p.name for p in dataset.paths] == ["a.png", "b.png", "x.png", "y.JPG"]
    images = [dataset.load_image(i) for i in range(4)]
    assert all(image.mode == "RGB" for image in images)
    grey = np.asarray(images[0])
    np.testing.assert_array_equal(grey[..., 0], _rgb(1)[..., 0])
    np.testing.assert_array_equal(grey[..., 1], grey[..., 2])
    np.testing.assert_array_equal(np.asarray(images[1]), _rgb(0))
    rgba = np.asarray(images[2])
    assert (rgba[:, :4] == (255, 0, 0)).all() and (rgba[:, 4:] == 0).all()
    assert dataset.describe()["source"] == "imagefolder" and dataset.describe()["root"] == str(root)


def test_imagefolder_train_and_test_folders_give_official_splits_over_the_union_of_classes(tmp_path):
    root = tmp_path / "folder"
    for name in ("a.png", "b.png"):
        _save(Image.fromarray(_rgb(0)), root / "train" / "ant" / name)
        _save(Image.fromarray(_rgb(1)), root / "train" / "bee" / name)
    _save(Image.fromarray(_rgb(2)), root / "test" / "bee" / "c.png")
    _save(Image.fromarray(_rgb(3)), root / "test" / "cow" / "d.png")
    dataset = create_dataset("imagefolder", root=str(root))
    assert dataset.class_names == ["ant", "bee", "cow"]
    np.testing.assert_array_equal(dataset.labels, [0, 0, 1, 1, 1, 2])
    assert dataset.official_splits.tolist() == ["train"] * 4 + ["test"] * 2
    splits = make_splits(dataset.labels, official_splits=dataset.official_splits, val_fraction=0.25, seed=0)
    assert splits["test"].tolist() == [4, 5]


def test_imagefolder_errors_name_the_culprit(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere") as excinfo:
        create_dataset("imagefolder", root=str(tmp_path / "nowhere"))
    _one_line(excinfo)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no class folders under .*empty"):
        create_dataset("imagefolder", root=str(tmp_path / "empty"))
    root = tmp_path / "folder"
    _save(Image.fromarray(_rgb(0)), root / "cat" / "a.png")
    (root / "dog").mkdir()
    (root / "dog" / ".hidden.png").write_bytes(b"hidden files are ignored, so dog is empty")
    with pytest.raises(ValueError, match=r"class folder .*dog' has no images") as excinfo:
        create_dataset("imagefolder", root=str(root))
    _one_line(excinfo)
    (root / "dog" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"\(images: .*\.png.*\): .*notes\.txt' has an unknown extension") as excinfo:
        create_dataset("imagefolder", root=str(root))
    _one_line(excinfo)


def test_prepare_reports_every_bad_file_of_an_image_folder_at_once_and_writes_nothing(tmp_path):
    root = tmp_path / "folder"
    for label in ("cat", "dog"):
        for i in range(3):
            _save(Image.fromarray(_rgb(i, size=16)), root / label / f"{i}.png")
    good = _png_bytes(Image.fromarray(_rgb(0, size=64)))
    (root / "cat" / "cut.png").write_bytes(good[: len(good) // 2])
    (root / "dog" / "fake.jpg").write_text("this is text with an image extension")
    (root / "dog" / "notes.txt").write_text("not an image either")
    out = tmp_path / "prepared"
    with pytest.raises(ImageFileError) as excinfo:
        _prepare(out, source="imagefolder", root=str(root))
    message = _one_line(excinfo)
    assert "3 bad file(s)" in message
    for name in ("cut.png: truncated or corrupt", "fake.jpg: not an image", "notes.txt' has an unknown extension"):
        assert name in message
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_imagefolder_corrupt_files_raise_image_file_error_naming_the_file(tmp_path):
    root = tmp_path / "folder"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "fake.jpg").write_text("this is text with an image extension")
    good = _png_bytes(Image.fromarray(_rgb(0, size=64)))
    (root / "cat" / "cut.png").write_bytes(good[: len(good) // 2])
    dataset = create_dataset("imagefolder", root=str(root))  # listing does not decode: errors come at load time
    with pytest.raises(ImageFileError, match=r"cut\.png: truncated or corrupt") as excinfo:
        dataset.load_image(0)
    _one_line(excinfo)
    with pytest.raises(ImageFileError, match=r"fake\.jpg: not an image") as excinfo:
        dataset.load_image(1)
    _one_line(excinfo)
    assert issubclass(ImageFileError, ValueError)


# What the image folder check may hold at its peak above the interpreter's own: the valid 6000 x 4000 JPEG decoded
# (PIL keeps RGB at 4 bytes a pixel: 96 MB) plus decoder buffers. Decoding the bombs would take 90 MB and 400 MB at
# PIL's byte a pixel for 1-bit images, 360 MB and 1.6 GB once converted to RGB.
CHECK_PEAK_BOUND_MB = 160

_CHECK_IN_A_FRESH_PROCESS = """
import json, os, resource, sys
from layerprobe.data import prepare_dataset

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes

# Linux carries a process's highest RSS across exec, so this interpreter's figure starts at pytest's; a child forked
# here starts from this interpreter's own memory, so its figures are the check's.
pid = os.fork()
if pid == 0:
    baseline = peak_mb()
    try:
        prepare_dataset("hostile", source="imagefolder", options={"root": sys.argv[1]}, out_dir=sys.argv[2],
                        val_fraction=0.2, test_fraction=0.2, seed=0)
        error = None
    except Exception as e:
        error = {"type": type(e).__name__, "message": str(e)}
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak_mb(), "error": error}), flush=True)
    os._exit(0)
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_hostile_images_are_one_bad_file_report_checked_in_bounded_memory_and_nothing_is_written(tmp_path):
    root = tmp_path / "folder"
    _png_declaring(root / "cat" / "bomb.png", 20000, 20000)  # 48 KB declaring 400 megapixels: PIL raises
    _png_declaring(root / "cat" / "bomb_just_over.png", 9500, 9500)  # 90.25 megapixels: PIL only warns, and decodes
    good = _png_bytes(Image.fromarray(_rgb(0, size=64)))
    (root / "cat" / "cut.png").write_bytes(good[: len(good) // 2])
    (root / "dog").mkdir(parents=True)
    (root / "dog" / "notes.png").write_text("a text file named like an image")
    photo = Image.radial_gradient("L").resize((6000, 4000)).convert("RGB")
    photo.save(root / "dog" / "photo.jpg", quality=90)
    del photo
    out = tmp_path / "prepared"
    run = subprocess.run(
        [sys.executable, "-c", _CHECK_IN_A_FRESH_PROCESS, str(root), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "Warning" not in run.stderr, run.stderr  # PIL's DecompressionBombWarning is not printed either
    result = json.loads(run.stdout)
    error = result["error"]
    assert error is not None and error["type"] == "ImageFileError" and "\n" not in error["message"]
    message = error["message"]
    assert "4 bad file(s)" in message and "photo.jpg" not in message
    assert "bomb.png: declares 20000x20000 = 400,000,000 pixels, over the cap of 89,478,485" in message
    assert "bomb_just_over.png: declares 9500x9500 = 90,250,000 pixels, over the cap of 89,478,485" in message
    assert "cut.png: truncated or corrupt image" in message
    assert "notes.png: not an image" in message
    grown = result["peak_mb"] - result["baseline_mb"]
    print(f"peak memory of the check: {grown:.0f} MB above a {result['baseline_mb']:.0f} MB interpreter")
    assert grown < CHECK_PEAK_BOUND_MB, result
    assert grown > 60, result  # the JPEG was decoded (96 MB): the bound measures a check that really ran
    assert not out.exists()  # nothing written


def test_the_pixel_cap_refuses_one_pixel_over_it_wherever_the_image_is_decoded(tmp_path, monkeypatch):
    root = tmp_path / "folder"
    _save(Image.fromarray(_rgb(0, size=64)), root / "a" / "fits.png")  # 4096 pixels: exactly the cap
    _png_declaring(root / "b" / "over.png", 64, 65)  # 4160 pixels
    with pytest.raises(ImageFileError) as excinfo:
        _prepare(tmp_path / "prepared", source="imagefolder", root=str(root), max_image_pixels=4096)
    message = _one_line(excinfo)
    assert "1 bad file(s)" in message and "over.png: declares 64x65 = 4,160 pixels, over the cap of 4,096" in message
    assert not (tmp_path / "prepared").exists()
    # Listing does not decode: extraction's load_image refuses the file with the same cap, before decoding it.
    dataset = create_dataset("imagefolder", root=str(root), max_image_pixels=4096)
    assert dataset.load_image(0).size == (64, 64)
    with pytest.raises(ImageFileError, match=r"over\.png: declares 64x65") as excinfo:
        dataset.load_image(1)
    _one_line(excinfo)
    # The cap is per file, not PIL's process-wide setting: a cap above it works and that setting is left as it was.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    prepared = _prepare(tmp_path / "prepared", source="imagefolder", root=str(root), max_image_pixels=5000)
    assert prepared.dataset.load_image(1).size == (64, 65) and Image.MAX_IMAGE_PIXELS == 1000
    with ThreadPoolExecutor(max_workers=8) as pool:  # overlapping header reads restore it once, when the last ends
        sizes = list(pool.map(lambda i: prepared.dataset.load_image(i % 2).size, range(200)))
    assert sizes == [(64, 64), (64, 65)] * 100 and Image.MAX_IMAGE_PIXELS == 1000
    assert json.loads((tmp_path / "prepared" / "splits.json").read_text())["options"]["max_image_pixels"] == 5000
    for bad in (0, -1, 2.5, "many"):
        with pytest.raises(ValueError, match="max_image_pixels must be a positive integer") as excinfo:
            create_dataset("imagefolder", root=str(root), max_image_pixels=bad)
        _one_line(excinfo)


# ---------------------------------------------------------------------------------------------------- torchvision
def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's idx format: magic (0, 0, uint8 type 0x08, ndim), big-endian uint32 dims, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    parts = {}
    for prefix, per_class in (("train", 2), ("t10k", 1)):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        parts[prefix] = (images, labels)
    return parts


def test_torchvision_mnist_round_trips_idx_files_with_official_splits(tmp_path):
    parts = _write_mnist(tmp_path)
    dataset = create_dataset("torchvision", name="MNIST", root=str(tmp_path))
    assert len(dataset) == 30 and dataset.class_names[0] == "0 - zero" and len(dataset.class_names) == 10
    np.testing.assert_array_equal(dataset.labels, np.concatenate([parts["train"][1], parts["t10k"][1]]))
    assert dataset.official_splits.tolist() == ["train"] * 20 + ["test"] * 10
    for index, expected in ((0, parts["train"][0][0]), (25, parts["t10k"][0][5])):
        image = dataset.load_image(index)
        assert image.mode == "RGB" and image.size == (28, 28)
        np.testing.assert_array_equal(np.asarray(image)[..., 1], expected)
    assert dataset.describe() == {
        "source": "torchvision",
        "options": {"name": "MNIST", "root": str(tmp_path), "download": False},
        "root": str(tmp_path),
    }


def test_torchvision_split_argument_falls_back_to_the_names_the_dataset_accepts(tmp_path):
    # Imagenette takes split="train"/"val": "trainval" and "test" are rejected and the next spelling is used.
    for split, count in (("train", 2), ("val", 1)):
        for wnid in ("n01440764", "n03888257"):
            for i in range(count):
                _save(Image.fromarray(_rgb(i)), tmp_path / "imagenette2" / split / wnid / f"{i}.JPEG")
    dataset = create_dataset("torchvision", name="Imagenette", root=str(tmp_path))
    assert dataset.class_names == ["tench", "parachute"]
    np.testing.assert_array_equal(dataset.labels, [0, 0, 1, 1, 0, 1])
    assert dataset.official_splits.tolist() == ["train"] * 4 + ["test"] * 2
    assert dataset.load_image(5).mode == "RGB" and dataset.load_image(5).size == (8, 8)


def test_torchvision_errors_suggest_the_name_and_tell_how_to_download(tmp_path):
    with pytest.raises(ValueError, match=r"unknown torchvision dataset 'MNSIT'\. Did you mean 'MNIST'\?") as excinfo:
        create_dataset("torchvision", name="MNSIT", root=str(tmp_path))
    message = _one_line(excinfo)
    assert "CIFAR10" in message and "CocoDetection" not in message
    with pytest.raises(FileNotFoundError, match=r"MNIST not found under .*; set download: true") as excinfo:
        create_dataset("torchvision", name="MNIST", root=str(tmp_path / "no-data"))
    assert str(tmp_path / "no-data") in _one_line(excinfo)


def test_a_failed_torchvision_download_is_one_line_naming_the_dataset_and_the_network(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution (simulated)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # what torchvision's download_url calls
    with pytest.raises(FileNotFoundError) as excinfo:
        create_dataset("torchvision", name="MNIST", root=str(tmp_path / "mnist"), download=True)
    message = _one_line(excinfo)
    assert f"torchvision dataset MNIST could not be downloaded to {str(tmp_path / 'mnist')!r}" in message
    assert "needs network" in message and "download: false" in message


# ------------------------------------------------------------------------------------------------------------ wds
def _write_wds(root: Path, *, test: bool = True, classnames: bool = True) -> dict[str, np.ndarray]:
    """Two train tars and one test tar of PNG/JPEG samples, including greyscale and RGBA images."""
    expected = {}
    samples = {
        "train/0000.tar": [("s0", Image.fromarray(_rgb(0)), 0), ("s1", Image.fromarray(_rgb(1)[..., 0], "L"), 2)],
        "train/0001.tar": [("s2", _rgba_half_transparent(), 1), ("dir/s3", Image.fromarray(_rgb(3)), 1)],
        "test/0000.tar": [("t0", Image.fromarray(_rgb(4)), 2)],
    }
    for tar, entries in samples.items():
        if tar.startswith("test") and not test:
            continue
        members = []
        for key, image, label in entries:
            members += [(f"{key}.png", _png_bytes(image)), (f"{key}.cls", f"{label}\n".encode())]
            members.append((f"{key}.json", b"{}"))  # other members are ignored
            expected[key] = np.asarray(image.convert("RGB")) if image.mode != "RGBA" else None
        _write_tar(root / tar, members)
    if classnames:
        (root / "classnames.txt").write_text("apple\nbanana\ncherry\n")
    return expected


def test_wds_reads_labels_class_names_splits_and_rgb_pixels(tmp_path):
    expected = _write_wds(tmp_path / "wds")
    dataset = create_dataset("wds", root=str(tmp_path / "wds"))
    assert dataset.class_names == ["apple", "banana", "cherry"]
    np.testing.assert_array_equal(dataset.labels, [0, 2, 1, 1, 2])
    assert dataset.official_splits.tolist() == ["train"] * 4 + ["test"]
    images = [dataset.load_image(i) for i in range(len(dataset))]
    assert all(image.mode == "RGB" for image in images)
    for index, key in ((0, "s0"), (1, "s1"), (3, "dir/s3"), (4, "t0")):
        np.testing.assert_array_equal(np.asarray(images[index]), expected[key])
    rgba = np.asarray(images[2])
    assert (rgba[:, :4] == (255, 0, 0)).all() and (rgba[:, 4:] == 0).all()


def test_wds_without_classnames_or_test_split_uses_label_numbers_and_no_official_splits(tmp_path):
    _write_wds(tmp_path / "wds", test=False, classnames=False)
    dataset = create_dataset("wds", root=str(tmp_path / "wds"))
    assert dataset.class_names == ["0", "1", "2"] and dataset.official_splits is None and len(dataset) == 4


def test_wds_errors_name_the_root_or_the_key_and_tar(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-wds") as excinfo:
        create_dataset("wds", root=str(tmp_path / "missing-wds"))
    _one_line(excinfo)
    root = tmp_path / "wds"
    _write_tar(root / "train" / "0.tar", [("a.png", _png_bytes(Image.fromarray(_rgb(0)))), ("a.cls", b"0")])
    _write_tar(root / "test" / "0.tar", [("lonely.jpg", _png_bytes(Image.fromarray(_rgb(0))))])
    with pytest.raises(ValueError, match=r"test/0\.tar'.*sample 'lonely' has an image but no \.cls") as excinfo:
        create_dataset("wds", root=str(root))
    _one_line(excinfo)
    _write_tar(root / "test" / "0.tar", [("bad.png", b"not a png"), ("bad.cls", b"0")])
    dataset = create_dataset("wds", root=str(root))
    with pytest.raises(ImageFileError, match=r"test/0\.tar:bad\.png: not an image"):
        dataset.load_image(1)


def test_wds_oversized_members_join_one_report_and_bombs_fail_before_decoding(tmp_path):
    root = tmp_path / "wds"
    image = _png_bytes(Image.fromarray(_rgb(0)))
    _write_tar(
        root / "train" / "0.tar",
        [
            ("a.png", image),
            ("a.cls", b"0"),
            ("huge.png", image),
            ("huge.cls", b"0" * 10_000_000),  # a "label" of 10 MB is not read
            ("bin.png", image),
            ("bin.cls", b"\xff\xfe"),
        ],
    )
    _write_tar(
        root / "test" / "0.tar", [("big.png", b"\0" * (8 * 100 + 2**20 + 1)), ("big.cls", b"0"), ("lonely.jpg", image)]
    )
    with pytest.raises(ValueError) as excinfo:
        create_dataset("wds", root=str(root), max_image_pixels=100)
    message = _one_line(excinfo)
    assert message.startswith("source 'wds': 4 bad member(s): ")
    assert "train/0.tar': huge.cls is 10,000,000 bytes, not a class index (at most 64 bytes)" in message
    assert "train/0.tar': bin.cls holds b'\\xff\\xfe', not an integer label" in message
    assert "test/0.tar': big.png is 1,049,377 bytes, more than an image under the cap of 100 pixels can be" in message
    assert "test/0.tar': sample 'lonely' has an image but no .cls label" in message

    bomb = _png_declaring(tmp_path / "bomb.png", 20000, 20000).read_bytes()
    _write_tar(root / "train" / "0.tar", [("a.png", image), ("a.cls", b"0"), ("bomb.png", bomb), ("bomb.cls", b"1")])
    _write_tar(root / "test" / "0.tar", [("b.png", image), ("b.cls", b"0")])
    dataset = create_dataset("wds", root=str(root))
    with pytest.raises(ImageFileError, match=r"0\.tar:bomb\.png: declares 20000x20000 = 400,000,000 pixels") as excinfo:
        dataset.load_image(1)
    _one_line(excinfo)


class _Pixels(torch.utils.data.Dataset):
    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.dataset.load_image(index)).copy())


def test_wds_is_safe_in_forked_dataloader_workers(tmp_path):
    _write_wds(tmp_path / "wds")
    dataset = create_dataset("wds", root=str(tmp_path / "wds"))
    reference = _pixels(dataset)  # opens handles in the parent before the fork, the case that goes wrong
    assert dataset._handles
    loader = torch.utils.data.DataLoader(
        _Pixels(dataset), batch_size=1, num_workers=2, multiprocessing_context="fork", shuffle=False
    )
    loaded = np.concatenate([batch.numpy() for batch in loader])
    np.testing.assert_array_equal(loaded, reference)
    copy = pickle.loads(pickle.dumps(dataset))  # spawned workers receive a pickled copy with no open files
    np.testing.assert_array_equal(np.asarray(copy.load_image(4)), reference[4])


# ---------------------------------------------------------------------------------------------------------- splits
def test_make_splits_is_stratified_disjoint_complete_and_deterministic():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    splits = make_splits(labels, val_fraction=0.2, test_fraction=0.25, seed=0)
    assert set(splits) == {"train", "val", "test"}
    joined = np.concatenate(list(splits.values()))
    assert len(joined) == len(labels) and set(joined.tolist()) == set(range(len(labels)))
    for part in splits.values():
        assert part.dtype == np.int64 and (np.diff(part) > 0).all()
    assert len(splits["test"]) == 50 and len(splits["val"]) == 30
    overall = np.bincount(labels) / len(labels)
    for part in splits.values():
        np.testing.assert_allclose(np.bincount(labels[part], minlength=4) / len(part), overall, atol=0.03)
    again = make_splits(labels, val_fraction=0.2, test_fraction=0.25, seed=0)
    other = make_splits(labels, val_fraction=0.2, test_fraction=0.25, seed=1)
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    assert not np.array_equal(splits["test"], other["test"])


def test_make_splits_honours_official_splits_and_ignores_test_fraction():
    labels = np.tile(np.arange(3), 20)
    official = np.array(["train"] * 45 + ["test"] * 15)
    splits = make_splits(labels, official_splits=official, val_fraction=0.2, test_fraction=0.5, seed=0)
    np.testing.assert_array_equal(splits["test"], np.arange(45, 60))
    assert len(splits["val"]) == 9 and np.bincount(labels[splits["val"]]).tolist() == [3, 3, 3]
    assert set(splits["train"]) | set(splits["val"]) == set(range(45))
    with pytest.raises(ValueError, match=r"\['validation'\]; valid values: 'train', 'test'"):
        make_splits(labels, official_splits=np.array(["train"] * 59 + ["validation"]))


def test_make_splits_does_not_crash_on_classes_too_small_to_stratify():
    labels = np.array([0] * 10 + [1] * 10 + [2, 3, 3])  # class 2 has one image, class 3 two
    splits = make_splits(labels, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(len(labels)))
    assert 20 in splits["train"]  # the singleton stays where it can be learnt
    tiny = make_splits(np.arange(5), val_fraction=0.2, test_fraction=0.2, seed=0)  # every class a singleton
    assert tiny["train"].tolist() == list(range(5)) and len(tiny["test"]) == 0
    few = make_splits(np.repeat(np.arange(6), 2), val_fraction=0.1, test_fraction=0.1, seed=0)  # cut < classes
    assert sum(len(v) for v in few.values()) == 12 and len(few["test"]) >= 1


# -------------------------------------------------------------------------------------------------------- prepared
def _prepare(out_dir: Path, *, source: str = "count_shapes", seed: int = 0, **options):
    options = options or {"num_images": 60, "image_size": 16, "seed": 1}
    return prepare_dataset(
        "shapes", source=source, options=options, out_dir=out_dir, val_fraction=0.2, test_fraction=0.2, seed=seed
    )


def test_prepare_twice_writes_identical_bytes_and_open_prepared_gives_back_the_images(tmp_path):
    first = _prepare(tmp_path / "a")
    second = _prepare(tmp_path / "b")
    for name in ("splits.json", "images.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["images.tar", "splits.json"]
    assert first.version == second.version and len(first.version) == 12
    payload = json.loads((tmp_path / "a" / "splits.json").read_text())
    assert {"name", "source", "options", "class_names", "num_images", "version", "splits"} <= set(payload)
    with tarfile.open(tmp_path / "a" / "images.tar") as tar:
        assert tar.getnames()[:2] == ["000000.png", "000000.cls"]
    opened = open_prepared(tmp_path / "a")
    original = create_dataset("count_shapes", num_images=60, image_size=16, seed=1)
    np.testing.assert_array_equal(opened.dataset.labels, original.labels)
    np.testing.assert_array_equal(_pixels(opened.dataset), _pixels(original))
    assert opened.class_names == original.class_names == first.class_names
    assert opened.version == first.version and opened.name == "shapes" and opened.path == tmp_path / "a"
    assert all(np.array_equal(opened.splits[k], first.splits[k]) for k in ("train", "val", "test"))
    assert opened.dataset.describe() == original.describe()
    assert _prepare(tmp_path / "c", seed=1).version != first.version


def test_prepare_references_large_sources_without_copying_them(tmp_path):
    root = tmp_path / "folder"
    for label in ("a", "b"):
        for i in range(5):
            _save(Image.fromarray(_rgb(i)), root / label / f"{i}.png")
    out = tmp_path / "prepared"
    _prepare(out)  # a materialised source first: its tar must not survive as stale pixels
    prepared = _prepare(out, source="imagefolder", root=str(root))
    assert sorted(p.name for p in out.iterdir()) == ["splits.json"]
    opened = open_prepared(out)
    assert opened.dataset.class_names == ["a", "b"] and len(opened.dataset) == 10
    np.testing.assert_array_equal(np.asarray(opened.dataset.load_image(7)), _rgb(2))
    assert opened.version == prepared.version
    _save(Image.fromarray(_rgb(9)), root / "b" / "extra.png")
    with pytest.raises(ValueError, match=r"splits\.json' was prepared for 10 images .* now has 11") as excinfo:
        open_prepared(out)
    _one_line(excinfo)


def test_open_prepared_names_a_missing_or_corrupt_splits_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"splits\.json' is missing: run the prepare stage") as excinfo:
        open_prepared(tmp_path)
    assert str(tmp_path) in _one_line(excinfo)
    (tmp_path / "splits.json").write_text('{"name": "x", ')
    with pytest.raises(ValueError, match=r"splits\.json' is corrupt \(not JSON") as excinfo:
        open_prepared(tmp_path)
    _one_line(excinfo)
    (tmp_path / "splits.json").write_text('{"name": "x"}')
    with pytest.raises(ValueError, match=r"corrupt \(missing source, options") as excinfo:
        open_prepared(tmp_path)
    _one_line(excinfo)
