"""The whole run: cams -> boxes -> scores, staged into a run folder and swapped in whole."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from gradloc.cams.cache import HeatmapCache
from gradloc.core.provenance import config_hash
from gradloc.datasets.voc import VOCDataset
from gradloc.run.boxes import run_boxes
from gradloc.run.cams import plan_cams
from gradloc.run.config import RunConfig, check_places
from gradloc.run.folder import manifest_record, new_run
from gradloc.run.score import coco_scores, headline_rows, score_run_folder
from gradloc.run.setup import StageTimes

# ``stage(description, total)`` -> context manager yielding a progress callback (or None); the CLI's tqdm.
StageProgress = Callable[[str, int], AbstractContextManager[Callable[[int], None] | None]]


@dataclass
class RunResult:
    """What :func:`run` made: the run folder, score rows and protocol, WSOL rows, cache, dataset, times, the
    images left out with ``data.on_error: skip`` ({image_id, file, reason}) and the COCO-style AP rows
    (:func:`gradloc.run.score.coco_scores`) and the headline rows (:func:`gradloc.run.score.headline_rows`)."""

    run_dir: Path
    rows: pd.DataFrame
    meta: dict[str, Any]
    localization: pd.DataFrame
    cache: HeatmapCache
    dataset: VOCDataset
    times: StageTimes
    skipped: list[dict[str, str]] = field(default_factory=list)
    coco: pd.DataFrame | None = None
    headline: pd.DataFrame | None = None


def run(config: RunConfig, original: RunConfig | None = None, stage: StageProgress | None = None,
        record: Mapping[str, Any] | None = None) -> RunResult:
    """The whole pipeline for a prepared config (see :func:`prepare_demo`): cams -> boxes -> scores, plus
    config.yaml and manifest.json (``original`` = the config as given, recorded beside the resolved one;
    ``record``: more manifest entries, e.g. ``distributed``).

    The run is staged and swapped in whole (:func:`gradloc.new_run`): on any error or interruption the
    run folder keeps the previous results; finished heatmaps stay in the cache for the rerun."""

    def quiet(description: str, total: int) -> AbstractContextManager[None]:
        return nullcontext(None)

    stage = stage or quiet
    times = StageTimes()
    check_places(config)
    with new_run(config.run_dir) as writer:
        plan = plan_cams(config)
        with times.stage("cams"), stage(plan.description, plan.n_images) as update:
            cache, dataset = plan.run(update)
        n_thresholds = len(config.boxes.thresholds)
        with times.stage("boxes"), stage(f"boxes {config.data.split} ({n_thresholds} τ)", len(dataset)) as update:
            run_boxes(config, cache, dataset, progress=update, writer=writer)
        writer.write_config(config.to_dict())
        with times.stage("score"):
            rows, meta, wsol = score_run_folder(writer.run, config.score.iou, config.score.metric, config.score.only)
            coco = coco_scores(writer.run, config.score.only)
            headline = headline_rows(writer.run, rows, wsol, meta, config.score.only)
            writer.write_scores(rows, meta, wsol, coco, headline)
        writer.write_manifest({**run_manifest(config, original or config, cache, times, dataset.skipped),
                               **(record or {})})
    return RunResult(config.run_dir, rows, meta, wsol, cache, dataset, times, list(dataset.skipped), coco,
                     headline)


def run_manifest(config: RunConfig, original: RunConfig, cache: HeatmapCache | None, times: StageTimes,
                 skipped: Sequence[dict[str, str]] = ()) -> dict[str, Any]:
    """The ``manifest.json`` record of a run (see :func:`gradloc.manifest_record`)."""
    return manifest_record(config.run_dir, config.to_dict(), original.to_dict(),
                                config_hash(config.to_dict()),
                                cache.key if cache else None, str(cache.root) if cache else None,
                                times.seconds, skipped)
