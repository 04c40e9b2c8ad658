"""Sample grids and per-image overlays: images with their heatmaps, GT boxes and predicted boxes (matplotlib).

Which images. ``gradloc show`` draws a seeded random sample (``numpy.random.default_rng(seed)``, ascending
image order) of the run's images with at least one detection at the chosen τ (``--sample detected``, the
default), so every row has a heatmap; ``--sample gt`` draws among images with a GT box instead, whatever was
detected, so one seed gives the same images for every method and threshold of a split. ``--ids`` names the
images; ``--class NAME`` keeps images where the class is detected or in GT, and only its boxes and panels.

What a row shows: the image with every GT box (green, dashed when ``difficult``) and every predicted box at
the chosen threshold (red, tagged ``class confidence IoU``: the IoU with the best GT box of the same class,
difficult included, as the devkit's matching sees it), then one panel per explained class with the class's
heatmap overlaid (``heat / max(heat)``, colour bar) and the threshold's contour, and with ``--guided`` a
Guided Grad-CAM panel per class (the model is rebuilt from the run's config). Without a run folder
(:func:`show_detections`), the panels show boxes only. Box tags are kept inside their image and apart from
each other; the figure is sized from its number of panels, and its title and legend bands from their text.

``--per-image DIR`` (:func:`write_overlays`) writes one PNG per image and class instead, at the image's own
pixel size: the heatmap blended over the photo (as pytorch-grad-cam's ``show_cam_on_image``), contour, boxes.

Coordinates. Images are drawn with ``extent = (0, W, H, 0)``: the axes' units are pixel *edges*, pixel
``u`` (0-based) covers ``[u, u + 1)``. A VOC box (1-based, inclusive) covers pixels ``x1 .. x2``, i.e. the
edge interval ``[x1 - 1, x2)``, so it is drawn as the rectangle with corner ``(x1 - 1, y1 - 1)``, width
``x2 - x1 + 1`` and height ``y2 - y1 + 1`` (:func:`voc_box_to_rect`). With matplotlib's default extent
``[-0.5, W - 0.5]`` the same box would start at ``x1 - 1.5``; gradloc always passes the explicit extent.

Figures are :class:`matplotlib.figure.Figure` objects made without pyplot (no global state, Agg backend).
"""

from __future__ import annotations

import logging
import os
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
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
HEAT_ALPHA = 0.5  # weight of the heatmap over the photo (pytorch-grad-cam's image_weight = 0.5)
PANEL_INCHES = (3.6, 2.9)  # width, height of one panel (with its title)
RIGHT_INCHES = 0.45  # right margin of grids with colour bars (their labels)
DPI = 100
TAG_FONT = {"fontsize": 7, "clip_on": True}  # box tags; shrunk down to MIN_TAG_FONTSIZE to fit the image
MIN_TAG_FONTSIZE = 5.0
TAG_PAD_PX = 2.0  # the tag's background pad (1 pt) plus a pixel, on each side


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


def _has_detection(dets: Detections, gt: GroundTruth, label: int | None) -> np.ndarray:
    """Images with at least one detection (of class ``label``; with a label, also images with it in GT)."""
    if label is None:
        return np.unique(dets.image_index)
    return np.union1d(dets.image_index[dets.labels == label], gt.image_index[gt.labels == label])


def _has_gt(dets: Detections, gt: GroundTruth, label: int | None) -> np.ndarray:
    """Images with at least one GT box (of class ``label``), whatever was detected."""
    keep = np.ones(len(gt.labels), dtype=bool) if label is None else gt.labels == label
    return np.unique(gt.image_index[keep])


# sample mode -> (the candidate images, how the figure title names them)
SAMPLE_MODES = {
    "detected": (_has_detection, "images with detections"),
    "gt": (_has_gt, "images with GT boxes"),
}


