"""Pascal VOCdevkit reader: image sets, XML annotations and images.

The reader follows the layout of the official devkit::

    <root>/VOC<year>/Annotations/<id>.xml
    <root>/VOC<year>/JPEGImages/<id>.jpg
    <root>/VOC<year>/ImageSets/Main/<split>.txt            one image id per line
    <root>/VOC<year>/ImageSets/Main/<class>_<split>.txt    "<id> <flag>", flag 1 / 0 (difficult only) / -1

Boxes are kept exactly as written in the XML: ``float64 [x1, y1, x2, y2]``, 1-based inclusive pixel
coordinates of the original image (width = x2 - x1 + 1). A missing ``<difficult>`` or ``<truncated>`` reads
as 0 and a missing ``<pose>`` as ``"Unspecified"``, as the devkit's Python port does.

XML is parsed with ``defusedxml``, so entity-expansion ("billion laughs") and external-entity files are
rejected with a one-line :class:`DatasetError` instead of being expanded.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import math
import os
import struct
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import defusedxml
import defusedxml.ElementTree as DefusedET
import numpy as np
from PIL import Image, UnidentifiedImageError

from gradloc.core.formats import GroundTruth
from gradloc.core.names import check_name, excerpt, name_problem

logger = logging.getLogger(__name__)


VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


ON_ERROR_CHOICES = ("raise", "skip")


# A box may reach at most this many pixels beyond the image (x1 >= 1 - tol, x2 <= width + tol). VOC boxes
# touching the border have x2 == width, which is inside; tools writing 0-based boxes produce x1 == 0.
BOX_TOLERANCE = 1.0


_VOC_ROOT_HINT = "download the VOCdevkit or point to it with --voc-root"


class DatasetError(ValueError):
    """A VOC dataset file is missing, malformed or inconsistent. The message names the file."""


class MissingFileError(DatasetError, FileNotFoundError):
    """A file or folder the dataset needs does not exist (also a ``FileNotFoundError``)."""


@dataclass(frozen=True, eq=False)
class VOCObject:
    """One ``<object>`` of a VOC annotation.

    Attributes:
        name: class name as written in the XML (surrounding whitespace removed).
        label: index of ``name`` in the class list the annotation was parsed with.
        box: float64[4] ``[x1, y1, x2, y2]``, 1-based inclusive pixel coordinates (read-only array).
        difficult, truncated: VOC flags; missing elements read as False.
        pose: VOC pose; missing reads as ``"Unspecified"``.
    """

    name: str
    label: int
    box: np.ndarray
    difficult: bool
    truncated: bool
    pose: str


@dataclass(frozen=True, eq=False)
class Annotation:
    """A parsed ``Annotations/<id>.xml`` file.

    Attributes:
        image_id: file stem of the annotation.
        width, height, depth: the ``<size>`` element.
        objects: the ``<object>`` elements in file order.
        path: the XML file.
    """

    image_id: str
    width: int
    height: int
    depth: int
    objects: tuple[VOCObject, ...]
    path: Path


def _text(element: ET.Element, tag: str) -> str | None:
    """Stripped text of the direct child ``tag``, or None when the child is missing or empty."""
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        return None
    return child.text.strip()


def _number(path: Path, where: str, value: str | None) -> float:
    if value is None:
        raise DatasetError(f"{path}: {where} is missing; every box needs xmin, ymin, xmax, ymax")
    try:
        number = float(value)
    except ValueError:
        raise DatasetError(f"{path}: {where} is {excerpt(value)}, not a number") from None
    if not math.isfinite(number):
        raise DatasetError(f"{path}: {where} is {excerpt(value)}, not a finite number")
    return number


def _size(path: Path, size: ET.Element, tag: str, default: int | None = None) -> int:
    value = _text(size, tag)
    if value is None:
        if default is not None:
            return default
        raise DatasetError(f"{path}: <size>/<{tag}> is missing")
    number = _number(path, f"<size>/<{tag}>", value)
    if number != int(number) or number < 1:
        raise DatasetError(f"{path}: <size>/<{tag}> is {excerpt(value)}, expected a positive whole number of pixels")
    return int(number)


def _flag(path: Path, obj: ET.Element, tag: str, index: int) -> bool:
    value = _text(obj, tag)
    if value is None:
        return False
    number = _number(path, f"object {index} <{tag}>", value)
    if number not in (0.0, 1.0):
        raise DatasetError(f"{path}: object {index} <{tag}> is {excerpt(value)}, expected 0 or 1")
    return bool(number)


def _parse_object(path: Path, obj: ET.Element, index: int, classes: Sequence[str], width: int,
                  height: int) -> VOCObject:
    name = _text(obj, "name")
    if name is None:
        raise DatasetError(f"{path}: object {index} has no <name>")
    if name not in classes:
        raise DatasetError(f"{path}: object {index} has unknown class {excerpt(name)}; known classes: "
                           f"{', '.join(classes)}")
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise DatasetError(f"{path}: object {index} ({name}) has no <bndbox>")
    box = np.array([_number(path, f"object {index} ({name}) <{tag}>", _text(bndbox, tag))
                    for tag in ("xmin", "ymin", "xmax", "ymax")], dtype=np.float64)
    x1, y1, x2, y2 = box
    what = f"{path}: object {index} ({name}) box {box.tolist()}"
    if x2 < x1 or y2 < y1:
        raise DatasetError(f"{what} has xmax < xmin or ymax < ymin")
    low, high_x, high_y = 1 - BOX_TOLERANCE, width + BOX_TOLERANCE, height + BOX_TOLERANCE
    if x1 < low or y1 < low or x2 > high_x or y2 > high_y:
        raise DatasetError(f"{what} lies outside the {width}x{height} image "
                           f"(VOC boxes are 1-based inclusive: 1 <= x <= width)")
    box.setflags(write=False)
    return VOCObject(
        name=name,
        label=list(classes).index(name),
        box=box,
        difficult=_flag(path, obj, "difficult", index),
        truncated=_flag(path, obj, "truncated", index),
        pose=_text(obj, "pose") or "Unspecified",
    )


def parse_annotation(path: Path, classes: Sequence[str] = VOC_CLASSES) -> Annotation:
    """Parse one VOC annotation XML file.

    Args:
        path: ``Annotations/<id>.xml``.
        classes: class names; an object whose name is not among them is an error.

    Returns:
        The annotation; boxes are kept as written (1-based inclusive, float coordinates accepted).

    Raises:
        MissingFileError: the file does not exist.
        DatasetError: malformed or hostile XML, unknown class, missing fields, bad coordinates.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: annotation file not found")
    try:
        root = DefusedET.parse(path).getroot()
    except defusedxml.DefusedXmlException as error:
        raise DatasetError(f"{path}: refused unsafe XML ({type(error).__name__}: {error})") from None
    except ET.ParseError as error:
        raise DatasetError(f"{path}: malformed XML ({error})") from None
    if root.tag != "annotation":
        raise DatasetError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    size = root.find("size")
    if size is None:
        raise DatasetError(f"{path}: no <size> element (width, height, depth)")
    width, height = _size(path, size, "width"), _size(path, size, "height")
    depth = _size(path, size, "depth", default=3)
    objects = tuple(_parse_object(path, obj, index, classes, width, height)
                    for index, obj in enumerate(root.findall("object")))
    return Annotation(image_id=path.stem, width=width, height=height, depth=depth, objects=objects, path=path)


