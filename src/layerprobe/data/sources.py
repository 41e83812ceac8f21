"""File-backed sources: image folders, torchvision datasets and local CLIP-benchmark webdataset tars.

These are referenced by their options (root path), never copied, so they can be as large as ImageNet. Images are
decoded lazily in `load_image`; a file that cannot be decoded raises `ImageFileError` naming it.
"""

from __future__ import annotations

import inspect
import io
import itertools
import os
import re
import tarfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from layerprobe.data.catalogue import (
    ImageFileError,
    decode_image,
    image_error,
    open_image,
    register_source,
    resolve_max_pixels,
    to_rgb,
)
from layerprobe.files import visible_files
from layerprobe.registry import unknown_name_error

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SPLITS = ("train", "test")
# A webdataset label member holds a class index as text: a few bytes. Anything longer is not a label, and reading it
# whole (as indexing does) would let one member fill memory.
MAX_LABEL_BYTES = 64


def _require_dir(root: Path, source: str) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"source {source!r}: root {str(root)!r} does not exist or is not a folder")
    return root


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


# ---------------------------------------------------------------------------------------------------- imagefolder
class ImageFolderDataset:
    """`root/<class>/<images>`, or `root/{train,test}/<class>/<images>` with official splits."""

    def __init__(self, root: str | Path, *, max_pixels: int | None = None) -> None:
        self.root = _require_dir(Path(root), "imagefolder")
        self.max_pixels = resolve_max_pixels(max_pixels, source="imagefolder")  # every decode of the folder's files
        split_dirs = [self.root / s for s in SPLITS]
        has_splits = all(d.is_dir() for d in split_dirs)
        parts = list(zip(SPLITS, split_dirs, strict=True)) if has_splits else [(None, self.root)]
        problems: list[str] = []
        class_dirs = {split: self._class_dirs(folder, problems) for split, folder in parts}
        self.class_names = sorted({d.name for dirs in class_dirs.values() for d in dirs})
        if not self.class_names and not problems:
            raise ValueError(f"source 'imagefolder': no class folders under {str(self.root)!r}")
        index = {name: i for i, name in enumerate(self.class_names)}
        paths, labels, splits = [], [], []
        for split, _ in parts:
            for class_dir in class_dirs[split]:
                files, bad = self._image_files(class_dir)
                problems += bad
                paths += files
                labels += [index[class_dir.name]] * len(files)
                splits += [split] * len(files)
        if problems:  # failing anyway: decode the rest too, so one error names every bad file
            _raise_all(problems + self._bad_images(paths), self.root)
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.official_splits = np.asarray(splits) if has_splits else None

    @staticmethod
    def _class_dirs(folder: Path, problems: list[str]) -> list[Path]:
        """The class folders in `folder`, and a line for each link among them that leads nowhere (a class gone)."""
        entries = sorted((d for d in folder.iterdir() if _visible(d)), key=lambda d: d.name)
        for d in entries:
            if d.is_symlink() and not d.exists():
                problems.append(f"{str(d)!r} is a symbolic link that leads nowhere (to nothing, or a loop)")
        return [d for d in entries if d.is_dir()]

    @staticmethod
    def _image_files(class_dir: Path) -> tuple[list[Path], list[str]]:
        """The class folder's images, and a line for each file that cannot be one (all of them, not the first)."""
        files, problems = [], []
        # Hidden files (.DS_Store, editor swap files) are not samples; symlinked folders are followed, exactly as the
        # prepared dataset's fingerprint lists them (`layerprobe.file_hashes.input_listing` walks the same way).
        for path in visible_files(class_dir, problems):  # loops, dangling links and unreadable files are problems
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                problems.append(f"{str(path)!r} has an unknown extension")
            else:
                files.append(path)
        if not files and not problems:
            problems.append(f"class folder {str(class_dir)!r} has no images")
        return files, problems

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, index: int) -> Image.Image:
        return decode_image(self.paths[index], name=str(self.paths[index]), max_pixels=self.max_pixels)

    def verify_images(self) -> None:
        """Decode every image once and report every one that fails or declares more than `max_pixels` pixels in one
        error (prepare calls this, so a folder with three broken files is fixed in one round, not three)."""
        _raise_all(self._bad_images(self.paths), self.root)

    def _bad_images(self, paths: list[Path]) -> list[str]:
        return _decode_problems(len(paths), lambda i: (str(paths[i]), paths[i]), max_pixels=self.max_pixels)

    def describe(self) -> dict[str, Any]:
        return {"source": "imagefolder", "options": {"root": str(self.root)}, "root": str(self.root)}