def sample_images(dets: Detections, gt: GroundTruth, n: int, seed: int, sample: str = "detected",
                  label: int | None = None) -> np.ndarray:
    """A seeded random sample of the images worth drawing.

    ``sample="detected"`` (default) draws among images with at least one detection at the drawn τ, so every
    row has a heatmap panel; with ``label``, among images where that class is detected or in GT.
    ``sample="gt"`` draws among images with a GT box (of ``label``): the candidates do not depend on the
    detections, so with the same seed every method and threshold of one split shows the same images.

    Args:
        dets, gt: detections and ground truth on the same image list.
        n: sample size (all candidates when fewer).
        seed: seed of ``numpy.random.default_rng``.
        sample: a key of ``SAMPLE_MODES``.
        label: restrict to images involving this class index (None: any class).

    Returns:
        int64[min(n, candidates)] image indices, ascending.

    Raises:
        ValueError: ``n < 1``, an unknown mode, or no candidate image.
    """
    if n < 1:
        raise ValueError(f"--n {n}: the number of images to show must be at least 1")
    if sample not in SAMPLE_MODES:
        raise ValueError(f"--sample {sample!r}: choose from {', '.join(SAMPLE_MODES)}")
    select, what = SAMPLE_MODES[sample]
    candidates = np.asarray(select(dets, gt, label), dtype=np.int64)
    if candidates.size == 0:
        of = "" if label is None else f" of class {gt.classes[label]!r}"
        hint = " (try --sample gt, or another --threshold)" if sample == "detected" else ""
        raise ValueError(f"no {what}{of} at tau = {dets.threshold:g}; nothing to show{hint}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=min(n, candidates.size), replace=False))


def select_ids(gt: GroundTruth, ids: Sequence[str], source: str) -> np.ndarray:
    """Indices (into ``gt.image_ids``) of the images named by ``--ids``, in the order given.

    Raises:
        ValueError: an id that is not an image of ``source`` (named in the message), or no id.
    """
    position = {image_id: i for i, image_id in enumerate(gt.image_ids)}
    wanted = [image_id.strip() for image_id in ids if image_id.strip()]
    if not wanted:
        raise ValueError("--ids: give comma-separated image ids, e.g. --ids 000005,000012")
    for image_id in wanted:
        if image_id not in position:
            some = ", ".join(gt.image_ids[:3])
            raise ValueError(f"--ids: image {image_id!r} is not among the {len(gt.image_ids)} images of "
                             f"{source} (e.g. {some})")
    return np.array([position[image_id] for image_id in dict.fromkeys(wanted)], dtype=np.int64)


def class_index(classes: Sequence[str], name: str, source: str) -> int:
    """Index of ``--class`` ``name`` among ``classes``; ValueError naming ``source`` and the choices."""
    if name not in classes:
        raise ValueError(f"--class {name!r} is not a class of {source}; choose from {', '.join(classes)}")
    return list(classes).index(name)


def pick_images(dets: Detections, gt: GroundTruth, source: str, n: int, seed: int, sample: str,
                ids: Sequence[str] | None, focus: str | None) -> tuple[np.ndarray, int | None, str]:
    """The images to draw (``--ids`` or a seeded sample), the focused class and a description for the title.

    Returns:
        (int64[k] indices into ``gt.image_ids``, class index of ``focus`` or None, e.g.
        ``"sample of 6 images with detections (seed 0)"``).
    """
    label = None if focus is None else class_index(gt.classes, focus, source)
    if ids:
        chosen = select_ids(gt, ids, source)
        what = f"images {', '.join(gt.image_ids[i] for i in chosen)}"
    else:
        chosen = sample_images(dets, gt, n, seed, sample, label)
        what = f"sample of {len(chosen)} {SAMPLE_MODES[sample][1]} (seed {seed})"
    if focus is not None:
        what += f", class {focus} only"
    return chosen, label, what


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


def make_sample(image_id: str, image: np.ndarray, index: int, dets: Detections, gt: GroundTruth,
                label: int | None = None) -> Sample:
    """Collect the boxes of image ``index`` (into ``gt.image_ids``), of class ``label`` only when given, and
    the IoU of each prediction."""
    g = (gt.image_index == index) & ((gt.labels == label) if label is not None else True)
    d = (dets.image_index == index) & ((dets.labels == label) if label is not None else True)
    return Sample(
        image_id=image_id, image=image, gt_boxes=gt.boxes[g], gt_labels=gt.labels[g],
        gt_difficult=gt.difficult[g],
        det_boxes=dets.boxes[d], det_labels=dets.labels[d], det_scores=dets.scores[d],
        det_iou=best_gt_iou(dets.boxes[d], dets.labels[d], gt.boxes[g], gt.labels[g]),
    )


# --- drawing ------------------------------------------------------------------------------------------------


def _draw_boxes(ax: Any, sample: Sample, classes: Sequence[str], only: int | None = None) -> list[Any]:
    """GT (green, dashed if difficult, name at the bottom-left) and predictions (red, ``name conf IoU``).

    Returns:
        The box tags (``matplotlib.text.Text``), to be moved inside the image and apart by :func:`_place_tags`.
    """
    tags = []
    for box, label, difficult in zip(sample.gt_boxes, sample.gt_labels, sample.gt_difficult, strict=True):
        if only is not None and label != only:
            continue
        x, y, w, h = voc_box_to_rect(box)
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=GT_COLOR, linewidth=1.4,
                               linestyle="--" if difficult else "-"))
        tags.append(ax.text(x, y + h, classes[label] + (" (difficult)" if difficult else ""), color="black",
                            bbox={"facecolor": GT_COLOR, "alpha": 0.8, "pad": 1, "linewidth": 0}, **TAG_FONT))
    for box, label, score, iou in zip(sample.det_boxes, sample.det_labels, sample.det_scores, sample.det_iou,
                                      strict=True):
        if only is not None and label != only:
            continue
        x, y, w, h = voc_box_to_rect(box)
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=PRED_COLOR, linewidth=1.4))
        iou_text = "no GT" if np.isnan(iou) else f"IoU {iou:.2f}"
        tags.append(ax.text(x, y, f"{classes[label]} {score:.2f} {iou_text}", color="white",
                            bbox={"facecolor": PRED_COLOR, "alpha": 0.8, "pad": 1, "linewidth": 0}, **TAG_FONT))
    return tags


