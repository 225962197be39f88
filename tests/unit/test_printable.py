"""Text from a manifest or from fal reaches the operator's terminal inert (jobs.printable)."""

from __future__ import annotations

import logging

import pytest

from cli.output import escape
from jobs.printable import printable
from worker.logs import formatter_for

HOSTILE = "done\x1b]0;pwned\x07\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2J\x9b31m\u202eevil\x00\x7f"


def test_controls_become_visible_escapes() -> None:
    assert printable(HOSTILE) == (
        "done\\x1b]0;pwned\\x07\\x1b]52;c;ZWNobyBwd25lZA==\\x07\\x1b[2J\\x9b31m\\u202eevil\\x00\\x7f"
    )


@pytest.mark.parametrize(
    "text", ["東京の夜景 night 🌃", "line one\nline two\tcolumn", "plain [brackets]", ""]
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert printable(text) == text


def test_the_cli_escape_is_inert_for_rich_and_for_the_terminal() -> None:
    shown = escape("[bold]x\x1b[31m")
    assert "\x1b" not in shown
    assert shown == "\\[bold]x\\x1b\\[31m"


def test_text_log_lines_are_inert_json_ones_escaped_by_json() -> None:
    record = logging.LogRecord("wanbatch", logging.WARNING, __file__, 1, "fal said: %s", (HOSTILE,), None)
    text_line = formatter_for("text").format(record)
    json_line = formatter_for("json").format(record)
    for line in (text_line, json_line):
        assert not any(ch in line for ch in "\x1b\x07\x9b\u202e\x00")
    assert "\\x1b]0;pwned" in text_line
