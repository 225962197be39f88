"""The dashboard's pages, previews and actions (:mod:`web.dashboard`), through the real app.

Pages show what the store holds (escaped), filter and page the job list, serve a video only
from inside the output folder (seekable: HTTP ranges), and the buttons run the same use cases as
the CLI's ``pause``, ``resume``, ``cancel`` and ``rerun --failed-only``.
"""

from __future__ import annotations

import re
from datetime import time, timedelta
from decimal import Decimal
from html import unescape as html_text
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from jobs import store
from jobs.db import session_factory
from jobs.models import BatchState, Job, utcnow
from jobs.schedule import Schedule
from jobs.states import JobState
from tests.web.web_helpers import (
    ENDPOINTS,
    FAL_KEY,
    HTML,
    JSON,
    TOKEN,
    app_for,
    client,
    cookie_name,
    cookie_value,
    make_batch,
    mixed_batch,
    new_job,
    set_job,
    settings_for,
)
from web.dashboard import SECURITY_HEADERS, ago, usd

BEARER = {"Authorization": f"Bearer {TOKEN}"}


def _rows(html: str) -> list[tuple[str, str]]:
    """``(job id, state)`` of each row of the job table, in order."""
    return re.findall(r'<tr id="j-([0-9a-f]+)" data-state="([a-z_]+)"', html)


def test_batch_list_shows_progress_money_and_pace(sqlite_engine: Engine, output_dir: Path) -> None:
    with session_factory(sqlite_engine)() as session:
        mixed = mixed_batch(session)
        make_batch(session, "quiet", [new_job(0, endpoint=ENDPOINTS[0])])
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    page = client(app).get("/", headers=HTML)
    assert page.status_code == 200
    for header, value in SECURITY_HEADERS.items():
        assert page.headers[header] == value
    html = page.text
    assert html.index("quiet") < html.index(">mixed<")  # newest first
    assert "19</span> / 31 done" in html  # finished: 13 succeeded, 3 failed, 3 cancelled
    assert f'href="/batches/{mixed.batch.id}"' in html
    assert "$50.00" in html  # the budget cap
    assert "/min" in html  # a pace for the batch that is moving
    assert FAL_KEY not in html


def test_empty_dashboard_says_how_to_start(sqlite_engine: Engine, output_dir: Path) -> None:
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    html = client(app).get("/", headers=HTML).text
    assert "No batches yet" in html
    assert "wanbatch submit" in html


def test_batch_page_filters_pages_and_escapes(sqlite_engine: Engine, output_dir: Path) -> None:
    with session_factory(sqlite_engine)() as session:
        mixed = mixed_batch(session, "<script>alert(1)</script>", items=60)
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    local = client(app)
    base = f"/batches/{mixed.batch.id}"
    html = local.get(base, headers=HTML).text
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>" not in html  # errors are text, not markup
    rows = _rows(html)
    assert len(rows) == 50
    assert rows[0][0] == mixed.jobs[0].id
    # The summary: every state with its count, money, the commonest failure.
    assert "61 matching jobs" in html
    assert "runner_disconnected" in html
    assert "Commonest failures" in html
    assert "848×480 · 81 f · 16 fps · 5.1 s" in html
    assert "frame size 424x240" in html
    assert "refused by fal with 429" not in html  # said only when fal refused some
    with session_factory(sqlite_engine)() as session:
        set_job(session, mixed.jobs[0].id, rate_limited_submits=3)
        set_job(session, mixed.jobs[1].id, rate_limited_submits=2)
        session.commit()
    assert "5</span> submits refused by fal with 429" in local.get(base, headers=HTML).text
    assert "possibly billed" not in html  # said only when a submit's outcome stayed unknown
    with session_factory(sqlite_engine)() as session:
        set_job(session, mixed.jobs[2].id, ambiguous_usd=Decimal("0.4"))
        session.commit()
    assert "$0.40 of it possibly billed" in local.get(base, headers=HTML).text
    # Next page by keyset, then the last page, then back.
    next_link = re.search(r'href="(\?after=[^"#]+)#jobs-section" rel="next"', html)
    assert next_link is not None
    second = local.get(base + next_link.group(1).replace("&amp;", "&"), headers=HTML).text
    assert [r[0] for r in _rows(second)] == [j.id for j in mixed.jobs[50:]]
    last = local.get(base + "?page=last&per=25", headers=HTML).text
    assert [r[0] for r in _rows(last)] == [j.id for j in mixed.jobs[-25:]]
    prev_link = re.search(r'href="(\?[^"#]*before=[^"#]+)#jobs-section" rel="prev"', last)
    assert prev_link is not None
    before = local.get(base + prev_link.group(1).replace("&amp;", "&"), headers=HTML).text
    assert [r[0] for r in _rows(before)] == [j.id for j in mixed.jobs[-50:-25]]
    # Filters: state (from a chip), endpoint, both; the count says how many match.
    failed = local.get(base + "?state=failed", headers=HTML).text
    assert {s for _, s in _rows(failed)} == {"failed"}
    assert len(_rows(failed)) == 6
    assert "6 matching jobs" in failed
    both = local.get(base + f"?state=failed,cancelled&endpoint={ENDPOINTS[0]}", headers=HTML).text
    wanted = [
        j.id
        for j in mixed.jobs
        if j.endpoint == ENDPOINTS[0] and j.state in (JobState.FAILED, JobState.CANCELLED)
    ]
    assert [r[0] for r in _rows(both)] == wanted
    assert "No job matches" in local.get(base + "?state=cancelling", headers=HTML).text
    # Nonsense in the query is ignored: the first page of everything.
    odd = local.get(base + "?state=nope&per=7&after=1.x.y&endpoint=", headers=HTML)
    assert odd.status_code == 200
    assert len(_rows(odd.text)) == 50
    # The batch can be named by its name or an id prefix, as in the CLI.
    assert local.get(f"/batches/{mixed.batch.id[:8]}", headers=HTML).status_code == 200


