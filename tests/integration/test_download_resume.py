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
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from jobs import db, outputs, store
from jobs.models import EARLIER_ITEMS_UNKNOWN, Job, utcnow
from jobs.states import JobState
from tests.hostile import HostileProvider, json_reply
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for, wait_until
from worker import chaos
from worker.steps import Runtime, dispatch, download, poll, submit

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


def mark_renumbered(engine: Engine, job_id: str, earlier: list[int]) -> None:
    """As resubmits that moved the job from the items ``earlier`` would have."""
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        store.update_job_fields(session, job_id, expected_version=job.version, earlier_items=earlier)


def renumber(engine: Engine, job_id: str, item: int) -> None:
    """A resubmit of the manifest edited so that the job's item is now ``item`` (items inserted
    above it, or taken away)."""
    job = get(engine, job_id)
    above = [
        store.NewJob(f"{n + 1:064x}", n, "fal-ai/wan-22", {"prompt": f"new {n}"}, Decimal(5), Decimal(1))
        for n in range(item)
    ]
    again = store.NewJob(job.job_key, item, job.endpoint, job.input, job.est_billing_units, job.est_usd)
    with db.session_scope(engine) as session:
        moved = store.resubmit_jobs(session, job.batch_id, [*above, again], lambda: item + 1)
    assert moved.renumbered + moved.not_in_manifest >= 1
    assert get(engine, job_id).item_index == item


class Looks:
    """What a download did to find the job's files under other names: folder listings
    (``os.scandir``) and ``os.stat`` calls (``Path.stat``, ``lstat`` and ``exists`` make them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
        self.folder = folder.resolve()
        self.listed: list[Path] = []
        self.stats: list[Path] = []
        real_scandir, real_stat = os.scandir, os.stat

        def scandir(path: Any) -> Any:
            if Path(path).resolve() == self.folder:
                self.listed.append(Path(path))
            return real_scandir(path)

        def stat(path: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, str | Path):
                self.stats.append(Path(path))
            return real_stat(path, *args, **kwargs)

        monkeypatch.setattr(os, "scandir", scandir)
        monkeypatch.setattr(os, "stat", stat)

    def other_names(self, job_id: str, item: int) -> list[str]:
        """The names of the job's videos, under another item than ``item``, that were looked at."""
        own = f"{item:06d}-{job_id[:12]}.mp4"
        return [p.name for p in self.stats if p.name.endswith(f"-{job_id[:12]}.mp4") and p.name != own]


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
    if where == "under-another-item":  # looked for there as an earlier number of the job
        mark_renumbered(engine, job_id, [number])
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


