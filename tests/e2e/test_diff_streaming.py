"""``wanbatch diff`` reads only what it compares, and its output did not change for it.

``diff`` built a full ORM ``Job`` per job of both batches (every JSON column decoded) and kept
each job's whole input: about 7 KB per job pair, 800 MB for two batches of 100k jobs. It now
reads the columns it compares, keeps a small record per job, and writes ``--json``'s ``jobs``
list one job at a time.

The expected outputs (``diff_golden.json``, beside this file) were captured from the code
before the change, on the batches :func:`_build` stores (every pass of the matching, every
state, reused outputs, rewritten prompts, more rows than the table shows). To capture them
again: ``DIFF_GOLDEN_WRITE=1 pytest tests/e2e/test_diff_streaming.py -k sqlite``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from jobs.db import make_engine, migrate, session_factory
from jobs.models import Batch, Job
from jobs.states import JobState
from tests.in_process import run_main

GOLDEN = Path(__file__).with_name("diff_golden.json")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
STATES = [JobState.SUCCEEDED, JobState.SUCCEEDED, JobState.FAILED, JobState.SUCCEEDED, JobState.CANCELLED]
RESOLUTIONS = ["480p", "720p", "580p"]
LONG = "A calm mountain landscape at dawn, clouds drifting slowly past the peak, take "


def _id(prefix: str, n: int) -> str:
    return f"{prefix}{n:0{32 - len(prefix)}d}"


def _video(n: int) -> str:
    return f"{n % 97:02d}" * 32


def _batch(session: Session, bid: str, name: str, **fields: Any) -> None:
    fields.setdefault("manifest_path", "/m/sweep.yaml")
    fields.setdefault("manifest_sha256", "1" * 64)
    session.add(Batch(id=bid, name=name, created_at=T0, **fields))


def _job(session: Session, bid: str, jid: str, n: int, **fields: Any) -> None:
    state = fields.pop("state", JobState.SUCCEEDED)
    done = state is JobState.SUCCEEDED
    fields.setdefault("output_sha256", _video(n) if done else None)
    fields.setdefault("seed", 1000 + n if done else None)
    fields.setdefault("actual_usd", Decimal("0.2") + Decimal(n % 3) / 10 if done else None)
    session.add(
        Job(
            id=jid,
            batch_id=bid,
            state=state,
            created_at=T0 + timedelta(seconds=n),
            est_billing_units=Decimal(1),
            est_usd=Decimal("0.2"),
            submitted_input={"big": "x" * 2000},
            provider_output={"video": {"url": "https://fal.media/x.mp4"}, "pad": "y" * 500},
            **fields,
        )
    )


def _a_input(n: int) -> dict[str, Any]:
    item, variant = divmod(n, 3)
    given: dict[str, Any] = {
        "prompt": (LONG + str(item)) if item % 4 == 0 else f"prompt {item}",
        "image_url": f"images/{item % 5}.png",
        "resolution": RESOLUTIONS[variant],
    }
    if n % 4:
        given["seed"] = n
    if n % 5 == 0:
        given["num_frames"] = 81
    return given


def _build(session: Session, size: int = 72) -> None:
    """Batches ``sweep`` (A), ``sweep-rerun-1`` (B, a rerun of A: every pass pairs) and ``other``
    (C, an unrelated manifest), with ``size`` jobs in A."""
    a, b, c = _id("ba", 0), _id("bb", 0), _id("bc", 0)
    _batch(session, a, "sweep")
    _batch(session, b, "sweep-rerun-1", parent_batch_id=a, manifest_sha256="2" * 64)
    _batch(session, c, "other", manifest_path="/m/other.yaml", manifest_sha256="3" * 64, simulated=True)
    session.flush()
    for n in range(size):
        item, variant = divmod(n, 3)
        given = _a_input(n)
        digest = f"{item % 5:x}" * 64
        sources = {"image_url": {"path": given["image_url"], "sha256": digest}} if n % 2 else None
        state = STATES[n % len(STATES)]
        rewritten = {"actual_prompt": "rewritten " + str(n)} if n % 7 == 0 else {}
        _job(
            session, a, _id("ja", n), n, job_key=f"{n:064x}", item_index=item, variant=variant,
            endpoint="fal-ai/wan-i2v", input=given, source_files=sources, state=state, **rewritten,
        )  # fmt: skip
        kind = n % 8
        b_fields: dict[str, Any] = {
            "job_key": f"b{n:063x}",
            "item_index": item,
            "variant": variant,
            "endpoint": "fal-ai/wan-i2v",
            "input": dict(given),
            "source_files": sources,
            "state": STATES[(n + kind) % len(STATES)],
        }
        if kind in (0, 1):  # the same request (by key): the same video, or another
            b_fields["job_key"] = f"{n:064x}"
            if kind == 0 and state is JobState.SUCCEEDED:
                b_fields.update(state=JobState.SUCCEEDED, seed=1000 + n, output_sha256=_video(n), **rewritten)
            elif b_fields["state"] is JobState.SUCCEEDED:
                b_fields.update(output_sha256=_video(n + 1))
            else:
                b_fields.update(output_sha256=None)
        elif kind == 2:  # the seed fal returned written into the input: by input
            b_fields["input"] = {**given, "seed": 1000 + n}
            b_fields["rerun_of"] = _id("ja", n)
        elif kind == 3:  # edited by --vary: by origin
            b_fields["input"] = {**given, "prompt": "varied " + str(n)}
            b_fields["rerun_of"] = _id("ja", n)
        elif kind == 4:  # an edited prompt: by item and variant
            b_fields["input"] = {**given, "prompt": "edited " + str(n), "num_frames": 121}
        elif kind == 5:
            continue  # only in A
        elif kind == 6 and state is JobState.SUCCEEDED:  # reused A's output
            b_fields["job_key"] = f"{n:064x}"
            b_fields.update(
                state=JobState.SUCCEEDED, seed=1000 + n, output_sha256=_video(n), reused_from=_id("ja", n)
            )
        elif kind == 7:  # another place altogether: only in B (and A's job only in A)
            b_fields.update(item_index=1000 + item, input={**given, "prompt": "new " + str(n)})
        _job(session, b, _id("jb", n), n + 3, **b_fields)
    for n in range(4):  # C: two sweeps' jobs of another manifest, one of which asks what A's did
        given = _a_input(n) if n == 1 else {"prompt": f"other {n}", "image_url": "images/9.png"}
        _job(
            session, c, _id("jc", n), n, job_key=f"{n:064x}" if n == 1 else f"c{n:063x}", item_index=n // 2,
            variant=n % 2, endpoint="fal-ai/wan-22" if n == 3 else "fal-ai/wan-i2v", input=given,
        )  # fmt: skip
    session.commit()


#: (name, argv): the cases whose output is compared with the code's before the change.
CASES = [
    ("a-b-text", ["diff", "sweep", "sweep-rerun-1"]),
    ("a-b-json", ["diff", "sweep", "sweep-rerun-1", "--json"]),
    ("b-a-text", ["diff", "sweep-rerun-1", "sweep"]),
    ("b-a-json", ["diff", "sweep-rerun-1", "sweep", "--json"]),
    ("a-c-text", ["diff", "sweep", "other"]),
    ("a-c-json", ["diff", "sweep", "other", "--json"]),
    ("a-a-text", ["diff", "sweep", "sweep"]),
    ("a-a-json", ["diff", "sweep", "sweep", "--json"]),
    ("c-c-json", ["diff", "other", "other", "--json"]),
]


@pytest.fixture
def stored(db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """The three batches in this test's database (both dialects)."""
    monkeypatch.setenv("WANBATCH_DATABASE_URL", db_url)
    with session_factory(engine)() as session:
        _build(session)
    return engine