def test_unknown_batch_and_job_are_404_pages(sqlite_engine: Engine, output_dir: Path) -> None:
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    local = client(app)
    missing = local.get("/batches/nope", headers=HTML)
    assert missing.status_code == 404
    assert "no batch" in missing.text
    assert "Traceback" not in missing.text
    assert local.get("/batches/nope", headers=JSON).json()["ok"] is False
    assert local.get("/jobs/nope/video").status_code == 404


def test_previews_are_served_from_the_output_folder_only(
    sqlite_engine: Engine, output_dir: Path, tmp_path: Path
) -> None:
    with session_factory(sqlite_engine)() as session:
        mixed = mixed_batch(session, output_dir=output_dir)
        job_id, video = next(iter(mixed.videos.items()))
        outside = tmp_path / "elsewhere.mp4"
        outside.write_bytes(b"secret")
        stray = mixed.jobs[9].id  # a pending job, given a path outside the folder
        set_job(session, stray, output_path=str(outside))
        sneaky = mixed.jobs[19].id
        set_job(session, sneaky, output_path=str(output_dir / ".." / "elsewhere.mp4"))
        session.commit()
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    local = client(app)
    html = local.get(f"/batches/{mixed.batch.id}", headers=HTML).text
    assert f'<video src="/jobs/{job_id}/video" preload="none"' in html
    whole = local.get(f"/jobs/{job_id}/video")
    assert whole.status_code == 200
    assert whole.content == video.read_bytes()
    assert whole.headers["content-type"] == "video/mp4"
    assert whole.headers["accept-ranges"] == "bytes"
    part = local.get(f"/jobs/{job_id}/video", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == video.read_bytes()[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{video.stat().st_size}"
    for job in (stray, sneaky):
        refused = local.get(f"/jobs/{job}/video")
        assert refused.status_code == 404
        assert b"secret" not in refused.content
    video.unlink()
    assert local.get(f"/jobs/{job_id}/video").status_code == 404


def test_a_moved_projects_preview_is_served_from_the_output_folder_by_its_sha256(
    sqlite_engine: Engine, output_dir: Path, tmp_path: Path
) -> None:
    """Audit r3: a video recorded under the project's old folder (moved since) is served from the
    same ``<batch folder>/<file>`` under the output folder when it holds the recorded SHA-256,
    and its new path recorded; other bytes of the same size are not served."""
    import hashlib

    with session_factory(sqlite_engine)() as session:
        mixed = mixed_batch(session, output_dir=output_dir)
        (job_id, video), (other_id, other) = list(mixed.videos.items())[:2]
        old = tmp_path / "gone" / "outputs" / video.parent.name
        data = video.read_bytes()
        for job, path in ((job_id, video), (other_id, other)):
            set_job(
                session,
                job,
                output_path=str(old / path.name),
                output_sha256=hashlib.sha256(data).hexdigest(),
                output_bytes=len(data),
            )
        session.commit()
    other.write_bytes(data[:-1] + b"!")  # the same size, other bytes
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    local = client(app)
    served = local.get(f"/jobs/{job_id}/video")
    assert served.status_code == 200
    assert served.content == data
    assert local.get(f"/jobs/{other_id}/video").status_code == 404
    with session_factory(sqlite_engine)() as session:
        assert session.scalar(select(Job.output_path).where(Job.id == job_id)) == str(video.resolve())
        assert session.scalar(select(Job.output_path).where(Job.id == other_id)) == str(old / other.name)


def test_s3_previews_redirect_to_a_presigned_url(
    sqlite_engine: Engine, output_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # signing needs no connection
    with session_factory(sqlite_engine)() as session:
        mixed = mixed_batch(session)
        job = mixed.jobs[0].id
        set_job(session, job, output_path="s3://renders/night/00000-job.mp4")
        session.commit()
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    answer = client(app).get(f"/jobs/{job}/video")
    assert answer.status_code == 307
    target = urlsplit(answer.headers["location"])
    assert target.path == "/renders/night/00000-job.mp4"
    assert "X-Amz-Signature" in parse_qs(target.query)
    assert "testing-secret" not in answer.headers["location"]


def test_an_s3_preview_that_cannot_be_signed_never_shows_the_endpoints_password(
    sqlite_engine: Engine, output_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit: botocore's "Custom endpoint `http://u:PWSECRET1@…` was not a valid URI" was the 502's
    body as it was (the settings check the endpoint only when outputs go to S3; these are local)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://u:PWSECRET1@127.0.0.1:9 ")  # a trailing space
    with session_factory(sqlite_engine)() as session:
        mixed = mixed_batch(session)
        job = mixed.jobs[0].id
        set_job(session, job, output_path="s3://renders/night/00000-job.mp4")
        session.commit()
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    answer = client(app).get(f"/jobs/{job}/video")
    assert answer.status_code == 502
    assert answer.text.startswith("cannot sign a URL for s3://renders/night/00000-job.mp4: ")
    assert "PWSECRET1" not in answer.text
    assert "testing-secret" not in answer.text


def test_an_s3_preview_redirect_carries_no_endpoint_password(
    sqlite_engine: Engine, output_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """boto3 copies the endpoint's userinfo into a presigned URL, and the preview sent it to the
    browser in its Location header; the signature covers the host, not the userinfo."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://u:PWSECRET1@127.0.0.1:9")
    with session_factory(sqlite_engine)() as session:
        mixed = mixed_batch(session)
        job = mixed.jobs[0].id
        set_job(session, job, output_path="s3://renders/night/00000-job.mp4")
        session.commit()
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    answer = client(app).get(f"/jobs/{job}/video", follow_redirects=False)
    assert answer.status_code == 307
    location = answer.headers["location"]
    assert location.startswith("http://127.0.0.1:9/renders/night/00000-job.mp4?"), location
    assert "X-Amz-Signature=" in location
    assert "PWSECRET1" not in location
    assert "@" not in location.split("?")[0]


def _state(engine: Engine, batch_id: str) -> tuple[str, bool, dict[str, int]]:
    with session_factory(engine)() as session:
        batch = store.get_batch(session, batch_id)
        return BatchState(batch.state).value, batch.paused_by_user, store.counts_by_state(session, batch_id)


def test_buttons_pause_resume_rerun_and_cancel(engine: Engine, session: Session, output_dir: Path) -> None:
    mixed = mixed_batch(session)
    session.commit()  # end the read: on SQLite a session's transaction holds the write lock
    app = app_for(engine, settings_for(engine, output_dir, token=TOKEN))
    browser = client(app)
    browser.cookies.set(cookie_name(browser), cookie_value(browser))
    act = {**HTML, "Origin": "http://127.0.0.1:8788"}
    page = f"/batches/{mixed.batch.id}"
    html = browser.get(page, headers=HTML).text
    assert {"pause", "rerun-failed", "cancel"} <= set(re.findall(r'data-action="([a-z-]+)"', html))
    assert "disabled" not in re.sub(r"<option[^>]*>", "", html.split('class="actions"')[1].split("</div>")[0])

    paused = browser.post(f"{page}/pause", headers=act)
    assert paused.status_code == 303
    assert paused.headers["location"] == page
    assert _state(engine, mixed.batch.id)[:2] == ("active", True)
    shown = browser.get(page, headers=HTML)
    assert "paused batch mixed" in shown.text  # the one-line outcome, shown once
    assert 'data-action="resume"' in shown.text
    assert 'data-action="pause"' not in shown.text
    assert "paused batch mixed" not in browser.get(page, headers=HTML).text

    resumed = browser.post(f"{page}/resume", headers={**BEARER, **JSON})
    assert resumed.status_code == 200
    assert resumed.json()["paused_by_user"] is False
    assert "resumed batch mixed" in resumed.json()["message"]

    rerun = browser.post(f"{page}/rerun-failed", headers={**BEARER, **JSON})
    assert rerun.status_code == 200, rerun.text
    body = rerun.json()
    assert body["name"] == "mixed-rerun-1"
    assert body["total"] == 6
    assert "wanbatch run mixed-rerun-1" in body["message"]  # no broker: say what sends it
    opened = browser.get(f"/batches/{body['batch']}", headers=HTML)
    assert opened.status_code == 200
    assert "mixed-rerun-1" in opened.text

    cancelled = browser.post(f"{page}/cancel", headers={**BEARER, **JSON})
    assert cancelled.status_code == 200
    state, _, counts = _state(engine, mixed.batch.id)
    assert state == "cancelled"
    assert counts["pending"] == counts["retry_wait"] == 0  # never sent: cancelled at once
    assert counts["queued"] + counts["running"] == 6  # fal holds them: cancelled there by a tick
    assert cancelled.json()["at_fal"] == 6
    assert "wanbatch cancel mixed" in cancelled.json()["message"]
    # Refusals are one line, never a traceback: HTML back to the page, JSON with a 409.
    again = browser.post(f"{page}/cancel", headers={**BEARER, **JSON})
    assert again.status_code == 409
    assert "already cancelled" in again.json()["error"]
    flash = browser.post(f"{page}/pause", headers=act)
    assert flash.status_code == 303
    assert "is cancelled" in browser.get(page, headers=HTML).text
    assert browser.post("/batches/nope/pause", headers={**BEARER, **JSON}).status_code == 404
    assert browser.post(f"{page}/explode", headers={**BEARER, **JSON}).status_code == 404


def test_rerun_failed_twice_before_the_first_ran_pays_once(
    engine: Engine, session: Session, output_dir: Path
) -> None:
    """The button pressed twice stored ``mixed-rerun-2`` with the very jobs ``mixed-rerun-1``
    was still to send: run both (workers do, on their own) and each video is paid twice."""
    mixed = mixed_batch(session)
    session.commit()
    browser = client(app_for(engine, settings_for(engine, output_dir, token=TOKEN)))
    act = {**BEARER, **JSON}
    page = f"/batches/{mixed.batch.id}"
    first = browser.post(f"{page}/rerun-failed", headers=act).json()
    assert (first["name"], first["total"]) == ("mixed-rerun-1", 6)

    again = browser.post(f"{page}/rerun-failed", headers=act)

    assert again.status_code == 409, again.text
    error = again.json()["error"]
    assert "nothing to rerun: the 6 failed or cancelled jobs of batch mixed are being rerun" in error
    assert "in mixed-rerun-1 (`wanbatch run mixed-rerun-1` goes on)" in error
    assert "--pay-again" in error
    with session_factory(engine)() as look:
        names = {b.name for b in store.list_batches(look)}
    assert names == {"mixed", "mixed-rerun-1"}  # nothing stored twice

    # Half of the rerun's jobs fail: those cover nothing any more and are rerun again; the
    # unfinished others are left out, with a warning naming the rerun and how to finish it.
    with session_factory(engine)() as change:
        repeats = list(store.jobs_of_batch(change, first["batch"]))
        for job in repeats[:3]:
            set_job(change, job.id, state=JobState.FAILED, error_type="model_error")
        change.commit()
    third = browser.post(f"{page}/rerun-failed", headers=act)
    assert third.status_code == 200, third.text
    body = third.json()
    assert (body["name"], body["total"]) == ("mixed-rerun-2", 3)
    message = " ".join(body["message"].split())
    assert "3 failed or cancelled job(s) of batch mixed left out: being rerun with the same input" in message
    assert "in mixed-rerun-1 (`wanbatch run mixed-rerun-1` goes on)" in message


def _actions_html(html: str) -> str:
    """The text of the batch page's buttons and of what is said next to them (its ``actions``
    block), on one line."""
    block = html.split('class="actions"')[1].split('<section class="card" id="progress"')[0]
    return " ".join(html_text(re.sub(r"<[^>]*>", "", block.partition(">")[2])).split())


def test_rerun_button_offers_only_what_no_rerun_covers(sqlite_engine: Engine, output_dir: Path) -> None:
    """Once every failed job is being rerun (or was rendered) by an earlier rerun, "Rerun failed"
    is refused (``nothing to rerun``): the page must not offer it but say where those jobs are,
    as ``wanbatch status`` does; when only some are covered, the button says how many it reruns."""
    with session_factory(sqlite_engine)() as session:
        mixed = mixed_batch(session)
    browser = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN)))
    browser.cookies.set(cookie_name(browser), cookie_value(browser))
    page = f"/batches/{mixed.batch.id}"
    before = browser.get(page, headers=HTML).text
    assert 'data-action="rerun-failed"' in before
    assert ">Rerun failed<" in before  # none covered: the button as it always was
    first = browser.post(f"{page}/rerun-failed", headers={**BEARER, **JSON}).json()
    assert (first["name"], first["total"]) == ("mixed-rerun-1", 6)

    # Every failed or cancelled job is being rerun in mixed-rerun-1: no button, but where they are.
    html = browser.get(page, headers=HTML).text
    assert 'data-action="rerun-failed"' not in html
    shown = _actions_html(html)
    assert "6 job(s) are being rerun in mixed-rerun-1: `wanbatch run mixed-rerun-1` goes on" in shown
    assert f'<a href="/batches/{first["batch"]}">mixed-rerun-1</a>' in html.split('class="actions"')[1]
    # Pressed anyway (a page open since before), it is still refused with the CLI's words.
    pressed = browser.post(f"{page}/rerun-failed", headers={**HTML, "Origin": "http://127.0.0.1:8788"})
    assert pressed.status_code == 303
    assert "nothing to rerun" in html_text(browser.get(page, headers=HTML).text)

    # Half of the repeats succeed, half fail: the failed ones are offered again, three of them.
    with session_factory(sqlite_engine)() as change:
        repeats = list(store.jobs_of_batch(change, first["batch"]))
        for job in repeats[:3]:
            set_job(change, job.id, state=JobState.SUCCEEDED, finished_at=utcnow())
        for job in repeats[3:]:
            set_job(change, job.id, state=JobState.FAILED, error_type="model_error", finished_at=utcnow())
        change.commit()
    html = browser.get(page, headers=HTML).text
    shown = _actions_html(html)
    assert 'data-action="rerun-failed"' in html
    assert "Rerun 3 failed" in shown
    assert (
        "3 failed or cancelled job(s) rendered since by a rerun: mixed-rerun-1 "
        "(`wanbatch export mixed-rerun-1` lists their videos)"
    ) in shown
    second = browser.post(f"{page}/rerun-failed", headers={**BEARER, **JSON}).json()
    assert (second["name"], second["total"]) == ("mixed-rerun-2", 3)  # what the button said

    # Now all six are covered: three rendered by mixed-rerun-1, three being rerun in mixed-rerun-2.
    html = browser.get(page, headers=HTML).text
    shown = _actions_html(html)
    assert 'data-action="rerun-failed"' not in html
    assert "3 failed or cancelled job(s) rendered since by a rerun: mixed-rerun-1" in shown
    assert "3 job(s) are being rerun in mixed-rerun-2: `wanbatch run mixed-rerun-2` goes on" in shown


def test_rerun_with_nothing_failed_is_refused(sqlite_engine: Engine, output_dir: Path) -> None:
    with session_factory(sqlite_engine)() as session:
        batch = make_batch(session, "clean", [new_job(0, endpoint=ENDPOINTS[0])])
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))
    answer = client(app).post(f"/batches/{batch.id}/rerun-failed", headers={**BEARER, **JSON})
    assert answer.status_code == 409
    assert "nothing to rerun" in answer.json()["error"]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("2.835"), "$2.84"),
        (Decimal("1234.5"), "$1,234.50"),
        (None, "—"),
        (Decimal("-0.005"), "-$0.01"),
    ],
)
def test_money_is_rounded_half_up_to_cents(value: Decimal | None, text: str) -> None:
    assert usd(value) == text


def test_durations_read_as_status_writes_them() -> None:
    """The dashboard wrote its own durations ("3 min 15 s ago"); ``status`` writes "3m" (its
    "last seen 3m ago", :func:`jobs.schedule.format_age`)."""
    now = utcnow()
    assert [ago(None, now)] + [ago(now - timedelta(seconds=s), now) for s in (4.6, 195, 3 * 3600 + 300)] == [
        "—",
        "just now",
        "3m ago",
        "3h05m ago",
    ]


def test_empty_scheduled_and_paused_batches_render(sqlite_engine: Engine, output_dir: Path) -> None:
    with session_factory(sqlite_engine)() as session:
        empty = make_batch(session, "empty", [])
        later = make_batch(session, "later", [new_job(0, endpoint=ENDPOINTS[0])])
        store.set_batch_schedule(
            session, later.id, Schedule(window=(time(22, 0), time(6, 0)), timezone="Europe/Berlin"), "low"
        )
        store.set_batch_state(session, later.id, BatchState.PAUSED, reason="fal refused the key (401)")
        session.commit()
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    local = client(app)
    blank = local.get(f"/batches/{empty.id}", headers=HTML)
    assert blank.status_code == 200
    assert "No job matches" in blank.text
    page = local.get(f"/batches/{later.id}", headers=HTML).text
    assert "paused: fal refused the key (401)" in page
    assert "low priority" in page
    assert '<span class="strong">none</span> — paused: fal refused' in page  # held: no forecast
    listing_page = " ".join(html_text(re.sub(r"<[^>]*>", "", local.get("/", headers=HTML).text)).split())
    assert "none — paused: fal refused the key (401)" in listing_page  # the batch page's words


def test_a_simulation_is_marked_as_such(sqlite_engine: Engine, output_dir: Path) -> None:
    with session_factory(sqlite_engine)() as session:
        rehearsal = make_batch(session, "rehearsal", [new_job(0, endpoint=ENDPOINTS[0])])
        paid = make_batch(session, "paid", [new_job(0, endpoint=ENDPOINTS[0])])
        rehearsal.simulated = True
        session.commit()
    local = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir)))
    assert ">simulated</span>" in local.get(f"/batches/{rehearsal.id}", headers=HTML).text
    assert ">simulated</span>" not in local.get(f"/batches/{paid.id}", headers=HTML).text
    assert local.get("/", headers=HTML).text.count(">simulated</span>") == 1


def test_the_rerun_button_of_a_simulation_makes_a_simulation(sqlite_engine: Engine, output_dir: Path) -> None:
    """A button must never turn a rehearsal into spending: the rerun is a simulation too, which
    no worker sends (only `wanbatch run NAME --simulate`)."""
    with session_factory(sqlite_engine)() as session:
        mixed = mixed_batch(session)
        mixed.batch.simulated = True
        session.commit()
    browser = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN)))
    rerun = browser.post(f"/batches/{mixed.batch.id}/rerun-failed", headers={**BEARER, **JSON})
    assert rerun.status_code == 200, rerun.text
    body = rerun.json()
    assert (body["name"], body["simulated"]) == ("mixed-rerun-1", True)
    assert "nothing sends it until `wanbatch run mixed-rerun-1 --simulate`" in body["message"]

    # Its requests are at a --simulate run's simulator: no worker cancels them at fal.
    cancelled = browser.post(f"/batches/{mixed.batch.id}/cancel", headers={**BEARER, **JSON}).json()
    assert cancelled["at_fal"] == 6
    assert "its simulator holds are cancelled there by the `wanbatch run --simulate`" in cancelled["message"]
    assert "`wanbatch cancel mixed --simulate`" in cancelled["message"]


def test_a_finished_batch_its_user_paused_reads_as_done(sqlite_engine: Engine, output_dir: Path) -> None:
    """No "paused by user" badge nor a Resume button once every job is finished: nothing is left
    to go on with (a pause that held back nothing)."""
    with session_factory(sqlite_engine)() as session:
        batch = make_batch(session, "finished", [new_job(i, endpoint=ENDPOINTS[0]) for i in range(2)])
        store.set_paused_by_user(session, batch.id, True)
        for job in store.jobs_of_batch(session, batch.id):
            set_job(session, job.id, state=JobState.SUCCEEDED)
        session.commit()
    browser = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir)))
    for page in ("/", f"/batches/{batch.id}"):
        html = browser.get(page, headers=HTML).text
        assert "paused by user" not in html, page
        assert 'data-action="resume"' not in html, page


def test_batch_page_says_when_the_deadline_comes_before_the_forecast(
    sqlite_engine: Engine, output_dir: Path
) -> None:
    from datetime import timedelta

    from jobs.models import utcnow

    with session_factory(sqlite_engine)() as session:
        mixed = mixed_batch(session, "late", items=30)  # a pace, and plenty left to do
        store.set_batch_schedule(
            session, mixed.batch.id, Schedule(deadline=utcnow() + timedelta(seconds=90)), "normal"
        )
        session.commit()
    html = (
        client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir)))
        .get(f"/batches/{mixed.batch.id}", headers=HTML)
        .text
    )
    assert "at this pace, but" in html
    assert "the deadline comes first (in 1m" in html
    assert "what is not sent by then, or still queued at fal, is cancelled" in html


def test_jobs_cancelled_before_being_sent_cost_nothing_not_an_estimate(
    engine: Engine, session: Session, output_dir: Path
) -> None:
    batch = make_batch(session, "unsent", [new_job(i, endpoint=ENDPOINTS[0], usd="0.20") for i in range(3)])
    never, resent, failed = session.scalars(
        select(Job).where(Job.batch_id == batch.id).order_by(Job.item_index)
    ).all()
    ids = (never.id, resent.id, failed.id)
    # One waits to retry after an attempt fal billed; one failed unsent with no cost recorded.
    billed = {"attempts": 1, "submitted_at": utcnow(), "actual_usd": Decimal("0.05")}
    set_job(session, resent.id, state=JobState.RETRY_WAIT, **billed)
    session.commit()
    fence = store.Fence(failed.id, JobState.PENDING, failed.version, None)
    assert store.fail_job(session, fence, error="bad input", error_type="validation")
    session.commit()
    app = app_for(engine, settings_for(engine, output_dir, token=TOKEN))
    browser = client(app)
    assert browser.post(f"/batches/{batch.id}/cancel", headers={**BEARER, **JSON}).status_code == 200

    session.expire_all()
    got = {j.id: (j.state, j.actual_usd) for j in session.scalars(select(Job).where(Job.id.in_(ids)))}
    assert got[never.id] == (JobState.CANCELLED, Decimal(0))  # never sent: billed nothing, for good
    assert got[resent.id] == (JobState.CANCELLED, Decimal("0.05"))  # what its earlier attempt cost
    assert got[failed.id] == (JobState.FAILED, Decimal(0))
    html = browser.get(f"/batches/{batch.id}", headers={**HTML, **BEARER}).text
    cells = re.findall(r'<td class="num">([^<]*(?:<span[^>]*>[^<]*</span>)?)</td>\s*<td class="small">', html)
    assert len(cells) == 3, html
    assert not any("~" in c for c in cells), cells
    assert store.batch_cost(session, batch.id).actual_usd == Decimal("0.05")


def test_a_refused_action_logs_its_reference_on_one_line(
    sqlite_engine: Engine, output_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reference comes from the URL: a line break in it must not forge a second log line."""
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))
    with caplog.at_level("INFO", logger="web.dashboard"):
        answer = client(app).post("/batches/nope%0A2026-12-03 INFO forged/pause", headers={**BEARER, **JSON})
    assert answer.status_code == 404
    (line,) = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert "\n" not in line
    assert "nope\\n2026-12-03 INFO forged" in line


def test_commonest_failures_count_jobs_sent_to_fal_apart_from_jobs_never_sent(
    sqlite_engine: Engine, output_dir: Path
) -> None:
    """The deadline cancels requests in fal's queue and jobs never sent with the same
    ``error_type``: two rows, each saying which it is, with its own count and example (one row
    said "cancelled in fal's queue" of them all)."""
    with session_factory(sqlite_engine)() as session:
        batch = make_batch(session, "night", [new_job(i, endpoint=ENDPOINTS[0]) for i in range(5)])
        for n, job in enumerate(store.jobs_of_batch(session, batch.id)):
            sent = {"attempts": 1, "submitted_at": utcnow()} if n < 3 else {}
            error = (
                "cancelled in fal's queue at the batch's deadline"
                if n < 3
                else "not sent before the deadline"
            )
            set_job(session, job.id, state=JobState.CANCELLED, error=error, error_type="deadline", **sent)
        session.commit()
    html = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))).get(
        f"/batches/{batch.id}", headers=HTML
    )
    table = html.text.split("Commonest failures", 1)[1].split("</table>", 1)[0]
    rows = [" ".join(html_text(re.sub(r"<[^>]+>", " ", row)).split()) for row in table.split("<tr>")[2:]]
    assert rows == [
        "cancelled deadline · sent to fal cancelled in fal's queue at the batch's deadline 3",
        "cancelled deadline · never sent not sent before the deadline 2",
    ], rows


