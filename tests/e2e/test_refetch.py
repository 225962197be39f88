"""Paid videos deleted on disk while fal still serves them: said, and fetched again for free.

The audit: ``rm -rf OUT/capedit`` (a finished batch's output folder), then ``run capedit.yaml``
said ``2/2 done … outputs in …`` and ``status`` said nothing either; ``export --format hf``
refused naming only the first job (exit 1, which the README reserves for failed jobs), and no
command fetched the videos again from the URLs fal still served. Now ``status`` and ``run`` say
how many are missing with ``wanbatch refetch NAME``, which downloads them again (checked against
the recorded SHA-256, never a submit), and the hf export refuses with the count and that
command, exit 2.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import TWO_JOBS, MakeManifest, Wb, export_jsonl, processed


def _videos(wb: Wb, batch: str, outputs: Path) -> dict[str, tuple[Path, str]]:
    """Job id → (its video on disk, its recorded SHA-256)."""
    return {r["job_id"]: (outputs / r["video_path"], r["video_sha256"]) for r in export_jsonl(wb, batch)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _words(text: str) -> str:
    return " ".join(text.split())


def _set_sha(tmp_path: Path, job_id: str, sha: str) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'wanbatch.db'}")
    try:
        with engine.begin() as conn:
            update = text("UPDATE jobs SET output_sha256 = :sha WHERE id = :id")
            conn.execute(update, {"sha": sha, "id": job_id})
    finally:
        engine.dispose()


def test_deleted_outputs_are_said_then_fetched_again_from_fal_without_a_submit(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    path = manifest("capedit", TWO_JOBS.format(name="capedit"))
    report = processed(wb, "run", path)
    batch = report["batch"]
    assert report["outputs_on_disk"]["missing"] == report["outputs_on_disk"]["changed"] == 0
    assert report["outputs_on_disk"]["checked"] == 2
    paid = sim.ledger()["accepted"]
    videos = _videos(wb, batch, tmp_path / "outputs")
    assert all(video.is_file() and _sha(video) == sha for video, sha in videos.values())
    folder = next(iter(videos.values()))[0].parent
    shutil.rmtree(folder)  # rm -rf OUT/capedit

    # status and run say so, and name the command that fetches them again
    done = wb("status", batch, "--json")
    assert done.code == 0, done.stderr
    on_disk: dict[str, Any] = done.json()["outputs_on_disk"]
    assert (on_disk["checked"], on_disk["missing"], on_disk["changed"]) == (2, 2, 0)
    assert sorted(on_disk["missing_jobs"]) == sorted(videos)
    human = _words(wb("status", batch).stdout)
    assert "2 of 2 succeeded job(s)' videos are not on disk as stored (2 missing)" in human
    assert "`wanbatch refetch capedit`" in human
    assert "`wanbatch diff capedit capedit --verify`" in human
    again = processed(wb, "run", path)  # nothing to send: the summary says it
    assert again["outputs_on_disk"]["missing"] == 2
    run_text = wb("run", path, "--no-progress")
    assert run_text.code == 0
    assert "`wanbatch refetch capedit`" in _words(run_text.stdout)

    # an hf export refuses, with the count and the way on, exit 2 (nothing written)
    dataset = tmp_path / "dataset"
    refused = wb("export", batch, "--format", "hf", "-o", dataset)
    assert refused.code == 2, refused.stderr
    said = _words(refused.stderr)
    assert "2 succeeded job(s)' videos are not on disk as stored (2 missing;" in said
    assert "`wanbatch refetch capedit`" in said
    assert not dataset.exists()

    # refetch: the same bytes, under their names, with their sidecars; nothing submitted
    fetched = wb("refetch", batch, "--json")
    assert fetched.code == 0, fetched.stdout + fetched.stderr
    result = fetched.json()
    assert (result["fetched"], result["different"], result["gone"], result["failed"]) == (2, 0, 0, 0)
    assert "nothing paid" in fetched.stderr
    for job_id, (video, sha) in videos.items():
        assert _sha(video) == sha
        sidecar = json.loads(video.with_suffix(".json").read_text())
        assert (sidecar["job_id"], sidecar["video_sha256"]) == (job_id, sha)
        assert "refetched_at" in sidecar
    assert sim.ledger()["accepted"] == paid
    assert wb("status", batch, "--json").json()["outputs_on_disk"]["missing"] == 0
    assert "refetch" not in wb("status", batch).stdout
    assert wb("export", batch, "--format", "hf", "-o", dataset).code == 0
    nothing = wb("refetch", batch)
    assert nothing.code == 0
    assert "nothing to fetch" in nothing.stdout

    # a file of another size at a video's place: fetched again, the file kept beside it
    (_first, (video, sha)), (second, (other_video, other_sha)) = sorted(videos.items())
    video.write_bytes(b"edited")
    assert wb("status", batch, "--json").json()["outputs_on_disk"]["changed"] == 1
    assert wb("refetch", batch).code == 0
    assert _sha(video) == sha
    assert [p.read_bytes() for p in video.parent.glob(f"{video.stem}.changed-*.mp4")] == [b"edited"]

    # fal serves other bytes than recorded: both kept, the record unchanged, exit 1
    other_video.unlink()
    _set_sha(tmp_path, second, "0" * 64)
    differs = wb("refetch", batch, "--json")
    assert differs.code == 1
    job = differs.json()["jobs"][0]
    assert job["outcome"] == "different"
    assert (job["recorded_sha256"], job["served_sha256"]) == ("0" * 64, other_sha)
    kept = Path(job["path"])
    assert kept.name.startswith(f"{other_video.stem}.refetched-")
    assert _sha(kept) == other_sha
    assert json.loads(kept.with_suffix(".json").read_text())["recorded_sha256"] == "0" * 64
    assert not other_video.exists()
    assert {r["job_id"]: r["video_sha256"] for r in export_jsonl(wb, batch)}[second] == "0" * 64
    _set_sha(tmp_path, second, other_sha)

    # fal no longer serves it: said per job with the advice, nothing changed, exit 1
    sim.set_faults(download_error={"next": 1, "status": 410})
    gone = wb("refetch", batch)
    assert gone.code == 1
    said = _words(gone.stdout)
    assert "no longer served by fal (HTTP 410): 1" in said
    assert "`wanbatch rerun capedit` makes them again, and pays again" in said
    assert not other_video.exists()
    assert sim.ledger()["accepted"] == paid
    assert wb("refetch", batch).code == 0  # served again: fetched
    assert _sha(other_video) == other_sha


def test_an_export_refusing_for_a_missing_video_exits_2(
    wb: Wb, manifest: MakeManifest, tmp_path: Path
) -> None:
    """README: exit 1 is "some jobs ended failed or cancelled"; a refusal that wrote nothing is 2."""
    batch = processed(wb, "run", manifest("gone", TWO_JOBS.format(name="gone")), "--simulate")["batch"]
    for video, _sha256 in _videos(wb, batch, tmp_path / "outputs").values():
        video.unlink()
    done = wb("export", batch, "--format", "hf", "-o", tmp_path / "ds")
    assert done.code == 2, done.stderr
    assert "`wanbatch refetch gone`" in _words(done.stderr)
    # a simulation's videos went with its simulator: said, not fetched, nothing changed
    simulated = wb("refetch", batch, "--json")
    assert simulated.code == 1
    assert simulated.json()["gone"] == 2


#: One pinned-seed job: a batch with ``reuse_outputs: true`` takes the first batch's video.
PINNED = """\
name: {name}
endpoint: fal-ai/wan-i2v
reuse_outputs: {reuse}
defaults:
  resolution: 480p
  num_frames: 81
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
    seed: 7
