import dataclasses
import re

import pytest

from gradloc.core.provenance import config_hash
from gradloc.run.config import ConfigError, RunConfig, load_config
from tests.conftest import CONFIGS


def test_defaults_are_the_documented_sweep():
    config = load_config()
    assert config.boxes.thresholds == (0.01, 0.02, 0.06, 0.15, 0.2)
    assert config.score.iou == (0.3, 0.4, 0.5)
    assert config.boxes.threshold_mode == "max"
    assert config.score.metric == "voc07"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)


def test_overrides_use_dotted_keys_and_lists_become_tuples(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("boxes:\n  thresholds: [0.1, 0.2]\nname: x\n")
    config = load_config(path, {"boxes.box_mode": "all", "score.iou": (0.5,)})
    assert config.boxes.thresholds == (0.1, 0.2)
    assert config.boxes.box_mode == "all"
    assert config.score.iou == (0.5,)
    assert config.name == "x"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("boxes:\n  thresold: [0.1]\n", r"unknown config key boxes\.thresold"),
        ("boxes:\n  thresholds: [0.1, high]\n", r"boxes\.thresholds\[1\]'?: expected a number"),
        ("boxes:\n  thresholds: 0.1\n", r"boxes\.thresholds.*expected a list"),
        ("boxes:\n  thresholds: [1.5]\n", r"boxes\.thresholds\[0\].*outside"),
        ("boxes:\n  thresholds: [0.0125]\n", r"more than 3 decimals"),
        ("score:\n  iou: [0]\n", r"score\.iou\[0\].*outside"),
        ("cams:\n  batch_size: two\n", r"cams\.batch_size'?: expected an integer"),
        ("demo:\n  enabled: 1\n", r"demo\.enabled'?: expected true or false"),
        ("data: [1, 2]\n", r"'data': expected a mapping"),
        ("boxes:\n  explain: everything\n", r"boxes\.explain"),
        ("score:\n  only: [car, nope]\n", r"score\.only.*'nope' is not a class"),
        ("- just\n- a list\n", r"mapping of settings at the top level"),
        ("boxes: [unclosed\n", r"not valid YAML"),
        ("model:\n  resize_mode: crop\n", r"model\.resize_mode.*'crop' is not one of letterbox, stretch, shortside"),
        ("train:\n  l2: -1\n", r"train\.l2'?: -1\.0 must be at least 0"),
        ("train:\n  epochs: 0\n", r"train\.epochs'?: 0 must be between 1 and"),
        ("train:\n  optimizer: adam\n", r"unknown config key train\.optimizer"),
        ("cams:\n  flip: yes please\n", r"cams\.flip'?: expected true or false"),
        ("cams:\n  masked_batch: 0\n", r"cams\.masked_batch'?: 0 must be between 1 and"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_loading_has_no_side_effects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    load_config(CONFIGS / "demo.yaml")
    assert list(tmp_path.iterdir()) == []


def test_config_hash_changes_with_any_setting_and_ignores_key_order():
    config = load_config()
    changed = dataclasses.replace(config, cams=dataclasses.replace(config.cams, layer="layer3"))
    assert config_hash(config.to_dict()) != config_hash(changed.to_dict())
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})


def test_box_settings_are_validated_at_load_and_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown boxes\.box_mode 'biggest'; choose one of largest, all, union"):
        load_config(overrides={"boxes.box_mode": "biggest"})
    with pytest.raises(ConfigError, match=r"boxes\.connectivity 3"):
        load_config(overrides={"boxes.connectivity": 3})


def test_train_section_and_resize_mode_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  input_size: 320\n  resize_mode: shortside\ncams:\n  flip: true\n"
                    "train:\n  mode: lbfgs\n  l2: 0.001\n  split: trainval\n  val_split: null\n")
    config = load_config(path)
    assert (config.model.input_size, config.model.resize_mode, config.cams.flip) == (320, "shortside", True)
    assert (config.train.mode, config.train.l2, config.train.split, config.train.val_split) == (
        "lbfgs", 0.001, "trainval", None)
    defaults = load_config()
    assert defaults.model.resize_mode is None  # the checkpoint's, else the weights' (letterbox)
    assert defaults.cams.flip is False
    assert (defaults.train.mode, defaults.train.l2, defaults.train.split) == ("linear", 1e-4, "train")


