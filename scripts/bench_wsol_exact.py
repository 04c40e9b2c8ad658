"""Cost and value of MaxBoxAccV2 in both conventions on a split's cached maps (run `gradloc cams` first).

For every GT-known (image, class) pair, the boxes stage computes two sets of hits from the cached map:
``gradloc.scoring.wsol.box_hits`` (gradloc's convention, on the run's working grid) and
``gradloc.scoring.wsol_exact.exact_hits`` (wsolevaluation's exact protocol: 224 x 224 stretched frame, 100 τ,
OpenCV contours). This script times each over the whole split (images read from the cache once, before
timing) and prints MaxBoxAccV2 under both.

Usage::

    PYTHONPATH=. python scripts/bench_wsol_exact.py --config configs/voc07_efficientnet_lite0_imagenet.yaml
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from gradloc.core.geometry import upsample, working_size  # noqa: E402
from gradloc.run.boxes import open_cached  # noqa: E402
from gradloc.run.config import load_config  # noqa: E402
from gradloc.scoring.wsol import box_hits, max_box_acc_from_hits  # noqa: E402
from gradloc.scoring.wsol_exact import exact_hits, exact_max_box_acc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/voc07_efficientnet_lite0_imagenet.yaml")
    args = parser.parse_args()
    config = load_config(args.config, {})
    cache, dataset = open_cached(config)
    gt = dataset.ground_truth()
    items = []
    for index, image_id in enumerate(dataset.image_ids):
        entry, mine = cache.get(image_id), gt.image_index == index
        classes = np.unique(gt.labels[mine])
        if len(classes):
            items.append((entry.maps[classes], entry.geometry,
                          [gt.boxes[mine & (gt.labels == c)] for c in classes]))
    n_pairs = sum(len(maps) for maps, _, _ in items)

    start = time.perf_counter()
    ours = [box_hits(upsample(maps, geometry, *working_size(geometry.width, geometry.height, config.boxes.max_side)),
                     boxes, image_size=(geometry.width, geometry.height)) for maps, geometry, boxes in items]
    gradloc_seconds = time.perf_counter() - start
    start = time.perf_counter()
    exact = [exact_hits(maps, geometry, boxes) for maps, geometry, boxes in items]
    exact_seconds = time.perf_counter() - start

    v2_gradloc = max_box_acc_from_hits(np.concatenate(ours)).iloc[-1]["max_box_acc"]
    frame = exact_max_box_acc(np.concatenate(exact))
    print(f"{config.data.split}: {len(items)} images, {n_pairs} GT pairs, maps {config.model.name} "
          f"{config.cams.method} ({config.model.resize_mode} {config.model.input_size})")
    print(f"gradloc convention (working grid {config.boxes.max_side}): {gradloc_seconds:.1f} s, "
          f"MaxBoxAccV2 {100 * v2_gradloc:.2f} %")
    print(f"wsolevaluation exact (224 x 224, 100 tau): {exact_seconds:.1f} s "
          f"({1000 * exact_seconds / n_pairs:.1f} ms per pair), "
          + ", ".join(f"{m.split(' (')[0]} {100 * v:.2f} %" for m, v in zip(frame["metric"], frame["max_box_acc"],
                                                                            strict=True)))


if __name__ == "__main__":
    main()
