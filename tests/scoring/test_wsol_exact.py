"""MaxBoxAccV2 (wsolevaluation exact) against a literal, loop-by-loop re-implementation of wsolevaluation's steps
(``inference.py`` / ``evaluation.py`` at 96f4b88, re-written for this test), and hand-made score maps."""

from __future__ import annotations

import numpy as np
import pytest

from gradloc.core.geometry import plan
from gradloc.scoring.voc import box_iou
from gradloc.scoring.wsol import box_hits
from gradloc.scoring.wsol_exact import (
    EXACT_GRID,
    exact_hits,
    exact_max_box_acc,
    grid_label,
    normalize_scoremap,
    resize_gt_boxes,
    scoremap_boxes,
    scoremaps,
)

cv2 = pytest.importorskip("cv2")

PERCENT = (30, 50, 70)  # wsolevaluation's iou_threshold_list; a pair is correct when IoU >= δ / 100


# --- the reference: wsolevaluation's steps, one call at a time ------------------------------------------------


def _ref_normalize_scoremap(cam):
    if np.isnan(cam).any():
        return np.zeros_like(cam)
    if cam.min() == cam.max():
        return np.zeros_like(cam)
    cam -= cam.min()
    cam /= cam.max()
    return cam


def _ref_boxes_at_thresholds(scoremap, thresholds):
    height, width = scoremap.shape
    scoremap_image = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    boxes_per_threshold, counts = [], []
    for threshold in thresholds:
        _, binary = cv2.threshold(src=scoremap_image, thresh=int(threshold * np.max(scoremap_image)), maxval=255,
                                  type=cv2.THRESH_BINARY)
        contours = cv2.findContours(image=binary, mode=cv2.RETR_TREE, method=cv2.CHAIN_APPROX_SIMPLE)[0]
        if len(contours) == 0:
            boxes_per_threshold.append(np.asarray([[0, 0, 0, 0]]))
            counts.append(1)
            continue
        boxes = []
        for contour in contours:  # multi_contour_eval=True
            x, y, w, h = cv2.boundingRect(contour)
            boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
        boxes_per_threshold.append(np.asarray(boxes))
        counts.append(len(contours))
    return boxes_per_threshold, counts


def _ref_resize_bbox(box, image_size, resize_size):
    x0, y0, x1, y1 = map(float, box)
    image_w, image_h = map(float, image_size)
    new_w, new_h = map(float, resize_size)
    return int(x0 * new_w / image_w), int(y0 * new_h / image_h), int(x1 * new_w / image_w), int(y1 * new_h / image_h)


def _ref_multiple_iou(box_a, box_b):
    ious = np.zeros((len(box_a), len(box_b)))
    for i, a in enumerate(box_a.tolist()):
        for j, b in enumerate(box_b.tolist()):
            inter = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1) * max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
            denominator = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
            ious[i, j] = 0 if denominator <= 0 else inter / denominator
    return ious


def _ref_pair(cam, width, height, voc_boxes, thresholds):
    """bool[T, 3] of one pair: ``CAMComputer`` (stretched 224 x 224 input) + ``BoxEvaluator.accumulate``."""
    cam = cam.astype(np.float64)  # t2n
    scoremap = _ref_normalize_scoremap(cv2.resize(cam, (224, 224), interpolation=cv2.INTER_CUBIC))
    gt = np.array([_ref_resize_bbox([v - 1 for v in box], (width, height), (224, 224)) for box in voc_boxes])
    boxes, counts = _ref_boxes_at_thresholds(scoremap, thresholds)
    multiple_iou = _ref_multiple_iou(np.concatenate(boxes), gt)
    sliced, start = [], 0
    for count in counts:
        sliced.append(max(multiple_iou.max(1)[start:start + count]))
        start += count
    return np.array([[iou >= percent / 100 for percent in PERCENT] for iou in sliced])


def _ref_max_box_acc_v2(pair_hits):
    """``BoxEvaluator.compute`` (percent) and the mean over δ."""
    num_correct = np.sum(pair_hits, axis=0)  # [T, 3]
    return float(np.mean([(num_correct[:, d] * 100.0 / float(len(pair_hits))).max() for d in range(3)]))