def _cost_cell(html: str, job_id: str) -> str:
    """The cost cell of a job's row (the ``num`` cell before the media check)."""
    row = re.search(rf'<tr id="j-{job_id}".*?</tr>', html, re.S)
    assert row is not None, html
    cell = re.search(r'<td class="num">((?:(?!<td).)*)</td>\s*<td class="small">', row.group(0), re.S)
    assert cell is not None, row.group(0)
    return cell.group(1)


def test_a_job_whose_submit_answer_was_lost_shows_what_it_may_have_cost(
    engine: Engine, session: Session, output_dir: Path
) -> None:
    """$0.00 is only for a job never sent: a failed job fal may have billed says how much, as
    the batch's "possibly billed" does, so the rows add up to the header."""
    batch = make_batch(session, "lost", [new_job(i, endpoint=ENDPOINTS[0], usd="0.20") for i in range(4)])
    lost, unknown, resent, never = session.scalars(
        select(Job).where(Job.batch_id == batch.id).order_by(Job.item_index)
    ).all()
    sent = {"attempts": 1, "sent_at": utcnow(), "submitted_at": utcnow()}
    set_job(session, lost.id, state=JobState.SUBMIT_UNKNOWN, **sent)
    # Sent, ended with no cost recorded (and no unknown submit behind it): not known, not $0.00.
    set_job(session, unknown.id, state=JobState.FAILED, **sent)
    # Resent after a lost answer, then billed: both sums, apart.
    set_job(
        session,
        resent.id,
        state=JobState.SUCCEEDED,
        attempts=2,
        submitted_at=utcnow(),
        actual_usd=Decimal("0.20"),
        ambiguous_usd=Decimal("0.20"),
    )
    session.commit()
    set_job(session, never.id, state=JobState.CANCELLED, actual_usd=Decimal(0))  # never sent
    session.commit()
    fence = store.Fence(lost.id, JobState.SUBMIT_UNKNOWN, lost.version, None)
    assert store.fail_job(session, fence, error="submission outcome unknown", error_type="submit_unknown")
    session.commit()
    browser = client(app_for(engine, settings_for(engine, output_dir, token=TOKEN)))

    html = browser.get(f"/batches/{batch.id}", headers={**HTML, **BEARER}).text
    assert "$0.40 of it possibly billed" in html
    cell = _cost_cell(html, lost.id)
    assert "$0.00" not in cell
    assert "≤ $0.20 possibly billed" in cell
    cell = _cost_cell(html, unknown.id)
    assert "$0.00" not in cell
    assert "unknown" in cell
    cell = _cost_cell(html, resent.id)
    assert cell.startswith("$0.20")
    assert "+ ≤ $0.20 possibly billed" in cell
    assert _cost_cell(html, never.id) == "$0.00"  # cancelled before it was ever sent
    session.expire_all()
    failed = session.get(Job, lost.id)
    assert failed is not None
    assert (failed.actual_usd, failed.ambiguous_usd) == (None, Decimal("0.20"))  # as the audit found it


