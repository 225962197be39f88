"""Two answers of a hostile fal that made a job ``succeeded`` with the wrong video.

* A truncated video: the result gives no ``video.file_size`` and the file is a faststart MP4
  (``moov`` first) cut short — sent without ``Content-Length`` and ended by closing the
  connection, or with a ``Content-Length`` shorter than the file. FFmpeg reads the whole clip's
  frame count from ``moov`` and decodes the first frame: it was stored as a success. It is a
  download's fault: downloaded again, never submitted again, then failed with its cost.
* One request id for two jobs: fal answers both submits ``r1``. The second job must not take
  ``r1``'s result (the first job's video, its cost counted twice).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import av
from sqlalchemy import Engine

from jobs import db, store
from jobs.models import Job
from jobs.states import JobState
from tests.hostile import HostileProvider, json_reply, raw_reply
from tests.hostile_fal import FakeFal, accept_submits, sample_video
from tests.integration.test_download_steps import completed_job, make_due
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.steps import dispatch, download, submit

T2V = "fal-ai/wan-22"
KEY = "hostile-truncation-key-7e21"
MP4 = {"Content-Type": "video/mp4"}


def _job(engine: Engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        return store.get_job(session, job_id)


def _boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """The top-level boxes of an MP4: (type, offset, size)."""
    found, offset = [], 0
    while offset < len(data):
        size, kind = struct.unpack_from(">I4s", data, offset)
        found.append((kind, offset, size))
        offset += size
    return found


def faststart(tmp_path: Path) -> bytes:
    """The fake fal's clip remuxed with its ``moov`` first (``movflags=faststart``), as the
    audit's file was."""
    src, dst = tmp_path / "in.mp4", tmp_path / "fast.mp4"
    src.write_bytes(sample_video())
    options = {"movflags": "faststart"}
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4", options=options) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is None:
                continue
            packet.stream = stream
            out.mux(packet)
    data = dst.read_bytes()
    kinds = [kind for kind, _, _ in _boxes(data)]
    assert kinds.index(b"moov") < kinds.index(b"mdat") == len(kinds) - 1
    return data


def cut(data: bytes) -> bytes:
    """``data`` without the last eighth of its ``mdat`` (its last box): ``moov`` whole and the
    first frames there, so FFmpeg reads the clip's full frame count and decodes its first frame
    (as it did with the audit's file, cut after a third of an 81-frame clip)."""
    _, offset, size = _boxes(data)[-1]
    return data[: offset + size - size // 8]


def _sizeless_result(fal: FakeFal) -> None:
    body: dict[str, Any] = fal.result_for("r1")
    del body["video"]["file_size"]
    fal.on_result("r1", json_reply(body))


def _download_until_done(engine: Engine, rt: Any, job_id: str, attempts: int) -> list[str]:
    outcomes = []
    for _ in range(attempts):
        outcomes.append(download(rt, job_id))
        if outcomes[-1] != "download-retry":
            break
        make_due(engine, job_id)
    return outcomes


def _assert_downloaded_again_then_failed(
    engine: Engine, fal: FakeFal, job_id: str, outcomes: list[str]
) -> None:
    assert outcomes == ["download-retry", "failed"]
    job = _job(engine, job_id)
    assert job.state == JobState.FAILED
    assert job.error_type == "download_failed"
    assert job.error is not None
    assert "truncated" in job.error
    assert "'mdat'" in job.error
    assert job.output_path is None
    assert job.media is None
    assert job.actual_usd == job.est_usd  # fal made it: billed once
    assert fal.file_gets("r1.mp4") == 2  # downloaded again…
    assert fal.posts() == 1  # …never submitted (nor billed) again


def test_a_video_cut_by_the_connection_closing_is_downloaded_again_never_stored(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    fast = faststart(tmp_path)
    fal = FakeFal(hostile, video=fast)
    _sizeless_result(fal)
    fal.on_file("r1.mp4", raw_reply(cut(fast), headers=MP4, content_length=None))
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=2)
    try:
        outcomes = _download_until_done(engine, rt, job_id, 3)
    finally:
        rt.client.close()
    _assert_downloaded_again_then_failed(engine, fal, job_id, outcomes)
    assert not list((tmp_path / "outputs").rglob("*.mp4"))  # nothing under an output's name


def test_a_content_length_shorter_than_the_video_is_caught_too(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    fast = faststart(tmp_path)
    fal = FakeFal(hostile, video=fast)
    _sizeless_result(fal)
    fal.on_file("r1.mp4", raw_reply(fast, headers=MP4, content_length=len(cut(fast))))
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=2)
    try:
        outcomes = _download_until_done(engine, rt, job_id, 3)
    finally:
        rt.client.close()
    _assert_downloaded_again_then_failed(engine, fal, job_id, outcomes)


def test_a_whole_faststart_video_without_a_size_still_succeeds(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    fast = faststart(tmp_path)
    fal = FakeFal(hostile, video=fast)
    _sizeless_result(fal)
    fal.on_file("r1.mp4", raw_reply(fast, headers=MP4, content_length=None))
    rt, job_id = completed_job(engine, hostile, tmp_path)
    try:
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    assert _job(engine, job_id).output_bytes == len(fast)


def test_a_request_id_another_job_holds_is_not_taken(engine: Engine, hostile: HostileProvider) -> None:
    accept_submits(hostile, "r1", T2V)  # every submit answered "r1"
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    items = [(T2V, {"prompt": "a boat", "seed": 1}), (T2V, {"prompt": "a cat", "seed": 2})]
    add_batch(engine, "dupid", items)
    try:
        first, second = sorted(dispatch(rt))
        assert submit(rt, first) == "submitted"
        assert submit(rt, second) == "duplicate-request"
    finally:
        rt.client.close()
    assert hostile.count("POST", rf"/{T2V}") == 2
    kept, refused = _job(engine, first), _job(engine, second)
    assert (kept.state, kept.request_id) == (JobState.QUEUED, "r1")
    # Not r1's: it never polls, downloads or stores the other job's video. Its POST may have
    # been billed under an id we were never told: an unknown submit, counted as possibly billed
    # (WANBATCH_SUBMIT_UNKNOWN_POLICY=fail, no webhook receiver: settled at once, never resent).
    assert refused.request_id is None
    assert refused.state == JobState.FAILED
    assert refused.error_type == "submit_unknown"
    assert refused.error is not None
    assert "provider protocol error" in refused.error
    assert f"request id r1, which job {first} already holds" in refused.error
    assert refused.ambiguous_usd == refused.est_usd