# --- seeded cases --------------------------------------------------------------------------------------------


def _feature_map(rng, kind):
    h, w = (int(rng.integers(5, 15)), int(rng.integers(5, 15)))
    if kind == "noise":  # many regions, holes, ringing below zero after cubic upsampling
        return rng.random((h, w)).astype(np.float32)
    if kind == "signed":  # negative values (a CAM without ReLU)
        return rng.normal(size=(h, w)).astype(np.float32)
    y, x = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w))
    for _ in range(int(rng.integers(1, 4))):
        cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.7, 3)
        out += rng.uniform(0.3, 1) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    return out.astype(np.float32)


def _voc_boxes(rng, width, height):
    n = int(rng.integers(1, 4))
    x1, y1 = rng.integers(1, width // 2, n), rng.integers(1, height // 2, n)
    x2, y2 = np.minimum(x1 + rng.integers(3, width, n), width), np.minimum(y1 + rng.integers(3, height, n), height)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float64)


@pytest.mark.parametrize("seed", range(4))
def test_equals_the_literal_reference(seed):
    rng = np.random.default_rng(seed)
    ours, reference, saw_hole = [], [], False
    for i in range(9):
        width, height = int(rng.integers(100, 501)), int(rng.integers(100, 501))
        kind = ("blobs", "noise", "signed")[i % 3]
        first = _feature_map(rng, kind)
        maps = np.stack([first, rng.permutation(first.reshape(-1)).reshape(first.shape)])  # K = 2 classes
        gts = [_voc_boxes(rng, width, height) for _ in maps]
        geometry = plan(width, height, int(rng.integers(64, 449)), "stretch")
        ours.append(exact_hits(maps, geometry, gts))
        reference += [_ref_pair(m, width, height, g, EXACT_GRID) for m, g in zip(maps, gts, strict=True)]
        for m in maps:  # does some τ give a hole (a RETR_TREE child contour)?
            image = (_ref_normalize_scoremap(cv2.resize(m.astype(np.float64), (224, 224),
                                                        interpolation=cv2.INTER_CUBIC)) * 255).astype(np.uint8)
            for level in range(0, 255, 16):
                hierarchy = cv2.findContours((image > level).astype(np.uint8), cv2.RETR_TREE,
                                             cv2.CHAIN_APPROX_SIMPLE)[1]
                saw_hole |= hierarchy is not None and bool((hierarchy[0, :, 3] >= 0).any())
    ours, reference = np.concatenate(ours), np.stack(reference)
    np.testing.assert_array_equal(ours, reference)
    assert saw_hole and ours.any() and not ours.all()  # the cases exercise holes, hits and misses
    frame = exact_max_box_acc(ours)
    assert 100 * frame["max_box_acc"].iloc[-1] == pytest.approx(_ref_max_box_acc_v2(reference), abs=1e-12)


def test_fine_grid_equals_the_reference():
    """config.py's 0.001 step (repeated integer thresholds computed once) gives the reference's hits."""
    rng = np.random.default_rng(7)
    grid = np.arange(0, 1, 0.001)
    for kind in ("blobs", "noise"):
        cam = _feature_map(rng, kind)
        gt = _voc_boxes(rng, 300, 200)
        ours = exact_hits(cam[None], plan(300, 200, 224, "stretch"), [gt], grid=grid)[0]
        np.testing.assert_array_equal(ours, _ref_pair(cam, 300, 200, gt, grid))
    assert grid_label(grid) == "tau step 0.001" and grid_label(EXACT_GRID) == "tau step 0.01"


# --- hand-made score maps (224 x 224 maps of a 224 x 224 image: cv2.resize and the GT resize are identities) ---


IMAGE = plan(224, 224, 224, "stretch")


def _boxes_at(scoremap, tau):
    boxes, owner = scoremap_boxes(scoremap, [tau])
    return boxes[owner == 0].tolist()


