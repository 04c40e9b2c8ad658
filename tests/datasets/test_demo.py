"""Tests of gradloc.datasets.demo: the synthetic VOC-layout dataset (layout, schema, content, determinism, reuse)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gradloc.datasets.demo as demo
from gradloc.datasets.demo import DEMO_CLASSES, generate_demo
from gradloc.datasets.voc import VOCDataset
from tests.conftest import DEMO_SMALL

SPLITS = ("train", "val", "test", "trainval")


def open_split(root: Path, split: str) -> VOCDataset:
    return VOCDataset(root, year="demo", split=split, classes=DEMO_CLASSES)


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout(demo_data):
    base = demo_data / "VOCdemo"
    assert demo_data.name == "VOCdevkit"
    main = base / "ImageSets" / "Main"
    expected = {f"{s}.txt" for s in SPLITS} | {f"{c}_{s}.txt" for c in DEMO_CLASSES for s in SPLITS}
    assert {p.name for p in main.iterdir()} == expected
    ids = {s: (main / f"{s}.txt").read_text().split() for s in SPLITS}
    n = DEMO_SMALL
    assert [len(ids[s]) for s in SPLITS] == [n["n_train"], n["n_val"], n["n_test"], n["n_train"] + n["n_val"]]
    assert ids["train"][:2] == ["000001", "000002"]
    assert not set(ids["train"]) & set(ids["val"]) and not set(ids["val"]) & set(ids["test"])
    assert sorted(ids["trainval"]) == sorted(ids["train"] + ids["val"])
    every = ids["train"] + ids["val"] + ids["test"]
    assert sorted(p.stem for p in (base / "JPEGImages").glob("*.jpg")) == sorted(every)
    assert sorted(p.stem for p in (base / "Annotations").glob("*.xml")) == sorted(every)
    stamp = json.loads((base / demo.STAMP_NAME).read_text())
    assert (stamp["seed"], stamp["n_train"], stamp["version"]) == (n["seed"], n["n_train"], demo.DEMO_VERSION)


def test_xml_schema(demo_data):
    text = (demo_data / "VOCdemo" / "Annotations" / "000001.xml").read_text()
    tags = ("folder", "filename", "size", "width", "height", "depth", "object", "name", "pose", "truncated",
            "difficult", "bndbox", "xmin", "ymin", "xmax", "ymax")
    for tag in tags:
        assert f"<{tag}>" in text, tag
    assert "<folder>VOCdemo</folder>" in text and "<filename>000001.jpg</filename>" in text


def test_reader_parses_every_split_and_sizes_match(demo_data):
    sizes = set()
    for split in SPLITS:
        ds = open_split(demo_data, split)
        assert ds.skipped == []
        for image_id in ds.image_ids:
            image = ds.load_image(image_id)  # checks the annotation's <size> against the JPEG header
            sizes.add(image.size)
    widths, heights = zip(*sizes, strict=True)
    assert min(widths) >= 140 and max(widths) <= 180 and min(heights) >= 100 and max(heights) <= 140
    assert len({round(w / h, 2) for w, h in sizes}) > 5  # aspect ratios vary, so letterboxing is exercised


def test_content_statistics(demo_data):
    ds = open_split(demo_data, "trainval")
    per_image = [ds.annotation(i).objects for i in ds.image_ids]
    assert all(1 <= len(objects) <= 4 for objects in per_image)
    assert {o.name for objects in per_image for o in objects} == set(DEMO_CLASSES)
    assert sum(len({o.name for o in objects}) >= 2 for objects in per_image) >= 5  # several multi-class
    gt = ds.ground_truth()
    assert 1 <= gt.difficult.sum() < 0.3 * len(gt.difficult)  # a few difficult objects
    widths = gt.boxes[:, 2] - gt.boxes[:, 0] + 1
    heights = gt.boxes[:, 3] - gt.boxes[:, 1] + 1
    assert widths.min() < 12 and (widths / gt.image_sizes[gt.image_index, 0]).max() > 0.3  # small to large
    sizes = gt.image_sizes[gt.image_index]
    assert np.all(gt.boxes[:, :2] >= 1) and np.all(gt.boxes[:, 2] <= sizes[:, 0]) and np.all(
        gt.boxes[:, 3] <= sizes[:, 1])
    assert np.all(heights >= 1)


def test_class_files_agree_with_annotations(demo_data):
    for split in SPLITS:
        ds = open_split(demo_data, split)
        labels = ds.image_labels()
        for c, name in enumerate(DEMO_CLASSES):
            lines = (ds.main_dir / f"{name}_{split}.txt").read_text().split("\n")
            flags = dict(line.split() for line in lines if line.strip())
            assert [int(flags[image_id]) for image_id in ds.image_ids] == labels[:, c].tolist()
    text = (demo_data / "VOCdemo" / "ImageSets" / "Main" / "disc_train.txt").read_text()
    assert re.fullmatch(r"(\d{6} ( 1| 0|-1)\n)+", text)  # the devkit's "%s %2d" lines


def test_boxes_enclose_the_drawn_object(demo_data):
    # Objects are saturated colours on desaturated backgrounds: inside each non-difficult box some pixels
    # have the class's hue family, and the box rim is not far outside the object (tight boxes).
    ds = open_split(demo_data, "train")
    hues = {"disc": (0.95, 0.05), "square": (0.54, 0.66), "triangle": (0.25, 0.38), "cross": (0.09, 0.18)}
    for image_id in ds.image_ids[:10]:
        hsv = np.asarray(ds.load_image(image_id).convert("HSV"), dtype=np.float64) / 255.0
        for obj in ds.annotation(image_id).objects:
            if obj.difficult:
                continue
            x1, y1, x2, y2 = (int(v) for v in obj.box)
            patch = hsv[y1 - 1 : y2, x1 - 1 : x2]  # VOC 1-based inclusive -> numpy slice
            low, high = hues[obj.name]
            hue = patch[..., 0]
            in_family = (hue >= low) & (hue <= high) if low < high else (hue >= low) | (hue <= high)
            assert np.mean(in_family & (patch[..., 1] > 0.4)) > 0.15, (image_id, obj.name)


def test_rendered_boxes_are_tight_voc_boxes(monkeypatch):
    # On a plain grey background the saturated pixels are exactly the visible object pixels, so the union of
    # the boxes must be their bounding box, converted from 0-based indices to 1-based inclusive coordinates.
    monkeypatch.setattr(demo, "_background", lambda rng, width, height: np.full((height, width, 3), 0.5))
    for index in range(20):
        rng = np.random.default_rng(index)
        pixels, objects = demo._render(rng, 150, 110)
        hsv = np.asarray(Image.fromarray(pixels).convert("HSV"), dtype=np.float64) / 255.0
        rows, cols = np.nonzero(hsv[..., 1] > 0.3)
        boxes = np.array([o["box"] for o in objects])
        expected = [cols.min() + 1, rows.min() + 1, cols.max() + 1, rows.max() + 1]
        assert [boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()] == expected
        if len(objects) == 1:
            assert list(boxes[0]) == expected


def test_deterministic_bytes(tmp_path):
    small = {"n_train": 4, "n_val": 2, "n_test": 2}
    a = all_files(generate_demo(tmp_path / "a", seed=3, **small) / "VOCdemo")
    b = all_files(generate_demo(tmp_path / "b", seed=3, **small) / "VOCdemo")
    assert a == b and len(a) == 8 * 2 + 4 * 5 + 1  # images, annotations, split files, stamp
    c = all_files(generate_demo(tmp_path / "c", seed=4, **small) / "VOCdemo")
    assert a["JPEGImages/000001.jpg"] != c["JPEGImages/000001.jpg"]


def test_image_depends_only_on_seed_and_index(tmp_path):
    a = generate_demo(tmp_path / "a", n_train=2, n_val=1, n_test=0) / "VOCdemo"
    b = generate_demo(tmp_path / "b", n_train=3, n_val=1, n_test=1) / "VOCdemo"
    assert (a / "JPEGImages" / "000002.jpg").read_bytes() == (b / "JPEGImages" / "000002.jpg").read_bytes()


def test_reuse_and_regenerate(tmp_path):
    root = generate_demo(tmp_path, n_train=2, n_val=1, n_test=1)
    marker = root / "VOCdemo" / "marker"
    marker.write_text("still here")
    assert generate_demo(tmp_path, n_train=2, n_val=1, n_test=1) == root
    assert marker.exists()  # reused, not rewritten
    generate_demo(tmp_path, n_train=3, n_val=1, n_test=1)
    assert not marker.exists()  # different parameters: replaced
    assert len((root / "VOCdemo" / "ImageSets" / "Main" / "train.txt").read_text().split()) == 3
    assert [p.name for p in root.iterdir()] == ["VOCdemo"]  # no temporary folders left


def test_interrupted_generation_leaves_nothing_complete(tmp_path, monkeypatch):
    calls = []

    def crash(*args, **kwargs):
        calls.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_render", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_demo(tmp_path, n_train=2, n_val=1, n_test=1)
    assert calls and list((tmp_path / "VOCdevkit").iterdir()) == []
    monkeypatch.undo()
    root = generate_demo(tmp_path, n_train=2, n_val=1, n_test=1)
    assert len(open_split(root, "trainval")) == 3


def test_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "VOCdevkit" / "VOCdemo").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"VOCdemo exists but is not a gradloc demo dataset"):
        generate_demo(tmp_path, n_train=2, n_val=1, n_test=1)


@pytest.mark.parametrize("kwargs", [{"n_train": 0}, {"n_val": 0}, {"n_test": -1}, {"image_size": (20, 100)}])
def test_bad_generation_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match="demo"):
        generate_demo(tmp_path, **kwargs)
