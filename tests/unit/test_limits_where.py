"""What the tick leader publishes of where it works (its outputs, fal's URLs) and how a worker
compares it (:func:`worker.limits.elsewhere`): no false warning for the same place written
another way, and nothing secret in what goes to Redis (found by a review of the first version,
which compared resolved paths and masked URLs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.settings import Settings
from worker.limits import Limits, fal_location, mismatch

KEY = "0123abcd-1111-2222-3333-444455556666:fedcba9876543210fedcba9876543210"


def _settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    with monkeypatch.context() as m:
        m.setenv("FAL_KEY", KEY)
        for name, value in env.items():
            m.setenv(name, value)
        return Settings()


def _published(settings: Settings) -> Limits:
    """The leader's policy as a worker reads it back from Redis (``fields()`` → ``parse()``)."""
    raw = {k.encode(): v.encode() for k, v in Limits.of(settings, "leader-host:1:").fields().items()}
    raw[b"at"] = b"1"
    parsed = Limits.parse(raw)
    assert parsed is not None
    return parsed


def test_the_same_fal_url_spelled_with_another_case_or_its_default_port_is_no_other_fal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    leader = _settings(monkeypatch, WANBATCH_FAL_QUEUE_URL="https://queue.fal.run")
    worker = _settings(monkeypatch, WANBATCH_FAL_QUEUE_URL="HTTPS://Queue.Fal.Run:443")
    assert mismatch(worker, _published(leader)) == []


def test_another_fal_is_still_said(monkeypatch: pytest.MonkeyPatch) -> None:
    leader = _settings(monkeypatch, WANBATCH_FAL_QUEUE_URL="https://queue.fal.run")
    worker = _settings(monkeypatch, WANBATCH_FAL_QUEUE_URL="https://127.0.0.1:8443")
    (line,) = mismatch(worker, _published(leader))
    assert "https://127.0.0.1:8443 here, https://queue.fal.run there" in line


def test_the_same_output_path_on_two_hosts_is_one_folder_whatever_their_symlinks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Both hosts set ``<share>/outputs``: on the leader's host ``<share>`` is a symlink to the
    mount point, on the worker's the share is mounted at ``<share>`` itself."""
    share, mount = tmp_path / "data", tmp_path / "mnt-nfs"
    mount.mkdir()
    share.symlink_to(mount)  # the leader's host
    published = _published(_settings(monkeypatch, WANBATCH_OUTPUT_DIR=str(share / "outputs")))
    share.unlink()
    share.mkdir()  # the worker's host
    worker = _settings(monkeypatch, WANBATCH_OUTPUT_DIR=str(share / "outputs"))
    assert mismatch(worker, published) == []


def test_a_token_anywhere_in_the_fal_url_never_reaches_what_is_published(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    leader = _settings(
        monkeypatch,
        WANBATCH_FAL_QUEUE_URL="https://user:pw-secret@proxy.example:8443/queue;token=path-secret",
    )
    fields = json.dumps(Limits.of(leader, "leader-host:1:").fields())
    for secret in ("pw-secret", "path-secret"):
        assert secret not in fields
    assert "https://proxy.example:8443/queue" in fields
    # A query or a fragment is refused in the setting; what is published never holds one either.
    shown = fal_location(
        "https://user:pw-secret@proxy.example:8443/queue;token=path-secret?k=q-secret#f-secret"
    )
    assert shown == "https://proxy.example:8443/queue"


@pytest.mark.parametrize(
    ("url", "location"),
    [
        ("HTTPS://Queue.Fal.Run:443/", "https://queue.fal.run"),
        ("http://[::1]:80/a/", "http://[::1]/a"),
        ("https://127.0.0.1:9000", "https://127.0.0.1:9000"),
        ("http://[::1", "(not a URL)"),
    ],
)
def test_a_fal_url_is_compared_by_scheme_host_port_and_path(url: str, location: str) -> None:
    assert fal_location(url) == location
