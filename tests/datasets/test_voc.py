"""Tests of gradloc.datasets.voc: XML parsing, dataset errors, labels and ground truth; the real VOC2007 subset."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradloc.datasets.voc import (
    VOC_CLASSES,
    DatasetError,
    MissingFileError,
    VOCDataset,
    file_fingerprint,
    parse_annotation,
)

# --- helpers ------------------------------------------------------------------------------------------------


def obj_xml(name: str, box: tuple, difficult: str | None = "0", truncated: str | None = "0",
            pose: str | None = "Unspecified") -> str:
    fields = [f"<name>{name}</name>"]
    fields += [f"<pose>{pose}</pose>"] if pose is not None else []
    fields += [f"<truncated>{truncated}</truncated>"] if truncated is not None else []
    fields += [f"<difficult>{difficult}</difficult>"] if difficult is not None else []
    x1, y1, x2, y2 = box
    fields.append(f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>")
    return "<object>" + "".join(fields) + "</object>"


def annotation_xml(image_id: str, width: int, height: int, objects: list[str]) -> str:
    return (f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{''.join(objects)}</annotation>")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def make_devkit(root: Path, images: dict[str, tuple[int, int, list[str]]], splits: dict[str, list[str]],
                year: str = "2007") -> Path:
    """A VOCdevkit with one annotation and one image per id: images[id] = (width, height, object xmls)."""
    base = root / "VOCdevkit" / f"VOC{year}"
    for image_id, (width, height, objects) in images.items():
        write(base / "Annotations" / f"{image_id}.xml", annotation_xml(image_id, width, height, objects))
        (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height), (10, 20, 30)).save(base / "JPEGImages" / f"{image_id}.jpg")
    for split, ids in splits.items():
        write(base / "ImageSets" / "Main" / f"{split}.txt", "".join(f"{i}\n" for i in ids))
    return root / "VOCdevkit"


@pytest.fixture
def small_devkit(tmp_path: Path) -> Path:
    """Three images: a dog + a difficult cat; only a difficult dog; a person touching the border."""
    images = {
        "000001": (100, 80, [obj_xml("dog", (10, 20, 50, 60)), obj_xml("cat", (1, 1, 5, 5), difficult="1")]),
        "000002": (120, 90, [obj_xml("dog", (30, 30, 40, 40), difficult="1")]),
        "000003": (64, 48, [obj_xml("person", (33, 1, 64, 48), difficult=None, truncated=None, pose=None)]),
    }
    return make_devkit(tmp_path, images, {"val": ["000001", "000002", "000003"], "train": ["000003"]})


# --- parse_annotation ---------------------------------------------------------------------------------------


def test_parse_fields_and_coordinates_kept_as_written(tmp_path):
    path = write(tmp_path / "000005.xml", annotation_xml("000005", 500, 375, [
        obj_xml("chair", (263, 211, 324, 339), pose="Left", truncated="1", difficult="0"),
        obj_xml("dog", (1, 2, 500, 375), pose="Frontal", truncated="0", difficult="1"),
    ]))
    ann = parse_annotation(path, VOC_CLASSES)
    assert (ann.image_id, ann.width, ann.height, ann.depth, ann.path) == ("000005", 500, 375, 3, path)
    chair, dog = ann.objects
    fields = ("name", "label", "pose", "truncated", "difficult")
    assert tuple(getattr(chair, f) for f in fields) == ("chair", 8, "Left", True, False)
    assert chair.box.dtype == np.float64
    np.testing.assert_array_equal(chair.box, [263.0, 211.0, 324.0, 339.0])  # 1-based inclusive, unchanged
    assert tuple(getattr(dog, f) for f in fields) == ("dog", 11, "Frontal", False, True)
    np.testing.assert_array_equal(dog.box, [1.0, 2.0, 500.0, 375.0])  # x2 == width is the last pixel column


def test_missing_flags_and_pose_default(tmp_path):
    path = write(tmp_path / "a.xml", annotation_xml("a", 50, 40, [
        obj_xml("cat", (1, 1, 10, 10), difficult=None, truncated=None, pose=None),
        obj_xml("cat", (1, 1, 10, 10), difficult="", truncated="", pose=""),
    ]))
    for obj in parse_annotation(path, VOC_CLASSES).objects:
        assert (obj.difficult, obj.truncated, obj.pose) == (False, False, "Unspecified")


def test_float_coordinates_accepted(tmp_path):
    objects = [obj_xml("cat", ("10.5", "3.25", "20.0", "39.75"))]
    path = write(tmp_path / "a.xml", annotation_xml("a", 50, 40, objects))
    box = parse_annotation(path, VOC_CLASSES).objects[0].box
    np.testing.assert_array_equal(box, [10.5, 3.25, 20.0, 39.75])


def test_custom_class_list_sets_labels(tmp_path):
    path = write(tmp_path / "a.xml", annotation_xml("a", 50, 40, [obj_xml("ring", (1, 1, 5, 5)),
                                                                   obj_xml("disc", (1, 1, 5, 5))]))
    assert [o.label for o in parse_annotation(path, ["disc", "ring"]).objects] == [1, 0]


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((20, 5, 10, 9), "xmax < xmin"),
        ((5, 20, 10, 9), "xmax < xmin or ymax < ymin"),
        (("abc", 5, 10, 9), "'abc', not a number"),
        (("nan", 5, 10, 9), "not a finite number"),
        ((5, 5, 52, 9), "outside the 50x40 image"),  # two pixels beyond the right border
        ((-1, 5, 10, 9), "outside the 50x40 image"),
        ((5, 5, 10, 42), "outside the 50x40 image"),
    ],
)
def test_bad_coordinates_name_the_file(tmp_path, box, message):
    path = write(tmp_path / "bad.xml", annotation_xml("bad", 50, 40, [obj_xml("cat", box)]))
    with pytest.raises(DatasetError, match=re.escape(message)) as info:
        parse_annotation(path, VOC_CLASSES)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_box_within_one_pixel_tolerance_is_kept(tmp_path):
    # 0-based writers produce x1 == 0; a box may reach one pixel past the border
    path = write(tmp_path / "a.xml", annotation_xml("a", 50, 40, [obj_xml("cat", (0, 0, 51, 41))]))
    np.testing.assert_array_equal(parse_annotation(path, VOC_CLASSES).objects[0].box, [0, 0, 51, 41])


def test_missing_bndbox_field(tmp_path):
    text = annotation_xml("a", 50, 40, [obj_xml("cat", (1, 2, 3, 4))]).replace("<ymax>4</ymax>", "")
    with pytest.raises(DatasetError, match="ymax> is missing"):
        parse_annotation(write(tmp_path / "a.xml", text), VOC_CLASSES)


def test_malformed_xml(tmp_path):
    path = write(tmp_path / "broken.xml", "<annotation><size><width>3</width></annotation>")
    with pytest.raises(DatasetError, match=r"broken\.xml: malformed XML \(mismatched tag"):
        parse_annotation(path, VOC_CLASSES)


def test_wrong_root_element(tmp_path):
    with pytest.raises(DatasetError, match="root element is <html>"):
        parse_annotation(write(tmp_path / "a.xml", "<html></html>"), VOC_CLASSES)


def test_billion_laughs_rejected(tmp_path):
    entities = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    text = (f'<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY l0 "lol">{entities}]>'
            "<annotation><folder>&l9;</folder></annotation>")
    path = write(tmp_path / "laughs.xml", text)
    with pytest.raises(DatasetError, match=r"laughs\.xml: refused unsafe XML \(EntitiesForbidden"):
        parse_annotation(path, VOC_CLASSES)


def test_external_entity_rejected(tmp_path):
    secret = write(tmp_path / "secret.txt", "password")
    text = (f'<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY x SYSTEM "file://{secret}">]>'
            "<annotation><folder>&x;</folder></annotation>")
    with pytest.raises(DatasetError, match="refused unsafe XML"):
        parse_annotation(write(tmp_path / "ext.xml", text), VOC_CLASSES)


def test_unknown_class_lists_known(tmp_path):
    path = write(tmp_path / "u.xml", annotation_xml("u", 50, 40, [obj_xml("unicorn", (1, 1, 5, 5))]))
    with pytest.raises(DatasetError, match=r"u\.xml: object 0 has unknown class 'unicorn'; known classes: "
                                           r"aeroplane, bicycle, .*tvmonitor"):
        parse_annotation(path, VOC_CLASSES)


def test_missing_size(tmp_path):
    path = write(tmp_path / "s.xml", "<annotation><object><name>cat</name></object></annotation>")
    with pytest.raises(DatasetError, match=r"s\.xml: no <size> element"):
        parse_annotation(path, VOC_CLASSES)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.xml: annotation file not found"):
        parse_annotation(tmp_path / "nope.xml", VOC_CLASSES)


# --- VOCDataset ---------------------------------------------------------------------------------------------


def test_dataset_reads_split_in_order(small_devkit):
    ds = VOCDataset(small_devkit, split="val")
    assert ds.image_ids == ["000001", "000002", "000003"] and len(ds) == 3
    assert ds.root == small_devkit and ds.classes == list(VOC_CLASSES) and ds.skipped == []
    assert ds.annotation("000001") is ds.annotation("000001")  # cached
    assert ds.image_path("000002") == small_devkit / "VOC2007" / "JPEGImages" / "000002.jpg"


def test_dataset_accepts_year_folder_and_limit(small_devkit):
    ds = VOCDataset(small_devkit / "VOC2007", split="val", limit=2)
    assert ds.image_ids == ["000001", "000002"] and ds.root == small_devkit


def test_image_labels_devkit_convention(small_devkit):
    labels = VOCDataset(small_devkit, split="val").image_labels()
    assert labels.dtype == np.int8 and labels.shape == (3, 20)
    cat, dog, person = VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")
    expected = np.full((3, 20), -1, dtype=np.int8)
    expected[0, dog], expected[0, cat] = 1, 0  # the cat is difficult only
    expected[1, dog] = 0
    expected[2, person] = 1  # missing <difficult> means not difficult
    np.testing.assert_array_equal(labels, expected)


def test_ground_truth_arrays(small_devkit):
    gt = VOCDataset(small_devkit, split="val").ground_truth()
    assert gt.image_ids == ["000001", "000002", "000003"]
    np.testing.assert_array_equal(gt.image_sizes, [[100, 80], [120, 90], [64, 48]])
    np.testing.assert_array_equal(gt.image_index, [0, 0, 1, 2])
    np.testing.assert_array_equal(gt.labels, [11, 7, 11, 14])
    expected = [[10, 20, 50, 60], [1, 1, 5, 5], [30, 30, 40, 40], [33, 1, 64, 48]]
    assert gt.boxes.dtype == np.float64
    np.testing.assert_array_equal(gt.boxes, expected)
    np.testing.assert_array_equal(gt.difficult, [False, True, True, False])


def test_ground_truth_of_split_without_objects(tmp_path):
    root = make_devkit(tmp_path, {"a": (10, 10, [])}, {"val": ["a"]})
    gt = VOCDataset(root).ground_truth()
    assert gt.boxes.shape == (0, 4) and gt.image_sizes.tolist() == [[10, 10]]


def test_load_image_rgb_and_size_check(small_devkit):
    ds = VOCDataset(small_devkit, split="val")
    gray = small_devkit / "VOC2007" / "JPEGImages" / "000001.jpg"
    Image.new("L", (100, 80), 128).save(gray)
    image = ds.load_image("000001")
    assert image.mode == "RGB" and image.size == (100, 80)
    Image.new("RGB", (99, 80)).save(ds.image_path("000002"))  # annotation says 120x90
    with pytest.raises(DatasetError, match=r"000002\.jpg: image is 99x80 but 000002\.xml <size> says 120x90"):
        ds.load_image("000002")
    relaxed = VOCDataset(small_devkit, split="val", check_sizes=False)
    assert relaxed.load_image("000002").size == (99, 80)


def test_load_image_unreadable(small_devkit):
    ds = VOCDataset(small_devkit, split="val")
    ds.image_path("000003").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"000003\.jpg: unreadable image"):
        ds.load_image("000003")


def test_missing_root_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"VOC root .*nowhere does not exist; expected a VOCdevkit "
                                                r"folder holding VOC2007/ .*--voc-root"):
        VOCDataset(tmp_path / "nowhere")


def test_wrong_year_lists_years_found(small_devkit):
    with pytest.raises(MissingFileError, match=r"no VOC2012/ folder \(found VOC2007: pass the matching year"):
        VOCDataset(small_devkit, year="2012")


def test_missing_split_lists_splits(small_devkit):
    write(small_devkit / "VOC2007" / "ImageSets" / "Main" / "dog_val.txt", "000001 1\n")
    with pytest.raises(MissingFileError, match=r"test\.txt: split file not found; splits in .*: train, val$"):
        VOCDataset(small_devkit, split="test")


def test_duplicate_id_in_split(small_devkit):
    write(small_devkit / "VOC2007" / "ImageSets" / "Main" / "dup.txt", "000001\n\n000001\n")
    with pytest.raises(DatasetError, match=r"dup\.txt: line 3 repeats image id '000001'"):
        VOCDataset(small_devkit, split="dup")


def test_binary_split_file(small_devkit):
    (small_devkit / "VOC2007" / "ImageSets" / "Main" / "bin.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match=r"bin\.txt: not a text file of image ids"):
        VOCDataset(small_devkit, split="bin")


def test_missing_annotation_and_image_raise(small_devkit):
    (small_devkit / "VOC2007" / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"000002\.jpg: image file not found"):
        VOCDataset(small_devkit, split="val")
    (small_devkit / "VOC2007" / "Annotations" / "000001.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"000001\.xml: annotation file not found"):
        VOCDataset(small_devkit, split="val")


def test_skip_mode_counts_and_lists(small_devkit):
    base = small_devkit / "VOC2007"
    (base / "JPEGImages" / "000002.jpg").unlink()
    write(base / "Annotations" / "000003.xml", "<annotation>")
    ds = VOCDataset(small_devkit, split="val", on_error="skip")
    assert ds.image_ids == ["000001"]
    assert [item["image_id"] for item in ds.skipped] == ["000002", "000003"]
    assert [Path(item["file"]).name for item in ds.skipped] == ["000002.jpg", "000003.xml"]
    assert "000002.jpg: image file not found" in ds.skipped[0]["reason"]
    assert "000003.xml: malformed XML" in ds.skipped[1]["reason"]
    assert ds.ground_truth().image_ids == ["000001"] and ds.image_labels().shape == (1, 20)


def test_bad_arguments(small_devkit):
    with pytest.raises(ValueError, match="on_error='ignore'; choose one of raise, skip"):
        VOCDataset(small_devkit, on_error="ignore")
    with pytest.raises(ValueError, match="limit=0"):
        VOCDataset(small_devkit, limit=0)
    with pytest.raises(ValueError, match="distinct"):
        VOCDataset(small_devkit, classes=["dog", "dog"])


def test_error_hierarchy():
    assert issubclass(DatasetError, ValueError)
    assert issubclass(MissingFileError, DatasetError) and issubclass(MissingFileError, FileNotFoundError)


# --- the real VOC2007 subset --------------------------------------------------------------------------------


def _split_ids(voc_root: Path, name: str) -> list[str]:
    text = (voc_root / "VOC2007" / "ImageSets" / "Main" / f"{name}.txt").read_text()
    return [line.split()[0] for line in text.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize(("split", "count"), [("train", 506), ("val", 488)])
def test_real_split_counts_and_class_files(voc_root, split, count):
    ds = VOCDataset(voc_root, split=split)
    assert len(ds) == count and ds.image_ids == _split_ids(voc_root, split)
    labels = ds.image_labels()
    for c, name in enumerate(VOC_CLASSES):
        # independent reading of <cls>_<split>.txt: "<id> <flag>"
        path = voc_root / "VOC2007" / "ImageSets" / "Main" / f"{name}_{split}.txt"
        flags = dict(line.split() for line in path.read_text().splitlines())
        expected = np.array([int(flags[i]) for i in ds.image_ids])
        np.testing.assert_array_equal(labels[:, c], expected, err_msg=f"{name}_{split}")


@pytest.mark.slow
def test_real_missing_difficult_reads_as_zero(voc_root):
    ds = VOCDataset(voc_root, split="train")
    missing = 0
    for image_id in ds.image_ids:
        text = (voc_root / "VOC2007" / "Annotations" / f"{image_id}.xml").read_text()
        blocks = re.findall(r"<object>(.*?)</object>", text, re.S)
        for block, obj in zip(blocks, ds.annotation(image_id).objects, strict=True):
            if "<difficult>" not in block:
                missing += 1
                assert obj.difficult is False and obj.truncated is False and obj.pose == "Unspecified"
    assert missing > 100  # the subset's README: 870 of its 2855 objects lack <difficult>, all in train


@pytest.mark.slow
@pytest.mark.parametrize("image_id", ["000007", "000083", "000091", "000131", "000169"])
def test_real_files_field_by_field(voc_root, image_id):
    text = (voc_root / "VOC2007" / "Annotations" / f"{image_id}.xml").read_text()
    ann = VOCDataset(voc_root, split="trainval").annotation(image_id)

    def number(pattern: str, block: str = text) -> float:
        return float(re.search(pattern, block).group(1))

    assert (ann.width, ann.height, ann.depth) == (number(r"<width>(\d+)"), number(r"<height>(\d+)"),
                                                  number(r"<depth>(\d+)"))
    blocks = re.findall(r"<object>(.*?)</object>", text, re.S)
    assert len(ann.objects) == len(blocks) > 0
    for block, obj in zip(blocks, ann.objects, strict=True):
        assert obj.name == re.search(r"<name>\s*(\w+)\s*</name>", block).group(1)
        assert obj.label == VOC_CLASSES.index(obj.name)
        expected = [number(rf"<{tag}>([\d.]+)</{tag}>", block) for tag in ("xmin", "ymin", "xmax", "ymax")]
        np.testing.assert_array_equal(obj.box, expected)
        difficult = re.search(r"<difficult>(\d)</difficult>", block)
        assert obj.difficult == (difficult is not None and difficult.group(1) == "1")
        truncated = re.search(r"<truncated>(\d)</truncated>", block)
        assert obj.truncated == (truncated is not None and truncated.group(1) == "1")
        pose = re.search(r"<pose>(\w+)</pose>", block)
        assert obj.pose == (pose.group(1) if pose else "Unspecified")
    with Image.open(voc_root / "VOC2007" / "JPEGImages" / f"{image_id}.jpg") as image:
        assert image.size == (ann.width, ann.height)


@pytest.mark.slow
def test_real_trainval_ground_truth_totals(voc_root):
    gt = VOCDataset(voc_root, split="trainval").ground_truth()
    assert len(gt.image_ids) == 994 and gt.boxes.shape == (2855, 4)  # the subset's README
    assert np.all(gt.boxes[:, 0] >= 1) and np.all(gt.boxes[:, 2] <= gt.image_sizes[gt.image_index, 0])


# --- image reading: modes, unreadable files, skip semantics -------------------------------------------------


def _palette() -> Image.Image:
    image = Image.new("P", (64, 48), 1)
    image.putpalette([0, 0, 0, 200, 50, 25] + [0] * 762)
    return image


# how each file is built (saved losslessly as PNG bytes under the .jpg name, CMYK as a JPEG) -> expected RGB
IMAGE_MODES = {
    "grayscale": (lambda: Image.new("L", (64, 48), 100), (100, 100, 100), 0),
    "palette": (_palette, (200, 50, 25), 0),
    "rgba": (lambda: Image.new("RGBA", (64, 48), (10, 200, 30, 128)), (10, 200, 30), 0),
    "cmyk": (lambda: Image.new("CMYK", (64, 48), (0, 255, 255, 0)), (255, 0, 0), 3),
    "16-bit": (lambda: Image.fromarray(np.full((48, 64), 200 * 257, np.uint16)), (200, 200, 200), 0),
    "bilevel": (lambda: Image.new("1", (64, 48), 1), (255, 255, 255), 0),
}


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_image_modes_read_as_8bit_rgb(small_devkit, mode):
    make, expected, tolerance = IMAGE_MODES[mode]
    ds = VOCDataset(small_devkit, split="val")
    image = make()
    image.save(ds.image_path("000003"), format="JPEG" if image.mode == "CMYK" else "PNG")
    loaded = ds.load_image("000003")
    pixels = np.asarray(loaded).astype(int)
    assert loaded.mode == "RGB" and loaded.size == (64, 48)
    assert np.abs(pixels - np.array(expected)).max() <= tolerance, pixels[0, 0]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _resize(path: Path) -> None:
    with Image.open(path) as image:
        image.resize((image.width - 3, image.height)).save(path)


def _bomb(path: Path) -> None:
    """Patch the JPEG's frame header (SOF0: FFC0, length, precision, height, width) to 65000x65000."""
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (65000).to_bytes(2, "big") * 2
    path.write_bytes(bytes(data))