class _PixelBudget:
    """At most `limit` pixels decoded at once across threads: a thread waits until its image fits."""

    def __init__(self, limit: int) -> None:
        self._limit, self._used = limit, 0
        self._changed = threading.Condition()

    def acquire(self, pixels: int) -> int:
        """Wait until `pixels` fit (one over the whole budget waits to run alone); returns the amount held."""
        pixels = min(pixels, self._limit)
        with self._changed:
            self._changed.wait_for(lambda: self._used + pixels <= self._limit)
            self._used += pixels
        return pixels

    def release(self, pixels: int) -> None:
        with self._changed:
            self._used -= pixels
            self._changed.notify_all()


def _decode_problems(count: int, source: Callable[[int], tuple[str, Path | BinaryIO]], *, max_pixels: int) -> list[str]:
    """A line for every one of `count` images (`source(i)`: its name and its file) that does not decode or declares
    more than `max_pixels` pixels.

    Each file's header is read first (size and format, no pixels), so a bomb is refused without being decoded. Then
    threads decode (PIL releases the GIL) within one budget of `max_pixels` pixels in flight, and each image is freed
    as soon as it has decoded: a folder of 30-megapixel photos checks on every core, one of images at the cap one at
    a time, and memory stays about one image at the cap (4 bytes a pixel, RGBA) whatever the number of cores.
    """
    budget = _PixelBudget(max_pixels)

    def problem(index: int) -> str | None:
        held = 0
        try:
            name, file = source(index)
            with open_image(file, name=name, max_pixels=max_pixels) as image:
                held = budget.acquire(image.width * image.height)
                image.load()
                image.close()  # frees the pixels now, not when the garbage collector gets to them
        except ImageFileError as e:
            return str(e)
        finally:
            budget.release(held)
        return None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return [line for line in pool.map(problem, range(count)) if line]


def _raise_all(problems: list[str], root: Path) -> None:
    """One error naming every problem of an image folder (the first few in full, then a count)."""
    if not problems:
        return
    extensions = ", ".join(IMAGE_EXTENSIONS)
    raise ImageFileError(
        f"source 'imagefolder': {len(problems)} bad file(s) under {str(root)!r} (images: {extensions}): "
        f"{_first_few(problems)}"
    )


def _first_few(problems: list[str], shown: int = 20) -> str:
    """Problem lines joined on one line: the first `shown` in full, then a count."""
    more = f"; ... and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


@register_source("imagefolder", input_options=("root",))
def imagefolder(*, root: str, max_image_pixels: int | None = None) -> ImageFolderDataset:
    """Class-per-folder images; `root/train` and `root/test` give official splits. An image declaring more than
    `max_image_pixels` pixels (null: PIL's default, 89,478,485) is a bad file, refused before it is decoded."""
    return ImageFolderDataset(root, max_pixels=max_image_pixels)


# ---------------------------------------------------------------------------------------------------- torchvision
# torchvision datasets whose samples are not (image, class index) pairs, or that are better served by another source.
_NOT_CLASSIFICATION = {
    "VisionDataset",
    "DatasetFolder",
    "ImageFolder",
    "LSUNClass",
    "CocoCaptions",
    "CocoDetection",
    "PhotoTour",
    "SBU",
    "Flickr8k",
    "Flickr30k",
    "VOCSegmentation",
    "VOCDetection",
    "Cityscapes",
    "SBDataset",
    "Kinetics",
    "HMDB51",
    "UCF101",
    "Kitti",
    "WIDERFace",
    "CelebA",
    "LFWPairs",
    "MovingMNIST",
    "KittiFlow",
    "Sintel",
    "FlyingChairs",
    "FlyingThings3D",
    "HD1K",
}


