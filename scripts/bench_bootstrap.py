"""Time of the bootstrap intervals (``gradloc.scoring.bootstrap``) on a VOC-sized synthetic case, and of MaxBoxAccV2.

Seeded synthetic data shaped like the VOC07 val subset: 500 images (500x375), 1-3 GT boxes each over the 20
VOC classes (10 % difficult), 1-4 detections per GT box (jittered boxes) plus 2 false positives per image,
distinct random scores. Times (median of ``--repeats`` runs, 1,000 resamples, seed 0):

* ``map_interval`` (VOC07 11-point mAP@0.5), ``corloc_interval`` (IoU 0.5), ``pointing_interval`` (TorchRay
  protocol), ``max_box_acc_interval`` (from pair hits);
* ``gradloc.scoring.wsol.box_hits`` on the GT-class maps at image resolution (MaxBoxAccV2 on the 0.01 grid), per image.

Usage::

    python scripts/bench_bootstrap.py              # 500 images, 3 repeats
    python scripts/bench_bootstrap.py --images 100 --repeats 1
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from gradloc.core.formats import Detections, GroundTruth  # noqa: E402
from gradloc.core.geometry import plan, upsample, working_size  # noqa: E402
from gradloc.scoring.bootstrap import (  # noqa: E402
    corloc_interval,
    map_interval,
    max_box_acc_interval,
    pointing_interval,
)
from gradloc.scoring.wsol import box_hits  # noqa: E402

WIDTH, HEIGHT = 500, 375


def synthetic(n_images: int, seed: int = 0) -> tuple[Detections, GroundTruth]:
    rng = np.random.default_rng(seed)
    ids = [f"{i:06d}" for i in range(n_images)]
    gt_rows, det_rows = [], []
    for i in range(n_images):
        for _ in range(int(rng.integers(1, 4))):
            c = int(rng.integers(0, 20))
            x, y = int(rng.integers(1, WIDTH - 100)), int(rng.integers(1, HEIGHT - 100))
            w, h = int(rng.integers(20, 100)), int(rng.integers(20, 100))
            gt_rows.append((i, c, [x, y, x + w, y + h], bool(rng.random() < 0.1)))
            for _ in range(int(rng.integers(1, 5))):
                det_rows.append((i, c, np.array([x, y, x + w, y + h]) + rng.integers(-15, 16, 4)))
        for _ in range(2):
            x, y = int(rng.integers(1, WIDTH - 60)), int(rng.integers(1, HEIGHT - 60))
            det_rows.append((i, int(rng.integers(0, 20)), np.array([x, y, x + 50, y + 50])))
    classes = [f"class{c}" for c in range(20)]
    gt = GroundTruth(classes, ids, np.tile([WIDTH, HEIGHT], (n_images, 1)), np.array([r[0] for r in gt_rows]),
                     np.array([r[1] for r in gt_rows]), np.array([r[2] for r in gt_rows], float),
                     np.array([r[3] for r in gt_rows]))
    boxes = np.array([r[2] for r in det_rows], float)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
    dets = Detections(0.2, "max", "all", classes, ids, np.array([r[0] for r in det_rows]),
                      np.array([r[1] for r in det_rows]), rng.permutation(len(det_rows)) / len(det_rows), boxes)
    return dets, gt


def blob_maps(gt: GroundTruth, image: int, classes: np.ndarray, rng: np.random.Generator,
              max_side: int | None = None) -> np.ndarray:
    """Maps like a CNN's: a Gaussian blob per GT box plus noise on a 16x12 feature grid (stretch geometry),
    back-projected to the image by ``gradloc.core.geometry.upsample``."""
    geometry = plan(WIDTH, HEIGHT, 512, "stretch")
    fy, fx = np.mgrid[0:12, 0:16].astype(np.float32)
    maps = rng.random((classes.size, 12, 16), dtype=np.float32) * 0.2
    cell = np.array([WIDTH / 16, HEIGHT / 12, WIDTH / 16, HEIGHT / 12])
    for k, c in enumerate(classes):
        for x1, y1, x2, y2 in gt.boxes[(gt.image_index == image) & (gt.labels == c)] / cell:
            cx, cy, sx, sy = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 4, (y2 - y1) / 4
            maps[k] += np.exp(-((fx + 0.5 - cx) ** 2 / (2 * sx**2) + (fy + 0.5 - cy) ** 2 / (2 * sy**2)))
    return upsample(maps, geometry, *working_size(WIDTH, HEIGHT, max_side))


def median_time(function: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dets, gt = synthetic(args.images)
    rng = np.random.default_rng(1)
    pair_image, pair_label = np.unique(np.stack([gt.image_index, gt.labels]), axis=1)
    points = np.stack([rng.integers(1, WIDTH + 1, pair_label.size), rng.integers(1, HEIGHT + 1, pair_label.size)],
                      axis=1).astype(float)

    def all_box_hits(max_side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        parts, owners = [], []
        for i in range(args.images):
            classes = pair_label[pair_image == i]
            gts = [gt.boxes[(gt.image_index == i) & (gt.labels == c)] for c in classes]
            maps = blob_maps(gt, i, classes, rng, max_side)
            parts.append(box_hits(maps, gts, image_size=(WIDTH, HEIGHT)))
            owners.append(np.full(classes.size, i))
        return np.concatenate(parts), np.concatenate(owners)

    box_hits(np.ones((1, 4, 4), np.float32), [np.array([[1.0, 1.0, 2.0, 2.0]])])  # numba compile outside timing
    hits_time, (hits, owners) = median_time(all_box_hits, 1)
    grid_time, (grid_hits, _) = median_time(lambda: all_box_hits(224), 1)
    rows = [
        ("mAP@0.5 (VOC07 11-point)", lambda: map_interval(dets, gt, 0.5)),
        ("CorLoc@0.5", lambda: corloc_interval(dets, gt, 0.5)),
        ("pointing game (TorchRay, 15 px)", lambda: pointing_interval(pair_image, pair_label, points, gt,
                                                                       protocol="torchray")),
        ("MaxBoxAccV2 (gradloc convention)", lambda: max_box_acc_interval(hits, owners, args.images)),
    ]
    print(f"`python scripts/bench_bootstrap.py --images {args.images} --repeats {args.repeats}` "
          f"({len(dets)} detections, {len(gt.labels)} GT boxes, {pair_label.size} (image, GT class) pairs; "
          "1,000 resamples, seed 0)\n")
    print("| statistic | value [95 % CI] | median seconds |")
    print("|---|---|---|")
    for name, function in rows:
        seconds, interval = median_time(function, args.repeats)
        print(f"| {name} | {interval.format()} | {seconds:.2f} |")
    print(f"\nMaxBoxAccV2 pair hits (box_hits on 16x12 maps back-projected to {WIDTH}x{HEIGHT}, 100 τ x 3 IoU, "
          f"incl. making the maps): {hits_time:.1f} s for {args.images} images; on the 224 working grid "
          f"(image_size=...): {grid_time:.1f} s, MaxBoxAccV2 "
          f"{max_box_acc_interval(grid_hits, owners, args.images).format()}")


if __name__ == "__main__":
    main()
