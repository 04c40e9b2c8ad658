"""Speed of the cams stage against its float32 NCHW floor, per model and execution mode (README "Speed").

Every measurement runs in a fresh child process (its own allocator state and thread pool; its peak RSS is the
mode's peak memory), on the first N images of VOC2007 val, Grad-CAM of all 20 classes at the model's default
layer, batches of 16 planned as the cams stage plans them:

  floor         read + PIL decode + gradloc's preprocessing + one float32 NCHW no-grad forward per batch, in a
                plain loop (no decode workers, glibc's default allocator): the network run the plain way
  floor, kept   the same loop with gradloc's allocator setting (``keep_freed_memory``)
  forward CL    the same loop with the model and inputs in channels_last (and the allocator setting)
  forward bf16  the same loop as forward CL under bfloat16 autocast
  cams NCHW     ``plan_cams(...).run()`` into an empty cache with --no-channels-last: float32 NCHW, as before
  cams          the stage in its default mode (the family's memory format, float32)
  cams --amp    the stage with --amp (bfloat16 up to the target layer on a CPU with native bfloat16)

The modes run in rounds, each mode once per round in turn (round k starts with the k-th mode), so load from
other processes falls on all of them alike. The table gives the median images/s (wall clock) over rounds, the
median over rounds of (wall time per image / the same round's floor wall time per image), the same ratio of CPU
time (user + system of all threads and child processes) and the largest peak RSS of the main process. With
``OMP_NUM_THREADS=1`` the CPU time is the work itself; with more threads it also counts threads spinning while
they wait for a preempted one, so on a shared machine both clocks carry other users' load.

EfficientNet-Lite0 runs as the recommended configuration runs it (real ImageNet weights, 320-px short side; the
``imagenet`` head unless ``--checkpoint`` gives the ``voc+imagenet`` head of configs/voc07.yaml: the same
network); ResNet50 and VGG16 (224 letterbox) and the demo CNN (128) have random weights (timing only). The last
lines extrapolate the recommended configuration to the 4,952 images of VOC2007 test: cams at the measured rate
plus boxes + scores (configs/voc07.yaml's 10 thresholds, every class explained) per image as measured after the
default-mode cams run (after a warm-up on 4 images that loads numba's kernels). The load average of the machine
is printed before and after each table (other users' processes share the cores).

Other measurements (each prints its own table):

  --families      per model family, all-class Grad-CAM of a random batch at the family's native input size:
                  channels_last and bfloat16 against NCHW float32, interleaved repeats in one process (the
                  evidence for gradloc.models.registry.CHANNELS_LAST_FAMILIES)
  --workers LIST  the default-mode cams stage with each number of decode workers, in rounds
  --decode        PIL against torchvision.io.decode_jpeg on the same JPEG files: CPU time per image (1 thread) and
                  whether the pixels are identical

Usage::

    python scripts/bench_pipeline.py --voc-root ../shared/voc/VOCdevkit                  # 4 models, 96 images, 3 rounds
    python scripts/bench_pipeline.py --models efficientnet_lite0 --images 200 --rounds 5 --checkpoint HEAD.pt
    python scripts/bench_pipeline.py --families --workers 0,1,2 --decode --no-stage    # the other tables
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradloc.cams.loader import plan_batches
from gradloc.cams.methods import compute_cams
from gradloc.datasets.voc import VOC_CLASSES, VOCDataset
from gradloc.models.build import LoadedModel, build_architecture
from gradloc.models.execution import Execution, cpu_has_bfloat16, keep_freed_memory
from gradloc.models.zoo import get_spec
from gradloc.run.boxes import run_boxes
from gradloc.run.cams import plan_cams
from gradloc.run.config import RunConfig, load_config, open_dataset
from gradloc.run.score import score_run_folder
from gradloc.run.setup import load_classifier

ROOT = Path(__file__).resolve().parents[1]
RECOMMENDED = ROOT / "configs" / "voc07.yaml"
VOC07_TEST_IMAGES = 4952

# model -> (input size, resize mode); EfficientNet-Lite0 is the recommended configuration's network
MODELS = {"efficientnet_lite0": (320, "shortside"), "resnet50": (224, "letterbox"), "vgg16": (224, "letterbox"),
          "demo_cnn": (128, "letterbox")}

# mode -> (label, how the child runs it)
MODES = {
    "floor": "floor: float32 NCHW forward, plain loop",
    "floor_kept": "floor + allocator setting",
    "forward_cl": "forward, channels_last",
    "forward_bf16": "forward, channels_last + bfloat16",
    "cams_nchw": "cams stage, float32 NCHW (--no-channels-last)",
    "cams": "cams stage, default",
    "cams_amp": "cams stage, --amp",
}

# one model per family for --families: (registry name, family, input size)
FAMILY_MODELS = [("efficientnet_lite0", "efficientnet_lite", 224), ("resnet50", "resnet", 224),
                 ("vgg16", "vgg", 224), ("demo_cnn", "demo", 128), ("densenet121", "densenet", 224),
                 ("mobilenet_v2", "mobilenet_v2", 224), ("mobilenet_v3_large", "mobilenet_v3", 224),
                 ("efficientnet_b0", "efficientnet", 224), ("regnet_y_800mf", "regnet", 224),
                 ("convnext_tiny", "convnext", 224), ("shufflenet_v2_x1_0", "shufflenet_v2", 224),
                 ("mnasnet1_0", "mnasnet", 224), ("googlenet", "googlenet", 224),
                 ("inception_v3", "inception_v3", 299), ("alexnet", "alexnet", 224)]


# --- the child process ----------------------------------------------------------------------------------------------


def run_config(voc_root: str, model: str, images: int, folder: Path, checkpoint: str | None) -> RunConfig:
    """The recommended configuration (configs/voc07.yaml) with the model's input and head, on val."""
    size, resize = MODELS[model]
    head = "voc+imagenet" if checkpoint and model == "efficientnet_lite0" else (
        "imagenet" if model == "efficientnet_lite0" else "voc")
    return load_config(RECOMMENDED, {
        "data.voc_root": voc_root, "data.split": "val", "data.limit": images, "model.name": model,
        "model.head": head, "model.checkpoint": checkpoint if head == "voc+imagenet" else None,
        "model.input_size": size, "model.resize_mode": resize, "cache_dir": str(folder / "cache"),
        "out": str(folder / "results"), "name": model})


