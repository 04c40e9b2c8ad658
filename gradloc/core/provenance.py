"""Provenance: git commit, package versions, content hashes of configs and files."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from gradloc import __version__
from gradloc.core.files import to_plain


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the source tree holding gradloc, or None (not a checkout, no git)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and len(commit) == 40 else None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "gradloc": __version__}
    for name in ("torch", "torchvision", "numpy", "scikit-image", "pandas", "numba"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def config_hash(data: Mapping[str, Any], length: int = 12) -> str:
    """Short sha256 of the canonical JSON of ``data`` (sorted keys): the name of a cache entry."""
    text = json.dumps(to_plain(dict(data)), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file (remembered per path, size and modification time)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def provenance(config: Mapping[str, Any]) -> dict[str, Any]:
    """Where a number came from: git commit, config hash, the sha256 of the config's checkpoint (when it names
    one that exists), package versions and seed -- one flat record for a results row."""
    checkpoint = (config.get("model") or {}).get("checkpoint")
    path = Path(checkpoint) if checkpoint else None
    return {"git_commit": git_commit(), "config_hash": config_hash(config),
            "checkpoint_sha256": file_sha256(path) if path is not None and path.is_file() else None,
            "seed": config.get("seed"), **{f"version_{k}": v for k, v in package_versions().items()}}

