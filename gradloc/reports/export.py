"""``gradloc export``: a run's detections in the devkit's results format."""

from __future__ import annotations

import logging
from pathlib import Path

from gradloc.run.folder import open_run
from gradloc.scoring.devkit import COMPETITION, write_voc_results
from gradloc.scoring.tables import match_value

logger = logging.getLogger(__name__)

def export_run(run_dir: str | Path, threshold: float, out_dir: str | Path, split: str | None = None,
               competition: str = COMPETITION) -> list[Path]:
    """Write a run's detections at τ as devkit results files: CAM boxes in ``out_dir``, each baseline in
    ``out_dir/baselines/<name>/`` (the map baselines of the same τ, the τ-free center/full boxes).

    Args:
        run_dir: a run folder.
        threshold: one of the run's thresholds (matched within 1e-9).
        out_dir: the results folder (created; files of the same names are replaced).
        split: the split in the file names; default: the split the run's detections were made on.

    Returns:
        The written files.

    Raises:
        FileNotFoundError: no run folder or detections. ValueError: τ not in the run, unknown split.
    """
    run, out_dir = open_run(run_dir), Path(out_dir)
    if not run.thresholds:
        raise FileNotFoundError(f"{run.path}: no CAM detections files; run `gradloc boxes`")
    tau = match_value(run.thresholds, threshold, "threshold", run.path / "detections")
    dets = run.detections_at(tau)
    if split is None:
        dataset = str(dets.meta.get("dataset", ""))  # e.g. "VOC2007 val"
        if " " not in dataset:
            raise ValueError(f"{run.path}: the detections do not say their split (meta 'dataset' = "
                             f"{dataset!r}); give --split")
        split = dataset.rsplit(" ", 1)[1]
    sources = {"": dets, **run.baselines_at(tau)}
    written = []
    for name, part in sources.items():
        target = out_dir / "baselines" / name if name else out_dir
        written += write_voc_results(part, target, split, competition)
    logger.info("exported %d detection sets of %s at tau = %g to %s", len(sources), run.path, tau, out_dir)
    return written
