"""Drawing: images with GT and predicted boxes and heatmap panels, as matplotlib figures."""

from __future__ import annotations

import io
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

from gradloc.core.files import write_own_file
from gradloc.core.formats import Detections, GroundTruth
from gradloc.scoring.voc import iou_matrix

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
    hidden: int = 0  # predicted boxes of the image left out by the display rule (gradloc.reports.show.Display)


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
                ax.set_title(sample.image_id + (f" (+{sample.hidden} boxes not drawn)" if sample.hidden else ""),
                             fontsize=8)
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
    atomically, replacing only a PNG (:func:`gradloc.core.files.write_own_file`: the file gets the umask's mode,
    like any file the user creates).

    Raises:
        FileExistsError: ``path`` exists and is not a PNG.
    """
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    write_own_file(path, buffer.getvalue(), "a PNG image")
    return path
