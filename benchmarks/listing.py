"""What keying an image folder by content costs: `input_listing` of a 50,000-file folder, first and second run, against
a bare `os.stat` walk of the same files.

What: the prepare step keys a file-backed dataset on every file's sha256 (`layerprobe.file_hashes`), never on times
or paths, with a per-machine stat cache so an unchanged file is not read again. This writes N small image-sized
files (random bytes, class-per-folder, dated a minute back as a dataset on disk is), then times, in one run:
  1. a bare walk that `os.stat`s every file (the floor any listing pays);
  2. the first listing (an empty stat cache: every byte read once and hashed);
  3. the second listing (every file known by its stat: no byte read);
  4. the listing after every file was touched (`touch`, as a copy without `-p` does): read again, found equal.
How:  python benchmarks/listing.py [--files 50000 --size 4096]
Cost: about a minute on 2 CPU cores for 50,000 files of 4 KB (200 MB written under a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from machine import cpu_name

from layerprobe import file_hashes
from layerprobe.files import visible_files


def write_folder(root: Path, *, files: int, size: int, classes: int = 100) -> None:
    past = time.time_ns() - 60 * 10**9
    for index in range(files):
        path = root / f"class_{index % classes:03d}" / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        os.utime(path, ns=(past, past))


def stat_walk(root: Path) -> int:
    """The floor: every file found and `os.stat`ed, nothing read."""
    count = 0
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in names:
            os.stat(os.path.join(folder, name))
            count += 1
    return count


def timed(function, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=4096, help="bytes per file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="layerprobe-listing-") as scratch:
        os.environ[file_hashes.STATE_DIR_ENV] = str(Path(scratch) / "state")  # an empty stat cache
        root = Path(scratch) / "images"
        write_folder(root, files=args.files, size=args.size)
        walk, count = timed(stat_walk, root)
        ours_walk, walked = timed(lambda r: sum(1 for _ in visible_files(r)), root)
        first, listing = timed(file_hashes.input_listing, [root])
        second, again = timed(file_hashes.input_listing, [root])
        assert count == walked == len(listing) == args.files and again == listing
        past = time.time_ns() - 30 * 10**9
        for path in visible_files(root):
            os.utime(path, ns=(past, past))  # touched: new mtime and ctime, same bytes
        touched, after_touch = timed(file_hashes.input_listing, [root])
        third, _ = timed(file_hashes.input_listing, [root])
        assert after_touch == listing
    megabytes = args.files * args.size / 1e6
    print(f"{args.files:,} files of {args.size:,} bytes ({megabytes:,.0f} MB), {cpu_name()}, {os.cpu_count()} cores")
    print("| what | seconds | vs bare os.stat walk |")
    print("|---|---:|---:|")
    for name, seconds in (
        ("bare os.walk + os.stat", walk),
        ("layerprobe's walk (visible files, links followed), no stat", ours_walk),
        ("input_listing, first run (reads every byte once)", first),
        ("input_listing, second run (stat cache)", second),
        ("input_listing after touching every file (read again, equal)", touched),
        ("input_listing, the run after that", third),
    ):
        print(f"| {name} | {seconds:.2f} | {seconds / walk:.2f}x |")
    print(f"first run: {megabytes / first:,.0f} MB/s hashed")


if __name__ == "__main__":
    main()
