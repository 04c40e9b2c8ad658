"""Your own model (gradloc.models.own): an entry point with a checkpoint run end to end on the demo, timm and
torchvision state dicts, the head resolved from the output count, and the errors."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from gradloc.cams.layers import default_layer, resolve_layer
from gradloc.cli import main
from gradloc.datasets.demo import DEMO_CLASSES
from gradloc.models.build import build_architecture, load_model
from gradloc.models.imagenet_voc import imagenet_groups
from gradloc.models.own import build_own
from tests.models.conftest import _inputs

MODULE = textwrap.dedent('''
    """A small classifier of the user's own (the test's temporary module)."""
    from torch import nn


    def small():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                             nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


    def imagenet():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 1000))


    def not_a_module():
        return 42
''')


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    """A temporary module ``my_models`` on sys.path and a state dict of ``my_models:small`` (seeded weights)."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "my_models.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(folder))
    import my_models

    torch.manual_seed(0)
    model = my_models.small()
    torch.save(model.state_dict(), tmp_path / "small.pt")
    yield tmp_path / "small.pt", model
    monkeypatch.delitem(__import__("sys").modules, "my_models")


def test_entry_point_with_its_checkpoint_runs_end_to_end(own_module, demo_data, tmp_path):
    checkpoint, model = own_module
    config = tmp_path / "own.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"voc_root": str(demo_data), "year": "demo", "split": "val", "classes": list(DEMO_CLASSES)},
        "model": {"name": "my_models:small", "checkpoint": str(checkpoint), "head": "voc", "input_size": 64},
        "boxes": {"thresholds": [0.2, 0.4], "explain": "gt"}, "cache_dir": str(tmp_path / "cache"),
        "out": str(tmp_path / "results"), "name": "own"}))
    result = CliRunner().invoke(main, ["-q", "run", "--config", str(config)])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "results" / "own"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    key = json.loads((tmp_path / "cache" / "cams" / manifest["cache_key"] / "key.json").read_text())
    described = key["model"]
    assert described["arch"] == "my_models:small" and described["head"] == "voc"
    assert described["checkpoint"]["sha256"] and described["entry_point"]["file"]["sha256"]
    assert key["layer"] == "4"  # probed: the last spatial map before pooling (the ReLU)
    assert "gradcam at layer 4 of my_models:small (voc head, input 64 letterbox, float32)" in result.output
    # the cached maps are the engine's maps of the model the test built
    from gradloc.cams.methods import compute_cams
    from gradloc.reports.show import open_run_cache
    from gradloc.run.folder import open_run

    run = open_run(run_dir)
    cached = open_run_cache(run).get(run.gt.image_ids[0])
    assert cached.maps.shape == (4, 32, 32)
    assert torch.isfinite(torch.as_tensor(cached.maps)).all() and cached.maps.max() > 0
    layers = CliRunner().invoke(main, ["layers", "my_models:small", "--input-size", "64"])
    assert layers.exit_code == 0 and any(line.split()[0] == "4" and line.endswith("default")
                                         for line in layers.output.splitlines()[1:]), layers.output
    maps, _ = compute_cams(model.eval(), _inputs(64, batch=1), [0, 1])
    assert maps.shape == (1, 2, 32, 32)


def test_the_head_follows_the_output_count(own_module):
    with pytest.raises(ValueError, match=r"my_models:small has 4 outputs; head voc reads one logit per class of "
                                         r"the run \(20: aeroplane"):
        load_model("my_models:small")
    with pytest.raises(ValueError, match="has 4 outputs; head imagenet needs the 1000 ImageNet-1k outputs"):
        load_model("my_models:small", head="imagenet")
    with pytest.raises(ValueError, match=r"has 1000 outputs; head voc .*pass --head imagenet"):
        load_model("my_models:imagenet", classes=["cat", "dog"])
    with pytest.raises(ValueError, match="head voc\\+imagenet needs a voc head trained by `gradloc train`"):
        load_model("my_models:imagenet", head="voc+imagenet")