"""


def test_refetching_a_reused_video_writes_the_sidecar_a_first_download_wrote(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    """A job that took its twin's output (``reuse_outputs``) records the twin's path: the video
    and sidecar there are the twin's, as its first download wrote them. Fetching it again through
    the reusing batch wrote the reusing job's sidecar there (its job id, no request, cost 0), and
    the twin's batch then found its video on disk and never wrote its own again."""
    first = processed(wb, "run", manifest("first", PINNED.format(name="first", reuse="false")))["batch"]
    again = processed(wb, "run", manifest("again", PINNED.format(name="again", reuse="true")))["batch"]
    paid = sim.ledger()["accepted"]
    (original,) = export_jsonl(wb, first)
    (reused,) = export_jsonl(wb, again)
    assert reused["reused_from"] == original["job_id"]
    video = tmp_path / "outputs" / str(original["video_path"])
    written = json.loads(video.with_suffix(".json").read_text())
    assert written["job_id"] == original["job_id"]
    shutil.rmtree(video.parent)

    fetched = wb("refetch", again, "--json")
    assert fetched.code == 0, fetched.stdout + fetched.stderr
    assert fetched.json()["fetched"] == 1
    assert _sha(video) == original["video_sha256"]
    sidecar = json.loads(video.with_suffix(".json").read_text())
    refetched_at = sidecar.pop("refetched_at")
    assert refetched_at
    assert sidecar == written  # the twin's, as its first download wrote it
    assert sim.ledger()["accepted"] == paid
    assert "nothing to fetch" in wb("refetch", first).stdout
    # and through the twin's own batch: the same sidecar again
    shutil.rmtree(video.parent)
    assert wb("refetch", first).code == 0
    sidecar = json.loads(video.with_suffix(".json").read_text())
    assert sidecar.pop("refetched_at")
    assert sidecar == written


