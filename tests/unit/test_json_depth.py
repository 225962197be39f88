"""How deep an answer of fal's may nest (:func:`worker.fal.errors.load_json`), and that a
shallow one — every status event and answer — is not walked in Python to find out (issue #11)."""

from __future__ import annotations

import json

import pytest

from worker.fal import errors
from worker.fal.errors import MAX_JSON_DEPTH, ProviderProtocolError, load_json


def _nested(levels: int) -> str:
    return '{"a":' * (levels - 1) + "[1]" + "}" * (levels - 1)


@pytest.mark.parametrize("encode", [str, lambda t: t.encode(), lambda t: t.encode("utf-16")])
def test_the_depth_limit_holds_for_text_and_bytes(encode) -> None:  # type: ignore[no-untyped-def]
    assert load_json(encode(_nested(MAX_JSON_DEPTH)), "answer") is not None
    with pytest.raises(ProviderProtocolError, match="nested more than"):
        load_json(encode(_nested(MAX_JSON_DEPTH + 1)), "answer")


def test_brackets_inside_strings_do_not_make_an_answer_deep() -> None:
    text = json.dumps({"logs": ["[{" * 200], "status": "IN_PROGRESS"})
    assert load_json(text, "status")["status"] == "IN_PROGRESS"


def test_a_shallow_answer_is_not_walked(monkeypatch: pytest.MonkeyPatch) -> None:
    # The count of brackets (in C) says it cannot nest too deep: no Python walk of the value.
    def walked(value: object, limit: int) -> bool:
        raise AssertionError("a shallow answer was walked")

    monkeypatch.setattr(errors, "_deeper_than", walked)
    answer = {"status": "COMPLETED", "logs": [{"message": "x", "level": "INFO"}] * 20, "metrics": {}}
    assert load_json(json.dumps(answer).encode(), "status") == answer
