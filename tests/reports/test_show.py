"""gradloc.reports.show and `gradloc show`: box-drawing coordinates, sampling, IoU labels, PNG grids, error paths."""

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from gradloc.cams.cache import HeatmapCache
from gradloc.cli import main
from gradloc.core.files import save_pickle
from gradloc.core.formats import Detections, GroundTruth, load_detections
from gradloc.core.geometry import plan
from gradloc.datasets.voc import VOCDataset, file_fingerprint
from gradloc.reports.draw import DPI, PANEL_INCHES, Sample, best_gt_iou, image_extent, voc_box_to_rect
from gradloc.reports.show import Display, sample_images, show_run
from gradloc.run.config import load_config
from tests.conftest import VOC_ROOT

CLASSES = ("cat", "dog")
# image id -> (width, height, [(class, [x1, y1, x2, y2], difficult)])
IMAGES = {
    "000001": (48, 36, [("cat", [5, 4, 20, 18], False), ("dog", [25, 10, 44, 30], False)]),
    "000002": (40, 40, [("dog", [8, 8, 30, 33], False)]),
    "000003": (36, 48, [("cat", [3, 20, 30, 45], False), ("cat", [1, 1, 4, 4], True)]),
}
INPUT_SIZE = 32


def write_voc(root, images=IMAGES, split="val"):
    """A VOCdevkit/VOC2007 folder with small colourful JPEGs and their XML annotations."""
    base = root / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id, (width, height, objects) in images.items():
        yy, xx = np.mgrid[0:height, 0:width]
        noise = rng.integers(0, 255, (height, width))
        pixels = np.stack([255 * xx / width, 255 * yy / height, noise], axis=2)
        Image.fromarray(pixels.astype(np.uint8)).save(base / "JPEGImages" / f"{image_id}.jpg")
        xml = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
        for name, (x1, y1, x2, y2), difficult in objects:
            xml.append(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox>"
                       f"<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
        (base / "Annotations" / f"{image_id}.xml").write_text("".join(xml) + "</annotation>")
    (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    return root


def write_run(root, voc, dataset, dets_of, name="tiny"):
    """A run folder (manifest, gt.pkl, detections at 0.2, heatmap cache with a blob per class) on ``dataset``;
    ``dets_of(gt)`` gives the detections."""
    classes = tuple(dataset.classes)
    config = load_config(None, {"data.voc_root": str(voc), "data.year": "2007", "data.split": "val",
                                "data.classes": classes, "boxes.explain": "gt", "boxes.thresholds": (0.2,),
                                "boxes.max_side": None, "out": str(root / "results"), "name": name,
                                "cache_dir": str(root / "cache")})
    gt = dataset.ground_truth()
    cache = HeatmapCache(root / "cache", {"score_kind": "logit", "layer": "2", "model": "tiny"})
    for image_id, (width, height) in zip(gt.image_ids, gt.image_sizes, strict=True):
        geometry = plan(int(width), int(height), INPUT_SIZE, "letterbox")
        maps = np.zeros((len(classes), 8, 8), np.float32)
        for k in range(len(classes)):  # a blob per class, at a place depending on the class
            maps[k, 1 + k % 4 : 4 + k % 4, 1 + (k * 3) % 5 : 4 + (k * 3) % 5] = 1.0 + k
        scores = np.where(np.arange(len(classes)) % 2 == 0, 2.0, -1.0).astype(np.float32)
        cache.put(image_id, maps, scores, geometry, "float32", file_fingerprint(dataset.image_path(image_id)))
    run_dir = root / "results" / name
    save_pickle(gt, run_dir / "gt.pkl")
    save_pickle(dets_of(gt), run_dir / "detections" / "thr_0.200.pkl")
    manifest = {"config": config.to_dict(), "cache_dir": str(cache.root)}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir


META = {"method": "gradcam", "layer": "2", "model": "tiny", "dataset": "VOC2007 val", "classes_explained": "gt"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run on a 3-image VOC folder: detections cat + dog in 000001, cat in 000003, none in 000002."""
    root = tmp_path_factory.mktemp("show")
    voc = write_voc(root / "VOCdevkit")

    def dets_of(gt):
        return Detections(threshold=0.2, threshold_mode="max", box_mode="largest", classes=list(CLASSES),
                          image_ids=list(gt.image_ids), image_index=np.array([0, 0, 2], np.int64),
                          labels=np.array([0, 1, 0], np.int64), scores=np.array([0.9, 0.4, 0.7]),
                          boxes=np.array([[5, 4, 20, 18], [20, 10, 44, 30], [10, 10, 20, 20]], np.float64),
                          meta=META)

    return root, write_run(root, voc, VOCDataset(voc, "2007", "val", CLASSES), dets_of)


def _png_stats(path):
    pixels = np.asarray(Image.open(path).convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    return pixels, len(colours)


def _has_colour(pixels, rgb, tol=30):
    return bool(np.any(np.all(np.abs(pixels.astype(int) - rgb) <= tol, axis=2)))


# --- coordinates --------------------------------------------------------------------------------------------


def test_voc_box_to_rect_by_hand():
    assert voc_box_to_rect([3, 2, 5, 4]) == (2.0, 1.0, 3.0, 3.0)
    assert voc_box_to_rect([1, 1, 1, 1]) == (0.0, 0.0, 1.0, 1.0)  # one pixel: the first pixel's square
    assert image_extent(8, 6) == (0.0, 8.0, 6.0, 0.0)


def test_drawn_rectangle_covers_exactly_the_box_pixels():
    """An 8x6 image drawn at 10 screen pixels per image pixel; the VOC box [3, 2, 5, 4] covers image pixels
    x = 3..5, y = 2..4 (1-based), i.e. screen columns 20..49 and rows 10..39."""
    width, height, k = 8, 6, 10
    fig = Figure(figsize=(width * k / 100, height * k / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(np.ones((height, width, 3)), extent=image_extent(width, height), interpolation="nearest")
    x, y, w, h = voc_box_to_rect([3, 2, 5, 4])
    ax.add_patch(Rectangle((x, y), w, h, facecolor=(1, 0, 0), edgecolor="none", antialiased=False))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]
    assert pixels.shape == (60, 80, 3)
    red = (pixels[..., 0] == 255) & (pixels[..., 1] == 0) & (pixels[..., 2] == 0)
    expected = np.zeros_like(red)
    expected[10:40, 20:50] = True
    np.testing.assert_array_equal(red, expected)


# --- sampling and IoU labels --------------------------------------------------------------------------------


def _dets_gt():
    gt = GroundTruth(classes=["a", "b"], image_ids=["i0", "i1", "i2", "i3", "i4"],
                     image_sizes=np.full((5, 2), 50, np.int64), image_index=np.array([0, 3], np.int64),
                     labels=np.array([0, 1], np.int64), boxes=np.array([[1, 1, 10, 10], [1, 1, 5, 5]], float),
                     difficult=np.zeros(2, bool))
    dets = Detections(threshold=0.2, threshold_mode="max", box_mode="largest", classes=["a", "b"],
                      image_ids=gt.image_ids, image_index=np.array([1, 3], np.int64),
                      labels=np.array([0, 1], np.int64), scores=np.array([0.5, 0.6]),
                      boxes=np.array([[1, 1, 10, 10], [1, 1, 5, 5]], float))
    return dets, gt


def test_sample_is_seeded_and_among_images_with_detections_by_default():
    dets, gt = _dets_gt()  # detections in images 1 and 3; GT in 0 (class a) and 3 (class b)
    first = sample_images(dets, gt, 1, seed=7)
    assert len(first) == 1 and set(first) <= {1, 3}
    np.testing.assert_array_equal(first, sample_images(dets, gt, 1, seed=7))
    np.testing.assert_array_equal(sample_images(dets, gt, 10, seed=0), [1, 3])
    with pytest.raises(ValueError, match="at least 1"):
        sample_images(dets, gt, 0, seed=0)


def test_sample_gt_ignores_the_detections():
    dets, gt = _dets_gt()
    np.testing.assert_array_equal(sample_images(dets, gt, 10, seed=0, sample="gt"), [0, 3])
    other = Detections(threshold=0.5, threshold_mode="max", box_mode="largest", classes=["a", "b"],
                       image_ids=gt.image_ids, image_index=np.array([4], np.int64), labels=np.array([0]),
                       scores=np.array([0.1]), boxes=np.array([[1, 1, 2, 2]], float))
    for seed in range(5):  # same split, other detections: the same draw
        np.testing.assert_array_equal(sample_images(dets, gt, 1, seed, sample="gt"),
                                      sample_images(other, gt, 1, seed, sample="gt"))


def test_sample_of_one_class():
    dets, gt = _dets_gt()
    # class a: detected in 1, in GT in 0; class b: detected and in GT in 3
    np.testing.assert_array_equal(sample_images(dets, gt, 10, 0, label=0), [0, 1])
    np.testing.assert_array_equal(sample_images(dets, gt, 10, 0, sample="gt", label=0), [0])
    np.testing.assert_array_equal(sample_images(dets, gt, 10, 0, label=1), [3])
    empty = Detections(threshold=0.5, threshold_mode="max", box_mode="largest", classes=["a", "b"],
                       image_ids=gt.image_ids, image_index=np.zeros(0, np.int64), labels=np.zeros(0, np.int64),
                       scores=np.zeros(0), boxes=np.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"no images with detections at tau = 0.5.*--sample gt"):
        sample_images(empty, gt, 3, 0)
    with pytest.raises(ValueError, match="--sample 'all': choose from detected, gt"):
        sample_images(dets, gt, 3, 0, sample="all")


def test_best_gt_iou_by_hand():
    gt_boxes = np.array([[1, 1, 10, 5], [1, 1, 10, 10]], float)
    gt_labels = np.array([0, 1])
    det_boxes = np.array([[1, 1, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], float)
    det_labels = np.array([0, 1, 0])
    iou = best_gt_iou(det_boxes, det_labels, gt_boxes, gt_labels)
    # det 0 vs its class-0 box: intersection 10 x 5 = 50, union 100 + 50 - 50 = 100 (the class-1 box: 1.0)
    assert iou[0] == 0.5 and iou[1] == 1.0 and iou[2] == 0.0
    assert np.isnan(best_gt_iou(det_boxes, np.array([0, 1, 2]), gt_boxes, gt_labels)[2])


# --- the command --------------------------------------------------------------------------------------------


def test_help_has_an_example():
    result = CliRunner().invoke(main, ["show", "--help"])
    assert result.exit_code == 0 and "Example" in result.output


def _texts(fig):
    """The drawn texts: figure texts, legends, axes titles and box tags, tick and axis labels of shown axes."""
    texts = [*fig.texts, *(t for legend in fig.legends for t in legend.get_texts())]
    for ax in fig.axes:
        texts += [ax.title, *ax.texts]
        if ax.axison:
            texts += [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.yaxis.label, ax.xaxis.label]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def layout_problems(fig):
    """Texts outside the figure, box tags outside their image or overlapping another tag of the same image."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox.padded(1)
    problems = []
    for text in _texts(fig):
        e = text.get_window_extent(renderer)
        if not (frame.x0 <= e.x0 and e.x1 <= frame.x1 and frame.y0 <= e.y0 and e.y1 <= frame.y1):
            problems.append(f"outside the figure: {text.get_text()!r}")
    for legend in fig.legends:
        e = legend.get_window_extent(renderer)
        if not (frame.x0 <= e.x0 and e.x1 <= frame.x1 and frame.y0 <= e.y0 and e.y1 <= frame.y1):
            problems.append("legend outside the figure")
    for ax in fig.axes:
        area = ax.get_window_extent(renderer).padded(1)
        tags = [t for t in ax.texts if t.get_bbox_patch() is not None]
        extents = [t.get_window_extent(renderer) for t in tags]
        for tag, e in zip(tags, extents, strict=True):
            if not (area.x0 <= e.x0 and e.x1 <= area.x1 and area.y0 <= e.y0 and e.y1 <= area.y1):
                problems.append(f"tag outside its image: {tag.get_text()!r}")
        for i, a in enumerate(extents):
            for j in range(i):
                b = extents[j]
                if a.x0 < b.x1 - 0.5 and b.x0 < a.x1 - 0.5 and a.y0 < b.y1 - 0.5 and b.y0 < a.y1 - 0.5:
                    problems.append(f"tags overlap: {tags[i].get_text()!r} and {tags[j].get_text()!r}")
    return problems


def panel_axes(fig):
    """The image panels (axes with a title), without colour bars."""
    return [ax for ax in fig.axes if ax.get_title()]


def test_show_run_samples_images_with_detections(tiny_run):
    _, run_dir = tiny_run
    fig = show_run(run_dir, 0.2, n=10, seed=0)
    # images with detections: 000001 (cat, dog -> 2 heatmap panels) and 000003 (cat); 000002 has none
    titles = [ax.get_title() for ax in panel_axes(fig)]
    assert [t for t in titles if t.startswith("0000")] == ["000001", "000003"]
    heat = [ax for ax in panel_axes(fig) if "tau = 0.2" in ax.get_title()]
    assert len(heat) == 3 and all(len(ax.get_images()) == 2 for ax in heat)  # photo + heatmap
    assert len(fig.axes) == 2 * 3 + 3  # a 2 x 3 grid (one cell empty) + a colour bar per heatmap panel
    assert fig.get_figwidth() == pytest.approx(3 * PANEL_INCHES[0])
    assert fig.get_figheight() > 2 * PANEL_INCHES[1]
    assert "sample of 2 images with detections (seed 0)" in " ".join(fig._suptitle.get_text().split())
    assert layout_problems(fig) == []


def test_show_run_sample_gt_ids_and_class(tiny_run):
    _, run_dir = tiny_run
    titles = [ax.get_title() for ax in panel_axes(show_run(run_dir, 0.2, n=10, sample="gt"))]
    assert [t for t in titles if t.startswith("0000")] == ["000001", "000002", "000003"]
    fig = show_run(run_dir, 0.2, ids=["000003", "000002"])
    assert [ax.get_title() for ax in panel_axes(fig) if ax.get_title().startswith("0000")] == ["000003", "000002"]
    fig = show_run(run_dir, 0.2, n=10, focus="dog")  # dog: detected in 000001, GT in 000001 and 000002
    titles = [ax.get_title() for ax in panel_axes(fig)]
    assert titles[0::2] == ["000001", "000002"]
    assert titles[1].startswith("dog (p = ") and titles[3].startswith("dog (p = ")
    assert all(t.get_text().startswith("dog") for ax in fig.axes for t in ax.texts)  # only dog boxes
    with pytest.raises(ValueError, match=r"--class 'cow' is not a class of run .*choose from cat, dog"):
        show_run(run_dir, 0.2, focus="cow")
    with pytest.raises(ValueError, match=r"--ids: image '000009' is not among the 3 images of run"):
        show_run(run_dir, 0.2, ids=["000009"])


def test_per_image_writes_one_overlay_per_image_and_class(tiny_run, tmp_path):
    _, run_dir = tiny_run
    out = tmp_path / "overlays"
    result = CliRunner().invoke(main, ["show", str(run_dir), "--threshold", "0.2", "--n", "10",
                                       "--per-image", str(out)])
    assert result.exit_code == 0, result.output
    # 000001: cat and dog explained; 000003: cat; 000002 has no detection (not sampled)
    assert sorted(p.name for p in out.iterdir()) == ["000001_cat.png", "000001_dog.png", "000003_cat.png"]
    with Image.open(out / "000001_cat.png") as image:
        assert image.size[0] == IMAGES["000001"][0] and image.size[1] > IMAGES["000001"][1]  # + caption
    pixels, n_colours = _png_stats(out / "000001_cat.png")
    assert n_colours > 50 and _has_colour(pixels, (0x00, 0xD0, 0x00))
    result = CliRunner().invoke(main, ["show", str(run_dir), "--threshold", "0.2", "--sample", "gt",
                                       "--ids", "000002", "--per-image", str(tmp_path / "gt")])
    assert result.exit_code == 0 and [p.name for p in (tmp_path / "gt").iterdir()] == ["000002_dog.png"]


def test_crowded_labels_stay_inside_and_apart():
    """Six GT boxes sharing corners and long prediction tags at the image's right edge, in a narrow figure."""
    from gradloc.reports.draw import Sample, render_grid

    boxes = np.array([[1, 1, 40, 30], [1, 1, 38, 28], [2, 2, 39, 29], [60, 1, 80, 20], [60, 2, 80, 21],
                      [1, 1, 80, 60]], float)
    sample = Sample(image_id="x", image=np.full((60, 80, 3), 128, np.uint8), gt_boxes=boxes,
                    gt_labels=np.array([0, 1, 0, 1, 0, 1]), gt_difficult=np.array([0, 0, 1, 0, 0, 0], bool),
                    det_boxes=boxes[3:], det_labels=np.array([1, 0, 1]), det_scores=np.array([0.9, 0.8, 0.7]),
                    det_iou=np.array([1.0, 0.5, np.nan]))
    fig = render_grid([sample], ["pottedplant", "diningtable"], "a long title " * 20)
    assert len([t for t in fig.axes[0].texts]) == 9
    assert layout_problems(fig) == []


@pytest.mark.slow
def test_show_guided_adds_a_panel_per_class(tiny_run, monkeypatch):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=4, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    loaded = SimpleNamespace(model=model, preprocessing=SimpleNamespace(
        input_size=INPUT_SIZE, resize_mode="letterbox", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    monkeypatch.setattr("gradloc.run.setup.load_classifier", lambda config: loaded)
    root, run_dir = tiny_run
    out = root / "guided.png"
    result = CliRunner().invoke(main, ["show", str(run_dir), "--threshold", "0.2", "--n", "3", "--guided",
                                       "--png", str(out)])
    assert result.exit_code == 0, result.output
    # image 000001 explains 2 classes: image + 2 heatmap panels + 2 Guided Grad-CAM panels per row
    with Image.open(out) as image:
        assert image.size[0] == round(5 * PANEL_INCHES[0] * DPI)
    pixels, n_colours = _png_stats(out)
    assert pixels.std() > 0 and n_colours > 50


def test_show_detections_with_voc_root_draws_boxes_only(tiny_run):
    root, run_dir = tiny_run
    out = root / "boxes.png"
    result = CliRunner().invoke(main, ["show", "--detections", str(run_dir / "detections" / "thr_0.200.pkl"),
                                       "--voc-root", str(root / "VOCdevkit"), "--year", "2007",
                                       "--split", "val", "--n", "2", "--png", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:  # 2 images, one panel each, side by side
        assert image.size[0] == round(2 * PANEL_INCHES[0] * DPI)
        assert PANEL_INCHES[1] * DPI < image.size[1] < (PANEL_INCHES[1] + 1.5) * DPI
    pixels, n_colours = _png_stats(out)
    assert pixels.std() > 0 and n_colours > 50


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A run on the first 60 real VOC2007 val images whose predictions are their GT boxes (IoU 1.00)."""
    if not (VOC_ROOT / "VOC2007").is_dir():
        pytest.skip(f"no real VOC2007 subset at {VOC_ROOT}")
    root = tmp_path_factory.mktemp("real")
    dataset = VOCDataset(VOC_ROOT, "2007", "val", limit=60)

    def dets_of(gt):
        return Detections(threshold=0.2, threshold_mode="max", box_mode="largest", classes=gt.classes,
                          image_ids=gt.image_ids, image_index=gt.image_index, labels=gt.labels,
                          scores=np.linspace(1.0, 0.5, len(gt.labels)), boxes=gt.boxes, meta=META)

    run_dir = write_run(root, VOC_ROOT, dataset, dets_of, name="real")
    gt = dataset.ground_truth()
    crowded = np.argsort(-np.bincount(gt.image_index, minlength=len(gt.image_ids)), kind="stable")[:3]
    return run_dir, [gt.image_ids[i] for i in crowded], gt


@pytest.mark.slow
def test_real_voc_crowded_images_grid(real_run, tmp_path):
    """The three most crowded of 60 real images: every heatmap panel holds photo + map, tags readable, inside
    their image and apart, legend and titles inside the figure, and the CLI writes the PNG."""
    run_dir, crowded, gt = real_run
    fig = show_run(run_dir, 0.2, ids=crowded)
    rows = [ax for ax in panel_axes(fig) if ax.get_title() in crowded]
    heat = [ax for ax in panel_axes(fig) if "tau = 0.2" in ax.get_title()]
    assert len(rows) == 3 and heat and all(len(ax.get_images()) == 2 for ax in heat)
    n_objects = sum(int(np.sum(gt.image_index == gt.image_ids.index(i))) for i in crowded)
    assert sum(len(ax.texts) for ax in rows) == 2 * n_objects  # a GT name and a prediction tag per object
    assert all("IoU 1.00" in t.get_text() for ax in rows for t in ax.texts if t.get_color() == "white")
    assert all(t.get_fontsize() >= 5 for ax in fig.axes for t in ax.texts)
    assert layout_problems(fig) == []
    out = tmp_path / "real.png"
    result = CliRunner().invoke(main, ["show", str(run_dir), "--threshold", "0.2", "--n", "4", "--png", str(out)])
    assert result.exit_code == 0, result.output
    pixels, n_colours = _png_stats(out)
    assert n_colours > 1000 and _has_colour(pixels, (0xFF, 0x1A, 0x1A)) and _has_colour(pixels, (0, 0xD0, 0))


@pytest.mark.slow
def test_real_voc_narrow_grid_of_boxes(real_run):
    """One real image, boxes only (--detections): a 1-panel-wide figure whose legend wraps inside it."""
    from gradloc.reports.draw import make_sample, render_grid

    run_dir, crowded, gt = real_run
    dets = load_detections(run_dir / "detections" / "thr_0.200.pkl")
    image = np.asarray(VOCDataset(VOC_ROOT, "2007", "val").load_image(crowded[0]))
    fig = render_grid([make_sample(crowded[0], image, gt.image_ids.index(crowded[0]), dets, gt)], gt.classes,
                      "one image")
    assert fig.get_figwidth() == pytest.approx(PANEL_INCHES[0])
    assert layout_problems(fig) == []


def test_detections_on_another_split_are_refused(tiny_run, tmp_path):
    _, run_dir = tiny_run
    voc = write_voc(tmp_path / "other", {"000009": IMAGES["000002"]})
    result = CliRunner().invoke(main, ["show", "--detections", str(run_dir / "detections" / "thr_0.200.pkl"),
                                       "--voc-root", str(voc), "--png", str(tmp_path / "x.png")])
    assert result.exit_code == 1
    assert "image '000001'" in result.output and "not in VOC2007 val" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--threshold", "0.5"], "no detections at threshold 0.5; this run has thresholds 0.200"),
    (["--threshold", "1.5"], "threshold: 1.5 is outside [0, 1]"),
])
def test_bad_threshold_is_one_line_exit_1(tiny_run, args, message):
    _, run_dir = tiny_run
    result = CliRunner().invoke(main, ["show", str(run_dir), *args])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output


def test_missing_run_folder_is_one_line_exit_1(tmp_path):
    result = CliRunner().invoke(main, ["show", str(tmp_path / "nope"), "--threshold", "0.2"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: {tmp_path / 'nope'}: run folder not found; give a "
                                                  "folder made by `gradloc run`"]


def test_missing_cache_is_one_line_exit_1(tiny_run, tmp_path):
    _, run_dir = tiny_run
    moved = tmp_path / "run"
    moved.mkdir()
    for name in ("gt.pkl", "detections"):
        (moved / name).symlink_to(run_dir / name)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["cache_dir"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["show", str(moved), "--threshold", "0.2"])
    assert result.exit_code == 1
    assert "heatmap cache of run" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [
    [],  # neither a run folder nor --detections
    ["RUN", "--detections", "x.pkl", "--voc-root", "v"],  # both
    ["--detections", "x.pkl"],  # no --voc-root
    ["--detections", "x.pkl", "--voc-root", "v", "--threshold", "0.2"],  # tau comes from the pickle
    ["RUN", "--threshold", "abc"],  # not a number
])
def test_usage_errors_exit_2(args):
    result = CliRunner().invoke(main, ["show", *args])
    assert result.exit_code == 2, result.output


# --- the display rule ---------------------------------------------------------------------------------------


def _crowded_sample():
    """GT: cat (0) and dog (1); predictions of the 20-class case: one box per class, most of them wrong."""
    labels = np.array([0, 1, 2, 3, 4, 2, 5], np.int64)
    scores = np.array([0.01, 0.5, 0.9, 0.2, 0.05, 0.3, 0.1])
    boxes = np.tile(np.array([[1.0, 1.0, 10.0, 10.0]]), (len(labels), 1))
    return Sample(image_id="x", image=np.zeros((12, 12, 3), np.uint8), gt_boxes=boxes[:2].copy(),
                  gt_labels=np.array([0, 1], np.int64), gt_difficult=np.zeros(2, bool), det_boxes=boxes,
                  det_labels=labels, det_scores=scores, det_iou=np.full(len(labels), np.nan))


def test_display_draws_gt_classes_whatever_their_confidence_and_the_top_confident_others():
    sample = _crowded_sample()
    # others by their best box: 2 (0.9), 3 (0.2), 5 (0.1 = the cut: drawn), 4 (0.05 < cut)
    np.testing.assert_array_equal(Display(min_score=0.1, top=3).classes(sample), [0, 1, 2, 3, 5])
    np.testing.assert_array_equal(Display(min_score=0.1, top=1).classes(sample), [0, 1, 2])
    np.testing.assert_array_equal(Display(min_score=0.95, top=3).classes(sample), [0, 1])
    drawn = Display(min_score=0.1, top=1).apply(sample)
    np.testing.assert_array_equal(drawn.det_labels, [0, 1, 2, 2])  # both boxes of class 2
    assert drawn.hidden == 3 and drawn.gt_labels.tolist() == [0, 1]
    # panels: GT classes first, each group by probability, at most `panels`
    probabilities = np.array([0.1, 0.8, 0.95, 0.5, 0.0, 0.2])
    np.testing.assert_array_equal(Display(0.1, 3, panels=4).panel_classes(sample, probabilities), [1, 0, 2, 3])
    np.testing.assert_array_equal(Display(0.1, 3, panels=1).panel_classes(sample, probabilities), [1])
    with pytest.raises(ValueError, match="--min-score"):
        Display(min_score=1.5)


def test_show_draws_the_run_selected_tau_by_default(tiny_run, tmp_path):
    import shutil

    _, run_dir = tiny_run
    with pytest.raises(ValueError, match=r"no selected tau .*give --threshold, one of 0\.2"):
        show_run(run_dir, n=2)
    selected = tmp_path / "selected"
    shutil.copytree(run_dir, selected)
    dets = load_detections(selected / "detections" / "thr_0.200.pkl")
    save_pickle(dataclasses.replace(dets, meta={**dets.meta, "selected_threshold": 0.2, "selected_on": "train"}),
                selected / "detections" / "thr_0.200.pkl")
    fig = show_run(selected, n=2)
    title = " ".join(fig._suptitle.get_text().split())
    assert "boxes at tau = 0.2 (the run's selected tau;" in title and "drawn: GT boxes" in title
    result = CliRunner().invoke(main, ["show", str(selected), "--n", "2", "--png", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
