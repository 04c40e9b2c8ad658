"""Sample grids: images with their heatmaps, ground-truth boxes and predicted boxes (matplotlib, no screen).

``gradloc show`` draws a seeded random sample of the images of a run (those with at least one detection or
GT box). Each row is one image: the image with every GT box (green, dashed when ``difficult``) and every
predicted box at the chosen threshold (red, labelled ``class confidence IoU``: the IoU with the best GT box
of the same class, difficult included, as the devkit's matching sees it), then one panel per explained
class with the class's heatmap overlaid (``heat / max(heat)``, colour bar) and the threshold's contour,
and with ``--guided`` a Guided Grad-CAM panel per class (the model is rebuilt from the run's config).
Without a run folder (:func:`show_detections`), the panels show boxes only.

Coordinates. Images are drawn with ``extent = (0, W, H, 0)``: the axes' units are pixel *edges*, pixel
``u`` (0-based) covers ``[u, u + 1)``. A VOC box (1-based, inclusive) covers pixels ``x1 .. x2``, i.e. the
edge interval ``[x1 - 1, x2)``, so it is drawn as the rectangle with corner ``(x1 - 1, y1 - 1)``, width
``x2 - x1 + 1`` and height ``y2 - y1 + 1`` (:func:`voc_box_to_rect`). With matplotlib's default extent
``[-0.5, W - 0.5]`` the same box would start at ``x1 - 1.5``; gradloc always passes the explicit extent.

Figures are :class:`matplotlib.figure.Figure` objects made without pyplot (no global state, Agg backend).
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from gradloc.detections import Detections, GroundTruth, load_detections
from gradloc.metrics import iou_matrix

logger = logging.getLogger(__name__)

GT_COLOR = "#00d000"
PRED_COLOR = "#ff1a1a"
HEAT_CMAP = "jet"
GUIDED_CMAP = "inferno"
GUIDED_PERCENTILE = 99.5  # Guided Grad-CAM maps are heavy-tailed: display them relative to this percentile
PANEL_INCHES = (3.2, 2.6)  # width, height of one panel
TITLE_INCHES = 0.7  # figure title band; plus 0.3 in for the legend band at the bottom
DPI = 100


# --- coordinates --------------------------------------------------------------------------------------------


def image_extent(width: int, height: int) -> tuple[float, float, float, float]:
    """``imshow`` extent putting pixel edges on integer coordinates: pixel ``u`` covers ``[u, u + 1)``.

    Returns:
        ``(left, right, bottom, top) = (0, W, H, 0)`` (y grows downwards, as in the image).
    """
    return 0.0, float(width), float(height), 0.0


def voc_box_to_rect(box: Sequence[float] | np.ndarray) -> tuple[float, float, float, float]:
    """The rectangle covering a VOC box's pixels, in the coordinates of :func:`image_extent`.

    A VOC box ``[x1, y1, x2, y2]`` (1-based, inclusive) covers 0-based pixels ``x1 - 1 .. x2 - 1``, whose
    edges span ``[x1 - 1, x2)``.

    Args:
        box: float[4] ``[x1, y1, x2, y2]``, VOC convention.

    Returns:
        ``(x, y, width, height) = (x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1)`` for
        ``matplotlib.patches.Rectangle``.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    return x1 - 1.0, y1 - 1.0, x2 - x1 + 1.0, y2 - y1 + 1.0


def best_gt_iou(det_boxes: np.ndarray, det_labels: np.ndarray, gt_boxes: np.ndarray,
                gt_labels: np.ndarray) -> np.ndarray:
    """IoU of each detection with its best GT box of the same class (difficult boxes included).

    Args:
        det_boxes: float64[N, 4]; det_labels: int64[N] (detections of one image).
        gt_boxes: float64[M, 4]; gt_labels: int64[M] (GT of the same image).

    Returns:
        float64[N], ``max_j IoU(det_i, gt_j)`` over ``gt_j`` of the same class; NaN when there is none.
    """
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    out = np.full(len(det_boxes), np.nan)
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return out
    same = np.asarray(det_labels)[:, None] == np.asarray(gt_labels)[None, :]
    iou = np.where(same, iou_matrix(det_boxes, gt_boxes), -np.inf)
    best = iou.max(axis=1)
    out[np.isfinite(best)] = best[np.isfinite(best)]
    return out