# Split spellings tried in order for datasets with a `split` argument: the CLIP benchmark trains on "trainval" where
# it exists (Pets, Aircraft) and tests on "val" where there is no labelled test set (ImageNet, Imagenette).
_SPLIT_VALUES = {"train": ["trainval", "train", "train-standard"], "test": ["test", "val"]}


def torchvision_classification_datasets() -> list[str]:
    """Names of torchvision.datasets classes that yield (image, class index) samples."""
    import torchvision.datasets as tvd

    return sorted(
        name
        for name in tvd.__all__
        if inspect.isclass(getattr(tvd, name))
        and issubclass(getattr(tvd, name), tvd.VisionDataset)
        and name not in _NOT_CLASSIFICATION
        and not name.endswith("Stereo")
    )


def _torchvision_labels(dataset: Any) -> np.ndarray:
    """Labels without decoding images, from whichever attribute the dataset keeps them in."""
    for attribute in ("targets", "_labels", "labels", "y"):
        values = getattr(dataset, attribute, None)
        if values is not None and len(values) == len(dataset):
            return np.asarray([int(v) for v in values], dtype=np.int64)
    for attribute in ("samples", "_samples", "imgs"):
        values = getattr(dataset, attribute, None)
        if values is not None and len(values) == len(dataset):
            return np.asarray([int(v[1]) for v in values], dtype=np.int64)
    # NOTE: slow fallback that decodes every image; only for datasets that hide their labels.
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


class TorchvisionDataset:
    """A torchvision classification dataset, its train and test parts concatenated with official splits."""

    def __init__(self, name: str, root: str | Path, *, download: bool = False) -> None:
        import torchvision.datasets as tvd

        choices = torchvision_classification_datasets()
        if name not in choices:
            raise unknown_name_error("torchvision dataset", name, choices)
        cls = getattr(tvd, name)
        self.name, self.root, self.download = name, Path(root), download
        parameters = inspect.signature(cls.__init__).parameters
        base: dict[str, Any] = {}
        if "root" in parameters:
            base["root"] = str(self.root)
        if "download" in parameters:
            base["download"] = download
        if "train" in parameters:
            variants = [("train", [{"train": True}]), ("test", [{"train": False}])]
        elif "split" in parameters:
            variants = [(split, [{"split": value} for value in _SPLIT_VALUES[split]]) for split in SPLITS]
        else:
            variants = [(None, [{}])]
        self.parts = [self._open(cls, base, candidates) for _, candidates in variants]
        self.labels = np.concatenate([_torchvision_labels(part) for part in self.parts])
        self.official_splits = (
            np.concatenate([np.full(len(p), split) for (split, _), p in zip(variants, self.parts, strict=True)])
            if variants[0][0] is not None
            else None
        )
        self._offsets = np.cumsum([0] + [len(p) for p in self.parts])
        classes = getattr(self.parts[0], "classes", None)
        num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        if classes is not None and len(classes) >= num_classes:
            # Some datasets (Imagenette) give each class a tuple of synonyms: the first is its name.
            self.class_names = [str(c[0] if isinstance(c, tuple | list) else c) for c in classes]
        else:
            self.class_names = [str(i) for i in range(num_classes)]

    def _open(self, cls: type, base: dict[str, Any], candidates: list[dict[str, Any]]) -> Any:
        """Build the first accepted variant (datasets spell their splits differently: "trainval", "val", ...)."""
        for extra in candidates:
            try:
                return cls(**base, **extra)
            except ValueError as e:
                if "split" in str(e) and extra is not candidates[-1]:
                    continue  # torchvision's verify_str_arg rejected this split name; try the next spelling
                raise
            except (RuntimeError, OSError) as e:  # URLError and other network failures are OSErrors
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                if self.download:
                    raise FileNotFoundError(
                        f"torchvision dataset {self.name} could not be downloaded to {str(self.root)!r}: downloading "
                        f"needs network (offline: copy its files under root and set download: false) ({reason})"
                    ) from e
                if not isinstance(e, RuntimeError | FileNotFoundError):
                    raise
                # torchvision says "Dataset not found" in several ways; the cure is the same.
                raise FileNotFoundError(
                    f"torchvision dataset {self.name} not found under {str(self.root)!r}; set download: true to fetch"
                    f" it ({reason})"
                ) from e
        raise AssertionError("unreachable: the last candidate returns or raises")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, index: int) -> tuple[Any, int]:
        """The part holding sample `index`, and its index there."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        part = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self.parts[part], index - int(self._offsets[part])

    def load_image(self, index: int) -> Image.Image:
        part, local = self._locate(index)
        image = part[local][0]
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise ImageFileError(f"torchvision dataset {self.name} sample {index}: not a PIL image ({type(image)})")
        return to_rgb(image)

    def _sample_name(self, index: int) -> str:
        """Sample `index`'s file where the dataset lists its files (most do, as `torchvision_labels` reads them)."""
        part, local = self._locate(index)
        for attribute in ("samples", "_samples", "imgs", "_image_files", "_images"):
            values = getattr(part, attribute, None)
            if values is not None and len(values) == len(part):
                item = values[local][0] if isinstance(values[local], tuple | list) else values[local]
                if isinstance(item, str | os.PathLike):
                    return str(item)
        return f"torchvision dataset {self.name} sample {index}"

    def verify_images(self) -> None:
        """Load every sample once, through torchvision's own reader as extraction will, and report every one that
        fails in one error (prepare calls this: a corrupt JPEG is found here, not hours into extraction)."""

        def problem(index: int) -> str | None:
            try:
                self.load_image(index)
            except ImageFileError as e:
                return str(e)
            except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
                return str(image_error(self._sample_name(index), e))
            return None

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
            problems = [line for line in pool.map(problem, range(len(self))) if line]
        if problems:
            raise ImageFileError(
                f"source 'torchvision': {len(problems)} bad image(s) in {self.name} under {str(self.root)!r}: "
                f"{_first_few(problems)}"
            )

    def describe(self) -> dict[str, Any]:
        options = {"name": self.name, "root": str(self.root), "download": self.download}
        return {"source": "torchvision", "options": options, "root": str(self.root)}


