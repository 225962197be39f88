"""`run --simulate` again after a pause for outputs, or a full database disk: the requests its
earlier run's simulator held finish at the new one, never failed, never "paid" twice.

The bug (disk-fault audit): a simulation paused because its videos could not be written kept
the results its run had fetched, whose video URLs named that run's simulator (gone with it, on
a port the next run's download allow-list refuses): `run NAME --simulate` failed every waiting
job `download_failed` ("refusing to fetch from 127.0.0.1 …"), their videos "wasted". A request
fal finished is kept with its result: the next run's simulator now takes such requests back
finished (the same video, unbilled) and the run fetches their results from it again. And a
submission the earlier simulator accepted whose id only the journal kept (the database's disk
was full) was recorded by the next run after its simulator had been given the batch's requests:
it answered "not found", and the job failed as a request fal lost. The journal's are given back
too now.

In process (:func:`~tests.in_process.run_main`); each `--simulate` run starts a simulator of its
own, recorded here to read its ledger. The full output disk is the sidecar's write failing with
``ENOSPC`` (the product's own pause for outputs, no mount needed).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

import falsim
from falsim.server import SimulatorHandle
from jobs import outputs
from tests.e2e.e2e_helpers import MakeManifest, Wb, db_rows, export_jsonl
from tests.full_disk import FullDisk, prepare
from tests.in_process import run_main
from worker.steps.unrecorded import PREFIX, SUFFIX, Accepted, database_key

JOBS = 6


def _manifest(name: str, jobs: int) -> str:
    items = "".join(f"  - prompt: resumed simulation item {i}\n" for i in range(jobs))
    return f"name: {name}\nendpoint: fal-ai/wan-22\nitems:\n{items}"


@pytest.fixture
def simulators(monkeypatch: pytest.MonkeyPatch) -> list[SimulatorHandle]:
    """The simulator of each `--simulate` run, in order (their ledgers outlive them)."""
    started = falsim.running_simulator
    handles: list[SimulatorHandle] = []

    @contextlib.contextmanager
    def recorded(*args: Any, **kwargs: Any) -> Iterator[SimulatorHandle]:
        with started(*args, **kwargs) as sim:
            handles.append(sim)
            yield sim

    monkeypatch.setattr(falsim, "running_simulator", recorded)
    return handles


def test_a_simulation_paused_for_its_outputs_resumes_and_downloads_the_waiting_videos(
    e2e_env: Path, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, simulators: list[SimulatorHandle]
) -> None:
    url = os.environ["WANBATCH_DATABASE_URL"]
    writes = outputs.write_json_atomic

    def no_room(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "write_json_atomic", no_room)  # the output disk is full
    path = manifest("simfull", _manifest("simfull", JOBS))
    first = run_main(["run", str(path), "--simulate", "--no-progress"], monkeypatch)

    assert first == 2  # paused, nothing failed
    waiting = db_rows(url, "SELECT request_id, provider_output FROM jobs WHERE state = 'downloading'")
    assert waiting, db_rows(url, "SELECT state FROM jobs")
    assert db_rows(url, "SELECT count(*) FROM jobs WHERE state = 'failed'")[0][0] == 0
    old = simulators[0].url
    fetched = [json.loads(o) if isinstance(o, str) else o for _, o in waiting if o is not None]
    assert fetched, "no result was fetched before the pause"
    assert all(o["video"]["url"].startswith(old + "/") for o in fetched)  # at the gone simulator
    made = simulators[0].engine.ledger.snapshot()
    sent_first = {e["request_id"] for e in made["entries"]}
    # The pause stops sending (no video is paid for that could not be stored): it can come
    # before the last submit, and a job not sent yet is sent by the next run.
    assert made["accepted"] == len(sent_first) >= len(waiting)
    unsent = JOBS - made["accepted"]
    assert db_rows(url, "SELECT count(*) FROM jobs WHERE request_id IS NULL")[0][0] == unsent

    monkeypatch.setattr(outputs, "write_json_atomic", writes)  # space was freed
    second = run_main(["run", "simfull", "--simulate", "--no-progress"], monkeypatch)

    rows = db_rows(url, "SELECT state, error, actual_usd FROM jobs")
    assert second == 0, rows
    assert [state for state, _, _ in rows] == ["succeeded"] * JOBS, rows
    again = simulators[1].engine.ledger.snapshot()
    given_back = [e for e in again["entries"] if e["request_id"] in sent_first]
    fresh = [e for e in again["entries"] if e["request_id"] not in sent_first]
    # The waiting requests were given back finished: none sent again, run again or billed again.
    assert sorted(e["request_id"] for e in given_back) == sorted(r for r, _ in waiting)
    assert len(fresh) == unsent, again["entries"]  # only what the first run never sent
    assert again["billed_count"] == unsent, again["entries"]
    if not unsent:
        assert again["billed_usd"] == "0"
        assert again["max_in_progress"] == 0  # never on a runner
    # The videos are those the first simulator made (its seeds, their results).
    seeds = {e["request_id"]: e["seed"] for e in made["entries"]}
    assert all(e["seed"] == seeds[e["request_id"]] for e in given_back), again["entries"]
    assert len(list((e2e_env.parent / "outputs").rglob("*.mp4"))) == JOBS


@pytest.mark.timeout(150)
@pytest.mark.parametrize("room", [False, True], ids=["disk-still-full", "room-again"])
def test_cancel_of_a_batch_paused_for_its_outputs_settles_its_waiting_videos_at_once(
    e2e_env: Path,
    manifest: MakeManifest,
    monkeypatch: pytest.MonkeyPatch,
    simulators: list[SimulatorHandle],
    capsys: pytest.CaptureFixture[str],
    room: bool,
) -> None:
    """Before: `cancel` left the waiting jobs due only after WANBATCH_RETRY_MAX_DELAY (300 s by
    default: 4 min 49 s measured, an hour here), saying nothing of why, then failed them
    `output_not_kept`. Now they are tried at once: stored if there is room again (a paid video
    is never made again), else ended at once, the cancel naming the wait in one line."""
    from jobs.settings import get_settings

    url = os.environ["WANBATCH_DATABASE_URL"]
    monkeypatch.setenv("WANBATCH_RETRY_MAX_DELAY", "3600")  # the wait the cancel no longer waits
    get_settings.cache_clear()
    writes = outputs.write_json_atomic

    def no_room(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "write_json_atomic", no_room)  # the output disk is full
    path = manifest("cancelfull", _manifest("cancelfull", 3))
    assert run_main(["run", str(path), "--simulate", "--no-progress"], monkeypatch) == 2  # paused
    waiting = db_rows(url, "SELECT count(*) FROM jobs WHERE state = 'downloading'")[0][0]
    assert waiting > 0
    if room:
        monkeypatch.setattr(outputs, "write_json_atomic", writes)  # space was freed
    capsys.readouterr()

    started = time.monotonic()
    code = run_main(["cancel", "cancelfull", "--simulate", "--no-progress"], monkeypatch)
    took = time.monotonic() - started

    said = capsys.readouterr().err
    rows = db_rows(url, "SELECT state, error_type FROM jobs WHERE request_id IS NOT NULL")
    assert took < 60, (took, said)
    assert (
        f"cancel: {waiting} paid video(s) waited for the batch's outputs to be kept (outputs cannot be "
        "written here: "
    ) in said, said
    if room:
        assert code == 0, said  # every job was sent, and is stored now
        assert sorted(rows) == [("succeeded", None)] * len(rows), rows  # paid, and kept: none lost
        assert len(list((e2e_env.parent / "outputs").rglob("*.mp4"))) == len(rows)
    else:
        assert code == 1, said
        assert [t for s, t in rows if s != "succeeded"] == ["output_not_kept"] * waiting, rows
    ledger = simulators[-1].engine.ledger.snapshot()
    assert ledger["billed_count"] == 0  # nothing was made (or paid for) again


def test_a_submission_only_the_journal_kept_finishes_at_the_next_simulator(
    e2e_env: Path, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, simulators: list[SimulatorHandle]
) -> None:
    """What a `--simulate` run whose database disk filled leaves: a job `submitting`, its POST's
    answer (the simulator's request id) kept in the journal only."""
    url = os.environ["WANBATCH_DATABASE_URL"]
    assert run_main(["submit", str(manifest("simjournal", _manifest("simjournal", 2)))], monkeypatch) == 0
    sent = datetime.now(UTC)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE batches SET simulated = :t"), {"t": True})
            job_id = conn.execute(text("SELECT id FROM jobs ORDER BY item_index LIMIT 1")).scalar_one()
            conn.execute(
                text(
                    "UPDATE jobs SET state = 'submitting', attempts = 1, submitted_input = input, "
                    "sent_at = :sent WHERE id = :id"
                ),
                {"sent": sent.replace(tzinfo=None), "id": job_id},
            )
    finally:
        engine.dispose()
    request_id = "0b7c1f9e-5a53-4f6e-9d1c-3c2f0e4a8b11"
    accepted = Accepted(job_id, 1, request_id, None, None, None, None, False, sent)
    journal = e2e_env.parent / f"{PREFIX}{database_key(url)}-saved{SUFFIX}"
    journal.write_text(accepted.as_json() + "\n")
    journal.chmod(0o600)

    code = run_main(["run", "simjournal", "--simulate", "--no-progress"], monkeypatch)

    rows = db_rows(url, "SELECT id, state, request_id, error FROM jobs ORDER BY item_index")
    assert code == 0, rows
    assert [(state, error) for _, state, _, error in rows] == [("succeeded", None)] * 2, rows
    assert rows[0][2] == request_id  # recorded from the journal, never sent again
    ledger = simulators[0].engine.ledger.snapshot()
    assert ledger["accepted"] == 2, ledger["entries"]
    assert request_id in {e["request_id"] for e in ledger["entries"]}
    assert not journal.exists()


def _journaled_at_a_stopped_simulation(
    url: str, monkeypatch: pytest.MonkeyPatch, *, finish: bool
) -> tuple[str, SimulatorHandle]:
    """What a `run --simulate` of a batch of 2 jobs whose database disk was full leaves once
    stopped: its simulator (the run's own, :func:`cli.batch_commands._simulated`) accepted the
    first job's submit and ``finish``-ed it (else it was still running it when the run stopped);
    the request id went to the journal only (:meth:`Journal.save`, as the submit step keeps it),
    that of a process that has ended; the job is still `submitting`. The request id and that
    simulator (stopped)."""
    from cli import batch_commands
    from jobs.settings import get_settings
    from worker.steps import unrecorded

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE batches SET simulated = :t"), {"t": True})
            job_id = conn.execute(text("SELECT id FROM jobs ORDER BY item_index LIMIT 1")).scalar_one()
            sent = datetime.now(UTC)
            conn.execute(
                text(
                    "UPDATE jobs SET state = 'submitting', attempts = 1, submitted_input = input, "
                    "sent_at = :sent WHERE id = :id"
                ),
                {"sent": sent.replace(tzinfo=None), "id": job_id},
            )
            (payload,) = conn.execute(text("SELECT input FROM jobs WHERE id = :id"), {"id": job_id}).one()
    finally:
        engine.dispose()
    payload = json.loads(payload) if isinstance(payload, str) else payload
    with monkeypatch.context() as stopped:
        stopped.setattr(unrecorded, "_owner_token", lambda: "4194303-1")  # a process that ended
        with batch_commands._simulated(get_settings(), True) as settings:
            sim = batch_commands._simulator
            assert sim is not None
            if not finish:
                sim.update_options(latency_seconds=60.0)
            answer = httpx.post(
                f"{settings.fal_queue_url}/fal-ai/wan-22",
                json=payload,
                headers={"Authorization": f"Key {batch_commands.SIMULATOR_KEY}"},
                timeout=10,
            )
            answer.raise_for_status()
            request_id = answer.json()["request_id"]
            accepted = Accepted(job_id, 1, request_id, None, None, None, None, False, sent)
            assert unrecorded.Journal(url).save([accepted]) is not None

            def reached() -> bool:
                (entry,) = sim.engine.ledger.snapshot()["entries"]
                return entry["outcome"] == "ok" if finish else entry["started_at"] is not None

            deadline = time.monotonic() + 30
            while not reached():
                assert time.monotonic() < deadline, sim.engine.ledger.snapshot()
                time.sleep(0.02)
    return request_id, sim


def _billed(sim: SimulatorHandle, request_id: str) -> list[bool]:
    return [e["billed"] for e in sim.engine.ledger.snapshot()["entries"] if e["request_id"] == request_id]


@pytest.mark.parametrize("finish", [True, False], ids=["finished", "running"])
def test_a_journaled_submission_is_billed_once_across_the_pause(
    e2e_env: Path,
    manifest: MakeManifest,
    monkeypatch: pytest.MonkeyPatch,
    simulators: list[SimulatorHandle],
    finish: bool,
) -> None:
    """Audit (simulated ledger): a submission only the journal kept whose request the stopped
    run's simulator had finished (and billed) was given to the next run's simulator as queued:
    run and billed a second time, the simulation's ledger counting its video twice. One it was
    still running was billed there as cancelled when the run stopped, then run and billed again.
    Now the finished one goes back finished (the same video, unbilled) and the running one is
    billed by the simulator that finishes it only; the other job, a new submission, still is."""
    url = os.environ["WANBATCH_DATABASE_URL"]
    assert run_main(["submit", str(manifest("simledger", _manifest("simledger", 2)))], monkeypatch) == 0
    request_id, first = _journaled_at_a_stopped_simulation(url, monkeypatch, finish=finish)
    assert _billed(first, request_id) == [finish]

    code = run_main(["run", "simledger", "--simulate", "--no-progress"], monkeypatch)

    rows = db_rows(url, "SELECT state, request_id, error FROM jobs ORDER BY item_index")
    assert code == 0, rows
    assert [(state, error) for state, _, error in rows] == [("succeeded", None)] * 2, rows
    assert rows[0][1] == request_id  # recorded from the journal, never sent again
    second = simulators[-1]
    assert second is not first
    assert _billed(second, request_id) == [not finish]  # taken back: billed once in all
    ledgers = [first.engine.ledger.snapshot(), second.engine.ledger.snapshot()]
    assert sum(ledger["billed_count"] for ledger in ledgers) == 2, ledgers  # one video each
    if finish:  # the video the first simulator made, from its seed
        made, again = ({e["request_id"]: e["seed"] for e in ledger["entries"]} for ledger in ledgers)
        assert again[request_id] == made[request_id]
    assert list(e2e_env.parent.glob(f"{PREFIX}*{SUFFIX}")) == []


def test_a_batch_sent_to_fal_keeps_the_result_it_fetched(
    e2e_env: Path, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a simulation's fetched results name a simulator that is gone: fal's are used as
    they are, never forgotten nor asked for again."""
    from jobs import db, store
    from jobs.settings import get_settings

    url = os.environ["WANBATCH_DATABASE_URL"]
    assert run_main(["submit", str(manifest("paid", _manifest("paid", 1)))], monkeypatch) == 0
    result = {"video": {"url": "https://v3.fal.media/files/r1.mp4"}, "seed": 7}
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE jobs SET state = 'downloading', request_id = 'r1', provider_output = :o"),
                {"o": json.dumps(result)},
            )
    finally:
        engine.dispose()
    (batch_id,) = db_rows(url, "SELECT id FROM batches")[0]

    with db.session_scope(db.open_engine(get_settings())) as session:
        assert store.simulated_results(session, batch_id) == {}
        assert store.forget_simulated_results(session, batch_id, ["r1"]) == 0

    (kept,) = db_rows(url, "SELECT provider_output FROM jobs")[0]
    assert json.loads(kept) == result

    # Nor is a request of theirs a stopped simulator "finished" recorded on them.
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET state = 'queued', provider_output = NULL"))
    finally:
        engine.dispose()
    with db.session_scope(db.open_engine(get_settings())) as session:
        assert store.note_simulated_finished(session, {"r1": 7}) == 0
        assert store.simulated_results(session, batch_id) == {}
    assert db_rows(url, "SELECT provider_output FROM jobs")[0] == (None,)


def _recorded_at_a_stopped_simulation(
    url: str, state: str, full: FullDisk | None = None
) -> tuple[str, SimulatorHandle]:
    """What a `run --simulate` of a batch of 2 jobs leaves when it stops (Ctrl-C, a pause) just
    as its simulator finishes the first job's request: the database has the request (``state``:
    `queued` or `running`, as the run last saw it), but the run stopped before it learnt of the
    completion, which that simulator (the run's own, :func:`cli.batch_commands._simulated`)
    billed. ``full``: made full as the run stops. The request id and that simulator (stopped)."""
    from cli import batch_commands
    from jobs.settings import get_settings

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE batches SET simulated = :t"), {"t": True})
            job_id = conn.execute(text("SELECT id FROM jobs ORDER BY item_index LIMIT 1")).scalar_one()
            (payload,) = conn.execute(text("SELECT input FROM jobs WHERE id = :id"), {"id": job_id}).one()
    finally:
        engine.dispose()
    payload = json.loads(payload) if isinstance(payload, str) else payload
    with batch_commands._simulated(get_settings(), True) as settings:
        sim = batch_commands._simulator
        assert sim is not None
        answer = httpx.post(
            f"{settings.fal_queue_url}/fal-ai/wan-22",
            json=payload,
            headers={"Authorization": f"Key {batch_commands.SIMULATOR_KEY}"},
            timeout=10,
        )
        answer.raise_for_status()
        request_id = answer.json()["request_id"]
        sent = datetime.now(UTC).replace(tzinfo=None)
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "UPDATE jobs SET state = :state, attempts = 1, submitted_input = input, "
                        "request_id = :rid, sent_at = :sent, submitted_at = :sent WHERE id = :id"
                    ),
                    {"state": state, "rid": request_id, "sent": sent, "id": job_id},
                )
        finally:
            engine.dispose()

        deadline = time.monotonic() + 30
        while [e["outcome"] for e in sim.engine.ledger.snapshot()["entries"]] != ["ok"]:
            assert time.monotonic() < deadline, sim.engine.ledger.snapshot()
            time.sleep(0.02)
        if full is not None:
            full.full = True
    return request_id, sim


@pytest.mark.parametrize("state", ["queued", "running"])
def test_a_request_the_stopped_simulator_finished_is_billed_once_across_the_stop(
    e2e_env: Path,
    manifest: MakeManifest,
    monkeypatch: pytest.MonkeyPatch,
    simulators: list[SimulatorHandle],
    state: str,
) -> None:
    """Audit (simulated ledger): a request the stopped run's simulator finished (and billed)
    while the database still had it `queued` or `running` was given to the next run's simulator
    as queued (or running): run and billed a second time, the simulation's ledger counting its
    video twice. Now the run records, once its simulator has stopped, which of the database's
    requests it finished (with their seeds), and the next run takes them back finished (the
    same video, unbilled); the other job, a new submission, is billed as ever."""
    url = os.environ["WANBATCH_DATABASE_URL"]
    assert run_main(["submit", str(manifest("simlag", _manifest("simlag", 2)))], monkeypatch) == 0
    request_id, first = _recorded_at_a_stopped_simulation(url, state)
    assert _billed(first, request_id) == [True]

    code = run_main(["run", "simlag", "--simulate", "--no-progress"], monkeypatch)

    rows = db_rows(url, "SELECT state, request_id, error FROM jobs ORDER BY item_index")
    assert code == 0, rows
    assert [(state, error) for state, _, error in rows] == [("succeeded", None)] * 2, rows
    assert rows[0][1] == request_id  # never sent again
    second = simulators[-1]
    assert second is not first
    assert _billed(second, request_id) == [False]  # taken back finished: billed once in all
    ledgers = [first.engine.ledger.snapshot(), second.engine.ledger.snapshot()]
    assert sum(ledger["billed_count"] for ledger in ledgers) == 2, ledgers  # one video each
    made, again = ({e["request_id"]: e["seed"] for e in ledger["entries"]} for ledger in ledgers)
    assert again[request_id] == made[request_id]  # the video the first simulator made, its seed
    assert second.engine.ledger.snapshot()["max_in_progress"] == 1  # only the new submission ran


@pytest.mark.parametrize("state", ["queued", "running"])
def test_a_job_the_stopped_simulator_finished_holds_no_output_until_its_own_result_is_fetched(
    e2e_env: Path,
    manifest: MakeManifest,
    monkeypatch: pytest.MonkeyPatch,
    simulators: list[SimulatorHandle],
    wb: Wb,
    state: str,
) -> None:
    """Audit (simulated runs): the stopped run recorded what its simulator had finished in the
    job's ``provider_output`` (``{"seed": …}``) while the job was still ``queued`` (or
    ``running``), until the next ``--simulate`` run: ``export`` showed fal's "result" of a job
    that had none. The hand-over is a note on the job's history now; ``provider_output`` holds
    only the result its own finished request returned, once fetched."""
    url = os.environ["WANBATCH_DATABASE_URL"]
    assert run_main(["submit", str(manifest("simseed", _manifest("simseed", 2)))], monkeypatch) == 0
    request_id, first = _recorded_at_a_stopped_simulation(url, state)
    made = {e["request_id"]: e["seed"] for e in first.engine.ledger.snapshot()["entries"]}

    rows = db_rows(url, "SELECT state, request_id, provider_output, seed FROM jobs ORDER BY item_index")
    assert rows[0][:2] == (state, request_id), rows
    assert [row[2:] for row in rows] == [(None, None)] * 2, rows  # nothing of a result yet
    records = export_jsonl(wb, "simseed")
    shown = [(r["status"], r["provider_output"], r["seed"]) for r in records]
    assert shown == [(state, None, None), ("pending", None, None)], records

    assert run_main(["run", "simseed", "--simulate", "--no-progress"], monkeypatch) == 0
    assert _billed(simulators[-1], request_id) == [False]  # still taken back finished: billed once
    done = db_rows(url, f"SELECT state, provider_output, seed FROM jobs WHERE request_id = '{request_id}'")
    ((ended, output, seed),) = done
    output = json.loads(output) if isinstance(output, str) else output
    assert ended == "succeeded"
    assert output["seed"] == int(seed) == made[request_id]  # its own request's result, fetched
    assert output["video"]["url"].startswith(simulators[-1].url + "/")


def test_a_finish_the_full_database_cannot_record_is_one_warning_line(
    e2e_env: Path,
    manifest: MakeManifest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    simulators: list[SimulatorHandle],
) -> None:
    """The run stops because the database's disk is full: what its simulator finished cannot be
    recorded. One warning line says so (and what it costs the simulation), never a traceback;
    the job is left as it was."""
    url = os.environ["WANBATCH_DATABASE_URL"]
    assert run_main(["submit", str(manifest("simfull", _manifest("simfull", 2)))], monkeypatch) == 0
    prepare(url)
    capsys.readouterr()
    with FullDisk().attached(Engine) as full:
        _recorded_at_a_stopped_simulation(url, "queued", full)

    said = capsys.readouterr().err
    lines = [line for line in said.splitlines() if line.strip()]
    assert len(lines) == 1, said
    assert lines[0].startswith("warning: the database could not record which requests the simulator"), said
    assert "(its disk is full)" in lines[0], said
    assert "counts their videos twice" in lines[0], said
    assert db_rows(url, "SELECT state, provider_output FROM jobs ORDER BY item_index")[0] == ("queued", None)


@pytest.mark.parametrize("left", ["downloading", "queued"])
def test_a_request_given_back_sees_the_image_its_earlier_run_uploaded(
    e2e_env: Path,
    manifest: MakeManifest,
    monkeypatch: pytest.MonkeyPatch,
    simulators: list[SimulatorHandle],
    left: str,
) -> None:
    """Audit (resumed uploads): an image too big to go inline is uploaded to the run's
    simulator, and the request names its URL there. Given back to the next run's simulator with
    that URL (the earlier simulator, gone), the model could not read it: the video of a portrait
    image came out landscape (854x480), other bytes than an uninterrupted run's. Now the file
    is uploaded again to the new simulator, the request given back names that upload, and the
    videos are those of an uninterrupted run; the stored submitted input stays what was sent.
    ``left``: what the stopped run left the jobs as (finished and waiting for their download, or
    still queued at fal)."""
    from PIL import Image

    url = os.environ["WANBATCH_DATABASE_URL"]
    monkeypatch.setenv("WANBATCH_INLINE_MAX_BYTES", "100")  # the image is bigger: uploaded
    body = (
        "name: {name}\nendpoint: fal-ai/wan-i2v\ndefaults: {{resolution: 480p}}\nmatrix: {{seed: [1, 2]}}\n"
        "items:\n  - {{prompt: a tall thing, image_url: images/tall.png}}\n"
    )
    path = manifest("tall", body.format(name="tall"))
    Image.new("RGB", (480, 854), (30, 60, 90)).save(path.parent / "images" / "tall.png")
    assert run_main(["run", str(path), "--simulate", "--no-progress"], monkeypatch) == 0
    reference = dict(db_rows(url, "SELECT input->>'seed', output_sha256 FROM jobs"))

    writes = outputs.write_json_atomic

    def no_room(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "write_json_atomic", no_room)  # the output disk is full
    again = manifest("tall2", body.format(name="tall2"))
    assert run_main(["run", str(again), "--simulate", "--no-progress"], monkeypatch) == 2  # paused
    batch = "(SELECT id FROM batches WHERE name = 'tall2')"
    waiting = db_rows(url, f"SELECT request_id FROM jobs WHERE batch_id = {batch} AND state = 'downloading'")
    assert waiting, db_rows(url, "SELECT state FROM jobs")
    stopped = simulators[1].url
    sent = db_rows(url, f"SELECT DISTINCT submitted_input->>'image_url' FROM jobs WHERE batch_id = {batch}")
    assert [u for (u,) in sent if u is not None and u.startswith(stopped + "/files/")], sent  # uploaded
    if left == "queued":  # as a run stopped before its simulator ran them leaves them
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "UPDATE jobs SET state = 'queued', provider_output = NULL "
                        f"WHERE batch_id = {batch} AND state = 'downloading'"
                    )
                )
        finally:
            engine.dispose()

    monkeypatch.setattr(outputs, "write_json_atomic", writes)  # space was freed
    assert run_main(["run", "tall2", "--simulate", "--no-progress"], monkeypatch) == 0

    rows = db_rows(
        url,
        "SELECT input->>'seed', output_sha256, media->>'width', media->>'height', "
        f"submitted_input->>'image_url' FROM jobs WHERE batch_id = {batch} AND state = 'succeeded'",
    )
    assert len(rows) == 2, rows
    assert {seed: sha for seed, sha, *_ in rows} == reference  # the videos of an uninterrupted run
    assert {(int(w), int(h)) for _, _, w, h, _ in rows} == {(480, 854)}, rows  # portrait, as the image
    new = simulators[2]
    for (request_id,) in waiting:
        given = new.engine._requests[request_id].payload["image_url"]
        assert given.startswith(new.url + "/files/"), given  # uploaded again, to this simulator
    # What was sent stays recorded as sent: the stopped simulator's upload.
    assert all(u.startswith(stopped + "/files/") for *_, u in rows), rows
