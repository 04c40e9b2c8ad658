"""Tests of gradloc.run.train: the balanced loss, the linear fit, the configuration and ``train_head`` on real VOC."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradloc.datasets.voc import VOC_CLASSES, VOCDataset
from gradloc.models.build import load_model
from gradloc.models.checkpoints import load_checkpoint
from gradloc.models.zoo import build_pretrained
from gradloc.run.cams import plan_cams
from gradloc.run.config import load_config
from gradloc.run.train import TrainConfig, balanced_bce, fit_lbfgs, fit_linear, train_head
from gradloc.scoring.classification import classification_map
from tests.conftest import VOC_ROOT

needs_voc = pytest.mark.skipif(not (VOC_ROOT / "VOC2007").is_dir(),
                               reason=f"real VOC subset not found at {VOC_ROOT}")
LN2 = math.log(2.0)


# --- loss ---------------------------------------------------------------------------------------------------


def test_balanced_bce_hand_computed() -> None:
    # class 0: 1 positive, 2 negatives, row 1 difficult-only (ignored) -> pos_weight 2
    # class 1: 1 positive, 3 negatives -> pos_weight 3
    labels = np.array([[1, -1], [0, -1], [-1, 1], [-1, -1]], dtype=np.int8)
    loss = balanced_bce(labels)
    zeros = torch.zeros(4, 2)
    # at logit 0 every term is ln 2, positives weighted: (2 + 1 + 1) + (1 + 1 + 3 + 1) = 10 ln 2 over 7 terms
    assert float(loss(zeros, torch.arange(4))) == pytest.approx(10 / 7 * LN2)
    # row 2 alone: negative of class 0 (ln 2) + positive of class 1 (3 ln 2), over 2 terms
    assert float(loss(torch.zeros(1, 2), torch.tensor([2]))) == pytest.approx(2 * LN2)
    # a confident correct logit costs almost nothing: row 0, class 0 at +20, class 1 at -20
    assert float(loss(torch.tensor([[20.0, -20.0]]), torch.tensor([0]))) == pytest.approx(0.0, abs=1e-7)


def test_balanced_bce_class_without_positives_uses_weight_one() -> None:
    loss = balanced_bce(np.array([[-1], [-1], [0]], dtype=np.int8))
    assert float(loss(torch.zeros(3, 1), torch.arange(3))) == pytest.approx(LN2)  # 2 terms of ln 2, over 2
    # a positive logit on a negative image: -log(1 - sigmoid(ln 3)) = ln 4
    assert float(loss(torch.full((1, 1), math.log(3.0)), torch.tensor([0]))) == pytest.approx(math.log(4.0))


def test_fit_linear_separates_and_is_deterministic() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(60, 2, generator=generator)
    labels = np.where(features.numpy() > 0, 1, -1).astype(np.int8)  # class c present iff feature c > 0
    heads = []
    for _ in range(2):
        head = nn.Linear(2, 2)
        losses: list[float] = []
        fit_linear(head, features, balanced_bce(labels), epochs=30, lr=0.05, batch_size=16, weight_decay=0.0,
                   generator=torch.Generator().manual_seed(7), step=losses.append)
        heads.append(head)
        assert len(losses) == 30 and losses[-1] < losses[0]
    torch.testing.assert_close(heads[0].weight, heads[1].weight, rtol=0, atol=0)
    with torch.no_grad():
        scores = heads[0](features).numpy()
    ap_map, aps = classification_map(scores, labels)
    assert ap_map == pytest.approx(1.0) and list(aps) == pytest.approx([1.0, 1.0])


def test_fit_lbfgs_separates_a_toy_problem_at_a_stationary_point() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(80, 3, generator=generator)
    # class 0 iff x0 > 0 (separable); class 1 iff x1 + x2 > 0.3 (separable, with an offset); 1 positive in 4
    # rows of class 2 marked difficult-only are ignored
    labels = torch.stack([features[:, 0] > 0, features[:, 1] + features[:, 2] > 0.3, features[:, 2] > 0.7],
                         dim=1).numpy()
    labels = np.where(labels, 1, -1).astype(np.int8)
    labels[:5, 2] = 0
    head = nn.Linear(3, 3)
    objectives: list[float] = []
    final = fit_lbfgs(head, features, balanced_bce(labels), iterations=100, lr=1.0, l2=1e-4,
                      step=objectives.append)
    assert len(objectives) == 100 and objectives[-1] == final and objectives[-1] < objectives[0]
    with torch.no_grad():
        scores = head(features).numpy()
    known = labels != 0
    assert np.all(((scores > 0) == (labels == 1)) | ~known)  # every known training label on the right side
    # at the optimum of the (convex) objective the gradient vanishes: check it independently
    loss_fn = balanced_bce(labels)
    head.zero_grad()
    (loss_fn(head(features), torch.arange(80)) + 1e-4 * head.weight.square().sum()).backward()
    assert float(head.weight.grad.abs().max()) < 1e-4 and float(head.bias.grad.abs().max()) < 1e-4
    # the weight of class 0 points along x0, class 1's along x1 + x2
    w = head.weight.detach()
    assert w[0, 0] > 5 * max(abs(w[0, 1]), abs(w[0, 2]))
    assert w[1, 1] > 0 and w[1, 2] > 0 and abs(w[1, 1] - w[1, 2]) < 0.25 * w[1, 1]
    # a larger penalty shrinks the weights
    strong = nn.Linear(3, 3)
    fit_lbfgs(strong, features, loss_fn, iterations=100, lr=1.0, l2=1.0, step=lambda _: None)
    assert float(strong.weight.detach().norm()) < 0.5 * float(w.norm())


# --- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    ({"mode": "svm"}, "training mode 'svm'; choose one of linear, finetune_last"),
    ({"epochs": 0}, "epochs=0; pass a positive whole number"),
    ({"batch_size": -1}, "batch_size=-1"),
    ({"lr": 0.0}, "lr=0.0; pass a positive learning rate"),
    ({"val_split": "train"}, "val_split='train' is the training split"),
])
def test_train_config_rejects_bad_values(overrides: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(voc_root=tmp_path, out=tmp_path / "x.pt", **overrides)


def test_train_config_from_run_takes_the_runs_preprocessing_and_train_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  voc_root: /data/VOCdevkit\n  classes: [cat, dog]\n"
                    "model:\n  name: resnet18\n  input_size: 320\n  resize_mode: shortside\n"
                    "cams:\n  device: cpu\n  batch_size: 8\n  workers: 0\n  channels_last: false\n"
                    "train:\n  mode: lbfgs\n  l2: 0.01\n  epochs: 50\ncache_dir: /data/cache\n")
    cfg = TrainConfig.from_run(load_config(path), tmp_path / "head.pt", split="trainval")
    assert (cfg.voc_root, cfg.classes, cfg.model, cfg.input_size, cfg.resize_mode) == (
        "/data/VOCdevkit", ("cat", "dog"), "resnet18", 320, "shortside")
    # the features cache, batch plan, decoding and memory format of the run's cams stage
    assert (cfg.cache_dir, cfg.feature_batch_size, cfg.workers, cfg.channels_last) == ("/data/cache", 8, 0, False)
    assert (cfg.mode, cfg.l2, cfg.epochs, cfg.split, cfg.val_split) == ("lbfgs", 0.01, 50, "trainval", "val")
    with pytest.raises(ValueError, match=re.escape("l2=-1.0; pass a number >= 0")):
        TrainConfig(voc_root=tmp_path, out=tmp_path / "x.pt", l2=-1.0)


def test_missing_backbone_weights_fail_first_and_name_the_file(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = TrainConfig(voc_root=tmp_path / "no_voc_here", out=tmp_path / "x.pt", model="resnet18")
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(expected))):
        train_head(cfg)
    assert not (tmp_path / "x.pt").exists()


# --- train_head on real images ------------------------------------------------------------------------------


def _chance_map(labels: np.ndarray, n_draws: int = 200) -> float:
    """Expected mAP of random scores (Monte-Carlo over random rankings), same classes and metric."""
    rng = np.random.default_rng(0)
    return float(np.mean([classification_map(rng.random(labels.shape), labels)[0] for _ in range(n_draws)]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, list[tuple[int, int, float]]]:
    if not (VOC_ROOT / "VOC2007").is_dir():
        pytest.skip(f"real VOC subset not found at {VOC_ROOT}")
    out = tmp_path_factory.mktemp("train") / "lite0_voc.pt"
    calls: list[tuple[int, int, float]] = []
    report = train_head(TrainConfig(voc_root=VOC_ROOT, out=out, limit=48, batch_size=16),
                        progress=lambda done, total, loss: calls.append((done, total, loss)))
    return report, out, calls


@pytest.mark.slow
@needs_voc
def test_train_head_checkpoint_loads_and_beats_chance(trained: tuple[dict, Path, list]) -> None:
    report, out, _ = trained
    assert (report["n_train"], report["n_val"], report["epochs"], report["mode"]) == (48, 48, 100, "linear")
    val = VOCDataset(VOC_ROOT, "2007", "val", limit=48)
    labels = val.image_labels()
    loaded = load_model("efficientnet_lite0", checkpoint=out)
    assert loaded.classes == list(VOC_CLASSES) and loaded.score_kind == "logit"
    inputs, _ = loaded.preprocessing.batch([val.load_image(i) for i in val.image_ids])
    with torch.no_grad():
        scores = torch.cat([loaded.model(chunk) for chunk in inputs.split(16)]).numpy()
    val_map, aps = classification_map(scores, labels)
    # the reloaded model reproduces the reported held-out numbers
    assert report["val_map"] == pytest.approx(val_map, abs=1e-5)
    for name, ap in zip(VOC_CLASSES, aps, strict=True):
        assert (report["val_ap"][name] is None) == math.isnan(ap)
    chance = _chance_map(labels)
    assert val_map > chance + 0.2, (val_map, chance)
    # the classes the 48 training images teach well are recognised well
    assert report["val_ap"]["car"] > 0.8 and report["val_ap"]["cat"] > 0.8


@pytest.mark.slow
@needs_voc
@pytest.mark.parametrize("head", ["voc", "imagenet", "voc+imagenet"])
def test_train_reports_the_held_out_map_of_every_head_a_run_builds(trained: tuple[dict, Path, list],
                                                                    head: str) -> None:
    # the model a run loads with this head reproduces the number train reports for it
    report, out, _ = trained
    val = VOCDataset(VOC_ROOT, "2007", "val", limit=48)
    loaded = load_model("efficientnet_lite0", checkpoint=out if head != "imagenet" else None, head=head)
    inputs, _ = loaded.preprocessing.batch([val.load_image(i) for i in val.image_ids])
    with torch.no_grad():
        scores = torch.cat([loaded.model(chunk) for chunk in inputs.split(16)]).numpy()
    assert report["val_map_by_head"][head] == pytest.approx(classification_map(scores, val.image_labels())[0],
                                                            abs=1e-5)


@pytest.mark.slow
@needs_voc
def test_train_head_checkpoint_metadata_and_frozen_backbone(trained: tuple[dict, Path, list]) -> None:
    report, out, calls = trained
    data = load_checkpoint(out)
    assert (data["arch"], data["weights"], data["head"], data["arch_kwargs"]) == (
        "efficientnet_lite0", "IMAGENET1K", "voc", {})
    assert data["classes"] == list(VOC_CLASSES)
    assert (data["input_size"], data["resize_mode"], data["mean"], data["std"]) == (
        224, "letterbox", [0.5] * 3, [0.5] * 3)
    assert data["train"]["val_map"] == report["val_map"] and data["train"]["split"] == "train"
    assert "seconds" not in data["train"]  # no timings in the file: same work, same bytes
    assert data["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", data["git_commit"])
    pretrained, _ = build_pretrained("efficientnet_lite0")
    for key, value in pretrained.state_dict().items():
        if not key.startswith("classifier."):
            torch.testing.assert_close(data["state_dict"][key], value, rtol=0, atol=0, msg=key)
    assert data["state_dict"]["classifier.weight"].shape == (20, 1280)
    # progress: 3 training feature batches of 16 images, 100 epochs, 3 val feature batches; counted to the total
    assert [done for done, _, _ in calls] == list(range(1, 107)) and {total for _, total, _ in calls} == {106}
    losses = [loss for _, _, loss in calls]
    assert all(math.isnan(loss) for loss in losses[:3] + losses[103:])
    assert all(math.isfinite(loss) for loss in losses[3:103])
    assert losses[102] == pytest.approx(report["train_loss"], abs=1e-6) and losses[102] < losses[3]


@pytest.mark.slow
@needs_voc
def test_train_head_is_byte_reproducible(tmp_path: Path) -> None:
    paths = [tmp_path / f"run{i}.pt" for i in range(2)]
    for path in paths:
        train_head(TrainConfig(voc_root=VOC_ROOT, out=path, val_split=None, limit=12, epochs=5, seed=3))
    assert paths[0].read_bytes() == paths[1].read_bytes()


@pytest.mark.slow
@needs_voc
def test_finetune_last_trains_only_the_last_stage(tmp_path: Path) -> None:
    out = tmp_path / "ft.pt"
    report = train_head(TrainConfig(voc_root=VOC_ROOT, out=out, mode="finetune_last", val_split=None, limit=12,
                                    epochs=1, batch_size=6, lr=1e-3))
    assert report["mode"] == "finetune_last" and report["epochs"] == 1
    state = load_checkpoint(out)["state_dict"]
    pretrained = build_pretrained("efficientnet_lite0")[0].state_dict()
    last_stage = ("blocks.6.", "conv_head.", "bn2.")
    changed = {key for key, value in pretrained.items()
               if not key.startswith("classifier.") and not torch.equal(state[key], value)}
    assert changed, "the last stage did not move"
    assert all(key.startswith(last_stage) for key in changed), sorted(changed)[:5]
    # batch-norm statistics stay frozen (eval mode), only weights and biases move
    assert not any(key.endswith(("running_mean", "running_var")) for key in changed)
    assert "blocks.6.0.conv_pw.weight" in changed


@pytest.mark.slow
@needs_voc
def test_lbfgs_head_at_shortside_keeps_rows_and_preprocessing(tmp_path: Path) -> None:
    """Shortside images are batched by shape, out of order: the pooled features must still go to their own
    rows. The reloaded checkpoint, fed one image at a time, reproduces the reported training objective."""
    out = tmp_path / "head.pt"
    report = train_head(TrainConfig(voc_root=VOC_ROOT, out=out, mode="lbfgs", val_split=None, limit=16,
                                    batch_size=4, input_size=160, resize_mode="shortside", epochs=30))
    assert (report["mode"], report["l2"], report["input_size"], report["resize_mode"]) == (
        "lbfgs", 1e-4, 160, "shortside")
    loaded = load_model("efficientnet_lite0", checkpoint=out)
    assert (loaded.preprocessing.input_size, loaded.preprocessing.resize_mode) == (160, "shortside")
    train = VOCDataset(VOC_ROOT, "2007", "train", limit=16)
    shapes = set()
    with torch.no_grad():
        rows = []
        for image_id in train.image_ids:
            inputs, _ = loaded.preprocessing.batch([train.load_image(image_id)])
            shapes.add(tuple(inputs.shape[2:]))
            rows.append(loaded.model(inputs)[0])
        scores = torch.stack(rows)
        head = loaded.model.get_submodule("classifier")
        objective = balanced_bce(train.image_labels())(scores, torch.arange(16)) + 1e-4 * head.weight.square().sum()
    assert len(shapes) > 1  # the subset mixes landscape and portrait images
    assert float(objective) == pytest.approx(report["train_loss"], abs=1e-4)
    with pytest.raises(ValueError, match="trained at input_size 160, resize_mode shortside; this run uses "
                                         "input_size 224, resize_mode shortside"):
        load_model("efficientnet_lite0", checkpoint=out, input_size=224)


@pytest.mark.slow
@needs_voc
def test_cached_features_give_the_same_checkpoint(tmp_path: Path) -> None:
    """A second `gradloc train` reads the pooled features the first one cached instead of running the network,
    and writes the same bytes as a run without the cache."""
    common = {"voc_root": VOC_ROOT, "limit": 12, "epochs": 5, "seed": 3, "feature_batch_size": 4,
              "cache_dir": tmp_path / "cache"}
    reports = {name: train_head(TrainConfig(out=tmp_path / f"{name}.pt", **common))
               for name in ("cold", "warm")}
    train_head(TrainConfig(out=tmp_path / "plain.pt", **{**common, "cache_dir": None}))
    assert reports["cold"]["features_from_cache"] == {"train": 0, "val": 0}
    assert reports["warm"]["features_from_cache"] == {"train": 12, "val": 12}
    assert len(list((tmp_path / "cache" / "features").glob("*/*.pkl"))) == 24
    assert (tmp_path / "cold.pt").read_bytes() == (tmp_path / "warm.pt").read_bytes() == (
        tmp_path / "plain.pt").read_bytes()


@pytest.mark.slow
@needs_voc
def test_train_reads_the_features_the_cams_stage_cached(tmp_path: Path) -> None:
    config = load_config(None, {
        "data.voc_root": str(VOC_ROOT), "data.split": "train", "data.limit": 12, "model.name": "efficientnet_lite0",
        "model.head": "imagenet", "cams.batch_size": 4, "cams.workers": 0, "cache_dir": str(tmp_path / "cache"),
        "out": str(tmp_path / "results")})
    plan_cams(config).run()
    report = train_head(TrainConfig.from_run(config, tmp_path / "head.pt", val_split=None, limit=12, epochs=5))
    assert report["features_from_cache"] == {"train": 12}