def _read_lines(path: Path) -> list[str]:
    """The lines of a text file, a UTF-8 byte-order mark (written by some Windows editors) dropped."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not a text file of image ids ({error})") from None


def year_folder(root: Path, year: str) -> Path:
    """The ``VOC<year>`` folder, given the VOCdevkit folder, the ``VOC<year>`` folder or their parent.

    Raises:
        MissingFileError: naming what was looked for.
    """
    name = check_name(f"VOC{year}", "year folder")
    for candidate in (root / name, root, root / "VOCdevkit" / name):
        if candidate.name == name and candidate.is_dir():
            return candidate
    if not root.is_dir():
        raise MissingFileError(f"VOC root {root} does not exist; expected a VOCdevkit folder holding {name}/ "
                               f"({_VOC_ROOT_HINT})")
    found = sorted(p.name for p in (*root.glob("VOC*"), *root.glob("VOCdevkit/VOC*"))
                   if p.is_dir() and p.name != "VOCdevkit")
    other = f" (found {', '.join(found)}: pass the matching year)" if found else ""
    raise MissingFileError(f"VOC root {root} has no {name}/ folder{other}; {_VOC_ROOT_HINT}")


def fingerprint(data: bytes, stat: os.stat_result) -> dict[str, Any]:
    """What an image file was: ``{"size": bytes, "mtime_ns": int, "blake2b": hex digest of data}``, from
    the bytes read and the ``os.fstat`` of the open file."""
    return {"size": len(data), "mtime_ns": stat.st_mtime_ns,
            "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}


def read_bytes(path: str | Path) -> tuple[bytes, os.stat_result]:
    """A file's bytes and the ``os.fstat`` of the same open file."""
    with Path(path).open("rb") as handle:
        return handle.read(), os.fstat(handle.fileno())


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """:func:`fingerprint` of a file as it is now."""
    return fingerprint(*read_bytes(path))


