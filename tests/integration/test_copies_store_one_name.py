"""Two copies of one SQLite database (the user copied the project) storing the same job into one
output folder at the same moment, each its own request of it.

Found by CI (``test_two_copies_at_once_into_one_folder_never_overwrite_each_other``): one copy's
video appeared under the job's name before that copy held it (the hold was taken after the
rename); the other copy, looking at that moment, found it there without a sidecar and not held,
took it for an earlier try's of its own and recorded it — both databases then pointed at one
video, whose sidecar named only one of the two requests. The hold is now taken on the finished
temporary file, before it takes the name.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.db import make_engine
from jobs.models import Job
from jobs.states import JobState
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, make_runtime, settings_for, wait_until
from worker.fal import storage
from worker.fal.results import Video
from worker.steps import Runtime, dispatch, download, poll, submit
from worker.steps.download import _downloaded_before

KEY = "copies-one-name-key-7d2e"


def get(engine: Engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        return store.get_job(session, job_id)


@pytest.fixture
def copies(_sqlite_template: Path, tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    """Two SQLite databases, the second a copy of the first once its batch is stored."""
    first = tmp_path / "a.db"
    shutil.copyfile(_sqlite_template, first)
    engine_a = make_engine(f"sqlite:///{first}")
    add_batch(engine_a, "steps", [("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})])
    engine_a.dispose()  # the last connection checkpoints the WAL into the file copied
    shutil.copyfile(first, tmp_path / "b.db")
    engine_b = make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    yield engine_a, engine_b
    engine_a.dispose()
    engine_b.dispose()


def sent_and_completed(engine: Engine, hostile: HostileProvider, outputs: Path) -> tuple[Runtime, str]:
    """The copy's one job sent (its own request) and completed at fal: ``downloading``."""
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=outputs))
    (job_id,) = dispatch(rt)
    assert submit(rt, job_id) == "submitted"
    wait_until(lambda: get(engine, job_id).state == JobState.DOWNLOADING, step=lambda: poll(rt))
    return rt, job_id


def test_a_copy_storing_the_same_job_at_that_moment_never_takes_the_others_video(
    copies: tuple[Engine, Engine], hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fal = FakeFal(hostile)
    engine_a, engine_b = copies
    outputs = tmp_path / "outputs"
    rt_a, job_id = sent_and_completed(engine_a, hostile, outputs)
    rt_b, same_job = sent_and_completed(engine_b, hostile, outputs)
    assert same_job == job_id
    assert get(engine_a, job_id).request_id != get(engine_b, job_id).request_id
    outcomes: dict[str, str] = {}
    place: Callable[..., Path] = storage._place

    def a_then_b(tmp: Path, dest: Path, occupied: Callable[[Path], Path] | None) -> Path:
        """Copy A's video takes the job's name; copy B's whole download step runs right then."""
        placed = place(tmp, dest, occupied)
        if threading.current_thread().name == "copy-a" and "b" not in outcomes:
            outcomes["b"] = "running"
            outcomes["b"] = download(rt_b, job_id)
        return placed

    monkeypatch.setattr(storage, "_place", a_then_b)
    thread = threading.Thread(
        target=lambda: outcomes.update(a=download(rt_a, job_id)), name="copy-a", daemon=True
    )
    thread.start()
    thread.join(60)
    try:
        assert outcomes == {"a": "succeeded", "b": "succeeded"}
        recorded = {name: get(engine, job_id) for name, engine in (("a", engine_a), ("b", engine_b))}
        paths = {name: Path(job.output_path or "") for name, job in recorded.items()}
        assert paths["a"] != paths["b"]  # B stored its own beside A's, never A's as its own
        for name, job in recorded.items():
            sidecar = json.loads(paths[name].with_suffix(".json").read_text())
            assert sidecar["request_id"] == job.request_id, name
            assert paths[name].read_bytes() == fal.video
        folder = outputs / "steps"
        assert len([p for p in folder.iterdir() if not p.name.startswith(".")]) == 4
    finally:
        rt_a.client.close()
        rt_b.client.close()


@pytest.mark.parametrize(
    ("sidecar_names", "taken"),
    [(None, True), ("req-mine", True), ("req-the-other-copys", False)],
    ids=["no sidecar: a dead try's", "its own request's", "another request's"],
)
def test_a_saved_video_is_taken_again_only_when_its_sidecar_names_no_other_request(
    tmp_path: Path, sidecar_names: str | None, taken: bool
) -> None:
    """Between the look at the name's sidecar (``_own_name``) and the look for a saved video,
    the other copy may finish storing there (sidecar written, hold let go): its video is then
    not this request's."""
    dest = tmp_path / "000000-85ab8e9a0d6f.mp4"
    dest.write_bytes(b"the other copy's video")
    if sidecar_names is not None:
        dest.with_suffix(".json").write_text(json.dumps({"job_id": "j", "request_id": sidecar_names}))
    video = Video(
        url="https://v3.fal.media/files/x.mp4", file_size=dest.stat().st_size, seed=1, actual_prompt=None
    )
    sent = datetime.now(UTC) - timedelta(minutes=1)
    found = _downloaded_before("j", dest, video, sent, None, staged=False, request_id="req-mine")
    assert (found is not None) is taken
    if found is not None:
        assert found.path == dest