def _outputs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for columns in ("200", None):
        for name, argv in CASES:
            if columns is None:
                monkeypatch.delenv("COLUMNS", raising=False)
            else:
                monkeypatch.setenv("COLUMNS", columns)
            code = run_main(argv, monkeypatch)
            captured = capsys.readouterr()
            output = {"code": code, "stdout": captured.out, "stderr": captured.err}
            found[f"{name}@{columns or 'pipe'}"] = output
    return found


def test_diff_prints_what_it_printed_before(
    stored: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    found = _outputs(monkeypatch, capsys)
    if os.environ.get("DIFF_GOLDEN_WRITE") == "1":
        text = json.dumps(found, indent=1, sort_keys=True, ensure_ascii=False)
        GOLDEN.write_text(text + "\n", encoding="utf-8")
    expected = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert found.keys() == expected.keys()
    for case, output in expected.items():
        assert found[case] == output, case
    # The cases mean something: every pass pairs, the table is cut, a reuse and a simulation are said.
    report = json.loads(found["a-b-json@200"]["stdout"])
    assert {job["matched_by"] for job in report["jobs"]} == {"job_key", "input", "origin", "item", None}
    assert {job["result"] for job in report["jobs"]} == {"same", "different", "only_a", "only_b"}
    assert report["reused"] > 0
    assert "more (`--json` lists every job)" in found["a-b-text@200"]["stdout"]
    assert "is a simulation" in found["a-c-json@200"]["stderr"]


class _Sink(io.StringIO):
    """stdout that counts what is written and keeps none of it."""

    written = 0

    def write(self, text: str) -> int:
        self.written += len(text)
        return len(text)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def two_3000_job_batches(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    new_pg_database: Callable[[], str],
) -> str:
    """The URL of a database holding :func:`_build`'s batches with 3000 jobs in A, built once
    for both of the test's cases (``diff`` only reads it): storing the 6000 jobs was half of
    each case's time on PostgreSQL."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("_sqlite_template")
        path = tmp_path_factory.mktemp("diff-3000") / "wanbatch.db"
        shutil.copyfile(template, path)
        url = f"sqlite:///{path}"
        engine = make_engine(url)
    else:
        url = new_pg_database()
        # The rows as one INSERT per row, sent together (psycopg's executemany), not as
        # SQLAlchemy's INSERTs of a thousand rows each: psycopg parses such a statement's
        # tens of thousands of placeholders in Python, 20-30 s for these 6000 rows, against 4-9.
        engine = make_engine(url, use_insertmanyvalues=False)
        migrate(engine, from_models=False)  # the schema the migrations make, as ``engine``'s
    try:
        with session_factory(engine)() as session:
            _build(session, size=3000)
    finally:
        engine.dispose()
    return url


@pytest.mark.parametrize("argv", [[], ["--json"]], ids=["text", "json"])
def test_diff_of_two_3000_job_batches_builds_no_job_rows_and_stays_small(
    argv: list[str], two_3000_job_batches: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", two_3000_job_batches)
    monkeypatch.setenv("COLUMNS", "120")
    loaded: list[str] = []

    def count(target: Job, _context: Any) -> None:
        loaded.append(target.id)

    # The command's code imported and its statements compiled before memory is traced: in a
    # process of the suite whose first diff this was (``pytest -n 2`` shares tests out as it
    # goes; or ``pytest -k 3000``), the modules and caches (2.7 MB) counted against the bound.
    assert run_main(["diff", "other", "other", *argv], monkeypatch) == 0
    sink = _Sink()
    monkeypatch.setattr(sys, "stdout", sink)
    event.listen(Job, "load", count)
    tracemalloc.start()
    try:
        assert run_main(["diff", "sweep", "sweep-rerun-1", *argv], monkeypatch) == 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        event.remove(Job, "load", count)
    assert sink.written > 10_000
    assert loaded == []  # no ORM row, no JSON column decoded that the diff does not use
    # Before: 18 MB (text) and 21 MB (--json) on SQLite, every job's whole row and input kept and
    # the whole --json document built; now 5.5 MB, the small record kept per job.
    assert peak < 8_000_000, peak