def _place_tags(ax: Any, tags: Sequence[Any], renderer: Any) -> None:
    """Move box tags inside the axes' image and apart from each other (greedy, in drawing order).

    A tag's bottom-left corner starts at its anchor (a GT name sits on its box's bottom-left corner, inside
    the box; a prediction's tag on its box's top-left corner, above the box), clamped inside the image. When
    it overlaps a tag placed before it, it moves to the nearest free spot (vertical distance counts double)
    among whole tag heights up or down and the sides of the placed tags; it stays at its anchor when the
    image has no free spot left. A tag wider than the image gets a smaller font, down
    to ``MIN_TAG_FONTSIZE``. Needs the axes' final position (call after the layout is fixed).
    """
    area = ax.get_window_extent(renderer)
    to_data = ax.transData.inverted()
    placed: list[tuple[float, float, float, float]] = []
    for tag in tags:
        tag.set_horizontalalignment("left")
        tag.set_verticalalignment("bottom")
        while (tag.get_fontsize() > MIN_TAG_FONTSIZE
               and tag.get_window_extent(renderer).width + 2 * TAG_PAD_PX > area.width):
            tag.set_fontsize(tag.get_fontsize() - 0.5)
        ext = tag.get_window_extent(renderer)
        w, h = ext.width + 2 * TAG_PAD_PX, ext.height + 2 * TAG_PAD_PX
        ax0 = min(max(ext.x0 - TAG_PAD_PX, area.x0), area.x1 - w)
        ay0 = min(max(ext.y0 - TAG_PAD_PX, area.y0), area.y1 - h)
        xs = {ax0, *(r[2] for r in placed), *(r[0] - w for r in placed)}
        ys = {ay0, *(ay0 + k * h for k in range(-int(area.height // max(h, 1.0)) - 1,
                                                int(area.height // max(h, 1.0)) + 2)),
              *(r[3] for r in placed), *(r[1] - h for r in placed)}
        spots = sorted({(min(max(x, area.x0), area.x1 - w), min(max(y, area.y0), area.y1 - h))
                        for x in xs for y in ys},
                       key=lambda p: (abs(p[1] - ay0) + 0.5 * abs(p[0] - ax0), p))
        free = (p for p in spots if not any(_overlap((p[0], p[1], p[0] + w, p[1] + h), r) for r in placed))
        x0, y0 = next(free, (ax0, ay0))
        placed.append((x0, y0, x0 + w, y0 + h))
        tag.set_position(to_data.transform((x0 + TAG_PAD_PX, y0 + TAG_PAD_PX)))


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether rectangles ``(x0, y0, x1, y1)`` intersect (touching edges do not)."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _draw_heat(fig: Figure, ax: Any, sample: Sample, panel: HeatPanel, classes: Sequence[str],
               colorbar: bool = True) -> list[Any]:
    """The panel's map over the image (or alone), its contour, the boxes of its class; returns the tags."""
    height, width = sample.image.shape[:2]
    extent = image_extent(width, height)
    if panel.overlay:
        ax.imshow(sample.image, extent=extent, interpolation="nearest")
    im = ax.imshow(panel.heat, extent=extent, cmap=panel.cmap, alpha=HEAT_ALPHA if panel.overlay else 1.0,
                   vmin=0.0, vmax=1.0, interpolation="bilinear")
    if panel.level is not None and 0.0 < panel.level < 1.0 and np.ptp(panel.heat) > 0:
        rows, cols = panel.heat.shape
        xs = (np.arange(cols) + 0.5) * width / cols  # cell centres of the grid, in pixel-edge units
        ys = (np.arange(rows) + 0.5) * height / rows
        ax.contour(xs, ys, panel.heat, levels=[panel.level], colors="white", linewidths=0.8)
    if colorbar:
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        bar.set_label(panel.colorbar_label, fontsize=6)
        bar.ax.tick_params(labelsize=6)
    return _draw_boxes(ax, sample, classes, only=panel.label)


def _legend_handles(contour: bool) -> list[Line2D]:
    handles = [Line2D([], [], color=GT_COLOR, label="ground truth"),
               Line2D([], [], color=GT_COLOR, linestyle="--", label="ground truth (difficult)"),
               Line2D([], [], color=PRED_COLOR, label="prediction: class, confidence, IoU with best GT")]
    if contour:
        handles.append(Line2D([], [], color="0.6", label="threshold contour (white)"))
    return handles


def _fit_bands(fig: Figure, body_inches: float, title: str, handles: list[Line2D], top_gap: float) -> None:
    """Give the figure a title band and a legend band measured from their text, around a body of panels.

    The legend takes as many columns as fit in the figure's width; the title is wrapped to the width. The
    figure's height becomes ``title band + body_inches + legend band``; the panels keep their size.
    """
    renderer = fig.canvas.get_renderer()
    width = fig.get_figwidth()
    for ncol in range(len(handles), 0, -1):
        legend = fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False,
                            bbox_to_anchor=(0.5, 0.0))
        if ncol == 1 or legend.get_window_extent(renderer).width <= 0.98 * width * fig.dpi:
            break
        legend.remove()
    suptitle = fig.suptitle(textwrap.fill(title, width=int(width * 13)), fontsize=8, va="top")
    title_in = suptitle.get_window_extent(renderer).height / fig.dpi + 0.1 + top_gap
    legend_in = legend.get_window_extent(renderer).height / fig.dpi + 0.05
    height = title_in + body_inches + legend_in
    fig.set_size_inches(width, height)
    suptitle.set_y(1 - 0.05 / height)
    fig.subplots_adjust(top=1 - title_in / height, bottom=legend_in / height)


def render_grid(samples: Sequence[Sample], classes: Sequence[str], title: str,
                columns: int | None = None) -> Figure:
    """Draw samples as a grid of panels.

    With heatmap panels, each sample is a row (image with all boxes, then its panels); without any, samples
    fill a grid of ``columns`` (default ``min(n, 4)``) image panels. Box tags are kept inside their image and
    apart (:func:`_place_tags`); the legend wraps into as many rows as the width needs.

    Returns:
        A figure ``n_cols * PANEL_INCHES[0]`` inches wide; ``n_rows * PANEL_INCHES[1]`` inches of panels plus
        a title band and a legend band sized from their text; at ``DPI``, with an Agg canvas.
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
    fig = Figure(figsize=(n_cols * PANEL_INCHES[0], n_rows * PANEL_INCHES[1]), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))
    width = fig.get_figwidth()  # margins in inches: the last colour bar's label needs RIGHT_INCHES
    fig.subplots_adjust(left=0.05 / width, right=1 - (RIGHT_INCHES if per_row else 0.05) / width, wspace=0.15,
                        hspace=0.3)
    tags = []
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
                tags.append((ax, _draw_boxes(ax, sample, classes)))
                ax.set_title(sample.image_id, fontsize=8)
            else:
                tags.append((ax, _draw_heat(fig, ax, sample, panel, classes)))
                ax.set_title(panel.title, fontsize=8)
    _fit_bands(fig, n_rows * PANEL_INCHES[1], title, _legend_handles(bool(per_row)), top_gap=0.25)
    fig.canvas.draw()  # fixes the axes' final boxes (aspect) before the tags are placed
    renderer = fig.canvas.get_renderer()
    for ax, texts in tags:
        _place_tags(ax, texts, renderer)
    return fig


def render_overlay(sample: Sample, panel: HeatPanel, classes: Sequence[str], caption: str) -> Figure:
    """One image at its own pixel size: the class's heatmap blended over the photo (``HEAT_ALPHA``, as
    pytorch-grad-cam's ``show_cam_on_image``), its contour, the class's GT and predicted boxes, and a caption
    band above. No colour bar: the caption gives the map's scale.

    Returns:
        A figure ``W`` pixels wide, ``H`` pixels of image plus the caption band, at ``DPI``.
    """
    height, width = sample.image.shape[:2]
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    texts = _draw_heat(fig, ax, sample, panel, classes, colorbar=False)
    renderer = fig.canvas.get_renderer()
    text = fig.text(0.01, 1.0, textwrap.fill(caption, width=max(20, int(width / 6))), fontsize=7, va="top")
    band = text.get_window_extent(renderer).height / DPI + 0.08
    total = height / DPI + band
    fig.set_size_inches(width / DPI, total)
    ax.set_position((0.0, 0.0, 1.0, height / DPI / total))
    text.set_y(1 - 0.04 / total)
    fig.canvas.draw()
    _place_tags(ax, texts, fig.canvas.get_renderer())
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save a figure as PNG at its own size (no tight bounding box, so the pixel size is predictable),
    atomically: written to a temporary file in the same folder, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            fig.savefig(stream, dpi=DPI, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- heatmaps of a run --------------------------------------------------------------------------------------


def _display_probabilities(scores: np.ndarray, score_kind: str) -> np.ndarray:
    """Class probabilities for titles and panel order, in numpy so that `gradloc show` never imports torch.
    They may differ from :func:`gradloc.pipeline.class_probabilities` (torch, the detection confidences) in the
    last bit; the boxes drawn come from the run's detections, not from these."""
    scores = np.asarray(scores, dtype=np.float64)
    if score_kind == "log_prob":
        return np.exp(scores)
    return 1.0 / (1.0 + np.exp(-scores))


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


@dataclass
class RunSamples:
    """The drawn images of a run with their panels, and the protocol they were drawn under.

    Attributes:
        samples: one per image, in drawing order; classes: class names.
        protocol: method, layer, model, split, τ and semantics, box mode, explained classes.
        selection: which images (``pick_images``), e.g. ``sample of 6 images with detections (seed 0)``.
    """

    samples: list[Sample]
    classes: list[str]
    protocol: str
    selection: str


def run_samples(run_dir: str | Path, threshold: float, n: int = 10, seed: int = 0, guided: bool = False,
                max_classes: int = 4, sample: str = "detected", ids: Sequence[str] | None = None,
                focus: str | None = None) -> RunSamples:
    """Pick images of a run folder and build their panels: one heatmap panel per explained class.

    A class is explained in an image when the run cut boxes for it (``classes_explained``: predicted or GT)
    or detected it; at most ``max_classes`` of them, most probable first. With ``focus`` the image shows that
    class's boxes only and one panel, its map from the cache (all classes' maps are cached), titled
    ``not explained`` when the run cut no boxes for it there.

    Args:
        run_dir: a folder made by ``gradloc run`` (manifest.json, gt.pkl, detections/, heatmap cache).
        threshold: τ of the detections file to draw (``detections/thr_<τ>.pkl``) and of the contour.
        n, seed, sample, ids, focus: which images (see :func:`pick_images`).
        guided: add a Guided Grad-CAM panel per class (rebuilds the model from the run's config).
        max_classes: at most this many classes per image get panels.

    Raises:
        FileNotFoundError: missing run folder, manifest, gt.pkl, detections file, cache or image.
        ValueError: bad threshold, ids, class or sample mode; malformed files.
    """
    from gradloc.config import load_config
    from gradloc.pipeline import explained_classes, open_dataset
    from gradloc.runs import open_run

    run = open_run(run_dir, hint=" (for boxes only use --detections PKL --voc-root PATH)")
    dets = run.detections_at(threshold)
    gt = run.gt
    meta = dets.meta
    source = f"run {run.path} ({meta.get('dataset', '?')})"
    chosen, label, selection = pick_images(dets, gt, source, n, seed, sample, ids, focus)
    config = load_config(None, run.manifest["config"])
    cache = open_run_cache(run)
    dataset = open_dataset(config)
    samples, entries = [], []
    for index in chosen:
        image_id = gt.image_ids[index]
        image = dataset.load_image(image_id)
        entry = cache.get(image_id)
        probs = _display_probabilities(entry.scores, cache.key_data["score_kind"])
        explained = np.union1d(explained_classes(config, probs, gt.labels[gt.image_index == index]),
                               dets.labels[dets.image_index == index]).astype(np.int64)
        if label is not None:
            shown = np.array([label], dtype=np.int64)
        else:
            shown = explained[np.argsort(-probs[explained], kind="stable")][:max_classes]
        item = make_sample(image_id, np.asarray(image), int(index), dets, gt, label)
        for k in shown:
            heat = _display_heat(entry.maps[k], entry.geometry, config.boxes.max_side)
            note = "" if k in explained else " (not explained)"
            title = f"{gt.classes[k]} (p = {probs[k]:.2f}){note}, tau = {threshold:g}"
            level = _contour_level(heat, threshold, dets.threshold_mode)
            item.panels.append(HeatPanel(int(k), title, heat, level))
        samples.append(item)
        entries.append((image, entry, shown))
    if guided:
        _add_guided_panels(config, cache, samples, entries, gt.classes)
    protocol = (f"{run.path.name}: {meta.get('method', '?')} at {meta.get('layer', '?')} of "
                f"{meta.get('model', '?')}, {meta.get('dataset', '')}, boxes at tau = {threshold:g} "
                f"({dets.threshold_mode}, {dets.box_mode}), classes explained: "
                f"{meta.get('classes_explained', '?')}")
    return RunSamples(samples, list(gt.classes), protocol, selection)


def show_run(run_dir: str | Path, threshold: float, n: int = 10, seed: int = 0, guided: bool = False,
             max_classes: int = 4, sample: str = "detected", ids: Sequence[str] | None = None,
             focus: str | None = None) -> Figure:
    """A sample grid of a run folder: image + boxes, then a heatmap panel per explained class.

    The images are those of :func:`run_samples` (``sample="detected"`` by default: images with detections
    at τ). ``sample="gt"`` draws among images with GT boxes, independently of the detections: with the same
    seed, every method of one split shows the same images (what a benchmark comparing methods wants).

    Returns:
        The figure (see :func:`render_grid`).

    Raises:
        As :func:`run_samples`.
    """
    drawn = run_samples(run_dir, threshold, n, seed, guided, max_classes, sample, ids, focus)
    return render_grid(drawn.samples, drawn.classes, f"{drawn.protocol}; {drawn.selection}")


def write_overlays(run_dir: str | Path, threshold: float, out_dir: str | Path, n: int = 10, seed: int = 0,
                   max_classes: int = 4, sample: str = "detected", ids: Sequence[str] | None = None,
                   focus: str | None = None) -> list[Path]:
    """One PNG per drawn image and class: ``<image_id>_<class>.png`` (:func:`render_overlay`), written
    atomically into ``out_dir``; an image without any heatmap panel (possible with ``sample="gt"``) gets
    ``<image_id>.png``, the photo with its boxes. Images and classes as in :func:`run_samples`.

    Returns:
        The written files, in drawing order.
    """
    drawn = run_samples(run_dir, threshold, n, seed, False, max_classes, sample, ids, focus)
    out_dir = Path(out_dir)
    written = []
    for item in drawn.samples:
        for panel in item.panels:
            caption = (f"{item.image_id}, {panel.title}; heat / max(heat) blended at {HEAT_ALPHA:g}, white "
                       f"contour = threshold; {drawn.protocol}")
            fig = render_overlay(item, panel, drawn.classes, caption)
            written.append(save_figure(fig, out_dir / f"{item.image_id}_{drawn.classes[panel.label]}.png"))
        if not item.panels:
            fig = render_grid([item], drawn.classes, f"{item.image_id}: no class explained; {drawn.protocol}")
            written.append(save_figure(fig, out_dir / f"{item.image_id}.png"))
    logger.info("wrote %d overlays into %s", len(written), out_dir)
    return written


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
                    n: int = 10, seed: int = 0, sample: str = "detected", ids: Sequence[str] | None = None,
                    focus: str | None = None) -> Figure:
    """A sample grid of a detections pickle on a VOC split: boxes only (no heatmaps).

    Args:
        detections: a ``gradloc.detections/1`` pickle.
        voc_root, year, split: the VOC split the detections were made on (its annotations give the GT).
        n, seed, sample, ids, focus: which images (see :func:`pick_images`).

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
    chosen, label, selection = pick_images(dets, gt, str(detections), n, seed, sample, ids, focus)
    samples = [make_sample(gt.image_ids[i], np.asarray(dataset.load_image(gt.image_ids[i])), int(i), dets, gt,
                           label) for i in chosen]
    title = (f"{Path(detections).name}: boxes at tau = {dets.threshold:g} ({dets.threshold_mode}, "
             f"{dets.box_mode}) on VOC{year} {split}; {selection}")
    return render_grid(samples, dets.classes, title)
