"""gradloc.core.names: the one check of names that become paths, and bounded excerpts of untrusted values."""

import time

import pytest

from gradloc.core.names import EXCERPT_CHARS, MAX_NAME_BYTES, check_name, excerpt, name_problem


@pytest.mark.parametrize("name", ["run", "000005", "voc07 gradcam", "diningtable", "a.b", "ü" * 64, "-x"])
def test_usable_names_pass_unchanged(name):
    assert check_name(name, "name") == name


@pytest.mark.parametrize(("name", "problem"), [
    ("", "is empty"),
    (".", "is a relative path"),
    ("..", "is a relative path"),
    (".vr.ready", "starts with '.'"),
    ("x/../../ESCAPED", "holds a path separator"),
    ("a\\b", "holds a path separator"),
    ("\ufeff000005", "invisible or control character U+FEFF"),
    ("0000\u200b26", "U+200B"),
    ("a\nb", "U+000A"),
    ("a\0b", "U+0000"),
    (" run", "starts or ends with whitespace"),
    ("n" * (MAX_NAME_BYTES + 1), f"is {MAX_NAME_BYTES + 1} bytes long"),
    ("ü" * 65, "is 130 bytes long"),
    (5, "is a int, not a string"),
    (None, "is a NoneType"),
])
def test_unusable_names_are_refused_with_the_reason(name, problem):
    assert problem in name_problem(name)
    with pytest.raises(ValueError, match=r"^--name .* cannot be used as a file or folder name$") as error:
        check_name(name, "--name")
    assert problem in str(error.value)
    assert len(str(error.value)) < 300


def test_excerpt_is_short_and_fast_for_huge_and_shared_values():
    shared = ["lol"] * 9
    for _ in range(8):  # 9**9 strings when expanded, as a YAML alias bomb
        shared = [shared] * 9
    start = time.perf_counter()
    for value in (shared, "x" * 10**7, {i: i for i in range(10**5)}, b"\0" * 10**6):
        text = excerpt(value)
        assert len(text) <= EXCERPT_CHARS
    assert time.perf_counter() - start < 1
    assert excerpt("car") == "'car'"
