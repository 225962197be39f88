"""A try that froze while storing its video (SIGSTOP, a laptop lid, a VM paused) past its lease,
on both databases, with a local output folder.

Found by the chaos suite (``test_paused_worker_is_fenced``): the frozen try had renamed the video
to the job's name and held it (``_storing``) when the next try came; that one stored its own
beside it (correct: a video without its sidecar that another process holds is not to be taken),
then the frozen try woke, wrote its sidecar, found its lease gone — and left a second copy under
the job's name that no job points to. The frozen try now withdraws it once its database records
the job's output under the other name (waiting for that record, at most a lease).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from sqlalchemy import Engine

from jobs import db, outputs, store
from jobs.db import make_engine
from jobs.models import Job, utcnow
from jobs.states import JobState
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for, wait_until
from worker import chaos, tasks
from worker.celery_worker import _WorkerRun
from worker.running import HangWatch
from worker.steps import Runtime, dispatch, download, output_writes, poll, submit
from worker.steps.download import RECORDED_ELSEWHERE_POLL, _withdraw_copy, _withdraw_if_stored_elsewhere

KEY = "fenced-store-key-51c0"
S = JobState


def get(engine: Engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        return store.get_job(session, job_id)


def completed_job(engine: Engine, hostile: HostileProvider, tmp_path: Path) -> tuple[Runtime, str]:
    """One job fal has completed (``downloading``), outputs going to ``tmp_path/outputs``."""
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs"))
    add_batch(engine, "steps", [("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})])
    (job_id,) = dispatch(rt)
    assert submit(rt, job_id) == "submitted"
    wait_until(lambda: get(engine, job_id).state == JobState.DOWNLOADING, step=lambda: poll(rt))
    return rt, job_id


def lease_taken_over(engine: Engine, job_id: str) -> None:
    """The frozen try's lease runs out: the next try may take the job."""
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        store.update_job_fields(
            session, job_id, expected_version=job.version, lease_expires_at=utcnow(), next_attempt_at=None
        )