def test_a_downloading_job_shows_what_the_totals_count_it_at(sqlite_engine: Engine, output_dir: Path) -> None:
    """A job fal just finished, after an earlier attempt was billed, counts the earlier bill plus
    the estimate of the attempt being downloaded (``store.finished_usd``): its cost cell says
    that sum, as the batch's spent money does, not the earlier bill alone."""
    with session_factory(sqlite_engine)() as session:
        batch = make_batch(session, "fetching", [new_job(0, endpoint=ENDPOINTS[0], usd="0.41")])
        job = session.scalars(select(Job).where(Job.batch_id == batch.id)).one()
        set_job(
            session,
            job.id,
            state=JobState.DOWNLOADING,
            attempts=2,
            sent_at=utcnow(),
            submitted_at=utcnow(),
            actual_usd=Decimal("0.20"),
        )
        session.commit()
        assert store.batch_spent_usd(session, batch.id) == Decimal("0.61")
    browser = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir)))
    html = browser.get(f"/batches/{batch.id}", headers=HTML).text
    spend = re.search(r"<h3>Spend</h3>\s*<div class=\"value\">([^<]*)</div>", html)
    assert spend is not None, html
    assert spend.group(1) == "$0.61"
    cell = _cost_cell(html, job.id)
    assert "$0.61" in cell, cell
    assert "$0.20" not in cell, cell
    assert "$0.41" not in cell, cell
    assert "bill is written" in cell


