"""Tests of gradloc.demo: the synthetic VOC-layout dataset, DemoNet, training and checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEMO_SMALL
from PIL import Image

import gradloc.datasets.demo as demo
import gradloc.models.demo_cnn as demo_cnn
from gradloc.datasets.demo import DEMO_CLASSES, generate_demo
from gradloc.datasets.voc import VOCDataset
from gradloc.models.build import load_model
from gradloc.models.checkpoints import load_checkpoint
from gradloc.models.demo_cnn import DemoNet, train_demo_model

SPLITS = ("train", "val", "test", "trainval")


def open_split(root: Path, split: str) -> VOCDataset:
    return VOCDataset(root, year="demo", split=split, classes=DEMO_CLASSES)


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- dataset ------------------------------------------------------------------------------------------------


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


# --- model --------------------------------------------------------------------------------------------------


def test_demonet_shapes_and_cam_layout():
    torch.manual_seed(0)
    model = DemoNet().eval()
    x = torch.randn(2, 3, 128, 128)
    features = model.block4(model.block3(model.block2(model.block1(x))))
    assert features.shape == (2, 64, 32, 32) and model.gradloc_layer == "block4"
    layer, linear = model.gradloc_gap_linear
    assert layer == model.gradloc_layer
    # CAM's premise: logits are the linear layer applied to the global average of the feature layer
    expected = model.get_submodule(linear)(features.mean(dim=(2, 3)))
    torch.testing.assert_close(model(x), expected)
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, len(DEMO_CLASSES))


def test_demonet_block_layout():
    # block1: stride-2 stem; block2: pool + 3x3; middle: 3x3; last of >= 3 blocks: 1x1
    def kernels(model):
        return [[m.kernel_size[0] for m in model.get_submodule(b) if isinstance(m, torch.nn.Conv2d)]
                for b in model.blocks]

    assert kernels(DemoNet()) == [[3], [3], [3], [1]]
    assert kernels(DemoNet(widths=(4, 8))) == [[3], [3]] and DemoNet(widths=(4, 8)).gradloc_layer == "block2"
    assert kernels(DemoNet(widths=(4, 8, 8, 8, 8))) == [[3], [3], [3], [3], [1]]
    assert DemoNet().block1[0].stride == (2, 2) and isinstance(DemoNet().block2[0], torch.nn.MaxPool2d)
    assert DemoNet(widths=(4, 8))(torch.zeros(1, 3, 32, 32)).shape == (1, len(DEMO_CLASSES))


def test_demonet_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 positive widths"):
        DemoNet(widths=(8,))
    with pytest.raises(ValueError, match="n_classes >= 1"):
        DemoNet(n_classes=0)


# --- training and checkpoints -------------------------------------------------------------------------------


def test_checkpoint_contents_and_loading(demo_data, demo_checkpoint):
    model, checkpoint = load_model("demo_cnn", checkpoint=demo_checkpoint).model, load_checkpoint(demo_checkpoint)
    assert not model.training
    assert checkpoint["format"] == "gradloc.checkpoint/1" and checkpoint["arch"] == "demo_cnn"
    assert checkpoint["classes"] == list(DEMO_CLASSES) and checkpoint["head"] == "voc"
    assert checkpoint["input_size"] == 64 and checkpoint["resize_mode"] == "letterbox"
    assert checkpoint["weights"] is None and checkpoint["git_commit"] is None
    assert len(checkpoint["mean"]) == 3 and len(checkpoint["std"]) == 3
    train = checkpoint["train"]
    assert train["split"] == "train" and train["seed"] == 0 and train["epochs"] == 3
    assert 0.0 <= train["val_map"] <= 1.0 and train["seconds"] >= 0
    rebuilt = DemoNet(**checkpoint["arch_kwargs"])
    rebuilt.load_state_dict(checkpoint["state_dict"])
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), rebuilt.eval()(x))


def global_torch_state() -> tuple:
    return torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.random.get_rng_state()


def test_training_is_deterministic_and_reports_progress(demo_data, tmp_path):
    seen = []
    before = global_torch_state()
    kwargs = {"input_size": 64, "epochs": 2, "seed": 5, "max_seconds": 60.0}
    first = train_demo_model(demo_data, tmp_path / "a.pt", progress=lambda *a: seen.append(a), **kwargs)
    second = train_demo_model(demo_data, tmp_path / "b.pt", **kwargs)
    assert [(e, n) for e, n, _ in seen] == [(1, 2), (2, 2)] and all(loss > 0 for *_, loss in seen)
    a, b = load_checkpoint(first)["state_dict"], load_checkpoint(second)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = train_demo_model(demo_data, tmp_path / "c.pt", **{**kwargs, "seed": 6})
    c = load_checkpoint(other)["state_dict"]
    assert not torch.equal(a["fc.weight"], c["fc.weight"])
    after = global_torch_state()
    assert after[:2] == before[:2] and torch.equal(after[2], before[2])  # global torch state restored


def test_existing_checkpoint_is_reused_or_retrained(demo_data, tmp_path):
    out = tmp_path / "m.pt"
    kwargs = {"input_size": 64, "epochs": 1, "max_seconds": 60.0}
    train_demo_model(demo_data, out, **kwargs)
    data = out.read_bytes()
    calls = []
    train_demo_model(demo_data, out, progress=lambda *a: calls.append(a), **kwargs)
    assert calls == [] and out.read_bytes() == data  # reused
    train_demo_model(demo_data, out, progress=lambda *a: calls.append(a), **{**kwargs, "epochs": 2})
    assert len(calls) == 2 and load_checkpoint(out)["train"]["epochs"] == 2  # arguments changed: retrained
    out.write_bytes(b"garbage")
    train_demo_model(demo_data, out, **kwargs)
    assert load_checkpoint(out)["train"]["epochs"] == 1  # unreadable file: trained over


def test_max_seconds_stops_early(demo_data, tmp_path):
    out = train_demo_model(demo_data, tmp_path / "m.pt", input_size=32, epochs=50, max_seconds=1e-3)
    assert load_checkpoint(out)["train"]["epochs"] < 50


def test_load_errors(tmp_path, demo_checkpoint):
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: checkpoint not found"):
        load_model("demo_cnn", checkpoint=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.pt: not a loadable torch checkpoint"):
        load_model("demo_cnn", checkpoint=tmp_path / "junk.pt")
    torch.save({"format": "something/1"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: format is 'something/1', expected 'gradloc\.checkpoint/1'"):
        load_model("demo_cnn", checkpoint=tmp_path / "other.pt")
    other_arch = {**torch.load(demo_checkpoint, weights_only=True), "arch": "resnet50"}
    torch.save(other_arch, tmp_path / "arch.pt")
    with pytest.raises(ValueError, match="checkpoint is for model 'resnet50', not 'demo_cnn'"):
        load_model("demo_cnn", checkpoint=tmp_path / "arch.pt")
    state = DemoNet(widths=(8, 8, 8, 8)).state_dict()
    wrong_shape = {**torch.load(demo_checkpoint, weights_only=True), "arch_kwargs": {}, "state_dict": state}
    torch.save(wrong_shape, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"shape\.pt: state_dict does not fit demo_cnn"):
        load_model("demo_cnn", checkpoint=tmp_path / "shape.pt")


def test_letterboxed_training_input(demo_data):
    # the preprocessing the checkpoint records: letterbox into a square, padding = mean colour (0 after norm)
    images, labels, ids = demo_cnn._load_split(demo_data, "val", 64)
    first = Image.open(demo_data / "VOCdemo" / "JPEGImages" / f"{ids[0]}.jpg")
    w, h = first.size
    assert images.shape == (len(ids), 3, 64, 64) and labels.shape == (len(ids), len(DEMO_CLASSES))
    pad = (64 - round(h * 64 / w)) // 2  # images are wider than tall
    assert pad > 0 and torch.all(images[0, :, :pad] == 0) and torch.any(images[0, :, pad + 1] != 0)
