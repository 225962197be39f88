"""Which SQLite commits are synced, and when: only before something outside the database depends
on them (:func:`jobs.db.covered`, :func:`jobs.db.sync_commits`).

SQLite's write-ahead log is appended in order, so the sync of a later commit makes every earlier
one durable (https://www.sqlite.org/wal.html). A commit is synced when it commits unless every
row it changed was classified as covered: a POST to fal waits for its ``record_send`` to be on
disk, the request id fal gave back is synced at once, the statuses heard and the claims of a
dispatch round are not, and ``run`` leaves every commit on disk before it reports.

A commit counts as synced when SQLite synced it (``PRAGMA synchronous`` = FULL at its commit,
what every commit was before) or when a sync of the log began after it and ended before the
moment that matters; syncs are seen where wanbatch runs them (:data:`jobs.db.sync_file`).
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text

from falsim import SimulatorOptions, running_simulator
from jobs import db, store
from jobs.models import Job, utcnow
from jobs.open_files import out_of_files
from jobs.output_store import LocalOutputStore
from jobs.states import JobState
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, completion_heard, job_ids, make_runtime, settings_for
from worker.fal.client import FalClient
from worker.running import process_batch
from worker.steps import dispatch, download, submit
from worker.steps.poll import apply_seen

KEY = "durability-key-3c7d"
T2V = "fal-ai/wan-22"
FULL = 2
#: Store verbs whose commits need no sync of their own.
COVERED = {
    "take_submit_tokens",
    "return_submit_tokens",
    "mark_submitting",
    "mark_running",
    "mark_completed",
    "mark_succeeded",
}
#: Store verbs whose commits must be on disk before their unit of work returns.
SYNCED = {"record_send", "mark_submitted"}


@dataclass
class Commit:
    at: int
    thread: int
    verbs: list[str]
    level: int
    job_ids: set[str] = field(default_factory=set)


@dataclass
class Trace:
    """What an engine's writer committed, and the syncs and POSTs around it, in one order."""

    clock: Callable[[], int] = field(default_factory=lambda: itertools.count().__next__)
    lock: threading.Lock = field(default_factory=threading.Lock)
    commits: list[Commit] = field(default_factory=list)
    #: (began, ended, thread) of every sync of the log wanbatch ran.
    syncs: list[tuple[int, int, int]] = field(default_factory=list)
    #: job id → when its POST left.
    posts: dict[str, int] = field(default_factory=dict)
    #: job id → when its video began to be stored under its final name.
    stored: dict[str, int] = field(default_factory=dict)
    #: (thread, when) each unit of work returned to its caller.
    units_ended: list[tuple[int, int]] = field(default_factory=list)
    pending: dict[int, tuple[list[str], set[str]]] = field(default_factory=dict)

    def now(self) -> int:
        with self.lock:
            return self.clock()

    def synced(self, commit: Commit, before: int) -> bool:
        """Whether ``commit`` was on disk by the moment ``before``."""
        return commit.level == FULL or any(
            commit.at < began and ended < before for began, ended, _thread in self.syncs
        )

    def unit_end(self, commit: Commit) -> int:
        return min(when for thread, when in self.units_ended if thread == commit.thread and when > commit.at)


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> Trace:
    """Every store verb of :data:`COVERED` and :data:`SYNCED` noted on its thread's unit of
    work, the syncs of the log (:data:`jobs.db.sync_file`) and the POSTs to fal timed."""
    seen = Trace()
    for verb in COVERED | SYNCED:
        monkeypatch.setattr(store, verb, _noting(seen, verb, getattr(store, verb)))
    real_sync = getattr(db, "sync_file", None)

    def sync(fd: int) -> None:
        began = seen.now()
        if real_sync is not None:
            real_sync(fd)
        seen.syncs.append((began, seen.now(), threading.get_ident()))

    monkeypatch.setattr(db, "sync_file", sync, raising=False)
    real_submit = FalClient.submit

    def submit(self: FalClient, endpoint_id: str, input: Any, **kwargs: Any) -> Any:
        seen.posts[input["prompt"]] = seen.now()
        return real_submit(self, endpoint_id, input, **kwargs)

    monkeypatch.setattr(FalClient, "submit", submit)
    real_publish = LocalOutputStore.publish

    def publish(self: LocalOutputStore, video: Path, **kwargs: Any) -> str:
        seen.stored[kwargs["sidecar"]["job_id"]] = seen.now()
        return real_publish(self, video, **kwargs)

    monkeypatch.setattr(LocalOutputStore, "publish", publish)
    real_scope = db.session_scope

    def scope(engine: Engine) -> Any:
        return _ended(seen, real_scope(engine))

    monkeypatch.setattr(db, "session_scope", scope)
    return seen


