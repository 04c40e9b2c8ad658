"""Layer names (gradloc.cams.layers): an exact name wins over a suffix, names do not depend on the head, and the
heatmap cache key holds the one canonical name."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from gradloc.cams.layers import default_layer, layer_table, resolve_layer
from gradloc.cli import main
from gradloc.datasets.voc import VOC_CLASSES
from gradloc.models.build import HEADS, build_architecture, load_model
from gradloc.models.checkpoints import save_checkpoint


class Blocks(nn.Module):
    """``blocks.0.bn2`` and ``bn2``: the names of EfficientNet's inner and last BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Sequential())
        self.blocks[0].bn2 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.blocks[0].bn2(x)).mean(dim=(2, 3))


def test_an_exact_name_wins_over_a_suffix_match():
    model = Blocks()
    assert resolve_layer(model, "bn2") == ("bn2", model.bn2)
    assert resolve_layer(model, "0.bn2") == ("blocks.0.bn2", model.blocks[0].bn2)  # a unique suffix still works


def _lite0_with_head(head: str, tmp_path) -> nn.Module:
    """EfficientNet-Lite0 with ``head`` (the voc part random; the ImageNet part the packaged weights)."""
    if head == "voc+imagenet":
        voc = build_architecture("efficientnet_lite0", head="voc")
        meta = {"arch": "efficientnet_lite0", "arch_kwargs": {}, "weights": None, "head": "voc",
                "classes": list(VOC_CLASSES), "input_size": 224, "resize_mode": "letterbox", "mean": [0.5] * 3,
                "std": [0.5] * 3, "train": {"split": "train", "mode": "lbfgs"}, "git_commit": None}
        save_checkpoint(tmp_path / "head.pt", voc, meta)
        return load_model("efficientnet_lite0", checkpoint=tmp_path / "head.pt", head=head).model
    return build_architecture("efficientnet_lite0", head=head)


@pytest.mark.parametrize("head", list(HEADS))
def test_lite0_layer_names_are_the_same_for_every_head(head, tmp_path):
    bare = [row.name for row in layer_table(build_architecture("efficientnet_lite0"))]
    model = _lite0_with_head(head, tmp_path)
    assert [row.name for row in layer_table(model)] == bare
    assert default_layer(model) == "bn2" and resolve_layer(model, "bn2")[0] == "bn2"
    assert resolve_layer(model, "blocks.6.0.bn2")[0] == "blocks.6.0.bn2"


def test_layers_lists_names_without_a_checkpoint_and_marks_the_default():
    result = CliRunner().invoke(main, ["layers", "efficientnet_lite0", "--input-size", "64"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()[1:]}
    assert rows["bn2"][-1] == "default" and "blocks.6.0.bn2" in rows
    assert "no head" not in result.output and "checkpoint" not in result.output


def test_the_cache_key_holds_the_canonical_layer_name(cams_config, demo_data):
    """The default layer and its name are one cache; the key holds the full module name."""
    from gradloc.run.cams import cams_cache
    from gradloc.run.config import open_dataset
    from gradloc.run.setup import load_classifier

    config = cams_config(demo_data)
    loaded, dataset = load_classifier(config), open_dataset(config)
    default = cams_cache(config, loaded, dataset)
    named = cams_cache(cams_config(demo_data, **{"cams.layer": "block4"}), loaded, dataset)
    assert default.key_data["layer"] == named.key_data["layer"] == "block4" and named.root == default.root
    inner = cams_cache(cams_config(demo_data, **{"cams.layer": "block4.0"}), loaded, dataset)
    assert inner.key_data["layer"] == "block4.0" and inner.root != default.root
