"""The CLI entry point installs FAL_KEY redaction before anything can log."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from cli import install_key_redaction
from jobs.settings import get_settings
from worker.fal.redact import uninstall_redaction

KEY = "fal-key-0123456789-abcdef:SECRET"


@pytest.fixture
def clean_logging() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    uninstall_redaction()
    get_settings.cache_clear()


def test_the_entry_point_redacts_the_configured_key(
    clean_logging: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FAL_KEY", KEY)
    assert install_key_redaction() is True
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("httpx").debug("sending Authorization: Key %s", KEY)
        logging.getLogger("celery.worker").warning(f"oops {KEY} in an f-string")
    text = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert "oops" in text
    assert KEY not in text
    assert "SECRET" not in text


def test_no_key_installs_nothing(clean_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    assert install_key_redaction() is False
