"""The flag machinery (gradloc.cli.options): number lists with ranges, `none` for optional config values, and
the flags each command shows."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from gradloc.cli import main
from gradloc.cli.options import build_config, parse_floats


def test_ranges_expand_to_the_explicit_decimal_values():
    assert parse_floats("0.5:0.95:0.05", "--iou") == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    assert parse_floats("0.3, 0.5:0.7:0.1,0.9", "--iou") == (0.3, 0.5, 0.6, 0.7, 0.9)  # 0.6, not 0.6000000000000001
    assert parse_floats("0.2:0.2:0.1", "--thresholds") == (0.2,)
    assert parse_floats("0.1,0.2", "--iou") == (0.1, 0.2)


@pytest.mark.parametrize(("value", "message"), [
    ("0.5:0.95", "is not start:stop:step with three numbers"),
    ("0.5:x:0.1", "is not start:stop:step with three numbers"),
    ("0.9:0.5:0.1", "needs start <= stop and a step > 0"),
    ("0.5:0.9:0", "needs start <= stop and a step > 0"),
    ("0.5:0.95:0.1", "0.95 is not reached from 0.5 in whole steps of 0.1"),
    ("0.5,abc", "expected comma-separated numbers or ranges"),
])
def test_bad_ranges_name_the_value(value, message):
    with pytest.raises(click.BadParameter, match=message):
        parse_floats(value, "--iou")


def test_the_range_check_stays_in_core_ranges():
    """A range is only expanded here; an IoU of 1 is refused by gradloc.core.ranges, naming the position."""
    with pytest.raises(ValueError, match=r"config key score.iou\[2\]: 1 is outside \(0, 1\)"):
        build_config(None, {"iou": "0.5:1:0.25", "model": "demo_cnn"})
    config = build_config(None, {"iou": "0.5:0.95:0.05", "thresholds": "0.1:0.3:0.1"})
    assert config.score.iou == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    assert config.boxes.thresholds == (0.1, 0.2, 0.3)


def test_a_bad_range_is_a_usage_error_on_the_command_line(tmp_path):
    result = CliRunner().invoke(main, ["score", str(tmp_path), "--iou", "0.5:0.95:0.1"])
    assert result.exit_code == 2 and "0.95 is not reached from 0.5 in whole steps of 0.1" in result.output


def test_demo_help_does_not_offer_the_config_it_refuses():
    def options(command):
        return re.findall(r"^  (--[a-z-]+)", CliRunner().invoke(main, [command, "--help"]).output, re.M)

    assert "--config" not in options("demo") and "--checkpoint" in options("demo")
    assert "--config" in options("run")
    result = CliRunner().invoke(main, ["demo", "--config", "x.yaml"])
    assert result.exit_code == 2 and "use `gradloc run --config FILE`" in result.output


def test_none_unsets_optional_config_values(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  checkpoint: head.pt\n  weights: IMAGENET1K_V1\n  input_size: 320\n"
                      "cams:\n  layer: bn2\ndata:\n  limit: 5\n")
    given = build_config(str(config), {})
    assert (given.model.checkpoint, given.cams.layer, given.data.limit) == ("head.pt", "bn2", 5)
    unset = build_config(str(config), {"checkpoint": "none", "weights": "None", "layer": "none", "limit": "none",
                                       "input_size": "none"})
    assert (unset.model.checkpoint, unset.model.weights, unset.cams.layer, unset.data.limit,
            unset.model.input_size) == (None, None, None, None, None)
    with pytest.raises(click.BadParameter, match=r"data\.split has no unset value"):
        build_config(str(config), {"split": "none"})


def test_none_reaches_the_config_from_the_command_line(tmp_path, monkeypatch):
    """`--limit none` passes the integer flag's type; the unset config is what the command runs."""
    seen = {}

    def record(ctx, config_path, flags, shard=None):
        seen["config"] = build_config(config_path, flags)

    monkeypatch.setattr("gradloc.cli.stages._run_and_print", record)
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  checkpoint: head.pt\ndata:\n  limit: 5\n")
    result = CliRunner().invoke(main, ["run", "--config", str(config), "--checkpoint", "none", "--limit", "none",
                                       "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert seen["config"].model.checkpoint is None and seen["config"].data.limit is None
    assert seen["config"].cams.batch_size == 4
    result = CliRunner().invoke(main, ["run", "--config", str(config), "--batch-size", "none"])
    assert result.exit_code == 2 and "cams.batch_size has no unset value" in result.output
    result = CliRunner().invoke(main, ["run", "--batch-size", "x"])
    assert result.exit_code == 2 and "'x' is not a valid integer" in result.output
