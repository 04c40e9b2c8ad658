"""Benchmark of the box sweep (``gradloc.boxes``) and the VOC scorer (``gradloc.scoring.voc.evaluate``).

Synthetic but VOC-shaped data, seeded: 5,000 images (mostly 500x375, some portrait/other VOC sizes), 1-3 GT
boxes each over the 20 VOC classes (10 % difficult), and 3 explained classes per image (its GT classes, then
random others) = 15,000 raw maps at feature resolution 14x14 (VGG-16 conv5_3 at 224, the Grad-CAM paper's
layer), letterboxed geometry to 224. A map of a GT class holds a Gaussian blob per GT box of that class
(centre jittered by 10 % of the box, sigma = box size / 4, amplitude 0.5-1.5), a map of an absent class one
weaker blob anywhere, all plus uniform noise in [0, 0.1); class scores are higher for GT classes.

Measures, printing markdown tables and the command:

1. The whole sweep from cached maps: boxes at 100 thresholds (``max`` semantics, ``largest`` box, default
   ``BoxParams``, working grid ``max_side`` 224) image by image (``image_boxes`` into ``BoxRows``, as the
   boxes stage does), then VOC07 AP at 3 IoUs (0.3, 0.5, 0.7) of each threshold's detections. Target: <= 60 s.
2. The scorer alone against the per-detection loop of ``gradloc.scoring.reference`` on one threshold's
   detections (τ = 0.2; same 3 IoUs; VOC07 and all-point), which it must match exactly (``==``).
   Target: >= 20x.
3. The effect of the working resolution ``max_side`` (None = full original resolution, 224, 112) on a subset:
   mean IoU of the boxes with the full-resolution boxes (same image, class, τ), share of identical boxes,
   the AP@0.5 difference, and the time.

OpenBLAS/OpenMP thread pools are limited to one thread (set before numpy is imported): the back-projection
multiplies tiny matrices, and on a loaded 2-core machine OpenBLAS's threads made each call ~100x slower.

Usage::

    python scripts/bench_scores.py             # full run
    python scripts/bench_scores.py --quick     # smoke run: 200 images, 10 thresholds
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from gradloc.boxes.cut import BoxParams, image_boxes  # noqa: E402
from gradloc.boxes.rows import BoxRows, ThresholdDetections  # noqa: E402
from gradloc.core.formats import Detections, GroundTruth  # noqa: E402
from gradloc.core.geometry import Geometry, plan  # noqa: E402
from gradloc.scoring.reference import reference_evaluate  # noqa: E402
from gradloc.scoring.voc import evaluate  # noqa: E402


class SweepEntry(NamedTuple):
    """One image's cached maps: float32[K, h, w], float64[K] class scores, geometry, int64[K] class labels."""

    maps: np.ndarray
    class_scores: np.ndarray
    geometry: Geometry
    labels: np.ndarray


def sweep_images(entries: list[SweepEntry], thresholds: list[float], params: BoxParams) -> list[ThresholdDetections]:
    """Boxes of every image at every threshold, as the boxes stage cuts them (one process)."""
    rows = BoxRows(len(thresholds))
    for index, entry in enumerate(entries):
        rows.add_sweep(index, entry.labels, image_boxes(entry.maps, entry.class_scores, entry.geometry, thresholds,
                                                        params))
    return rows.per_threshold()


VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
SIZES = [(500, 375)] * 6 + [(375, 500), (500, 333), (333, 500), (500, 500)]
FEATURE = 14
INPUT = 224
IOUS = (0.3, 0.5, 0.7)


