"""Nothing read unvouched, through the CLI: a shard or a probe changed in place with its size and modification time
kept is found before anything reads it, the unit that wrote it recomputes it and says why, and `layerprobe verify`
reports it (exit status 1) as `git fsck` would."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import layerprobe.verify
from layerprobe.cli import main
from layerprobe.config import PathsConfig

UNIT = ["--backbone", "tiny_vit", "--dataset", "count"]


def step(command: list[str], capsys) -> dict:
    assert main([*command, "--no-progress"] if command[0] == "extract" else command) == 0
    return json.loads(capsys.readouterr().out)


def change_in_place(path: Path) -> None:
    """Other bytes in the middle of `path`, its size and modification time as they were (only ctime moves)."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


def verify(capsys, *paths: str) -> tuple[int, list[str]]:
    status = main(["verify", *paths])
    return status, capsys.readouterr().out.splitlines()


def test_a_shard_changed_in_place_is_refused_before_training_reads_it_and_extract_recomputes_it(project_dir, capsys):
    extracted = step(["extract", *UNIT], capsys)
    assert step(["train", *UNIT, "--probe", "linear_last_cls"], capsys)["status"] == "computed"
    cache = project_dir / "features/tiny_vit/count"
    shard = cache / "shard-00001.arrow"
    original = shard.read_bytes()
    change_in_place(shard)

    assert main(["train", *UNIT, "--probe", "linear_last_cls"]) == 2  # refused: the cache cannot be vouched for
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err
    assert "shard-00001.arrow changed in place: sha256 differs from manifest.json's; re-run extract" in captured.err

    status, lines = verify(capsys)
    assert status == 1
    bad = f"{Path('features/tiny_vit/count/shard-00001.arrow')} changed in place: sha256 differs from manifest.json's"
    assert lines[:-1] == [bad]
    assert lines[-1].startswith("1 of ") and "not what they record" in lines[-1]

    again = step(["extract", *UNIT], capsys)
    assert again["status"] == "computed"
    assert again["reason"] == "shard-00001.arrow changed in place: sha256 differs from manifest.json's"
    assert shard.read_bytes() == original and again["content_hash"] == extracted["content_hash"]
    assert step(["train", *UNIT, "--probe", "linear_last_cls"], capsys)["status"] == "reused"
    status, lines = verify(capsys)
    assert status == 0 and lines == [lines[-1]] and lines[-1].startswith("all ") and "match" in lines[-1], lines


def test_a_probe_changed_in_place_is_refused_by_evaluate_and_retrained_by_train(project_dir, capsys, monkeypatch):
    step(["extract", *UNIT], capsys)
    step(["train", *UNIT, "--probe", "linear_last_cls"], capsys)
    weights = project_dir / "probes/tiny_vit/count/linear_last_cls/seed-0/probe.safetensors"
    original = weights.read_bytes()
    change_in_place(weights)

    assert main(["evaluate", *UNIT, "--probe", "linear_last_cls"]) == 2
    error = capsys.readouterr().err
    assert "seed-0/probe.safetensors changed in place: sha256 differs from train.json's; re-run train" in error
    assert not (project_dir / "results").exists() or not list((project_dir / "results").rglob("metrics.json"))
    status, lines = verify(capsys, "probes")
    assert status == 1 and lines[0].endswith("probe.safetensors changed in place: sha256 differs from train.json's")

    retrained = step(["train", *UNIT, "--probe", "linear_last_cls"], capsys)
    assert retrained["status"] == "computed"
    assert retrained["reason"] == "seed-0/probe.safetensors changed in place: sha256 differs from train.json's"
    assert weights.read_bytes() == original  # deterministic: the probe as it was
    assert main(["evaluate", *UNIT, "--probe", "linear_last_cls"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(layerprobe.verify, "PROGRESS_SECONDS", 0.0)  # a long run's progress, on stderr
    assert main(["verify"]) == 0
    out, err = capsys.readouterr()
    paths, names = PathsConfig(), ("tiny_vit", "count", "linear_last_cls")
    markers = [
        paths.splits_file("count"),
        paths.features_dir(*names[:2]) / "manifest.json",
        paths.train_marker(*names),
        paths.evaluation_marker(*names),
    ]
    listed = sum(len(json.loads((project_dir / marker).read_text())["files"]) for marker in markers)
    summary = f"all {listed} files listed by 4 markers under data/prepared, features, probes, results match"
    assert re.fullmatch(rf"{summary} \(\d+\.\d\d GB read\)\n", out), out
    assert f"({listed} of {listed} files)" in err.splitlines()[-1] and err.startswith("layerprobe verify: ")


def test_verify_names_a_path_that_does_not_exist_in_one_line(project_dir, capsys):
    assert main(["verify", "no-such-folder"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "layerprobe verify: error: no-such-folder does not exist"
