"""A manifest's batch name (or fal's words) cannot drive the operator's terminal: every human
output shows control characters as escapes (``jobs.printable``)."""

from __future__ import annotations

from tests.e2e.e2e_helpers import MakeManifest, Wb

NAME = "night\x1b]0;pwned\x07\x1b[2J\u202erun\nsecond line\tend"
RAW = ("\x1b", "\x07", "\u202e")


def test_a_hostile_batch_name_is_refused(wb: Wb, manifest: MakeManifest) -> None:
    """A manifest may not name its batch with control characters, line breaks or tabs."""
    path = manifest(
        "hostile-name",
        f'name: "{NAME.encode("unicode_escape").decode()}"\nendpoint: fal-ai/wan-22\n'
        "items:\n  - prompt: a harbour at night\n",
    )
    for done in (wb("validate", path), wb("run", "--simulate", path, "--no-progress")):
        assert done.code == 2
        assert "the batch name contains a control character (\\x1b)" in done.stderr
        assert "hostile-name.yaml:1" in done.stderr
        for raw in RAW:
            assert raw not in done.stdout + done.stderr
    assert wb("status", "--json").json()["batches"] == []


def test_a_hostile_stored_batch_name_is_shown_inert_on_one_line(wb: Wb, manifest: MakeManifest) -> None:
    """A name stored before such names were refused: shown as escapes, each row on its line."""
    from sqlalchemy import update

    from jobs import db
    from jobs.models import Batch
    from jobs.settings import get_settings

    path = manifest("night", "name: night\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: a harbour at night\n")
    assert wb("run", "--simulate", path, "--no-progress").code == 0
    batch = wb("status", "--json").json()["batches"][0]["batch"]
    with db.session_scope(db.open_engine(get_settings())) as session:
        session.execute(update(Batch).where(Batch.id == batch).values(name=NAME))
    outputs = [wb("status"), wb("status", batch), wb("cost", batch)]
    for done in outputs:
        assert done.code == 0, done.stderr
        for raw in RAW:
            assert raw not in done.stdout + done.stderr
        assert not any(line.startswith("second line") for line in done.stdout.splitlines())
    assert "night\\x1b]0;pwned\\x07" in outputs[1].stdout
    assert "run\\nsecond lin" in outputs[1].stdout  # then cut to the terminal's width
    [row] = [line for line in outputs[0].stdout.splitlines() if line.startswith(batch[:8])][:1]
    assert "line\\tend  done" in row  # the list's row: the name (cut in the middle), then the rest
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
    assert MARKUP_NAME in submitted.stderr  # the sentence; stdout holds the id alone
    batch = wb("status", "--json").json()["batches"][0]["batch"]
    assert submitted.stdout == f"{batch}\n"
    shown = wb("status", batch)
    assert shown.code == 0, shown.stderr
    assert MARKUP_NAME in shown.stdout
    assert "❌" not in submitted.stderr + shown.stdout + shown.stderr

    missing = manifest(
        "markup-path",
        "name: m\nendpoint: fal-ai/wan-i2v\nitems:\n  - prompt: p\n    image_url: images/[/]x:x:.png\n",
    )
    refused = wb("validate", missing)
    assert refused.code == 2
    assert "images/[/]x:x:.png" in refused.stderr
    assert "❌" not in refused.stderr