def test_a_video_back_in_place_before_its_turn_is_not_moved_aside(
    sim: SimulatorHandle, manifest: MakeManifest, wb: Wb, tmp_path: Path
) -> None:
    """Another ``refetch`` of the batch (or the user restoring a backup) may put the recorded
    video back between the look and this one's download: the video there is then the one
    recorded, kept where it is, never renamed ``.changed-…`` as if it were a stranger's file."""
    from jobs.settings import get_settings
    from worker.refetch import refetch_batch

    batch = processed(wb, "run", manifest("race", TWO_JOBS.format(name="race")))["batch"]
    videos = _videos(wb, batch, tmp_path / "outputs")
    saved = {video: video.read_bytes() for video, _sha256 in videos.values()}
    for video in saved:
        video.unlink()

    def put_back(_count: int) -> None:  # after the look, before the first download
        for video, data in saved.items():
            video.write_bytes(data)

    report = refetch_batch(get_settings(), batch, announce=put_back)
    assert [job.outcome for job in report.jobs] == ["fetched", "fetched"]
    for video, sha in videos.values():
        assert _sha(video) == sha
        assert list(video.parent.glob(f"{video.stem}.changed-*")) == []


#: Twelve jobs: enough videos for downloads to overlap when fetched again.
TWELVE = (
    "name: {name}\nendpoint: fal-ai/wan-i2v\ndefaults:\n  resolution: 480p\n  num_frames: 81\nitems:\n"
    + "".join(
        f"  - prompt: Clouds drifting past peak number {n}\n    image_url: images/landscape.jpg\n"
        for n in range(12)
    )
)


def test_a_refetch_of_many_videos_downloads_several_at_once_with_the_same_outcomes(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path, monkeypatch: Any
) -> None:
    """5,000 lost videos were fetched one after another: now up to WANBATCH_EMBEDDED_CONCURRENCY
    at once, each as before, and the report is the one a sequential refetch gives."""
    batch = processed(wb, "run", manifest("many", TWELVE.format(name="many")))["batch"]
    videos = _videos(wb, batch, tmp_path / "outputs")
    assert len(videos) == 12
    folder = next(iter(videos.values()))[0].parent
    sim.set_faults(download_slow={"probability": 1.0, "delay": 0.25})

    monkeypatch.setenv("WANBATCH_EMBEDDED_CONCURRENCY", "1")
    shutil.rmtree(folder)
    sim.engine.ledger.reset_downloads()  # the run's own downloads overlapped
    one_by_one = wb("refetch", batch, "--json")
    assert one_by_one.code == 0, one_by_one.stdout + one_by_one.stderr
    assert sim.ledger()["max_downloads_in_flight"] == 1

    monkeypatch.setenv("WANBATCH_EMBEDDED_CONCURRENCY", "4")
    shutil.rmtree(folder)
    sim.engine.ledger.reset_downloads()
    at_once = wb("refetch", batch, "--json")
    assert at_once.code == 0, at_once.stdout + at_once.stderr
    assert 1 < sim.ledger()["max_downloads_in_flight"] <= 4
    assert at_once.json() == one_by_one.json()
    assert at_once.json()["fetched"] == 12
    for video, sha in videos.values():
        assert _sha(video) == sha
        assert json.loads(video.with_suffix(".json").read_text())["video_sha256"] == sha
    assert list(folder.glob(".*")) == []  # no staging file left behind


