"""Tests of gradloc.cams.features: the per-image pooled-features files and their verification on read."""

from __future__ import annotations

import logging
import pickle
import re

import numpy as np
import pytest

from gradloc.cams.features import FEATURES_FORMAT, FeatureCache, features_key

SOURCE = {"size": 10, "mtime_ns": 1, "blake2b": "ab"}
BATCH = ["a", "b"]


@pytest.fixture
def cache(tmp_path):
    key = features_key("efficientnet_lite0", "f" * 64, {"input_size": 320, "resize_mode": "shortside"},
                       {"memory_format": "channels_last"})
    return FeatureCache(tmp_path, key)


def test_round_trip_needs_the_same_image_bytes_and_batch(cache):
    features = np.arange(4, dtype=np.float32)
    assert cache.get("a", SOURCE, 4, BATCH) is None
    cache.put("a", features, SOURCE, BATCH)
    np.testing.assert_array_equal(cache.get("a", SOURCE, 4, BATCH), features)
    touched = {**SOURCE, "mtime_ns": 2}  # same bytes, other time stamp: still valid
    np.testing.assert_array_equal(cache.get("a", touched, 4, BATCH), features)
    assert cache.get("a", {**SOURCE, "blake2b": "cd"}, 4, BATCH) is None  # edited image
    assert cache.get("a", SOURCE, 4, ["a", "c"]) is None  # computed with other batch-mates
    assert cache.get("a", SOURCE, 5, BATCH) is None  # another network width


def test_key_names_everything_that_changes_the_features(tmp_path):
    base = ("efficientnet_lite0", "f" * 64, {"input_size": 320}, {})
    roots = {FeatureCache(tmp_path, features_key(*base)).root,
             FeatureCache(tmp_path, features_key("efficientnet_lite1", *base[1:])).root,
             FeatureCache(tmp_path, features_key(base[0], "e" * 64, *base[2:])).root,
             FeatureCache(tmp_path, features_key(*base[:2], {"input_size": 224}, {})).root,
             FeatureCache(tmp_path, features_key(*base[:3], {"precision": "bfloat16"})).root}
    assert len(roots) == 5


@pytest.mark.parametrize(("record", "problem"), [
    ({"format": "other"}, "not a gradloc.features/1 file"),
    ({"format": FEATURES_FORMAT, "image_id": "b", "features": np.zeros(4, np.float32), "batch": BATCH,
      "source": SOURCE}, "holds the features of image 'b', not 'a'"),
    ({"format": FEATURES_FORMAT, "image_id": "a", "features": np.zeros(4, np.float64), "batch": BATCH,
      "source": SOURCE}, r"features are float64\[4\], expected float32\[4\]"),
    ({"format": FEATURES_FORMAT, "image_id": "a", "features": np.full(4, np.nan, np.float32), "batch": BATCH,
      "source": SOURCE}, "NaN or infinite"),
    ({"format": FEATURES_FORMAT, "image_id": "a", "features": np.zeros(4, np.float32), "source": SOURCE},
     "lacks its batch or source"),
])
def test_a_bad_file_is_logged_and_recomputed(cache, record, problem, caplog):
    cache.put("a", np.zeros(4, np.float32), SOURCE, BATCH)  # writes key.json and the folder
    (cache.root / "a.pkl").write_bytes(pickle.dumps(record))
    with caplog.at_level(logging.WARNING, logger="gradloc.cams.features"):
        assert cache.get("a", SOURCE, 4, BATCH) is None
    assert any(re.search(problem, r.getMessage()) for r in caplog.records)


def test_a_file_that_is_no_pickle_of_plain_data_is_refused(cache, caplog):
    cache.put("a", np.zeros(4, np.float32), SOURCE, BATCH)
    (cache.root / "a.pkl").write_bytes(pickle.dumps(logging.getLogger("x")))
    with caplog.at_level(logging.WARNING, logger="gradloc.cams.features"):
        assert cache.get("a", SOURCE, 4, BATCH) is None
    assert "recomputing" in caplog.text


def test_ids_that_are_no_file_names_are_refused(cache):
    with pytest.raises(ValueError, match="cannot be used as a cache file name"):
        cache.put("../x", np.zeros(4, np.float32), SOURCE, BATCH)


def test_clean_removes_the_litter_of_killed_writes(cache):
    cache.put("a", np.zeros(4, np.float32), SOURCE, BATCH)
    litter = cache.root / ".a.pkl.999999999.x.tmp"  # a pid no process has
    litter.write_bytes(b"partial")
    cache.clean()
    assert not litter.exists() and (cache.root / "a.pkl").is_file()
