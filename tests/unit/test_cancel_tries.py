"""A request's cancel is tried a bounded number of times, a transient failure after a backoff,
then given up (:mod:`worker.steps.cancel_tries`): ``wanbatch cancel`` ends instead of asking
fal for ever (``tests/e2e/test_cancel_redirected.py`` is the whole story)."""

from __future__ import annotations

from worker.steps.cancel_tries import CANCEL_ATTEMPTS, GIVEN_UP_RETRY_SECONDS, CancelTries, GivenUp


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failing_cancel_is_given_up_after_its_attempts() -> None:
    tries = CancelTries(Clock())
    for _ in range(CANCEL_ATTEMPTS - 1):
        assert tries.due("j1", "r1")
        assert tries.failed("j1", "r1", "HTTP 307 redirect") is None
    assert tries.due("j1", "r1")
    last = tries.failed("j1", "r1", "HTTP 302 redirect")
    assert last == GivenUp("j1", "r1", "HTTP 302 redirect", CANCEL_ATTEMPTS)
    assert not tries.due("j1", "r1")
    assert tries.given_up() == [GivenUp("j1", "r1", "HTTP 302 redirect", CANCEL_ATTEMPTS)]


def test_a_transient_failure_waits_its_backoff_and_is_bounded_too() -> None:
    clock = Clock()
    tries = CancelTries(clock)
    waits: list[int] = []

    def wait(count: int) -> float:
        waits.append(count)
        return 5.0 * 2.0 ** (count - 1)

    elapsed = 0.0
    for count in range(1, CANCEL_ATTEMPTS):
        assert tries.failed("j1", "r1", "HTTP 503", wait=wait) is None
        assert not tries.due("j1", "r1")
        clock.now += 5.0 * 2 ** (count - 1)
        elapsed += 5.0 * 2 ** (count - 1)
        assert tries.due("j1", "r1")
    assert tries.failed("j1", "r1", "HTTP 503", wait=wait) is not None
    assert waits == list(range(1, CANCEL_ATTEMPTS))
    assert elapsed == 75.0  # with the default WANBATCH_RETRY_BASE_DELAY: a bounded time


def test_a_cancel_fal_takes_or_another_request_starts_over() -> None:
    tries = CancelTries(Clock())
    for _ in range(CANCEL_ATTEMPTS):
        tries.failed("j1", "r1", "x")
    assert not tries.due("j1", "r1")
    assert tries.due("j1", "r2")  # the job's new request: its own tries
    assert tries.failed("j1", "r2", "x") is None
    tries.done("j1")
    assert tries.given_up() == []
    assert tries.due("j1", "r1")


def test_a_given_up_cancel_is_tried_again_by_a_process_that_lives_on() -> None:
    """A worker outlives a fal outage longer than the tries: it asks again every
    GIVEN_UP_RETRY_SECONDS, never for ever silent (the request would run and be billed)."""
    clock = Clock()
    tries = CancelTries(clock)
    for _ in range(CANCEL_ATTEMPTS):
        tries.failed("j1", "r1", "HTTP 503")
    assert not tries.due("j1", "r1")
    clock.now += GIVEN_UP_RETRY_SECONDS
    assert tries.due("j1", "r1")
    assert tries.failed("j1", "r1", "HTTP 503") is None  # logged once already: not given up anew
    assert not tries.due("j1", "r1")
    assert [g.request_id for g in tries.given_up()] == ["r1"]  # a run still names it
    clock.now += GIVEN_UP_RETRY_SECONDS
    assert tries.due("j1", "r1")
    tries.done("j1")
    assert tries.given_up() == []


def test_the_given_up_line_says_who_follows_the_job_once_cancel_ends() -> None:
    """Embedded, nothing follows the job once `cancel` ends; with workers, they go on (and ask
    fal again every GIVEN_UP_RETRY_SECONDS): the line says which (review)."""
    from cli.batch_commands import uncancelled_lines

    given_up = [GivenUp("j1", "r1", "HTTP 302 redirect", CANCEL_ATTEMPTS)]
    (alone,) = uncancelled_lines(given_up, "`wanbatch cancel b`")
    assert "nothing follows the job once this command ends; `wanbatch cancel b` tries again" in alone
    (workers,) = uncancelled_lines(given_up, "`wanbatch cancel b`", workers=True)
    assert "the workers go on following the job" in workers
    assert f"every {GIVEN_UP_RETRY_SECONDS / 60:g} minutes" in workers
    assert "nothing follows" not in workers
