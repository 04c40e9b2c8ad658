"""Offline demo: a synthetic dataset in the real VOCdevkit layout and a tiny CNN trained on it.

``generate_demo`` draws textured shapes (one shape, colour family and texture per class) on cluttered,
noisy gradient backgrounds and writes them as ``VOCdevkit/VOCdemo`` with the VOC XML schema and image
sets, so the whole pipeline runs on it exactly as on Pascal VOC (``VOCDataset(root, year="demo")``).
``train_demo_model`` trains :class:`gradloc.models.demo_cnn.DemoNet` (conv blocks -> global average pooling -> linear,
so both
CAM and Grad-CAM apply) as a multi-label classifier on the ``train`` split in 30-60 s on a CPU.

Both functions are deterministic given the seed and reuse their output when it already exists with the
same parameters; both write atomically, so an interrupted run never leaves a file that looks complete.
"""

from __future__ import annotations

import colorsys
import io
import itertools
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)


DEMO_CLASSES: tuple[str, ...] = ("disc", "square", "triangle", "cross")


DEMO_YEAR = "demo"


# Bump when the generator's output changes, so stale datasets are regenerated.
DEMO_VERSION = 1


STAMP_NAME = "gradloc_demo.json"


_JPEG_QUALITY = 90


_TINY = (2.5, 4.0)  # half-extent range (pixels) of deliberately tiny objects, which are marked difficult


_MIN_VISIBLE = 0.3  # a placement that leaves any object less visible than this is retried


_DIFFICULT_VISIBLE = 0.55  # an object less visible than this is marked difficult (heavily occluded)


def _disc(u: np.ndarray, v: np.ndarray, s: float) -> np.ndarray:
    return u**2 + v**2 <= s**2


def _square(u: np.ndarray, v: np.ndarray, s: float) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * s


def _triangle(u: np.ndarray, v: np.ndarray, s: float) -> np.ndarray:
    """Equilateral triangle with circumradius ``s`` (inradius ``s / 2``), apex up before rotation."""
    inside = np.ones(u.shape, dtype=bool)
    for angle in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
        inside &= -(u * math.cos(angle) + v * math.sin(angle)) <= s / 2
    return inside


def _cross(u: np.ndarray, v: np.ndarray, s: float) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= s) & (av <= 0.3 * s)) | ((av <= s) & (au <= 0.3 * s))


def _rings(u: np.ndarray, v: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    return 0.5 + 0.5 * np.sin(np.sqrt(u**2 + v**2) * rng.uniform(0.9, 1.3) + rng.uniform(0, 2 * math.pi))


def _stripes(u: np.ndarray, v: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    return (np.sin((u + v) * rng.uniform(0.8, 1.1)) > 0).astype(np.float64)


def _checks(u: np.ndarray, v: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    period = rng.uniform(2.5, 3.5)
    return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float64)


def _speckle(u: np.ndarray, v: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    return (rng.random(u.shape) < 0.35).astype(np.float64)


@dataclass(frozen=True)
class _Style:
    """How one demo class looks: a shape mask, a texture pattern in [0, 1] and a hue family."""

    shape: Callable[[np.ndarray, np.ndarray, float], np.ndarray]
    texture: Callable[[np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]
    hue: tuple[float, float]


STYLES: dict[str, _Style] = {
    "disc": _Style(_disc, _rings, (0.97, 1.03)),  # red, concentric rings
    "square": _Style(_square, _stripes, (0.56, 0.64)),  # blue, diagonal stripes
    "triangle": _Style(_triangle, _checks, (0.27, 0.36)),  # green, checkerboard
    "cross": _Style(_cross, _speckle, (0.11, 0.16)),  # yellow, speckles
}


@dataclass(frozen=True)
class _Placed:
    name: str
    mask: np.ndarray  # bool[H, W], the whole shape inside the image
    truncated: bool
    tiny: bool


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """float64[H, W, 3] in [0, 1]: a desaturated two-colour gradient with clutter and noise."""
    colours = [colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.8))
               for _ in range(2)]
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    t = (xx * math.cos(angle) + yy * math.sin(angle)) / math.hypot(width, height) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    image = (1 - t) * np.asarray(colours[0]) + t * np.asarray(colours[1])
    # clutter: lines, outlines and blobs in muted colours
    canvas = Image.fromarray(np.round(image * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 10))):
        colour = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.3),
                                                                  rng.uniform(0.2, 0.9)))
        x0, x1 = sorted(rng.uniform(-10, width + 10, 2))
        y0, y1 = sorted(rng.uniform(-10, height + 10, 2))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.line([(x0, y0), (x1, y1)] if rng.random() < 0.5 else [(x0, y1), (x1, y0)], fill=colour,
                      width=int(rng.integers(1, 4)))
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + (x1 - x0) / 3, y0 + (y1 - y0) / 3], outline=colour, width=1)
        else:
            r = rng.uniform(2, 8)
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            draw.ellipse([cx - r, cy - r * rng.uniform(0.4, 1), cx + r, cy + r], fill=colour)
    image = np.asarray(canvas, dtype=np.float64) / 255.0
    return image + rng.normal(0.0, 0.05, image.shape)


