"""Tests of gradloc.models (zoo, heads, preprocessing, checkpoints, build): building classifiers offline with
their heads."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import get_model

from gradloc.datasets.voc import VOC_CLASSES
from gradloc.models.build import _attach_voc_imagenet, _Source, build_architecture, load_model
from gradloc.models.checkpoints import CHECKPOINT_FIELDS, load_checkpoint, save_checkpoint
from gradloc.models.demo_cnn import DemoNet
from gradloc.models.heads import ImageNetToVOC, VocImageNetHead, attach_imagenet_mapping
from gradloc.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from gradloc.models.registry import class_probabilities
from gradloc.models.zoo import MODELS, get_spec, replace_linear
from tests.models.conftest import _inputs, _meta, _random_voc_resnet18


def test_imagenet_to_voc_is_log_of_summed_softmax_hand_computed() -> None:
    # softmax of log([1, 2, 3, 4, 5, 5]) is [1, 2, 3, 4, 5, 5] / 20
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 5.0]], dtype=torch.float64))
    head = ImageNetToVOC([[1, 2], [0], [3, 4, 5]], n_inputs=6).double()
    expected = torch.log(torch.tensor([[5 / 20, 1 / 20, 14 / 20]], dtype=torch.float64))
    torch.testing.assert_close(head(logits), expected)
    # shifting all logits by a huge constant changes nothing and stays finite (stable computation)
    torch.testing.assert_close(head(logits + 1e4), expected)
    torch.testing.assert_close(head(logits * 1.0 - 1e4), expected)


def test_imagenet_to_voc_gradient_is_finite_and_zero_outside_the_group_softmax() -> None:
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)).requires_grad_()
    head = ImageNetToVOC([[0, 1]], n_inputs=4).double()
    (grad,) = torch.autograd.grad(head(logits).sum(), logits)
    # d/dz_i [lse(z_G) - lse(z)] = 1[i in G] p_i / p_G - p_i, with p = [1, 2, 3, 4] / 10, p_G = 0.3
    expected = torch.tensor([[1 / 3 - 0.1, 2 / 3 - 0.2, -0.3, -0.4]], dtype=torch.float64)
    torch.testing.assert_close(grad, expected)


def test_imagenet_to_voc_rejects_empty_or_out_of_range_groups() -> None:
    with pytest.raises(ValueError, match="group 1"):
        ImageNetToVOC([[0], []], n_inputs=4)
    with pytest.raises(ValueError, match="group 0"):
        ImageNetToVOC([[4]], n_inputs=4)


def test_imagenet_mapping_on_tiny_fake_backbone_matches_manual_computation() -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 1000))
    x = _inputs(16)
    with torch.no_grad():
        logits = backbone(x)
    names = [name for name, _ in backbone.named_modules()]
    model = attach_imagenet_mapping(backbone, "4", ["cat", "sofa", "bus"]).eval()
    assert [name for name, _ in model.named_modules()][:5] == names[:5]  # the layers keep their names
    with torch.no_grad():
        probabilities = torch.softmax(logits.double(), dim=1)
        manual = torch.stack([probabilities[:, 281:286].sum(1), probabilities[:, 831],
                              probabilities[:, [654, 779, 874]].sum(1)], dim=1).log()
        torch.testing.assert_close(model(x).double(), manual, rtol=1e-5, atol=1e-5)


def test_registry_holds_the_documented_models_with_their_default_layers() -> None:
    expected_layers = {
        "resnet18": "layer4", "resnet34": "layer4", "resnet50": "layer4", "resnet101": "layer4",
        "vgg11": "features.19", "vgg16": "features.29", "efficientnet_b0": "features.8",
        "convnext_tiny": "features.7", "mobilenet_v3_large": "features.16", "densenet121": "features.norm5",
        "efficientnet_lite0": "bn2", "demo_cnn": "block4",
    }
    for name, layer in expected_layers.items():
        assert MODELS[name].layer == layer, name
    assert MODELS["resnet50"].gap_linear and MODELS["efficientnet_b0"].gap_linear
    assert not MODELS["vgg16"].gap_linear and MODELS["densenet121"].gap_linear
    assert not MODELS["convnext_tiny"].gap_linear and not MODELS["mobilenet_v3_large"].gap_linear
    assert "vit_b_16" not in MODELS and "squeezenet1_0" not in MODELS


def _meta_build(name: str) -> nn.Module | None:
    spec = MODELS[name]
    resolved = spec.resolve_weights(None) if spec.resolve_weights else None
    try:
        with torch.device("meta"):
            return spec.build(**(resolved.arch_kwargs if resolved else {}))
    except (NotImplementedError, RuntimeError):  # RegNet computes widths from tensors: no meta build
        return None


@pytest.mark.slow
def test_every_torchvision_entry_names_modules_that_exist() -> None:
    checked = 0
    for name, spec in MODELS.items():
        if spec.family in ("efficientnet_lite", "demo"):
            continue
        model = _meta_build(name)
        if model is None:
            assert spec.family == "regnet", name
            continue
        modules = dict(model.named_modules())
        assert spec.layer in modules, name
        assert all(stage in modules for stage in spec.last_stage), name
        classifier = modules[spec.classifier]
        assert isinstance(classifier, nn.Linear) and classifier.out_features == 1000, name
        if spec.family == "vgg":  # the ReLU right before the last max-pool
            index = int(spec.layer.split(".")[1])
            assert isinstance(model.features[index], nn.ReLU), name
            assert isinstance(model.features[index + 1], nn.MaxPool2d) and index + 2 == len(model.features)
        checked += 1
    assert checked >= 50


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "mnasnet0_5",
                                  "regnet_x_400mf", "efficientnet_b0", "googlenet", "efficientnet_lite0"])
def test_gap_linear_models_are_linear_of_the_pooled_layer(name: str) -> None:
    torch.manual_seed(0)
    model = build_architecture(name, head="voc")
    assert model.gradloc_gap_linear == (MODELS[name].layer, MODELS[name].classifier)
    layer = model.get_submodule(model.gradloc_layer)
    linear = model.get_submodule(model.gradloc_gap_linear[1])
    seen = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.setdefault("a", out))
    try:
        with torch.no_grad():
            scores = model(_inputs(64))
    finally:
        handle.remove()
    assert scores.shape == (2, 20)
    with torch.no_grad():
        torch.testing.assert_close(linear(seen["a"].mean(dim=(2, 3))), scores, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_densenet_map_is_rectified_in_place_so_it_is_gap_linear() -> None:
    torch.manual_seed(0)
    model = build_architecture("densenet121", head="voc")
    assert model.gradloc_gap_linear == ("features.norm5", "classifier")
    seen = {}
    norm5 = model.get_submodule("features.norm5")
    handle = norm5.register_forward_hook(lambda _m, _i, o: seen.setdefault("a", o))
    with torch.no_grad():
        scores = model(_inputs(64))
    handle.remove()
    # DenseNet's forward rectifies the hooked tensor in place: it holds no negative value afterwards
    assert seen["a"].min() == 0.0
    torch.testing.assert_close(model.classifier(seen["a"].mean(dim=(2, 3))), scores, rtol=1e-4, atol=1e-4)


def test_unknown_model_lists_suggestions() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet181'; did you mean resnet18"):
        load_model("resnet181", head="imagenet")
    with pytest.raises(ValueError, match="vision transformer"):
        get_spec("vit_b_16")


def test_unknown_head_and_unknown_weights_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown head 'imagenet1k'; choose one of voc, imagenet"):
        load_model("resnet18", head="imagenet1k")
    with pytest.raises(ValueError, match=r"unknown weights 'IMAGENET1K_V9' for resnet18; choose one of "
                                         r"DEFAULT, IMAGENET1K_V1"):
        load_model("resnet18", head="imagenet", weights="IMAGENET1K_V9")
    with pytest.raises(ValueError, match="unknown weights 'V2' for efficientnet_lite0"):
        load_model("efficientnet_lite0", head="imagenet", weights="V2")


def test_missing_hub_weights_name_the_expected_path(_no_hub_cache: Path) -> None:
    expected = _no_hub_cache / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(FileNotFoundError) as info:
        load_model("resnet18", head="imagenet")
    message = str(info.value)
    assert str(expected) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "--checkpoint" in message
    assert not expected.exists()  # nothing was downloaded


def test_voc_head_without_checkpoint_says_to_train() -> None:
    with pytest.raises(ValueError, match=r"needs a trained checkpoint: run `gradloc train --model resnet18"):
        load_model("resnet18")


def test_demo_cnn_has_no_imagenet_weights() -> None:
    with pytest.raises(ValueError, match="demo_cnn' has no ImageNet weights"):
        load_model("demo_cnn", head="imagenet")


def test_hub_cache_weights_load_without_network(_no_hub_cache: Path) -> None:
    torch.manual_seed(1)
    reference = get_model("resnet18", weights=None).eval()
    path = _no_hub_cache / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    loaded = load_model("resnet18", head="imagenet", classes=["cat", "dog"], input_size=96)
    assert loaded.score_kind == "log_prob" and loaded.classes == ["cat", "dog"]
    assert loaded.preprocessing == Preprocessing(96, "letterbox", IMAGENET_MEAN, IMAGENET_STD)
    assert loaded.model.gradloc_layer == "layer4" and loaded.model.gradloc_gap_linear is None
    description = loaded.description
    assert description["weights"] == "IMAGENET1K_V1"
    assert description["weights_file"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    x = _inputs(96)
    with torch.no_grad():
        p = torch.softmax(reference(x).double(), dim=1)
        manual = torch.stack([p[:, 281:286].sum(1), p[:, 151:269].sum(1)], dim=1)
        probabilities = class_probabilities(loaded.model(x).numpy(), loaded.score_kind)
        np.testing.assert_allclose(probabilities, manual.numpy(), rtol=1e-4, atol=1e-6)


def test_class_probabilities_follow_the_score_kind() -> None:
    scores = np.array([[0.0, math.log(0.25)]])
    np.testing.assert_allclose(class_probabilities(scores, "logit"), [[0.5, 0.2]])
    np.testing.assert_allclose(class_probabilities(scores, "log_prob"), [[1.0, 0.25]])
    with pytest.raises(ValueError, match="unknown score kind 'softmax'"):
        class_probabilities(scores, "softmax")


def test_preprocessing_validates_and_letterboxes() -> None:
    with pytest.raises(ValueError, match="resize_mode='crop'"):
        Preprocessing(224, "crop")
    with pytest.raises(ValueError, match="input_size=0"):
        Preprocessing(0)
    pre = Preprocessing(8, "letterbox", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    array, geometry = pre(Image.new("RGB", (16, 8), (255, 255, 255)))
    assert (geometry.resized_w, geometry.resized_h, geometry.pad_y) == (8, 4, 2)
    assert array.shape == (3, 8, 8)
    assert np.all(array[:, 2:6] == 1.0) and np.all(array[:, :2] == 0.0)  # white -> (1 - .5) / .5; pad -> 0


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    classes = ["cat", "car", "person"]
    model = _random_voc_resnet18(classes).eval()
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, model, _meta("resnet18", classes))
    loaded = load_model("resnet18", checkpoint=path)
    assert loaded.classes == classes and loaded.score_kind == "logit"
    assert loaded.preprocessing == Preprocessing(64, "letterbox", (0.5,) * 3, (0.25,) * 3)
    assert loaded.model.gradloc_layer == "layer4" and loaded.model.gradloc_gap_linear == ("layer4", "fc")
    assert loaded.description["checkpoint"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    x = _inputs(64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
        # a class subset selects and reorders the head's rows
        subset = load_model("resnet18", checkpoint=path, classes=["person", "cat"], input_size=64,
                            resize_mode="letterbox")
        torch.testing.assert_close(subset.model(x), model(x)[:, [2, 0]], rtol=0, atol=0)
    assert subset.preprocessing.input_size == 64
    with pytest.raises(ValueError, match=r"class\(es\) dog are not in the checkpoint's voc head"):
        load_model("resnet18", checkpoint=path, classes=["dog"])


@pytest.mark.parametrize(("asked", "uses"), [
    ({"input_size": 80}, "input_size 80, resize_mode letterbox"),
    ({"resize_mode": "shortside"}, "input_size 64, resize_mode shortside"),
    ({"input_size": 320, "resize_mode": "stretch"}, "input_size 320, resize_mode stretch"),
])
def test_checkpoint_at_other_preprocessing_is_refused_naming_both(tmp_path: Path, asked: dict, uses: str) -> None:
    model = _random_voc_resnet18(["cat"])
    path = tmp_path / "head.pt"
    save_checkpoint(path, model, _meta("resnet18", ["cat"]))  # trained at 64, letterbox
    with pytest.raises(ValueError) as caught:
        load_model("resnet18", checkpoint=path, **asked)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert "trained at input_size 64, resize_mode letterbox" in message and f"this run uses {uses}" in message
    # a plain state dict carries no preprocessing: nothing to check, any size is accepted
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    plain = load_model("resnet18", checkpoint=tmp_path / "plain.pt", classes=["cat"], **asked)
    assert plain.preprocessing.input_size == asked.get("input_size", 224)


def test_checkpoint_bytes_are_reproducible_and_fields_complete(tmp_path: Path) -> None:
    model = _random_voc_resnet18(["cat"])
    save_checkpoint(tmp_path / "a.pt", model, _meta("resnet18", ["cat"]))
    save_checkpoint(tmp_path / "b.pt", model, _meta("resnet18", ["cat"]))
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    data = load_checkpoint(tmp_path / "a.pt")
    assert data["format"] == "gradloc.checkpoint/1"
    assert set(data) == {"format", "state_dict", *CHECKPOINT_FIELDS}
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_save_checkpoint_requires_every_field(tmp_path: Path) -> None:
    meta = _meta("resnet18", ["cat"])
    del meta["git_commit"]
    with pytest.raises(ValueError, match="meta lacks field"):
        save_checkpoint(tmp_path / "a.pt", nn.Linear(1, 1), meta)


def test_load_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"junk\.pt: not a loadable torch checkpoint") as refused:
        load_checkpoint(tmp_path / "junk.pt")
    assert "weights_only" not in str(refused.value)  # never PyTorch's advice to load untrusted code
    torch.save({"state": Path("x")}, tmp_path / "object.pt")  # a pickled object beyond tensors
    with pytest.raises(ValueError, match=r"object\.pt: not a loadable torch checkpoint \(not a file of plain"):
        load_checkpoint(tmp_path / "object.pt")
    torch.save({"format": "other/1"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"format is 'other/1', expected 'gradloc.checkpoint/1'"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"format": "gradloc.checkpoint/1", "arch": "resnet18"}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"lacks field\(s\) arch_kwargs"):
        load_checkpoint(tmp_path / "partial.pt")


def test_checkpoint_of_another_arch_or_head_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "r18.pt", _random_voc_resnet18(["cat"]), _meta("resnet18", ["cat"]))
    with pytest.raises(ValueError, match=r"checkpoint is for model 'resnet18', not 'resnet34'; "
                                         r"pass --model resnet18"):
        load_model("resnet34", checkpoint=tmp_path / "r18.pt")
    with pytest.raises(ValueError, match="checkpoint holds a voc head; use --head voc"):
        load_model("resnet18", checkpoint=tmp_path / "r18.pt", head="imagenet")


def test_plain_state_dict_checkpoints_load(tmp_path: Path) -> None:
    model = _random_voc_resnet18(list(VOC_CLASSES), seed=3).eval()
    torch.save(model.state_dict(), tmp_path / "voc_state.pt")
    loaded = load_model("resnet18", checkpoint=tmp_path / "voc_state.pt")
    assert loaded.classes == list(VOC_CLASSES) and loaded.description["weights"] is None
    x = _inputs(64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"classifier fc has 20 outputs; head voc needs 3 \(one per class"):
        load_model("resnet18", checkpoint=tmp_path / "voc_state.pt", classes=["cat", "dog", "car"])
    with pytest.raises(ValueError, match=r"has 20 outputs; head imagenet needs 1000 \(ImageNet-1k\); pass --head "
                                         r"voc"):
        load_model("torchvision:resnet18", checkpoint=tmp_path / "voc_state.pt", head="imagenet")
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"neither a gradloc\.checkpoint/1 checkpoint nor a plain state"):
        load_model("resnet18", checkpoint=tmp_path / "odd.pt")


def test_demo_cnn_checkpoint_round_trip(tmp_path: Path) -> None:
    from gradloc.datasets.demo import DEMO_CLASSES

    assert DemoNet().fc.out_features == len(DEMO_CLASSES)  # the default is the demo dataset's classes
    torch.manual_seed(0)
    model = DemoNet(n_classes=len(DEMO_CLASSES), widths=(4, 8)).eval()
    arch_kwargs = {"n_classes": len(DEMO_CLASSES), "widths": [4, 8]}
    meta = _meta("demo_cnn", list(DEMO_CLASSES), arch_kwargs=arch_kwargs)
    save_checkpoint(tmp_path / "demo.pt", model, meta)
    loaded = load_model("demo_cnn", checkpoint=tmp_path / "demo.pt", classes=list(DEMO_CLASSES))
    assert loaded.model.gradloc_layer == "block2" and loaded.model.gradloc_gap_linear == ("block2", "fc")
    x = _inputs(32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)


def test_voc_imagenet_head_is_the_log_of_both_probabilities():
    torch.manual_seed(0)
    voc, imagenet = nn.Linear(6, 3), nn.Linear(6, 10)
    groups = [[0, 1], [2], [5, 6, 7]]
    head = VocImageNetHead(voc, imagenet, groups, use_voc=[True, False, True])
    features = torch.randn(4, 6)
    probs = torch.softmax(imagenet(features), dim=1)
    prior = torch.stack([probs[:, g].sum(1) for g in groups], dim=1)
    expected = torch.log(prior) + torch.log(torch.sigmoid(voc(features))) * torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(head(features), expected)


def test_voc_imagenet_head_refuses_a_fine_tuned_backbone():
    spec = get_spec("efficientnet_lite0")
    module = spec.build()
    replace_linear(module, spec.classifier, 2)
    source = _Source(module, ["cat", "dog"], spec.preprocessing, {}, "IMAGENET1K", train={"mode": "finetune_last"})
    with pytest.raises(ValueError, match=r"frozen ImageNet backbone.*'finetune_last'"):
        _attach_voc_imagenet(spec, source, None)
