"""Tests for gradloc.core.geometry: planning, back-projection onto the original image, grid -> VOC boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from gradloc.core.geometry import (
    Geometry,
    grid_boxes_to_voc,
    group_by_shape,
    plan,
    preprocess_image,
    upsample,
    working_size,
)


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


def test_plan_shortside_keeps_aspect_and_pads_right_bottom_to_the_stride() -> None:
    # 500x375 at 320: scale 320 / 375, 500 * 0.8533 = 426.7 -> 427; canvas 448 = 14 * 32 by 320 = 10 * 32
    assert plan(500, 375, 320, "shortside") == Geometry(500, 375, 448, 320, 427, 320, 0, 0)
    assert plan(375, 500, 320, "shortside") == Geometry(375, 500, 320, 448, 320, 427, 0, 0)
    # 333x500 at 224: 333 -> 224, 500 * 224 / 333 = 336.3 -> 336 = 10.5 * 32 -> canvas 352
    assert plan(333, 500, 224, "shortside") == Geometry(333, 500, 224, 352, 224, 336, 0, 0)
    assert plan(64, 64, 320, "shortside") == Geometry(64, 64, 320, 320, 320, 320, 0, 0)  # upscaled


def test_shortside_500x375_at_320_gives_a_14x10_map_on_a_stride_32_resnet() -> None:
    resnet = torchvision.models.resnet18(weights=None).eval()
    trunk = torch.nn.Sequential(*list(resnet.children())[:-2])  # up to layer4: total stride 32
    image = Image.new("RGB", (500, 375), (120, 80, 40))
    geometry = plan(500, 375, 320, "shortside")
    x = torch.from_numpy(preprocess_image(image, geometry, (0.5,) * 3, (0.25,) * 3))[None]
    assert tuple(x.shape) == (1, 3, 320, 448)
    with torch.no_grad():
        assert tuple(trunk(x).shape[2:]) == (10, 14)


def test_shortside_upsample_inverts_the_resize_and_crops_the_padding() -> None:
    """Stride-1 maps over the canvas: back-projection = bilinear resize of the image part of the canvas
    (padding cropped off) to the original size, torch's ``align_corners=False`` (upscaled image, so no
    original pixel centre reaches the padding)."""
    geometry = plan(100, 60, 120, "shortside")  # scale 2: 200x120 on a 224x128 canvas
    assert (geometry.input_w, geometry.input_h, geometry.resized_w, geometry.resized_h) == (224, 128, 200, 120)
    canvas = torch.rand((2, 128, 224), generator=torch.Generator().manual_seed(1))
    canvas[:, 120:, :] = 1e3  # padding: must not leak into the original image
    canvas[:, :, 200:] = 1e3
    crop = canvas[None, :, :120, :200]
    expected = F.interpolate(crop, size=(60, 100), mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(upsample(canvas.numpy(), geometry), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(250, 150), (150, 250), (301, 199)])
def test_shortside_round_trip_puts_a_hot_region_back_on_its_pixels(size: tuple[int, int]) -> None:
    """A white rectangle in a non-square image -> shortside input -> stride-8 average-pooled map ->
    back-projected: the map's >= half-max region is the rectangle, to within one feature cell."""
    width, height = size
    box = (int(0.55 * width), int(0.2 * height), int(0.9 * width), int(0.7 * height))  # 0-based, half-open
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[box[1] : box[3], box[0] : box[2]] = 255
    geometry = plan(width, height, 96, "shortside")
    x = preprocess_image(Image.fromarray(pixels), geometry, (0.0,) * 3, (1.0,) * 3)
    feature = F.avg_pool2d(torch.from_numpy(x[:1])[None], 8)[0, 0].numpy()
    assert feature.shape == (geometry.input_h // 8, geometry.input_w // 8)
    up = upsample(feature, geometry)
    assert up.shape == (height, width)
    found = voc_box_of_mask(up >= 0.5 * up.max())
    cell = 8 * min(width, height) / 96  # one feature cell in original pixels
    np.testing.assert_allclose(found, [box[0] + 1, box[1] + 1, box[2], box[3]], atol=cell)


def test_group_by_shape_batches_equal_input_shapes_in_first_seen_order() -> None:
    sizes = [(500, 375), (375, 500), (500, 333), (500, 375), (375, 500), (500, 376)]
    geometries = [plan(w, h, 320, "shortside") for w, h in sizes]
    # 500x375 and 500x376 -> 448x320; 375x500 -> 320x448; 500x333 -> 481x320 -> 512x320
    assert group_by_shape(geometries, 2) == [[0, 3], [5], [1, 4], [2]]
    assert group_by_shape(geometries, 8) == [[0, 3, 5], [1, 4], [2]]
    letterbox = [plan(w, h, 224) for w, h in sizes]
    assert group_by_shape(letterbox, 4) == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match="batch size 0"):
        group_by_shape(letterbox, 0)


def test_preprocessing_batches_group_shortside_inputs_and_batch_refuses_mixed_shapes() -> None:
    from gradloc.models.preprocessing import Preprocessing

    pre = Preprocessing(64, "shortside")
    sizes = [(100, 75), (75, 100), (100, 75)]
    assert pre.batches(sizes, 4) == [[0, 2], [1]]
    images = [Image.new("RGB", size) for size in sizes]
    inputs, geometries = pre.batch([images[0], images[2]])
    assert tuple(inputs.shape) == (2, 3, 64, 96) and geometries[0] == plan(100, 75, 64, "shortside")
    with pytest.raises(ValueError, match=r"group images with Preprocessing\.batches"):
        pre.batch(images)
