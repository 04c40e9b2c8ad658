"""Tests of gradloc.models.imagenet_voc: the ImageNet -> VOC class mapping."""

from __future__ import annotations

import pytest

from gradloc.datasets.voc import VOC_CLASSES
from gradloc.models import imagenet_voc
from gradloc.models.imagenet_voc import IMAGENET_VOC_GROUPS, imagenet_groups
from tests.models.conftest import IMAGENET_NAMES


def test_mapping_covers_every_voc_class_with_a_non_empty_group() -> None:
    assert list(IMAGENET_VOC_GROUPS) == list(VOC_CLASSES)
    assert all(len(group) >= 1 for group in IMAGENET_VOC_GROUPS.values())


def test_mapping_names_match_imagenet_category_list() -> None:
    # every (index, name) pair of the table is the name torchvision gives that ImageNet index
    for voc_class, group in IMAGENET_VOC_GROUPS.items():
        for index, name in group:
            assert IMAGENET_NAMES[index] == name, (voc_class, index)


def test_mapping_groups_are_disjoint_and_hand_checked() -> None:
    groups = dict(zip(VOC_CLASSES, imagenet_groups(list(VOC_CLASSES)), strict=True))
    flat = [i for g in groups.values() for i in g]
    assert len(flat) == len(set(flat))
    assert groups["dog"] == list(range(151, 269))  # Chihuahua .. Mexican hairless, 118 breeds
    assert groups["cat"] == [281, 282, 283, 284, 285]
    assert groups["bird"] == [*range(7, 25), *range(80, 101), *range(127, 147)]
    assert groups["diningtable"] == [532]
    assert groups["sofa"] == [831]
    assert groups["person"] == [981, 982, 983]
    assert {407, 436, 468, 511, 609, 627, 656, 661, 717, 751, 817} <= set(groups["car"])
    assert 726 not in groups["aeroplane"]  # "plane" is a carpenter's plane
    assert 383 not in groups["cat"]  # "Madagascar cat" is a lemur


def test_mapping_docstring_states_the_person_caveat_and_every_class() -> None:
    doc = imagenet_voc.__doc__
    assert "person has no ImageNet-1k counterpart" in doc
    for name in VOC_CLASSES:
        assert name in doc


def test_imagenet_groups_rejects_unknown_class() -> None:
    with pytest.raises(ValueError, match=r"class\(es\) disc have no ImageNet-1k mapping"):
        imagenet_groups(["cat", "disc"])
