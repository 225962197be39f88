"""``wanbatch status`` with no batch reads every batch in a fixed number of queries.

The gap (scale audit): the all-batches table ran the whole one-batch report for each batch,
about ten queries per batch: 750 scheduled overnight batches took seconds. It now reads each
figure for every batch at once (:class:`jobs.batches._AllBatches`), and the reports are the
very ones ``status BATCH`` gives, text and ``--json``. SQLite and PostgreSQL.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, event, text, update

from jobs import batches, db, listing, store
from jobs.batches import batch_report
from jobs.cap_holds import CapCheck
from jobs.models import Batch, BatchState, Job, utcnow
from jobs.schedule import Schedule
from jobs.settings import DatabaseSettings, get_settings
from jobs.states import JobState as S
from tests.in_process import run_main
from tests.step_runtime import add_batch

T2V = "fal-ai/wan-22"
I2V = "fal-ai/wan-i2v"
KEY_ID = "status-all-key"
CAPS = CapCheck(
    api_key_id=KEY_ID, max_outstanding=2, download_backlog=100, per_endpoint={T2V: 1}, distributed=False
)


def _set(engine: Engine, job_ids: list[str], **values: Any) -> None:
    with db.session_scope(engine) as session:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(**values))


def _batch(engine: Engine, batch_id: str, **values: Any) -> None:
    with db.session_scope(engine) as session:
        session.execute(update(Batch).where(Batch.id == batch_id).values(**values))


def _jobs(engine: Engine, batch_id: str) -> list[str]:
    from tests.step_runtime import job_ids

    return job_ids(engine, batch_id)


def _populate(engine: Engine, tag: str, now: datetime) -> None:
    """One batch of each kind ``status`` tells apart, names suffixed with ``tag``."""
    ago = now - timedelta(minutes=3)
    jobs = [(T2V, {"prompt": f"{tag}-{i}", "seed": i}) for i in range(4)]
    # finished: every job succeeded, billed
    done = add_batch(engine, f"done-{tag}", jobs)
    _set(
        engine,
        _jobs(engine, done),
        state=S.SUCCEEDED,
        submitted_at=ago,
        finished_at=ago,
        actual_usd=Decimal("0.3"),
    )
    # failed (with a rerun that rendered one of them, and one still rendering another)
    failed = add_batch(engine, f"failed-{tag}", jobs)
    ids = _jobs(engine, failed)
    _set(engine, ids[:2], state=S.FAILED, submitted_at=ago, finished_at=ago, error="boom", error_type="model")
    _set(engine, ids[2:3], state=S.CANCELLED, error="over budget", error_type="budget")
    _set(engine, ids[3:], state=S.SUCCEEDED, submitted_at=ago, finished_at=ago)
    rerun = add_batch(engine, f"failed-{tag}-rerun-1", [(T2V, {"prompt": f"{tag}-0", "seed": 0})])
    _batch(engine, rerun, parent_batch_id=failed)
    _set(engine, _jobs(engine, rerun), rerun_of=ids[0], state=S.SUCCEEDED, submitted_at=ago, finished_at=now)
    going = add_batch(engine, f"failed-{tag}-rerun-2", [(T2V, {"prompt": f"{tag}-2", "seed": 2})])
    _batch(engine, going, parent_batch_id=failed)
    _set(engine, _jobs(engine, going), rerun_of=ids[2])
    # cancelled by its user
    cancelled = add_batch(engine, f"cancelled-{tag}", jobs)
    _batch(engine, cancelled, state=BatchState.CANCELLED)
    _set(
        engine, _jobs(engine, cancelled)[1:], state=S.CANCELLED, error="cancelled by user", error_type="user"
    )
    # paused by its user, one job at fal
    paused = add_batch(engine, f"paused-{tag}", jobs)
    _batch(engine, paused, paused_by_user=True)
    _set(engine, _jobs(engine, paused)[:1], state=S.QUEUED, submitted_at=ago, api_key_id=KEY_ID)
    # waiting for its window (closed now), low priority
    waiting = add_batch(engine, f"window-{tag}", jobs)
    opens = (now + timedelta(hours=2)).hour
    window = Schedule.from_json({"window": f"{opens:02d}:00-{(opens + 1) % 24:02d}:00", "timezone": "UTC"})
    with db.session_scope(engine) as session:
        store.set_batch_schedule(session, waiting, window, "low")
    # past its deadline: two jobs cancelled by it
    late = add_batch(engine, f"deadline-{tag}", jobs)
    with db.session_scope(engine) as session:
        store.set_batch_schedule(
            session, late, Schedule.from_json({"deadline": (now - timedelta(hours=1)).isoformat()}), "normal"
        )
    _set(engine, _jobs(engine, late)[:2], state=S.CANCELLED, error="deadline passed", error_type="deadline")
    # running: jobs at fal (filling the outstanding cap), a recent heartbeat, a hold on fal,
    # low priority with a request waiting long
    running = add_batch(engine, f"running-{tag}", [*jobs, (I2V, {"prompt": f"{tag}-x"})])
    ids = _jobs(engine, running)
    _set(engine, ids[:2], state=S.QUEUED, submitted_at=now - timedelta(minutes=20), api_key_id=KEY_ID)
    _set(engine, ids[2:3], state=S.SUCCEEDED, submitted_at=ago, finished_at=now - timedelta(minutes=1))
    _set(engine, ids[3:4], state=S.DOWNLOADING, submitted_at=ago, api_key_id=KEY_ID)
    with db.session_scope(engine) as session:
        store.set_batch_schedule(session, running, None, "low")
        store.record_heartbeat(session, f"otherhost:{tag}:", [running], now - timedelta(seconds=5))
        store.hold_fal(
            session,
            f"otherhost:4242:{tag}",
            [running],
            since=now - timedelta(seconds=90),
            next_probe_at=now + timedelta(seconds=7),
            pause_seconds=8.0,
            error="could not connect",
            now=now,
        )
    # active with pending jobs the caps hold back (no process works on it)
    add_batch(engine, f"held-{tag}", jobs)
    # a simulation, half done
    sim = add_batch(engine, f"sim-{tag}", jobs, simulated=True)
    _set(engine, _jobs(engine, sim)[:2], state=S.SUCCEEDED, submitted_at=ago, finished_at=ago)
    # paused by fal's refusal
    refused = add_batch(engine, f"refused-{tag}", jobs)
    _batch(engine, refused, state=BatchState.PAUSED, pause_reason="fal refused the key (403)")
    # no jobs at all
    add_batch(engine, f"empty-{tag}", [])


def _old_status(settings: DatabaseSettings, caps: CapCheck | None = None, **kw: Any) -> list[Any]:
    """``status`` with no batch as it was: the one-batch report of every batch."""
    with db.session_scope(db.open_engine(settings)) as session:
        ids = [b.id for b in store.list_batches(session)]
        return [batch_report(session, i, caps=caps, **kw) for i in ids]


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> datetime:
    """One ``now`` for every report (``status`` reads the clock per report otherwise)."""
    now = utcnow()
    monkeypatch.setattr(batches, "utcnow", lambda: now)
    return now


def _settings(engine: Engine) -> DatabaseSettings:
    return DatabaseSettings(database_url=engine.url.render_as_string(hide_password=False))


def test_the_all_batches_reports_are_the_one_batch_reports(engine: Engine, frozen: datetime) -> None:
    _populate(engine, "a", frozen)
    _populate(engine, "b", frozen)
    settings = _settings(engine)
    for caps in (CAPS, None):
        new = batches.status(None, settings, caps, broker_url="redis://broker")
        assert len(new) == 26
        assert json.dumps(new) == json.dumps(_old_status(settings, caps, broker_url="redis://broker"))
        singles = [batches.status(r["batch"], settings, caps, broker_url="redis://broker")[0] for r in new]
        assert json.dumps(new) == json.dumps(singles)
        # A fixed number of queries (was about ten per batch: 99 for 13 batches); the 17th reads
        # the recent finishes that give each batch's pace since its work last resumed.
        assert (
            _statements(db.open_engine(settings), functools.partial(batches.status, None, settings, caps))
            <= 17
        )
    # The kinds the fixture means to cover are there.
    reports = {r["name"]: r for r in new}
    assert reports["failed-a"]["rerun_rendered"]["jobs"] == 1
    assert reports["failed-a"]["rerun_pending"]["jobs"] == 1
    assert reports["failed-a"]["failures"]
    assert reports["deadline-a"]["schedule_state"] == "past deadline: 2 cancelled"
    assert reports["window-a"]["phase"] == "waiting"
    assert reports["running-a"]["fal_unreachable"]
    assert reports["running-a"]["processing"]
    assert reports["running-a"]["low_priority_waiting"] == 2
    assert reports["paused-a"]["phase_reason"] == "by its user"
    held = batches.status(None, settings, CAPS)
    assert "outstanding cap" in str({r["name"]: r["phase_reason"] for r in held}["held-a"])


def test_status_text_and_json_are_as_before(
    engine: Engine, frozen: datetime, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _populate(engine, "a", frozen)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("WANBATCH_MAX_OUTSTANDING", "2")
    monkeypatch.setenv("FAL_KEY", "status-all-test-key")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("WANBATCH_BROKER_URL", raising=False)

    def outputs() -> tuple[str, str]:
        got = []
        for args in (["status"], ["status", "--json"]):
            get_settings.cache_clear()
            capsys.readouterr()
            assert run_main(args, monkeypatch) == 0
            got.append(capsys.readouterr().out)
        get_settings.cache_clear()
        return got[0], got[1]

    status_engine = db.open_engine(
        DatabaseSettings(database_url=engine.url.render_as_string(hide_password=False))
    )
    read: list[tuple[str, str]] = []
    assert _statements(status_engine, lambda: read.append(outputs())) <= 2 * 20  # 13 batches
    text, as_json = read[0]
    fixed = batches.status

    def old(
        ref: str | None, settings: DatabaseSettings, caps: CapCheck | None = None, **kw: Any
    ) -> list[Any]:
        return fixed(ref, settings, caps, **kw) if ref is not None else _old_status(settings, caps, **kw)

    monkeypatch.setattr(batches, "status", old)
    assert outputs() == (text, as_json)
    assert "held-a" in text
    assert len(json.loads(as_json)["batches"]) == 13


def _statements(engine: Engine, run: Callable[[], object]) -> int:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    engines = {engine, db.writer_engine(engine)}
    for one in engines:
        event.listen(one, "before_cursor_execute", record)
    try:
        run()
    finally:
        for one in engines:
            event.remove(one, "before_cursor_execute", record)
    return len(seen)


def test_status_makes_as_many_queries_for_many_batches_as_for_few(engine: Engine, frozen: datetime) -> None:
    settings = _settings(engine)
    status_engine = db.open_engine(settings)  # the engine `status` opens (cached per URL)
    _populate(engine, "first", frozen)
    few = _statements(status_engine, lambda: batches.status(None, settings, CAPS))
    for i in range(5):
        _populate(engine, f"more{i}", frozen)
    many = _statements(status_engine, lambda: batches.status(None, settings, CAPS))
    assert len(batches.status(None, settings, CAPS)) == 78
    assert many == few, (few, many)


def test_the_cap_holders_are_summed_once_for_every_batch_not_once_per_batch(
    engine: Engine, frozen: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gap (scale audit): with the outstanding cap full, ``status`` with no batch names for
    every active batch the batches whose requests fill it, and summed every holder again for
    each of them: quadratic (2 s of 500 active batches' 8 s). The holders of a scope all the
    batches share are now summed once; the notes are the one-batch reports' still."""
    from jobs import cap_holds

    summed: list[int] = []
    per_batch = cap_holds._per_batch

    def counting(rows: Any) -> Any:
        rows = list(rows)
        summed.append(len(rows))
        return per_batch(rows)

    monkeypatch.setattr(cap_holds, "_per_batch", counting)
    settings = _settings(engine)
    active = 24
    for n in range(active):  # each with one request at fal (the cap is 2) and a job to send
        batch_id = add_batch(engine, f"held-{n:02d}", [(T2V, {"prompt": f"p{n}-{i}"}) for i in range(2)])
        _set(engine, _jobs(engine, batch_id)[:1], state=S.RUNNING, submitted_at=frozen, api_key_id=KEY_ID)
    reports = batches.status(None, settings, CAPS)
    assert all("the outstanding cap is full (24 of 2" in str(r["phase_reason"]) for r in reports)
    # Each cap's holders once (the account's, and the endpoint's), and each batch's own
    # downloads (none): was every holder for every batch, 2 × 24 × 24 rows.
    assert sum(summed) <= 2 * active, summed
    assert json.dumps(reports) == json.dumps(_old_status(settings, CAPS))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_totals_of_every_batch_are_read_from_an_index_alone(engine: Engine, frozen: datetime) -> None:
    """The gap (scale audit): the counts and money of every batch (``status`` with no batch, the
    dashboard's batch list) read every job's row, input and results included: 2.4 s at 400,000
    jobs. On PostgreSQL the index on ``(batch_id, state, …)`` now holds every column they read
    (migration 0052), so the planner can answer them from the index alone (an index-only scan,
    which it chooses on a big table: ``bench/status_all.py``; on a few rows it reads anything)."""
    _populate(engine, "a", frozen)
    with db.read_scope(engine) as session:
        ids = [b.id for b in store.list_batches(session)]
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        with db.read_scope(engine) as session:
            totals = listing.totals_of_batches(session, ids, now=frozen)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert sum(t.total for t in totals.values()) == 43
    grouped = [s for s in seen if "GROUP BY jobs.batch_id, jobs.state" in s]
    assert len(grouped) == 1
    read = set(re.findall(r"\bjobs\.(\w+)", grouped[0]))
    assert {"batch_id", "state", "est_usd", "actual_usd", "finished_at"} <= read
    with engine.connect() as conn:
        covered = set(
            conn.execute(
                text(
                    "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
                    "ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) "
                    "WHERE i.indexrelid = 'ix_jobs_batch_id_state_order'::regclass"
                )
            ).scalars()
        )
    assert read <= covered, sorted(read - covered)
