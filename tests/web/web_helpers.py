"""Shared pieces of the dashboard tests: a batch in every state, apps and clients as seen from
loopback or from another host."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

from pydantic import SecretStr
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.testclient import TestClient

from jobs import db, store
from jobs.models import Batch, Job, utcnow
from jobs.settings import Settings
from jobs.states import JobState
from web.app import create_app
from web.auth import TokenGate, new_session_id, session_cookie, session_key, session_value

ENDPOINTS = ("fal-ai/wan-i2v", "fal-ai/wan-22")
TOKEN = "dash-token-7c41e0f2b9"  # distinctive, so a leak is found by a plain substring search
FAL_KEY = "fal-key-web-3d9a0c55e1"
LOOPBACK = ("127.0.0.1", 50123)
REMOTE = ("203.0.113.7", 50123)  # TEST-NET-3: never a real client

#: What job ``i`` of :func:`mixed_batch` becomes, by ``i % 10``.
PLAN: dict[int, JobState] = {
    0: JobState.SUCCEEDED,
    1: JobState.SUCCEEDED,
    2: JobState.SUCCEEDED,
    3: JobState.SUCCEEDED,
    4: JobState.FAILED,
    5: JobState.CANCELLED,
    6: JobState.RUNNING,
    7: JobState.QUEUED,
    8: JobState.RETRY_WAIT,
    9: JobState.PENDING,
}


def new_job(i: int, *, endpoint: str, variant: int = 0, usd: str = "0.40") -> store.NewJob:
    return store.NewJob(
        key=f"{i:032x}{variant:032x}",
        item_index=i,
        variant=variant,
        endpoint=endpoint,
        input={"prompt": f"a paper boat, take {i}", "resolution": "480p"},
        est_billing_units=Decimal(1),
        est_usd=Decimal(usd),
    )


def make_batch(session: Session, name: str, specs: list[store.NewJob], **kw: Any) -> Batch:
    batch, created = store.get_or_create_batch(
        session,
        name=name,
        manifest_path="/m.yaml",
        manifest_sha256="0" * 64,
        budget_max_usd=kw.get("budget"),
    )
    assert created
    store.add_jobs(session, batch.id, specs)
    session.commit()
    return batch


def set_job(session: Session, job_id: str, **values: Any) -> None:
    """Put a job where a run would have left it (behind wanbatch's back, as a worker records)."""
    session.execute(update(Job).where(Job.id == job_id).values(**values))


@dataclass
class Mixed:
    """A batch with jobs in every interesting state, and what it should add up to."""

    batch: Batch
    jobs: list[Job]
    videos: dict[str, Path]


def mixed_batch(
    session: Session,
    name: str = "mixed",
    *,
    items: int = 30,
    output_dir: Path | None = None,
    processing: bool = True,
) -> Mixed:
    """``items`` items over two endpoints (item 3 has a second variant), spread over the states of
    :data:`PLAN`: succeeded ones with a cost, seed, media and (with ``output_dir``) a video
    file; failed ones with errors; a budget cancel; jobs at fal; an over-estimate cost (waste),
    a media mismatch and a possible duplicate charge. ``processing``: a process (a ``run``)
    says it works on the batch now, as while one runs."""
    specs = [new_job(i, endpoint=ENDPOINTS[i % 2]) for i in range(items)]
    specs.append(new_job(3, endpoint=ENDPOINTS[1], variant=1))
    batch = make_batch(session, name, specs, budget=Decimal("50"))
    jobs = list(store.jobs_of_batch(session, batch.id))
    now = utcnow()
    videos: dict[str, Path] = {}
    for n, job in enumerate(jobs):
        state = PLAN[job.item_index % 10]
        values: dict[str, Any] = {"state": state}
        if state not in (JobState.PENDING,):
            values |= {"attempts": 1, "submitted_at": now - timedelta(minutes=5 + n % 3)}
        if state == JobState.SUCCEEDED:
            values |= {
                "seed": 1000 + job.item_index,
                "actual_usd": Decimal("0.45") if job.item_index == 1 else Decimal("0.40"),
                "media": {
                    "width": 848,
                    "height": 480,
                    "frames": 81,
                    "fps": 16.0,
                    "duration_s": 5.0625,
                    "codec": "h264",
                },
                "finished_at": now - timedelta(minutes=1),
            }
            if output_dir is not None:
                video = output_dir / name / f"{job.item_index:05d}-{job.variant}-{job.id[:8]}.mp4"
                video.parent.mkdir(parents=True, exist_ok=True)
                video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64)
                values["output_path"] = str(video)
                videos[job.id] = video
        if job.item_index == 2:
            values["media_mismatch"] = "frame size 424x240, asked 848x480"
        if state == JobState.FAILED:
            values |= {
                "error": f"the model runner disconnected <b>{job.item_index}</b>",
                "error_type": "runner_disconnected",
                "actual_usd": Decimal("0.10"),
                "finished_at": now - timedelta(minutes=2),
            }
        if state == JobState.CANCELLED:
            values |= {"error": "not sent: the budget is reached", "error_type": "budget", "finished_at": now}
        if state == JobState.QUEUED:
            values["possible_duplicate_charges"] = 1
        set_job(session, job.id, **values)
    if processing:
        store.record_heartbeat(session, f"run-of-{name}:1:", [batch.id], now)
    session.commit()
    return Mixed(batch=batch, jobs=list(store.jobs_of_batch(session, batch.id)), videos=videos)