def sample_images(dets: Detections, gt: GroundTruth, n: int, seed: int) -> np.ndarray:
    """A seeded random sample of images that have at least one detection or GT box.

    Args:
        dets, gt: detections and ground truth on the same image list.
        n: sample size (all candidates when fewer).
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        int64[min(n, candidates)] image indices, ascending.

    Raises:
        ValueError: ``n < 1``, or no image has a detection or GT box.
    """
    if n < 1:
        raise ValueError(f"--n {n}: the number of images to show must be at least 1")
    candidates = np.union1d(dets.image_index, gt.image_index).astype(np.int64)
    if candidates.size == 0:
        raise ValueError("no image has a detection or a GT box; nothing to show")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=min(n, candidates.size), replace=False))


# --- what one row of the grid shows -------------------------------------------------------------------------


@dataclass
class HeatPanel:
    """One class's map over one image.

    Attributes:
        label: class index; title: panel title.
        heat: float32[h, w] on a grid over the whole image (any resolution), in [0, 1] for display.
        level: contour level in the same units as ``heat`` (None: no contour).
        cmap, colorbar_label: how to draw it; overlay: blend it over the image (else draw it alone).
    """

    label: int
    title: str
    heat: np.ndarray
    level: float | None
    cmap: str = HEAT_CMAP
    colorbar_label: str = "heat / max(heat)"
    overlay: bool = True


@dataclass
class Sample:
    """Everything drawn in one row: the image (uint8[H, W, 3]), its boxes and its heatmap panels."""

    image_id: str
    image: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_difficult: np.ndarray
    det_boxes: np.ndarray
    det_labels: np.ndarray
    det_scores: np.ndarray
    det_iou: np.ndarray
    panels: list[HeatPanel] = field(default_factory=list)


def make_sample(image_id: str, image: np.ndarray, index: int, dets: Detections, gt: GroundTruth) -> Sample:
    """Collect the boxes of image ``index`` (into ``gt.image_ids``) and the IoU of each prediction."""
    g = gt.image_index == index
    d = dets.image_index == index
    return Sample(
        image_id=image_id, image=image, gt_boxes=gt.boxes[g], gt_labels=gt.labels[g],
        gt_difficult=gt.difficult[g],
        det_boxes=dets.boxes[d], det_labels=dets.labels[d], det_scores=dets.scores[d],
        det_iou=best_gt_iou(dets.boxes[d], dets.labels[d], gt.boxes[g], gt.labels[g]),
    )


# --- drawing ------------------------------------------------------------------------------------------------


def _draw_boxes(ax: Any, sample: Sample, classes: Sequence[str], only: int | None = None) -> None:
    """GT (green, dashed if difficult, name at the bottom-left) and predictions (red, ``name conf IoU``)."""
    font = {"fontsize": 6, "clip_on": True}
    for box, label, difficult in zip(sample.gt_boxes, sample.gt_labels, sample.gt_difficult, strict=True):
        if only is not None and label != only:
            continue
        x, y, w, h = voc_box_to_rect(box)
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=GT_COLOR, linewidth=1.4,
                               linestyle="--" if difficult else "-"))
        ax.text(x, y + h, classes[label] + (" (difficult)" if difficult else ""), color="black", va="bottom",
                ha="left", bbox={"facecolor": GT_COLOR, "alpha": 0.75, "pad": 1, "linewidth": 0}, **font)
    for box, label, score, iou in zip(sample.det_boxes, sample.det_labels, sample.det_scores, sample.det_iou,
                                      strict=True):
        if only is not None and label != only:
            continue
        x, y, w, h = voc_box_to_rect(box)
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=PRED_COLOR, linewidth=1.4))
        iou_text = "no GT" if np.isnan(iou) else f"IoU {iou:.2f}"
        ax.text(x, y, f"{classes[label]} {score:.2f} {iou_text}", color="white", va="top", ha="left",
                bbox={"facecolor": PRED_COLOR, "alpha": 0.75, "pad": 1, "linewidth": 0}, **font)


