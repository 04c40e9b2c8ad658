"""gradloc.core.ranges: the one definition of valid τ and IoU lists, checked before any work (issue 18 item 12)."""

import pytest

from gradloc.core.ranges import MAX_IOUS, check_ious, check_thresholds, threshold_label


def test_minus_zero_is_zero():
    assert threshold_label(-0.0) == "0.000"
    assert [str(t) for t in check_thresholds([-0.0, 0.2])] == ["0.0", "0.2"]


@pytest.mark.parametrize(("values", "message"), [
    ([0.2, 0.2000000001], "thresholds: 0.2 and 0.2000000001 are the same threshold (0.200); give each once"),
    ([-0.0, 0.0], "thresholds: -0 and 0 are the same threshold (0.000)"),
    ([0.2, 0.2001], "thresholds[1]: 0.2001 has more than 3 decimals"),
    ([1.5], "thresholds[0]: 1.5 is outside [0, 1]"),
    ([float("nan")], "thresholds[0]: nan is outside [0, 1]"),
    ([], "thresholds: give at least one threshold"),
])
def test_thresholds_equal_at_file_name_precision_are_refused(values, message):
    with pytest.raises(ValueError) as error:
        check_thresholds(values)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(("values", "message"), [
    ([0.3, 0.3], "--iou: 0.3 and 0.3 are the same threshold"),
    ([0.5, 1.0], "--iou[1]: 1 is outside (0, 1)"),
    ([0.5, 0.0], "--iou[1]: 0 is outside (0, 1)"),
    ([i / 1000 for i in range(1, 1 + MAX_IOUS + 1)], f"--iou: {MAX_IOUS + 1} IoU thresholds; give at most"),
])
def test_ious_are_checked_with_the_flag_named(values, message):
    with pytest.raises(ValueError) as error:
        check_ious(values, "--iou")
    assert str(error.value).startswith(message)
