"""An export masks FAL_KEY and URL credentials in ``input``, ``source_files`` and ``actual_prompt``
as it does in ``provider_output``; the database keeps the exact input, which ``rerun`` sends.

Found by a dataset-export audit: a prompt holding FAL_KEY was exported in clear in
``input.prompt`` (jsonl, csv, parquet, an ``hf`` export's ``metadata.jsonl`` and
``manifest.yaml``) while ``actual_prompt`` and ``provider_output.actual_prompt`` masked it, and
a URL's password and signature were masked in ``provider_output`` but not in the top-level
``actual_prompt`` column (jobs/export.py's ``record`` passed both through as stored).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.key_forms import forget_keys, remember_key
from jobs.models import Batch, Job
from jobs.rerun import rerun_batch
from jobs.settings import Settings, get_settings
from jobs.states import JobState
from tests.in_process import run_main
from tests.step_runtime import add_batch

KEY = "0b5c2d4e-1111-2222-3333-444455556666:abcdef0123456789abcdef0123456789"
SIGNED = "https://u:pw-7f3e@host.example/a?token=abc123tok&X-Amz-Signature=zzz9sig"
MASKED = "https://u:**@host.example/a?token=**&X-Amz-Signature=**"
PROMPT = f"debug {KEY} see {SIGNED}"
SENT = {"prompt": PROMPT, "seed": 7, "enable_prompt_expansion": True}
SOURCES = {"image_url": {"source": SIGNED, "sha256": None}}
SECRETS = (KEY, KEY.partition(":")[2], "pw-7f3e", "abc123tok", "zzz9sig")


@pytest.fixture
def known_key() -> Iterator[str]:
    remember_key(KEY)  # what the CLI does with FAL_KEY at start-up (cli.install_key_redaction)
    yield KEY
    forget_keys()


def _batch(engine: Engine, outputs: Path) -> str:
    """A succeeded job that sent PROMPT (``actual_prompt`` too) and an unsent one."""
    batch = add_batch(engine, "leaky", [("fal-ai/wan-22", dict(SENT)), ("fal-ai/wan-22", {"prompt": PROMPT})])
    data = b"video"
    path = outputs / "v.mp4"
    path.write_bytes(data)
    manifest = f"name: leaky\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: {PROMPT}\n"
    with db.session_scope(engine) as session:
        first = next(iter(store.jobs_of_batch(session, batch)))
        assert store.transition(
            session,
            first.id,
            JobState.PENDING,
            JobState.SUCCEEDED,
            expected_version=first.version,
            output_path=str(path),
            output_sha256=hashlib.sha256(data).hexdigest(),
            output_bytes=len(data),
            seed=7,
        )
        stored = session.get(Job, first.id)
        assert stored is not None
        stored.submitted_input = dict(SENT)
        stored.actual_prompt = PROMPT
        stored.source_files = SOURCES
        stored.provider_output = {"actual_prompt": PROMPT}
        owner = session.get(Batch, batch)
        assert owner is not None
        owner.manifest_text = manifest
    return batch


def _export(engine: Engine, argv: list[str], outputs: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    for name in ("WANBATCH_DATABASE_URL", "WANBATCH_OUTPUT_DIR", "FAL_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(outputs))
    get_settings.cache_clear()
    db.close_engines()
    try:
        return run_main(["export", *argv], monkeypatch)
    finally:
        get_settings.cache_clear()
        db.close_engines()


def _assert_masked(record: dict[str, Any]) -> None:
    for name in ("input", "source_files", "actual_prompt", "provider_output"):
        value = record[name]
        text = value if isinstance(value, str) else json.dumps(value)
        for secret in SECRETS:
            assert secret not in text, (name, secret)


def _as_object(value: object) -> Any:
    return json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value


def test_every_format_masks_the_key_and_url_credentials_in_input_and_actual_prompt(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, known_key: str
) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    batch = _batch(engine, outputs)

    assert _export(engine, [batch, "-o", str(tmp_path / "d.jsonl")], outputs, monkeypatch) == 0
    sent, unsent = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    for record in (sent, unsent):
        _assert_masked(record)
        assert record["input"]["prompt"] == f"debug ** see {MASKED}"
    assert sent["input"] == {**SENT, "prompt": f"debug ** see {MASKED}"}  # the rest exact
    assert sent["source_files"] == {"image_url": {"source": MASKED, "sha256": None}}
    # actual_prompt reads as provider_output's does
    assert sent["actual_prompt"] == sent["provider_output"]["actual_prompt"]
    assert sent["actual_prompt"] == f"debug ** see {MASKED}"

    assert (
        _export(engine, [batch, "--format", "csv", "-o", str(tmp_path / "d.csv")], outputs, monkeypatch) == 0
    )
    text = (tmp_path / "d.csv").read_text()
    assert not [s for s in SECRETS if s in text]
    row = next(csv.DictReader(io.StringIO(text)))
    assert json.loads(row["input"])["prompt"] == f"debug ** see {MASKED}"

    target = tmp_path / "d.parquet"
    assert _export(engine, [batch, "--format", "parquet", "-o", str(target)], outputs, monkeypatch) == 0
    for record in pq.read_table(target).to_pylist():
        _assert_masked({k: _as_object(v) for k, v in record.items()})

    folder = tmp_path / "hf"
    assert _export(engine, [batch, "--format", "hf", "-o", str(folder)], outputs, monkeypatch) == 0
    (meta,) = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    _assert_masked({k: _as_object(v) for k, v in meta.items()})
    manifest = (folder / "manifest.yaml").read_text()
    assert not [s for s in SECRETS if s in manifest]
    assert f"prompt: debug ** see {MASKED}" in manifest

    # The database keeps the exact input, and a rerun (which reads it there) sends it.
    with db.read_scope(engine) as session:
        sent_job, unsent_job = list(store.jobs_of_batch(session, batch))
        assert (sent_job.submitted_input, sent_job.input, sent_job.actual_prompt) == (SENT, SENT, PROMPT)
        assert sent_job.source_files == SOURCES
        assert unsent_job.input == {"prompt": PROMPT}
    settings = Settings(database_url=engine.url.render_as_string(hide_password=False))
    done = rerun_batch(batch, new_seeds=True, settings=settings)  # one is unfinished
    with db.read_scope(engine) as session:
        repeated = list(store.jobs_of_batch(session, done.batch_id))
        assert sorted(job.input["prompt"] for job in repeated) == [PROMPT, PROMPT]