def test_a_job_renumbered_back_over_a_stale_file_of_its_own_takes_its_video_under_the_other_number(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review C: an earlier request's video stands under the job's item 0 (a try saved it, fal
    then said that request failed, the job was sent again); renumbered 0 → 2, the current
    request's try saved its video under 2 and died before recording the success; the manifest
    edit undone, 2 → 0. The download found the stale file under 0, rightly refused it and never
    looked under 2: it downloaded again (fal no longer serving the paid video: failed)."""
    fal = FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    crash_after_download(rt, job_id, monkeypatch)
    folder = tmp_path / "outputs" / "steps"
    (saved,) = folder.glob("*.mp4")
    assert saved.name == f"000000-{job_id[:12]}.mp4"
    under_two = saved.with_name(f"000002-{job_id[:12]}.mp4")
    saved.replace(under_two)  # the current request's video, saved while the job was item 2
    saved.write_bytes(b"\0" * len(fal.video))  # the earlier request's, written before this one was sent
    saved.with_suffix(".json").write_text("{}")
    sent = get(engine, job_id).submitted_at
    assert sent is not None
    os.utime(saved, (sent.timestamp() - 3600, sent.timestamp() - 3600))
    renumber(engine, job_id, 2)
    renumber(engine, job_id, 0)
    assert 2 in (get(engine, job_id).earlier_items or [])

    fal.on_file("r1.mp4", GONE)
    rt = restarted(engine, rt, job_id)
    try:
        outcome = download(rt, job_id)
    finally:
        rt.client.close()
    assert outcome == "succeeded", (outcome, get(engine, job_id).error)
    job = get(engine, job_id)
    # The earlier request's pair under item 0 is a paid video of another request: never
    # replaced. The current request's video is stored beside it, under its request id.
    beside = saved.with_name(f"{saved.stem}.r1.mp4")
    assert job.output_path == str(beside)
    assert beside.read_bytes() == fal.video
    assert saved.read_bytes() == b"\0" * len(fal.video)
    assert job.output_sha256 == hashlib.sha256(fal.video).hexdigest()
    assert fal.file_gets("r1.mp4") == 1  # the first try's download only
    assert not under_two.exists()


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


def test_downloads_of_jobs_never_renumbered_look_at_no_other_name(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Looking for a video under another item number by listing the batch's whole folder (every
    video so far), done for every download, made a batch quadratic in its size. A job never
    renumbered has no earlier number: its download neither lists the folder nor looks at any
    name of the job but its own."""
    FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs"))
    prompts = ["a paper boat", "a red kite", "a tin drum", "a glass owl"]
    add_batch(engine, "steps", [("fal-ai/wan-22", {"prompt": p, "resolution": "480p"}) for p in prompts])
    ids = dispatch(rt)
    assert len(ids) == len(prompts)
    for job_id in ids:
        assert submit(rt, job_id) == "submitted"
    wait_until(lambda: all(get(engine, j).state == JobState.DOWNLOADING for j in ids), step=lambda: poll(rt))
    folder = tmp_path / "outputs" / "steps"
    lookups: list[str] = []
    real_lookup = outputs.under_another_item

    def lookup(dest: Path, job_id: str) -> Path | None:
        lookups.append(job_id)
        return real_lookup(dest, job_id)

    monkeypatch.setattr(outputs, "under_another_item", lookup)
    looks = Looks(monkeypatch, folder)
    try:
        for job_id in ids:
            assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    assert lookups == []
    # What lists it is the clean-up of stale temporary files, at most once a lease (once the
    # folder exists; the first download finds none), never once per download.
    assert len(looks.listed) <= 2
    for job_id in ids:
        assert looks.other_names(job_id, get(engine, job_id).item_index) == []
    assert len(list(folder.glob("*.mp4"))) == len(prompts)


def test_a_job_renumbered_before_its_request_was_sent_does_not_list_the_output_folder(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job renumbered at any time looks only at the one name its earlier number gives (there
    is none here: its request was sent after the renumbering), never at the whole folder."""
    FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs"))
    batch_id = add_batch(
        engine, "steps", [("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})]
    )
    (job_id,) = job_ids(engine, batch_id)
    renumber(engine, job_id, 1)  # an item inserted above the job's, before it is sent
    assert get(engine, job_id).earlier_items == [0]
    ids = dispatch(rt)
    assert job_id in ids  # with the new item's
    for sent in ids:
        assert submit(rt, sent) == "submitted"
    wait_until(lambda: get(engine, job_id).state == JobState.DOWNLOADING, step=lambda: poll(rt))
    folder = tmp_path / "outputs" / "steps"
    folder.mkdir(parents=True, exist_ok=True)
    lookups: list[str] = []
    monkeypatch.setattr(outputs, "under_another_item", lambda dest, j: lookups.append(j))
    looks = Looks(monkeypatch, folder)
    try:
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    assert lookups == []
    assert looks.other_names(job_id, 1) == [f"000000-{job_id[:12]}.mp4"]  # one stat, none there
    assert get(engine, job_id).output_path == str(folder.resolve() / f"000001-{job_id[:12]}.mp4")


def test_a_video_saved_before_a_resubmit_from_a_host_whose_clock_is_behind_is_taken(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review A: the resubmit recorded when it renumbered the job by its own host's clock, and
    the download compared that with the worker's ``submitted_at``: from a host 2 minutes behind
    (an NTP-less laptop or VM), the job did not look under its old number, downloaded again,
    fal answered 404 and the job failed, its paid video left under the old name. The old number
    itself is recorded now: no clock is compared."""
    fal = FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    crash_after_download(rt, job_id, monkeypatch)  # saved as 000000-<id>.mp4, success not recorded
    folder = tmp_path / "outputs" / "steps"
    (before,) = folder.glob("*.mp4")
    assert before.name.startswith("000000-")
    job = get(engine, job_id)
    behind = lambda: utcnow() - timedelta(minutes=2)  # noqa: E731
    with monkeypatch.context() as patched:
        patched.setattr(store.creating, "utcnow", behind)  # the clock resubmit_jobs reads
        with db.session_scope(engine) as session:
            above = store.NewJob(f"{1:064x}", 0, "fal-ai/wan-22", {"prompt": "new"}, Decimal(5), Decimal(1))
            again = store.NewJob(job.job_key, 1, job.endpoint, job.input, job.est_billing_units, job.est_usd)
            assert store.resubmit_jobs(session, job.batch_id, [above, again], lambda: 2).renumbered == 1
    assert get(engine, job_id).item_index == 1

    fal.on_file("r1.mp4", GONE)  # fal no longer serves the video (it was paid for)
    rt = restarted(engine, rt, job_id)
    try:
        outcome = download(rt, job_id)
    finally:
        rt.client.close()
    assert outcome == "succeeded", (outcome, get(engine, job_id).error, [p.name for p in folder.iterdir()])
    assert get(engine, job_id).output_path == str(folder / f"000001-{job_id[:12]}.mp4")
    assert fal.file_gets("r1.mp4") == 1
    assert not before.exists()


def test_a_video_saved_before_two_renumberings_is_found_under_the_first_number(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saved as item 0, then renumbered 0 → 2 → 1 before the next try: that try looks at the
    names of its earlier numbers (1 stat each, the newest first), not at the whole folder."""
    fal = FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    crash_after_download(rt, job_id, monkeypatch)
    folder = tmp_path / "outputs" / "steps"
    (before,) = folder.glob("*.mp4")
    assert before.name == f"000000-{job_id[:12]}.mp4"
    renumber(engine, job_id, 2)
    renumber(engine, job_id, 1)
    assert get(engine, job_id).earlier_items == [0, 2]

    fal.on_file("r1.mp4", GONE)
    rt = restarted(engine, rt, job_id)
    lookups: list[str] = []
    monkeypatch.setattr(outputs, "under_another_item", lambda dest, j: lookups.append(j))
    looks = Looks(monkeypatch, folder)
    try:
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    after = folder / f"000001-{job_id[:12]}.mp4"
    assert get(engine, job_id).output_path == str(after)
    assert after.read_bytes() == fal.video
    assert fal.file_gets("r1.mp4") == 1
    assert not before.exists()
    assert lookups == []
    names = looks.other_names(job_id, 1)
    assert names[:2] == [f"000002-{job_id[:12]}.mp4", f"000000-{job_id[:12]}.mp4"]
    assert set(names) == {f"000002-{job_id[:12]}.mp4", f"000000-{job_id[:12]}.mp4"}


def test_a_job_whose_earlier_numbers_are_unknown_lists_the_folder_for_its_video(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job sent before schema 0032 may have been renumbered with nothing recorded: migration
    0032 marks it ``EARLIER_ITEMS_UNKNOWN``, and its download lists the folder (as every download
    did before) and takes the video saved under whichever number."""
    fal = FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    crash_after_download(rt, job_id, monkeypatch)
    folder = tmp_path / "outputs" / "steps"
    (saved,) = folder.glob("*.mp4")
    before = saved.with_name(f"000007-{job_id[:12]}.mp4")  # its number before an unrecorded resubmit
    saved.replace(before)
    mark_renumbered(engine, job_id, [EARLIER_ITEMS_UNKNOWN])

    fal.on_file("r1.mp4", GONE)
    rt = restarted(engine, rt, job_id)
    try:
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    assert get(engine, job_id).output_path == str(saved)
    assert saved.read_bytes() == fal.video
    assert fal.file_gets("r1.mp4") == 1
    assert not before.exists()


@pytest.mark.parametrize(
    ("marked", "kept"),
    [
        ([EARLIER_ITEMS_UNKNOWN], None),  # as migration 0032 left it
        ([EARLIER_ITEMS_UNKNOWN, 4], [4]),  # then renumbered from item 4
    ],
)
def test_a_job_sent_again_no_longer_lists_the_folder_for_numbers_nobody_recorded(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    marked: list[int],
    kept: list[int] | None,
) -> None:
    """Migration 0032 marks a job sent before it and not finished ``EARLIER_ITEMS_UNKNOWN``, and
    nothing ever cleared the mark: every download of every request the job was sent as later
    (a window's end gave it back to ``pending``, a failed try to ``retry_wait``) listed the
    batch's whole output folder, and the mark stayed on the job for good. None of those listings
    could take anything: a number nobody recorded was taken from the job before the migration,
    so the file saved under it was saved before then, by a try of an earlier request (and a
    download takes only a file written since its request was sent). Sending the job as a new
    request drops the mark; the numbers recorded since stay, one ``stat`` each."""
    FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs"))
    add_batch(engine, "steps", [("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})])
    (job_id,) = dispatch(rt)
    # sent before schema 0032 (its request ended unstarted at a window's end)
    mark_renumbered(engine, job_id, marked)
    folder = tmp_path / "outputs" / "steps"
    folder.mkdir(parents=True)
    # what a try of its earlier request saved, under a number nobody recorded
    earlier = folder / f"000007-{job_id[:12]}.mp4"
    earlier.write_bytes(b"an earlier request's video")
    old = time.time() - 86400
    os.utime(earlier, (old, old))
    try:
        assert submit(rt, job_id) == "submitted"
        assert get(engine, job_id).earlier_items == kept
        wait_until(lambda: get(engine, job_id).state == JobState.DOWNLOADING, step=lambda: poll(rt))
        listings: list[str] = []
        real_listing = outputs.under_another_item

        def listing(dest: Path, job: str) -> Path | None:
            listings.append(job)
            return real_listing(dest, job)

        monkeypatch.setattr(outputs, "under_another_item", listing)
        looks = Looks(monkeypatch, folder)
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    assert listings == []  # the folder was not listed for the job's files
    recorded = [f"{n:06d}-{job_id[:12]}.mp4" for n in kept or []]
    assert looks.other_names(job_id, 0) == recorded  # a recorded number: one stat
    job = get(engine, job_id)
    assert (job.state, job.earlier_items) == (JobState.SUCCEEDED, kept)
    assert job.output_path == str(folder / f"000000-{job_id[:12]}.mp4")
    assert earlier.read_bytes() == b"an earlier request's video"  # never taken
