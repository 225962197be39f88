"""``/metrics`` counters and histograms never go down (Prometheus would read a reset), and a
finished batch is ``done``, not ``active`` (SQLite and PostgreSQL).

Driven through the store's own transitions, scraped after each: a window's end that requeues a
request fal had not started, a claim given back unsent, a retry after fal completed a request.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from jobs import db, store
from jobs.metrics import FinishedTotals, Snapshot, snapshot
from jobs.models import utcnow
from jobs.states import JobState as S
from tests.step_runtime import add_batch

T0 = datetime(2026, 5, 1, tzinfo=UTC)


def _claim(session: Session, job_id: str, attempt: int) -> store.Fence:
    fence = store.Fence.of(store.get_job(session, job_id), "test")
    assert store.mark_submitting(session, fence, attempt=attempt, api_key_id="k", lease_expires_at=utcnow())
    return fence.moved(S.SUBMITTING)


def _submitted(session: Session, fence: store.Fence, attempt: int, at: datetime) -> store.Fence:
    assert store.mark_submitted(
        session,
        fence,
        running=False,
        request_id=f"request-{attempt}",
        gateway_request_id=None,
        status_url=None,
        response_url=None,
        cancel_url=None,
        submitted_at=at,
        next_poll_at=utcnow(),
    )
    return fence.moved(S.QUEUED)


class _Scrapes:
    """Every scrape's numbers, both ways ``/metrics`` reads them (a pass over every job, and
    ``serve``'s kept sums): each counter and histogram bucket at least what it was."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.kept = FinishedTotals()
        self.last: dict[str, list[float]] = {}

    @staticmethod
    def _numbers(snap: Snapshot) -> list[float]:
        out: list[float] = [snap.attempts, snap.retries, snap.possible_duplicate_charges]
        for histogram in snap.durations.values():
            out += [n for _, n in histogram.cumulative()]
        return out

    def check(self, step: str) -> Snapshot:
        with db.read_scope(self.engine, snapshot=True) as session:
            full = snapshot(session)
        with db.read_scope(self.engine, snapshot=True) as session:
            kept = snapshot(session, self.kept)
        for way, snap in (("full", full), ("kept", kept)):
            numbers = self._numbers(snap)
            before = self.last.get(way, [0.0] * len(numbers))
            fell = [i for i, (a, b) in enumerate(zip(before, numbers, strict=True)) if b < a]
            assert not fell, f"{way} after {step}: {before} -> {numbers}"
            self.last[way] = numbers
        return full


def test_submits_never_go_down_across_a_window_end_and_a_claim_given_back(engine: Engine) -> None:
    batch_id = add_batch(engine, "monotonic-window", [("fal-ai/wan-22", {"prompt": "window"})])
    scrapes = _Scrapes(engine)
    with db.read_scope(engine) as session:
        (job_id,) = [job.id for job in store.jobs_of_batch(session, batch_id)]
    with db.session_scope(engine) as session:
        fence = _submitted(session, _claim(session, job_id, 1), 1, utcnow())
    assert scrapes.check("sent").attempts == 1
    with db.session_scope(engine) as session:  # the window closed on it in fal's queue
        assert store.requeue_after_cancel(
            session, fence, reason="window closed", billed=False, error="window closed", error_type=None
        )
    assert scrapes.check("window end").attempts == 1  # it was sent: still counted
    with db.session_scope(engine) as session:  # the next window claims it, but a limit holds it back
        fence = _claim(session, job_id, 2)
    assert scrapes.check("claimed").attempts == 1  # not sent yet
    with db.session_scope(engine) as session:
        assert store.give_back(session, fence, reason="held back")
    assert scrapes.check("given back").attempts == 1
    with db.session_scope(engine) as session:
        fence = _submitted(session, _claim(session, job_id, 2), 2, utcnow())
    snap = scrapes.check("sent again")
    assert (snap.attempts, snap.retries) == (2, 1)