def test_refetch_counts_its_videos_as_they_come(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    """The progress line's count: each video done, once, up to the number to fetch."""
    from jobs.settings import get_settings
    from worker.refetch import refetch_batch

    batch = processed(wb, "run", manifest("counted", TWO_JOBS.format(name="counted")))["batch"]
    for video, _sha256 in _videos(wb, batch, tmp_path / "outputs").values():
        video.unlink()
    seen: list[tuple[int, int]] = []
    report = refetch_batch(get_settings(), batch, progress=lambda done, total: seen.append((done, total)))
    assert [job.outcome for job in report.jobs] == ["fetched", "fetched"]
    assert seen == [(1, 2), (2, 2)]


def _live_process() -> subprocess.Popen[bytes]:
    """A real second process of this host (it holds whatever its owner names while it lives)."""
    return subprocess.Popen(["sleep", "60"])


def _beat_for(tmp_path: Path, batch_id: str, owner: str) -> None:
    """A heartbeat row for ``batch_id``, as a process working on it writes it."""
    from jobs import db, store
    from jobs.models import utcnow
    from jobs.settings import get_settings

    with db.session_scope(db.open_engine(get_settings())) as session:
        store.record_heartbeat(session, owner, [batch_id], utcnow())


def test_a_refetch_is_refused_while_another_process_runs_the_batch(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    """A `run` downloading the batch beats for it: a refetch then would race it on the same
    names. Refused in one line, exit 2, nothing downloaded; once that process ends, it goes on."""
    from jobs.processes import beat_owner

    batch = processed(wb, "run", manifest("busy", TWO_JOBS.format(name="busy")))["batch"]
    videos = _videos(wb, batch, tmp_path / "outputs")
    for video, _sha256 in videos.values():
        video.unlink()
    other = _live_process()
    try:
        _beat_for(tmp_path, batch, beat_owner(f"{socket.gethostname()}:{other.pid}:MainThread"))
        downloads = sim.ledger()["downloads"]
        refused = wb("refetch", batch)
        assert refused.code == 2, refused.stdout + refused.stderr
        said = refused.stderr.strip()
        assert len(said.splitlines()) == 1, said
        assert f"process {other.pid}" in said
        assert "wait for it to end" in said
        assert "stop it" in said
        assert refused.stdout == ""
        assert sim.ledger()["downloads"] == downloads
        assert not any(video.exists() for video, _sha256 in videos.values())
        as_json = wb("refetch", batch, "--json")
        assert as_json.code == 2
        assert f"process {other.pid}" in as_json.json()["error"]
    finally:
        other.kill()
        other.wait()
    assert wb("refetch", batch).code == 0  # its process ended: it holds nothing
    assert all(_sha(video) == sha for video, sha in videos.values())


def test_a_run_is_refused_while_a_refetch_works_on_the_batch(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    """The other way round: a `run` (of the manifest, or of the batch by name) started while a
    `refetch` of that batch downloads is refused in one line, exit 2, nothing sent."""
    from jobs.processes import beat_owner

    path = manifest("refetching", TWO_JOBS.format(name="refetching"))
    batch = processed(wb, "run", path)["batch"]
    paid = sim.ledger()["accepted"]
    other = _live_process()
    try:
        _beat_for(tmp_path, batch, beat_owner(f"{socket.gethostname()}:{other.pid}:refetching"))
        for args in ([path], ["refetching"]):
            refused = wb("run", *args, "--no-progress")
            assert refused.code == 2, refused.stdout + refused.stderr
            said = refused.stderr.strip()
            assert len(said.splitlines()) == 1, said
            assert f"being refetched by process {other.pid} on this host" in said
            assert "wait for it to end" in said
        assert sim.ledger()["accepted"] == paid
        # the refetch's own claim is no run: status does not call the batch processed
        assert wb("status", batch, "--json").json()["processing"] is False
    finally:
        other.kill()
        other.wait()
    assert wb("run", path, "--no-progress").code == 0  # it ended: the run goes on
