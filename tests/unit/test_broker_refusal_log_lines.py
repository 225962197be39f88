"""What a worker's log says of a Redis broker that refuses writes (out of memory, read-only).

The bugs (Redis-out-of-memory audit): with the broker's Redis full (``maxmemory`` reached under
``noeviction``),

* kombu's event loop logged ``ERROR kombu.asynchronous.hub: Error in timer:
  server:OutOfMemoryError`` with a 35-line traceback (its restore of unacknowledged messages, a
  ``SET … NX`` lock) about every 100 s, per worker, for as long as it lasted;
* Celery's worker, its acknowledgement's ``ZREM unacked_index`` refused, ended with ``CRITICAL
  celery.worker: Unrecoverable error: server:OutOfMemoryError`` and some 70 traceback lines.

Both are an outage: one WARNING line each, the timer's at most every 30 s. Anything else keeps
the library's line. The records are made as kombu and Celery make them (same logger, message,
arguments and ``exc_info``) and go through the filters the worker installs
(:func:`worker.logs.celery_logs_through_ours`).
"""

from __future__ import annotations

import logging
import sys

import pytest
import redis.exceptions

from worker.logs import celery_logs_through_ours

#: redis-py's (its type stubs lack it).
OutOfMemoryError: type[redis.exceptions.ResponseError] = redis.exceptions.OutOfMemoryError  # type: ignore[attr-defined]
OOM_TEXT = "command not allowed when used memory > 'maxmemory'."
READ_ONLY_TEXT = "You can't write against a read only replica."


def _raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback, as a library that caught it has it."""
    try:
        raise exc
    except BaseException as caught:
        return caught


def _log_as_library(logger: str, msg: str, exc: BaseException, level: int = logging.ERROR) -> None:
    exc = _raised(exc)
    try:
        raise exc
    except BaseException:
        logging.getLogger(logger).log(level, msg, exc, exc_info=sys.exc_info())


def _from(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


def test_a_timer_that_redis_refuses_is_one_warning_line_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    celery_logs_through_ours()
    caplog.set_level(logging.INFO)
    _log_as_library("kombu.asynchronous.hub", "Error in timer: %r", OutOfMemoryError(OOM_TEXT))
    (record,) = _from(caplog, "kombu.asynchronous.hub")
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert not record.exc_text
    text = record.getMessage()
    assert "a periodic broker call of kombu (timer) failed: the broker refuses writes (out of memory)" in text
    assert OOM_TEXT in text
    assert getattr(record, "event", None) == "worker.broker_timer_failed"
    assert "\n" not in caplog.text.strip()  # one line: no traceback under it


def test_the_transports_binding_refresh_that_redis_refuses_is_one_warning_line_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """kombu's Redis transport says it every second, with the traceback, while Redis is full."""
    celery_logs_through_ours()
    caplog.set_level(logging.INFO)
    refused = _raised(
        OutOfMemoryError(
            f"Command # 1 (EVALSHA ef7a… 2 _kombu.binding.wanbatch) of pipeline caused error: {OOM_TEXT}"
        )
    )
    try:
        raise refused
    except OutOfMemoryError:
        logging.getLogger("kombu.transport.redis").warning(
            "maybe_refresh_binding_expiry: Redis error, will retry", exc_info=True
        )
    (record,) = _from(caplog, "kombu.transport.redis")
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert (
        "(maybe_refresh_binding_expiry) failed: the broker refuses writes (out of memory)"
        in record.getMessage()
    )
    assert "Traceback" not in caplog.text


def test_a_timer_error_that_is_no_broker_error_keeps_kombus_line(caplog: pytest.LogCaptureFixture) -> None:
    celery_logs_through_ours()
    caplog.set_level(logging.INFO)
    _log_as_library("kombu.asynchronous.hub", "Error in timer: %r", ValueError("a bug"))
    (record,) = _from(caplog, "kombu.asynchronous.hub")
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert record.getMessage() == "Error in timer: ValueError('a bug')"