# Integer modes of 16-bit files (PNG, TIFF): PIL keeps their full range; scaled to 8 bits by / 257.
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any PIL mode as 8-bit RGB: grayscale is replicated, palette and CMYK converted, alpha
    dropped, 16-bit values (0..65535) scaled to 0..255 and float values clipped to 0..255."""
    if image.mode in _WIDE_INT_MODES or image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            pixels = pixels / 257.0
        gray = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return image.convert("RGB")


class VOCDataset:
    """One split of a VOCdevkit: image ids, annotations (all parsed up front) and images.

    Args:
        root: the VOCdevkit folder holding ``VOC<year>/`` (the ``VOC<year>`` folder itself is accepted too).
        year: ``"2007"``, ``"2012"``, ``"demo"``, ... (folder ``VOC<year>``).
        split: any ``ImageSets/Main/<split>.txt`` (train, val, trainval, test, ...).
        classes: class names, in label order.
        on_error: ``"raise"`` stops at the first bad image; ``"skip"`` drops it (from ``image_ids``, also
            when it proves unreadable later, through :meth:`skip`) and records it in ``skipped`` as
            ``{"image_id", "file", "reason"}``.
        limit: keep only the first ``limit`` ids of the split.
        check_sizes: compare each image's size with its annotation's ``<size>`` in :meth:`load_image`.

    Raises:
        MissingFileError: missing root or split file; missing annotation or image with ``on_error="raise"``.
        DatasetError: bad split file, or (with ``on_error="raise"``) a bad annotation.
    """

    def __init__(
        self,
        root: str | Path,
        year: str = "2007",
        split: str = "val",
        classes: Sequence[str] = VOC_CLASSES,
        on_error: str = "raise",
        limit: int | None = None,
        check_sizes: bool = True,
    ) -> None:
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error={on_error!r}; choose one of {', '.join(ON_ERROR_CHOICES)}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit={limit}; pass a positive number of images or None for the whole split")
        if len(set(classes)) != len(classes) or not classes:
            raise ValueError(f"classes {list(classes)} must be a non-empty list of distinct names")
        self.year = str(year)
        self.split = split
        self.classes = list(classes)
        self.on_error = on_error
        self.check_sizes = check_sizes
        self.base = year_folder(Path(root).expanduser(), self.year)
        self.root = self.base.parent
        self.skipped: list[dict[str, str]] = []
        self._annotations: dict[str, Annotation] = {}
        ids = self._read_split()
        if limit is not None:
            ids = ids[:limit]
        self.image_ids: list[str] = []
        for image_id in ids:
            if self._load_checked(image_id):
                self.image_ids.append(image_id)
        logger.info("%s %s: %d images, %d objects, %d skipped", self.base.name, split, len(self.image_ids),
                    sum(len(self._annotations[i].objects) for i in self.image_ids), len(self.skipped))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return f"VOCDataset({str(self.base)!r}, split={self.split!r}, images={len(self)})"

    @property
    def main_dir(self) -> Path:
        """``VOC<year>/ImageSets/Main``."""
        return self.base / "ImageSets" / "Main"

    def available_splits(self) -> list[str]:
        """Split names that have an ``ImageSets/Main/<split>.txt`` (per-class files excluded)."""
        prefixes = tuple(f"{name}_" for name in (*self.classes, *VOC_CLASSES))
        return sorted(p.stem for p in self.main_dir.glob("*.txt") if not p.stem.startswith(prefixes))

    def _read_split(self) -> list[str]:
        path = self.main_dir / f"{check_name(self.split, 'split')}.txt"
        if not path.is_file():
            splits = ", ".join(self.available_splits()) or "none"
            raise MissingFileError(f"{path}: split file not found; splits in {self.main_dir}: {splits}")
        ids: list[str] = []
        seen: set[str] = set()
        for number, line in enumerate(_read_lines(path), start=1):
            fields = line.split()
            if not fields:
                continue
            problem = name_problem(fields[0])
            if problem is not None:
                raise DatasetError(f"{path}: line {number}: image id {excerpt(fields[0])} {problem}; fix the "
                                   "image set file")
            if fields[0] in seen:
                raise DatasetError(f"{path}: line {number} repeats image id {excerpt(fields[0])}")
            seen.add(fields[0])
            ids.append(fields[0])
        return ids

    def _load_checked(self, image_id: str) -> bool:
        """Parse the annotation and check that the image exists; record a skipped error and return False."""
        path = self.base / "Annotations" / f"{image_id}.xml"
        try:
            self.annotation(image_id)
            path = self.image_path(image_id)
            if not path.is_file():
                raise MissingFileError(f"{path}: image file not found")
        except DatasetError as error:
            if self.on_error == "raise":
                raise
            self.skip(image_id, path, error)
            return False
        return True

    def annotation(self, image_id: str) -> Annotation:
        """The parsed ``Annotations/<image_id>.xml`` (cached)."""
        cached = self._annotations.get(image_id)
        if cached is None:
            cached = parse_annotation(self.base / "Annotations" / f"{check_name(image_id, 'image id')}.xml",
                                      self.classes)
            self._annotations[image_id] = cached
        return cached

    def image_path(self, image_id: str) -> Path:
        """``JPEGImages/<image_id>.jpg``.

        Raises:
            ValueError: an id that cannot be a file name (:func:`gradloc.core.names.check_name`).
        """
        return self.base / "JPEGImages" / f"{check_name(image_id, 'image id')}.jpg"

    def load_image(self, image_id: str) -> Image.Image:
        """The image as RGB (see :meth:`read_image`)."""
        return self.read_image(image_id)[0]

    def read_image(self, image_id: str) -> tuple[Image.Image, dict[str, Any]]:
        """Load an image as 8-bit RGB (grayscale, palette, CMYK, RGBA and 16-bit files converted), after
        checking its size against the annotation (header only) if asked.

        Returns:
            (the RGB image, the :func:`fingerprint` of the bytes it was decoded from).

        Raises:
            MissingFileError: the image file does not exist.
            DatasetError: unreadable image, over PIL's decompression-bomb limit, or its size differs from
                the annotation's ``<size>``.
        """
        path = self.image_path(image_id)
        annotation = self.annotation(image_id)
        if not path.is_file():
            raise MissingFileError(f"{path}: image file not found")
        try:
            data, stat = read_bytes(path)
            with Image.open(io.BytesIO(data)) as image:
                if self.check_sizes and image.size != (annotation.width, annotation.height):
                    raise DatasetError(
                        f"{path}: image is {image.size[0]}x{image.size[1]} but {annotation.path.name} <size> "
                        f"says {annotation.width}x{annotation.height}; fix the annotation (or the image), or "
                        "pass --on-error skip to leave such images out"
                    )
                return to_rgb(image), fingerprint(data, stat)
        except Image.DecompressionBombError as error:
            raise DatasetError(f"{path}: refused as a possible decompression bomb ({error}); shrink the image, "
                               "or pass --on-error skip to leave it out") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as error:
            if isinstance(error, DatasetError):
                raise
            raise DatasetError(f"{path}: unreadable image ({type(error).__name__}: {error}); replace the file, "
                               "or pass --on-error skip to leave it out") from None

    def subset(self, image_ids: Sequence[str]) -> VOCDataset:
        """The same split restricted to ``image_ids`` (kept in split order): cross-validation folds.

        Raises:
            ValueError: an id that is not an image of this dataset.
        """
        wanted = set(image_ids)
        unknown = sorted(wanted.difference(self.image_ids))
        if unknown:
            raise ValueError(f"{self.base.name} {self.split}: {len(unknown)} image id(s) not in the split, e.g. "
                             f"{unknown[0]!r}")
        subset = copy.copy(self)
        subset.image_ids = [image_id for image_id in self.image_ids if image_id in wanted]
        subset.skipped = list(self.skipped)
        return subset

    def skip(self, image_id: str, path: Path, error: Exception) -> None:
        """Leave an image out of the dataset (``on_error="skip"``), recording why in ``skipped``."""
        logger.warning("skipping %s: %s", image_id, error)
        self.skipped.append({"image_id": image_id, "file": str(path), "reason": str(error)})
        if image_id in self.image_ids:
            self.image_ids.remove(image_id)

    def image_labels(self) -> np.ndarray:
        """Image-level labels in the devkit's classification convention.

        Returns:
            int8[n_images, n_classes]: 1 if the image holds a non-difficult instance of the class, 0 if all
            its instances are difficult, -1 if it holds none.
        """
        return self.ground_truth().image_labels()

    def ground_truth(self) -> GroundTruth:
        """All boxes of the split's images, in image order then file order."""
        objects = [(row, obj) for row, image_id in enumerate(self.image_ids)
                   for obj in self.annotation(image_id).objects]
        annotations = [self.annotation(image_id) for image_id in self.image_ids]
        return GroundTruth(
            classes=list(self.classes),
            image_ids=list(self.image_ids),
            image_sizes=np.array([(a.width, a.height) for a in annotations], dtype=np.int64).reshape(-1, 2),
            image_index=np.array([row for row, _ in objects], dtype=np.int64),
            labels=np.array([obj.label for _, obj in objects], dtype=np.int64),
            boxes=np.array([obj.box for _, obj in objects], dtype=np.float64).reshape(-1, 4),
            difficult=np.array([obj.difficult for _, obj in objects], dtype=bool),
        )
