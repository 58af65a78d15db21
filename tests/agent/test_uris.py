"""Tests for agent/uris.py: what a model URI means, and that nothing a user or a listing writes escapes the root."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import InvalidUriError
from agent.uris import (
    MAX_URIS_PER_ANNOTATION,
    label_key_for,
    parse_annotation,
    parse_model_uri,
    validate_relative_key,
)


def test_trailing_slash_names_a_prefix_model() -> None:
    m = parse_model_uri("s3://models/llama-3-8b/")
    assert (m.bucket, m.key, m.is_prefix) == ("models", "llama-3-8b", True)
    assert m.list_prefix == "llama-3-8b/"
    assert m.mirrored_relpath == "models/s3/models/llama-3-8b"
    assert m.uri == "s3://models/llama-3-8b/"


def test_no_trailing_slash_names_a_single_object() -> None:
    m = parse_model_uri("s3://models/tokenizers/t.json")
    assert (m.bucket, m.key, m.is_prefix) == ("models", "tokenizers/t.json", False)
    assert m.mirrored_relpath == "models/s3/models/tokenizers/t.json"
    assert str(m) == "s3://models/tokenizers/t.json"


def test_bucket_with_only_a_slash_names_the_whole_bucket() -> None:
    m = parse_model_uri("s3://models/")
    assert (m.key, m.is_prefix, m.list_prefix, m.mirrored_relpath) == ("", True, "", "models/s3/models")


def test_unicode_and_spaces_in_keys_are_accepted() -> None:
    m = parse_model_uri("s3://bkt/mödels/my model/")
    assert m.key == "mödels/my model"


def test_model_id_is_stable_and_differs_between_prefix_and_object() -> None:
    a, b = parse_model_uri("s3://bkt/m/"), parse_model_uri("s3://bkt/m")
    assert a.model_id == parse_model_uri("s3://bkt/m/").model_id
    assert a.model_id != b.model_id
    assert re.fullmatch(r"[0-9a-f]{16}", a.model_id)


def test_label_key_is_the_documented_prefix_and_16_hex() -> None:
    key = label_key_for("s3://bkt/m/")
    prefix, name = key.split("/")
    assert prefix == "models.weightcache.io"
    assert re.fullmatch(r"[0-9a-f]{16}", name)
    assert label_key_for("s3://bkt/m/") == key != label_key_for("s3://bkt/m2/")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gs://bkt/m/", "unsupported scheme 'gs://'"),
        ("http://bkt/m/", "unsupported scheme 'http://'"),
        ("bkt/m/", "unsupported scheme '(none)'"),
        ("s3://bkt", "no '/' after the bucket"),
        ("s3://BKT/m/", "invalid bucket name 'BKT'"),
        ("s3://b/m/", "invalid bucket name 'b'"),
        ("s3://a..b/m/", "invalid bucket name 'a..b'"),
        ("s3://bkt/m/../x", "has a '..' path segment"),
        ("s3://bkt/../x/", "has a '..' path segment"),
        ("s3://bkt/m/..", "has a '..' path segment"),
        ("s3://bkt/m/./x", "has a '.' path segment"),
        ("s3://bkt/a//b", "has an empty path segment"),
        ("s3://bkt/m//", "has an empty path segment"),
        ("s3://bkt//etc/passwd", "must not be absolute"),
        ("s3://bkt/m/a\x00b", "contains a NUL byte"),
        ("s3://bkt/m/a\nb", "contains a control character"),
        ("s3://bkt/m/a\x7fb", "contains a control character"),
        ("s3://bkt/m/\udcff", "is not valid UTF-8"),
        ("s3://bkt/" + "x" * 256, "path segment longer than 255 bytes"),
        ("s3://bkt/" + "/".join(["y" * 200] * 6), "longer than 1024 bytes"),
    ],
)
def test_malformed_or_escaping_uris_are_rejected_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(InvalidUriError) as info:
        parse_model_uri(text)
    assert message in str(info.value)
    assert info.value.reason == "InvalidURI"


def test_invalid_uri_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_model_uri("s3://bkt/../x")


def test_a_non_string_uri_is_rejected() -> None:
    with pytest.raises(InvalidUriError, match="must be a string"):
        parse_model_uri(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("relpath", "message"),
    [
        ("../x", "'..' path segment"),
        ("a/../../x", "'..' path segment"),
        ("./x", "'.' path segment"),
        ("a//b", "empty path segment"),
        ("/etc/passwd", "must not be absolute"),
        ("", "empty name under its prefix"),
        ("a\x00b", "NUL byte"),
        ("a\x01b", "control character"),
    ],
)
def test_listed_keys_that_would_escape_the_model_are_rejected(relpath: str, message: str) -> None:
    with pytest.raises(InvalidUriError) as info:
        validate_relative_key(relpath, key="m/" + relpath)
    assert message in str(info.value)
    assert repr("m/" + relpath) in str(info.value)  # names the offending S3 key


def test_listed_keys_with_unicode_spaces_and_nesting_are_accepted() -> None:
    assert validate_relative_key("dir with space/ünï cødé.txt", key="m/dir with space/ünï cødé.txt") == \
        "dir with space/ünï cødé.txt"


def test_annotation_splits_on_commas_and_whitespace_and_drops_duplicates() -> None:
    parsed = parse_annotation(" s3://bkt/a/,s3://bkt/b.json\n\ts3://bkt/a/ ,, s3://bkt/c/ ")
    assert [u.uri for u in parsed.uris] == ["s3://bkt/a/", "s3://bkt/b.json", "s3://bkt/c/"]
    assert parsed.errors == ()


def test_annotation_keeps_good_entries_and_reports_each_bad_one() -> None:
    parsed = parse_annotation("s3://bkt/a/, gs://x/y, s3://bkt/../z")
    assert [u.uri for u in parsed.uris] == ["s3://bkt/a/"]
    assert len(parsed.errors) == 2
    assert "gs://" in parsed.errors[0] and "'..'" in parsed.errors[1]


def test_annotation_reads_at_most_the_documented_number_of_uris() -> None:
    parsed = parse_annotation(" ".join(f"s3://bkt/m{i}/" for i in range(MAX_URIS_PER_ANNOTATION + 5)))
    assert len(parsed.uris) == MAX_URIS_PER_ANNOTATION
    assert "at most" in parsed.errors[0]


def test_an_empty_annotation_names_no_models() -> None:
    assert parse_annotation("  , ") == parse_annotation("")
    assert parse_annotation("").uris == ()


_KEY_ALPHABET = st.sampled_from(["a", "b", ".", "/", "..", " ", "ü", "\x00", "\\", "%2e", "~", "-"])


@settings(max_examples=300, deadline=None)
@given(key=st.lists(_KEY_ALPHABET, max_size=12).map("".join), slash=st.booleans())
def test_every_accepted_uri_mirrors_to_a_path_inside_the_bucket_directory(key: str, slash: bool) -> None:
    text = f"s3://bkt/{key}" + ("/" if slash and not key.endswith("/") else "")
    try:
        m = parse_model_uri(text)
    except InvalidUriError:
        return
    root = "/cache"
    mirrored = os.path.normpath(os.path.join(root, m.mirrored_relpath))
    assert mirrored == os.path.join(root, m.mirrored_relpath).rstrip("/")  # nothing for normpath to resolve
    assert mirrored == "/cache/models/s3/bkt" or mirrored.startswith("/cache/models/s3/bkt/")
    assert "\x00" not in mirrored
