"""Sample grids and per-image overlays: images with their heatmaps, GT boxes and predicted boxes (matplotlib).

Which images. ``gradloc show`` draws a seeded random sample (``numpy.random.default_rng(seed)``, ascending
image order) of the run's images with at least one drawn detection at τ (``--sample detected``, the default;
τ defaults to the run's selected τ), so every row has something to look at; ``--sample gt`` draws among
images with a GT box instead, whatever was detected, so one seed gives the same images for every method and
threshold of a split. ``--ids`` names the images; ``--class NAME`` keeps images where the class is detected
or in GT, and only its boxes and panel.

What a row shows (the display rule, :class:`Display`): the image with every GT box (green, dashed when
``difficult``), the predicted boxes of the image's GT classes and of at most ``--top`` other classes whose
best box has confidence >= ``--min-score`` (red, tagged ``class confidence IoU``: the IoU with the best GT
box of the same class, difficult included, as the devkit's matching sees it; the title counts the boxes
left out), then one heatmap panel per drawn class, GT classes first, at most ``--panels`` (``heat /
max(heat)``, colour bar, the threshold's contour; ``not explained`` when the run cut no box for the class
there), and with ``--guided`` a Guided Grad-CAM panel per class (the model is rebuilt from the run's
config). Without a run folder (:func:`show_detections`), the panels show boxes only. Box tags are kept
inside their image and apart from each other; the figure is sized from its number of panels, and its
title and legend bands from their text.

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

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from gradloc.boxes.cut import THRESHOLD_MODES
from gradloc.boxes.explain import explained_classes
from gradloc.cams.cache import HeatmapCache, describe, same_content
from gradloc.core.formats import Detections, GroundTruth, load_detections
from gradloc.core.geometry import preprocess_image, upsample, working_size
from gradloc.core.names import check_name, excerpt
from gradloc.datasets.voc import VOCDataset
from gradloc.models.registry import class_probabilities
from gradloc.reports.draw import (
    GUIDED_CMAP,
    GUIDED_PERCENTILE,
    HEAT_ALPHA,
    HeatPanel,
    Sample,
    make_sample,
    render_grid,
    render_overlay,
    save_figure,
)
from gradloc.run.config import load_config, open_dataset
from gradloc.run.folder import MANIFEST_FILE, open_run
from gradloc.scoring.tables import selected_tau

logger = logging.getLogger(__name__)


def _has_detection(dets: Detections, gt: GroundTruth, label: int | None) -> np.ndarray:
    """Images with at least one detection (of class ``label``; with a label, also images with it in GT)."""
    if label is None:
        return np.unique(dets.image_index)
    return np.union1d(dets.image_index[dets.labels == label], gt.image_index[gt.labels == label])


def _has_gt(dets: Detections, gt: GroundTruth, label: int | None) -> np.ndarray:
    """Images with at least one GT box (of class ``label``), whatever was detected."""
    keep = np.ones(len(gt.labels), dtype=bool) if label is None else gt.labels == label
    return np.unique(gt.image_index[keep])


@dataclass(frozen=True)
class Display:
    """Which of an image's boxes and maps ``gradloc show`` draws (its display rule; flags ``--min-score``,
    ``--top``, ``--panels``).

    A run that explains every class cuts a box for each of the 20 classes in every image; drawn all, their tags
    bury the GT. Drawn are: every GT box; the predicted boxes of the image's GT classes, whatever their
    confidence (the devkit matches exactly these against the GT boxes); and those of at most ``top`` other
    classes, the most confident among the classes whose best box has confidence >= ``min_score``. The image's
    title counts the predicted boxes left out. Heatmap panels: one per drawn class, GT classes first, then
    the others, each group by class probability, at most ``panels``.
    """

    min_score: float = 0.1
    top: int = 3
    panels: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0 or self.min_score != self.min_score:
            raise ValueError(f"--min-score {self.min_score}: give a confidence in [0, 1]")
        if self.top < 0 or self.panels < 0:
            raise ValueError(f"--top {self.top} / --panels {self.panels}: give 0 or more")

    def describe(self) -> str:
        return (f"drawn: GT boxes, predicted boxes of the GT classes and of <= {self.top} other classes with "
                f"confidence >= {self.min_score:g}; heatmaps of those classes (GT first), <= {self.panels}")

    def classes(self, sample: Sample) -> np.ndarray:
        """The classes drawn in ``sample``: its GT classes, then the others shown (most confident first)."""
        in_gt = np.unique(sample.gt_labels)
        other = ~np.isin(sample.det_labels, in_gt) & (sample.det_scores >= self.min_score)
        best: dict[int, float] = {}
        for label, score in zip(sample.det_labels[other].tolist(), sample.det_scores[other].tolist(), strict=True):
            best[label] = max(score, best.get(label, -np.inf))
        shown = sorted(best, key=lambda label: -best[label])[: self.top]
        return np.concatenate([in_gt, np.asarray(shown, dtype=np.int64)]).astype(np.int64)

    def apply(self, sample: Sample) -> Sample:
        """``sample`` with only the predicted boxes of :meth:`classes`, the others counted in ``hidden``."""
        keep = np.isin(sample.det_labels, self.classes(sample))
        return dataclasses.replace(sample, det_boxes=sample.det_boxes[keep], det_labels=sample.det_labels[keep],
                                   det_scores=sample.det_scores[keep], det_iou=sample.det_iou[keep],
                                   hidden=int((~keep).sum()))

    def panel_classes(self, sample: Sample, probabilities: np.ndarray) -> np.ndarray:
        """The classes given a heatmap panel: the drawn classes, GT ones first, each group by probability."""
        drawn = self.classes(sample)
        in_gt = np.isin(drawn, sample.gt_labels)
        ordered = [group[np.argsort(-probabilities[group], kind="stable")] for group in (drawn[in_gt], drawn[~in_gt])]
        return np.concatenate(ordered)[: self.panels].astype(np.int64)


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
        raise ValueError(f"--sample {excerpt(sample)}: choose from {', '.join(SAMPLE_MODES)}")
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
            raise ValueError(f"--ids: image {excerpt(image_id)} is not among the {len(gt.image_ids)} images of "
                             f"{source} (e.g. {some})")
    return np.array([position[image_id] for image_id in dict.fromkeys(wanted)], dtype=np.int64)


def class_index(classes: Sequence[str], name: str, source: str) -> int:
    """Index of ``--class`` ``name`` among ``classes``; ValueError naming ``source`` and the choices."""
    if name not in classes:
        raise ValueError(f"--class {excerpt(name)} is not a class of {source}; choose from {', '.join(classes)}")
    return list(classes).index(name)


def pick_images(dets: Detections, gt: GroundTruth, source: str, n: int, seed: int, sample: str,
                ids: Sequence[str] | None, focus: str | None, display: Display | None = None
                ) -> tuple[np.ndarray, int | None, str]:
    """The images to draw (``--ids`` or a seeded sample), the focused class and a description for the title.
    With ``display`` (and no ``focus``), ``sample="detected"`` draws among images with a detection it shows:
    of a GT class of the image, or with confidence >= ``display.min_score``.

    Returns:
        (int64[k] indices into ``gt.image_ids``, class index of ``focus`` or None, e.g.
        ``"sample of 6 images with detections (seed 0)"``).
    """
    label = None if focus is None else class_index(gt.classes, focus, source)
    if ids:
        chosen = select_ids(gt, ids, source)
        what = f"images {', '.join(gt.image_ids[i] for i in chosen)}"
    else:
        if display is not None and label is None:
            pairs = gt.image_index * len(gt.classes) + gt.labels
            shown = np.isin(dets.image_index * len(gt.classes) + dets.labels, pairs) | (
                dets.scores >= display.min_score)
            dets = dataclasses.replace(dets, image_index=dets.image_index[shown], labels=dets.labels[shown],
                                       scores=dets.scores[shown], boxes=dets.boxes[shown])
        chosen = sample_images(dets, gt, n, seed, sample, label)
        what = f"sample of {len(chosen)} {SAMPLE_MODES[sample][1]} (seed {seed})"
    if focus is not None:
        what += f", class {focus} only"
    return chosen, label, what


def open_run_cache(run: Any):  # (gradloc.run.folder.Run) -> gradloc.cams.cache.HeatmapCache
    """The heatmap cache a run was made from (its manifest's ``cache_dir``), serving the maps of the image
    contents the run recorded in ``images.json`` (:meth:`HeatmapCache.serve`): another dataset's maps under the
    same ids, written later into the same cache, are never returned."""

    root = run.manifest.get("cache_dir")
    if not root:
        raise ValueError(f"{run.path / MANIFEST_FILE}: no 'cache_dir'; the run kept no heatmap cache "
                         "(use --detections PKL --voc-root PATH for boxes only)")
    try:
        cache = HeatmapCache.open(root)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; it is the heatmap cache of run {run.path} (or use --detections PKL "
                                "--voc-root PATH for boxes only)") from None
    cache.serve(run.images or {})
    return cache


def read_run_image(run: Any, dataset: VOCDataset, cache: HeatmapCache, image_id: str) -> tuple[Any, Any]:
    """An image of a run and its cached maps, both proven to be of the image content the run used: the bytes
    read must have the fingerprint the run recorded (runs made before ``images.json``: the maps must be of the
    bytes read).

    Returns:
        (the RGB image, its :class:`gradloc.cams.cache.CamEntry`).

    Raises:
        ValueError: the image file changed since the run. FileNotFoundError, CacheError: no such maps.
    """
    image, source = dataset.read_image(image_id)
    recorded = (run.images or {}).get(image_id, source)
    if not same_content(recorded, source):
        raise ValueError(f"{dataset.image_path(image_id)}: the image changed since run {run.path} was made "
                         f"({describe(source)}, the run used {describe(recorded)}); rerun `gradloc run` to "
                         "draw it")
    return image, cache.get(image_id, recorded)


def _display_heat(raw: np.ndarray, geometry: Any, max_side: int | None) -> np.ndarray:
    """Back-project a raw map onto the working grid the boxes were cut on; float32[h, w], heat / max."""

    out_w, out_h = working_size(geometry.width, geometry.height, max_side)
    heat = upsample(raw, geometry, out_w, out_h)
    peak = float(heat.max())
    return (heat / peak if peak > 0 else np.zeros_like(heat)).astype(np.float32)


def _contour_level(heat: np.ndarray, threshold: float, threshold_mode: str) -> float | None:
    """The threshold's foreground level on a ``heat / max`` map (see ``gradloc.boxes.cut.THRESHOLD_MODES``)."""

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


def run_samples(run_dir: str | Path, threshold: float | None = None, n: int = 10, seed: int = 0,
                guided: bool = False, display: Display = Display(), sample: str = "detected",
                ids: Sequence[str] | None = None, focus: str | None = None) -> RunSamples:
    """Pick images of a run folder and build their panels: the boxes and heatmaps of :class:`Display`.

    A panel's title says when the run cut no boxes for its class there (``not explained``: the map is read
    from the cache, which holds every class). With ``focus`` the image shows that class's boxes only and its
    one panel.

    Args:
        run_dir: a folder made by ``gradloc run`` (manifest.json, gt.pkl, detections/, heatmap cache).
        threshold: τ of the detections file to draw (``detections/thr_<τ>.pkl``) and of the contour; None: the
            run's selected τ (its config's ``boxes.selected_threshold``).
        n, seed, sample, ids, focus: which images (see :func:`pick_images`).
        guided: add a Guided Grad-CAM panel per class (rebuilds the model from the run's config).
        display: which boxes and maps of an image are drawn.

    Raises:
        FileNotFoundError: missing run folder, manifest, gt.pkl, detections file, cache or image.
        ValueError: bad threshold (or none given and none selected), ids, class or sample mode; malformed files.
    """

    run = open_run(run_dir, hint=" (for boxes only use --detections PKL --voc-root PATH)")
    threshold = run.threshold_or_selected(threshold)
    dets = run.detections_at(threshold)
    gt = run.gt
    meta = dets.meta
    source = f"run {run.path} ({meta.get('dataset', '?')})"
    chosen, label, selection = pick_images(dets, gt, source, n, seed, sample, ids, focus, display)
    config = load_config(None, run.manifest["config"])
    cache = open_run_cache(run)
    dataset = open_dataset(config)
    samples, entries = [], []
    for index in chosen:
        image_id = gt.image_ids[index]
        image, entry = read_run_image(run, dataset, cache, image_id)
        probs = class_probabilities(entry.scores, cache.key_data["score_kind"])
        explained = np.union1d(explained_classes(config.boxes.explain, probs, gt.labels[gt.image_index == index],
                                                  config.boxes.score_cut),
                               dets.labels[dets.image_index == index]).astype(np.int64)
        item = make_sample(image_id, np.asarray(image), int(index), dets, gt, label)
        if label is None:
            shown = display.panel_classes(item, probs)
            item = display.apply(item)
        else:
            shown = np.array([label], dtype=np.int64)
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
    chosen_words = ("the run's selected tau" if threshold == selected_tau(meta) else "tau given")
    protocol = (f"{run.path.name}: {meta.get('method', '?')} at {meta.get('layer', '?')} of "
                f"{meta.get('model', '?')}, {meta.get('dataset', '')}, boxes at tau = {threshold:g} "
                f"({chosen_words}; {dets.threshold_mode}, {dets.box_mode}), classes explained: "
                f"{meta.get('classes_explained', '?')}; {display.describe() if label is None else 'one class'}")
    return RunSamples(samples, list(gt.classes), protocol, selection)


def show_run(run_dir: str | Path, threshold: float | None = None, n: int = 10, seed: int = 0,
             guided: bool = False, display: Display = Display(), sample: str = "detected",
             ids: Sequence[str] | None = None, focus: str | None = None) -> Figure:
    """A sample grid of a run folder: image + boxes, then a heatmap panel per drawn class (:class:`Display`).

    The images are those of :func:`run_samples` (``sample="detected"`` by default: images with drawn
    detections at τ). ``sample="gt"`` draws among images with GT boxes, independently of the detections: with
    the same seed, every method of one split shows the same images (what a benchmark comparing methods wants).

    Returns:
        The figure (see :func:`render_grid`).

    Raises:
        As :func:`run_samples`.
    """
    drawn = run_samples(run_dir, threshold, n, seed, guided, display, sample, ids, focus)
    return render_grid(drawn.samples, drawn.classes, f"{drawn.protocol}; {drawn.selection}")


def write_overlays(run_dir: str | Path, threshold: float | None, out_dir: str | Path, n: int = 10, seed: int = 0,
                   display: Display = Display(), sample: str = "detected", ids: Sequence[str] | None = None,
                   focus: str | None = None) -> list[Path]:
    """One PNG per drawn image and class: ``<image_id>_<class>.png`` (:func:`render_overlay`), written
    atomically into ``out_dir``; an image without any heatmap panel (possible with ``sample="gt"``) gets
    ``<image_id>.png``, the photo with its boxes. Images and classes as in :func:`run_samples`.

    Returns:
        The written files, in drawing order.
    """
    drawn = run_samples(run_dir, threshold, n, seed, False, display, sample, ids, focus)
    out_dir = Path(out_dir)
    written = []
    for item in drawn.samples:
        for panel in item.panels:
            caption = (f"{item.image_id}, {panel.title}; heat / max(heat) blended at {HEAT_ALPHA:g}, white "
                       f"contour = threshold; {drawn.protocol}")
            fig = render_overlay(item, panel, drawn.classes, caption)
            name = check_name(f"{item.image_id}_{drawn.classes[panel.label]}.png", "overlay file name")
            written.append(save_figure(fig, out_dir / name))
        if not item.panels:
            fig = render_grid([item], drawn.classes, f"{item.image_id}: no class explained; {drawn.protocol}")
            written.append(save_figure(fig, out_dir / check_name(f"{item.image_id}.png", "overlay file name")))
    logger.info("wrote %d overlays into %s", len(written), out_dir)
    return written


def _add_guided_panels(config: Any, cache: Any, samples: list[Sample],
                       entries: list[tuple[Any, Any, np.ndarray]], classes: Sequence[str]) -> None:
    """Guided Grad-CAM (Selvaraju et al., ICCV 2017): ``GuidedBackprop * Up(Grad-CAM)`` at input resolution,
    back-projected onto the image; one panel per explained class, after the heatmap panels."""
    import torch

    from gradloc.cams.methods import compute_cams
    from gradloc.run.setup import load_classifier

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
                    focus: str | None = None, display: Display = Display()) -> Figure:
    """A sample grid of a detections pickle on a VOC split: boxes only (no heatmaps), drawn by ``display``.

    Args:
        detections: a ``gradloc.detections/1`` pickle.
        voc_root, year, split: the VOC split the detections were made on (its annotations give the GT).
        n, seed, sample, ids, focus: which images (see :func:`pick_images`).

    Raises:
        FileNotFoundError: missing pickle, VOC root, split or image.
        ValueError: the detections name images that are not in the split, malformed files.
    """

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
    chosen, label, selection = pick_images(dets, gt, str(detections), n, seed, sample, ids, focus, display)
    samples = [make_sample(gt.image_ids[i], np.asarray(dataset.load_image(gt.image_ids[i])), int(i), dets, gt,
                           label) for i in chosen]
    if label is None:
        samples = [display.apply(item) for item in samples]
    title = (f"{Path(detections).name}: boxes at tau = {dets.threshold:g} ({dets.threshold_mode}, "
             f"{dets.box_mode}) on VOC{year} {split}; {display.describe() if label is None else 'one class'}; "
             f"{selection}")
    return render_grid(samples, dets.classes, title)
