"""JSON made storable on every database (:mod:`jobs.storable`): what ``jsonb`` refuses is replaced,
everything else is kept as it was."""

from __future__ import annotations

import json
import sys
from typing import Any

from jobs.storable import storable_json, storable_text


def test_nul_and_lone_surrogates_become_the_replacement_character_and_the_rest_stays() -> None:
    doc = json.loads(
        '{"a\\u0000": ["x\\u0000y", "\\ud800", "\\udfff!", "\\ud83d\\ude00", "é", 1, 2.5, true, null]}'
    )
    assert storable_json(doc) == {
        "a\ufffd": ["x\ufffdy", "\ufffd", "\ufffd!", "\U0001f600", "é", 1, 2.5, True, None]
    }
    assert doc["a\x00"][0] == "x\x00y"  # a copy: the delivery as verified is left alone
    assert storable_text("plain") == "plain"


def test_non_finite_numbers_become_null() -> None:
    assert storable_json(json.loads("[NaN, Infinity, -Infinity, 1e308]")) == [None, None, None, 1e308]
    assert storable_json(float("nan")) is None
    assert storable_json("\x00") == "\ufffd"


def test_a_document_nested_deeper_than_python_recurses_is_walked() -> None:
    depth = sys.getrecursionlimit() * 3
    doc: Any = "\x00"
    for _ in range(depth):
        doc = {"k": [doc]}
    walked = storable_json(doc)
    for _ in range(depth):
        walked = walked["k"][0]
    assert walked == "\ufffd"