def test_a_paused_batch_past_its_deadline_reads_as_status_says(
    sqlite_engine: Engine, output_dir: Path
) -> None:
    """A user's pause holds nothing back once the deadline has passed (resuming sends nothing):
    the page says the deadline, as `status` does (phase ``deadline``), and what processing the
    batch does instead of offering Resume."""
    from datetime import timedelta

    from jobs import batches, listing

    with session_factory(sqlite_engine)() as session:
        batch = make_batch(session, "overdue", [new_job(i, endpoint=ENDPOINTS[0]) for i in range(3)])
        overdue = Schedule(deadline=utcnow() - timedelta(hours=1))
        store.set_batch_schedule(session, batch.id, overdue, "normal")
        store.set_paused_by_user(session, batch.id, True)
        session.commit()
        report = batches.batch_report(session, batch.id)
        assert (report["phase"], report["phase_reason"]) == ("deadline", "past deadline: 0 cancelled")
        stored = store.get_batch(session, batch.id)
        assert listing.held_reason(stored, now=utcnow()) == "past deadline"
    browser = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN)))
    html = browser.get(f"/batches/{batch.id}", headers={**BEARER, **HTML}).text
    text = " ".join(html_text(re.sub(r"<[^>]*>", "", html)).split())
    assert "none — past deadline: 0 cancelled: nothing more is sent" in text
    assert "paused by user" not in text.split("ETA", 1)[1].split("In flight", 1)[0]
    assert 'data-action="resume"' not in html
    assert 'data-action="pause"' not in html
    assert (
        "Its deadline has passed: nothing more is sent, so resuming sends nothing. "
        "`wanbatch run overdue` cancels its 3 unsent job(s) (deadline)." in _actions_html(html)
    )
    assert 'data-action="cancel"' in html