def _propose(rng: np.random.Generator, name: str, width: int, height: int, xx: np.ndarray,
             yy: np.ndarray) -> tuple[_Placed, np.ndarray]:
    """A random placement of one object: its record and its texture float64[H, W, 3]."""
    style = STYLES[name]
    tiny = rng.random() < 0.08
    if tiny:
        s = rng.uniform(*_TINY)
    else:  # from small (~12 px across) to half the image
        s = rng.uniform(6.0, min(width, height) / 4)
    margin = s if rng.random() < 0.85 else 0.3 * s  # sometimes let the object leave the frame
    cx = rng.uniform(min(margin, width / 2), max(width - margin, width / 2))
    cy = rng.uniform(min(margin, height / 2), max(height - margin, height / 2))
    angle = rng.uniform(0, 2 * math.pi)
    u = (xx + 0.5 - cx) * math.cos(angle) + (yy + 0.5 - cy) * math.sin(angle)
    v = -(xx + 0.5 - cx) * math.sin(angle) + (yy + 0.5 - cy) * math.cos(angle)
    mask = style.shape(u, v, s)
    truncated = bool(mask.any() and (cx - s < 0 or cy - s < 0 or cx + s > width or cy + s > height)
                     and (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()))
    hue = rng.uniform(*style.hue) % 1.0
    light = np.asarray(colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 0.9), rng.uniform(0.8, 1.0)))
    dark = np.asarray(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.3, 0.55)))
    pattern = style.texture(u, v, s, rng)[..., None]
    return _Placed(name, mask, truncated, tiny), pattern * light + (1 - pattern) * dark


