"""SQLAlchemy's own ERROR records of a cleanup the database failed (``Error closing cursor``…)
are one warning line, not the driver's traceback amid a run's lines; any other error keeps it.

Found by injecting a connection reset into a run on PostgreSQL (``strace -e
inject=recvfrom:error=ECONNRESET``): the pool logged ``Error closing cursor`` with psycopg's
traceback, though the run itself said the outage in one line and went on.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import psycopg
import pytest

from worker.logs import DatabaseCleanupErrors, formatter_for

POOL_LOGGER = "sqlalchemy.pool.impl.QueuePool"


@pytest.fixture
def pool_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter_for("text"))
    handler.addFilter(DatabaseCleanupErrors())
    logger = logging.getLogger(POOL_LOGGER)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_a_connection_lost_while_closing_a_cursor_is_one_warning_line(
    pool_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = pool_log
    lost = _raised(
        psycopg.OperationalError(
            "consuming input failed: server closed the connection unexpectedly\n\tThis probably means the "
            "server terminated abnormally\n\tbefore or while processing the request."
        )
    )
    logger.error("Error closing cursor", exc_info=(type(lost), lost, lost.__traceback__))
    text = stream.getvalue()
    assert text.count("\n") == 1, text
    assert "Traceback" not in text
    assert text.startswith("WARNING sqlalchemy.pool.impl.QueuePool: Error closing cursor (OperationalError: ")
    assert "server closed the connection unexpectedly This probably means" in text


def test_any_other_error_keeps_its_traceback(pool_log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = pool_log
    bug = _raised(TypeError("a bug"))
    logger.error("Error closing cursor", exc_info=(type(bug), bug, bug.__traceback__))
    text = stream.getvalue()
    assert text.startswith("ERROR sqlalchemy.pool.impl.QueuePool: Error closing cursor")
    assert "Traceback" in text
    assert "TypeError: a bug" in text
