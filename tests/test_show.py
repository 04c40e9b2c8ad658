"""gradloc.show and `gradloc show`: box-drawing coordinates, sampling, IoU labels, PNG grids, error paths."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from gradloc.cache import HeatmapCache
from gradloc.cli import main
from gradloc.config import load_config
from gradloc.detections import Detections, GroundTruth
from gradloc.geometry import plan
from gradloc.io import save_pickle
from gradloc.show import (
    DPI,
    PANEL_INCHES,
    TITLE_INCHES,
    best_gt_iou,
    image_extent,
    sample_images,
    voc_box_to_rect,
)
from gradloc.voc import VOCDataset

CLASSES = ("cat", "dog")
# image id -> (width, height, [(class, [x1, y1, x2, y2], difficult)])
IMAGES = {
    "000001": (48, 36, [("cat", [5, 4, 20, 18], False), ("dog", [25, 10, 44, 30], False)]),
    "000002": (40, 40, [("dog", [8, 8, 30, 33], False)]),
    "000003": (36, 48, [("cat", [3, 20, 30, 45], False), ("cat", [1, 1, 4, 4], True)]),
}
INPUT_SIZE = 32
VOC_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "voc" / "VOCdevkit"


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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder (manifest, gt.pkl, detections at 0.2, heatmap cache) on a 3-image VOC folder."""
    root = tmp_path_factory.mktemp("show")
    voc = write_voc(root / "VOCdevkit")
    config = load_config(None, {"data.voc_root": str(voc), "data.year": "2007", "data.split": "val",
                                "data.classes": CLASSES, "boxes.explain": "gt", "boxes.thresholds": (0.2,),
                                "boxes.max_side": None, "out": str(root / "results"), "name": "tiny",
                                "cache_dir": str(root / "cache")})
    dataset = VOCDataset(voc, "2007", "val", CLASSES)
    gt = dataset.ground_truth()
    cache = HeatmapCache(root / "cache", {"score_kind": "logit", "layer": "2", "model": "tiny"})
    for image_id in dataset.image_ids:
        width, height, _ = IMAGES[image_id]
        geometry = plan(width, height, INPUT_SIZE, "letterbox")
        maps = np.zeros((2, 8, 8), np.float32)
        maps[0, 2:5, 1:4] = 2.0  # a blob for cat, another for dog
        maps[1, 3:7, 4:7] = 1.0
        cache.put(image_id, maps, np.array([2.0, -1.0], np.float32), geometry, "float32")
    run_dir = root / "results" / "tiny"
    save_pickle(gt, run_dir / "gt.pkl")
    dets = Detections(threshold=0.2, threshold_mode="max", box_mode="largest", classes=list(CLASSES),
                      image_ids=list(gt.image_ids), image_index=np.array([0, 0, 2], np.int64),
                      labels=np.array([0, 1, 0], np.int64), scores=np.array([0.9, 0.4, 0.7]),
                      boxes=np.array([[5, 4, 20, 18], [20, 10, 44, 30], [10, 10, 20, 20]], np.float64),
                      meta={"method": "gradcam", "layer": "2", "model": "tiny", "dataset": "VOC2007 val",
                            "classes_explained": "gt"})
    save_pickle(dets, run_dir / "detections" / "thr_0.200.pkl")
    manifest = {"config": config.to_dict(), "cache_dir": str(cache.root)}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return root, run_dir


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


def test_sample_is_seeded_and_only_images_with_boxes():
    dets, gt = _dets_gt()  # images 0, 1, 3 have boxes; 2 and 4 have none
    first = sample_images(dets, gt, 2, seed=7)
    assert len(first) == 2 and set(first) <= {0, 1, 3}
    np.testing.assert_array_equal(first, sample_images(dets, gt, 2, seed=7))
    np.testing.assert_array_equal(sample_images(dets, gt, 10, seed=0), [0, 1, 3])
    with pytest.raises(ValueError, match="at least 1"):
        sample_images(dets, gt, 0, seed=0)


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


