"""Throughput of the cams stage on real VOC images, beside the sequential floor and a per-class loop.

For each model (random weights: timing only), on the first N images of VOC2007 val (default 200, 224x224
letterbox, Grad-CAM at the default layer, all 20 classes):

* floor -- a plain loop: decode + preprocess + one no-grad forward per image (batch 1), images/s;
* cams -- ``gradloc.run.pipeline.run_cams`` into an empty cache (DataLoader workers, planned batches), images/s
  and its time per image as a multiple of the floor's;
* per-class loop -- the way per-target Grad-CAM tools (pytorch-grad-cam style) work: per image and per
  class, one forward with autograd and one backward (``compute_cams`` with one class, batch 1), on the first
  ``--per-class-images`` images, images/s;
* boxes + scores -- ``run_boxes`` (GT-known classes, 5 thresholds, baselines) + ``score_run_folder``, as a
  share of the cams time.

Then the peak RSS of a child process running cams + boxes + scores (EfficientNet-Lite0) on N and on 5N images
(the N images repeated under new ids through symlinks), to show memory does not grow with the split.

Usage::

    python scripts/bench_pipeline.py                       # 200 images, both models, RSS at 200 / 1000
    python scripts/bench_pipeline.py --images 20 --models efficientnet_lite0 --no-rss   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gradloc.datasets.voc import VOC_CLASSES
from gradloc.models.build import LoadedModel, build_architecture
from gradloc.models.preprocessing import Preprocessing
from gradloc.models.zoo import get_spec
from gradloc.run.boxes import run_boxes
from gradloc.run.cams import plan_cams
from gradloc.run.config import load_config, open_dataset
from gradloc.run.score import score_run_folder

VOC_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "voc" / "VOCdevkit"


def make_config(voc_root: Path, n_images: int, model: str, folder: Path):
    return load_config(None, {
        "data.voc_root": str(voc_root), "data.year": "2007", "data.split": "val", "data.limit": n_images,
        "model.name": model, "model.input_size": 224, "model.resize_mode": "letterbox",
        "boxes.explain": "gt", "boxes.thresholds": (0.01, 0.02, 0.06, 0.15, 0.2),
        "cache_dir": str(folder / "cache"), "out": str(folder / "results"), "name": model,
    })


def random_classifier(name: str) -> LoadedModel:
    """The architecture with random weights and a 20-class voc head, at 224x224 letterbox."""
    spec = get_spec(name)
    pre = Preprocessing(224, "letterbox", spec.preprocessing.mean, spec.preprocessing.std)
    return LoadedModel(build_architecture(name).eval(), list(VOC_CLASSES), pre, "logit",
                       {"arch": name, "weights": "random (benchmark)"})


def floor_rate(config, loaded: LoadedModel) -> float:
    """Images/s of decode + preprocess + one no-grad forward per image, in a plain loop."""
    dataset = open_dataset(config)
    with torch.no_grad():  # warm-up (allocator, kernel selection), not timed
        loaded.model(torch.from_numpy(loaded.preprocessing(dataset.read_image(dataset.image_ids[0])[0])[0])[None])
    start = time.perf_counter()
    with torch.no_grad():
        for image_id in dataset.image_ids:
            image, _ = dataset.read_image(image_id)
            array, _ = loaded.preprocessing(image)
            loaded.model(torch.from_numpy(array)[None])
    return len(dataset) / (time.perf_counter() - start)


def per_class_rate(config, loaded: LoadedModel, layer: str, n_images: int) -> float:
    """Images/s of one forward + backward per (image, class), batch 1."""
    from gradloc.cams.methods import compute_cams

    dataset = open_dataset(dataclasses.replace(config, data=dataclasses.replace(config.data, limit=n_images)))
    start = time.perf_counter()
    for image_id in dataset.image_ids:
        image, _ = dataset.read_image(image_id)
        inputs = torch.from_numpy(loaded.preprocessing(image)[0])[None]
        for c in range(len(loaded.classes)):
            compute_cams(loaded.model, inputs, [c], method="gradcam", layer=layer)
    return len(dataset) / (time.perf_counter() - start)


def stage_times(config, loaded: LoadedModel) -> tuple[int, float, float]:
    """(images, cams seconds into an empty cache, boxes + scores seconds)."""
    start = time.perf_counter()
    cache, dataset = plan_cams(config, loaded=loaded).run()
    cams_seconds = time.perf_counter() - start
    start = time.perf_counter()
    run_boxes(config, cache, dataset)
    score_run_folder(config.run_dir, config.score.iou, config.score.metric)
    return len(dataset), cams_seconds, time.perf_counter() - start


def repeated_devkit(voc_root: Path, n_images: int, copies: int, folder: Path) -> Path:
    """A VOCdevkit whose val split is the first ``n_images`` of VOC2007 val ``copies`` times, under new ids
    (symlinked JPEGs and annotations)."""
    source = voc_root / "VOC2007"
    ids = (source / "ImageSets" / "Main" / "val.txt").read_text().split()[:n_images]
    base = folder / f"VOCdevkit_x{copies}" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(copies):
        for image_id in ids:
            name = f"{image_id}r{k}"
            names.append(name)
            for sub, ext in (("JPEGImages", "jpg"), ("Annotations", "xml")):
                link = base / sub / f"{name}.{ext}"
                if not link.exists():
                    link.symlink_to(source / sub / f"{image_id}.{ext}")
    (base / "ImageSets" / "Main" / "val.txt").write_text("\n".join(names) + "\n")
    return base.parent


def rss_child(voc_root: str, n_images: int, folder: str) -> None:
    """Child process: cams + boxes + scores on the split; prints JSON with its peak RSS."""
    config = make_config(Path(voc_root), n_images, "efficientnet_lite0", Path(folder))
    images, cams_seconds, box_seconds = stage_times(config, random_classifier("efficientnet_lite0"))
    print(json.dumps({"images": images, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "cams_s": cams_seconds, "boxes_scores_s": box_seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--models", default="efficientnet_lite0,resnet50")
    parser.add_argument("--per-class-images", type=int, default=10)
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--voc-root", default=str(VOC_ROOT))
    parser.add_argument("--rss-child", nargs=3, metavar=("VOC_ROOT", "N", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]), args.rss_child[2])
        return
    print(f"torch threads {torch.get_num_threads()}; VOC2007 val, first {args.images} images, 224 letterbox, "
          "Grad-CAM of all 20 classes, random weights")
    print("| model | floor img/s | cams img/s | cams / floor (time per image) | per-class loop img/s | "
          "boxes+scores (5 τ) / cams time |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            config = make_config(Path(args.voc_root), args.images, name, Path(tmp) / name)
            loaded = random_classifier(name)
            floor = floor_rate(config, loaded)
            images, cams_seconds, box_seconds = stage_times(config, loaded)
            cams = images / cams_seconds
            from gradloc.cams.layers import default_layer

            per_class = per_class_rate(config, loaded, default_layer(loaded.model), args.per_class_images)
            print(f"| {name} | {floor:.1f} | {cams:.1f} | {floor / cams:.2f}x | {per_class:.2f} | "
                  f"{100 * box_seconds / cams_seconds:.0f} % |", flush=True)
        if not args.no_rss:
            print("\n| images (EfficientNet-Lite0, cams + boxes + scores in a fresh process) | peak RSS MB | "
                  "cams s | boxes+scores s |\n|---|---|---|---|")
            for copies in (1, 5):
                root = repeated_devkit(Path(args.voc_root), args.images, copies, Path(tmp))
                out = subprocess.run([sys.executable, __file__, "--rss-child", str(root), str(args.images * copies),
                                      str(Path(tmp) / f"rss{copies}")], capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {row['images']} | {row['peak_rss_mb']:.0f} | {row['cams_s']:.1f} | "
                      f"{row['boxes_scores_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