class Frozen:
    """The ``after_download`` crash point as a freeze: the named threads stop there (the video
    is under its name, held while it is stored, its sidecar not yet written) until thawed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached: dict[str, threading.Event] = {}
        self.thaw: dict[str, threading.Event] = {}
        monkeypatch.setattr(chaos, "crash_point", self._point)

    def _point(self, name: str) -> None:
        me = threading.current_thread().name
        if name == "after_download" and me in self.thaw:
            self.reached[me].set()
            assert self.thaw[me].wait(30)

    def start(self, name: str, rt: Runtime, job_id: str, outcomes: dict[str, str]) -> threading.Thread:
        self.reached[name], self.thaw[name] = threading.Event(), threading.Event()

        def body() -> None:
            outcomes[name] = download(rt, job_id)

        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        assert self.reached[name].wait(30), f"{name} never reached the store"
        return thread


@pytest.fixture
def runtimes() -> Iterator[list[Runtime]]:
    made: list[Runtime] = []
    yield made
    for rt in made:
        rt.client.close()


def videos(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("last", ["frozen try", "next try"])
def test_a_try_frozen_while_storing_leaves_no_second_copy_under_the_jobs_name(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    runtimes: list[Runtime],
    last: str,
) -> None:
    fal = FakeFal(hostile)
    first, job_id = completed_job(engine, hostile, tmp_path)
    runtimes.append(first)
    folder = tmp_path / "outputs" / "steps"
    frozen = Frozen(monkeypatch)
    outcomes: dict[str, str] = {}
    old = frozen.start("frozen", first, job_id, outcomes)
    (canonical,) = folder.glob("*.mp4")  # renamed into place, held, no sidecar yet

    lease_taken_over(engine, job_id)
    second = make_runtime(engine, first.settings)
    runtimes.append(second)
    if last == "frozen try":
        # the next try stores its own copy beside the held one and records it; then the frozen
        # try wakes, writes its sidecar and finds its lease gone
        assert download(second, job_id) == "succeeded"
        frozen.thaw["frozen"].set()
        old.join(30)
    else:
        # the next try has put its copy beside the held one, then the frozen try wakes, writes
        # its sidecar, finds its lease gone and the job not recorded yet: it waits for the
        # record, which the next try then makes
        new = frozen.start("next", second, job_id, outcomes)
        frozen.thaw["frozen"].set()
        # the frozen try's pair, complete
        wait_until(lambda: canonical.with_suffix(".json").is_file(), step=lambda: None)
        time.sleep(2 * RECORDED_ELSEWHERE_POLL)
        assert old.is_alive()  # waiting for the job's record
        frozen.thaw["next"].set()
        new.join(30)
        old.join(30)
        assert outcomes["next"] == "succeeded"
    assert outcomes["frozen"] == "lost-lease"

    job = get(engine, job_id)
    assert job.state == JobState.SUCCEEDED
    output = Path(job.output_path or "")
    assert output != canonical  # stored beside the held video
    assert output.parent == folder
    assert output.read_bytes() == fal.video
    assert job.output_sha256 == hashlib.sha256(fal.video).hexdigest()
    assert videos(folder) == sorted([output.name, output.with_suffix(".json").name])
    assert fal.posts() == 1


def test_a_try_frozen_while_writing_its_sidecar_leaves_no_video_under_the_jobs_name(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    runtimes: list[Runtime],
) -> None:
    """Frozen a moment later than above: its sidecar's temporary file written, not yet renamed
    (a slow ``fsync``). The next try, finding the video held, stores its own beside it — and
    leaves the frozen try's temporary sidecar alone, the file of a try still storing. Before, it
    swept it as the debris of a lapsed lease: the frozen try woke, found its sidecar gone, ended
    without one, and its video stayed under the job's name, without a sidecar, for good."""
    fal = FakeFal(hostile)
    first, job_id = completed_job(engine, hostile, tmp_path)
    runtimes.append(first)
    folder = tmp_path / "outputs" / "steps"
    reached, thaw = threading.Event(), threading.Event()
    write_all = outputs.write_all

    def frozen_write(fd: int, data: bytes) -> None:
        if threading.current_thread().name == "frozen":
            reached.set()
            assert thaw.wait(30)
        write_all(fd, data)

    monkeypatch.setattr(outputs, "write_all", frozen_write)
    outcomes: dict[str, str] = {}
    old = threading.Thread(
        target=lambda: outcomes.update(frozen=download(first, job_id)), name="frozen", daemon=True
    )
    old.start()
    assert reached.wait(30)
    assert len(list(folder.glob(".*.json.*.tmp"))) == 1  # the frozen try's sidecar, on its way

    lease_taken_over(engine, job_id)
    monkeypatch.setattr(outputs, "_PARTIALS", {})  # the next try lists the folder afresh (another process)
    second = make_runtime(engine, first.settings)
    runtimes.append(second)
    assert download(second, job_id) == "succeeded"
    thaw.set()
    old.join(30)
    assert outcomes["frozen"] == "lost-lease"

    job = get(engine, job_id)
    output = Path(job.output_path or "")
    assert output.read_bytes() == fal.video
    assert videos(folder) == sorted([output.name, output.with_suffix(".json").name])
    assert fal.posts() == 1


@pytest.mark.parametrize(
    "sidecar",
    [
        None,
        {"job_id": "j1", "request_id": "another", "video_sha256": "ab"},
        {"job_id": "j1", "request_id": "r1", "video_sha256": "other bytes"},
        {"job_id": "j2", "request_id": "r1", "video_sha256": "ab"},
    ],
    ids=["no sidecar", "another request", "other bytes", "another job"],
)
def test_only_a_copy_of_the_jobs_own_output_is_ever_withdrawn(
    tmp_path: Path, sidecar: dict[str, str] | None
) -> None:
    """A video under the job's name that is not surely a copy of its recorded output — none
    beside it yet (a try still storing it), another request's, other bytes, another job's —
    stays where it is."""
    video = tmp_path / "000001-j1.mp4"
    video.write_bytes(b"video")
    if sidecar is not None:
        video.with_suffix(".json").write_text(json.dumps(sidecar))
    assert not _withdraw_copy(video, job_id="j1", request_id="r1", sha256="ab")
    assert video.is_file()
    video.with_suffix(".json").write_text(
        json.dumps({"job_id": "j1", "request_id": "r1", "video_sha256": "ab"})
    )
    assert _withdraw_copy(video, job_id="j1", request_id="r1", sha256="ab")
    assert list(tmp_path.iterdir()) == []


