"""Offline sources held in memory: scikit-learn's bundled digits and generated structured tasks.

The generated tasks follow VTAB's structured group (counting, position, orientation, texture): the label depends on
low-level structure, never on one pixel, because colours, sizes and placements are random and noise covers every
image. Each is deterministic in `seed`, balanced, and vectorised in numpy (2,000 images at 32 px in ~0.1 s).
"""

from __future__ import annotations

import numpy as np

from layerprobe.data.catalogue import ArrayDataset, register_source

_NOISE_STD = 0.08  # per-pixel Gaussian noise (on 0..1 intensities): no clean background to read a label from


def _check_options(source: str, *, num_images: int, image_size: int, num_classes: int) -> None:
    if num_images < num_classes:
        raise ValueError(
            f"source {source!r}: option num_images must be >= {num_classes} (one per class), got {num_images}"
        )
    if image_size < 16:
        raise ValueError(f"source {source!r}: option image_size must be >= 16, got {image_size}")


def _balanced_labels(num_images: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Class counts differ by at most one; order shuffled."""
    return rng.permutation(np.arange(num_images) % num_classes).astype(np.int64)


def _grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates broadcastable against [N, H, W]: ys [1, H, 1], xs [1, 1, W]."""
    coords = np.arange(image_size, dtype=np.float32) + 0.5
    return coords[None, :, None], coords[None, None, :]


def _render(mask: np.ndarray, rng: np.random.Generator, *, speckles: int = 0) -> np.ndarray:
    """Paint mask [N, H, W] in a random foreground colour over a random background, add speckles and noise.

    Half the images are dark-on-light and half light-on-dark, so brightness alone says little about the label.
    """
    n, size, _ = mask.shape
    dark = rng.uniform(0.0, 0.35, (n, 1, 1, 3)).astype(np.float32)
    light = rng.uniform(0.65, 1.0, (n, 1, 1, 3)).astype(np.float32)
    flip = (rng.random(n) < 0.5)[:, None, None, None]
    background, foreground = np.where(flip, light, dark), np.where(flip, dark, light)
    images = background + mask[..., None].astype(np.float32) * (foreground - background)  # [N, H, W, 3]
    if speckles:
        # Single-pixel distractors in random colours: clutter that is not the labelled structure.
        rows = np.repeat(np.arange(n), speckles)
        images[rows, rng.integers(0, size, n * speckles), rng.integers(0, size, n * speckles)] = rng.random(
            (n * speckles, 3), dtype=np.float32
        )
    images += rng.standard_normal(images.shape, dtype=np.float32) * _NOISE_STD
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def _describe(source: str, **options: int) -> dict:
    return {"source": source, "options": options}


@register_source("digits", materialise=True)
def digits(*, image_size: int = 32) -> ArrayDataset:
    """scikit-learn's bundled handwritten digits: 1,797 real 8×8 images, 10 classes, upscaled (nearest) to RGB."""
    from sklearn.datasets import load_digits

    if image_size < 8 or image_size % 8:
        raise ValueError(f"source 'digits': option image_size must be a positive multiple of 8, got {image_size}")
    bunch = load_digits()
    scale = image_size // 8
    grey = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8], values 0..16 in the source
    grey = grey.repeat(scale, axis=1).repeat(scale, axis=2)
    images = np.repeat(grey[..., None], 3, axis=-1)  # [N, H, W, 3]
    names = [str(name) for name in bunch.target_names]
    return ArrayDataset(images, bunch.target, names, description=_describe("digits", image_size=image_size))


