"""Principal-component maps (gradloc.cams.eigen): the projection by hand, its sign convention, EigenCAM in the
engine, and the options' errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradloc.cams.agreement import tiny_case
from gradloc.cams.eigen import principal_component_map
from gradloc.cams.methods import METHODS, compute_cams, compute_gradient_cams


def test_projection_by_hand():
    # 2 channels on 1 x 3 cells: the points (0, 0), (1, 1), (2, 2) lie on the diagonal; centred at (1, 1), the
    # first component is (1, 1) / sqrt 2 and the scores are -sqrt 2, 0, sqrt 2 (hot where the channels are high)
    stack = torch.tensor([[[[0.0, 1.0, 2.0]], [[0.0, 1.0, 2.0]]]])
    expected = torch.tensor([[[-np.sqrt(2), 0.0, np.sqrt(2)]]], dtype=torch.float32)
    torch.testing.assert_close(principal_component_map(stack), expected)
    torch.testing.assert_close(principal_component_map(-stack), -expected)  # oriented by the channel sum


def test_sign_agrees_with_the_channel_sum_and_numpy_up_to_sign():
    generator = torch.Generator().manual_seed(0)
    stack = torch.rand(6, 16, 5, 7, generator=generator, dtype=torch.float64)
    ours = principal_component_map(stack)
    for n in range(len(stack)):
        points = stack[n].reshape(16, -1).T.numpy()
        centred = points - points.mean(axis=0)
        reference = (centred @ np.linalg.svd(centred)[2][0]).reshape(5, 7)
        sign = np.sign((reference * stack[n].sum(0).numpy()).sum())
        np.testing.assert_allclose(ours[n].numpy(), sign * reference, atol=1e-12)
        assert float((ours[n] * stack[n].sum(0)).sum()) >= 0


def test_a_tie_makes_the_largest_score_positive():
    # channel 1 = 2 - channel 0: the channel sum is constant, so the scores (zero mean) do not correlate with it
    first = torch.tensor([[0.0, 3.0, 1.0]])
    stack = torch.stack([first, 2 - first])[None]
    scores = principal_component_map(stack)[0, 0]
    assert scores[scores.abs().argmax()] > 0


def test_eigencam_is_class_agnostic_and_needs_no_gradients():
    model, layer, images, classes = tiny_case()
    assert not METHODS["eigencam"].needs_gradients
    with torch.no_grad():
        maps, scores = compute_cams(model, images, classes, "eigencam", layer)
    assert maps.shape == (2, 2, 16, 16) and torch.equal(maps[:, 0], maps[:, 1]) and maps.min() >= 0
    torch.testing.assert_close(scores, model(images))


def test_eigen_smooth_of_one_method_equals_the_shared_pass():
    model, layer, images, classes = tiny_case()
    shared, _ = compute_gradient_cams(model, images, classes, ["gradcam", "layercam"], layer, eigen_smooth=True,
                                      aug_smooth=True)
    for method in ("gradcam", "layercam"):
        alone, _ = compute_cams(model, images, classes, method, layer, eigen_smooth=True, aug_smooth=True)
        torch.testing.assert_close(shared[method], alone, rtol=0, atol=0)


@pytest.mark.parametrize(("options", "message"), [
    ({"method": "scorecam", "eigen_smooth": True}, r"eigen_smooth applies to the gradient methods .*not scorecam"),
    ({"method": "eigencam", "eigen_smooth": True}, "EigenCAM is already a principal component"),
    ({"method": "gradcam", "flip": True, "aug_smooth": True}, "aug_smooth already averages the mirrored image"),
])
def test_option_errors(options, message):
    model, layer, images, classes = tiny_case()
    with pytest.raises(ValueError, match=message):
        compute_cams(model, images, classes, layer=layer, **options)


def test_options_are_in_the_cache_key_only_when_on(cams_config, demo_data):
    from gradloc.run.cams import cams_cache
    from gradloc.run.config import open_dataset
    from gradloc.run.setup import load_classifier

    config = cams_config(demo_data)
    loaded, dataset = load_classifier(config), open_dataset(config)
    plain = cams_cache(config, loaded, dataset)
    assert "aug_smooth" not in plain.key_data and "eigen_smooth" not in plain.key_data  # old caches stay valid
    roots = {plain.root}
    for options in ({"cams.aug_smooth": True}, {"cams.eigen_smooth": True},
                    {"cams.aug_smooth": True, "cams.eigen_smooth": True}):
        cache = cams_cache(cams_config(demo_data, **options), loaded, dataset)
        assert all(cache.key_data[key.split(".")[1]] is True for key in options)
        roots.add(cache.root)
    assert len(roots) == 4


@pytest.mark.slow
def test_eigencam_and_the_smoothing_options_run_end_to_end(cams_config, demo_data):
    from gradloc.run.pipeline import run

    for name, options, label in (("eig", {"cams.method": "eigencam"}, "eigencam"),
                                 ("smooth", {"cams.aug_smooth": True, "cams.eigen_smooth": True},
                                  "gradcam (eigen_smooth, aug_smooth)")):
        result = run(cams_config(demo_data, name=name, **{"boxes.thresholds": [0.2, 0.4], **options}))
        assert result.meta["method"] == label
        assert (result.rows["source"] == "cam").any() and result.rows["ap"].notna().any()


def test_config_refuses_eigen_smooth_without_gradients_before_any_work(cams_config, demo_data):
    from gradloc.run.setup import check_names

    with pytest.raises(ValueError, match="not cam"):
        check_names(cams_config(demo_data, **{"cams.method": "cam", "cams.eigen_smooth": True}))
    with pytest.raises(ValueError, match="turn one off"):
        check_names(cams_config(demo_data, **{"cams.flip": True, "cams.aug_smooth": True}))
