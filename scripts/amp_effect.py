"""What --amp does to the numbers: two run folders of the same configuration and split, float32 and --amp.

    gradloc run --config configs/voc07.yaml --checkpoint HEAD.pt --split val --name f32
    gradloc run --config configs/voc07.yaml --checkpoint HEAD.pt --split val --name amp --amp
    python scripts/amp_effect.py results/f32 results/amp

Reports, every number over the split's images:

* maps: the largest difference between the normalized maps of the two heatmap caches (each raw map divided by
  its maximum; all classes of every image), with its median and 99th percentile, for the classes present in the
  image (GT) and for the others;
* probabilities: the largest difference of a class probability;
* boxes at the configuration's selected τ (or ``--threshold``): the share of the float32 run's boxes, one per
  (image, class) with box mode ``largest``, that the --amp run reproduces with IoU >= 0.9 (a box it lacks
  counts as not reproduced), for all classes and for the GT classes;
* mAP@0.5 (the runs' metric, VOC07 11-point by default) of both runs at that τ and their difference with a
  paired percentile interval: 1,000 resamples of the images (seed 0), the same resample weights for both runs
  (``gradloc.scoring.bootstrap.resample_weights`` + ``map_samples``), the difference per resample, its 2.5 and
  97.5 percentiles.
"""

from __future__ import annotations

import argparse

import numpy as np

from gradloc.core.formats import Detections
from gradloc.models.build import HEADS
from gradloc.models.registry import class_probabilities
from gradloc.reports.show import open_run_cache
from gradloc.run.folder import Run, open_run
from gradloc.scoring.bootstrap import map_samples, resample_weights
from gradloc.scoring.voc import box_iou, evaluate


def normalized(maps: np.ndarray) -> np.ndarray:
    """float32[C, h, w] maps each divided by its maximum (all-zero maps stay 0)."""
    peaks = maps.max(axis=(1, 2), keepdims=True)
    return np.divide(maps, peaks, out=np.zeros_like(maps), where=peaks > 0)


def map_differences(a: Run, b: Run) -> tuple[np.ndarray, np.ndarray, float]:
    """(largest normalized difference per map of present classes, per map of absent classes, largest
    probability difference)."""
    caches = [open_run_cache(run) for run in (a, b)]  # serving the image contents each run recorded
    gt = a.gt
    labels = gt.image_labels() == 1
    score_kind = HEADS[a.manifest["config"]["model"]["head"]][1]
    present, absent, probability = [], [], 0.0
    for row, image_id in enumerate(gt.image_ids):
        first, second = (cache.get(image_id) for cache in caches)
        worst = np.abs(normalized(first.maps) - normalized(second.maps)).max(axis=(1, 2))
        present += list(worst[labels[row]])
        absent += list(worst[~labels[row]])
        gap = np.abs(class_probabilities(first.scores, score_kind) - class_probabilities(second.scores, score_kind))
        probability = max(probability, float(gap.max()))
    return np.array(present), np.array(absent), probability


def reproduced(reference: Detections, other: Detections, classes: np.ndarray | None = None) -> tuple[float, int]:
    """Share of ``reference``'s boxes (one per image and class) that ``other`` has with IoU >= 0.9, and how many
    boxes that share is over; ``classes``: bool[n_images, C] pairs to count (None: all)."""
    boxes = {(i, c): box for i, c, box in zip(other.image_index, other.labels, other.boxes, strict=True)}
    hits, count = 0, 0
    for i, c, box in zip(reference.image_index, reference.labels, reference.boxes, strict=True):
        if classes is not None and not classes[i, c]:
            continue
        count += 1
        match = boxes.get((i, c))
        hits += match is not None and box_iou(box, match) >= 0.9
    return hits / max(count, 1), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("float32_run")
    parser.add_argument("amp_run")
    parser.add_argument("--threshold", type=float, help="τ of the boxes (default: the config's selected_threshold)")
    parser.add_argument("--iou", type=float, default=0.5)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    a, b = open_run(args.float32_run), open_run(args.amp_run)
    config = a.manifest["config"]
    tau = args.threshold if args.threshold is not None else config["boxes"]["selected_threshold"]
    metric = config["score"]["metric"]
    gt = a.gt
    if gt.image_ids != b.gt.image_ids:
        raise SystemExit(f"{a.path} and {b.path} hold other images; run both on the same split")

    present, absent, probability = map_differences(a, b)
    print(f"{len(gt.image_ids)} images ({config['data']['split']}), {config['model']['name']} "
          f"{config['model']['head']}, {config['cams']['method']}")
    for name, values in (("GT classes", present), ("other classes", absent)):
        print(f"normalized map difference, {name} ({len(values)} maps): max {values.max():.3f}, median "
              f"{np.median(values):.3f}, 99th percentile {np.quantile(values, 0.99):.3f}")
    print(f"largest class-probability difference: {probability:.4f}")

    first, second = a.detections_at(tau), b.detections_at(tau)
    share, count = reproduced(first, second)
    share_gt, count_gt = reproduced(first, second, gt.image_labels() == 1)
    print(f"boxes at τ {tau:g} reproduced with IoU >= 0.9: {100 * share:.1f} % of {count} (GT classes: "
          f"{100 * share_gt:.1f} % of {count_gt})")

    estimates = [evaluate(dets, gt, [args.iou], metric) for dets in (first, second)]
    maps = [float(frame.loc[frame["class"] == "mAP", "ap"].iloc[0]) for frame in estimates]
    weights = resample_weights(len(gt.image_ids), args.resamples, args.seed)
    difference = map_samples(second, gt, weights, args.iou, metric) - map_samples(first, gt, weights, args.iou, metric)
    low, high = np.nanquantile(difference, [0.025, 0.975])
    print(f"mAP@{args.iou:g} ({metric}) at τ {tau:g}: float32 {100 * maps[0]:.2f}, --amp {100 * maps[1]:.2f}, "
          f"difference {100 * (maps[1] - maps[0]):+.2f} points [{100 * low:+.2f}, {100 * high:+.2f}] (paired "
          f"percentile interval, {args.resamples} resamples of the images, seed {args.seed})")


if __name__ == "__main__":
    main()
