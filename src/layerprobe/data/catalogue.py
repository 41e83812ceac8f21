"""The source registry: what every dataset source returns (`ImageDataset`) and how sources are named and built.

A source is a factory `(**options) -> ImageDataset` registered with `@register_source("name")`; `create_dataset`
checks the options against the factory's keyword parameters so a typo in params.yaml fails with the option's name.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from layerprobe.registry import Registry, unknown_name_error

# PIL's default `Image.MAX_IMAGE_PIXELS` (1 GiB of 4-byte pixels / 3 = 89,478,485): the default pixel cap of the
# sources that decode files. Spelled out, because the process-wide value is whatever some importer last set.
PIL_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)


class ImageFileError(ValueError):
    """An image file (or tar member) that cannot be decoded; the message names the file and why."""


@runtime_checkable
class ImageDataset(Protocol):
    """A map-style labelled image collection; every source returns one."""

    class_names: list[str]
    labels: np.ndarray  # [N] int64
    official_splits: np.ndarray | None  # [N] of "train"/"test" when the source defines them

    def __len__(self) -> int: ...

    def load_image(self, index: int) -> Image.Image:
        """Image `index` as RGB; raises `ImageFileError` naming the file when it cannot be decoded."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able description of the source (name, options, root) for provenance."""
        ...


_SOURCES: Registry[ImageDataset] = Registry("dataset source")
_MATERIALISED: set[str] = set()
_INPUT_OPTIONS: dict[str, tuple[str, ...]] = {}


def register_source(
    name: str, *, materialise: bool = False, input_options: tuple[str, ...] = ()
) -> Callable[[Callable[..., ImageDataset]], Callable]:
    """Decorator registering a factory `(**options) -> ImageDataset` under `name`.

    Args:
        name: the source name used in params.yaml.
        materialise: small self-contained sources whose pixels `prepare_dataset` copies into the prepared folder.
        input_options: options naming the files or folders the source reads (e.g. `root`): their listing is part
            of the prepared dataset's fingerprint, so a new or rewritten image re-prepares it.
    """
    register = _SOURCES.register(name)

    def decorate(factory: Callable[..., ImageDataset]) -> Callable[..., ImageDataset]:
        register(factory)
        if materialise:
            _MATERIALISED.add(name)
        _INPUT_OPTIONS[name] = tuple(input_options)
        return factory

    return decorate


def source_inputs(source: str, options: dict[str, Any]) -> list[Path]:
    """The files and folders a source reads, from its options (none for generated and bundled sources)."""
    _SOURCES.get(source)  # unknown names fail with did-you-mean
    return [Path(options[key]) for key in _INPUT_OPTIONS.get(source, ()) if options.get(key) is not None]


def list_sources() -> list[str]:
    """Names of every registered source, sorted."""
    return _SOURCES.names()


def is_materialised(source: str) -> bool:
    """Whether `prepare_dataset` copies this source's pixels (instead of referencing its root)."""
    _SOURCES.get(source)  # unknown names fail with did-you-mean
    return source in _MATERIALISED


def create_dataset(source: str, **options: Any) -> ImageDataset:
    """Build the dataset of a registered source; unknown sources and unknown/missing options name the culprit."""
    check_options(source, options)
    return _SOURCES.get(source)(**options)


