"""herder's JSON on the wire: fast where that is safe, the standard library's answer
wherever the two libraries would disagree."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from herder.db import NotStorable, Undecodable, decode_json, encode_json, storable_text

SAME_EITHER_WAY: list[Any] = [
    {"i": 1},
    [1.5, "x", None, True, {"nested": [1, 2, {"é": "ü"}]}],
    {"1": 2},
    "a backslash then u0000: \\u0000",
    2**63 - 1,
    -(2**63),
    0.1,
    1e308,
]


@pytest.mark.parametrize("value", SAME_EITHER_WAY)
def test_round_trip_matches_the_standard_library(value: Any) -> None:
    text = encode_json(value)
    assert json.loads(text) == value
    assert decode_json(text) == value


@pytest.mark.parametrize("value", [2**64 + 1, -(2**70), {"n": 123456789012345678901234567890}])
def test_integers_beyond_64_bits_keep_every_digit(value: Any) -> None:
    assert decode_json(encode_json(value)) == value


def test_numbers_beyond_a_double_are_read_as_the_standard_library_reads_them() -> None:
    assert decode_json(b"[1e400]") == [math.inf]


@pytest.mark.parametrize(
    "value", [float("nan"), {"x": float("inf")}, [-math.inf], {"at": object()}, {1, 2}]
)
def test_what_is_not_json_is_refused(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        encode_json(value)


def test_non_string_keys_become_strings_as_in_the_standard_library() -> None:
    assert json.loads(encode_json({1: "a", 2.5: "b", None: "c"})) == json.loads(
        json.dumps({1: "a", 2.5: "b", None: "c"})
    )


@pytest.mark.parametrize(
    "value", ["nul \x00 inside", {"k": ["\x00"]}, "lone \ud800", {"\udfff": 1}]
)
def test_what_jsonb_cannot_store_is_refused_with_the_reason(value: Any) -> None:
    with pytest.raises(NotStorable):
        encode_json(value)


def test_storable_text_replaces_what_postgresql_refuses_and_marks_a_cut() -> None:
    assert storable_text("a\x00b\ud800c", 100) == "a\ufffdb\ufffdc"
    cut = storable_text("x" * 50, 10)
    assert cut.startswith("x" * 10) and "truncated 40 characters" in cut


async def test_jsonb_python_cannot_hold_decodes_to_undecodable_not_an_error(conn: Any) -> None:
    deep = "[" * 5000 + "]" * 5000
    for text in ['{"tasks": 1e5000}', deep]:
        value = await conn.fetchval("SELECT $1::text::jsonb", text)
        assert isinstance(value, Undecodable), text[:20]
        assert value.error
