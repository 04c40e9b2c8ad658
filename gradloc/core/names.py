"""Names that become paths, and short excerpts of untrusted values for error messages.

Every name gradloc turns into one component of a path it writes or reads (a run name, an image id, a class
name in an export or an overlay, a split) goes through :func:`check_name` at the point where it becomes a path.
So a crafted ``gt.pkl`` with a class named ``x/../../ESCAPED``, an image set listing ``../../etc/passwd`` or
a run named ``.vr.ready`` (a staging name of :mod:`gradloc.core.folders`) is refused with one line, whatever
stage it reaches.

Error messages quote untrusted values through :func:`excerpt`, which never prints more than a short,
bounded repr, however large or deeply shared the value is (a YAML alias bomb expands to hundreds of MB).
"""

from __future__ import annotations

import reprlib
import unicodedata

MAX_NAME_BYTES = 128
"""Longest name (UTF-8 bytes). File systems allow 255 bytes per component; gradloc adds prefixes and suffixes
(``.<name>.ready``, ``.<name>.<pid>.<random>.tmp``, ``comp4_det_<split>_<class>.txt``) that must still fit."""

# Unicode categories of characters that are invisible or break a line: control, format (BOM, zero-width
# space), line and paragraph separators.
_INVISIBLE = {"Cc", "Cf", "Zl", "Zp"}

_EXCERPT = reprlib.Repr()
_EXCERPT.maxstring = _EXCERPT.maxother = 60
_EXCERPT.maxlist = _EXCERPT.maxtuple = _EXCERPT.maxdict = _EXCERPT.maxset = _EXCERPT.maxfrozenset = 6
_EXCERPT.maxlevel = 3

EXCERPT_CHARS = 80
"""Longest excerpt of a value in an error message."""


def excerpt(value: object) -> str:
    """A repr of ``value`` of at most :data:`EXCERPT_CHARS` characters, computed in bounded time (long strings
    and containers are cut with ``...``; nesting is cut after 3 levels)."""
    text = _EXCERPT.repr(value)
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be one path component gradloc makes, or None when it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is a relative path, not a name"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if name.startswith("."):
        return "starts with '.' (reserved for gradloc's staging and temporary files)"
    invisible = next((c for c in name if c == "\0" or unicodedata.category(c) in _INVISIBLE), None)
    if invisible is not None:
        return f"holds the invisible or control character U+{ord(invisible):04X}"
    if name != name.strip():
        return "starts or ends with whitespace"
    size = len(name.encode("utf-8", errors="replace"))
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long, at most {MAX_NAME_BYTES} are allowed"
    return None


def check_name(name: object, what: str) -> str:
    """``name`` when it can be one component of a path (see :func:`name_problem`).

    Args:
        name: the untrusted name.
        what: what it is and where it came from, e.g. ``"--name"`` or ``"class name in results/r/gt.pkl"``.

    Raises:
        ValueError: ``"<what> <excerpt>: <problem>"``.
    """
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(f"{what} {excerpt(name)} {problem}; it cannot be used as a file or folder name")
    return name  # type: ignore[return-value]