def test_one_blob_over_a_gt_box():
    heat = np.zeros((224, 224))
    heat[50:100, 30:130] = 1.0  # pixels x 30..129, y 50..99 (0-based)
    # boundingRect (30, 50, 100, 50): the box is [x, y, x + w, y + h], one past the last pixel
    assert _boxes_at(heat, 0.5) == [[30, 50, 130, 100]]
    one_larger = np.array([[31.0, 51.0, 131.0, 101.0]])  # VOC, 0-based [30, 50, 130, 100]
    assert exact_hits(heat[None], IMAGE, [one_larger], ious=(0.999,)).all()  # IoU 1 at every τ
    blob_pixels = np.array([[31.0, 51.0, 130.0, 100.0]])  # exactly the blob's pixels: IoU 100·50 / (101·51)
    assert box_iou(np.array([30, 50, 130, 100]), resize_gt_boxes(blob_pixels, 224, 224)[0]) == pytest.approx(
        5000 / 5151)
    assert not exact_hits(heat[None], IMAGE, [blob_pixels], ious=(0.98,)).any()


def test_a_hole_gives_an_inner_box_that_counts():
    heat = np.zeros((224, 224))
    heat[40:120, 40:120] = 1.0
    heat[70:90, 70:90] = 0.0  # a 20 x 20 hole: its contour runs over the ring pixels around it, x/y 69..90
    assert sorted(_boxes_at(heat, 0.5)) == [[40, 40, 120, 120], [69, 69, 91, 91]]
    inner = np.array([[70.0, 70.0, 92.0, 92.0]])  # VOC of [69, 69, 91, 91]
    assert exact_hits(heat[None], IMAGE, [inner], ious=(0.999,)).all()
    # gradloc's own conventions cut one box per region: the hole's box is not there (IoU 23² / 81² with the ring)
    assert not box_hits(heat[None].astype(np.float32), [inner], ious=(0.5,), convention="wsolevaluation").any()


def test_boxes_at_the_border_are_clamped_to_223():
    heat = np.zeros((224, 224))
    heat[200:, 180:] = 1.0  # x + w = 224, y + h = 224
    assert _boxes_at(heat, 0.5) == [[180, 200, 223, 223]]


@pytest.mark.parametrize("value", [0.0, 3.5, np.nan])
def test_constant_or_nan_maps_score_the_box_0_0_0_0(value):
    heat = np.full((224, 224), value)
    scoremap = normalize_scoremap(heat)
    assert not scoremap.any()
    boxes, owner = scoremap_boxes(scoremap)
    assert boxes.tolist() == [[0, 0, 0, 0]] * 100 and owner.tolist() == list(range(100))
    corner = np.array([[1.0, 1.0, 1.0, 1.0]])  # VOC pixel (1, 1) = [0, 0, 0, 0]: IoU 1
    assert exact_hits(heat[None], IMAGE, [corner]).all()
    assert not exact_hits(heat[None], IMAGE, [np.array([[1.0, 1.0, 2.0, 2.0]])]).any()  # IoU 1/4


def test_strict_threshold_on_truncated_uint8():
    heat = np.zeros((224, 224))
    heat[0, 0] = 1.0  # u = 255
    heat[10:20, 10:20] = 0.5  # u = int(127.5) = 127; at τ = 0.5 the foreground is u > int(0.5 · 255) = 127
    assert sorted(_boxes_at(heat, 0.49)) == [[0, 0, 1, 1], [10, 10, 20, 20]]
    assert _boxes_at(heat, 0.5) == [[0, 0, 1, 1]]
    # the level is relative to the map's own maximum u (127 here, a map not normalized to 1)
    half = heat / 2  # u: 127 at (0, 0), int(63.75) = 63 in the block
    assert sorted(_boxes_at(half, 0.49)) == [[0, 0, 1, 1], [10, 10, 20, 20]]  # u > int(0.49 · 127) = 62
    assert _boxes_at(half, 0.5) == [[0, 0, 1, 1]]  # u > int(0.5 · 127) = 63


def test_normalize_scoremap_is_min_max():
    np.testing.assert_array_equal(normalize_scoremap(np.array([[2.0, 4.0], [3.0, 2.0]])), [[0, 1], [0.5, 0]])


