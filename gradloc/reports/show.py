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
        image, entry = read_run_image(run, dataset, cache, image_id)
        probs = class_probabilities(entry.scores, cache.key_data["score_kind"])
        explained = np.union1d(explained_classes(config.boxes.explain, probs, gt.labels[gt.image_index == index],
                                                  config.boxes.score_cut),
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
