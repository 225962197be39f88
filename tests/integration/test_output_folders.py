"""The folders a batch's outputs are recorded in (:func:`jobs.store.output_folders_of_batch`), on
both dialects: what ``export -o`` is kept out of whatever ``WANBATCH_OUTPUT_DIR`` the export sees.

Export audit: ``export -o`` a stored video, run from another folder than ``run`` (the default
``./outputs`` is relative), replaced the paid video with JSON Lines: only the output folder as
the export resolved it was protected, never the folders the jobs' outputs were recorded in.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from jobs import store
from jobs.models import Job
from tests.step_runtime import add_batch, job_ids


def _recorded(engine: Engine, session: Session, paths: list[str | None]) -> str:
    batch = add_batch(engine, "folders", [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(len(paths))])
    for job_id, path in zip(job_ids(engine, batch), paths, strict=True):
        session.execute(update(Job).where(Job.id == job_id).values(output_path=path))
    session.commit()
    return batch


def test_each_folder_once_whatever_the_jobs(engine: Engine, session: Session) -> None:
    paths: list[str | None] = [f"/srv/outputs/folders/{i:06d}-abc.mp4" for i in range(50)]
    paths += [
        None,  # not finished
        "/old/outputs/folders/000050-abc.mp4",  # run before the setting changed
        "/srv/outputs/folders/sub/000051-abc.mp4",  # inside a folder already found
        "/srv/outputs/FOLDERS/000052-abc.mp4",  # another folder, for all that SQLite's LIKE says
        "s3://renders/tokyo/folders/000053-abc.mp4",
        "000054-abc.mp4",  # no folder at all
        "/srv/outputs/other_batch/000055-abc.mp4",  # a reused job's source
    ]
    batch = _recorded(engine, session, paths)
    found = store.output_folders_of_batch(session, batch)
    assert len(found) == len(set(found))
    assert set(found) == {
        "/srv/outputs/folders",
        "/old/outputs/folders",
        "/srv/outputs/FOLDERS",
        "s3://renders/tokyo/folders",
        "/srv/outputs/other_batch",
    }


def test_past_the_probes_the_rest_are_listed(
    engine: Engine, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store.reading, "OUTPUT_FOLDER_PROBES", 2)  # where the lookup reads it
    batch = _recorded(engine, session, [f"/f{i % 5}/{i:06d}-abc.mp4" for i in range(20)])
    assert sorted(store.output_folders_of_batch(session, batch)) == [f"/f{i}" for i in range(5)]


def test_a_batch_without_outputs_has_no_folder(engine: Engine, session: Session) -> None:
    assert store.output_folders_of_batch(session, _recorded(engine, session, [None, None])) == []