def test_gt_boxes_are_made_0_based_then_truncated():
    # (x - 1) * 224 / W, truncated: 500 x 375 image
    voc = np.array([[1.0, 1.0, 500.0, 375.0], [100.0, 50.0, 101.0, 52.0]])
    expected = [[0, 0, int(499 * 224 / 500), int(374 * 224 / 375)],
                [int(99 * 224 / 500), int(49 * 224 / 375), int(100 * 224 / 500), int(51 * 224 / 375)]]
    assert resize_gt_boxes(voc, 500, 375).tolist() == expected


# --- the stretched frame for letterbox / shortside canvases -------------------------------------------------


def test_stretch_geometry_is_cv2_resize():
    cam = np.random.default_rng(1).random((10, 14)).astype(np.float32)
    np.testing.assert_array_equal(scoremaps(cam[None], plan(333, 250, 320, "stretch"))[0],
                                  cv2.resize(cam.astype(np.float64), (224, 224), interpolation=cv2.INTER_CUBIC))


def test_letterbox_is_the_image_cut_from_the_resized_canvas():
    """Canvas 64 x 64 with the 64 x 32 image at rows 16..47 (feature rows 2..5 of 8): stretching the image to
    224 x 224 scales the canvas to 224 x 448, the image at rows 112..335."""
    cam = np.random.default_rng(2).random((8, 8))
    geometry = plan(64, 32, 64, "letterbox")
    assert (geometry.pad_y, geometry.resized_h) == (16, 32)
    canvas = cv2.resize(cam, (224, 448), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_allclose(scoremaps(cam[None], geometry)[0], canvas[112:336], rtol=0, atol=1e-5)


def test_shortside_is_the_image_cut_from_the_resized_canvas():
    """500 x 375 at 320 short side: a 427 x 320 image on a 448 x 320 canvas, 13.34 of the 14 feature columns."""
    cam = np.random.default_rng(3).random((10, 14))
    geometry = plan(500, 375, 320, "shortside")
    assert (geometry.resized_w, geometry.input_w, geometry.pad_x) == (427, 448, 0)
    canvas = cv2.resize(cam, None, fx=224 / (427 * 14 / 448), fy=224 / 10, interpolation=cv2.INTER_CUBIC)
    np.testing.assert_allclose(scoremaps(cam[None], geometry)[0], canvas[:224, :224], rtol=0, atol=1e-5)


# --- rows and errors -----------------------------------------------------------------------------------------


def test_rows_name_the_protocol_and_the_step():
    hits = np.zeros((4, 100, 3), dtype=bool)
    hits[:3, 10, 0] = hits[:2, 20, 1] = hits[:1, 30, 2] = True
    frame = exact_max_box_acc(hits)
    assert frame["metric"].tolist() == [f"MaxBoxAccV2@{d} (wsolevaluation exact, tau step 0.01)" for d in
                                        (0.3, 0.5, 0.7)] + ["MaxBoxAccV2 (wsolevaluation exact, tau step 0.01)"]
    assert frame["max_box_acc"].tolist() == [0.75, 0.5, 0.25, 0.5]
    assert frame["best_threshold"].tolist()[:3] == [0.1, 0.2, 0.3] and frame["n_pairs"].eq(4).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="one per map"):
        exact_hits(np.ones((2, 4, 4)), IMAGE, [np.array([[1.0, 1.0, 2.0, 2.0]])])
    with pytest.raises(ValueError, match="GT box"):
        exact_hits(np.ones((1, 4, 4)), IMAGE, [np.zeros((0, 4))])
    with pytest.raises(ValueError, match="infinite"):
        exact_hits(np.full((1, 4, 4), np.inf), IMAGE, [np.array([[1.0, 1.0, 2.0, 2.0]])])
    with pytest.raises(ValueError, match="grid"):
        exact_hits(np.ones((1, 4, 4)), IMAGE, [np.array([[1.0, 1.0, 2.0, 2.0]])], grid=[1.5])
