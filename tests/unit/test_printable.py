"""Text from a manifest or from fal reaches the operator's terminal inert (jobs.printable)."""

from __future__ import annotations

import logging

import pytest

from cli.output import escape
from jobs.printable import printable, shell_ref
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
    assert shown == "\\[bold]x\\x1b[31m"  # "[31m" is no rich tag: printed as written


def test_text_log_lines_are_inert_json_ones_escaped_by_json() -> None:
    record = logging.LogRecord("wanbatch", logging.WARNING, __file__, 1, "fal said: %s", (HOSTILE,), None)
    text_line = formatter_for("text").format(record)
    json_line = formatter_for("json").format(record)
    for line in (text_line, json_line):
        assert not any(ch in line for ch in "\x1b\x07\x9b\u202e\x00")
    assert "\\x1b]0;pwned" in text_line


@pytest.mark.parametrize("text", ["x[/]", "\\[bold]y", "q :x: [b]z[/b]", "a\\", "a\\\\", "\\\\\\", ""])
@pytest.mark.parametrize("markup", ["{}", "[bold]{}[/bold]", "{}[red]r[/red]"])
def test_user_text_in_markup_prints_exactly_as_written(text: str, markup: str) -> None:
    """Audit A1/C1: ``[/]`` raised MarkupError, ``:x:`` became an emoji, and trailing backslashes
    escaped the tag that followed them."""
    from rich.console import Console

    from cli.output import err, escape, out

    assert not out._emoji  # the consoles every command prints with
    assert not err._emoji
    console = Console(emoji=False, highlight=False)
    with console.capture() as captured:
        console.print(markup.format(escape(text)), end="")
    assert captured.get() == markup.replace("[bold]", "").replace("[/bold]", "").replace(
        "[red]r[/red]", "r"
    ).format(text)


def test_one_line_escapes_line_breaks_and_tabs_too() -> None:
    from jobs.printable import control_character, one_line

    assert one_line("a\nb\tc\x1b[2J\u202e") == "a\\nb\\tc\\x1b[2J\\u202e"
    assert one_line("plain é 日本") == "plain é 日本"
    assert control_character("tokyo sweep") is None
    assert control_character("tokyo\tsweep\n") == "\\t"
    assert control_character("a\u2028b") == "\\u2028"


BATCH_ID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    "name", ["night", "seed-sweep_2.v1", "a@b+c", "rows.jsonlx", "cafe1", "deadbeefx", "2026-12-04"]
)
def test_a_hint_names_a_batch_by_a_name_that_is_one_plain_word(name: str) -> None:
    assert shell_ref(name, BATCH_ID) == name


@pytest.mark.parametrize(
    "name",
    [
        *(
            "-h",
            "--json",
            ".",
            "..",
            "a/b",
            "x.YAML",
            "x.yml",
            "x.json",
            "x.csv",
            "my batch",
            "$HOME",
            "b" * 300,
        ),
        # What a command may read as another batch's id prefix (refused as ambiguous):
        *("73116756", "8e70d40c", "ABCDEF", "0123456789abcdef0123456789abcdef"),
    ],
)
def test_a_hint_names_a_batch_by_its_id_when_the_name_would_be_read_otherwise(name: str) -> None:
    """An option, a path, a manifest or items file, shell syntax, longer than a file name, or an id
    prefix of 6 to 32 hexadecimal characters."""
    assert shell_ref(name, BATCH_ID) == BATCH_ID[:12]
