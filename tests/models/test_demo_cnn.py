"""Tests of gradloc.models.demo_cnn: DemoNet, its training, checkpoints and the letterboxed training input."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import gradloc.models.demo_cnn as demo_cnn
from gradloc.datasets.demo import DEMO_CLASSES
from gradloc.models.build import load_model
from gradloc.models.checkpoints import load_checkpoint
from gradloc.models.demo_cnn import DemoNet, train_demo_model


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
