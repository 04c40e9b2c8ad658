"""Tests of gradloc.models.registry: the torch-free listing agrees with the models gradloc.models builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradloc.models import registry
from gradloc.models.registry import hub_checkpoints, list_models, read_torchvision_table
from gradloc.models.zoo import MODELS


def test_torchvision_snapshot_is_that_of_the_installed_torchvision() -> None:
    registry.torchvision_table.cache_clear()
    assert registry.torchvision_table() == read_torchvision_table(), \
        "stale snapshot: run python scripts/torchvision_table.py"


def _expected_rows() -> dict[str, dict]:
    """The listing computed from the built registry (torch, torchvision and the weights resolvers)."""
    rows = {}
    for name, spec in MODELS.items():
        resolved = spec.resolve_weights(None) if spec.resolve_weights else None
        rows[name] = {
            "name": name, "family": spec.family, "layer": spec.layer, "cam": spec.gap_linear,
            "weights": resolved.name if resolved else None, "offline": bool(resolved and resolved.path.is_file()),
            "input_size": (resolved.preprocessing if resolved else spec.preprocessing).input_size,
            "notes": spec.notes,
        }
    return rows


def test_listing_equals_the_built_registry() -> None:
    rows = list_models()
    assert [row["name"] for row in rows] == list(MODELS)
    assert {row["name"]: row for row in rows} == _expected_rows()


def test_listing_hand_checked_values() -> None:
    rows = {row["name"]: row for row in list_models()}
    assert rows["efficientnet_lite0"]["offline"] is True  # the packaged weights
    assert rows["resnet18"]["weights"] == "IMAGENET1K_V1" and rows["resnet50"]["weights"] == "IMAGENET1K_V2"
    assert rows["inception_v3"]["input_size"] == 299 and rows["efficientnet_lite2"]["input_size"] == 260
    assert rows["vgg16"]["cam"] is False and rows["vgg16"]["layer"] == "features.29"
    assert rows["demo_cnn"]["weights"] is None and "vit_b_16" not in rows


def test_listing_sees_a_weights_file_in_the_hub_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert not {row["name"]: row for row in list_models()}["resnet18"]["offline"]
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"")
    assert {row["name"]: row for row in list_models()}["resnet18"]["offline"]


@pytest.mark.parametrize("env", [{}, {"XDG_CACHE_HOME": "/x/cache"}, {"TORCH_HOME": "~/th"},
                                 {"TORCH_HOME": "/t", "XDG_CACHE_HOME": "/x"}])
def test_hub_folder_is_torch_hubs(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert hub_checkpoints() == Path(torch.hub.get_dir()) / "checkpoints"


def test_another_torchvision_version_reads_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry.metadata, "version", lambda _name: "0.0.0")
    registry.torchvision_table.cache_clear()
    try:
        assert registry.torchvision_table() == {**read_torchvision_table(), "torchvision": "0.0.0"}
    finally:
        registry.torchvision_table.cache_clear()
