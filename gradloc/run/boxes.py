"""Stage 2, boxes: heatmap cache -> ``gt.pkl``, ``detections/thr_<τ>.pkl``, baselines, ``points.pkl``,
``gt_known.pkl``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from gradloc.boxes.baselines import BOX_BASELINES, MAP_BASELINES, derangement
from gradloc.boxes.cut import cut_heat, peak_points, working_heat
from gradloc.boxes.explain import explained_classes
from gradloc.boxes.rows import BoxRows, ThresholdDetections
from gradloc.cams.cache import HeatmapCache
from gradloc.cams.methods import method_label
from gradloc.core.formats import Detections, GroundTruth
from gradloc.core.geometry import upsample, working_size
from gradloc.datasets.voc import VOCDataset
from gradloc.models.registry import class_probabilities
from gradloc.run.cams import cams_cache
from gradloc.run.config import RunConfig, check_places, open_dataset
from gradloc.run.folder import RunWriter, new_run
from gradloc.run.setup import Progress, check_names, load_classifier, require_images
from gradloc.scoring.wsol import GRID, IOUS_V2, box_hits
from gradloc.scoring.wsol_exact import EXACT_GRID, INSTALL_HINT, exact_hits, opencv

logger = logging.getLogger(__name__)


class _GtKnown:
    """Per (image, GT class) pair, from the raw map of that class (GT-known, whatever the run explains): the
    map's peak (TorchRay's pointing game), the MaxBoxAccV2 box hits in gradloc's convention (min-max map on the
    run's working grid ``boxes.max_side``, τ grid 0.01, one box per region, IoU 0.3 / 0.5 / 0.7;
    :mod:`gradloc.scoring.wsol`) and, with OpenCV installed, in wsolevaluation's exact protocol (224 x 224
    stretched frame; :mod:`gradloc.scoring.wsol_exact`)."""

    def __init__(self, max_side: int | None) -> None:
        self.max_side = max_side
        self.points = BoxRows(width=2)
        self.hits: list[np.ndarray] = []
        self.hits_exact: list[np.ndarray] | None = [] if opencv() is not None else None
        if self.hits_exact is None:  # the score stage, which leaves the rows out, says so (once per run)
            logger.debug("OpenCV is not installed: gt_known.pkl gets no wsolevaluation-exact hits; %s", INSTALL_HINT)

    def add(self, index: int, entry: Any, labels: np.ndarray, boxes: np.ndarray) -> None:
        classes = np.unique(labels).astype(np.int64)
        if not len(classes):
            return
        maps = entry.maps[classes]
        self.points.add(index, classes, np.zeros(len(classes)), peak_points(maps, entry.geometry))
        size = (entry.geometry.width, entry.geometry.height)
        heat = upsample(maps, entry.geometry, *working_size(*size, self.max_side))
        gt_boxes = [boxes[labels == c] for c in classes]
        self.hits.append(box_hits(heat, gt_boxes, image_size=size))
        if self.hits_exact is not None:
            self.hits_exact.append(exact_hits(maps, entry.geometry, gt_boxes))

    def record(self) -> dict[str, Any]:
        def stacked(parts: list[np.ndarray], n_taus: int) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros((0, n_taus, len(IOUS_V2)), dtype=bool)

        [(image_index, labels, _, points)] = self.points.per_threshold()
        exact = ({} if self.hits_exact is None else
                 {"hits_exact": stacked(self.hits_exact, len(EXACT_GRID)), "grid_exact": EXACT_GRID})
        return {"image_index": image_index, "labels": labels, "points": points, "hits": stacked(self.hits, len(GRID)),
                "grid": GRID, "ious": np.asarray(IOUS_V2), "max_side": self.max_side, **exact}


def run_protocol(config: RunConfig, cache: HeatmapCache) -> dict[str, Any]:
    """The protocol description stored in every detections file and printed under every table."""
    b = config.boxes
    model = cache.key_data["model"]
    return {
        "method": method_label(config.cams.method, aug_smooth=config.cams.aug_smooth,
                               eigen_smooth=config.cams.eigen_smooth),
        "layer": cache.key_data["layer"],
        "model": model.get("arch", config.model.name) if isinstance(model, dict) else str(model),
        "head": config.model.head,
        "checkpoint": config.model.checkpoint,
        "input_size": cache.key_data["input_size"],
        "resize_mode": cache.key_data["resize_mode"],
        "precision": cache.key_data.get("precision", "float32"),  # of the network up to the CAM layer (--amp)
        "dataset": f"VOC{config.data.year} {config.data.split}",
        "split": config.data.split,
        "selected_threshold": b.selected_threshold,
        "selected_on": b.selected_on,
        "classes_explained": f"predicted (p >= {b.score_cut})" if b.explain == "predicted" else b.explain,
        "threshold_mode": b.threshold_mode,
        "box_mode": b.box_mode,
        "connectivity": b.connectivity,
        "min_area": b.min_area,
        "confidence": b.confidence,
        "nms_iou": b.nms_iou,
        "max_side": b.max_side,
        "center_size": b.center_size,
        "cache_key": cache.key,
    }


def open_cached(config: RunConfig) -> tuple[HeatmapCache, VOCDataset]:
    """The heatmap cache and dataset of ``gradloc boxes`` (maps computed earlier by ``gradloc cams``), with the
    cached maps verified: an image without valid maps is an error (``data.on_error: raise``) or leaves the
    dataset as a skipped item (``skip``).

    Raises:
        FileNotFoundError: images without valid cached maps (raise mode); names the cache and what to run.
    """
    dataset = open_dataset(config)
    cache = cams_cache(config, load_classifier(config), dataset)
    missing = cache.todo(dataset, config.data.on_error)
    if missing and config.data.on_error == "raise":
        raise FileNotFoundError(f"{cache.root}: {len(missing)} of {len(dataset)} images (e.g. {missing[0]}) have "
                                "no valid cached maps for this model/method/layer; run `gradloc cams` with the "
                                "same options first")
    for image_id in missing:
        dataset.skip(image_id, dataset.image_path(image_id), ValueError("no valid cached maps (unreadable, or "
                                                                        "edited since `gradloc cams` ran)"))
    return cache, dataset


@dataclass
class BoxesOutput:
    """What the boxes stage makes of a split (:func:`cut_boxes`); :meth:`write` puts it in a run folder.

    Attributes:
        gt: the split's ground truth.
        cam: CAM detections, one per τ of ``boxes.thresholds``.
        box_baselines: threshold-free baselines by name (center, full).
        map_baselines: map baselines by name, one detections per τ.
        points, gt_known, image_scores: the ``points.pkl``, ``gt_known.pkl`` and ``image_scores.pkl`` records.
        images: the content fingerprint of every image whose maps were read (``images.json``).
    """

    gt: GroundTruth
    cam: list[Detections]
    box_baselines: dict[str, Detections]
    map_baselines: dict[str, list[Detections]]
    points: dict[str, Any]
    gt_known: dict[str, Any]
    image_scores: dict[str, Any]
    images: dict[str, dict[str, Any]]

    def write(self, writer: RunWriter) -> None:
        writer.write_gt(self.gt)
        writer.write_images(self.images)
        for dets in self.cam:
            writer.write_detections(dets)
        for name, per_tau in self.map_baselines.items():
            for dets in per_tau:
                writer.write_map_baseline(name, dets)
        for name, dets in self.box_baselines.items():
            writer.write_baseline(name, dets)
        writer.write_points(self.points)
        writer.write_gt_known(self.gt_known)
        writer.write_image_scores(self.image_scores)


def run_boxes(config: RunConfig, cache: HeatmapCache, dataset: VOCDataset, progress: Progress = None,
              writer: RunWriter | None = None) -> Path:
    """Cut boxes from the cached maps at every threshold (:func:`cut_boxes`); write gt.pkl, images.json (the
    content fingerprint of every image whose maps were read: ``cache`` serves only those, see
    :mod:`gradloc.cams.cache`), detections,
    baselines, points.

    With ``writer`` (a run being staged by :func:`gradloc.run.folder.new_run`) the files go to its staging
    folder; without, they replace ``config.run_dir`` as a whole (with ``config.yaml``). Returns
    ``config.run_dir``."""
    if writer is None:
        check_places(config)
        with new_run(config.run_dir) as staged:
            run_boxes(config, cache, dataset, progress, staged)
            staged.write_config(config.to_dict())
        return config.run_dir
    cut_boxes(config, cache, dataset, progress).write(writer)
    return config.run_dir


# The back-projections are tiny matrix products: BLAS threads gain nothing on them, and spinning after each one
# they take the cores the sweep kernel's threads need (gradloc.boxes.cut.component_table).
@threadpool_limits.wrap(limits=1, user_api="blas")
def cut_boxes(config: RunConfig, cache: HeatmapCache, dataset: VOCDataset, progress: Progress = None
              ) -> BoxesOutput:
    """The boxes stage of a split in memory: CAM boxes at every threshold, the baselines, the maps' peaks and
    the GT-known box hits, from the cached maps of ``dataset``'s images."""
    require_images(dataset)
    gt = dataset.ground_truth()
    params = config.boxes
    thresholds = list(config.boxes.thresholds)
    score_kind = cache.key_data["score_kind"]
    check_names(config)
    cam_rows = BoxRows(len(thresholds))
    box_rows = {name: BoxRows() for name in config.boxes.baselines if name in BOX_BASELINES}
    map_rows = {name: BoxRows(len(thresholds)) for name in config.boxes.baselines if name in MAP_BASELINES}
    points = BoxRows(width=2)
    gt_known = _GtKnown(params.max_side)
    order = np.argsort(gt.image_index, kind="stable")
    bounds = np.searchsorted(gt.image_index[order], np.arange(len(gt.image_ids) + 1))
    rng = np.random.default_rng(config.seed)
    partners = derangement(len(dataset.image_ids), config.seed)
    probabilities = np.zeros((len(dataset.image_ids), len(gt.classes)))
    for index, image_id in enumerate(dataset.image_ids):
        entry = cache.get(image_id)
        probs = probabilities[index] = class_probabilities(entry.scores, score_kind)
        in_image = order[bounds[index] : bounds[index + 1]]
        gt_known.add(index, entry, gt.labels[in_image], gt.boxes[in_image])
        classes = explained_classes(config.boxes.explain, probs, gt.labels[in_image], config.boxes.score_cut)
        if len(classes):
            size = (entry.geometry.width, entry.geometry.height)
            heat = working_heat(entry.maps[classes], entry.geometry, params.max_side)
            cam_rows.add_sweep(index, classes, cut_heat(heat, probs[classes], *size, thresholds, params))
            partner_heat = None
            if "shuffled" in map_rows:  # the same classes' maps of another image, laid over this image's grid
                partner = cache.get(dataset.image_ids[partners[index]])
                partner_heat = upsample(partner.maps[classes], partner.geometry, heat.shape[2], heat.shape[1])
            for name, rows in map_rows.items():
                stand_in = MAP_BASELINES[name](heat, partner_heat, rng)
                rows.add_sweep(index, classes, cut_heat(stand_in, probs[classes], *size, thresholds, params))
            for name, rows in box_rows.items():
                box = BOX_BASELINES[name](entry.geometry, params.center_size)
                rows.add(index, classes, probs[classes], np.repeat(box[None], len(classes), axis=0))
            points.add(index, classes, probs[classes], peak_points(entry.maps[classes], entry.geometry))
        if progress:
            progress(1)

    protocol = run_protocol(config, cache)
    common = {"classes": list(gt.classes), "image_ids": list(gt.image_ids)}

    def detections(rows: ThresholdDetections, threshold: float, threshold_mode: str, box_mode: str,
                   source: str, confidence: str) -> Detections:
        return Detections(threshold=threshold, threshold_mode=threshold_mode, box_mode=box_mode,
                          meta={**protocol, "source": source, "confidence": confidence}, **common,
                          **rows._asdict())

    [(image_index, labels, scores, values)] = points.per_threshold()
    return BoxesOutput(
        gt=gt,
        cam=[detections(rows, tau, params.threshold_mode, params.box_mode, "cam", params.confidence)
             for tau, rows in zip(thresholds, cam_rows.per_threshold(), strict=True)],
        box_baselines={name: detections(rows.per_threshold()[0], 0.0, "none", name, name, "score")
                       for name, rows in box_rows.items()},
        map_baselines={name: [detections(part, tau, params.threshold_mode, params.box_mode, name, params.confidence)
                              for tau, part in zip(thresholds, rows.per_threshold(), strict=True)]
                       for name, rows in map_rows.items()},
        points={**common, "image_index": image_index, "labels": labels, "scores": scores, "points": values,
                "meta": protocol},
        gt_known={**common, **gt_known.record(), "meta": protocol},
        image_scores={**common, "probabilities": probabilities, "score_kind": score_kind, "meta": protocol},
        images=cache.sources(dataset.image_ids),
    )
