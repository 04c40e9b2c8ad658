"""Benchmark of the all-class CAM engine against a plain forward pass and a naive per-class loop.

Measures, on the CPU with random weights (batch 8, 224x224, 20 classes by default), the time of
``gradloc.cams.methods.compute_cams`` for all classes divided by the time of a no-grad forward of the same batch, for
ResNet50 at ``layer4`` (GAP + linear head: closed-form gradients, plus the same model through autograd) and
VGG16 at ``features.29``, next to a naive per-class loop (per class: one full forward with autograd and a
backward to the layer, the way per-target Grad-CAM implementations work).

VGG16's layer is ``features.29``: the ReLU after the last convolution (conv5_3), the 14x14 rectified feature
map the Grad-CAM paper uses for VGG-16. ``features.30`` (the max-pool after it) would halve the resolution
to 7x7, which costs localization, to save only the max-pool backward.

Targets: ResNet50 <= 1.10x and VGG16 <= 1.35x for Grad-CAM. Forward and CAM runs are interleaved and the
reported ratio is the median over repeats of (CAM time / forward time of the same repeat), which is robust to
load drifting on a shared machine.

What dominates the cost beyond the forward: nothing for ResNet50 with the closed form (no backward at all)
and the map arithmetic on [K, B, 2048, 7, 7] gradients for Grad-CAM++ & co.; for VGG16 the batched backward
through max-pool, adaptive average pool and the 25088 -> 4096 classifier for K x B cotangents. The engine
runs that backward with ``torch.func.vmap`` over ``torch.autograd.grad``: ``is_grads_batched=True`` (legacy
vmap) loops over the classes in the pooling backward ops, which measured 1.47x instead of 1.21x on VGG16
under the same CPU contention.

Usage::

    python scripts/bench_cams.py            # full run (several minutes on 2 cores)
    python scripts/bench_cams.py --quick    # smoke run: batch 2, 112x112, 2 repeats
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torchvision
from torch import Tensor, nn

from gradloc.cams.layers import resolve_layer
from gradloc.cams.methods import compute_cams

METHODS = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam"]


def build_resnet50(num_classes: int, closed_form: bool) -> nn.Module:
    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Linear(2048, num_classes)
    model.gradloc_layer = "layer4"
    model.gradloc_gap_linear = ("layer4", "fc") if closed_form else None
    return model.eval()


def build_vgg16(num_classes: int) -> nn.Module:
    model = torchvision.models.vgg16(weights=None)
    model.classifier[-1] = nn.Linear(4096, num_classes)
    model.gradloc_layer = "features.29"
    model.gradloc_gap_linear = None
    return model.eval()


# key -> (model, layer, gradient path, builder taking the number of classes)
SETUPS: dict[str, tuple[str, str, str, Callable[[int], nn.Module]]] = {
    "resnet50": ("resnet50", "layer4", "closed form", lambda n: build_resnet50(n, closed_form=True)),
    "resnet50-autograd": ("resnet50", "layer4", "autograd", lambda n: build_resnet50(n, closed_form=False)),
    "vgg16": ("vgg16", "features.29", "autograd", build_vgg16),
}


def naive_gradcam(model: nn.Module, images: Tensor, classes: list[int], layer: str) -> Tensor:
    """Per class: one full forward with autograd, a backward to the layer, Grad-CAM. Maps [B, K, h, w]."""
    module = resolve_layer(model, layer)[1]
    maps = []
    for cls in classes:
        store: dict[str, Tensor] = {}

        def keep(mod: nn.Module, inputs: object, output: Tensor, store: dict[str, Tensor] = store) -> Tensor:
            store["a"] = output
            return output.clone()

        handle = module.register_forward_hook(keep)
        try:
            scores = model(images)
        finally:
            handle.remove()
        (grad,) = torch.autograd.grad(scores[:, cls].sum(), store["a"])
        weights = grad.mean(dim=(2, 3), keepdim=True)
        maps.append((weights * store["a"].detach()).sum(1).relu())
    return torch.stack(maps, dim=1)


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward(model: nn.Module, images: Tensor) -> None:
    with torch.no_grad():
        model(images)


def paired(model: nn.Module, images: Tensor, run: Callable[[], object],
           repeats: int) -> tuple[float, float, float]:
    """Interleave forward and ``run``; return median forward s, median run s, median per-repeat ratio."""
    forward(model, images)  # warm-up
    run()
    fwd, cams = [], []
    for _ in range(repeats):
        fwd.append(seconds(lambda: forward(model, images)))
        cams.append(seconds(run))
    ratios = [c / f for c, f in zip(cams, fwd, strict=True)]
    return statistics.median(fwd), statistics.median(cams), statistics.median(ratios)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 2, 112x112, 2 repeats")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="paired repeats per method (median)")
    parser.add_argument("--naive-repeats", type=int, default=1, help="repeats of the naive per-class loop")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=list(SETUPS), default=list(SETUPS),
                        help="which setups to run (default: all)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.repeats, args.naive_repeats = 2, 112, 2, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    classes = list(range(args.classes))
    load_before = os.getloadavg()[0]
    rows = []
    for key in args.models:
        name, layer, path, build = SETUPS[key]
        model = build(args.classes)
        naive = ""
        if path == "autograd":
            fwd, run, ratio = paired(
                model, images, lambda m=model, lay=layer: naive_gradcam(m, images, classes, lay),
                args.naive_repeats)
            naive = f"{ratio:.2f}x"
        for method in METHODS:
            fwd, run, ratio = paired(
                model, images,
                lambda m=model, me=method, lay=layer: compute_cams(m, images, classes, me, lay), args.repeats)
            rows.append([name, layer, path, method, f"{1000 * fwd:.0f}", f"{1000 * run:.0f}", f"{ratio:.3f}x",
                         naive if method == "gradcam" else ""])
    header = ["model", "layer", "gradients", "method", "forward ms", "cams ms", "ratio", "naive-loop ratio"]
    print(f"CPU, {args.threads} threads, batch {args.batch}, {args.size}x{args.size}, {args.classes} "
          f"classes, random weights, median of {args.repeats} paired repeats "
          f"(naive loop: {args.naive_repeats}); torch {torch.__version__}; "
          f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    flags = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\ncommand: python scripts/bench_cams.py {flags}".rstrip())


if __name__ == "__main__":
    main()