def test_show_run_writes_a_grid_png(tiny_run):
    root, run_dir = tiny_run
    out = root / "samples.png"
    result = CliRunner().invoke(main, ["show", str(run_dir), "--threshold", "0.2", "--n", "10", "--seed", "0",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    # 3 images -> 3 rows; image 000001 explains cat and dog -> 1 + 2 columns
    with Image.open(out) as image:
        assert image.size == (round(3 * PANEL_INCHES[0] * DPI),
                              round((3 * PANEL_INCHES[1] + TITLE_INCHES + 0.3) * DPI))
    pixels, n_colours = _png_stats(out)
    assert pixels.std() > 0 and n_colours > 50
    assert _has_colour(pixels, (0x00, 0xD0, 0x00)) and _has_colour(pixels, (0xFF, 0x1A, 0x1A))  # GT and pred


@pytest.mark.slow
def test_show_guided_adds_a_panel_per_class(tiny_run, monkeypatch):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=4, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    loaded = SimpleNamespace(model=model, preprocessing=SimpleNamespace(
        input_size=INPUT_SIZE, resize_mode="letterbox", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    monkeypatch.setattr("gradloc.pipeline.load_classifier", lambda config: loaded)
    root, run_dir = tiny_run
    out = root / "guided.png"
    result = CliRunner().invoke(main, ["show", str(run_dir), "--threshold", "0.2", "--n", "3", "--guided",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    # image 000001 explains 2 classes: image + 2 heatmap panels + 2 Guided Grad-CAM panels per row
    with Image.open(out) as image:
        assert image.size == (round(5 * PANEL_INCHES[0] * DPI),
                              round((3 * PANEL_INCHES[1] + TITLE_INCHES + 0.3) * DPI))
    pixels, n_colours = _png_stats(out)
    assert pixels.std() > 0 and n_colours > 50


def test_show_detections_with_voc_root_draws_boxes_only(tiny_run):
    root, run_dir = tiny_run
    out = root / "boxes.png"
    result = CliRunner().invoke(main, ["show", "--detections", str(run_dir / "detections" / "thr_0.200.pkl"),
                                       "--voc-root", str(root / "VOCdevkit"), "--year", "2007",
                                       "--split", "val", "--n", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:  # 2 images, one panel each, side by side
        assert image.size == (round(2 * PANEL_INCHES[0] * DPI),
                              round((PANEL_INCHES[1] + TITLE_INCHES + 0.3) * DPI))
    pixels, n_colours = _png_stats(out)
    assert pixels.std() > 0 and n_colours > 50


@pytest.mark.slow
@pytest.mark.skipif(not (VOC_ROOT / "VOC2007").is_dir(), reason=f"no real VOC2007 subset at {VOC_ROOT}")
def test_real_voc_images_with_gt_boxes_as_predictions(tmp_path):
    """On real VOC2007 val images: predictions equal to the GT boxes are labelled IoU 1.00 and drawn."""
    gt = VOCDataset(VOC_ROOT, "2007", "val").ground_truth()
    dets = Detections(threshold=0.2, threshold_mode="max", box_mode="largest", classes=gt.classes,
                      image_ids=gt.image_ids, image_index=gt.image_index, labels=gt.labels,
                      scores=np.linspace(1.0, 0.5, len(gt.labels)), boxes=gt.boxes)
    save_pickle(dets, tmp_path / "thr_0.200.pkl")
    from gradloc.show import make_sample

    sample = make_sample(gt.image_ids[0], np.zeros((1, 1, 3), np.uint8), 0, dets, gt)
    np.testing.assert_array_equal(sample.det_iou, np.ones(len(sample.det_iou)))
    result = CliRunner().invoke(main, ["show", "--detections", str(tmp_path / "thr_0.200.pkl"), "--voc-root",
                                       str(VOC_ROOT), "--n", "3", "--out", str(tmp_path / "real.png")])
    assert result.exit_code == 0, result.output
    pixels, n_colours = _png_stats(tmp_path / "real.png")
    assert pixels.shape[:2] == (round((PANEL_INCHES[1] + TITLE_INCHES + 0.3) * DPI),
                                round(3 * PANEL_INCHES[0] * DPI))
    assert n_colours > 1000 and _has_colour(pixels, (0xFF, 0x1A, 0x1A))


def test_detections_on_another_split_are_refused(tiny_run, tmp_path):
    _, run_dir = tiny_run
    voc = write_voc(tmp_path / "other", {"000009": IMAGES["000002"]})
    result = CliRunner().invoke(main, ["show", "--detections", str(run_dir / "detections" / "thr_0.200.pkl"),
                                       "--voc-root", str(voc), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1
    assert "image '000001'" in result.output and "not in VOC2007 val" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--threshold", "0.5"], "no detections at threshold 0.5; this run has thresholds 0.200"),
    (["--threshold", "1.5"], "threshold 1.5 is outside [0, 1]"),
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
    ["RUN"],  # no --threshold
    ["--detections", "x.pkl"],  # no --voc-root
    ["--detections", "x.pkl", "--voc-root", "v", "--threshold", "0.2"],  # tau comes from the pickle
    ["RUN", "--threshold", "abc"],  # not a number
])
def test_usage_errors_exit_2(args):
    result = CliRunner().invoke(main, ["show", *args])
    assert result.exit_code == 2, result.output