def test_histograms_never_go_down_across_a_retry(engine: Engine) -> None:
    batch_id = add_batch(engine, "monotonic-retry", [("fal-ai/wan-22", {"prompt": "retry"})])
    scrapes = _Scrapes(engine)
    with db.read_scope(engine) as session:
        (job_id,) = [job.id for job in store.jobs_of_batch(session, batch_id)]
    now = utcnow()
    with db.session_scope(engine) as session:
        fence = _submitted(session, _claim(session, job_id, 1), 1, now - timedelta(seconds=60))
        assert store.mark_completed(
            session, fence, completed_at=now - timedelta(seconds=55), provider_metrics={"inference_time": 4}
        )
        fence = fence.moved(S.DOWNLOADING)
    scrapes.check("completed at fal")
    with db.session_scope(engine) as session:  # the model failed: sent again
        assert store.retry_later(session, fence, reason="model error", error="boom", error_type="model_error")
    scrapes.check("retry")
    with db.session_scope(engine) as session:
        fence = _submitted(session, _claim(session, job_id, 2), 2, now - timedelta(seconds=20))
    scrapes.check("sent again")
    with db.session_scope(engine) as session:
        assert store.mark_completed(
            session, fence, completed_at=now - timedelta(seconds=18), provider_metrics={"inference_time": 1}
        )
        fence = fence.moved(S.DOWNLOADING)
        assert store.mark_succeeded(
            session, fence, output_path="out.mp4", output_sha256="0" * 64, output_bytes=1
        )
    snap = scrapes.check("succeeded")
    fal, inference = snap.durations["fal"], snap.durations["inference"]
    assert (fal.count, inference.count, inference.total) == (1, 1, 1.0)  # its last attempt's
    assert abs(fal.total - 2.0) < 1e-3


def test_a_finished_batch_is_done_not_active(engine: Engine) -> None:
    done = add_batch(engine, "phase-done", [("fal-ai/wan-22", {"prompt": f"d{i}"}) for i in range(2)])
    add_batch(engine, "phase-active", [("fal-ai/wan-22", {"prompt": "a"})])
    paused = add_batch(engine, "phase-paused", [("fal-ai/wan-22", {"prompt": "p"})])
    cancelled = add_batch(engine, "phase-cancelled", [("fal-ai/wan-22", {"prompt": "c"})])
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET state = 'succeeded', finished_at = :t WHERE batch_id = :b"),
            {"t": T0, "b": done},
        )
        conn.execute(text("UPDATE batches SET paused_by_user = :y WHERE id = :b"), {"y": True, "b": paused})
        conn.execute(text("UPDATE batches SET state = 'cancelled' WHERE id = :b"), {"b": cancelled})
    with db.read_scope(engine, snapshot=True) as session:
        full = snapshot(session)
    with db.read_scope(engine, snapshot=True) as session:
        kept = snapshot(session, FinishedTotals())
    for snap in (full, kept):
        assert snap.batches == {"active": 1, "paused": 1, "done": 1, "cancelled": 1}


def _record_send(session: Session, fence: store.Fence) -> store.Fence:
    now = utcnow()
    sent = store.record_send(
        session,
        fence,
        now=now,
        lease_seconds=60,
        submitted_input={"prompt": "resend"},
        sent_at=now,
        api_key_id="k",
    )
    assert sent is not None
    return sent


def test_possible_duplicate_charges_never_go_down_when_a_resend_is_given_back(engine: Engine) -> None:
    """A resend of an unknown submit counts as a possible duplicate charge once its POST is
    recorded (``record_send``) and is uncounted if that POST is then given back (fal's 429): the
    stored count falls by one, which ``/metrics`` must not show (a counter reset)."""
    batch_id = add_batch(engine, "monotonic-resend", [("fal-ai/wan-22", {"prompt": "resend"})])
    scrapes = _Scrapes(engine)
    with db.read_scope(engine) as session:
        (job_id,) = [job.id for job in store.jobs_of_batch(session, batch_id)]
    with db.session_scope(engine) as session:  # the first POST's answer is lost: resent
        fence = _record_send(session, _claim(session, job_id, 1))
        assert store.mark_submit_unknown(session, fence, why="read timeout", due_at=utcnow())
        fence = fence.moved(S.SUBMIT_UNKNOWN)
        assert store.retry_later(session, fence, reason="resubmitting", possible_duplicate=True)
    scrapes.check("resend decided")
    with db.session_scope(engine) as session:
        fence = _record_send(session, _claim(session, job_id, 2))
    scrapes.check("resend recorded as sent")
    with db.session_scope(engine) as session:  # fal refused it (429): it never went out
        assert store.give_back(session, fence, reason="rate limited")
    assert scrapes.check("resend given back").possible_duplicate_charges == 0
    with db.session_scope(engine) as session:
        fence = _record_send(session, _claim(session, job_id, 2))
        _submitted(session, fence, 2, utcnow())
    snap = scrapes.check("resend sent")
    assert (snap.possible_duplicate_charges, snap.attempts, snap.retries) == (1, 2, 1)
