"""``wanbatch doctor`` never ends a sentence with two full stops.

A client's error that ends with its own full stop (redis-py's "Error 111 connecting to
127.0.0.1:1. Connection refused.") was quoted before the sentence went on: "refused.. Start it or
fix the URL" — in ``doctor``'s broker line and in ``run``'s error. Each check quotes others' words
without their last full stop now, and no check's line holds a doubled one.

The failures are real: a Redis (broker and limiter), a PostgreSQL, a fal and a receiver on free
loopback ports where nothing listens.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.errors import ConfigError
from jobs.printable import clause, single_stops
from jobs.settings import Settings, get_settings
from tests.in_process import run_main
from tests.ports import unused_port
from worker.running import check_broker

#: Two full stops that are not part of an ellipsis ("...").
DOUBLED = re.compile(r"(?<!\.)\.\.(?!\.)")


@pytest.fixture
def nothing_listens(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Every service doctor checks set to a loopback port where nothing listens."""
    for name in [k for k in os.environ if k.startswith("WANBATCH_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANBATCH_BROKER_URL", f"redis://127.0.0.1:{unused_port()}/0")
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"postgresql://postgres@127.0.0.1:{unused_port()}/test")
    fal = f"http://127.0.0.1:{unused_port()}"
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", fal)
    monkeypatch.setenv("WANBATCH_FAL_REST_URL", fal)
    monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"http://127.0.0.1:{unused_port()}/webhooks/fal")
    monkeypatch.setenv("WANBATCH_WEBHOOK_JWKS_URL", f"{fal}/.well-known/jwks.json")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("FAL_KEY", "k-doctor-stops")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.usefixtures("nothing_listens")
def test_no_doctor_line_has_a_doubled_full_stop(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["doctor", "--json"], monkeypatch) == 1
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    for name in ("database", "broker", "limiter", "provider", "receiver"):
        assert checks[name]["status"] == "fail", checks[name]
    for check in checks.values():
        for text in (check["detail"], check["fix"] or ""):
            assert not DOUBLED.search(text), text
    assert "Connection refused. Start it or fix the URL" in checks["broker"]["detail"]

    assert run_main(["doctor"], monkeypatch) == 1
    printed = capsys.readouterr().out
    assert "broker" in printed
    for line in printed.splitlines():
        assert not DOUBLED.search(line), line


@pytest.mark.usefixtures("nothing_listens")
def test_runs_broker_error_has_one_full_stop() -> None:
    """The broker's line is ``run``'s and ``worker``'s error too (exit 2)."""
    with pytest.raises(ConfigError) as refused:
        check_broker(Settings(), timeout=3.0)
    said = str(refused.value)
    assert not DOUBLED.search(said), said
    assert "Connection refused. Start it or fix the URL" in said


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Connection refused.", "Connection refused"),
        ("Connection refused", "Connection refused"),
        ("still waiting...", "still waiting..."),
        ("still waiting…", "still waiting…"),
        ("ends. ", "ends"),
        (".", ""),
    ],
)
def test_a_quoted_message_loses_only_its_own_full_stop(text: str, expected: str) -> None:
    assert clause(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("refused.. Start it", "refused. Start it"),
        ("refused..", "refused."),
        ("waiting... Start it", "waiting... Start it"),
        ("cannot write /srv/.. now", "cannot write /srv/.. now"),
        ("a .. b", "a .. b"),
        ("v1..v2", "v1..v2"),
    ],
)
def test_a_doubled_full_stop_becomes_one_but_ellipses_and_paths_stay(text: str, expected: str) -> None:
    assert single_stops(text) == expected
