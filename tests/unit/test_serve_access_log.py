"""``wanbatch serve``'s access log under the key redaction that renders every record at birth."""

from __future__ import annotations

import io
import logging
import logging.config
import re
from collections.abc import Iterator
from typing import Any

import pytest

from cli.service_commands import uvicorn_log_config
from worker.fal.redact import install_redaction, uninstall_redaction

KEY = "serve-log-key-0f3e9a"


@pytest.fixture
def redacting() -> Iterator[None]:
    install_redaction(KEY)
    saved = {name: logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")}
    state = {name: (lg.handlers[:], lg.level, lg.propagate) for name, lg in saved.items()}
    try:
        yield
    finally:
        uninstall_redaction()
        for name, lg in saved.items():
            lg.handlers[:], lg.level, lg.propagate = state[name]


def _access_line(config: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """What uvicorn's access logger writes for one request (as uvicorn logs it), and stderr."""
    logging.config.dictConfig(config)
    out = io.StringIO()
    handler = logging.getLogger("uvicorn.access").handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", f"/batches/x?k={KEY}", "1.1", 200
    )
    return out.getvalue(), capsys.readouterr().err


@pytest.mark.usefixtures("redacting")
def test_every_request_is_one_line_and_never_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    config = uvicorn_log_config("text")
    assert config is not None
    line, err = _access_line(config, capsys)
    assert "Logging error" not in err
    assert line.strip().endswith('127.0.0.1:5000 - "GET /batches/x?k=*** HTTP/1.1" 200')
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO uvicorn\.access: ", line), line
    assert KEY not in line


@pytest.mark.usefixtures("redacting")
def test_uvicorns_own_access_format_needs_the_args_redaction_renders_away(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Why the format is replaced: uvicorn's stock access formatter fails on every request."""
    from uvicorn.config import LOGGING_CONFIG

    _, err = _access_line(LOGGING_CONFIG, capsys)
    assert "Logging error" in err


def test_json_logs_leave_uvicorn_to_the_root_handler() -> None:
    assert uvicorn_log_config("json") is None