def classifier(config: RunConfig) -> LoadedModel:
    """The configured classifier; random weights (and a 20-class voc head) except for EfficientNet-Lite0."""
    if config.model.head != "voc":
        return load_classifier(config)
    spec = get_spec(config.model.name)
    pre = dataclasses.replace(spec.preprocessing, input_size=config.model.input_size,
                              resize_mode=config.model.resize_mode)
    return LoadedModel(build_architecture(config.model.name).eval(), list(VOC_CLASSES), pre, "logit",
                       {"arch": spec.name, "family": spec.family, "weights": "random (benchmark)"})


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Timer:
    """Wall and CPU seconds of a block."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def loop_time(config: RunConfig, loaded: LoadedModel, execution: Execution) -> Timer:
    """Read + decode + preprocessing + one no-grad forward per planned batch, in a plain loop."""
    dataset = open_dataset(config)
    model = execution.model(loaded.model)
    with Timer() as timer, torch.no_grad(), execution.autocast():
        for batch in plan_batches(dataset, loaded.preprocessing, config.cams.batch_size):
            inputs, _ = loaded.preprocessing.batch([dataset.read_image(i)[0] for i in batch], execution.channels_last)
            model(execution.inputs(inputs))
    return timer


def child(mode: str, voc_root: str, model: str, images: int, folder: str, checkpoint: str | None,
          workers: int | None) -> dict[str, Any]:
    config = run_config(voc_root, model, images, Path(folder), checkpoint)
    config = dataclasses.replace(config, cams=dataclasses.replace(config.cams, workers=workers))
    loaded = classifier(config)
    cpu = torch.device("cpu")
    row: dict[str, Any] = {"mode": mode, "images": images}
    if mode.startswith(("floor", "forward")):
        if mode != "floor":
            keep_freed_memory()
        precision = "bfloat16" if mode == "forward_bf16" else "float32"
        timer = loop_time(config, loaded, Execution(cpu, "contiguous" if mode.startswith("floor") else
                                                    "channels_last", precision))
    else:
        cams = {"cams_nchw": {"channels_last": False}, "cams": {}, "cams_amp": {"amp": True}}[mode]
        config = dataclasses.replace(config, cams=dataclasses.replace(config.cams, **cams))
        plan = plan_cams(config, loaded=loaded)
        row["execution"] = plan.execution.describe()
        with Timer() as timer:
            cache, dataset = plan.run()
        if mode == "cams" and model == "efficientnet_lite0":
            warm = dataclasses.replace(config, name="warm-up", data=dataclasses.replace(config.data, limit=4))
            run_boxes(warm, cache, open_dataset(warm))  # loads numba's compiled kernels: once per process
            with Timer() as boxes:
                run_boxes(config, cache, dataset)
                score_run_folder(config.run_dir, config.score.iou, config.score.metric)
            row["boxes_scores_seconds"], row["boxes_scores_cpu"] = boxes.wall, boxes.cpu
    row["seconds"], row["cpu"] = timer.wall, timer.cpu
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def spawn(mode: str, args: argparse.Namespace, model: str, folder: Path, workers: int | None = None) -> dict:
    command = [sys.executable, __file__, "--child", mode, model, str(folder), "--voc-root", args.voc_root,
               "--images", str(args.images)]
    command += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    command += ["--child-workers", str(workers)] if workers is not None else []
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} {model} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the tables -----------------------------------------------------------------------------------------------------


def load() -> str:
    """The 1, 5 and 15-minute load averages."""
    return ", ".join(f"{value:.1f}" for value in os.getloadavg())


def stage_table(args: argparse.Namespace, tmp: Path) -> None:
    modes = list(MODES) if cpu_has_bfloat16() else [m for m in MODES if "bf16" not in m and "amp" not in m]
    print(f"\nVOC2007 val, first {args.images} images, Grad-CAM of all 20 classes, batches of 16, "
          f"{args.rounds} rounds; each cell: img/s (wall, median over rounds), wall time per image / the floor's "
          "and CPU time per image / the floor's (medians over rounds of the ratio within a round), peak RSS of "
          "the main process (max over rounds)")
    print(f"load average {load()}")
    print("| model | input | " + " | ".join(MODES[m] for m in modes) + " |")
    print("|---|---|" + "---|" * len(modes))
    for model in args.models.split(","):
        rows: dict[str, list[dict]] = {m: [] for m in modes}
        for k in range(args.rounds):
            for mode in modes[k % len(modes):] + modes[:k % len(modes)]:  # each round starts one mode later
                rows[mode].append(spawn(mode, args, model, tmp / f"{model}-{mode}-{k}"))
        cells = []
        for mode in modes:
            pairs = list(zip(rows[mode], rows["floor"], strict=True))
            wall = statistics.median(r["seconds"] / f["seconds"] for r, f in pairs)
            cpu = statistics.median(r["cpu"] / f["cpu"] for r, f in pairs)
            rate = statistics.median(r["images"] / r["seconds"] for r in rows[mode])
            memory = max(r["peak_rss_mb"] for r in rows[mode])
            ratios = "" if mode == "floor" else f", {wall:.2f}x wall, {cpu:.2f}x CPU"
            cells.append(f"{rate:.2f} img/s{ratios}, {memory:.0f} MB")
        size, resize = MODELS[model]
        print(f"| {model} | {size} {resize} | " + " | ".join(cells) + " |", flush=True)
        print(f"(load average {load()})")
        if model == "efficientnet_lite0":
            extrapolate(rows, modes)


def extrapolate(rows: dict[str, list[dict]], modes: list[str]) -> None:
    """The recommended configuration on VOC2007 test at the measured rates (wall, medians over rounds)."""
    boxes = statistics.median(r["boxes_scores_seconds"] / r["images"] for r in rows["cams"])
    for mode in (m for m in ("cams", "cams_amp") if m in modes):
        cams = statistics.median(r["seconds"] / r["images"] for r in rows[mode])
        print(f"recommended configuration, {MODES[mode]}: VOC2007 test ({VOC07_TEST_IMAGES} images) ≈ "
              f"{VOC07_TEST_IMAGES * cams / 60:.1f} min cams + {VOC07_TEST_IMAGES * boxes / 60:.1f} min boxes and "
              f"scores = {VOC07_TEST_IMAGES * (cams + boxes) / 60:.1f} min (cams {cams:.3f} s/img, boxes + scores "
              f"{boxes:.3f} s/img, wall, medians over rounds)")


def families_table(args: argparse.Namespace) -> None:
    keep_freed_memory()
    modes = [("contiguous", "float32"), ("channels_last", "float32")]
    if cpu_has_bfloat16():
        modes += [("contiguous", "bfloat16"), ("channels_last", "bfloat16")]
    print(f"\nall-class Grad-CAM (20 classes) of a random batch of 8, random weights, {torch.get_num_threads()} "
          f"threads, {args.rounds} interleaved repeats after one warm-up; ms per image (median) and the median "
          f"ratio to float32 NCHW; load average {load()}")
    print("| family (model, input) | " + " | ".join(f"{p} {m}" for m, p in modes) + " |")
    print("|---|" + "---|" * len(modes))
    for name, family, size in FAMILY_MODELS:
        model = build_architecture(name).eval()
        images = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
        times: dict[tuple[str, str], list[float]] = {mode: [] for mode in modes}
        for k in range(args.rounds + 1):
            for mode in modes:
                execution = Execution(torch.device("cpu"), *mode)
                net, inputs = execution.model(model), execution.inputs(images)
                start = time.perf_counter()
                with execution.autocast():
                    compute_cams(net, inputs, list(range(20)))
                if k:
                    times[mode].append((time.perf_counter() - start) / len(images))
        base = times[modes[0]]
        cells = [f"{1000 * statistics.median(t):.1f} ms" + ("" if mode == modes[0] else
                 f" ({statistics.median(a / b for a, b in zip(t, base, strict=True)):.2f}x)")
                 for mode, t in times.items()]
        print(f"| {family} ({name}, {size}) | " + " | ".join(cells) + " |", flush=True)


def workers_table(args: argparse.Namespace, tmp: Path) -> None:
    counts = [int(w) for w in args.workers.split(",")]
    model = args.models.split(",")[0]
    print(f"\ncams stage (default mode) of {model}, first {args.images} val images, by decode workers "
          f"({args.rounds} rounds, {torch.get_num_threads()} torch threads, load average {load()}): median img/s")
    seconds: dict[int, list[float]] = {w: [] for w in counts}
    for k in range(args.rounds):
        for w in counts[k % len(counts):] + counts[:k % len(counts)]:
            row = spawn("cams", args, model, tmp / f"workers{w}-{k}", workers=w)
            seconds[w].append(row["seconds"] / row["images"])
    print("| workers | " + " | ".join(str(w) for w in counts) + " |\n|---|" + "---|" * len(counts))
    print("| img/s | " + " | ".join(f"{statistics.median(1 / t for t in s):.2f}" for s in seconds.values()) + " |")


def decode_table(args: argparse.Namespace) -> None:
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    torch.set_num_threads(1)
    dataset = VOCDataset(args.voc_root, "2007", "val", limit=args.images)
    data = [dataset.image_path(i).read_bytes() for i in dataset.image_ids]

    def cpu_ms(decode) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            for raw in data:
                decode(raw)
            best = min(best, time.process_time() - start)
        return 1000 * best / len(data)

    def pil(raw: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(raw)) as image:
            return np.asarray(image.convert("RGB"))

    def tv(raw: bytes) -> np.ndarray:
        return decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB
                           ).permute(1, 2, 0).numpy()

    same = sum(np.array_equal(pil(raw), tv(raw)) for raw in data)
    print(f"\nJPEG decode of {len(data)} VOC2007 val files, 1 thread, CPU ms per image (best of 3): PIL "
          f"{cpu_ms(pil):.2f}, torchvision.io.decode_jpeg {cpu_ms(tv):.2f}; identical pixels {same} of {len(data)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voc-root", default=str(ROOT.parent / "shared" / "voc" / "VOCdevkit"))
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoint", help="voc+imagenet head of configs/voc07.yaml for EfficientNet-Lite0")
    parser.add_argument("--no-stage", action="store_true", help="skip the per-model stage table")
    parser.add_argument("--families", action="store_true")
    parser.add_argument("--workers", help="comma-separated decode worker counts to compare, e.g. 0,1,2")
    parser.add_argument("--decode", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "MODEL", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--child-workers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, model, folder = args.child
        print(json.dumps(child(mode, args.voc_root, model, args.images, folder, args.checkpoint, args.child_workers)))
        return
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").is_file() else "unknown CPU"
    print(f"{cpu}; {torch.get_num_threads()} torch threads; native bfloat16: {cpu_has_bfloat16()}; torch "
          f"{torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_stage:
            stage_table(args, Path(tmp))
        if args.families:
            families_table(args)
        if args.workers:
            workers_table(args, Path(tmp))
    if args.decode:
        decode_table(args)


if __name__ == "__main__":
    main()