@register_source("torchvision", input_options=("root",))
def torchvision(*, name: str, root: str, download: bool = False) -> TorchvisionDataset:
    """Any torchvision classification dataset by class name (`MNIST`, `CIFAR10`, ...)."""
    return TorchvisionDataset(name, root, download=download)


# ---------------------------------------------------------------------------------------------------- webdataset
@dataclass(frozen=True)
class TarMember:
    """Where one sample's image bytes lie: tar file index, byte offset and size."""

    tar: int
    offset: int
    size: int
    name: str


def _split_key(member_name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the basename; the rest is the extension."""
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def max_image_bytes(max_pixels: int) -> int:
    """The largest image member worth reading for a pixel cap: 8 bytes a pixel (a 16-bit RGBA PNG stored without
    compression) plus 1 MiB of headers and metadata. A bigger member cannot hold an image under the cap."""
    return 8 * max_pixels + 2**20


def index_tar(path: Path, tar_index: int, *, max_pixels: int) -> tuple[list[TarMember], list[int], list[str]]:
    """Index one webdataset tar: the image member and integer label of every sample, in tar order, and a line for
    every problem (the caller reports the problems of all tars at once); a sample with a problem is left out.

    Reads only headers and the tiny `.cls` members (at most `MAX_LABEL_BYTES` each); images are read later by seek,
    so indexing is cheap. An image member over `max_image_bytes(max_pixels)` is a problem, not a sample, and so is a
    tar that ends without tar's end-of-archive blocks: one cut short, even at a member boundary, loses samples that
    nothing else would miss.
    """
    images: dict[str, tarfile.TarInfo] = {}
    labels: dict[str, int] = {}
    order: list[str] = []
    problems: list[str] = []
    reported: set[str] = set()  # keys of samples with a problem line: not samples, and not reported again

    def problem(key: str, line: str) -> None:
        problems.append(f"{where}: {line}")
        reported.add(key)

    where = f"tar {str(path)!r}"
    try:
        size = path.stat().st_size
        with tarfile.open(path, "r:") as tar:
            last = None
            for member in tar:
                last = member.name
                if member.offset_data + member.size > size:
                    problems.append(f"{where} is cut short: it ends inside {member.name} (copy it again)")
                    break
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                if key not in images and key not in labels:
                    order.append(key)
                if ext in WDS_IMAGE_EXTENSIONS:
                    if member.size > max_image_bytes(max_pixels):
                        problem(
                            key,
                            f"{member.name} is {member.size:,} bytes, more than an image under the cap of "
                            f"{max_pixels:,} pixels can be",
                        )
                    images[key] = member
                elif ext == "cls":
                    labels[key] = -1  # a placeholder until it is read: the sample counts as labelled
                    if member.size > MAX_LABEL_BYTES:
                        problem(
                            key,
                            f"{member.name} is {member.size:,} bytes, not a class index (at most "
                            f"{MAX_LABEL_BYTES} bytes)",
                        )
                        continue
                    raw = tar.extractfile(member).read()
                    try:
                        labels[key] = int(raw.decode("utf-8").strip())
                    except ValueError:  # UnicodeDecodeError included
                        problem(key, f"{member.name} holds {raw!r}, not an integer label")
            else:
                tar.fileobj.seek(tar.offset)  # where reading stopped: tar's end-of-archive block, or the cut
                if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                    after = f"after {last}" if last else "before its first member"
                    problems.append(f"{where} is cut short {after}: it has no end-of-archive blocks (copy it again)")
    except (tarfile.TarError, OSError) as e:
        return [], [], [f"{where} cannot be read: {e}"]
    members, label_list = [], []
    for key in order:
        if key in reported or (key not in images and key not in labels):
            continue  # reported, or neither image nor label (e.g. only .json metadata): not ours to judge
        if key not in labels:
            problems.append(f"{where}: sample {key!r} has an image but no .cls label")
        elif key not in images:
            problems.append(f"{where}: sample {key!r} has a .cls label but no image")
        else:
            info = images[key]
            members.append(TarMember(tar_index, info.offset_data, info.size, info.name))
            label_list.append(labels[key])
    return members, label_list, problems


class _MemberFile(io.RawIOBase):
    """One tar member's bytes as a seekable read-only file over `os.pread`: threads share the tar's descriptor but no
    file position, and a decoder reads only what it asks for, never a whole member at once."""

    def __init__(self, fd: int, member: TarMember) -> None:
        super().__init__()
        self._fd, self._start, self._size, self._position = fd, member.offset, member.size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        wanted = max(0, min(len(buffer), self._size - self._position))
        data = os.pread(self._fd, wanted, self._start + self._position)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


class TarImageDataset:
    """Random access into webdataset tars: members indexed once, image bytes read by seek at load time.

    File handles open lazily and are reopened when the process id changes, so a dataset built in the parent and
    forked into DataLoader workers never shares a file position between processes.
    """

    def __init__(
        self,
        tars: list[Path],
        class_names: list[str] | None,
        *,
        splits: list[str | None] | None = None,
        description: dict[str, Any],
        max_pixels: int | None = None,
    ) -> None:
        self.tars = [Path(t) for t in tars]
        self.max_pixels = resolve_max_pixels(max_pixels, source=description.get("source", "wds"))
        self.members: list[TarMember] = []
        labels: list[int] = []
        split_of: list[str | None] = []
        problems: list[str] = []
        for i, tar in enumerate(self.tars):
            members, tar_labels, bad = index_tar(tar, i, max_pixels=self.max_pixels)
            self.members += members
            labels += tar_labels
            split_of += [splits[i] if splits else None] * len(members)
            problems += bad
        self.labels = np.asarray(labels, dtype=np.int64)
        if class_names is None:
            # The labels number the classes, at most one a sample: a stray 12-digit label is a problem, not a
            # trillion class names.
            count = min(int(self.labels.max()) + 1, len(labels)) if len(labels) else 0
            class_names = [str(i) for i in range(count)]
            known = (
                f"without classnames.txt the classes are numbered, at most one a sample ({len(labels)}): add "
                "classnames.txt, one name a line"
            )
        else:
            known = f"classnames.txt names {len(class_names)} classes"
        for index in np.flatnonzero((self.labels < 0) | (self.labels >= len(class_names))):
            member = self.members[index]
            problems.append(
                f"tar {str(self.tars[member.tar])!r}: sample {_split_key(member.name)[0]!r} has label "
                f"{labels[index]}, outside 0..{len(class_names) - 1} ({known})"
            )
        self.class_names = list(class_names)
        self.official_splits = np.asarray(split_of) if splits else None
        self._description = description
        self._handles: dict[int, BinaryIO] = {}
        self._pid = os.getpid()
        if problems:  # failing anyway: decode the rest too, so one error names every bad member of every tar
            self._raise_all(problems + self._bad_images())

    def _raise_all(self, problems: list[str]) -> None:
        if problems:
            source = self._description.get("source", "wds")
            raise ImageFileError(f"source {source!r}: {len(problems)} bad member(s): {_first_few(problems)}")

    def _bad_images(self) -> list[str]:
        """A line for every image member that does not decode or declares more than the pixel cap (as the image
        folder check: headers first, one pixel budget), read in place, a tar at a time (few open files)."""
        grouped = itertools.groupby(self.members, key=lambda member: member.tar)  # members are in tar order
        return [line for tar, members in grouped for line in self._decode_tar(self.tars[tar], list(members))]

    def _decode_tar(self, path: Path, members: list[TarMember]) -> list[str]:
        with open(path, "rb") as handle:

            def source(i: int) -> tuple[str, BinaryIO]:
                return f"{path}:{members[i].name}", io.BufferedReader(_MemberFile(handle.fileno(), members[i]))

            return _decode_problems(len(members), source, max_pixels=self.max_pixels)

    def verify_images(self) -> None:
        """Decode every image once and report every one that fails in one error (prepare calls this, so a corrupt
        JPEG is found before extraction, not hours into it)."""
        self._raise_all(self._bad_images())

    def _handle(self, tar: int) -> BinaryIO:
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()  # forked: the parent's handles belong to the parent
        if tar not in self._handles:
            self._handles[tar] = open(self.tars[tar], "rb")  # noqa: SIM115 - kept open for random access
        return self._handles[tar]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not pickle (spawned workers); each process opens its own
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for handle in getattr(self, "_handles", {}).values():
                handle.close()

    def __len__(self) -> int:
        return len(self.members)

    def load_image(self, index: int) -> Image.Image:
        member = self.members[index]
        handle = self._handle(member.tar)
        handle.seek(member.offset)
        data = handle.read(member.size)
        name = f"{self.tars[member.tar]}:{member.name}"
        if len(data) != member.size:
            raise ImageFileError(f"{name}: truncated (tar ends inside the member)")
        return decode_image(data, name=name, max_pixels=self.max_pixels)

    def describe(self) -> dict[str, Any]:
        return dict(self._description)


def _number_order(path: Path) -> tuple[list[int | str], str]:
    """Sort key reading a name's digits as numbers: `2.tar` before `10.tar`."""
    return [int(part) if part.isdecimal() else part for part in re.split(r"(\d+)", path.name)], path.name


def _read_classnames(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


@register_source("wds", input_options=("root",))
def wds(*, root: str, max_image_pixels: int | None = None) -> TarImageDataset:
    """A local CLIP-benchmark webdataset: `root/{train,test}/*.tar` and `root/classnames.txt`. An image declaring
    more than `max_image_pixels` pixels (null: PIL's default) fails when it is loaded, before it is decoded."""
    folder = _require_dir(Path(root), "wds")
    split_dirs = [(s, folder / s) for s in SPLITS if (folder / s).is_dir()]
    has_splits = len(split_dirs) == len(SPLITS)
    if not split_dirs:
        split_dirs = [("", folder)]  # tars directly under root
    tars: list[Path] = []
    splits: list[str | None] = []
    for split, directory in split_dirs:
        # In number order, as webdataset reads `{0..n-1}.tar` (as text, 10.tar would come before 2.tar, and past ten
        # shards the seeded splits would hold other images than the reference's).
        found = sorted((tar for tar in directory.glob("*.tar") if _visible(tar)), key=_number_order)
        tars += found
        splits += [split] * len(found)
    if not tars:
        raise FileNotFoundError(f"source 'wds': no .tar files under {str(folder)!r} (expected train/*.tar, test/*.tar)")
    description = {"source": "wds", "options": {"root": str(folder)}, "root": str(folder)}
    return TarImageDataset(
        tars,
        _read_classnames(folder / "classnames.txt"),
        splits=splits if has_splits else None,
        description=description,
        max_pixels=max_image_pixels,
    )