def test_two_copies_of_the_database_keep_each_the_output_it_recorded(
    hostile: HostileProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    runtimes: list[Runtime],
    request: pytest.FixtureRequest,
) -> None:
    """README "Two copies of one project running at once": a backup run beside the database it
    was taken from, one output folder, the same request. Copy A holds the job's name while it
    stores its video; copy B stores its own beside it. Each records its own file, and neither is
    removed: B cannot tell A's pair from a try of its own that lost its lease, so only a try that
    its own database says lost its lease withdraws anything. Before, B removed A's recorded
    output once it had recorded its own."""
    fal = FakeFal(hostile)
    shutil.copyfile(request.getfixturevalue("_sqlite_template"), tmp_path / "a.db")
    engine_a = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    first, job_id = completed_job(engine_a, hostile, tmp_path)
    runtimes.append(first)
    with sqlite3.connect(tmp_path / "a.db") as source, sqlite3.connect(tmp_path / "b.db") as copy:
        source.backup(copy)
    engine_b = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    second = make_runtime(engine_b, first.settings)
    runtimes.append(second)
    folder = tmp_path / "outputs" / "steps"
    frozen = Frozen(monkeypatch)
    outcomes: dict[str, str] = {}
    copy_a = frozen.start("a", first, job_id, outcomes)
    copy_b = frozen.start("b", second, job_id, outcomes)  # A holds the name: B goes beside it
    frozen.thaw["a"].set()
    copy_a.join(30)
    frozen.thaw["b"].set()
    copy_b.join(30)
    assert outcomes == {"a": "succeeded", "b": "succeeded"}
    try:
        outputs_of = {get(engine, job_id).output_path for engine in (engine_a, engine_b)}
    finally:
        engine_a.dispose()
        engine_b.dispose()
    assert len(outputs_of) == 2
    for output in outputs_of:
        assert Path(output or "").read_bytes() == fal.video
        assert Path(output or "").with_suffix(".json").is_file()
    assert len(videos(folder)) == 4


def test_a_copy_the_other_try_withdrew_meanwhile_is_no_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The pair to withdraw is gone already (removed by hand meanwhile): nothing to say. Before,
    a warning said it "could not remove" the copy — No such file or directory — though none was
    left."""
    video = tmp_path / "000001-j1.mp4"
    video.write_bytes(b"video")
    video.with_suffix(".json").write_text(
        json.dumps({"job_id": "j1", "request_id": "r1", "video_sha256": "ab"})
    )
    read_sidecar = outputs.read_sidecar

    def read_then_withdrawn(path: Path) -> dict[str, object] | None:
        record = read_sidecar(path)
        path.unlink()  # the other try withdraws the pair meanwhile
        path.with_suffix(".json").unlink()
        return record

    monkeypatch.setattr(outputs, "read_sidecar", read_then_withdrawn)
    assert not _withdraw_copy(video, job_id="j1", request_id="r1", sha256="ab")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert list(tmp_path.iterdir()) == []


def test_a_workers_warm_shutdown_ends_the_wait_for_the_jobs_record(
    engine: Engine, tmp_path: Path, runtimes: list[Runtime]
) -> None:
    """The try that lost its lease waits for the job's record (at most a lease) before it
    withdraws its copy; a run's stop ends that wait, and so must a ``wanbatch worker``'s warm
    shutdown (SIGTERM), which waits for its running tasks. Before, nothing told the wait: the
    worker's stop waited up to WANBATCH_LEASE_SECONDS (120 s by default, past Docker's 10 s grace
    and most supervisors') for a record that only tidies a folder."""
    rt = make_runtime(engine, settings_for("http://127.0.0.1:9", KEY, lease_seconds=60))
    runtimes.append(rt)
    batch_id = add_batch(engine, "steps", [("fal-ai/wan-22", {"prompt": "a paper boat"})])
    (job_id,) = job_ids(engine, batch_id)
    with db.session_scope(engine) as session:  # completed at fal; its new holder still fetching
        for was, now in [(S.PENDING, S.SUBMITTING), (S.SUBMITTING, S.QUEUED), (S.QUEUED, S.DOWNLOADING)]:
            assert store.transition(session, job_id, was, now, request_id="r1")
    video = tmp_path / "000000-j.mp4"
    video.write_bytes(b"video")
    waiting = threading.Thread(
        target=_withdraw_if_stored_elsewhere,
        args=(rt, job_id, video, {"request_id": "r1"}, "ab"),
        daemon=True,
    )
    waiting.start()
    time.sleep(2 * RECORDED_ELSEWHERE_POLL)
    assert waiting.is_alive()  # waiting for the job's record

    worker = object.__new__(_WorkerRun)  # its signal receiver, as Celery calls it at SIGTERM
    worker.asked_to_stop = []
    worker.stop_watch = cast(HangWatch, SimpleNamespace(ident=None, start=lambda: None))
    tasks.set_runtime(rt)
    try:
        worker.by_signal("SIGTERM")
    finally:
        tasks.set_runtime(None)
    waiting.join(5)
    assert not waiting.is_alive()
    assert video.is_file()  # nothing recorded: the pair stays


