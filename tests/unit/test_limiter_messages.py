"""What is said about the submit-rate limiter's Redis: where it is (password masked), and an
outage's warnings, at most one every 30 s however many submits fail meanwhile."""

from __future__ import annotations

import logging

import pytest
from pydantic import SecretStr

from jobs.settings import Settings
from jobs.url_secrets import masked_url
from worker.limits import UNREACHABLE_WARN_EVERY_SECONDS, Outage, backend, describe


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:hunter2@10.0.0.5:6379/1", "redis://:**@10.0.0.5:6379/1"),
        ("rediss://limits:hunter2@cache.example:6380/0", "rediss://limits:**@cache.example:6380/0"),
        ("unix:///run/redis.sock?db=2&password=hunter2", "unix:///run/redis.sock?db=2&password=**"),
    ],
)
def test_the_limiter_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert masked_url(url) == shown
    assert "hunter2" not in masked_url(url)


def test_the_setting_in_use_is_named() -> None:
    key = SecretStr("k")
    assert backend(Settings(FAL_KEY=key)) is None  # embedded: the limiter is in process
    assert backend(Settings(FAL_KEY=key, limits_url="redis://h:1/0", broker_url="redis://b/0")) == (
        "WANBATCH_LIMITS_URL",
        "redis://h:1/0",
    )
    assert backend(Settings(FAL_KEY=key, broker_url="redis://:pw@b:6379/0")) == (
        "WANBATCH_BROKER_URL",
        "redis://:pw@b:6379/0",
    )
    assert (
        describe("WANBATCH_BROKER_URL", "redis://:pw@b:6379/0")
        == "redis://:**@b:6379/0 (WANBATCH_BROKER_URL)"
    )


def test_an_outage_is_said_at_most_every_30_seconds_and_its_end_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.limits")
    now = [0.0]
    outage = Outage("redis://h:1/0 (WANBATCH_LIMITS_URL)", clock=lambda: now[0])
    outage.answered()  # answering while nothing was wrong says nothing
    assert outage.note() is None
    for second in range(int(UNREACHABLE_WARN_EVERY_SECONDS)):  # a failure a second for 30 s
        now[0] = float(second)
        outage.failed("Connection refused")
    assert len(caplog.records) == 1
    assert outage.note() == "limiter unreachable: submits held"
    now[0] = UNREACHABLE_WARN_EVERY_SECONDS
    outage.failed("Connection refused")
    assert [r.getMessage() for r in caplog.records] == [
        "the submit-rate limiter's Redis at redis://h:1/0 (WANBATCH_LIMITS_URL) is unreachable: "
        "Connection refused; nothing is submitted until it answers (jobs wait, none fails)",
        "the submit-rate limiter's Redis at redis://h:1/0 (WANBATCH_LIMITS_URL) is unreachable for 30s: "
        "Connection refused; nothing is submitted until it answers (jobs wait, none fails)",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    caplog.clear()
    now[0] = 42.0
    outage.answered()
    outage.answered()
    assert [r.getMessage() for r in caplog.records] == [
        "the submit-rate limiter's Redis at redis://h:1/0 (WANBATCH_LIMITS_URL) answers again after 42s: "
        "sending resumes"
    ]
    assert outage.note() is None
    caplog.clear()
    now[0] = 43.0
    outage.failed("Connection refused")  # a new outage is said at once
    assert len(caplog.records) == 1


def test_a_redis_that_answers_and_refuses_is_said_as_such(caplog: pytest.LogCaptureFixture) -> None:
    """A read-only replica (or an ACL, or a full ``maxmemory``) answers: "unreachable" and
    "answers again" would send its user looking for a network problem."""
    caplog.set_level(logging.WARNING, logger="worker.limits")
    now = [0.0]
    outage = Outage("redis://h:1/0 (WANBATCH_LIMITS_URL)", clock=lambda: now[0])
    outage.failed("You can't write against a read only replica", refused=True)
    assert outage.note() == "limiter refused by its Redis: submits held"
    now[0] = 12.0
    outage.answered()
    assert [r.getMessage() for r in caplog.records] == [
        "the submit-rate limiter's Redis at redis://h:1/0 (WANBATCH_LIMITS_URL) answers but refuses the "
        "limiter's script: You can't write against a read only replica; nothing is submitted until it "
        "accepts it (jobs wait, none fails)",
        "the submit-rate limiter's Redis at redis://h:1/0 (WANBATCH_LIMITS_URL) accepts the limiter's "
        "script again after 12s: sending resumes",
    ]
