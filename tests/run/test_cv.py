"""Tests of gradloc.run.cv and the cross-validated sweep: variants, fold heads fitted on the other folds and
refitted on the whole selection split, held-out scoring of every image once, and no choice made on the
reported split."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from gradloc.run import cv
from gradloc.run.config import ConfigError, load_config
from gradloc.run.setup import prepare_demo
from gradloc.run.sweep import run_sweep, sweep_dir
from tests.conftest import CONFIGS, VOC_ROOT


def test_variants_file_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "v.yaml"
    path.write_text("- {name: base}\n- name: union\n  what: one box around all components\n"
                    "  overrides: {boxes.box_mode: union}\n")
    variants = cv.load_variants(path)
    assert [v.name for v in variants] == ["base", "union"] and variants[1].what.startswith("one box")
    config = load_config(None)
    assert variants[1].apply(config).boxes.box_mode == "union" and variants[0].apply(config) == config
    for text, message in (("- {what: x}\n", "string 'name'"), ("- {name: a}\n- {name: a}\n", "must be unique"),
                          ("{name: a}\n", "non-empty list"), ("- {name: a, overrides: [1]}\n", "dotted config keys"),
                          ("- {name: a, extra: 1}\n", "string 'name'")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            cv.load_variants(path)
    path.write_text("- {name: a, overrides: {boxes.box_mode: biggest}}\n")
    with pytest.raises(ConfigError, match="box_mode"):
        cv.load_variants(path)[0].apply(config)


def test_fold_heads_are_fitted_on_the_other_folds_and_the_refit_on_all(tmp_path: Path, monkeypatch) -> None:
    """Each fold's head is trained on every selection image outside the fold (no held-out image), the reported
    run's head on all of them; a head already trained with the same inputs is reused."""
    trained = []

    def fake_train(job):
        trained.append(job)
        Path(job.out).parent.mkdir(parents=True, exist_ok=True)
        Path(job.out).write_bytes(b"head")

    def fake_load(path):
        if not Path(path).is_file():
            raise FileNotFoundError(path)

    monkeypatch.setattr(cv, "train_head", fake_train)
    monkeypatch.setattr(cv, "load_checkpoint", fake_load)
    config = load_config(CONFIGS / "voc07.yaml", {"cache_dir": str(tmp_path)})
    ids = [f"{i:06d}" for i in range(10)]
    folds = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    paths = {cv.fold_config(config, "train", [i for i, f in zip(ids, folds, strict=True) if f != k]).model.checkpoint
             for k in range(3)}
    assert len(paths) == 3 and all(str(tmp_path / "heads") in p for p in paths)
    for k, job in enumerate(trained):
        assert set(job.ids) == {i for i, f in zip(ids, folds, strict=True) if f != k}
        assert job.split == "train" and job.val_split is None and job.mode == config.train.mode
    refit = cv.refit_config(config, "train", None)
    assert trained[-1].ids is None and refit.model.checkpoint not in paths
    cv.fold_config(config, "train", [i for i, f in zip(ids, folds, strict=True) if f != 0])
    assert len(trained) == 4  # reused, not trained again
    imagenet = dataclasses.replace(config, model=dataclasses.replace(config.model, head="imagenet", checkpoint=None))
    assert cv.fold_config(imagenet, "train", ids) is imagenet and len(trained) == 4