def feature_coords(geometry: Geometry, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Original-image coordinates -> feature-grid coordinates (cell centres at j + 0.5)."""
    fx = (geometry.pad_x + x * geometry.resized_w / geometry.width) * FEATURE / geometry.input_w
    fy = (geometry.pad_y + y * geometry.resized_h / geometry.height) * FEATURE / geometry.input_h
    return fx, fy


def blob(geometry: Geometry, box: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """float64[14, 14] Gaussian around a VOC box (centre jittered by 10 % of its size, sigma = size / 4)."""
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    cx = (box[0] - 1 + box[2]) / 2 + rng.normal(0, 0.1 * w)
    cy = (box[1] - 1 + box[3]) / 2 + rng.normal(0, 0.1 * h)
    (fx, fy), (fx1, fy1) = feature_coords(geometry, cx, cy), feature_coords(geometry, cx + w / 4, cy + h / 4)
    sx, sy = max(fx1 - fx, 0.3), max(fy1 - fy, 0.3)
    grid = np.arange(FEATURE) + 0.5
    return amplitude * np.outer(np.exp(-0.5 * ((grid - fy) / sy) ** 2), np.exp(-0.5 * ((grid - fx) / sx) ** 2))


def make_data(n_images: int, seed: int) -> tuple[list[SweepEntry], GroundTruth]:
    rng = np.random.default_rng(seed)
    entries: list[SweepEntry] = []
    gt_index, gt_labels, gt_boxes, sizes = [], [], [], []
    for i in range(n_images):
        width, height = SIZES[rng.integers(len(SIZES))]
        geometry = plan(width, height, INPUT)
        sizes.append((width, height))
        n_obj = int(rng.integers(1, 4))
        labels = rng.integers(0, 20, n_obj)
        bw = rng.uniform(0.15, 0.8, n_obj) * width
        bh = rng.uniform(0.15, 0.8, n_obj) * height
        x1 = np.floor(rng.uniform(0, 1, n_obj) * (width - bw)) + 1
        y1 = np.floor(rng.uniform(0, 1, n_obj) * (height - bh)) + 1
        boxes = np.stack(
            [x1, y1, np.minimum(x1 + np.round(bw) - 1, width), np.minimum(y1 + np.round(bh) - 1, height)], 1
        )
        gt_index += [i] * n_obj
        gt_labels += labels.tolist()
        gt_boxes.append(boxes)
        present = list(dict.fromkeys(labels.tolist()))[:3]
        others = [c for c in rng.permutation(20).tolist() if c not in present][: 3 - len(present)]
        explained = np.array(present + others, dtype=np.int64)
        maps = rng.uniform(0, 0.1, (3, FEATURE, FEATURE))
        scores = np.empty(3)
        for k, c in enumerate(explained):
            if c in present:
                for box in boxes[labels == c]:
                    maps[k] += blob(geometry, box, rng.uniform(0.5, 1.5), rng)
                scores[k] = rng.uniform(0.4, 1.0)
            else:
                fake = np.array([rng.uniform(1, width / 2), rng.uniform(1, height / 2), 0, 0])
                fake[2:] = fake[:2] + np.array([rng.uniform(0.1, 0.5) * width, rng.uniform(0.1, 0.5) * height])
                maps[k] += blob(geometry, fake, rng.uniform(0.2, 0.8), rng)
                scores[k] = rng.uniform(0.0, 0.6)
        entries.append(SweepEntry(maps.astype(np.float32), scores, geometry, explained))
    n_gt = len(gt_labels)
    gt = GroundTruth(
        classes=VOC_CLASSES,
        image_ids=[f"{i:06d}" for i in range(n_images)],
        image_sizes=np.array(sizes, dtype=np.int64),
        image_index=np.array(gt_index, dtype=np.int64),
        labels=np.array(gt_labels, dtype=np.int64),
        boxes=np.concatenate(gt_boxes),
        difficult=rng.random(n_gt) < 0.1,
    )
    return entries, gt


def to_detections(part: tuple, tau: float, params: BoxParams, gt: GroundTruth) -> Detections:
    image_index, labels, scores, boxes = part
    return Detections(
        threshold=float(tau), threshold_mode=params.threshold_mode, box_mode=params.box_mode,
        classes=list(gt.classes), image_ids=list(gt.image_ids),
        image_index=image_index, labels=labels, scores=scores, boxes=boxes,
    )  # fmt: skip


def subset_gt(gt: GroundTruth, n_images: int) -> GroundTruth:
    keep = gt.image_index < n_images
    return GroundTruth(
        classes=gt.classes, image_ids=gt.image_ids[:n_images], image_sizes=gt.image_sizes[:n_images],
        image_index=gt.image_index[keep], labels=gt.labels[keep], boxes=gt.boxes[keep],
        difficult=gt.difficult[keep],
    )  # fmt: skip


def mean_ap(dets: Detections, gt: GroundTruth, iou: float) -> float:
    table = evaluate(dets, gt, [iou], "voc07")
    return float(table.loc[table["class"] == "mAP", "ap"].item())


def elementwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """VOC IoU (areas with +1) of row-aligned boxes float64[N, 4]."""
    iw = np.maximum(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1, 0)
    ih = np.maximum(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1, 0)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def markdown(rows: list[dict]) -> str:
    return pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4g")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_sweep(entries, gt, thresholds, params) -> tuple[list[dict], dict]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    swept = sweep_images(entries, thresholds, params)
    boxes_wall, boxes_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    rows = [{"stage": f"boxes, {len(thresholds)} thresholds (image_boxes per image)", "wall s": boxes_wall,
             "CPU s": boxes_cpu}]
    wall, cpu = time.perf_counter(), cpu_seconds()
    maps_at = {}
    for tau, part in zip(thresholds, swept, strict=True):
        table = evaluate(to_detections(part, tau, params, gt), gt, IOUS, "voc07")
        maps_at[tau] = table[table["class"] == "mAP"].set_index("iou")["ap"]
    score_wall, score_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    rows.append({
        "stage": f"scoring, {len(thresholds)} thresholds x {len(IOUS)} IoUs (evaluate, voc07)",
        "wall s": score_wall, "CPU s": score_cpu,
    })  # fmt: skip
    rows.append({"stage": "whole sweep", "wall s": boxes_wall + score_wall, "CPU s": boxes_cpu + score_cpu})
    best = pd.DataFrame(maps_at).T
    info = {
        "total": boxes_wall + score_wall,
        "best": {iou: (float(best[iou].idxmax()), float(best[iou].max())) for iou in IOUS},
        "n_dets": sum(len(part.scores) for part in swept),
    }
    return rows, info


def bench_scorer(entries, gt, params, tau: float, repeats: int) -> list[dict]:
    [part] = sweep_images(entries, [tau], params)
    dets = to_detections(part, tau, params, gt)
    rows = []
    for metric, use_07 in (("voc07", True), ("voc10", False)):
        fast = []
        for _ in range(repeats):
            start = time.perf_counter()
            table = evaluate(dets, gt, IOUS, metric)
            fast.append(time.perf_counter() - start)
        start = time.perf_counter()
        reference = {iou: reference_evaluate(dets, gt, iou, use_07) for iou in IOUS}
        slow = time.perf_counter() - start
        mismatches = 0
        for iou in IOUS:
            got = table[(table["iou"] == iou) & (table["class"] != "mAP")].set_index("class")
            for name, (ap, recall) in reference[iou].items():
                same = (np.isnan(ap) and np.isnan(got.at[name, "ap"])) or (
                    got.at[name, "ap"] == ap and got.at[name, "recall"] == recall
                )
                mismatches += not same
        rows.append({
            "metric": metric, "detections": len(dets), "IoUs": len(IOUS), "evaluate s (best)": min(fast),
            "loop s": slow, "speed-up": slow / min(fast), "classes x IoUs differing (==)": mismatches,
        })  # fmt: skip
    return rows


def bench_max_side(entries, gt, thresholds, n_images: int) -> list[dict]:
    entries, gt = entries[:n_images], subset_gt(gt, n_images)
    results = {}
    for max_side in (None, 224, 112):
        params = BoxParams(max_side=max_side)
        start = time.perf_counter()
        swept = sweep_images(entries, thresholds, params)
        seconds = time.perf_counter() - start
        ap50 = np.array([
            mean_ap(to_detections(part, tau, params, gt), gt, 0.5)
            for tau, part in zip(thresholds, swept, strict=True)
        ])  # fmt: skip
        results[max_side] = (swept, seconds, ap50)
    full_swept, _, full_ap = results[None]
    rows = []
    taus = np.asarray(thresholds)
    bands = [(0.0, 0.3), (0.3, 0.6), (0.6, 0.9), (0.9, 1.01)]
    for max_side, (swept, seconds, ap50) in results.items():
        ious, same = [], []
        for ref, part in zip(full_swept, swept, strict=True):
            # one box per (image, class) in `largest` mode: align by that key
            key_ref = ref.image_index * 100 + ref.labels
            key = part.image_index * 100 + part.labels
            _, i_ref, i = np.intersect1d(key_ref, key, return_indices=True)
            ious.append(elementwise_iou(ref.boxes[i_ref], part.boxes[i]))
            same.append(np.all(ref.boxes[i_ref] == part.boxes[i], axis=1))
        diff = ap50 - full_ap
        row = {
            "max_side": "None (full)" if max_side is None else max_side,
            "mean IoU vs full, all τ": float(np.concatenate(ious).mean()),
        }
        for lo, hi in bands:
            in_band = [iou for tau, iou in zip(taus, ious, strict=True) if lo <= tau < hi]
            if in_band:
                row[f"τ in [{lo}, {min(hi, 1.0)}{']' if hi > 1 else ')'}"] = float(np.concatenate(in_band).mean())
        row.update({
            "identical boxes": float(np.concatenate(same).mean()),
            "best AP@0.5": float(ap50.max()), "ΔAP@0.5 at best τ": float(ap50.max() - full_ap.max()),
            "mean |ΔAP@0.5| over τ": float(np.abs(diff).mean()), "max |ΔAP@0.5|": float(np.abs(diff).max()),
            "boxes s": seconds,
        })  # fmt: skip
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--thresholds", type=int, default=100)
    parser.add_argument("--subset", type=int, default=300, help="images for the max_side comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 images, 10 thresholds, subset 50")
    args = parser.parse_args()
    if args.quick:
        args.images, args.thresholds, args.subset = 200, 10, 50

    print(
        f"Command: `python {' '.join(sys.argv)}`  (cores: {os.cpu_count()}, load: "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())})\n"
    )
    start = time.perf_counter()
    entries, gt = make_data(args.images, args.seed)
    print(
        f"Synthetic data: {len(entries)} images, {3 * len(entries)} maps {FEATURE}x{FEATURE}, "
        f"{len(gt.labels)} GT boxes ({int(gt.difficult.sum())} difficult), "
        f"made in {time.perf_counter() - start:.1f} s\n"
    )
    thresholds = [round(float(t), 3) for t in np.linspace(0.01, 1.0, args.thresholds)]
    params = BoxParams()
    sweep_images(entries[:2], thresholds, params)  # compile / load the numba cache outside the timings

    print(f"## 1. Whole sweep: {len(thresholds)} thresholds x {len(IOUS)} IoUs from cached maps\n")
    print(f"BoxParams: {params}\n")
    rows, timings = bench_sweep(entries, gt, thresholds, params)
    print(markdown(rows))
    print(
        f"\n{timings['n_dets']} detections in all; best τ (VOC07 mAP): "
        + ", ".join(f"IoU {iou}: τ={tau} mAP={ap:.4f}" for iou, (tau, ap) in timings["best"].items())
    )
    print(
        f"\nTarget whole sweep <= 60 s: {'PASS' if timings['total'] <= 60 else 'FAIL'} "
        f"({timings['total']:.1f} s; the machine's load shows in wall vs CPU)\n"
    )

    print("## 2. Scorer vs the per-detection loop (gradloc.scoring.reference), τ = 0.2\n")
    scorer_rows = bench_scorer(entries, gt, params, 0.2, repeats=3)
    print(markdown(scorer_rows))
    ok = all(r["speed-up"] >= 20 and r["classes x IoUs differing (==)"] == 0 for r in scorer_rows)
    print(f"\nTarget scorer >= 20x the loop and identical: {'PASS' if ok else 'FAIL'}\n")

    print(
        f"## 3. Working resolution max_side on {min(args.subset, len(entries))} images, {len(thresholds)} "
        "thresholds (largest box)\n"
    )
    print(markdown(bench_max_side(entries, gt, thresholds, min(args.subset, len(entries)))))


if __name__ == "__main__":
    main()