def test_selected_threshold_must_be_in_the_sweep(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("boxes:\n  thresholds: [0.1, 0.2]\n  selected_threshold: 0.2\n")
    assert load_config(path).boxes.selected_threshold == 0.2
    path.write_text("boxes:\n  thresholds: [0.1, 0.2]\n  selected_threshold: 0.3\n")
    with pytest.raises(ConfigError, match=r"selected_threshold': 0.3 is not one of boxes.thresholds \(0.1, 0.2\)"):
        load_config(path)


# --- untrusted config files and out-of-range values (issue 18 items 8, 10, 12, 13) -----------------------------


def test_yaml_aliases_are_refused_and_anchors_alone_are_fine(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("boxes: &b\n  thresholds: [0.1]\nscore: {iou: [0.5]}\nother: *b\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML \(line 4: alias \*b refused; configs may not"):
        load_config(path)
    path.write_text("boxes: &b\n  thresholds: [0.1]\n")
    assert load_config(path).boxes.thresholds == (0.1,)


def test_oversized_and_deeply_nested_configs_are_refused(tmp_path):
    from gradloc.run.config import MAX_CONFIG_BYTES

    path = tmp_path / "big.yaml"
    path.write_text("#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match=r"big\.yaml: 1,000,001 bytes; a config is a small text file"):
        load_config(path)
    path.write_text("a: " + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match=r"big\.yaml: not valid YAML"):
        load_config(path)


def test_bad_values_are_quoted_as_short_excerpts(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: [" + ", ".join(["x" * 1000] * 500) + "]\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith("config key 'name': expected a string, got ['xxx")
    assert len(str(error.value)) < 200


@pytest.mark.parametrize(("key", "value", "message"), [
    ("model.input_size", 30000, "30,000 must be between 8 and 2,048"),
    ("seed", -5, "-5 must be between 0 and 4,294,967,295"),
    ("cams.workers", 1000, "1,000 must be between 0 and 64"),
    ("cams.batch_size", 10**9, "must be between 1 and 4,096"),
    ("train.lr", -1.0, "-1.0 must be at least 0"),
    ("demo.n_train", 0, "0 must be between 1 and 100,000"),
    ("train.l2", float("nan"), "expected a finite number, got nan"),
    ("boxes.score_cut", float("inf"), "expected a finite number, got inf"),
    ("name", "n" * 250, "is 250 bytes long"),
    ("name", ".run.ready", "starts with '.'"),
])
def test_every_number_has_a_range_and_errors_carry_their_key(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_config(None, {key: value})
    assert error.value.key == key and f"'{key}'" in str(error.value)


def test_minus_zero_is_read_as_zero():
    config = load_config(None, {"boxes.thresholds": (-0.0, 0.2), "boxes.score_cut": -0.0})
    assert str(config.boxes.thresholds[0]) == "0.0" and str(config.boxes.score_cut) == "0.0"


# --- places: outputs never inside each other (issue 18 item 1) ----------------------------------------------------


@pytest.fixture
def devkit(tmp_path):
    year = tmp_path / "data" / "VOCdevkit" / "VOC2007"
    (year / "ImageSets" / "Main").mkdir(parents=True)
    return year.parent


@pytest.mark.parametrize(("changes", "message"), [
    (lambda t, d: {"out": str(d / "VOC2007"), "name": "JPEGImages"}, "the run folder (--out/--name)"),
    (lambda t, d: {"out": str(d)}, "is inside the dataset"),
    (lambda t, d: {"cache_dir": str(d / "cache")}, "the heatmap cache (--cache-dir)"),
    (lambda t, d: {"out": str(t / "r"), "name": "n", "cache_dir": str(t / "r" / "n" / "c")},
     "inside the run folder, which every rerun replaces"),
    (lambda t, d: {"out": str(t / "c" / "runs"), "cache_dir": str(t / "c")}, "inside the heatmap cache"),
    (lambda t, d: {"out": str(t), "name": "data"}, "the dataset (--voc-root)"),
], ids=["run folder in the year folder", "run folder in the devkit", "cache in the devkit", "cache in the run folder",
        "run folder in the cache", "dataset in the run folder"])
def test_outputs_and_dataset_may_not_nest(changes, message, tmp_path, devkit):
    from gradloc.run.config import check_places

    config = load_config(None, {"data.voc_root": str(devkit), "out": str(tmp_path / "results"),
                                "cache_dir": str(tmp_path / "cache"), **changes(tmp_path, devkit)})
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_places(config)


def test_places_side_by_side_and_through_symlinks(tmp_path, devkit):
    from gradloc.run.config import check_places

    config = load_config(None, {"data.voc_root": str(devkit), "out": str(tmp_path / "results"),
                                "cache_dir": str(tmp_path / "cache")})
    check_places(config)
    (tmp_path / "link").symlink_to(devkit / "VOC2007")
    hidden = dataclasses.replace(config, out=str(tmp_path / "link"), name="JPEGImages")
    with pytest.raises(ConfigError, match="inside the dataset"):
        check_places(hidden)


def test_a_demo_configs_data_lives_in_its_cache(tmp_path):
    from gradloc.run.config import check_places

    demo = load_config(None, {"demo.enabled": True, "cache_dir": str(tmp_path / "cache"),
                              "out": str(tmp_path / "results")})
    check_places(demo)  # before preparation: the data is not there yet
    prepared = dataclasses.replace(demo, data=dataclasses.replace(
        demo.data, voc_root=str(tmp_path / "cache" / "demo" / "data" / "VOCdevkit"), year="demo"))
    check_places(prepared)


def test_nothing_may_live_inside_a_folder_gradloc_replaces(tmp_path, devkit):
    from gradloc.core.folders import marker_name
    from gradloc.run.config import check_places

    other_run = tmp_path / "results" / "other"
    other_run.mkdir(parents=True)
    (other_run / marker_name("run")).write_text("{}")
    base = {"data.voc_root": str(devkit), "out": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache")}
    for changes, message in (({"cache_dir": str(other_run / "cache")}, "the heatmap cache (--cache-dir) would be"),
                             ({"out": str(other_run)}, "the run folder (--out/--name) would be")):
        with pytest.raises(ConfigError, match=re.escape(message) + rf" inside {other_run}, a folder gradloc made"):
            check_places(load_config(None, {**base, **changes}))
    check_places(load_config(None, base))
