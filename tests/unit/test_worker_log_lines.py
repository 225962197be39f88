"""``wanbatch worker``'s text log lines start with their time, and ``--name`` names its node.

A worker's log is read hours after the fact ("what happened at 3 am?"), and its text lines said
nothing of when. Now each starts with the time it was logged, ISO 8601 in UTC to the millisecond
(the JSON lines' ``ts``), with the key and URL credentials masked as before. Every worker was
``celery@HOST``, so two on one host shared a node name; ``--name`` (Celery's ``--hostname``)
sets it, and the default, ``wanbatch-PID@HOST``, differs between processes.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from datetime import UTC, datetime

import click
import pytest

from cli.service_commands import node_name
from worker.logs import TIMESTAMPED_TEXT_FORMAT, TextFormatter, formatter_for, utc_timestamp

KEY = "b-logs-key-7f3e9a1c:5d2b8e4f0a6c"
#: The start of a worker's text line: ``2026-05-01T22:14:03.512Z LEVEL``.
STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def _worker_logging(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI's logging set up as ``wanbatch worker`` sets it (:func:`configure_logging`, the
    key's redaction, :func:`timestamp_text_lines`), in a fresh interpreter; two lines logged."""
    code = (
        "import logging\n"
        "from worker.fal.redact import install_redaction\n"
        "from worker.logs import configure_logging, timestamp_text_lines\n"
        "configure_logging()\n"
        f"install_redaction({KEY!r})\n"
        "timestamp_text_lines()\n"
        "log = logging.getLogger('worker.probe')\n"
        "log.warning('broker redis://:s3cret-pw@10.0.0.5:6379/0 refused key %s', "
        f"{KEY!r}, extra={{'event': 'probe.url'}})\n"
        "log.error('second line')\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_") and k != "FAL_KEY"}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_a_workers_text_lines_start_with_their_utc_time_and_still_mask_secrets() -> None:
    done = _worker_logging({})
    first, second = done.stderr.splitlines()
    assert STAMPED.match(first), first
    assert STAMPED.match(second), second
    stamp = first.split(" ", 1)[0]
    assert datetime.fromisoformat(stamp).utcoffset() == UTC.utcoffset(None)  # UTC, said with its Z
    assert first.endswith("WARNING worker.probe: broker redis://:**@10.0.0.5:6379/0 refused key ***"), first
    assert "s3cret-pw" not in done.stderr
    assert KEY not in done.stderr
    assert KEY.split(":")[1] not in done.stderr


def test_the_timestamp_is_the_json_lines_ts() -> None:
    record = logging.LogRecord("worker.probe", logging.INFO, __file__, 1, "hello", None, None)
    line = formatter_for("text", timestamps=True).format(record)
    assert line == f"{utc_timestamp(record.created)} INFO worker.probe: hello"
    assert utc_timestamp(0.0) == "1970-01-01T00:00:00.000Z"
    assert TextFormatter(TIMESTAMPED_TEXT_FORMAT).formatTime(record) == utc_timestamp(record.created)
    assert formatter_for("text").format(record) == "INFO worker.probe: hello"  # the other commands'


def test_the_default_node_name_is_this_process_on_this_host() -> None:
    assert node_name(None) == f"wanbatch-{os.getpid()}@{socket.gethostname()}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alpha@%h", "alpha@{host}"),
        ("alpha@box.example.org", "alpha@box.example.org"),
        ("beta-%n@%h", "beta-{short}@{host}"),
        ("gpu-host", "wanbatch-{pid}@gpu-host"),  # Celery's: a value without @ is the host part
        ("@%h", "wanbatch-{pid}@{host}"),
        ("100%%@%h", "100%@{host}"),
    ],
)
def test_a_given_node_name_expands_as_celerys_hostname_option(value: str, expected: str) -> None:
    host = socket.gethostname()
    assert node_name(value) == expected.format(host=host, short=host.partition(".")[0], pid=os.getpid())


@pytest.mark.parametrize("value", ["", " ", "alpha beta@%h", "alpha\x1b[2J@%h", "alpha@%x"])
def test_a_bad_node_name_is_a_usage_error(value: str) -> None:
    with pytest.raises(click.BadParameter):
        node_name(value)
