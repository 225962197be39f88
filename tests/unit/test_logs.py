"""``WANBATCH_LOG_FORMAT=json``: one JSON object per line, a stable ``event``, the job's ids, no key.

The formatter is exercised on real records (messages, ``extra=`` fields, tracebacks, the job
context the steps set), then through a fresh interpreter, where the format is read from the
environment at the first record, as the CLI does.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from worker.fal.redact import install_redaction, uninstall_redaction
from worker.logs import (
    JOB_FIELDS,
    JsonFormatter,
    annotate,
    configure_logging,
    job_context,
    note_what_failed,
    step_done,
)

KEY = "b-logs-key-7f3e9a1c:5d2b8e4f0a6c"


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing JSON lines into a buffer (not propagating: nothing else sees it)."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"wanbatch.test.logs.{id(buffer)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield logger, buffer
    logger.removeHandler(handler)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    """Every line of the buffer as JSON: a line that is not an object fails the test."""
    out = []
    for line in buffer.getvalue().splitlines():
        parsed = json.loads(line)
        assert isinstance(parsed, dict), line
        out.append(parsed)
    return out


def test_every_record_is_one_json_line_with_a_stable_event(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, buffer = json_log
    logger.warning("job %s: the video does not match: %s", "j1", "size", extra={"event": "download.mismatch"})
    logger.info("no event given\nsecond line of the message")
    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        logger.exception("it failed", extra={"event": "step.failed", "outcome": "retry"})
    records = lines(buffer)
    assert len(records) == 3  # the multi-line message and the traceback did not split lines
    first, second, third = records
    assert first["event"] == "download.mismatch"
    assert first["message"] == "job j1: the video does not match: size"
    assert first["level"] == "warning"
    assert first["ts"].endswith("Z")
    assert second["event"] == logger.name  # no event given: the logger's name, stable
    assert second["message"] == "no event given\nsecond line of the message"
    assert third["event"] == "step.failed"
    assert third["outcome"] == "retry"
    assert "ValueError: broken" in third["exc"]
    assert "Traceback" in third["exc"]
    for record in records:
        assert set(JOB_FIELDS).isdisjoint(record)  # not about a job: no job fields at all


def test_job_fields_come_from_the_steps_context_and_extra(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, buffer = json_log
    with job_context("job-1", batch_id="batch-1"):
        logger.info("before the submit")
        annotate(request_id="req-1")
        logger.info("after the submit")
        logger.info("explicit wins", extra={"job_id": "job-2", "request_id": None})
    logger.info("outside")
    before, after, explicit, outside = lines(buffer)
    assert before["job_id"] == "job-1"
    assert before["batch_id"] == "batch-1"
    assert "request_id" not in before
    assert (after["job_id"], after["batch_id"], after["request_id"]) == ("job-1", "batch-1", "req-1")
    assert explicit["job_id"] == "job-2"
    assert explicit["request_id"] == "req-1"  # an explicit None says nothing; the context stays
    assert set(JOB_FIELDS).isdisjoint(outside)


def test_a_step_line_names_what_failed_when_it_was_not_the_step(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    """fal's result said the render failed (a request it refused: a 422 content policy
    violation): the download step's line said "download failed", though no download was tried.
    It names the render now; its event and outcome stay the step's, and the note lasts one step."""
    logger, buffer = json_log
    refused = {"error": "HTTP 422: refused", "error_type": "content_policy_violation"}
    with job_context("job-1"):
        note_what_failed("fal's result: the render failed")
        step_done(logger, "download", "job-1", "failed", **refused)
    with job_context("job-2"):
        note_what_failed("fal's result: the render failed")
        step_done(logger, "download", "job-2", "retry", error="HTTP 503", error_type="runner_disconnected")
    with job_context("job-3"):  # a new step: nothing noted
        step_done(logger, "download", "job-3", "failed", error="gone", error_type="download_failed")
    note_what_failed("outside a step: ignored")
    step_done(logger, "submit", "job-4", "failed", error="no", error_type="bad_request")
    first, second, third, fourth = lines(buffer)
    assert first["message"] == (
        "job job-1: fal's result: the render failed (content_policy_violation): HTTP 422: refused"
    )
    assert (first["event"], first["outcome"], first["error_type"]) == (
        "job.download",
        "failed",
        "content_policy_violation",
    )
    assert second["message"] == (
        "job job-2: fal's result: the render failed; it is sent again (runner_disconnected): HTTP 503"
    )
    assert third["message"] == "job job-3: download failed (download_failed): gone"
    assert fourth["message"] == "job job-4: submit failed (bad_request): no"


