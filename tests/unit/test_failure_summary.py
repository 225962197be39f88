"""The line ``status`` shows for a failure group whose jobs' errors differ
(:func:`jobs.failure_summary.failure_summary`)."""

from __future__ import annotations

from jobs.failure_summary import REPEAT_NOT_SENT, failure_summary, next_step
from jobs.store import REPEAT_NOT_SENT_ERROR

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


EXPIRED = "HTTP 404: Result of request {} has expired"
IDS = [f"{n:08x}-b6e6-4c1e-9f0a-{n:012x}" for n in (0x0051B6E6, 0x457F71DB, 1, 2, 3, 4, 5, 6)]


def test_errors_told_apart_only_by_their_request_id_are_one_cause() -> None:
    """Audit: "8 failed (result_expired): HTTP 404: Result of request 0051b6e6-… has expired;
    also: HTTP 404: Result of request 457f71db-… has expired (and 6 other errors)"."""
    errors = [(EXPIRED.format(i), 1) for i in IDS]
    assert failure_summary(errors[0][0], errors, 8) == (
        "HTTP 404: Result of request … has expired (8 requests)"
    )


def test_a_request_cause_beside_others_counts_its_requests() -> None:
    errors = [(EXPIRED.format(IDS[0]), 2), ("HTTP 422: prompt too long", 2), (EXPIRED.format(IDS[1]), 1)]
    assert failure_summary(errors[0][0], errors, 3) == (
        "HTTP 404: Result of request … has expired (3 requests); also: HTTP 422: prompt too long"
    )
    # third cause hidden: counted by the errors it stands for
    more = [("HTTP 422: a", 3), ("HTTP 422: b", 2), *[(EXPIRED.format(i), 1) for i in IDS[:3]]]
    assert failure_summary("x", more, 5) == "HTTP 422: a; also: HTTP 422: b (and 3 other errors)"


def test_one_request_keeps_its_id() -> None:
    errors = [(EXPIRED.format(IDS[0]), 1), ("HTTP 422: prompt too long", 1)]
    assert failure_summary(errors[0][0], errors, 2) == (
        f"{EXPIRED.format(IDS[0])}; also: HTTP 422: prompt too long"
    )


def test_the_next_step_of_an_expired_result_and_a_missing_input() -> None:
    expired = next_step("result_expired", sent=True, ref="b1", simulated=False, rerun=False)
    assert expired is not None
    assert "`wanbatch rerun b1 --failed-only` renders them again, paid again" in expired
    missing = next_step("input_file", sent=False, ref="b1", simulated=True, rerun=True)
    assert missing == (
        "never sent, nothing paid: `wanbatch rerun b1 --failed-only --simulate` sends them again"
    )
    assert next_step("http_422", sent=True, ref="b1", simulated=False, rerun=False) is None


def test_the_next_step_of_a_rerun_s_job_ended_unsent_for_its_original_s_proved_request() -> None:
    """A rerun's job ended unsent because the job it repeats kept fal's request after all: the
    group says where that video comes from (and that nothing was paid for this one)."""
    assert REPEAT_NOT_SENT == REPEAT_NOT_SENT_ERROR
    step = next_step(REPEAT_NOT_SENT_ERROR, sent=False, ref="b1-rerun-1", simulated=False, rerun=True)
    assert step is not None
    assert step.startswith(
        "never sent, nothing paid: the job each repeats gets its video from its own request"
    )
    again = next_step(REPEAT_NOT_SENT_ERROR, sent=True, ref="b1-rerun-1", simulated=False, rerun=True)
    assert again is not None
    assert again.startswith("not sent again (an earlier attempt was): the job each repeats gets its video")