def _visible(masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask when drawn in order (later ones on top)."""
    covered = np.zeros_like(masks[0])
    visible = []
    for mask in reversed(masks):
        visible.append(mask & ~covered)
        covered |= mask
    return visible[::-1]


def _choose_classes(rng: np.random.Generator) -> list[str]:
    """Class of each object: 1-4 objects of 1-3 distinct classes (often 2)."""
    n_objects = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.3, 0.22, 0.18]))
    n_classes = 1 if n_objects == 1 else int(rng.choice([1, 2, 3], p=[0.4, 0.5, 0.1]))
    n_classes = min(n_classes, n_objects)
    chosen = [str(c) for c in rng.choice(DEMO_CLASSES, size=n_classes, replace=False)]
    names = chosen + [str(c) for c in rng.choice(chosen, size=n_objects - n_classes)]
    return [names[i] for i in rng.permutation(n_objects)]


def _render(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One demo image: uint8[H, W, 3] and its objects (VOC boxes of the visible pixels)."""
    image = _background(rng, width, height)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    placed: list[_Placed] = []
    textures: list[np.ndarray] = []
    for name in _choose_classes(rng):
        # the first object is always placed (it cannot be hidden); later ones get 30 tries
        for _ in range(30) if placed else itertools.count():
            candidate, texture = _propose(rng, name, width, height, xx, yy)
            if candidate.mask.sum() < 6:
                continue
            masks = [p.mask for p in placed] + [candidate.mask]
            fractions = [vis.sum() / mask.sum() for vis, mask in zip(_visible(masks), masks, strict=True)]
            # most objects barely overlap; sometimes one is allowed to hide much of another
            allowed = _MIN_VISIBLE if rng.random() < 0.25 else 0.9
            if min(fractions) >= allowed:
                placed.append(candidate)
                textures.append(texture)
                break
    for item, texture in zip(placed, textures, strict=True):
        image[item.mask] = texture[item.mask] + rng.normal(0.0, 0.03, (int(item.mask.sum()), 3))
    objects = []
    for item, visible in zip(placed, _visible([p.mask for p in placed]), strict=True):
        rows, cols = np.nonzero(visible)
        objects.append({
            "name": item.name,
            # 0-based pixel indices -> VOC 1-based inclusive coordinates
            "box": (int(cols.min()) + 1, int(rows.min()) + 1, int(cols.max()) + 1, int(rows.max()) + 1),
            "truncated": item.truncated,
            "difficult": item.tiny or visible.sum() < _DIFFICULT_VISIBLE * item.mask.sum(),
        })
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), objects