def check_options(source: str, options: dict[str, Any]) -> None:
    """Refuse options the source's factory does not take, and options it needs that are missing (the params check
    runs this for every dataset before any step)."""
    factory = _SOURCES.get(source)
    parameters = {
        p.name: p for p in inspect.signature(factory).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    for key in options:
        if key not in parameters:
            raise unknown_name_error(f"option of source {source!r}", key, list(parameters))
    for key, parameter in parameters.items():
        if parameter.default is inspect.Parameter.empty and key not in options:
            raise ValueError(f"source {source!r} needs option {key!r} (options: {', '.join(parameters)})")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited on black so hidden colours never leak in."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        # 16/32-bit greyscale: PIL's own convert clips instead of scaling, so scale 16-bit range to 8 bits.
        values = np.asarray(image, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resolve_max_pixels(value: int | None, *, source: str) -> int:
    """A source's `max_image_pixels` option resolved: None is PIL's default; anything else must be a positive int."""
    if value is None:
        return PIL_MAX_IMAGE_PIXELS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"source {source!r}: max_image_pixels must be a positive integer or null (PIL's default "
            f"{PIL_MAX_IMAGE_PIXELS:,}), got {value!r}"
        )
    return value


class _PilBombCheckOff:
    """PIL's own bomb check off while any thread reads a header through `open_image`, whose per-file cap replaces it.

    PIL's check reads a process-wide setting, warns above it and raises at twice it, before the caller sees the size:
    a cap above it could never be used, and one below it would print a warning for a file it refuses anyway. Header
    reads are counted, not serialised (a folder check on network storage opens many files at once); PIL's setting is
    restored when the last one ends. NOTE: PIL code outside `open_image` that opens a file in such a window in another
    thread runs unguarded (during a folder check, nothing else in the process normally does).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._readers = 0
        self._saved: int | None = None

    def __enter__(self) -> None:
        with self._lock:
            if self._readers == 0:
                self._saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            self._readers += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._readers -= 1
            if self._readers == 0:
                Image.MAX_IMAGE_PIXELS = self._saved


_PIL_BOMB_CHECK_OFF = _PilBombCheckOff()


@contextlib.contextmanager
def open_image(source: Path | bytes | BinaryIO, *, name: str, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """Open an image lazily and refuse it, before a single pixel is decoded, when its header declares more than
    `max_pixels` pixels (None: PIL's default). Decode errors inside the block become `ImageFileError` naming `name`.
    `source` is a path, the bytes, or a seekable binary file (read as PIL asks, not whole).

    A few kilobytes of PNG can declare 20000 x 20000 pixels: checking the header first keeps such a file from
    costing gigabytes, whoever decodes it (the folder check, a DataLoader worker, `predict`).
    """
    cap = PIL_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with _PIL_BOMB_CHECK_OFF:  # the header only: no pixel is decoded here
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with image:  # leaving closes the file; the pixels live on with the image
            width, height = image.size
            if width * height > cap:
                raise ImageFileError(
                    f"{name}: declares {width}x{height} = {width * height:,} pixels, over the cap of {cap:,} (a "
                    f"decompression bomb, or an image to shrink first; the source option max_image_pixels raises it)"
                )
            yield image
    except ImageFileError:
        raise
    # DecompressionBombError: PIL's own check on frames and tiles, which `load` decodes later
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise image_error(name, e) from e


def image_error(name: str, error: Exception) -> ImageFileError:
    """The one-line error for the image `name` that PIL (or the file system under it) failed on with `error`."""
    if isinstance(error, Image.UnidentifiedImageError):
        return ImageFileError(f"{name}: not an image (PIL cannot identify it)")
    if isinstance(error, Image.DecompressionBombError):
        return ImageFileError(f"{name}: a decompression bomb ({error})")
    if isinstance(error, OSError) and error.errno is not None:  # a missing or unreadable file, not its contents
        return ImageFileError(f"{name}: cannot be read ({error.strerror})")
    return ImageFileError(f"{name}: truncated or corrupt image ({error})")


def decode_image(source: Path | bytes, *, name: str, max_pixels: int | None = None) -> Image.Image:
    """Decode an image file or its bytes to RGB, raising `ImageFileError` naming `name` when that fails or when it
    declares more than `max_pixels` pixels (None: PIL's default; see `open_image`)."""
    with open_image(source, name=name, max_pixels=max_pixels) as image:
        image.load()  # decode now: truncated data fails here, not later inside a DataLoader worker
        return to_rgb(image)


class ArrayDataset:
    """In-memory RGB images [N, H, W, 3] uint8 with labels: the shape of bundled and generated sources."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        class_names: list[str],
        *,
        description: dict[str, Any],
    ) -> None:
        assert images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8, images.shape
        assert len(images) == len(labels)
        self.images = images  # [N, H, W, 3]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.official_splits: np.ndarray | None = None
        self._description = description

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def describe(self) -> dict[str, Any]:
        return dict(self._description)
