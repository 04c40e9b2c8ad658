"""The README is tested: its examples run in order in a temporary copy and print the numbers it quotes; no two
examples write the same place; every config that needs a checkpoint names, at its top, the command that makes it.

README examples are the ```console blocks: a line ``$ gradloc ...`` is a command (a trailing backslash
continues it), the lines under it are an excerpt of what it prints on stdout (``...`` skips lines): each must
appear, whitespace runs aside, as a line of the output. Every ``gradloc`` command of a code block is in a
console block, so none goes untested. The examples run in ``<tmp>/gradloc`` (a copy of ``configs/`` and
``scripts/``) beside ``<tmp>/shared``, a link to ``../shared``, as in a fresh clone.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONFIGS, ROOT

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


@dataclass
class Example:
    line: int  # of the README, 1-based
    args: list[str]  # after "gradloc"
    expected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"README.md:{self.line}: gradloc {shlex.join(self.args)}"


def _blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, first line number of the body, body) of every fenced block."""
    return [(m.group(1), text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text)]


def console_examples(text: str) -> list[Example]:
    examples: list[Example] = []
    for language, first, body in _blocks(text):
        if language != "console":
            continue
        lines = body.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("$ "):
                start, command = first + i, line[2:]
                while command.endswith("\\"):
                    i += 1
                    command = command[:-1] + " " + lines[i].strip()
                words = shlex.split(command)
                assert words[0] == "gradloc", f"README.md:{start}: console examples are gradloc commands"
                examples.append(Example(start, words[1:]))
            elif line.strip() and line.strip() != "..." and examples:
                examples[-1].expected.append(line)
            i += 1
    return examples


def _squeeze(line: str) -> str:
    return " ".join(line.split())


def test_every_gradloc_command_of_the_readme_is_a_tested_example():
    text = README.read_text()
    examples = console_examples(text)
    assert len(examples) >= 15
    tested = {_squeeze(" ".join(["gradloc", *example.args])) for example in examples}
    for language, first, body in _blocks(text):
        for offset, line in enumerate(body.splitlines()):
            command = line[2:] if language == "console" and line.startswith("$ ") else line
            if command.startswith("gradloc ") and not command.endswith("\\"):
                assert _squeeze(" ".join(shlex.split(command))) in tested, f"README.md:{first + offset}: {line}"
    used = {example.args[0] for example in examples}
    from gradloc.cli import main

    assert set(main.commands) <= used | {"merge"}, sorted(set(main.commands) - used)  # merge: needs shards


def _config_of(args: list[str]) -> dict:
    if "--config" in args:
        return yaml.safe_load((CONFIGS.parent / args[args.index("--config") + 1]).read_text())
    return yaml.safe_load((ROOT / "gradloc" / "data" / "demo.yaml").read_text()) if args[0] == "demo" else {}


def _flag(args: list[str], name: str, default: str | None = None) -> str | None:
    return args[args.index(name) + 1] if name in args else default


def written_places(example: Example) -> list[str]:
    """The folders and files an example creates or replaces (a run folder updated in place does not count)."""
    args = example.args
    command, config = args[0], _config_of(args)
    out, name = _flag(args, "--out", config.get("out", "results")), _flag(args, "--name", config.get("name", "run"))
    if command in ("run", "demo", "boxes"):
        return [f"{out}/{name}"]
    if command == "sweep":
        splits = [_flag(args, "--select-split", "train"), _flag(args, "--eval-split", "val")]
        return [f"{out}/{name}-sweep", *(f"{out}/{name}-{split}" for split in splits)]
    if command == "train":
        return [_flag(args, "--checkpoint-out")]
    if command == "show":
        return [_flag(args, "--per-image") or _flag(args, "--png", "samples.png")]
    if command == "plot":
        return [_flag(args, "--out", "plots")]
    if command == "export":
        return [args[2]]
    return []


def test_no_two_examples_write_the_same_place():
    seen: dict[str, Example] = {}
    for example in console_examples(README.read_text()):
        for place in written_places(example):
            place = os.path.normpath(place)
            assert place not in seen, f"{example} replaces what {seen[place]} wrote ({place})"
            seen[place] = example