def test_the_timer_line_is_said_at_most_every_30_seconds_and_counts_what_it_held_back() -> None:
    from worker.logs import BrokerTimerErrors

    now = [100.0]
    timer_filter = BrokerTimerErrors(every=30.0, clock=lambda: now[0])
    said: list[tuple[float, str]] = []

    def one(exc: BaseException) -> None:
        exc = _raised(exc)
        record = logging.LogRecord(
            "kombu.asynchronous.hub", logging.ERROR, __file__, 0, "Error in timer: %r", (exc,), None
        )
        record.exc_info = (type(exc), exc, exc.__traceback__)
        if timer_filter.filter(record):
            assert record.levelno == logging.WARNING
            assert vars(record)["exc_info"] is None  # the traceback is gone
            said.append((now[0], record.getMessage()))

    for second in range(0, 95, 5):  # kombu's timers fail every few seconds, every worker's too
        now[0] = 100.0 + second
        one(OutOfMemoryError(OOM_TEXT))
    now[0] = 192.0
    one(OutOfMemoryError(OOM_TEXT))  # the same error again within 30 s: held back
    now[0] = 200.0
    one(redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."))
    assert [at for at, _ in said] == [100.0, 130.0, 160.0, 190.0, 200.0]  # another error: said at once
    assert "cannot be reached" in said[-1][1]
    assert "Connection refused" in said[-1][1]
    assert "(1 more such line(s) held back since the last)" in said[-1][1]
    said.pop()
    assert "held back" not in said[0][1]
    assert "(5 more such line(s) held back since the last)" in said[1][1]
    assert all("refuses writes (out of memory)" in text for _, text in said)


def _timer_record(exc: BaseException, logger: str = "kombu.asynchronous.hub") -> logging.LogRecord:
    exc = _raised(exc)
    record = logging.LogRecord(logger, logging.ERROR, __file__, 0, "Error in timer: %r", (exc,), None)
    record.exc_info = (type(exc), exc, exc.__traceback__)
    return record


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        redis.exceptions.NoPermissionError("NOPERM User wanbatch has no permissions to run the 'zadd' cmd"),
        redis.exceptions.NoScriptError("No matching script. Please use EVAL."),
        redis.exceptions.ResponseError("Error running script (call to f_4c1d…): @user_script:1: bad arg"),
    ],
    ids=["wrongtype", "noperm", "noscript", "lua-error"],
)
def test_a_redis_error_reply_that_is_no_outage_keeps_kombus_line(error: BaseException) -> None:
    """Redis answered and refused the command for another reason than memory or a replica: no
    outage, and never said as "the broker cannot be reached" (once relabelled so, and the
    next different error held back for 30 s)."""
    from worker.logs import BrokerTimerErrors

    timer_filter = BrokerTimerErrors(every=30.0, clock=lambda: 100.0)
    for _ in range(3):  # each one kept, none held back
        record = _timer_record(error)
        assert timer_filter.filter(record)
        assert record.levelno == logging.ERROR
        assert record.exc_info is not None
        assert "cannot be reached" not in record.getMessage()
    # ... and it holds back no outage after it.
    record = _timer_record(OutOfMemoryError(OOM_TEXT))
    assert timer_filter.filter(record)
    assert record.levelno == logging.WARNING
    assert "refuses writes (out of memory)" in record.getMessage()


def test_an_outage_error_other_than_the_last_one_shown_is_never_held_back() -> None:
    from worker.logs import BrokerTimerErrors

    now = [100.0]
    timer_filter = BrokerTimerErrors(every=30.0, clock=lambda: now[0])
    errors = [
        redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
        redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
        redis.exceptions.ReadOnlyError(READ_ONLY_TEXT),
        redis.exceptions.ReadOnlyError(READ_ONLY_TEXT),
        OutOfMemoryError(OOM_TEXT),
    ]
    shown = []
    for error in errors:
        now[0] += 1.0
        record = _timer_record(error)
        if timer_filter.filter(record):
            assert record.levelno == logging.WARNING
            shown.append(record.getMessage())
    assert len(shown) == 3, shown
    assert "cannot be reached" in shown[0]
    assert "refuses writes (read-only replica)" in shown[1]
    assert "(1 more such line(s) held back since the last)" in shown[1]
    assert "refuses writes (out of memory)" in shown[2]


def test_celery_stopping_for_a_redis_that_refuses_writes_is_one_warning_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    celery_logs_through_ours()
    caplog.set_level(logging.INFO)
    # As redis-py raises the refused ZREM of the ack's transaction: the EXEC's abort as context.
    refused = OutOfMemoryError(f"Command # 1 (ZREM unacked_index 7c2e…) of pipeline caused error: {OOM_TEXT}")
    refused.__context__ = redis.exceptions.ExecAbortError("Transaction discarded because of previous errors.")
    _log_as_library("celery.worker", "Unrecoverable error: %r", refused, logging.CRITICAL)
    _log_as_library(
        "celery.worker",
        "Unrecoverable error: %r",
        redis.exceptions.ReadOnlyError(READ_ONLY_TEXT),
        logging.CRITICAL,
    )
    oom, read_only = _from(caplog, "celery.worker")
    for record in (oom, read_only):
        assert record.levelno == logging.WARNING
        assert record.exc_info is None
        assert not record.exc_text
        assert getattr(record, "event", None) == "worker.stopped_for_broker"
        assert "it starts afresh" in record.getMessage()
    assert (
        "the broker refuses writes (out of memory) (OutOfMemoryError: Command # 1 (ZREM" in oom.getMessage()
    )
    assert "the broker refuses writes (read-only replica)" in read_only.getMessage()
    assert "Traceback" not in caplog.text


def test_celery_stopping_for_anything_else_keeps_its_line_and_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    celery_logs_through_ours()
    caplog.set_level(logging.INFO)
    _log_as_library("celery.worker", "Unrecoverable error: %r", RuntimeError("a bug"), logging.CRITICAL)
    (record,) = _from(caplog, "celery.worker")
    assert record.levelno == logging.CRITICAL
    assert record.exc_info is not None


def test_a_refusal_is_told_through_kombus_wrapping_and_by_its_words() -> None:
    import kombu.exceptions

    from worker.broker_outage import broker_problem, broker_refusal

    oom = _raised(OutOfMemoryError(OOM_TEXT))
    try:
        raise kombu.exceptions.OperationalError(str(oom)) from oom
    except kombu.exceptions.OperationalError as exc:
        wrapped = exc
    assert broker_refusal(wrapped) == "out of memory"
    assert broker_problem(wrapped) == f"OutOfMemoryError: {OOM_TEXT}"  # the refusal's own words
    # Celery's and kombu's retries re-raise at times with the words alone.
    assert broker_refusal(RuntimeError(f"OOM {OOM_TEXT}")) == "out of memory"
    assert broker_refusal(redis.exceptions.ResponseError(f"READONLY {READ_ONLY_TEXT}")) == "read-only replica"
    assert broker_refusal(redis.exceptions.ResponseError("WRONGTYPE Operation against a key")) is None
    assert broker_refusal(redis.exceptions.ConnectionError("Error 111")) is None