@pytest.mark.slow
def test_cross_validation_scores_every_selection_image_once(tmp_path: Path) -> None:
    config = prepare_demo(load_config(CONFIGS / "demo.yaml", {
        "cache_dir": str(tmp_path / "cache"), "out": str(tmp_path / "out"), "boxes.thresholds": [0.2, 0.6],
        "boxes.selected_threshold": None, "demo.n_train": 60, "demo.n_val": 24, "demo.n_test": 20,
        "demo.train_seconds": 30.0}))
    result = cv.cross_validate(config, "val", k=3, seed=0)
    assert len(result.image_ids) == len(set(result.image_ids)) == 24 and set(result.folds) == {0, 1, 2}
    from gradloc.run.config import open_dataset

    gt = open_dataset(dataclasses.replace(config, data=dataclasses.replace(config.data, split="val"))).ground_truth()
    mean = result.rows[(result.rows["class"] == "mAP") & (result.rows["source"] == "cam")]
    assert set(mean["n_gt"]) == {int((~gt.difficult).sum())}  # every val GT box counted once over the folds
    assert {"cam", "center", "full", "shuffled", "blob"} <= set(result.rows["source"])
    assert set(result.center["size"]) == set(cv.CENTER_SIZES)
    size, value = cv.best_center_size(result.center, 0.5)
    assert 0 < size <= 1 and value == result.center[np.isclose(result.center["iou"], 0.5)]["ap"].max()


@pytest.mark.slow
def test_sweep_with_folds_chooses_before_it_reports(tmp_path: Path, monkeypatch) -> None:
    """The evaluation split is run once, after every choice, at the variant with the best held-out score."""
    import gradloc.run.sweep as sweep_module

    config = prepare_demo(load_config(CONFIGS / "demo.yaml", {
        "cache_dir": str(tmp_path / "cache"), "out": str(tmp_path / "out"), "boxes.thresholds": [0.2, 0.6],
        "boxes.selected_threshold": None, "demo.n_train": 60, "demo.n_val": 24, "demo.n_test": 20,
        "demo.train_seconds": 30.0}))
    order = []
    real_cv, real_run = sweep_module.cross_validate, sweep_module.run_split
    monkeypatch.setattr(sweep_module, "cross_validate", lambda c, *a, **k: (order.append(("cv", c.boxes.box_mode)),
                                                                             real_cv(c, *a, **k))[1])
    monkeypatch.setattr(sweep_module, "run_split", lambda c, *a, **k: (order.append(("run", c.data.split)),
                                                                       real_run(c, *a, **k))[1])
    variants = [cv.Variant("largest"), cv.Variant("union", "union box", {"boxes.box_mode": "union"})]
    result = run_sweep(config, "val", "test", folds=3, variants=variants)
    assert [step[0] for step in order] == ["cv", "run", "cv", "run"] and {s for k, s in order if k == "run"} == {"test"}
    table = result.table
    assert set(table["chosen_on"]) == {"val (3 held-out folds)", "test"}
    ablations = (sweep_dir(config) / "ablations.csv").read_text()
    assert "largest" in ablations and "union" in ablations
    chosen = load_config(sweep_dir(config) / "chosen.yaml")
    assert chosen.boxes.selected_threshold in (0.2, 0.6) and 0 < chosen.boxes.center_size <= 1


@pytest.mark.slow
@pytest.mark.skipif(not (VOC_ROOT / "VOC2007").is_dir(), reason="real VOC subset not found")
def test_real_voc_cross_validation_refits_the_head_per_fold(tmp_path: Path) -> None:
    """On real photographs with a trained voc+imagenet head: three fold heads and one refit head are trained,
    each on its own images, and the held-out scores cover every selection image."""
    config = load_config(CONFIGS / "voc07.yaml", {
        "data.voc_root": str(VOC_ROOT), "data.limit": 18, "train.limit": 18, "cache_dir": str(tmp_path),
        "out": str(tmp_path / "out"), "model.input_size": 160, "boxes.thresholds": [0.2, 0.25],
        "boxes.selected_threshold": None,
        "boxes.baselines": ["center"], "cams.workers": 0})
    result = cv.cross_validate(config, "train", k=3, seed=0)
    heads = sorted((tmp_path / "heads").glob("*.pt"))
    assert len(heads) == 3 and len(result.image_ids) == 18
    from gradloc.models.checkpoints import load_checkpoint

    assert sorted(load_checkpoint(h)["train"]["n_train"] for h in heads) == sorted(
        int((result.folds != f).sum()) for f in range(3))
    refit = cv.refit_config(config, "train", None)
    assert load_checkpoint(refit.model.checkpoint)["train"]["n_train"] == 18