BAD_IMAGES = {  # damage, what the one-line error says
    "truncated": (_truncate, "unreadable image"),
    "zero bytes": (_empty, "unreadable image"),
    "size mismatch": (_resize, "<size> says"),
    "decompression bomb": (_bomb, "decompression bomb"),
}


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_bad_image_is_one_line_error_naming_the_file(kind, demo_copy, cams_config):
    from gradloc.run.cams import plan_cams

    config = cams_config(demo_copy)
    damage, message = BAD_IMAGES[kind]
    damage(demo_copy / "VOCdemo" / "JPEGImages" / "000027.jpg")
    with pytest.raises(DatasetError, match=rf"000027\.jpg: .*{re.escape(message)}") as error:
        plan_cams(config).run()
    assert "\n" not in str(error.value) and "--on-error skip" in str(error.value)


def test_skip_mode_skips_unreadable_images_and_lists_them(demo_copy, cams_config):
    from gradloc.run.cams import plan_cams

    images = demo_copy / "VOCdemo" / "JPEGImages"
    damaged = {"000026": "truncated", "000028": "zero bytes", "000030": "size mismatch", "000031":
               "decompression bomb"}
    for image_id, kind in damaged.items():
        BAD_IMAGES[kind][0](images / f"{image_id}.jpg")
    cache, dataset = plan_cams(cams_config(demo_copy, **{"data.on_error": "skip"})).run()
    assert [item["image_id"] for item in dataset.skipped] == list(damaged)
    for item, (image_id, kind) in zip(dataset.skipped, damaged.items(), strict=True):
        assert item["file"] == str(images / f"{image_id}.jpg")
        assert BAD_IMAGES[kind][1] in item["reason"]
    assert len(dataset) == 8 and not set(damaged) & set(dataset.image_ids)
    assert all(cache.has(i, file_fingerprint(dataset.image_path(i))) for i in dataset.image_ids)
    assert dataset.ground_truth().image_ids == dataset.image_ids


