"""The line ``status`` shows for a failure group whose jobs' errors differ
(:func:`jobs.failure_summary.failure_summary`)."""

from __future__ import annotations

from jobs.failure_summary import failure_summary

CHANGED = "changed since the manifest was validated (its bytes differ); not sent"


def _changed(*names: str) -> list[tuple[str, int]]:
    return [(f"media file '{name}' {CHANGED}", 1) for name in names]


def test_one_error_is_the_example() -> None:
    assert failure_summary("HTTP 422: bad prompt", [], 1) == "HTTP 422: bad prompt"


def test_the_files_of_one_cause_are_named_once() -> None:
    errors = _changed("images/p1.png", "images/p2.png")
    assert failure_summary(errors[0][0], errors, 2) == (
        f"media files 'images/p1.png' and 'images/p2.png' {CHANGED}"
    )


def test_the_first_few_files_and_how_many_more() -> None:
    errors = _changed(*(f"images/p{i}.png" for i in range(1, 6)))
    assert failure_summary(errors[0][0], errors, 5) == (
        f"media files 'images/p1.png', 'images/p2.png', 'images/p3.png' and 2 more {CHANGED}"
    )


def test_the_verb_agrees_and_other_causes_are_counted() -> None:
    errors = [
        ("media file 'a.png' does not exist", 5),
        ("media file 'b.png' does not exist", 4),
        ("media file 'c.png' is not a regular file", 2),
        ("media file 'd.png' cannot be read: permission denied", 1),
    ]
    assert failure_summary(errors[0][0], errors, 6) == (
        "media files 'a.png' and 'b.png' do not exist; also: media file 'c.png' is not a regular file "
        "(and 3 other errors)"  # d.png, and the two errors not read
    )


def test_other_errors_are_counted_after_the_commonest() -> None:
    errors = [("HTTP 422: prompt too long", 3), ("HTTP 422: image too small", 1)]
    assert failure_summary("HTTP 422: image too small", errors, 2) == (
        "HTTP 422: prompt too long; also: HTTP 422: image too small"
    )
    assert failure_summary("x", errors[:1], 2) == "HTTP 422: prompt too long (and 1 other error)"