def _noting(seen: Trace, verb: str, real: Callable[..., Any]) -> Callable[..., Any]:
    def noted(session: Any, *args: Any, **kwargs: Any) -> Any:
        verbs, jobs = seen.pending.setdefault(threading.get_ident(), ([], set()))
        verbs.append(verb)
        job_id = getattr(args[0], "job_id", None) if args else None
        if job_id is not None:
            jobs.add(job_id)
        return real(session, *args, **kwargs)

    return noted


class _ended:
    """A unit of work whose return to its caller is noted."""

    def __init__(self, seen: Trace, inner: Any) -> None:
        self.seen, self.inner = seen, inner

    def __enter__(self) -> Any:
        return self.inner.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self.inner.__exit__(*exc)
        finally:
            self.seen.units_ended.append((threading.get_ident(), self.seen.now()))


def _watch_commits(engine: Engine, seen: Trace) -> Iterator[None]:
    writer = db.writer_engine(engine)

    def on_commit(connection: Any) -> None:
        level = connection.connection.dbapi_connection.execute("PRAGMA synchronous").fetchone()[0]
        verbs, jobs = seen.pending.pop(threading.get_ident(), ([], set()))
        seen.commits.append(Commit(seen.now(), threading.get_ident(), verbs, level, jobs))

    event.listen(writer, "commit", on_commit)
    try:
        yield
    finally:
        event.remove(writer, "commit", on_commit)


def test_an_embedded_run_syncs_only_what_an_outside_effect_depends_on(tmp_path: Path, trace: Trace) -> None:
    options = SimulatorOptions(concurrency_limit=4, latency_seconds=0.05, latency_jitter=0.0, rng_seed=5)
    with running_simulator(options) as sim:
        settings = settings_for(
            sim.url, KEY, database_url=f"sqlite:///{tmp_path / 'w.db'}", output_dir=tmp_path / "out"
        )
        engine = db.open_engine(settings)
        batch_id = add_batch(engine, "durable", [(T2V, {"prompt": f"p{i}"}) for i in range(12)])
        watching = _watch_commits(engine, trace)
        next(watching)
        try:
            report, _stats = process_batch(batch_id, settings, show_progress=False)
            returned = trace.now()
        finally:
            next(watching, None)
        with db.read_scope(engine) as session:
            prompts = {job.id: job.input["prompt"] for job in session.scalars(select(Job))}
    assert report["counts"].get("succeeded") == 12, report["failures"]
    commits = trace.commits
    by_verb = {verb: [c for c in commits if verb in c.verbs] for verb in COVERED | SYNCED}
    # (Not mark_running: a loaded machine's status stream may hear a short render only as done.)
    assert all(by_verb[verb] for verb in ("record_send", "mark_submitted", "mark_completed"))

    # Every POST left once its record_send was on disk.
    for commit in by_verb["record_send"]:
        (job_id,) = commit.job_ids
        post = trace.posts[prompts[job_id]]
        assert commit.at < post
        assert trace.synced(commit, post), f"{job_id}: POST before its send was synced"
    # The request id fal gave back is on disk before the submit step goes on.
    for commit in by_verb["mark_submitted"]:
        assert trace.synced(commit, trace.unit_end(commit))
    # A video is stored under its final name once the completion it stands on is on disk.
    for commit in by_verb["mark_completed"]:
        for job_id in commit.job_ids:
            stored = trace.stored[job_id]
            assert trace.synced(commit, stored), f"{job_id}: stored before its completion was synced"
    # Units that only held covered writes synced nothing of their own: neither SQLite at the commit
    # nor wanbatch before the unit returned (another thread's sync may have covered them meanwhile).
    only_covered = [c for c in commits if c.verbs and set(c.verbs) <= COVERED]
    assert only_covered
    own = [c for c in only_covered if c.level == FULL or _synced_by_its_unit(trace, c)]
    assert own == []
    # Nothing is left unsynced once run returns (its report and exit status follow).
    assert all(trace.synced(c, returned) for c in commits)
    # Fewer syncs than commits: the point of it all.
    assert len(trace.syncs) < len(commits)


def _synced_by_its_unit(seen: Trace, commit: Commit) -> bool:
    """A sync that began after ``commit`` on its own thread, before its unit returned."""
    end = seen.unit_end(commit)
    return any(
        commit.at < began and ended < end and thread == commit.thread for began, ended, thread in seen.syncs
    )


