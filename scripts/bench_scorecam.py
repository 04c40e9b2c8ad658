"""Seconds per image of Score-CAM on real VOC photographs, by masked-input batch size.

The benchmark configuration's preprocessing and layer (``configs/voc07.yaml``: EfficientNet-Lite0 with its
packaged ImageNet weights, 320-px short side, ``bn2``: 1,280 channels, so up to 1,280 masked forward passes per
image), with the ImageNet head (the trained head adds one small linear layer; its file is not needed). For each
``--masked-batch`` value: the time of ``compute_cams(..., "scorecam", batch_size=b)`` for all 20 classes, one
image per call, over the first ``--images`` images of ``val``; also the share of constant channels (all
scored by one pass of the zero input). The timing covers whatever code is imported, so the same script times an
older checkout (``PYTHONPATH=/path/to/old/checkout python scripts/bench_scorecam.py ...``).

Usage::

    python scripts/bench_scorecam.py --images 3 --masked-batch 1,2,8,32
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from gradloc.cams.layers import default_layer, resolve_layer
from gradloc.cams.methods import compute_cams
from gradloc.run.config import load_config, open_dataset
from gradloc.run.setup import load_classifier

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "voc07.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--masked-batch", default="2,32", help="comma-separated batch sizes")
    parser.add_argument("--voc-root", default=str(ROOT.parent / "shared" / "voc" / "VOCdevkit"),
                        help="VOCdevkit folder (default: ../shared/voc/VOCdevkit beside the checkout)")
    args = parser.parse_args()
    overrides = {"data.split": "val", "data.limit": args.images, "model.head": "imagenet",
                 "model.checkpoint": None, "data.voc_root": args.voc_root}
    config = load_config(CONFIG, overrides)
    dataset, loaded = open_dataset(config), load_classifier(config)
    model, layer = loaded.model, config.cams.layer or default_layer(loaded.model)
    seen = {}
    resolve_layer(model, layer)[1].register_forward_hook(lambda _m, _i, out: seen.__setitem__("a", out))
    inputs = [loaded.preprocessing.batch([image])[0] for _, image, _ in dataset.read_images(dataset.image_ids)]
    with torch.no_grad():
        constant = []
        for x in inputs:
            model(x)
            flat = seen["a"][0].flatten(1)
            constant.append((flat.amax(1) == flat.amin(1)).float().mean().item())
    per_image = ", ".join(f"{100 * c:.0f}" for c in constant)
    print(f"{len(inputs)} val images, input shapes {sorted({tuple(x.shape[2:]) for x in inputs})}, layer {layer}: "
          f"{100 * statistics.mean(constant):.0f} % constant channels (per image {per_image})")
    classes = list(range(len(loaded.classes)))
    for batch_size in (int(v) for v in args.masked_batch.split(",")):
        seconds = []
        for x in inputs:
            start = time.perf_counter()
            compute_cams(model, x, classes, "scorecam", layer, batch_size=batch_size)
            seconds.append(time.perf_counter() - start)
        print(f"masked batch {batch_size:>3}: {statistics.median(seconds):7.1f} s/image (median; "
              f"{', '.join(f'{s:.1f}' for s in seconds)})", flush=True)


if __name__ == "__main__":
    main()
