"""`wanbatch cancel NAME` against a fal whose every cancel answer is a redirect: it ends.

Audit: a fal queue (a proxy in front of it, a misconfigured gateway) that answered every
``PUT …/requests/{id}/cancel`` with a 3xx — to the same URL, or to another path — kept `cancel`
asking until it was interrupted: the cancel step logged "cancel failed; will try again" every
tick and the embedded run waited for jobs that could never end. A redirect is never followed
(the cancel carries the key). Now a request's cancel is tried a bounded number of times (a
transient failure for a bounded time), then given up: `cancel` ends with exit 1 and one line
per request it could not cancel, and the job stays where fal holds it (``queued``), never
``cancelling`` or ``cancelled``: fal may still run and bill it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.settings import get_settings
from tests.e2e.e2e_helpers import FAL_KEY, FAST_ENV, Background, MakeManifest, Wb, wait_for
from tests.hostile import HostileProvider, json_reply, redirect
from tests.hostile_fal import FakeFal
from worker.steps.cancel_tries import CANCEL_ATTEMPTS

TWO = """\
name: redirected
endpoint: fal-ai/wan-22
items:
  - prompt: a lighthouse at dusk
    seed: 7
  - prompt: a lighthouse at dawn
    seed: 8
"""
CANCEL = r".*/requests/(r\d+)/cancel"


@pytest.fixture
def fal(hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFal]:
    """wanbatch pointed at the hostile provider playing fal: every request stays IN_QUEUE."""
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", hostile.url)
    monkeypatch.setenv("WANBATCH_FAL_REST_URL", hostile.url)
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    fake = FakeFal(hostile)
    fake.on_status("[^/]+", json_reply({"status": "IN_QUEUE", "queue_position": 3}))
    yield fake
    get_settings.cache_clear()


def _queued_at_fal(wb: Wb, manifest: MakeManifest, work: Path) -> None:
    """`run` the manifest until both requests are queued at fal, then stop it (Ctrl-C)."""
    run = Background(["run", manifest("redirected", TWO), "--no-progress"], dict(os.environ), work, "run")
    try:
        wait_for("two queued requests", lambda: _counts(wb).get("queued") == 2, run)
        run.popen.send_signal(signal.SIGINT)
        assert run.wait(60) == 130, run.stderr()
    finally:
        run.kill()


def _counts(wb: Wb) -> dict[str, int]:
    done = wb("status", "redirected", "--json")
    if done.code != 0:
        return {}
    counts: dict[str, int] = done.json()["counts"]
    return counts


def _status(wb: Wb) -> dict[str, Any]:
    done = wb("status", "redirected", "--json")
    assert done.code == 0, done.stderr
    report: dict[str, Any] = done.json()
    return report


@pytest.mark.timeout(150)
def test_a_cancel_fal_answers_with_redirects_ends_naming_each_request(
    wb: Wb, fal: FakeFal, hostile: HostileProvider, manifest: MakeManifest, e2e_env: Path
) -> None:
    _queued_at_fal(wb, manifest, e2e_env)
    # r1: back to the very same URL; r2: to another path of fal's host.
    hostile.route("PUT", r".*/requests/r1/cancel", lambda req, sock: redirect(req.path, 307)(req, sock))
    hostile.route("PUT", r".*/requests/r2/cancel", redirect(f"{hostile.url}/elsewhere/r2", 302))

    started = time.monotonic()
    cancel = Background(["cancel", "redirected", "--no-progress"], dict(os.environ), e2e_env, "cancel")
    try:
        code = cancel.wait(60)  # before the fix: never ended (killed here, the test failed)
    finally:
        cancel.kill()
    err = cancel.stderr()
    assert time.monotonic() - started < 60
    assert "Traceback" not in err + cancel.stdout(), err
    assert code == 1, err  # the batch's outcome: jobs left unfinished (README › exit codes)
    assert FAL_KEY not in err + cancel.stdout()

    # One line per request it could not cancel, saying what that means.
    lines = [line for line in err.splitlines() if "could not be cancelled at fal" in line]
    assert len(lines) == 2, err
    for request_id, line in zip(("r1", "r2"), sorted(lines, key=lambda x: "r2" in x), strict=True):
        assert f"request {request_id}" in line, line
        assert "redirect" in line, line
        assert "fal may still run and bill it" in line, line
        assert "wanbatch cancel redirected" in line, line

    # A bounded number of tries per request, never "asking until interrupted".
    puts = {rid: hostile.count("PUT", rf".*/requests/{rid}/cancel") for rid in ("r1", "r2")}
    assert puts == {"r1": CANCEL_ATTEMPTS, "r2": CANCEL_ATTEMPTS}, puts
    assert hostile.count("PUT", r"/elsewhere/.*") == 0  # never followed
    assert not [r for r in hostile.requests if r.method == "GET" and r.path.startswith("/elsewhere")]

    # Truthful: fal still holds both requests; nothing says fal stopped them.
    report = _status(wb)
    assert report["state"] == "cancelled"
    assert report["counts"].get("queued") == 2, report["counts"]
    assert not report["counts"].get("cancelling"), report["counts"]
    assert not report["counts"].get("cancelled"), report["counts"]


@pytest.mark.timeout(150)
def test_a_second_cancel_tries_again_and_finishes_once_fal_takes_it(
    wb: Wb, fal: FakeFal, hostile: HostileProvider, manifest: MakeManifest, e2e_env: Path
) -> None:
    _queued_at_fal(wb, manifest, e2e_env)
    hostile.route("PUT", CANCEL, redirect("/moved", 301))
    argv = ["cancel", "redirected", "--json", "--no-progress"]
    first = Background(argv, dict(os.environ), e2e_env, "cancel1")
    try:
        assert first.wait(60) == 1, first.stderr()
    finally:
        first.kill()
    # --json names them too, in the one object on stdout.
    (line,) = [line for line in first.stdout().splitlines() if line.strip()]
    uncancelled = json.loads(line)["uncancelled"]
    assert sorted(u["request_id"] for u in uncancelled) == ["r1", "r2"]
    assert all("HTTP 301 redirect" in u["error"] and u["tries"] == CANCEL_ATTEMPTS for u in uncancelled)
    tried = hostile.count("PUT", CANCEL)

    # Once that process has ended, `status` still names them (recorded on the jobs' history):
    # before, the batch read as cancelled and nothing said fal may still run and bill them.
    report = _status(wb)
    assert report["state"] == "cancelled"
    given_up = report["uncancelled"]
    assert sorted(u["request_id"] for u in given_up) == ["r1", "r2"], report
    assert all("HTTP 301 redirect" in u["error"] and u["tries"] == CANCEL_ATTEMPTS for u in given_up)
    note = report["uncancelled_note"]
    assert note.startswith("2 request(s) of this cancelled batch could not be cancelled"), note
    shown = wb("status", "redirected")
    assert shown.code == 0, shown.stderr
    said = " ".join(shown.stdout.split())
    assert "could not be cancelled at fal" in said, said
    assert "fal may still run and bill them" in said, said
    assert "`wanbatch cancel redirected` asks fal again" in said, said
    assert FAL_KEY not in shown.stdout + shown.stderr
    every = wb("status", "--json")
    assert [b["uncancelled_note"] != "" for b in every.json()["batches"]] == [True], every.stdout

    # fal takes cancels again: the next `cancel` finishes what the first could not.
    hostile.route("PUT", CANCEL, json_reply({"status": "CANCELLATION_REQUESTED"}, 202))
    cancelled: dict[str, object] = {
        "status": "COMPLETED",
        "error": "Request cancelled by client",
        "error_type": "client_cancelled",
    }
    since = len(hostile.requests)
    fal.on_status("[^/]+", lambda req, sock: _after_cancel(hostile, since, req, sock, cancelled))
    again = wb("cancel", "redirected", "--no-progress")
    assert again.code == 1, again.stderr
    assert hostile.count("PUT", CANCEL) > tried
    assert "could not be cancelled" not in again.stderr
    report = _status(wb)
    assert report["counts"].get("cancelled") == 2
    assert report["uncancelled"] == [], report
    assert report["uncancelled_note"] == "", report


def _after_cancel(
    hostile: HostileProvider, since: int, req: Any, sock: Any, cancelled: dict[str, object]
) -> None:
    """IN_QUEUE until fal accepted a cancel of the request (a PUT after the ``since``-th
    request it received), then its cancelled status."""
    request_id = re.search(r"/requests/([^/]+)/status", req.path)
    rid = request_id.group(1) if request_id else ""
    later = hostile.requests[since:]
    accepted = [r for r in later if r.method == "PUT" and r.path.endswith(f"/{rid}/cancel")]
    body = cancelled if accepted else {"status": "IN_QUEUE", "queue_position": 3}
    json_reply(body)(req, sock)


@pytest.mark.timeout(150)
def test_a_running_request_is_still_cancelled_after_a_queued_ones_cancel_was_given_up(
    wb: Wb, fal: FakeFal, hostile: HostileProvider, manifest: MakeManifest, e2e_env: Path
) -> None:
    """Review: a queued request given up held the batch's running ones back for good, so the
    running one's cancel was tried once (while it was queued) and never again, and `cancel` waited
    in silence as long as fal ran it. A request given up is started whenever a slot frees (the
    running one's end included): holding the running one back saves nothing, and costs its run."""
    _queued_at_fal(wb, manifest, e2e_env)
    hostile.route("PUT", CANCEL, redirect("/moved", 301))  # fal takes no cancel
    fal.on_status("r2", json_reply({"status": "IN_PROGRESS"}))  # r2 has started, and runs on

    cancel = Background(["cancel", "redirected", "--no-progress"], dict(os.environ), e2e_env, "cancel")
    try:
        code = cancel.wait(60)  # before the fix: still waiting after 45 s, r2 asked once
    finally:
        cancel.kill()
    err = cancel.stderr()
    assert code == 1, err
    puts = {rid: hostile.count("PUT", rf".*/requests/{rid}/cancel") for rid in ("r1", "r2")}
    assert puts == {"r1": CANCEL_ATTEMPTS, "r2": CANCEL_ATTEMPTS}, puts
    lines = [line for line in err.splitlines() if "could not be cancelled at fal" in line]
    assert sorted("request r2" in line for line in lines) == [False, True], err
    for line in lines:  # the command ends: nothing follows the job, and the line says so
        assert "nothing follows the job once this command ends" in line, line
        assert "`wanbatch cancel redirected` tries again, and fetches its video" in line, line
        assert "followed, and downloaded" not in line, line
