"""The download step after a try that died between saving the video and recording the success
(``kill -9`` at the ``after_download`` crash point), on both databases, with a local output
folder: the saved video is taken — never downloaded, rendered or paid for again — but only
one that is surely the video of the job's current request.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from jobs import db, outputs, store
from jobs.models import Job, utcnow
from jobs.states import JobState
from tests.hostile import HostileProvider, json_reply
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for, wait_until
from worker import chaos
from worker.steps import Runtime, dispatch, download, poll, submit
from worker.steps.download import RENUMBER_MARGIN

KEY = "download-resume-key-93be"
#: fal's answer for an output file it no longer serves.
GONE = json_reply({"detail": "File not found"}, 404)


class Killed(BaseException):
    """``kill -9`` at a crash point, to the test: nothing after it runs, nothing is cleaned up."""


def completed_job(engine: Engine, hostile: HostileProvider, tmp_path: Path) -> tuple[Runtime, str]:
    """One job fal has completed (``downloading``), outputs going to ``tmp_path/outputs``."""
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs"))
    add_batch(engine, "steps", [("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})])
    (job_id,) = dispatch(rt)
    assert submit(rt, job_id) == "submitted"
    wait_until(lambda: get(engine, job_id).state == JobState.DOWNLOADING, step=lambda: poll(rt))
    return rt, job_id


def get(engine: Engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        return store.get_job(session, job_id)


def crash_after_download(rt: Runtime, job_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the download step until the video is renamed into place, and die there."""

    def crash_point(name: str) -> None:
        if name == "after_download":
            raise Killed

    with monkeypatch.context() as patched:
        patched.setattr(chaos, "crash_point", crash_point)
        with pytest.raises(Killed):
            download(rt, job_id)


def restarted(engine: Engine, rt: Runtime, job_id: str) -> Runtime:
    """A new process, once the dead one's lease on the job has lapsed."""
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        store.update_job_fields(
            session, job_id, expected_version=job.version, lease_expires_at=utcnow(), next_attempt_at=None
        )
    rt.client.close()
    return make_runtime(engine, rt.settings)


def mark_renumbered(engine: Engine, job_id: str) -> None:
    """As a resubmit that moved the job to another item would, now."""
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        store.update_job_fields(session, job_id, expected_version=job.version, renumbered_at=utcnow())