def _draw_heat(fig: Figure, ax: Any, sample: Sample, panel: HeatPanel, classes: Sequence[str]) -> None:
    height, width = sample.image.shape[:2]
    extent = image_extent(width, height)
    if panel.overlay:
        ax.imshow(sample.image, extent=extent, interpolation="nearest")
    im = ax.imshow(panel.heat, extent=extent, cmap=panel.cmap, alpha=0.5 if panel.overlay else 1.0, vmin=0.0,
                   vmax=1.0, interpolation="bilinear")
    if panel.level is not None and 0.0 < panel.level < 1.0 and np.ptp(panel.heat) > 0:
        rows, cols = panel.heat.shape
        xs = (np.arange(cols) + 0.5) * width / cols  # cell centres of the grid, in pixel-edge units
        ys = (np.arange(rows) + 0.5) * height / rows
        ax.contour(xs, ys, panel.heat, levels=[panel.level], colors="white", linewidths=0.8)
    _draw_boxes(ax, sample, classes, only=panel.label)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label(panel.colorbar_label, fontsize=6)
    bar.ax.tick_params(labelsize=6)
    ax.set_title(panel.title, fontsize=8)


def render_grid(samples: Sequence[Sample], classes: Sequence[str], title: str,
                columns: int | None = None) -> Figure:
    """Draw samples as a grid of panels.

    With heatmap panels, each sample is a row (image with all boxes, then its panels); without any, samples
    fill a grid of ``columns`` (default ``min(n, 4)``) image panels.

    Returns:
        A figure of ``n_cols * PANEL_INCHES[0]`` by ``n_rows * PANEL_INCHES[1] + TITLE_INCHES + 0.3`` inches
        at ``DPI``.
    """
    if not samples:
        raise ValueError("no samples to draw")
    per_row = max(len(s.panels) for s in samples)
    if per_row:
        n_rows, n_cols = len(samples), 1 + per_row
        cells = [[(s, None), *[(s, p) for p in s.panels]] for s in samples]
    else:
        n_cols = columns or min(len(samples), 4)
        n_rows = -(-len(samples) // n_cols)
        flat = [(s, None) for s in samples]
        cells = [flat[r * n_cols : (r + 1) * n_cols] for r in range(n_rows)]
    fig = Figure(figsize=(n_cols * PANEL_INCHES[0], n_rows * PANEL_INCHES[1] + TITLE_INCHES + 0.3), dpi=DPI)
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_axis_off()
            if c >= len(cells[r]):
                continue
            sample, panel = cells[r][c]
            if panel is None:
                height, width = sample.image.shape[:2]
                ax.imshow(sample.image, extent=image_extent(width, height), interpolation="nearest")
                _draw_boxes(ax, sample, classes)
                ax.set_title(sample.image_id, fontsize=8)
            else:
                _draw_heat(fig, ax, sample, panel, classes)
    handles = [Line2D([], [], color=GT_COLOR, label="ground truth"),
               Line2D([], [], color=GT_COLOR, linestyle="--", label="ground truth (difficult)"),
               Line2D([], [], color=PRED_COLOR, label="prediction: class, confidence, IoU with best GT")]
    if per_row:
        handles.append(Line2D([], [], color="0.6", label="threshold contour (white)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    width, height = fig.get_figwidth(), fig.get_figheight()
    fig.suptitle(textwrap.fill(title, width=int(width * 15)), fontsize=8, y=1 - 0.05 / height, va="top")
    fig.subplots_adjust(left=0.01, right=0.96, top=1 - TITLE_INCHES / height, bottom=0.3 / height,
                        wspace=0.15, hspace=0.25)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save a figure as PNG at its own size (no tight bounding box, so the pixel size is predictable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


# --- heatmaps of a run --------------------------------------------------------------------------------------


def open_run_cache(run: Any):  # (gradloc.runs.Run) -> gradloc.cache.HeatmapCache
    """The heatmap cache a run was made from (its manifest's ``cache_dir``)."""
    from gradloc.cache import HeatmapCache
    from gradloc.runs import MANIFEST_FILE

    root = run.manifest.get("cache_dir")
    if not root:
        raise ValueError(f"{run.path / MANIFEST_FILE}: no 'cache_dir'; the run kept no heatmap cache "
                         "(use --detections PKL --voc-root PATH for boxes only)")
    try:
        return HeatmapCache.open(root)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; it is the heatmap cache of run {run.path} (or use --detections PKL "
                                "--voc-root PATH for boxes only)") from None


def _display_heat(raw: np.ndarray, geometry: Any, max_side: int | None) -> np.ndarray:
    """Back-project a raw map onto the working grid the boxes were cut on; float32[h, w], heat / max."""
    from gradloc.geometry import upsample, working_size

    out_w, out_h = working_size(geometry.width, geometry.height, max_side)
    heat = upsample(raw, geometry, out_w, out_h)
    peak = float(heat.max())
    return (heat / peak if peak > 0 else np.zeros_like(heat)).astype(np.float32)


def _contour_level(heat: np.ndarray, threshold: float, threshold_mode: str) -> float | None:
    """The threshold's foreground level on a ``heat / max`` map (see ``gradloc.boxes.THRESHOLD_MODES``)."""
    from gradloc.boxes import THRESHOLD_MODES

    levels = THRESHOLD_MODES.get(threshold_mode)
    if levels is None or heat.max() <= 0:
        return None
    return float(levels(heat.reshape(1, -1), np.array([threshold], dtype=np.float64))[0, 0])


def show_run(run_dir: str | Path, threshold: float, n: int = 10, seed: int = 0, guided: bool = False,
             max_classes: int = 4) -> Figure:
    """A sample grid of a run folder: image + boxes, then a heatmap panel per explained class.

    Args:
        run_dir: a folder made by ``gradloc run`` (manifest.json, gt.pkl, detections/, heatmap cache).
        threshold: τ of the detections file to draw (``detections/thr_<τ>.pkl``) and of the contour.
        n, seed: sample size and seed (see :func:`sample_images`).
        guided: add a Guided Grad-CAM panel per class (rebuilds the model from the run's config).
        max_classes: at most this many classes per image get panels (most probable first).

    Returns:
        The figure (see :func:`render_grid`).

    Raises:
        FileNotFoundError: missing run folder, manifest, gt.pkl, detections file, cache or image.
        ValueError: bad threshold, malformed files.
    """
    from gradloc.config import load_config
    from gradloc.pipeline import class_probabilities, explained_classes, open_dataset
    from gradloc.runs import open_run

    hint = " (for boxes only use --detections PKL --voc-root PATH)"
    run = open_run(run_dir, hint=hint)
    run_dir = run.path
    manifest = run.manifest
    dets = run.detections_at(threshold)
    gt = run.gt
    config = load_config(None, manifest["config"])
    cache = open_run_cache(run)
    dataset = open_dataset(config)
    samples, entries = [], []
    for index in sample_images(dets, gt, n, seed):
        image_id = gt.image_ids[index]
        image = dataset.load_image(image_id)
        entry = cache.get(image_id)
        probs = class_probabilities(entry.scores, cache.key_data["score_kind"])
        explained = np.union1d(explained_classes(config, probs, gt.labels[gt.image_index == index]),
                               dets.labels[dets.image_index == index]).astype(np.int64)
        explained = explained[np.argsort(-probs[explained], kind="stable")][:max_classes]
        sample = make_sample(image_id, np.asarray(image), int(index), dets, gt)
        for k in explained:
            heat = _display_heat(entry.maps[k], entry.geometry, config.boxes.max_side)
            title = f"{gt.classes[k]} (p = {probs[k]:.2f}), tau = {threshold:g}"
            level = _contour_level(heat, threshold, dets.threshold_mode)
            sample.panels.append(HeatPanel(int(k), title, heat, level))
        samples.append(sample)
        entries.append((image, entry, explained))
    if guided:
        _add_guided_panels(config, cache, samples, entries, gt.classes)
    meta = dets.meta
    title = (f"{run_dir.name}: {meta.get('method', '?')} at {meta.get('layer', '?')} of "
             f"{meta.get('model', '?')}, {meta.get('dataset', '')}, boxes at tau = {threshold:g} "
             f"({dets.threshold_mode}, {dets.box_mode}), classes explained: "
             f"{meta.get('classes_explained', '?')}; sample of {len(samples)} (seed {seed})")
    return render_grid(samples, gt.classes, title)


def _add_guided_panels(config: Any, cache: Any, samples: list[Sample],
                       entries: list[tuple[Any, Any, np.ndarray]], classes: Sequence[str]) -> None:
    """Guided Grad-CAM (Selvaraju et al., ICCV 2017): ``GuidedBackprop * Up(Grad-CAM)`` at input resolution,
    back-projected onto the image; one panel per explained class, after the heatmap panels."""
    import torch

    from gradloc.cams import compute_cams
    from gradloc.geometry import preprocess_image, upsample
    from gradloc.pipeline import load_classifier

    loaded = load_classifier(config)
    pre = loaded.preprocessing
    model = loaded.model.to(torch.device(config.cams.device))
    for sample, (image, entry, explained) in zip(samples, entries, strict=True):
        if explained.size == 0:
            continue
        inputs = torch.from_numpy(preprocess_image(image, entry.geometry, pre.mean, pre.std))[None]
        maps, _ = compute_cams(model, inputs.to(torch.device(config.cams.device)), explained.tolist(),
                               method="guided_gradcam", layer=cache.key_data["layer"])
        guided = upsample(maps[0].detach().cpu().numpy(), entry.geometry)
        for k, heat in zip(explained, guided, strict=True):
            scale = float(np.percentile(heat, GUIDED_PERCENTILE))
            shown = np.clip(heat / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(heat)
            sample.panels.append(HeatPanel(int(k), f"{classes[k]}: Guided Grad-CAM", shown, None,
                                           cmap=GUIDED_CMAP, overlay=False,
                                           colorbar_label=f"guided / {GUIDED_PERCENTILE}th percentile"))


def show_detections(detections: str | Path, voc_root: str | Path, year: str = "2007", split: str = "val",
                    n: int = 10, seed: int = 0) -> Figure:
    """A sample grid of a detections pickle on a VOC split: boxes only (no heatmaps).

    Args:
        detections: a ``gradloc.detections/1`` pickle.
        voc_root, year, split: the VOC split the detections were made on (its annotations give the GT).
        n, seed: sample size and seed (see :func:`sample_images`).

    Raises:
        FileNotFoundError: missing pickle, VOC root, split or image.
        ValueError: the detections name images that are not in the split, malformed files.
    """
    from gradloc.voc import VOCDataset

    dets = load_detections(detections)
    dataset = VOCDataset(voc_root, year=year, split=split, classes=dets.classes)
    known = set(dataset.image_ids)
    missing = [image_id for image_id in dets.image_ids if image_id not in known]
    if missing:
        raise ValueError(f"{detections}: image {missing[0]!r} (and {len(missing) - 1} more) is not in "
                         f"VOC{year} {split}; pass the --split the detections were made on")
    full_gt = dataset.ground_truth()
    position = {image_id: i for i, image_id in enumerate(full_gt.image_ids)}
    rows = np.array([position[image_id] for image_id in dets.image_ids], dtype=np.int64)
    keep = np.isin(full_gt.image_index, rows)
    remap = np.full(len(full_gt.image_ids), -1, dtype=np.int64)
    remap[rows] = np.arange(rows.size)
    gt = GroundTruth(classes=list(dets.classes), image_ids=list(dets.image_ids),
                     image_sizes=full_gt.image_sizes[rows], image_index=remap[full_gt.image_index[keep]],
                     labels=full_gt.labels[keep], boxes=full_gt.boxes[keep],
                     difficult=full_gt.difficult[keep])
    samples = [make_sample(gt.image_ids[i], np.asarray(dataset.load_image(gt.image_ids[i])), int(i), dets, gt)
               for i in sample_images(dets, gt, n, seed)]
    title = (f"{Path(detections).name}: boxes at tau = {dets.threshold:g} ({dets.threshold_mode}, "
             f"{dets.box_mode}) on VOC{year} {split}; sample of {len(samples)} (seed {seed})")
    return render_grid(samples, dets.classes, title)
