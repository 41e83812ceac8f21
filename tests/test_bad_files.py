"""Bad input files through `layerprobe prepare`: each is named in one error line before anything is written, and a
file the readers can read is never refused (a name that is not UTF-8)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layerprobe.cli import main
from layerprobe.data import ImageFileError, create_dataset, open_prepared


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _cut_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def _folder(root: Path) -> Path:
    for index, name in enumerate(["cat/a.png", "cat/b.png", "dog/c.png", "dog/d.png"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_png(index))
    return root


def _tar(path: Path, samples: list[tuple[str, bytes, bytes]]) -> Path:
    """A webdataset tar of (key, image bytes, label bytes) samples, written as webdataset's writer does (tarfile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, image, label in samples:
            for name, data in (
                (f"{key}.png" if image[:4] == b"\x89PNG" else f"{key}.jpg", image),
                (f"{key}.cls", label),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _refused(capsys, *options: str, dataset: str) -> str:
    """Run `layerprobe prepare` in the current folder; it must fail with one error line and write no dataset."""
    argv = ["prepare", "--dataset", dataset]
    for option in options:
        argv += ["--option", option]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerprobe prepare: error: "), lines
    assert not Path(f"data/prepared/{dataset}/splits.json").exists()
    return lines[0]


# ---------------------------------------------------------------------------------------------------- image folders
def test_a_symlink_loop_is_one_bad_file_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = _folder(tmp_path / "folder")
    (root / "cat" / "loop.png").symlink_to(root / "cat" / "loop.png")  # ELOOP: an OSError a flow would retry
    line = _refused(capsys, f"root={root}", dataset="imagefolder")
    assert (
        f"1 bad file(s) under {str(root)!r}" in line
        and f"{str(root / 'cat' / 'loop.png')!r} is a symbolic link loop" in line
    )
    # The image folder's own report lists it beside every image that does not decode
    (root / "dog" / "cut.jpg").write_bytes(_cut_jpeg())
    with pytest.raises(ImageFileError) as error:
        create_dataset("imagefolder", root=str(root))
    assert "2 bad file(s)" in str(error.value) and "loop.png' is a symbolic link loop" in str(error.value)
    assert "cut.jpg: truncated or corrupt image" in str(error.value)


def test_dangling_links_are_bad_files_not_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = _folder(tmp_path / "folder")
    (root / "cat" / "moved.png").symlink_to(tmp_path / "gone.png")
    (root / "bird").symlink_to(tmp_path / "gone", target_is_directory=True)  # a whole class that is not there
    line = _refused(capsys, f"root={root}", dataset="imagefolder")
    assert "2 bad file(s)" in line
    assert f"{str(root / 'bird')!r} is a symbolic link to {str(tmp_path / 'gone')!r}, which does not exist" in line
    assert f"{str(root / 'cat' / 'moved.png')!r} is a symbolic link to {str(tmp_path / 'gone.png')!r}" in line


def _without_root_reads() -> None:
    """Root reads every file: drop the capabilities that let it (CAP_DAC_OVERRIDE 1, CAP_DAC_READ_SEARCH 2) from the
    bounding set, which the exec'd command's capabilities come from, so the mode bits bind it as any user."""
    if os.geteuid() == 0:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):
            if libc.prctl(24, capability, 0, 0, 0):  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unreadable_files_and_folders_are_one_bad_file_line(tmp_path):
    root = _folder(tmp_path / "folder")
    (root / "cat" / "a.png").chmod(0)
    (root / "dog").chmod(0)
    try:
        argv = [
            sys.executable,
            "-m",
            "layerprobe.cli",
            "prepare",
            "--dataset",
            "imagefolder",
            "--option",
            f"root={root}",
        ]
        run = subprocess.run(
            argv, cwd=tmp_path, preexec_fn=_without_root_reads, capture_output=True, text=True, timeout=300
        )
    finally:
        (root / "dog").chmod(0o755)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "2 bad file(s)" in lines[0], lines[0]
    assert f"{str(root / 'cat' / 'a.png')!r} cannot be read (permission denied)" in lines[0]
    assert f"{str(root / 'dog')!r} is a folder that cannot be read (Permission denied)" in lines[0]
    assert not (tmp_path / "data/prepared/imagefolder/splits.json").exists()