def _annotation_xml(image_id: str, width: int, height: int, objects: Sequence[dict[str, Any]]) -> str:
    parts = [
        "<annotation>",
        f"\t<folder>VOC{DEMO_YEAR}</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<source>",
        "\t\t<database>gradloc synthetic demo</database>",
        f"\t\t<annotation>gradloc.demo v{DEMO_VERSION}</annotation>",
        "\t\t<image>generated</image>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for obj in objects:
        x1, y1, x2, y2 = obj["box"]
        parts += [
            "\t<object>",
            f"\t\t<name>{obj['name']}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{int(obj['truncated'])}</truncated>",
            f"\t\t<difficult>{int(obj['difficult'])}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{x1}</xmin>",
            f"\t\t\t<ymin>{y1}</ymin>",
            f"\t\t\t<xmax>{x2}</xmax>",
            f"\t\t\t<ymax>{y2}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    return "\n".join([*parts, "</annotation>", ""])


def _image_flags(objects: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Devkit per-class flag of one image: 1 present, 0 only difficult instances, -1 absent."""
    flags = dict.fromkeys(DEMO_CLASSES, -1)
    for obj in objects:
        flags[obj["name"]] = max(flags[obj["name"]], 0 if obj["difficult"] else 1)
    return flags


def _write_dataset(folder: Path, splits: dict[str, list[int]], seed: int,
                   image_size: tuple[int, int]) -> None:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True)
    base_w, base_h = image_size
    flags: dict[str, dict[str, int]] = {}
    for index in sorted(i for ids in splits.values() for i in ids):
        # one independent stream per image: an image depends only on (seed, index)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
        width = int(rng.integers(base_w - base_w // 8, base_w + base_w // 8 + 1))
        height = int(rng.integers(base_h - base_h // 6, base_h + base_h // 6 + 1))
        pixels, objects = _render(rng, width, height)
        image_id = f"{index:06d}"
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=_JPEG_QUALITY)
        (folder / "JPEGImages" / f"{image_id}.jpg").write_bytes(buffer.getvalue())
        xml = _annotation_xml(image_id, width, height, objects)
        (folder / "Annotations" / f"{image_id}.xml").write_text(xml, encoding="utf-8")
        flags[image_id] = _image_flags(objects)
    main = folder / "ImageSets" / "Main"
    for split, indices in {**splits, "trainval": sorted(splits["train"] + splits["val"])}.items():
        ids = [f"{i:06d}" for i in indices]
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
        for name in DEMO_CLASSES:
            (main / f"{name}_{split}.txt").write_text("".join(f"{i} {flags[i][name]:2d}\n" for i in ids),
                                                      encoding="utf-8")


def generate_demo(root: Path, n_train: int = 240, n_val: int = 80, n_test: int = 80, seed: int = 0,
                  image_size: tuple[int, int] = (160, 120)) -> Path:
    """Write (or reuse) the synthetic demo dataset ``root/VOCdevkit/VOCdemo`` in the VOCdevkit layout.

    Each image (about ``image_size``, width and height varying by about ±1/8 and ±1/6) shows 1-4 objects
    of :data:`DEMO_CLASSES`, often of two classes, from ~12 px across to half the image, on a noisy
    cluttered gradient. Objects drawn tiny or more than 45 % hidden by later ones are marked difficult;
    objects cut by the border are marked truncated; boxes enclose the visible pixels (VOC convention).
    Split files ``train/val/test/trainval.txt`` and ``<class>_<split>.txt`` (1 / 0 / -1) are written too.

    The output is byte-identical for the same arguments (ids ``000001...``: train, then val, then test).
    A complete dataset carries a stamp file with the arguments and generator version and is reused when
    they match; otherwise it is regenerated in a temporary folder that is renamed into place when done.

    Returns:
        The VOCdevkit folder (``root/VOCdevkit``); open it with ``VOCDataset(path, year="demo", ...)``.

    Raises:
        ValueError: bad sizes, or ``VOCdemo`` exists but was not written by this generator.
    """
    if n_train < 1 or n_val < 1 or n_test < 0:
        raise ValueError(f"demo split sizes train={n_train}, val={n_val}, test={n_test}: train and val need "
                         "at least one image, test cannot be negative")
    if min(image_size) < 32:
        raise ValueError(f"demo image_size {image_size} is too small; use at least 32x32 pixels")
    devkit = Path(root).expanduser() / "VOCdevkit"
    target = devkit / f"VOC{DEMO_YEAR}"
    stamp = json.dumps({"generator": "gradloc.demo", "version": DEMO_VERSION, "n_train": n_train,
                        "n_val": n_val, "n_test": n_test, "seed": seed, "image_size": list(image_size)},
                       sort_keys=True)
    if _stamp_matches(target, stamp):
        logger.info("reusing demo dataset %s", target)
        return devkit
    if target.exists() and not (target / STAMP_NAME).is_file():
        raise ValueError(f"{target} exists but is not a gradloc demo dataset (no {STAMP_NAME}); remove it or "
                         "choose another demo folder")
    devkit.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ids = iter(range(1, n_train + n_val + n_test + 1))
    splits = {name: [next(ids) for _ in range(n)] for name, n in (("train", n_train), ("val", n_val),
                                                                  ("test", n_test))}
    tmp = Path(tempfile.mkdtemp(prefix=f".VOC{DEMO_YEAR}.", suffix=".tmp", dir=devkit))
    try:
        _write_dataset(tmp / "data", splits, seed, image_size)
        (tmp / "data" / STAMP_NAME).write_text(stamp + "\n", encoding="utf-8")
        if target.exists():  # an older demo dataset: move it aside, then replace it
            logger.info("replacing demo dataset %s (different parameters or generator version)", target)
            target.rename(tmp / "old")
        try:
            (tmp / "data").rename(target)
        except OSError:
            if not _stamp_matches(target, stamp):  # another process did not just finish the same dataset
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote demo dataset %s (%d images) in %.1f s", target, n_train + n_val + n_test,
                time.perf_counter() - start)
    return devkit


def _stamp_matches(target: Path, stamp: str) -> bool:
    path = target / STAMP_NAME
    return path.is_file() and path.read_text(encoding="utf-8").strip() == stamp
