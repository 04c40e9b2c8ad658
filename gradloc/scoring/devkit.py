"""The official VOC devkit's results format: per-class text files, written from and read into detections.

The devkit (``VOCevaldet.m``; py-faster-rcnn's ``voc_eval.py``) scores one text file per class,
``<comp>_det_<split>_<class>.txt`` (gradloc writes ``comp4``, the competition "trained on any data"), with one
detection per line::

    <image_id> <score> <x1> <y1> <x2> <y2>

Fields are separated by one space when written, by any whitespace when read. Boxes are in VOC convention,
1-based inclusive pixel coordinates of the original image: the convention of gradloc's own boxes, so no
conversion is made in either direction. Numbers are written with Python's shortest round-trip ``repr``, so
reading a written file gives back the same float64 scores and coordinates bit for bit, and the same AP.

``gradloc export RUN --threshold τ --format voc DIR`` writes the CAM detections of τ to ``DIR`` and the
baselines to ``DIR/baselines/<name>/``; ``gradloc score --gt gt.pkl --voc-results DIR`` scores such a folder
(from gradloc or any detector) with the metric of :func:`gradloc.scoring.voc.evaluate`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from gradloc.core.files import atomic_write_bytes
from gradloc.core.formats import Detections, GroundTruth
from gradloc.core.names import check_name
from gradloc.scoring.voc import score_detections

logger = logging.getLogger(__name__)


COMPETITION = "comp4"


FIELDS = "image_id score x1 y1 x2 y2"


VOC_RESULTS_SOURCE = "cam"  # source name of the detections at the top of a results folder


def results_filename(split: str, class_name: str, competition: str = COMPETITION) -> str:
    """The devkit's file name of one class, e.g. ``comp4_det_val_cat.txt``.

    Raises:
        ValueError: a part that cannot be in a file name (a path separator, a leading dot, invisible
            characters, too long: :func:`gradloc.core.names.check_name`), e.g. a class named ``x/../../y``.
    """
    for what, part in (("competition", competition), ("split", split), ("class name", class_name)):
        check_name(part, what)
    return check_name(f"{competition}_det_{split}_{class_name}.txt", "results file name")


def format_lines(dets: Detections, label: int) -> str:
    """The devkit lines of one class, in the detections' order (which the stable ranking keeps on ties).

    Args:
        dets: detections; ``label`` indexes ``dets.classes``.

    Returns:
        ``"<image_id> <score> <x1> <y1> <x2> <y2>\\n"`` per detection of the class, numbers as ``repr``.
    """
    rows = np.flatnonzero(dets.labels == label)
    return "".join(
        f"{dets.image_ids[dets.image_index[i]]} {float(dets.scores[i])!r} "
        + " ".join(repr(float(v)) for v in dets.boxes[i]) + "\n"
        for i in rows
    )


def write_voc_results(dets: Detections, out_dir: str | Path, split: str,
                      competition: str = COMPETITION) -> list[Path]:
    """One devkit file per class of ``dets.classes`` (empty for a class without detections), atomically.

    Returns:
        The written files, in class order.

    Raises:
        ValueError: an image id or class name with whitespace (it would split the line's fields).
    """
    for what, names in (("image id", dets.image_ids), ("class name", dets.classes)):
        bad = [name for name in names if not name or len(name.split()) != 1]
        if bad:
            raise ValueError(f"{what} {bad[0]!r} is empty or holds whitespace: the devkit's lines and file "
                             "names cannot hold it")
    out_dir = Path(out_dir)
    written = []
    for label, name in enumerate(dets.classes):
        path = out_dir / results_filename(split, name, competition)
        atomic_write_bytes(path, format_lines(dets, label).encode())
        written.append(path)
    return written


def _class_files(folder: Path, classes: Sequence[str]) -> dict[int, Path]:
    """Class index -> its results file among ``folder/*_det_*_<class>.txt`` (longest class name wins).

    Raises:
        FileNotFoundError: no results file in the folder. ValueError: a file of an unknown class, or two
            files of one class.
    """
    files = sorted(p for p in folder.glob("*_det_*.txt") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no devkit results files (<comp>_det_<split>_<class>.txt); "
                                "write them with `gradloc export RUN --threshold TAU --format voc DIR`")
    found: dict[int, Path] = {}
    for path in files:
        matches = [c for c, name in enumerate(classes) if path.name.endswith(f"_{name}.txt")]
        if not matches:
            raise ValueError(f"{path}: the file name names no class of the ground truth "
                             f"({', '.join(classes)}); expected <comp>_det_<split>_<class>.txt")
        label = max(matches, key=lambda c: len(classes[c]))
        if label in found:
            raise ValueError(f"{path}: a second results file of class {classes[label]!r} (the first is "
                             f"{found[label].name}); keep one split's files per folder")
        found[label] = path
    return found


def _parse_line(line: str, where: str, image_of: dict[str, int]) -> tuple[int, float, list[float]]:
    """``image_id score x1 y1 x2 y2`` -> (image index, score, box); errors name ``where`` (file:line)."""
    fields = line.split()
    if len(fields) != 6:
        raise ValueError(f"{where}: expected 6 fields '{FIELDS}', found {len(fields)}: {line.strip()[:80]!r}")
    image_id, *numbers = fields
    try:
        score, *box = (float(v) for v in numbers)
    except ValueError:
        raise ValueError(f"{where}: expected numbers after the image id ('{FIELDS}'), "
                         f"got {' '.join(numbers)[:80]!r}") from None
    if not all(math.isfinite(v) for v in (score, *box)):
        raise ValueError(f"{where}: score and coordinates must be finite numbers, got {' '.join(numbers)!r}")
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"{where}: box {' '.join(numbers[1:])} has x2 < x1 or y2 < y1 (VOC boxes are "
                         "x1 y1 x2 y2, 1-based inclusive)")
    if image_id not in image_of:
        raise ValueError(f"{where}: image id {image_id!r} is not an image of the ground truth; score the "
                         "results against the gt.pkl of the same split")
    return image_of[image_id], score, box


def read_voc_results(folder: str | Path, gt: GroundTruth) -> Detections:
    """The detections of a folder of devkit results files, on the classes and images of ``gt``.

    A class without a file has no detections (logged). The detections of each class keep the file's line
    order, so ties in score rank as they would in the devkit.

    Returns:
        :class:`Detections` without a threshold (``threshold`` NaN, ``threshold_mode`` ``none``,
        ``box_mode`` ``voc-results``).

    Raises:
        FileNotFoundError: no folder or no results files. ValueError: a malformed line (naming file and
            line number), an unknown class or image id, two files of one class.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: results folder not found")
    files = _class_files(folder, gt.classes)
    missing = [name for c, name in enumerate(gt.classes) if c not in files]
    if missing:
        logger.info("%s: no results file for %s (no detections of those classes)", folder, ", ".join(missing))
    image_of = {image_id: i for i, image_id in enumerate(gt.image_ids)}
    image_index, labels, scores, boxes = [], [], [], []
    for label, path in sorted(files.items()):
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a text file; expected lines '{FIELDS}'") from None
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            index, score, box = _parse_line(line, f"{path}:{number}", image_of)
            image_index.append(index)
            labels.append(label)
            scores.append(score)
            boxes.append(box)
    return Detections(
        threshold=float("nan"), threshold_mode="none", box_mode="voc-results", classes=list(gt.classes),
        image_ids=list(gt.image_ids), image_index=np.asarray(image_index, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64), scores=np.asarray(scores, dtype=np.float64),
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        meta={"source": VOC_RESULTS_SOURCE, "results_dir": str(folder)},
    )


def score_voc_results(folder: str | Path, gt: GroundTruth, ious: Sequence[float], metric: str) -> pd.DataFrame:
    """Flat score rows of a results folder: its files as source ``cam``, and each ``baselines/<name>/``
    subfolder holding results files as source ``<name>``."""

    folder = Path(folder)
    frames = [score_detections(read_voc_results(folder, gt), gt, ious, metric, VOC_RESULTS_SOURCE)]
    for sub in sorted(p for p in (folder / "baselines").glob("*") if p.is_dir() and any(p.glob("*_det_*.txt"))):
        frames.append(score_detections(read_voc_results(sub, gt), gt, ious, metric, sub.name))
    return pd.concat(frames, ignore_index=True)
