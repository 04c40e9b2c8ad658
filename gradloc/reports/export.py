"""``gradloc export``: a run's detections in the devkit's results format."""

from __future__ import annotations

import logging
from pathlib import Path

from gradloc.core.folders import staged
from gradloc.core.names import check_name
from gradloc.run.folder import open_run
from gradloc.scoring.devkit import COMPETITION, write_voc_results
from gradloc.scoring.tables import match_value

logger = logging.getLogger(__name__)

EXPORT_KIND = "export"  # the marker .gradloc-export (gradloc.core.folders)


def export_run(run_dir: str | Path, threshold: float, out_dir: str | Path, split: str | None = None,
               competition: str = COMPETITION) -> list[Path]:
    """Write a run's detections at τ as devkit results files: CAM boxes in ``out_dir``, each baseline in
    ``out_dir/baselines/<name>/`` (the random baseline of the same τ, the τ-free center/full boxes).

    ``out_dir`` holds one export: it is written whole (:func:`gradloc.core.folders.staged`, marker
    ``.gradloc-export``) and replaces an earlier export there, never mixes with it; a folder that is not an
    export (not empty, no marker) is refused. Every class, baseline and split name is checked before it
    becomes a file name (:func:`gradloc.core.names.check_name`).

    Args:
        run_dir: a run folder.
        threshold: one of the run's thresholds (matched within 1e-9).
        out_dir: the results folder.
        split: the split in the file names; default: the split the run's detections were made on.

    Returns:
        The written files (in ``out_dir``).

    Raises:
        FileNotFoundError: no run folder or detections. ValueError: τ not in the run, unknown split, a name
            that cannot be a file name. ForeignFolderError: ``out_dir`` is not an export folder.
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
    sources = {"": dets}
    random = run.random_at(tau)
    if random is not None:
        sources["random"] = random
    sources.update(run.baselines)
    written = []
    with staged(out_dir, EXPORT_KIND, what="export folder") as staging:
        for name, part in sources.items():
            target = staging / "baselines" / check_name(name, "baseline name") if name else staging
            written += [out_dir / path.relative_to(staging)
                        for path in write_voc_results(part, target, split, competition)]
    logger.info("exported %d detection sets of %s at tau = %g to %s", len(sources), run.path, tau, out_dir)
    return written