def test_the_context_belongs_to_one_thread_and_one_step(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, buffer = json_log
    entered = threading.Event()
    release = threading.Event()

    def other_step() -> None:
        with job_context("job-B", batch_id="batch-B"):
            entered.set()
            release.wait(10)
            logger.info("B")

    thread = threading.Thread(target=other_step)
    thread.start()
    assert entered.wait(10)
    with job_context("job-A"):
        logger.info("A")
    release.set()
    thread.join(10)
    logger.info("after both")
    by_message = {record["message"]: record for record in lines(buffer)}
    assert by_message["A"]["job_id"] == "job-A"
    assert "batch_id" not in by_message["A"]
    assert by_message["B"]["job_id"] == "job-B"
    assert by_message["B"]["batch_id"] == "batch-B"
    assert "job_id" not in by_message["after both"]


def test_extra_fields_of_any_type_are_written(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = json_log

    class Opaque:
        def __str__(self) -> str:
            return "opaque-thing"

    logger.info(
        "fields", extra={"count": 3, "usd": Decimal("0.45"), "nested": {"a": [1, "x"]}, "thing": Opaque()}
    )
    (record,) = lines(buffer)
    assert record["count"] == 3
    assert record["usd"] == "0.45"
    assert record["nested"] == {"a": [1, "x"]}
    assert record["thing"] == "opaque-thing"


def test_the_key_never_appears_in_a_json_line(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = json_log
    install_redaction(KEY)
    try:
        logger.warning("args: %s", KEY)
        logger.warning(f"an f-string with {KEY} inside")
        logger.info("extra", extra={"event": "x", "detail": {"echo": [f"Key {KEY}"]}, "url": f"?k={KEY}"})
        logger.info("cut short: %s…", KEY[:20])
        try:
            raise RuntimeError(f"fal echoed {KEY}")
        except RuntimeError:
            logger.exception("traceback")
        logger.warning("header: Authorization: Key some-other:credential-value")
    finally:
        uninstall_redaction()
    text = buffer.getvalue()
    assert len(lines(buffer)) == 6
    assert KEY not in text
    assert KEY[:20] not in text
    assert KEY.split(":")[1] not in text
    assert "credential-value" not in text  # an Authorization value, by its shape
    assert "***" in text


def _fresh_interpreter(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "import logging\n"
        "from worker.logs import configure_logging\n"
        "configure_logging()\n"
        "logging.getLogger('wanbatch.probe').warning('hello %s', 'world', extra={'event': 'probe.hello'})\n"
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


@pytest.mark.parametrize("value", ["json", "JSON", " Json "])
def test_the_format_comes_from_the_environment(value: str) -> None:
    done = _fresh_interpreter({"WANBATCH_LOG_FORMAT": value})
    (line,) = done.stderr.splitlines()
    record = json.loads(line)
    assert record["event"] == "probe.hello"
    assert record["message"] == "hello world"
    assert record["logger"] == "wanbatch.probe"


def test_text_is_the_default_and_a_bad_configuration_falls_back_to_it() -> None:
    assert _fresh_interpreter({}).stderr == "WARNING wanbatch.probe: hello world\n"
    bad = _fresh_interpreter({"WANBATCH_LOG_FORMAT": "yaml"})
    assert bad.stderr == "WARNING wanbatch.probe: hello world\n"


def test_an_existing_handler_is_left_alone() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    if not before:  # pytest's capture normally installs one; make sure the case is exercised
        root.addHandler(logging.NullHandler())
    try:
        handlers = list(root.handlers)
        level = root.level
        configure_logging("json")
        assert root.handlers == handlers
        assert root.level == level
    finally:
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)
