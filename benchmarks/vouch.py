"""What vouching for a feature cache costs: the check of an unchanged cache on a second run against a bare `os.stat`
of its files, and `layerprobe verify` (every byte re-hashed) against `sha256sum` of the same files.

What: every read and reuse of an output vouches for each file its marker lists (`layerprobe.fingerprint.vouch`): a
file whose stat the machine's stat cache holds with its sha256 costs a stat, any other is read and hashed. This
writes a cache of N shards (random float16 tokens, `features.write_shard` + `write_manifest`, dated a minute back as
a finished cache is), lets a first check record every file, then times, in one run:
  (a) the second run's check: `staleness` of the manifest (fingerprint, then every listed file vouched for) and
      `cache_content_hash` (the digest MLflow records: vouched again), against a bare `os.stat` of the same files;
  (b) `layerprobe verify`'s re-hashing of every byte, in process (`layerprobe.verify.verify`) and as the command a
      user runs (a subprocess, with the CLI's start), against `sha256sum` of the same files.
Each is timed `--repeats` times (the millisecond checks 10 times as often), interleaved, and the best kept (the box
is shared).
How:  python benchmarks/vouch.py [--shards 400 --rows 16 --repeats 5]
Cost: under a minute on 2 CPU cores for 400 shards of 0.6 MB (240 MB written under a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import machine_line

from layerprobe import file_hashes
from layerprobe.config import MANIFEST_FILE
from layerprobe.features import cache_content_hash, shard_name, write_manifest, write_shard
from layerprobe.fingerprint import make_fingerprint, staleness
from layerprobe.verify import verify

ROOT = Path(__file__).resolve().parents[1]
CHEAP_REPEATS = 10  # the millisecond rows run this many times per round (best kept)
SHAPE = (12, 2, 768)  # a ViT-B/16's 12 blocks x (cls, ap) x 768


def write_cache(cache: Path, *, shards: int, rows: int):
    """A complete cache of `shards` shards of `rows` rows, dated a minute back; returns its fingerprint."""
    fingerprint = make_fingerprint("layerprobe.steps.extract", format="bench/1", params={}, inputs={})
    provenance = {
        "layer_names": [f"block{i}" for i in range(SHAPE[0])],
        "token_names": ["cls", "ap"],
        "dtype": "float16",
        "fingerprint": fingerprint.as_dict(),
    }
    rng = np.random.default_rng(0)
    cache.mkdir(parents=True)
    entries = []
    for number in range(shards):
        tokens = rng.standard_normal((rows, *SHAPE), dtype=np.float32).astype(np.float16)
        indices = np.arange(number * rows, (number + 1) * rows)
        sha = write_shard(
            cache / shard_name(number),
            tokens=tokens,
            labels=indices % 10,
            indices=indices,
            splits=["train"] * rows,
            metadata=provenance,
        )
        entries.append((shard_name(number), rows, sha))
    write_manifest(cache, provenance=provenance, shards=entries, splits=["train"], plan_sha256="bench")
    past = time.time_ns() - 60 * 10**9
    for path in cache.iterdir():
        os.utime(path, ns=(past, past))
    return fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=400)
    parser.add_argument("--rows", type=int, default=16, help="rows per shard (0.6 MB each at 16)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="layerprobe-vouch-") as scratch:
        os.environ[file_hashes.STATE_DIR_ENV] = str(Path(scratch) / "state")  # an empty stat cache
        cache = Path(scratch) / "features" / "vit_b16" / "data"
        fingerprint = write_cache(cache, shards=args.shards, rows=args.rows)
        files = sorted(str(p) for p in cache.glob("shard-*.arrow"))
        size = sum(os.stat(f).st_size for f in files)

        start = time.perf_counter()
        assert staleness(cache / MANIFEST_FILE, fingerprint) is None  # the first check reads and records every file
        first = time.perf_counter() - start

        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
        command = [sys.executable, "-m", "layerprobe.cli", "verify"]
        (Path(scratch) / "empty").mkdir()

        def stat_all() -> None:
            for path in files:
                os.stat(path)

        runs = {
            "stat": stat_all,
            "second": lambda: staleness(cache / MANIFEST_FILE, fingerprint),
            "hash": lambda: cache_content_hash(cache),
            "sha256sum": lambda: subprocess.run(["sha256sum", *files], check=True, capture_output=True),
            "verify": lambda: verify([cache], report=lambda line: None, progress=lambda line: None),
            "cli": lambda: subprocess.run([*command, str(cache)], env=env, check=True, capture_output=True),
            "start": lambda: subprocess.run(
                [*command, str(Path(scratch) / "empty")], env=env, check=True, capture_output=True
            ),
        }
        timings = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleaved, so a busy moment on the shared box hits every row alike
            for name, function in runs.items():
                for _ in range(CHEAP_REPEATS if name in ("stat", "second", "hash") else 1):
                    start = time.perf_counter()
                    function()
                    timings[name].append(time.perf_counter() - start)
        t = {name: min(values) for name, values in timings.items()}
        file_hashes.sha256_file = None  # the second run's check reads no byte: a read would fail here
        assert staleness(cache / MANIFEST_FILE, fingerprint) is None and cache_content_hash(cache)
    n, megabytes = len(files), size / 1e6
    print(f"{n} shards, {megabytes:,.0f} MB ({megabytes / n:.2f} MB each); {machine_line()}; best of {args.repeats}")
    print("(a) the check of an unchanged cache on a second run")
    print(
        f"    bare os.stat of every shard:            {t['stat'] * 1e3:8.2f} ms  ({t['stat'] / n * 1e6:6.2f} us/file)"
    )
    print(
        f"    staleness(manifest) (vouch, warm):      {t['second'] * 1e3:8.2f} ms  "
        f"({t['second'] / n * 1e6:6.2f} us/file)   ratio {t['second'] / t['stat']:.1f}x a bare stat"
    )
    print(
        f"    cache_content_hash (vouch, warm):       {t['hash'] * 1e3:8.2f} ms  "
        f"({t['hash'] / n * 1e6:6.2f} us/file)   ratio {t['hash'] / t['stat']:.1f}x a bare stat"
    )
    print(f"    first check (every byte read, recorded): {first * 1e3:7.0f} ms  ({megabytes / first:,.0f} MB/s)")
    print("(b) layerprobe verify (every byte re-hashed) against sha256sum of the same files")
    print(f"    sha256sum:                     {t['sha256sum']:.3f} s  {megabytes / t['sha256sum']:8,.0f} MB/s")
    print(
        f"    verify, in process:            {t['verify']:.3f} s  {megabytes / t['verify']:8,.0f} MB/s  "
        f"ratio {t['sha256sum'] / t['verify']:.2f}x sha256sum's throughput"
    )
    print(
        f"    `layerprobe verify CACHE`:     {t['cli']:.3f} s  {megabytes / t['cli']:8,.0f} MB/s  "
        f"ratio {t['sha256sum'] / t['cli']:.2f}x (the CLI's start alone, an empty folder: {t['start']:.2f} s)"
    )


if __name__ == "__main__":
    main()