def settings_for(engine: Engine, output_dir: Path, *, token: str | None = None, **extra: Any) -> Settings:
    return Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        output_dir=output_dir,
        serve_token=SecretStr(token) if token else None,
        FAL_KEY=SecretStr(FAL_KEY),
        **extra,
    )


def app_for(engine: Engine, settings: Settings) -> Starlette:
    db.open_engine(settings)  # the use cases the actions call open the URL's own engine
    return create_app(settings, engine=engine)


def client(app: Starlette, *, peer: tuple[str, int] = LOOPBACK, host: str = "127.0.0.1:8788") -> TestClient:
    """A client as seen from ``peer``, sending ``Host: host``; never follows redirects."""
    return TestClient(app, client=peer, base_url=f"http://{host}", follow_redirects=False)


def cookie_name(app: Starlette | TestClient, token: str = TOKEN) -> str:
    """The name ``app``'s dashboard gives the login cookie of ``token`` (keyed by its database's
    secret, :func:`web.auth.session_cookie`). For its own token the gate learns it now, as a
    login would have made it, so later requests need not read the secret."""
    starlette = cast(Starlette, app.app) if isinstance(app, TestClient) else app
    gate = starlette.state.gate
    assert isinstance(gate, TokenGate)
    assert gate.secret is not None
    if token == gate.token:
        name = gate.cookie_name_now()
        assert name is not None
        return name
    return session_cookie(token, gate.secret())


def cookie_value(app: Starlette | TestClient, token: str = TOKEN) -> str:
    """A new login's value of the cookie ``app``'s dashboard gives for ``token``: its own random
    id, issued now, signed with a key of the token and its database's secret
    (:func:`web.auth.session_value`). For another token than the gate's, a value the dashboard
    of that token would give (refused by this one)."""
    starlette = cast(Starlette, app.app) if isinstance(app, TestClient) else app
    gate = starlette.state.gate
    assert isinstance(gate, TokenGate)
    assert gate.secret is not None
    if token == gate.token:
        found = gate.new_session_now()
        assert found is not None
        return found[1]
    key = session_key(token, gate.secret())
    return session_value(key, issued=int(time.time()), session_id=new_session_id())


def logged_in(browser: TestClient, token: str = TOKEN) -> TestClient:
    """``browser`` holding the login form's cookie for ``token``: with a token configured, every
    client (loopback too) needs it to read."""
    browser.cookies.set(cookie_name(browser, token), cookie_value(browser, token))
    return browser


HTML = {"Accept": "text/html,application/xhtml+xml"}
JSON = {"Accept": "application/json"}