def test_a_file_name_that_is_not_utf8_is_prepared_and_its_hash_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = _folder(tmp_path / "folder")
    odd = Path(os.fsdecode(os.fsencode(root / "cat") + b"/caf\xe9.png"))  # Latin-1, as old zips hold
    odd.write_bytes(_png(9))
    os.utime(odd, (1e9, 1e9))  # settled, so the stat cache records it (a file written just now is hashed again)
    for status in ("computed", "reused"):
        assert main(["prepare", "--dataset", "imagefolder", "--option", f"root={root}"]) == 0, capsys.readouterr().err
        assert f'"status": "{status}"' in capsys.readouterr().out
    assert len(open_prepared(tmp_path / "data/prepared/imagefolder").dataset) == 5


# ------------------------------------------------------------------------------------------------------- webdataset
def test_webdataset_labels_outside_the_class_names_are_named_at_prepare(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tar = _tar(tmp_path / "wds/train/0.tar", [("a", _png(0), b"-1"), ("b", _png(1), b"3"), ("c", _png(2), b"1")])
    (tmp_path / "wds/classnames.txt").write_text("ant\nbee\ncow\n")
    line = _refused(capsys, f"root={tmp_path / 'wds'}", dataset="wds")
    assert "2 bad member(s)" in line
    assert f"tar {str(tar)!r}: sample 'a' has label -1, outside 0..2 (classnames.txt names 3 classes)" in line
    assert f"tar {str(tar)!r}: sample 'b' has label 3, outside 0..2" in line


def test_webdataset_without_class_names_caps_the_class_count(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tar = _tar(tmp_path / "wds/train/0.tar", [("a", _png(0), b"0"), ("b", _png(1), b"1000000")])
    line = _refused(capsys, f"root={tmp_path / 'wds'}", dataset="wds")
    cap = "without classnames.txt the classes are numbered, at most one a sample (2): add classnames.txt"
    assert f"tar {str(tar)!r}: sample 'b' has label 1000000, outside 0..1 ({cap}" in line


def test_a_webdataset_tar_cut_short_is_reported_not_read_as_fewer_samples(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    samples = [("a", _png(0), b"0"), ("b", _png(1), b"1")]
    boundary = _tar(tmp_path / "wds/train/0.tar", samples)
    inside = _tar(tmp_path / "wds/test/0.tar", samples)
    with tarfile.open(boundary) as tar:
        members = tar.getmembers()
    os.truncate(boundary, members[2].offset)  # just before b.png's header: a whole sample gone, no member cut
    os.truncate(inside, members[2].offset_data + 10)  # inside b.png
    line = _refused(capsys, f"root={tmp_path / 'wds'}", dataset="wds")
    assert f"tar {str(boundary)!r} is cut short after a.cls: it has no end-of-archive blocks" in line
    assert f"tar {str(inside)!r} is cut short: it ends inside b.png" in line


def test_a_corrupt_webdataset_image_is_named_at_prepare(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tar = _tar(tmp_path / "wds/train/0.tar", [("a", _png(0), b"0"), ("b", _cut_jpeg(), b"1"), ("c", _png(1), b"1")])
    line = _refused(capsys, f"root={tmp_path / 'wds'}", dataset="wds")
    assert f"source 'wds': 1 bad member(s): {tar}:b.jpg: truncated or corrupt image" in line


def test_webdataset_shards_are_read_in_number_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for shard in range(11):  # as text, 10.tar would come third
        _tar(tmp_path / f"wds/{shard}.tar", [(f"s{shard}", _png(shard), str(shard % 2).encode())])
    assert main(["prepare", "--dataset", "wds", "--option", f"root={tmp_path / 'wds'}"]) == 0, capsys.readouterr().err
    dataset = open_prepared(tmp_path / "data/prepared/wds").dataset
    assert [tar.name for tar in dataset.tars] == [f"{shard}.tar" for shard in range(11)]
    assert [member.name for member in dataset.members][:3] == ["s0.png", "s1.png", "s2.png"]


# ------------------------------------------------------------------------------------------------------ torchvision
def test_a_corrupt_torchvision_image_is_named_at_prepare(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for split in ("train", "val"):  # Imagenette's layout: imagenette2/<split>/<wnid>/*.JPEG
        for wnid in ("n01440764", "n03888257"):
            (tmp_path / "imagenette2" / split / wnid).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(
                tmp_path / "imagenette2" / split / wnid / "0.JPEG"
            )
    cut = tmp_path / "imagenette2/val/n03888257/1.JPEG"
    cut.write_bytes(_cut_jpeg())
    line = _refused(capsys, "name=Imagenette", f"root={tmp_path}", dataset="torchvision")
    assert (
        f"source 'torchvision': 1 bad image(s) in Imagenette under {str(tmp_path)!r}: {cut}: truncated or corrupt"
        in line
    )
