"""``gradloc export``: a run's detections in another tool's results format (:data:`EXPORT_FORMATS`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gradloc.core.folders import staged
from gradloc.core.formats import Detections, GroundTruth
from gradloc.core.names import check_name
from gradloc.run.folder import open_run
from gradloc.scoring.coco import write_coco_ground_truth, write_coco_results
from gradloc.scoring.devkit import write_voc_results
from gradloc.scoring.tables import match_value

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportFormat:
    """A results format: ``write(detections, folder, split) -> files`` for each detection set, and
    ``ground_truth(gt, folder, split) -> files`` when the format also needs the ground truth (None: the tool
    reads its own annotations)."""

    write: Callable[[Detections, Path, str], list[Path]]
    ground_truth: Callable[[GroundTruth, Path, str], list[Path]] | None
    help: str


EXPORT_FORMATS: dict[str, ExportFormat] = {
    "voc": ExportFormat(write_voc_results, None,
                        "the official devkit's per-class files comp4_det_<split>_<class>.txt (VOC boxes)"),
    "coco": ExportFormat(write_coco_results, write_coco_ground_truth,
                         "COCO results JSON detections_<split>_results.json and the matching ground truth "
                         "instances_<split>.json (pycocotools reads both; gradloc.scoring.coco)"),
}


EXPORT_KIND = "export"  # the marker .gradloc-export (gradloc.core.folders)


def export_run(run_dir: str | Path, threshold: float | None, out_dir: str | Path, split: str | None = None,
               fmt: str = "voc") -> list[Path]:
    """Write a run's detections at τ in a results format: CAM boxes in ``out_dir``, each baseline in
    ``out_dir/baselines/<name>/`` (the map baselines of the same τ, the τ-free center/full boxes), and the
    format's ground truth file in ``out_dir`` when it has one.

    ``out_dir`` holds one export: it is written whole (:func:`gradloc.core.folders.staged`, marker
    ``.gradloc-export``) and replaces an earlier export there, never mixes with it; a folder that is not an
    export (not empty, no marker) is refused. Every class, baseline and split name is checked before it
    becomes a file name (:func:`gradloc.core.names.check_name`).

    Args:
        run_dir: a run folder.
        threshold: one of the run's thresholds (matched within 1e-9); None: the run's selected τ.
        out_dir: the results folder.
        split: the split in the file names; default: the split the run's detections were made on.
        fmt: a key of :data:`EXPORT_FORMATS`.

    Returns:
        The written files (in ``out_dir``).

    Raises:
        FileNotFoundError: no run folder or detections. ValueError: τ not in the run, unknown split or format, a
            name that cannot be a file name. ForeignFolderError: ``out_dir`` is not an export folder.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    run, out_dir = open_run(run_dir), Path(out_dir)
    if not run.thresholds:
        raise FileNotFoundError(f"{run.path}: no CAM detections files; run `gradloc boxes`")
    tau = match_value(run.thresholds, run.threshold_or_selected(threshold), "threshold", run.path / "detections")
    dets = run.detections_at(tau)
    if split is None:
        dataset = str(dets.meta.get("dataset", ""))  # e.g. "VOC2007 val"
        if " " not in dataset:
            raise ValueError(f"{run.path}: the detections do not say their split (meta 'dataset' = "
                             f"{dataset!r}); give --split")
        split = dataset.rsplit(" ", 1)[1]
    sources = {"": dets, **run.baselines_at(tau)}
    export = EXPORT_FORMATS[fmt]
    written = []
    with staged(out_dir, EXPORT_KIND, what="export folder") as staging:
        files = export.ground_truth(run.gt, staging, split) if export.ground_truth else []
        for name, part in sources.items():
            target = staging / "baselines" / check_name(name, "baseline name") if name else staging
            files += export.write(part, target, split)
        written = [out_dir / path.relative_to(staging) for path in files]
    logger.info("exported %d detection sets of %s at tau = %g to %s (%s)", len(sources), run.path, tau, out_dir,
                fmt)
    return written