@pytest.fixture
def sqlite_engine(sqlite_url: str, request: pytest.FixtureRequest) -> Iterator[Engine]:
    import shutil

    template: Path = request.getfixturevalue("_sqlite_template")
    shutil.copyfile(template, sqlite_url.removeprefix("sqlite:///"))
    engine = db.make_engine(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    counted: list[int] = []
    real = db.sync_file

    def sync(fd: int) -> None:
        counted.append(fd)
        real(fd)

    monkeypatch.setattr(db, "sync_file", sync)
    return counted


def _pending_job(engine: Engine, name: str = "one") -> str:
    batch_id = add_batch(engine, name, [(T2V, {"prompt": "a boat"})])
    return job_ids(engine, batch_id)[0]


def test_a_write_nobody_classified_syncs_when_its_unit_commits(
    sqlite_engine: Engine, syncs: list[int]
) -> None:
    job_id = _pending_job(sqlite_engine)
    syncs.clear()
    with db.session_scope(sqlite_engine) as session:
        job = store.get_job(session, job_id)
        # A transition of its own (none of the covered verbs): as a new one would be written.
        assert store.transition(
            session, job_id, JobState.PENDING, JobState.CANCELLED, expected_version=job.version
        )
        assert syncs == []  # not before the commit
    assert len(syncs) == 1


def test_covered_writes_wait_for_the_next_sync(sqlite_engine: Engine, syncs: list[int]) -> None:
    job_id = _pending_job(sqlite_engine)
    syncs.clear()
    with db.session_scope(sqlite_engine) as session:
        fence = store.Fence.of(store.get_job(session, job_id), "me")
        assert store.mark_submitting(session, fence, attempt=1, api_key_id="k", lease_expires_at=utcnow())
    assert syncs == []
    with db.session_scope(sqlite_engine) as session:  # reads only: nothing to sync
        store.get_job(session, job_id)
    assert syncs == []
    db.sync_commits(sqlite_engine)
    assert len(syncs) == 1
    db.sync_commits(sqlite_engine)  # nothing left waiting
    assert len(syncs) == 1


def test_a_unit_with_covered_and_unclassified_writes_syncs(sqlite_engine: Engine, syncs: list[int]) -> None:
    job_id = _pending_job(sqlite_engine)
    other = _pending_job(sqlite_engine, "two")
    syncs.clear()
    with db.session_scope(sqlite_engine) as session:
        fence = store.Fence.of(store.get_job(session, job_id), "me")
        assert store.mark_submitting(session, fence, attempt=1, api_key_id="k", lease_expires_at=utcnow())
        job = store.get_job(session, other)
        assert store.transition(
            session, other, JobState.PENDING, JobState.CANCELLED, expected_version=job.version
        )
    assert len(syncs) == 1


def test_only_the_writer_connection_leaves_syncing_to_wanbatch(sqlite_engine: Engine) -> None:
    with db.session_scope(sqlite_engine) as session:
        assert session.execute(text("PRAGMA synchronous")).scalar_one() == 1  # NORMAL
    db._WRITERS[sqlite_engine].close()  # the writer's connection goes back to its pool
    session = db.session_factory(sqlite_engine)()  # no unit of work: SQLite syncs its commits
    try:
        for _ in range(2):  # whichever pooled connection it gets
            assert session.execute(text("PRAGMA synchronous")).scalar_one() == FULL
            session.commit()
    finally:
        session.close()


def test_a_video_is_stored_once_its_completion_is_on_disk(
    sqlite_engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    syncs: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The completion heard is not synced when it commits; the download syncs it before the video
    is renamed into place, and the success stored in a local folder waits for the next sync."""
    FakeFal(hostile)
    rt = make_runtime(sqlite_engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "out"))
    rt.download_claims = {}  # as in an embedded run: the completion hands its download its claim
    job_id = _pending_job(sqlite_engine)
    assert dispatch(rt) == [job_id]
    assert submit(rt, job_id) == "submitted"
    seen = completion_heard(sqlite_engine, rt, job_id)
    syncs.clear()
    assert apply_seen(rt, [seen]) == 1
    assert syncs == []
    assert job_id in rt.download_claims
    synced_when_stored: list[int] = []
    real_publish = LocalOutputStore.publish

    def publish(self: LocalOutputStore, video: Path, **kwargs: Any) -> str:
        synced_when_stored.append(len(syncs))
        return real_publish(self, video, **kwargs)

    monkeypatch.setattr(LocalOutputStore, "publish", publish)
    assert download(rt, job_id) == "succeeded"
    assert synced_when_stored == [1]
    assert len(syncs) == 1  # the success: not yet
    db.sync_commits(sqlite_engine)  # as run does before its report
    assert len(syncs) == 2


def test_a_report_syncs_the_commits_of_other_processes_too(
    sqlite_engine: Engine, sqlite_url: str, syncs: list[int]
) -> None:
    """``run``'s report reads what every process committed: a success another process (a
    worker, a second run of the batch) stored in a local folder without a sync of its own is on
    disk before the report says it, though this process has nothing of its own left to sync."""
    job_id = _pending_job(sqlite_engine)
    other = db.make_engine(sqlite_url)  # another process's writer: its own connection and counts
    try:
        with db.session_scope(other) as session:
            fence = store.Fence.of(store.get_job(session, job_id), "them")
            assert store.mark_submitting(session, fence, attempt=1, api_key_id="k", lease_expires_at=utcnow())
        syncs.clear()
        db.sync_log(sqlite_engine)  # as run does before its report
        assert len(syncs) == 1
    finally:
        other.dispose()


def test_a_report_syncs_the_log_of_a_process_that_never_wrote(
    sqlite_engine: Engine, sqlite_url: str, syncs: list[int]
) -> None:
    """A ``run`` with a broker may write nothing itself (the workers do): its report still waits
    for their commits to be on disk."""
    job_id = _pending_job(sqlite_engine)
    with db.session_scope(sqlite_engine) as session:
        fence = store.Fence.of(store.get_job(session, job_id), "them")
        assert store.mark_submitting(session, fence, attempt=1, api_key_id="k", lease_expires_at=utcnow())
    watcher = db.make_engine(sqlite_url)  # opened its writer never
    try:
        syncs.clear()
        db.sync_log(watcher)
        assert len(syncs) == 1
    finally:
        watcher.dispose()


def test_a_run_with_a_broker_syncs_before_its_report(
    sqlite_engine: Engine, sqlite_url: str, syncs: list[int], monkeypatch: pytest.MonkeyPatch, redis_db: str
) -> None:
    """The workers' successes stored in a local folder wait for a sync (:func:`jobs.db.covered`):
    ``run`` watching them through a broker syncs the log before it reads its report."""
    from worker import running

    batch_id = add_batch(sqlite_engine, "brokered", [(T2V, {"prompt": "a boat"})])
    settings = settings_for("http://127.0.0.1:9", KEY, database_url=sqlite_url, broker_url=redis_db)

    class _NoWatch:
        def __init__(self, *_args: Any, **_kwargs: Any) -> None:
            self.stopping = threading.Event()

        def start(self) -> None:
            pass

    synced_at_report: list[int] = []

    def report(_batch_id: str, _settings: Any) -> dict[str, Any]:
        synced_at_report.append(len(syncs))
        return {}

    monkeypatch.setattr(running, "_WorkerWatch", _NoWatch)
    monkeypatch.setattr(running, "_watch", lambda *_args, **_kwargs: None)
    monkeypatch.setattr(running, "_final_report", report)
    syncs.clear()
    process_batch(batch_id, settings, show_progress=False, serve_metrics=False)
    assert synced_at_report == [1]


def test_a_log_sync_out_of_file_descriptors_is_an_outage_of_the_database(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening the ``-wal`` file to sync it raised a bare ``OSError`` (EMFILE): every step took it
    for a bug ("please report it"), and an accepted submit was not held for a later record."""
    batch_id = add_batch(sqlite_engine, "fds", [("fal-ai/wan-22", {"prompt": "a boat"})])
    real_open = os.open

    def no_descriptor_for_the_log(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        if str(path).endswith("-wal"):
            raise OSError(errno.EMFILE, "Too many open files", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_descriptor_for_the_log)

    def rename() -> None:
        with db.session_scope(sqlite_engine) as session:  # a write nobody classified: synced at commit
            session.execute(text("UPDATE batches SET name = 'fds2' WHERE id = :id"), {"id": batch_id})

    with pytest.raises(Exception) as raised:  # noqa: PT011 - the type is what is checked below
        rename()
    assert db.is_unavailable(raised.value), repr(raised.value)
    assert "disk I/O error" in str(raised.value)
    said = out_of_files(raised.value)
    assert said is not None
    assert "EMFILE" in said[0]