def test_image_smaller_than_the_network_input(demo_copy, cams_config):
    from gradloc.core.formats import load_detections
    from gradloc.run.boxes import run_boxes
    from gradloc.run.cams import plan_cams

    base = demo_copy / "VOCdemo"
    for image_id, (width, height) in {"000025": (3, 2), "000026": (1, 1)}.items():
        Image.new("RGB", (width, height), (250, 20, 20)).save(base / "JPEGImages" / f"{image_id}.jpg")
        write(base / "Annotations" / f"{image_id}.xml",
              annotation_xml(image_id, width, height, [obj_xml("disc", (1, 1, width, height))]))
    config = cams_config(demo_copy, **{"boxes.explain": "gt"})
    cache, dataset = plan_cams(config).run()
    entry = cache.get("000025")
    assert (entry.geometry.width, entry.geometry.height) == (3, 2) and np.isfinite(entry.maps).all()
    one_pixel = cache.get("000026").geometry
    assert one_pixel.resized_w == one_pixel.resized_h == one_pixel.input_w  # scaled up to the whole input
    run_dir = run_boxes(config, cache, dataset)
    for path in (run_dir / "detections").glob("thr_*.pkl"):
        dets = load_detections(path)
        for index, (width, height) in ((0, (3, 2)), (1, (1, 1))):
            boxes = dets.boxes[dets.image_index == index]
            assert (boxes >= 1).all() and (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()


def test_skipped_images_reach_the_run_result_and_manifest(demo_copy, cams_config):
    import json

    from gradloc.run.pipeline import run

    _empty(demo_copy / "VOCdemo" / "JPEGImages" / "000029.jpg")
    config = cams_config(demo_copy, **{"data.on_error": "skip", "boxes.thresholds": (0.5,)})
    result = run(config)
    assert [item["image_id"] for item in result.skipped] == ["000029"]
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["skipped"] == result.skipped and "unreadable image" in manifest["skipped"][0]["reason"]
    assert "000029" not in result.dataset.ground_truth().image_ids
