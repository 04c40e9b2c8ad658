"""Tests for gradloc.geometry: planning, back-projection onto the original image, grid -> VOC boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gradloc.geometry import Geometry, grid_boxes_to_voc, plan, preprocess_image, upsample, working_size


def test_plan_letterbox_and_stretch() -> None:
    assert plan(500, 375, 224) == Geometry(500, 375, 224, 224, 224, 168, 0, 28)
    assert plan(375, 500, 224) == Geometry(375, 500, 224, 224, 168, 224, 28, 0)
    assert plan(500, 375, 224, "stretch") == Geometry(500, 375, 224, 224, 224, 224, 0, 0)
    g = plan(333, 500, 224)
    assert Geometry.from_dict(g.to_dict()) == g


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((500, 375, 224, "crop"), "unknown resize mode 'crop'"),
        ((0, 375, 224), "0x375"),
        ((5, 5, 0), "input size 0"),
    ],
)
def test_plan_rejects_bad_arguments(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(*args)


def test_working_size() -> None:
    assert working_size(500, 375, 224) == (224, 168)
    assert working_size(375, 500, 112) == (84, 112)
    assert working_size(500, 375, None) == (500, 375)
    assert working_size(100, 50, 224) == (100, 50)  # never upscaled


def voc_box_of_mask(mask: np.ndarray) -> list[int]:
    rows, cols = np.nonzero(mask)
    return [cols.min() + 1, rows.min() + 1, cols.max() + 1, rows.max() + 1]


@pytest.mark.parametrize(
    ("geometry", "feature_shape", "rows", "cols", "expected"),
    [
        # stretch 100x50 -> 10x10 input, stride-1 features: cell (r, c) covers original
        # x in [10c, 10c + 10), y in [5r, 5r + 5). Rows 2..3, cols 3..5 -> x [30, 60), y [10, 20).
        (plan(100, 50, 10, "stretch"), (10, 10), slice(2, 4), slice(3, 6), [31, 11, 60, 20]),
        # letterbox 100x50 -> 20x20 input (scale 0.2, pad_y 5), stride-2 features: cell (r, c) covers canvas
        # [2c, 2c + 2) x [2r, 2r + 2). Cols 2..3 -> canvas x [4, 8) -> x [20, 40);
        # rows 4..5 -> canvas y [8, 12) -> y [(8 - 5) / 0.2, (12 - 5) / 0.2) = [15, 35).
        (plan(100, 50, 20), (10, 10), slice(4, 6), slice(2, 4), [21, 16, 40, 35]),
        # portrait letterbox 50x100 -> 20x20 (pad_x 5), stride 1: cols 7..8 -> canvas x [7, 9) -> x [10, 20);
        # rows 4..4 -> canvas y [4, 5) -> y [20, 25).
        (plan(50, 100, 20), (20, 20), slice(4, 5), slice(7, 9), [11, 21, 20, 25]),
    ],
)
def test_feature_blob_lands_on_the_original_pixels_it_covers(
    geometry: Geometry, feature_shape: tuple[int, int], rows: slice, cols: slice, expected: list[int]
) -> None:
    """Back-projected at full resolution, a block of feature cells is >= 0.5 exactly on the original
    pixels whose centres fall inside the block's footprint (bilinear weights 0.55 inside, 0.45 outside)."""
    heat = np.zeros(feature_shape, np.float32)
    heat[rows, cols] = 1.0
    up = upsample(heat, geometry)
    assert up.shape == (geometry.height, geometry.width) and up.dtype == np.float32
    assert voc_box_of_mask(up >= 0.5) == expected


def test_upsample_on_a_coarse_grid_samples_cell_centres() -> None:
    # 100x50 stretched to 10x10, stride 1; a 25x5 grid has cells of 4x10 pixels whose centres are at
    # x = 4i + 2 (canvas 0.4i + 0.2, feature 0.4i - 0.3) and y = 10j + 5 (canvas 2j + 1, feature 2j + 0.5).
    heat = np.arange(100, dtype=np.float32).reshape(10, 10)  # heat[r, c] = 10r + c: bilinear is exact
    up = upsample(heat, plan(100, 50, 10, "stretch"), out_w=25, out_h=5)
    fx = np.clip(0.4 * np.arange(25) - 0.3, 0, 9)
    fy = 2 * np.arange(5) + 0.5
    np.testing.assert_allclose(up, 10 * fy[:, None] + fx[None, :], rtol=1e-6)


@pytest.mark.parametrize(
    ("feature", "size"),
    [((7, 7), (224, 224)), ((5, 9), (37, 50)), ((14, 14), (375, 500)), ((20, 20), (7, 9))],
)
def test_upsample_equals_torch_bilinear_for_the_identity_geometry(
    feature: tuple[int, int], size: tuple[int, int]
) -> None:
    height, width = size
    geometry = Geometry(width, height, width, height, width, height, 0, 0)  # input = original image
    heat = torch.rand((3, *feature), generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(heat[None], size=size, mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(upsample(heat.numpy(), geometry), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upsample(heat[1].numpy(), geometry), expected[1], rtol=1e-5, atol=1e-6)


def test_grid_boxes_to_voc_on_the_full_grid_is_plus_one_on_the_start() -> None:
    boxes = np.array([[0, 0, 5, 3], [2, 1, 3, 2]], dtype=np.float64)  # half-open cells -> inclusive pixels
    np.testing.assert_array_equal(grid_boxes_to_voc(boxes, 10, 5, 10, 5), [[1, 1, 5, 3], [3, 2, 3, 2]])


def test_grid_boxes_to_voc_on_coarse_grids_covers_the_cells_with_whole_pixels() -> None:
    # 2x2-pixel cells: cells [3, 5) x [1, 4) are pixels [6, 10) x [2, 8)
    np.testing.assert_array_equal(grid_boxes_to_voc(np.array([[3, 1, 5, 4]]), 50, 25, 100, 50), [[7, 3, 10, 8]])
    # 224x168 grid over 500x375: cells [10, 20) -> x [22.32, 44.64) -> pixels 22..44 (0-based) -> 23..45;
    # cells [20, 30) -> y [44.64, 66.96) -> pixels 44..66 -> 45..67
    np.testing.assert_array_equal(
        grid_boxes_to_voc(np.array([[10, 20, 20, 30]]), 224, 168, 500, 375), [[23, 45, 45, 67]]
    )
    np.testing.assert_array_equal(
        grid_boxes_to_voc(np.array([[0, 0, 224, 168]]), 224, 168, 500, 375), [[1, 1, 500, 375]]
    )


def test_grid_boxes_to_voc_clips_and_keeps_shape() -> None:
    np.testing.assert_array_equal(grid_boxes_to_voc(np.array([[-1, 0, 12, 6]]), 10, 5, 10, 5), [[1, 1, 10, 5]])
    out = grid_boxes_to_voc(np.zeros((0, 4)), 10, 5, 10, 5)
    assert out.shape == (0, 4) and out.dtype == np.float64


def test_preprocess_image_letterboxes_with_zero_padding() -> None:
    image = Image.new("RGB", (100, 50), (255, 255, 255))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x = preprocess_image(image, plan(100, 50, 20), mean, std)
    assert x.shape == (3, 20, 20) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, :5], 0.0)  # pad_y = 5 rows of mean colour -> 0
    np.testing.assert_array_equal(x[:, 15:], 0.0)
    np.testing.assert_allclose(x[:, 5:15], 2.0)  # (1 - 0.5) / 0.25
    with pytest.raises(ValueError, match="image is 100x50, geometry expects 50x100"):
        preprocess_image(image, plan(50, 100, 20), mean, std)