def test_imagenet_head_on_an_own_model_keeps_its_layer_names(own_module):
    import my_models

    torch.manual_seed(1)
    reference = my_models.imagenet().eval()
    torch.save(reference.state_dict(), own_module[0].parent / "imagenet.pt")
    loaded = load_model("my_models:imagenet", checkpoint=own_module[0].parent / "imagenet.pt", head="imagenet",
                        classes=["cat", "bus"])
    assert loaded.score_kind == "log_prob" and loaded.model.gradloc_gap_linear is None
    assert resolve_layer(loaded.model, "1")[0] == "1" and default_layer(loaded.model) == "1"
    x = _inputs(32)
    with torch.no_grad():
        p = torch.softmax(reference(x).double(), dim=1)
        groups = imagenet_groups(["cat", "bus"])
        manual = torch.stack([p[:, group].sum(1) for group in groups], dim=1).log()
        torch.testing.assert_close(loaded.model(x).double(), manual, rtol=1e-5, atol=1e-6)


def test_errors_name_what_to_do(own_module, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt: checkpoint not found"):
        load_model("my_models:small", checkpoint=tmp_path / "nope.pt", classes=list(DEMO_CLASSES))
    with pytest.raises(ValueError, match=r"cannot import 'no_such_module'.*PYTHONPATH"):
        load_model("no_such_module:build")
    with pytest.raises(ValueError, match="my_models has no function 'missing'"):
        load_model("my_models:missing")
    with pytest.raises(ValueError, match=r"not_a_module\(\) returned a int, not a torch.nn.Module"):
        load_model("my_models:not_a_module")
    torch.save({"format": "gradloc.checkpoint/1"}, tmp_path / "gradloc.pt")
    with pytest.raises(ValueError, match="takes a plain state dict"):
        load_model("my_models:small", checkpoint=tmp_path / "gradloc.pt")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: the state dict does not fit --model my_models:small"):
        load_model("my_models:small", checkpoint=tmp_path / "other.pt", classes=list(DEMO_CLASSES))
    with pytest.raises(ValueError, match="--weights names torchvision weights"):
        load_model("my_models:small", weights="IMAGENET1K_V1", classes=list(DEMO_CLASSES))
    result = CliRunner().invoke(main, ["run", "--model", "no_such_module:build", "--out", str(tmp_path)])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "cannot import" in result.output
    result = CliRunner().invoke(main, ["train", "--model", "my_models:small", "--checkpoint-out",
                                       str(tmp_path / "x.pt")])
    assert result.exit_code == 1 and "is your own model" in result.output


def test_timm_state_dict_and_missing_timm_weights(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    torch.save(reference.state_dict(), tmp_path / "r18.pt")
    loaded = load_model("timm:resnet18", checkpoint=tmp_path / "r18.pt", classes=list(DEMO_CLASSES),
                        input_size=64)
    assert default_layer(loaded.model) == "layer4" and loaded.description["arch"] == "timm:resnet18"
    assert loaded.preprocessing.mean == (0.485, 0.456, 0.406)  # timm's pretrained_cfg
    x = _inputs(64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match=r"timm:resnet18 has no ImageNet weights on this machine \(gradloc "
                                                r"never downloads\); looked for .*models--timm--resnet18.*"
                                                r"--checkpoint"):
        load_model("timm:resnet18", head="imagenet")
    assert [name for name, _ in build_own("timm:resnet18", weights=False).module.named_modules()][:3] == \
        ["", "conv1", "bn1"]


def test_torchvision_prefix_is_the_registry_name_with_a_fine_tuned_state_dict(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    fine_tuned = resnet18(weights=None, num_classes=4).eval()
    torch.save(fine_tuned.state_dict(), tmp_path / "my.pt")
    loaded = load_model("torchvision:resnet18", checkpoint=tmp_path / "my.pt", classes=list(DEMO_CLASSES))
    assert loaded.description["arch"] == "resnet18"  # one cache with --model resnet18
    assert loaded.model.gradloc_layer == "layer4" and loaded.model.gradloc_gap_linear == ("layer4", "fc")
    x = _inputs(64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), fine_tuned(x), rtol=0, atol=0)
    assert [n for n, _ in build_architecture("torchvision:resnet18").named_modules()] == \
        [n for n, _ in build_architecture("resnet18").named_modules()]