def test_the_recorded_output_under_another_path_is_never_withdrawn(
    engine: Engine, tmp_path: Path, runtimes: list[Runtime]
) -> None:
    """The job's new holder took this try's very video (it found it there, not yet held: the try
    froze between its rename and its lock, or the file system has no locks) and recorded it
    under the path by which its own host reaches the output folder: a container's bind mount, an
    NFS share mounted elsewhere (``WANBATCH_OUTPUT_DIR`` differs between the two, which is only
    warned about). Before, the paths told apart as strings, and the try removed the job's
    recorded, paid output as a "second copy"."""
    rt = make_runtime(engine, settings_for("http://127.0.0.1:9", KEY))
    runtimes.append(rt)
    batch_id = add_batch(engine, "steps", [("fal-ai/wan-22", {"prompt": "a paper boat"})])
    (job_id,) = job_ids(engine, batch_id)
    folder = tmp_path / "outputs" / "steps"
    folder.mkdir(parents=True)
    (tmp_path / "mounted-elsewhere").symlink_to(tmp_path / "outputs")  # the other host's path to it
    video = folder / "000000-j.mp4"
    video.write_bytes(b"video")
    sha = hashlib.sha256(b"video").hexdigest()
    video.with_suffix(".json").write_text(
        json.dumps({"job_id": job_id, "request_id": "r1", "video_sha256": sha})
    )
    recorded = tmp_path / "mounted-elsewhere" / "steps" / video.name
    with db.session_scope(engine) as session:
        for was, now in [(S.PENDING, S.SUBMITTING), (S.SUBMITTING, S.QUEUED), (S.QUEUED, S.DOWNLOADING)]:
            assert store.transition(session, job_id, was, now, request_id="r1")
        assert store.transition(
            session, job_id, S.DOWNLOADING, S.SUCCEEDED, output_path=str(recorded), output_sha256=sha
        )
    _withdraw_if_stored_elsewhere(rt, job_id, video, {"request_id": "r1"}, sha)
    assert video.is_file()
    assert recorded.read_bytes() == b"video"


def test_a_prefork_childs_wait_for_the_jobs_record_ends_at_the_workers_warm_shutdown(
    engine: Engine, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``--pool prefork`` the try runs in a child process, whose runtime is its own: the
    main process's warm shutdown (SIGTERM: Celery's children ignore SIGINT and get nothing; the
    main process closes the pool and waits for each child's running task) ended the waits of
    its own runtime only, and a child's try that had lost its lease still waited up to
    WANBATCH_LEASE_SECONDS for the job's record, the warm shutdown with it. The child is forked
    as Celery's pool forks it, after the worker shared its stop with its children."""
    monkeypatch.setattr(output_writes, "_warm_shutdown", None)  # this process's, put back after
    batch_id = add_batch(engine, "steps", [("fal-ai/wan-22", {"prompt": "a paper boat"})])
    (job_id,) = job_ids(engine, batch_id)
    with db.session_scope(engine) as session:  # completed at fal; its new holder still fetching
        for was, now in [(S.PENDING, S.SUBMITTING), (S.SUBMITTING, S.QUEUED), (S.QUEUED, S.DOWNLOADING)]:
            assert store.transition(session, job_id, was, now, request_id="r1")
    video = tmp_path / "000000-j.mp4"
    video.write_bytes(b"video")
    output_writes.share_warm_shutdown()  # the worker, before its pool forks

    def child() -> None:  # a prefork child's task: its own engine and runtime
        rt = make_runtime(db.make_engine(db_url), settings_for("http://127.0.0.1:9", KEY, lease_seconds=60))
        _withdraw_if_stored_elsewhere(rt, job_id, video, {"request_id": "r1"}, "ab")

    forked = multiprocessing.get_context("fork").Process(target=child, daemon=True)
    forked.start()
    try:
        time.sleep(2 * RECORDED_ELSEWHERE_POLL)
        assert forked.is_alive()  # waiting for the job's record
        worker = object.__new__(_WorkerRun)  # the main process's signal receiver, at SIGTERM
        worker.asked_to_stop = []
        worker.stop_watch = cast(HangWatch, SimpleNamespace(ident=None, start=lambda: None))
        worker.by_signal("SIGTERM")  # the main process has no runtime of its own here
        forked.join(10)
        assert not forked.is_alive()  # not the lease's 60 s
        assert forked.exitcode == 0
    finally:
        if forked.is_alive():
            forked.kill()
            forked.join(5)
    assert video.is_file()  # nothing recorded: the pair stays