def _badges(html: str, where: str) -> list[str]:
    """The badges' words of the batch at ``where`` (its row of the list, or the page's head)."""
    start = html.index(where)
    meta = re.search(r'<(?:div class="meta"|p class="sub")>(.*?)</(?:div|p)>', html[start:], re.S)
    assert meta is not None, html[start : start + 2000]
    found = re.findall(r'<span class="badge[^"]*"[^>]*>(.*?)</span>', meta.group(1))
    return [html_text(badge).strip() for badge in found]


@pytest.mark.parametrize("paused", ["by its user", "by fal's refusal"])
def test_a_paused_batch_past_its_deadline_has_one_state_on_the_list_and_its_page(
    sqlite_engine: Engine, output_dir: Path, paused: str
) -> None:
    """A batch paused (by its user, or by fal's refusal of the key) and past its deadline: the
    list and the page showed a "paused" badge beside "past deadline", two states where `status`
    gives one (phase ``deadline``: resuming or fixing the key sends nothing any more). They give
    the deadline alone; the pause is said in the badge's tooltip, as `status` qualifies it."""
    from jobs import batches

    with session_factory(sqlite_engine)() as session:
        batch = make_batch(session, "overdue", [new_job(i, endpoint=ENDPOINTS[0]) for i in range(3)])
        overdue = Schedule(deadline=utcnow() - timedelta(hours=1))
        store.set_batch_schedule(session, batch.id, overdue, "normal")
        if paused == "by its user":
            store.set_paused_by_user(session, batch.id, True)
        else:
            store.set_batch_state(session, batch.id, BatchState.PAUSED, reason="fal refused the key (401)")
        session.commit()
        report = batches.batch_report(session, batch.id)
    assert report["phase"] == "deadline"  # status: the one state
    browser = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir)))
    listed = browser.get("/", headers=HTML).text
    page = browser.get(f"/batches/{batch.id}", headers=HTML).text

    said = ["past deadline: 0 cancelled"]
    assert _badges(listed, f'id="b-{batch.id}"') == said
    assert _badges(page, "<h1>") == said
    why = "paused by user, but resuming sends nothing" if paused == "by its user" else "paused: fal refused"
    tooltip = f'title="schedule · {why}'  # in the deadline's tooltip, not a state of its own
    assert tooltip in listed
    assert tooltip in page


def test_a_batch_its_user_paused_still_shows_its_pause(sqlite_engine: Engine, output_dir: Path) -> None:
    """Before its deadline a user's pause is the batch's state (`status`: phase ``paused``)."""
    with session_factory(sqlite_engine)() as session:
        batch = make_batch(session, "held", [new_job(i, endpoint=ENDPOINTS[0]) for i in range(2)])
        ahead = Schedule(deadline=utcnow() + timedelta(hours=1))
        store.set_batch_schedule(session, batch.id, ahead, "normal")
        store.set_paused_by_user(session, batch.id, True)
        session.commit()
    browser = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir)))
    assert _badges(browser.get("/", headers=HTML).text, f'id="b-{batch.id}"') == ["paused by user"]
    assert _badges(browser.get(f"/batches/{batch.id}", headers=HTML).text, "<h1>") == ["paused by user"]
