"""A manifest's batch name (or fal's words) cannot drive the operator's terminal: every human
output shows control characters as escapes (``jobs.printable``)."""

from __future__ import annotations

from tests.e2e.e2e_helpers import MakeManifest, Wb

NAME = "night\x1b]0;pwned\x07\x1b[2J\u202erun"
RAW = ("\x1b", "\x07", "\u202e")


def test_a_hostile_batch_name_is_shown_inert(wb: Wb, manifest: MakeManifest) -> None:
    path = manifest(
        "hostile-name",
        f'name: "{NAME.encode("unicode_escape").decode()}"\nendpoint: fal-ai/wan-22\n'
        "items:\n  - prompt: a harbour at night\n",
    )
    outputs = [wb("run", "--simulate", path, "--no-progress")]
    batch = wb("status", "--json").json()["batches"][0]["batch"]
    outputs += [wb("status"), wb("status", batch), wb("cost", batch), wb("validate", path)]
    for done in outputs:
        assert done.code == 0, done.stderr
        for raw in RAW:
            assert raw not in done.stdout + done.stderr
    assert "night\\x1b]0;pwned\\x07" in outputs[2].stdout
    assert wb("status", batch, "--json").json()["name"] == NAME  # the data itself is kept as written


MARKUP_NAME = r"[/] [bold]b[/bold] \[red]r :x: end\\"


def test_markup_and_emoji_codes_in_user_text_are_shown_as_written(wb: Wb, manifest: MakeManifest) -> None:
    """Audit A1/C1: ``[/]`` in a batch name crashed ``submit`` (MarkupError, exit 70) after the
    batch was stored; ``[bold]`` was drawn as markup and ``:x:`` became an emoji, in names and in
    error messages quoting a path."""
    quoted = MARKUP_NAME.replace("\\", "\\\\")
    path = manifest(
        "markup-name",
        f'name: "{quoted}"\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: "a [/] harbour :x:"\n',
    )
    submitted = wb("submit", path)
    assert submitted.code == 0, submitted.stderr
    assert MARKUP_NAME in submitted.stdout
    batch = wb("status", "--json").json()["batches"][0]["batch"]
    shown = wb("status", batch)
    assert shown.code == 0, shown.stderr
    assert MARKUP_NAME in shown.stdout
    assert "❌" not in submitted.stdout + shown.stdout + shown.stderr

    missing = manifest(
        "markup-path",
        "name: m\nendpoint: fal-ai/wan-i2v\nitems:\n  - prompt: p\n    image_url: images/[/]x:x:.png\n",
    )
    refused = wb("validate", missing)
    assert refused.code == 2
    assert "images/[/]x:x:.png" in refused.stderr
    assert "❌" not in refused.stderr