@register_source("count_shapes", materialise=True)
def count_shapes(*, num_images: int = 2000, image_size: int = 32, seed: int = 0, max_count: int = 6) -> ArrayDataset:
    """Label = number of squares (1..max_count) of random sizes in distinct cells of a 4×4 grid."""
    if not 2 <= max_count <= 16:
        raise ValueError(f"source 'count_shapes': option max_count must be in 2..16, got {max_count}")
    _check_options("count_shapes", num_images=num_images, image_size=image_size, num_classes=max_count)
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(num_images, max_count, rng)
    counts = labels + 1
    cell = image_size // 4
    ys, xs = _grid(image_size)
    cells = np.argsort(rng.random((num_images, 16)), axis=1)[:, :max_count]  # distinct cells per image
    sizes = rng.integers(2, max(cell - 2, 2) + 1, (num_images, max_count))
    # Offsets keep a one-pixel margin inside the cell, so squares never touch and stay countable.
    span = np.maximum(cell - sizes - 1, 1)
    top = (cells // 4) * cell + 1 + (rng.random(sizes.shape) * span).astype(np.int64)
    left = (cells % 4) * cell + 1 + (rng.random(sizes.shape) * span).astype(np.int64)
    mask = np.zeros((num_images, image_size, image_size), dtype=bool)
    for slot in range(max_count):
        y0, x0, s = (a[:, slot, None, None] for a in (top, left, sizes))
        active = (counts > slot)[:, None, None]
        mask |= active & (ys >= y0) & (ys < y0 + s) & (xs >= x0) & (xs < x0 + s)
    names = [f"{k} shape" + ("s" if k > 1 else "") for k in range(1, max_count + 1)]
    options = {"num_images": num_images, "image_size": image_size, "seed": seed, "max_count": max_count}
    return ArrayDataset(_render(mask, rng), labels, names, description=_describe("count_shapes", **options))


SHAPES = ["square", "disc", "triangle", "cross", "ring", "diamond"]


@register_source("shapes", materialise=True)
def shapes(*, num_images: int = 2000, image_size: int = 32, seed: int = 0) -> ArrayDataset:
    """Label = which of six shapes (square, disc, triangle, cross, ring, diamond) the image holds, at a random size,
    place and colour among single-pixel distractors: the pretraining task of the offline suite's backbones."""
    _check_options("shapes", num_images=num_images, image_size=image_size, num_classes=len(SHAPES))
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(num_images, len(SHAPES), rng)
    side = rng.uniform(0.3, 0.55, num_images).astype(np.float32) * image_size
    top = rng.random(num_images).astype(np.float32) * (image_size - side)
    left = rng.random(num_images).astype(np.float32) * (image_size - side)
    ys, xs = _grid(image_size)
    s, y0, x0 = (a[:, None, None] for a in (side, top, left))
    dy, dx = (ys - y0) / s - 0.5, (xs - x0) / s - 0.5  # [-0.5, 0.5] inside each shape's box
    inside = (np.abs(dy) <= 0.5) & (np.abs(dx) <= 0.5)
    radius = np.sqrt(dy**2 + dx**2)
    flip = np.where(rng.random(num_images) < 0.5, 1.0, -1.0).astype(np.float32)[:, None, None]  # triangles up or down
    masks = [
        inside,
        radius <= 0.5,
        inside & (np.abs(dx) <= (0.5 + flip * dy) / 2),
        inside & ((np.abs(dx) <= 1 / 6) | (np.abs(dy) <= 1 / 6)),
        (radius <= 0.5) & (radius >= 0.28),
        np.abs(dx) + np.abs(dy) <= 0.5,
    ]
    mask = np.select([(labels == k)[:, None, None] for k in range(len(SHAPES))], masks, default=False)
    options = {"num_images": num_images, "image_size": image_size, "seed": seed}
    images = _render(mask, rng, speckles=image_size // 4)
    return ArrayDataset(images, labels, list(SHAPES), description=_describe("shapes", **options))


_POSITIONS = ["top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right"]


@register_source("shape_position", materialise=True)
def shape_position(*, num_images: int = 2000, image_size: int = 32, seed: int = 0) -> ArrayDataset:
    """Label = which cell of a 3×3 grid holds the one square or disc, among single-pixel distractors."""
    _check_options("shape_position", num_images=num_images, image_size=image_size, num_classes=9)
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(num_images, 9, rng)
    cell = image_size / 3
    side = rng.integers(image_size // 6, image_size // 5 + 1, num_images).astype(np.float32)
    top = (labels // 3) * cell + rng.random(num_images) * (cell - side)
    left = (labels % 3) * cell + rng.random(num_images) * (cell - side)
    ys, xs = _grid(image_size)
    y0, x0, s = (a[:, None, None].astype(np.float32) for a in (top, left, side))
    square = (ys >= y0) & (ys < y0 + s) & (xs >= x0) & (xs < x0 + s)
    disc = (ys - y0 - s / 2) ** 2 + (xs - x0 - s / 2) ** 2 <= (s / 2) ** 2
    mask = np.where((rng.random(num_images) < 0.5)[:, None, None], square, disc)
    options = {"num_images": num_images, "image_size": image_size, "seed": seed}
    images = _render(mask, rng, speckles=image_size // 2)
    return ArrayDataset(images, labels, list(_POSITIONS), description=_describe("shape_position", **options))


@register_source("shape_orientation", materialise=True)
def shape_orientation(*, num_images: int = 2000, image_size: int = 32, seed: int = 0, bins: int = 8) -> ArrayDataset:
    """Label = orientation bin (of 180°/bins) of a bar with random length, width and centre."""
    if not 2 <= bins <= 36:
        raise ValueError(f"source 'shape_orientation': option bins must be in 2..36, got {bins}")
    _check_options("shape_orientation", num_images=num_images, image_size=image_size, num_classes=bins)
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(num_images, bins, rng)
    width_deg = 180.0 / bins
    # Angles stay in the middle half of their bin: a bar on a bin edge would have an ambiguous label at 32 px.
    degrees = (labels + 0.5 + rng.uniform(-0.25, 0.25, num_images)) * width_deg
    theta = np.deg2rad(degrees).astype(np.float32)[:, None, None]
    centre = (image_size / 2 + rng.uniform(-0.1, 0.1, (2, num_images)) * image_size).astype(np.float32)
    length = (rng.uniform(0.55, 0.8, num_images) * image_size).astype(np.float32)[:, None, None]
    width = rng.uniform(1.5, 3.0, num_images).astype(np.float32)[:, None, None]
    ys, xs = _grid(image_size)
    dy, dx = ys - centre[0][:, None, None], xs - centre[1][:, None, None]
    along = dx * np.cos(theta) + dy * np.sin(theta)
    across = -dx * np.sin(theta) + dy * np.cos(theta)
    mask = (np.abs(across) <= width / 2) & (np.abs(along) <= length / 2)
    names = [f"{b * width_deg:g}-{(b + 1) * width_deg:g}deg" for b in range(bins)]
    options = {"num_images": num_images, "image_size": image_size, "seed": seed, "bins": bins}
    images = _render(mask, rng, speckles=image_size // 4)
    return ArrayDataset(images, labels, names, description=_describe("shape_orientation", **options))


_TEXTURES = [
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "antidiagonal stripes",
    "checkerboard",
    "dots",
]
_STRIPE_ANGLES = {0: 90.0, 1: 0.0, 2: 45.0, 3: 135.0}  # direction in which the stripe pattern varies


@register_source("texture", materialise=True)
def texture(*, num_images: int = 2000, image_size: int = 32, seed: int = 0) -> ArrayDataset:
    """Label = texture class: stripes at four angles, checkerboard or dots, with random period, phase and colours."""
    _check_options("texture", num_images=num_images, image_size=image_size, num_classes=len(_TEXTURES))
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(num_images, len(_TEXTURES), rng)
    period = rng.uniform(4.0, 8.0, num_images).astype(np.float32)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, (2, num_images)).astype(np.float32)[:, :, None, None]
    jitter = rng.uniform(-8.0, 8.0, num_images)  # degrees; classes are 45° apart
    ys, xs = _grid(image_size)
    wave_x, wave_y = 2 * np.pi * xs / period + phase[0], 2 * np.pi * ys / period + phase[1]  # [N, H, W]
    mask = np.zeros((num_images, image_size, image_size), dtype=bool)
    for label, degrees in _STRIPE_ANGLES.items():
        rows = labels == label
        theta = np.deg2rad(degrees + jitter[rows]).astype(np.float32)[:, None, None]
        along = xs * np.cos(theta) + ys * np.sin(theta)
        mask[rows] = np.sin(2 * np.pi * along / period[rows] + phase[0][rows]) > 0
    rows = labels == 4
    mask[rows] = np.sin(wave_x[rows]) * np.sin(wave_y[rows]) > 0
    rows = labels == 5
    mask[rows] = np.cos(wave_x[rows]) + np.cos(wave_y[rows]) > 1.2
    options = {"num_images": num_images, "image_size": image_size, "seed": seed}
    return ArrayDataset(_render(mask, rng), labels, list(_TEXTURES), description=_describe("texture", **options))