def test_a_video_saved_before_a_crash_is_taken_when_fal_no_longer_serves_it(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fal = FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    crash_after_download(rt, job_id, monkeypatch)
    folder = tmp_path / "outputs" / "steps"
    (video,) = folder.glob("*.mp4")
    assert video.read_bytes() == fal.video
    assert get(engine, job_id).state == JobState.DOWNLOADING
    # Sidecars' temporary files of writes killed earlier: one untagged, as old as a lease and
    # more; one under the dead try's lease, a moment ago (its process ended: the lease is taken
    # back at once).
    sidecar = video.with_suffix(".json")
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{sidecar.name}.", suffix=".tmp")
    os.close(fd)
    old = time.time() - 2 * rt.settings.lease_seconds
    os.utime(name, (old, old))
    dead = outputs.partial_tag(get(engine, job_id).version)
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{sidecar.name}.{dead}-", suffix=".tmp")
    os.close(fd)

    fal.on_file("r1.mp4", GONE)  # fal no longer serves the video
    rt = restarted(engine, rt, job_id)
    try:
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    job = get(engine, job_id)
    assert job.state == JobState.SUCCEEDED
    assert job.output_path == str(video)
    assert job.output_sha256 == hashlib.sha256(fal.video).hexdigest()
    assert job.actual_usd == job.est_usd  # billed once, as a success
    assert fal.file_gets("r1.mp4") == 1  # the first try's download only
    assert fal.posts() == 1  # never rendered again
    assert sorted(p.name for p in folder.iterdir()) == sorted([video.name, sidecar.name])  # temporary gone
    assert '"video_sha256": "' + hashlib.sha256(fal.video).hexdigest() in sidecar.read_text()


def test_a_saved_video_renumbered_by_a_resubmit_is_taken_under_its_new_number(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fal = FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    crash_after_download(rt, job_id, monkeypatch)
    folder = tmp_path / "outputs" / "steps"
    (before,) = folder.glob("*.mp4")
    assert before.name.startswith("000000-")
    before.with_suffix(".json").write_text("{}")  # as if killed right after the sidecar's rename
    job = get(engine, job_id)
    with db.session_scope(engine) as session:  # an item inserted above the job's
        above = store.NewJob(f"{1:064x}", 0, "fal-ai/wan-22", {"prompt": "new"}, Decimal(5), Decimal(1))
        again = store.NewJob(job.job_key, 1, job.endpoint, job.input, job.est_billing_units, job.est_usd)
        moved = store.resubmit_jobs(session, job.batch_id, [above, again], lambda: 2)
    assert moved.renumbered == 1

    fal.on_file("r1.mp4", GONE)
    rt = restarted(engine, rt, job_id)
    try:
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    job = get(engine, job_id)
    after = folder / f"000001-{job_id[:12]}.mp4"
    assert job.output_path == str(after)
    assert after.read_bytes() == fal.video
    assert job.output_sha256 == hashlib.sha256(fal.video).hexdigest()
    assert sorted(p.name for p in folder.iterdir()) == [after.name[:-4] + ".json", after.name]
    assert fal.file_gets("r1.mp4") == 1
    assert fal.posts() == 1


@pytest.mark.parametrize("where", ["in-place", "under-another-item"])
def test_a_file_older_than_the_jobs_request_is_never_taken_for_its_video(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, where: str
) -> None:
    """A file under the job's name written before its current request was sent (the video of an
    earlier request: a try died after saving it, fal then said that request failed, and the job
    was sent again) is not this request's video, whatever its size: it is downloaded."""
    fal = FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    job = get(engine, job_id)
    folder = tmp_path / "outputs" / "steps"
    folder.mkdir(parents=True)
    number = job.item_index if where == "in-place" else job.item_index + 5
    earlier = folder / f"{number:06d}-{job_id[:12]}.mp4"
    earlier.write_bytes(b"\0" * len(fal.video))  # the size fal describes, not its bytes
    assert job.submitted_at is not None
    if where == "under-another-item":  # looked for there only once renumbered since it was sent
        mark_renumbered(engine, job_id)
    sent = job.submitted_at.timestamp()
    os.utime(earlier, (sent - 60, sent - 60))
    try:
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    job = get(engine, job_id)
    assert job.output_sha256 == hashlib.sha256(fal.video).hexdigest()
    assert fal.file_gets("r1.mp4") == 1  # downloaded, not taken
    assert job.output_path is not None
    assert Path(job.output_path).read_bytes() == fal.video


def test_a_saved_video_of_a_job_dropped_from_its_manifest_is_taken_under_its_new_number(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job the edited manifest no longer has is numbered after its items (the resubmit's other
    statement): it too finds the video an earlier try saved under its old number."""
    fal = FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    crash_after_download(rt, job_id, monkeypatch)
    folder = tmp_path / "outputs" / "steps"
    (before,) = folder.glob("*.mp4")
    assert before.name.startswith("000000-")
    job = get(engine, job_id)
    with db.session_scope(engine) as session:  # the manifest now has one other item, not the job's
        other = store.NewJob(f"{1:064x}", 0, "fal-ai/wan-22", {"prompt": "new"}, Decimal(5), Decimal(1))
        moved = store.resubmit_jobs(session, job.batch_id, [other], lambda: 1)
    assert (moved.renumbered, moved.not_in_manifest) == (0, 1)
    assert get(engine, job_id).item_index == 1

    fal.on_file("r1.mp4", GONE)
    rt = restarted(engine, rt, job_id)
    try:
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    after = folder / f"000001-{job_id[:12]}.mp4"
    assert get(engine, job_id).output_path == str(after)
    assert after.read_bytes() == fal.video
    assert fal.file_gets("r1.mp4") == 1


def test_downloads_of_jobs_never_renumbered_do_not_list_the_output_folder(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Looking for a video under another item number lists the batch's whole folder (every
    video so far): done for every download, a batch was quadratic in its size. Only a job a
    resubmit renumbered after its request was sent can have one there."""
    FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs"))
    prompts = ["a paper boat", "a red kite", "a tin drum", "a glass owl"]
    add_batch(engine, "steps", [("fal-ai/wan-22", {"prompt": p, "resolution": "480p"}) for p in prompts])
    ids = dispatch(rt)
    assert len(ids) == len(prompts)
    for job_id in ids:
        assert submit(rt, job_id) == "submitted"
    wait_until(lambda: all(get(engine, j).state == JobState.DOWNLOADING for j in ids), step=lambda: poll(rt))
    folder = (tmp_path / "outputs" / "steps").resolve()
    lookups: list[str] = []
    listed: list[Path] = []
    real_lookup, real_scandir = outputs.under_another_item, os.scandir

    def lookup(dest: Path, job_id: str) -> Path | None:
        lookups.append(job_id)
        return real_lookup(dest, job_id)

    def scandir(path: Any) -> Any:
        if Path(path).resolve() == folder:
            listed.append(Path(path))
        return real_scandir(path)

    monkeypatch.setattr(outputs, "under_another_item", lookup)
    monkeypatch.setattr(os, "scandir", scandir)
    try:
        for job_id in ids:
            assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    assert lookups == []
    # What lists it is the clean-up of stale temporary files, at most once a lease (once the
    # folder exists; the first download finds none), never once per download.
    assert len(listed) <= 2
    assert len(list(folder.glob("*.mp4"))) == len(prompts)


def test_a_job_renumbered_before_its_request_was_sent_does_not_list_the_output_folder(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renumbering before the request was sent cannot have left a video of that request under
    the old number: its downloads read the new one. So the folder is not listed for it either."""
    FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs"))
    batch_id = add_batch(
        engine, "steps", [("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})]
    )
    (job_id,) = job_ids(engine, batch_id)
    job = get(engine, job_id)
    with db.session_scope(engine) as session:  # an item inserted above the job's, before it is sent
        above = store.NewJob(f"{1:064x}", 0, "fal-ai/wan-22", {"prompt": "new"}, Decimal(5), Decimal(1))
        again = store.NewJob(job.job_key, 1, job.endpoint, job.input, job.est_billing_units, job.est_usd)
        assert store.resubmit_jobs(session, batch_id, [above, again], lambda: 2).renumbered == 1
    renumbered = get(engine, job_id).renumbered_at
    assert renumbered is not None
    with db.session_scope(engine) as session:  # long before it is sent
        store.update_job_fields(
            session,
            job_id,
            expected_version=job.version,
            renumbered_at=renumbered - 2 * RENUMBER_MARGIN,
        )
    ids = dispatch(rt)
    assert job_id in ids  # with the new item's
    for sent in ids:
        assert submit(rt, sent) == "submitted"
    wait_until(lambda: get(engine, job_id).state == JobState.DOWNLOADING, step=lambda: poll(rt))
    lookups: list[str] = []
    monkeypatch.setattr(outputs, "under_another_item", lambda dest, j: lookups.append(j))
    try:
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    assert lookups == []
    assert get(engine, job_id).output_path == str(
        tmp_path / "outputs" / "steps" / f"000001-{job_id[:12]}.mp4"
    )
