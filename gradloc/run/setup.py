"""What every stage of a run opens first: the demo data, the checked names, the split and the classifier."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gradloc.boxes.baselines import BASELINES
from gradloc.cams.methods import METHODS, check_eigen_smooth, test_time_augmentation
from gradloc.core.names import excerpt
from gradloc.datasets.demo import DEMO_CLASSES, generate_demo
from gradloc.datasets.voc import VOCDataset
from gradloc.models.build import check_model, load_model, resolve_device
from gradloc.models.demo_cnn import train_demo_model
from gradloc.run.config import RunConfig
from gradloc.scoring.voc import METRICS

logger = logging.getLogger(__name__)


Progress = Callable[[int], None] | None


@dataclass
class StageTimes:
    """Wall-clock seconds per stage, for the run summary."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def prepare_demo(config: RunConfig, progress: Callable[[int, int, float], None] | None = None) -> RunConfig:
    """For a demo config: generate the synthetic dataset and train the tiny CNN (both reused when present),
    and return the config pointing at them. Other configs are returned unchanged."""
    if not config.demo.enabled:
        return config

    demo_root = Path(config.cache_dir) / "demo"
    voc_root = generate_demo(demo_root / "data", n_train=config.demo.n_train, n_val=config.demo.n_val,
                             n_test=config.demo.n_test, seed=config.seed)
    checkpoint = train_demo_model(voc_root, demo_root / "model" / f"demo_cnn_seed{config.seed}.pt",
                                  seed=config.seed, max_seconds=config.demo.train_seconds, progress=progress)
    data = dataclasses.replace(config.data, voc_root=str(voc_root), year="demo", classes=DEMO_CLASSES)
    model = dataclasses.replace(config.model, name="demo_cnn", checkpoint=str(checkpoint), head="voc")
    return dataclasses.replace(config, data=data, model=model)


def check_names(config: RunConfig) -> None:
    """Fail before any work on a name no registry knows: CAM method, baselines, AP metric, model, device.

    Raises:
        ValueError: naming the key and the valid choices.
    """

    method = METHODS.get(config.cams.method)
    if method is None:
        raise ValueError(f"unknown CAM method {excerpt(config.cams.method)} (cams.method); choose one of "
                         f"{', '.join(METHODS)}")
    if method.input_resolution:
        raise ValueError(f"CAM method {config.cams.method!r} makes pixel-level pictures, not heatmaps for "
                         "boxes; use it with `gradloc show --guided`")
    check_eigen_smooth(config.cams.method, config.cams.eigen_smooth)
    test_time_augmentation(config.cams.flip, config.cams.aug_smooth)
    for name in config.boxes.baselines:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {excerpt(name)} (boxes.baselines); choose from "
                             f"{', '.join(BASELINES)}")
    if config.score.metric not in METRICS:
        raise ValueError(f"unknown AP metric {excerpt(config.score.metric)} (score.metric); choose one of "
                         f"{', '.join(METRICS)}")
    if not config.demo.enabled:
        check_model(config.model.name)
    resolve_device(config.cams.device)


def load_classifier(config: RunConfig):  # -> gradloc.models.build.LoadedModel

    m = config.model
    return load_model(m.name, weights=m.weights, checkpoint=m.checkpoint, head=m.head,
                      classes=config.data.classes, input_size=m.input_size, resize_mode=m.resize_mode)


def require_images(dataset: VOCDataset) -> None:
    """Refuse a split with no images left (empty image set, or every item skipped) before any work.

    Raises:
        ValueError: naming the split and, when items were skipped, the first reason.
    """
    if len(dataset):
        return
    first = dataset.skipped[0] if dataset.skipped else None
    why = (f"all {len(dataset.skipped)} item(s) were skipped (first: {first['file']}: {first['reason']})"
           if first else "its image set lists no images")
    raise ValueError(f"{dataset.base / 'ImageSets' / 'Main' / (dataset.split + '.txt')}: no images to evaluate, "
                     f"{why}; nothing was written")


def with_method(config: RunConfig, method: str) -> RunConfig:
    return dataclasses.replace(config, cams=dataclasses.replace(config.cams, method=method))