def test_every_config_that_needs_a_checkpoint_names_the_command_that_makes_it():
    from gradloc.cli import main

    for path in sorted(CONFIGS.glob("*.yaml")):
        text = path.read_text()
        checkpoint = (yaml.safe_load(text).get("model") or {}).get("checkpoint")
        if not checkpoint:
            continue
        header = [line.lstrip("# ").rstrip() for line in text.splitlines() if line.startswith("#")]
        commands = [shlex.split(line) for line in header if line.startswith("gradloc train ")]
        assert len(commands) == 1, f"{path.name}: no `gradloc train ... --checkpoint-out {checkpoint}` at its top"
        args = commands[0][1:]
        assert _flag(args, "--checkpoint-out") == checkpoint, f"{path.name}: the command makes another file"
        main.get_command(None, "train").make_context("train", args[1:])  # parses: every flag exists


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A fresh-clone-like folder: configs/ and scripts/ copied, ../shared linked to the real one."""
    root = tmp_path_factory.mktemp("readme")
    work = root / "gradloc"
    for folder in ("configs", "scripts"):
        shutil.copytree(ROOT / folder, work / folder)  # links followed: configs/demo.yaml is the packaged file
    (root / "shared").symlink_to(ROOT.parent / "shared", target_is_directory=True)
    return work


@pytest.mark.slow
def test_readme_examples_run_in_order_and_print_what_the_readme_quotes(workdir, voc_root):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for example in console_examples(README.read_text()):
        done = subprocess.run([sys.executable, "-m", "gradloc", *example.args], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=1800, check=False)
        assert done.returncode == 0, f"{example}\n{done.stderr[-3000:]}"
        printed = {_squeeze(line) for line in done.stdout.splitlines()}
        missing = [line for line in example.expected if _squeeze(line) not in printed]
        assert not missing, f"{example}: the README quotes lines it does not print:\n" + "\n".join(missing) + (
            f"\n--- it printed:\n{done.stdout[:4000]}")


RESULTS = ROOT / "results" / "voc07-subset"


def _pct(value: float, sign: bool = False) -> str:
    return f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"


def test_the_readme_quotes_the_benchmark_files():
    """The Results section's numbers are those of results/voc07-subset (written by scripts/benchmark.py): the
    headline with its interval, the paired differences to the baselines, and the ablation and methods tables."""
    import json

    text = " ".join(README.read_text().split())
    rows = [json.loads(line) for line in (RESULTS / "rows.jsonl").read_text().splitlines()]
    headline = {row["metric"]: row for row in rows[0]["headline"]}
    main = headline["mAP@0.5 (voc07), all classes with GT"]
    assert f"mAP@0.5 = {_pct(main['value'])} [{_pct(main['low'])}, {_pct(main['high'])}]" in text
    big = headline["mAP@0.5 (voc07), classes with >= 10 images"]
    assert f"{_pct(big['value'])} [{_pct(big['low'])}, {_pct(big['high'])}]" in text
    for name in ("center", "full"):
        diff = headline[f"mAP@0.5: CAM - {name}"]
        assert f"{_pct(diff['value'], True)} [{_pct(diff['low'], True)}, {_pct(diff['high'], True)}]" in text, name
    assert f"τ = {rows[0]['tau']:g}" in text
    for line in (RESULTS / "ablations.md").read_text().splitlines():  # quoted whole
        if line.startswith("|") and not line.startswith("|--"):
            assert " ".join(line.split()) in text, f"ablations.md: {line}"
    section = README.read_text().split("\n## Results")[1].split("\n## ")[0]
    lines = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    for row in rows:  # the methods table: one line per row with its held-out tau and val mAP@0.5 [interval]
        numbers = {r["metric"]: r for r in row["headline"]}
        value = numbers["mAP@0.5 (voc07), all classes with GT"]
        line = lines.get(row["name"], "")
        assert f"| {row['tau']:g} |" in line and (
            f"{_pct(value['value'])} [{_pct(value['low'])}, {_pct(value['high'])}]" in line), (row["name"], line)
