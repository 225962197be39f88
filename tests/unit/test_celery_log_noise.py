"""Two of Celery's worker log lines, made quieter by :func:`worker.logs.celery_logs_through_ours`.

The audit (real processes): ``kill -9`` of a prefork pool child mid-POST logged ``ERROR
celery.worker.request: Task handler raised error: WorkerLostError('Worker exited prematurely:
signal 9 (SIGKILL) Job: 0.')`` and two ``Traceback`` blocks from ``billiard/pool.py``, though
nothing was wrong (the message is requeued, the job's lease decides); and every broker connection
loss wrote Celery's 8-line ``CPendingDeprecationWarning`` about
``worker_cancel_long_running_tasks_on_connection_loss``, which wanbatch sets. Both go through the
loggers as Celery writes them (its message, its exception info, its warning text and category).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import pytest
from billiard.einfo import ExceptionInfo  # type: ignore[import-untyped]
from billiard.exceptions import WorkerLostError  # type: ignore[import-untyped]
from celery.exceptions import CPendingDeprecationWarning
from celery.worker.consumer.consumer import CANCEL_TASKS_BY_DEFAULT

from worker.logs import celery_logs_through_ours, formatter_for


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.text: list[str] = []
        self.setFormatter(formatter_for("text"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.text.append(self.format(record))


@pytest.fixture
def lines() -> Iterator[_Lines]:
    handler = _Lines()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def _lost_child_error() -> ExceptionInfo:
    """What ``celery.worker.request.Request._worker_lost_info`` builds."""
    try:
        raise WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL) Job: 0.")
    except WorkerLostError:
        return ExceptionInfo()


def test_a_pool_child_killed_mid_task_is_one_warning_line_without_traceback(lines: _Lines) -> None:
    celery_logs_through_ours()
    einfo = _lost_child_error()
    exc = einfo.exception
    # celery.worker.request.Request.on_failure's line, as it writes it
    logging.getLogger("celery.worker.request").error(
        "Task handler raised error: %r", exc, exc_info=einfo.exc_info
    )
    (record,) = lines.records
    (text,) = lines.text
    assert "\n" not in text, text
    assert "Traceback" not in text, text
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert getattr(record, "event", None) == "worker.pool_child_lost"
    assert "pool child killed by signal 9 (SIGKILL) mid-task" in text
    assert "its message is requeued and the job's lease decides" in text


def test_other_task_errors_keep_their_line(lines: _Lines) -> None:
    celery_logs_through_ours()
    try:
        raise ValueError("a bug")
    except ValueError as exc:
        logging.getLogger("celery.worker.request").error("Task handler raised error: %r", exc, exc_info=True)
    (record,) = lines.records
    assert record.levelno == logging.ERROR
    assert "Traceback" in lines.text[0]


def test_celerys_notice_about_cancelling_tasks_on_connection_loss_is_not_logged(lines: _Lines) -> None:
    celery_logs_through_ours()
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            # Celery's logging set-up puts this first (celery.app.log.Logging.setup)
            warnings.filterwarnings("always", category=CPendingDeprecationWarning)
            # celery.worker.consumer.consumer.Consumer.on_connection_error_after_connected's
            warnings.warn(CANCEL_TASKS_BY_DEFAULT, CPendingDeprecationWarning, stacklevel=2)
            warnings.warn("another notice", CPendingDeprecationWarning, stacklevel=2)
    finally:
        logging.captureWarnings(False)
    said = "\n".join(lines.text)
    assert "optional breaking change" not in said
    assert "another notice" in said  # Celery's other warnings stay


def test_a_rendered_acknowledgement_line_still_names_its_message(lines: _Lines) -> None:
    """A record rendered when it was made (the key's redaction renders every one: no args left)
    said "of message ?"; the id is read back from kombu's text."""
    import redis.exceptions

    celery_logs_through_ours()
    request_log = logging.getLogger("celery.worker.request")
    try:
        raise redis.exceptions.TimeoutError("Timeout reading from 127.0.0.1:6379")
    except redis.exceptions.TimeoutError as exc:
        request_log.critical("Couldn't ack %r, reason:%r" % ("1a87a991", exc), exc_info=True)  # noqa: UP031
    (lost,) = lines.records
    assert getattr(lost, "event", None) == "worker.ack_lost"
    assert "the broker did not take the acknowledgement of message 1a87a991 (TimeoutError" in lines.text[0]


def test_an_acknowledgement_the_broker_did_not_take_is_one_warning_line(lines: _Lines) -> None:
    """Seen in tests/integration/test_broker_hang.py: with Redis stopped, a task's ack timed out
    and kombu wrote ``CRITICAL celery.worker.request: Couldn't ack 1, reason:…`` with a traceback."""
    import redis.exceptions

    celery_logs_through_ours()
    request_log = logging.getLogger("celery.worker.request")
    try:  # kombu.message.Message.ack_log_error's line, as it writes it
        raise redis.exceptions.TimeoutError("Timeout reading from 127.0.0.1:6379")
    except redis.exceptions.TimeoutError as exc:
        request_log.critical("Couldn't ack %r, reason:%r", "1a87a991", exc, exc_info=True)
    try:  # anything but the broker: kombu's line stays
        raise RuntimeError("a bug")
    except RuntimeError as exc:
        request_log.critical("Couldn't ack %r, reason:%r", "2b", exc, exc_info=True)
    lost, bug = lines.records
    assert lost.levelno == logging.WARNING
    assert getattr(lost, "event", None) == "worker.ack_lost"
    assert "\n" not in lines.text[0], lines.text[0]
    assert (
        "the broker did not take the acknowledgement of message 1a87a991 (TimeoutError: Timeout"
        in lines.text[0]
    )
    assert bug.levelno == logging.CRITICAL
    assert "Traceback" in lines.text[1]
