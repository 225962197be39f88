"""The Alembic history produces exactly the models' schema, on PostgreSQL and SQLite, both ways;
and a new database created from the models (what ``migrate`` does for an empty one) is that
very schema, stamped at the head."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, MetaData, insert, inspect, text

from jobs.db import SCHEMA_HEAD, alembic_config, downgrade, make_engine, migrate
from jobs.models import Base
from jobs.processes import beat_owner
from tests.older_rows import older_batch


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_engine(
    request: pytest.FixtureRequest, tmp_path: Path, new_pg_database: Callable[[], str]
) -> Iterator[Engine]:
    """An engine on a brand-new, empty database (migration tests must not share one)."""
    url = f"sqlite:///{tmp_path / 'm.db'}" if request.param == "sqlite" else new_pg_database()
    engine = make_engine(url)
    yield engine
    engine.dispose()


def drift(engine: Engine, metadata: MetaData = Base.metadata) -> list[Any]:
    """Alembic's autogenerate diffs (tuples, or lists of them, of mixed shapes: alembic types them Any)."""
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, metadata))


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_matches_models_exactly(empty_engine: Engine) -> None:
    migrate(empty_engine, from_models=False)
    assert tables(empty_engine) == set(Base.metadata.tables)
    assert drift(empty_engine) == []


def test_drift_check_is_not_blind(empty_engine: Engine) -> None:
    """Control: the comparison does notice a column the migrations do not create."""
    migrate(empty_engine, from_models=False)
    altered = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(altered)
    altered.tables["jobs"].append_column(Column("not_in_migrations", Integer))
    diffs = drift(empty_engine, altered)
    assert any(d[0] == "add_column" and d[3].name == "not_in_migrations" for d in diffs)


def test_downgrade_removes_everything_and_upgrade_again(empty_engine: Engine) -> None:
    migrate(empty_engine, from_models=False)
    downgrade(empty_engine, "base")
    assert tables(empty_engine) == set()
    migrate(empty_engine, from_models=False)
    assert tables(empty_engine) == set(Base.metadata.tables)
    assert drift(empty_engine) == []


def test_migrate_is_a_repeatable_no_op(empty_engine: Engine) -> None:
    migrate(empty_engine, from_models=False)
    migrate(empty_engine, from_models=False)
    with empty_engine.connect() as conn:
        heads = MigrationContext.configure(conn).get_current_heads()
    assert len(heads) == 1


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_concurrent_migrate(dialect: str, tmp_path: Path, new_pg_database: Callable[[], str]) -> None:
    """Several processes starting at once must not trip over each other (advisory/write lock)."""
    url = f"sqlite:///{tmp_path / 'c.db'}" if dialect == "sqlite" else new_pg_database()
    engines = [make_engine(url) for _ in range(4)]
    try:
        with ThreadPoolExecutor(len(engines)) as pool:
            list(pool.map(lambda e: migrate(e, from_models=False), engines))
        assert drift(engines[0]) == []
    finally:
        for engine in engines:
            engine.dispose()


def test_alembic_command_line_uses_the_configured_database(tmp_path: Path) -> None:
    """Operators can run ``alembic -c migrations/alembic.ini upgrade head``; it reads the settings."""
    db = tmp_path / "cli.db"
    ini = alembic_config().config_file_name
    assert ini is not None
    assert Path(ini).is_file()
    env = {**os.environ, "WANBATCH_DATABASE_URL": f"sqlite:///{db}"}
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    engine = make_engine(f"sqlite:///{db}")
    try:
        assert drift(engine) == []
    finally:
        engine.dispose()


def test_schema_head_names_alembics_head() -> None:
    """``jobs.db.SCHEMA_HEAD`` lets a current database skip loading Alembic: it must be the head."""
    from alembic.script import ScriptDirectory

    from jobs.db import SCHEMA_HEAD

    assert ScriptDirectory.from_config(alembic_config()).get_heads() == [SCHEMA_HEAD]


def _fingerprint(engine: Engine) -> dict[str, Any]:
    """Everything reflection tells of the schema, in a comparable form (columns by name: an
    ``ADD COLUMN`` puts a column last, the models may not), plus each index's own definition
    (partial indexes' predicates are not reflected everywhere)."""
    insp = inspect(engine)
    shape: dict[str, Any] = {}
    for table in sorted(insp.get_table_names()):
        cs = insp.get_columns(table)
        indexes, uniques = insp.get_indexes(table), insp.get_unique_constraints(table)
        shape[table] = {
            "columns": sorted((c["name"], str(c["type"]), c["nullable"], str(c.get("default"))) for c in cs),
            "pk": insp.get_pk_constraint(table)["constrained_columns"],
            "fks": sorted(
                (tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
                for f in insp.get_foreign_keys(table)
            ),
            "indexes": sorted((i["name"], tuple(i["column_names"]), i["unique"]) for i in indexes),
            "uniques": sorted((u["name"], tuple(u["column_names"])) for u in uniques),
        }
    definitions = (
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
        if engine.dialect.name == "postgresql"
        else "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
    )
    with engine.connect() as conn:
        rows = conn.execute(text(definitions))
        shape["index definitions"] = sorted((str(name), " ".join(str(sql).split())) for name, sql in rows)
        shape["version"] = sorted(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
    return shape


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_new_database_from_the_models_is_the_migrated_one(
    dialect: str, tmp_path: Path, new_pg_database: Callable[[], str]
) -> None:
    urls = [
        f"sqlite:///{tmp_path / name}" if dialect == "sqlite" else new_pg_database()
        for name in ("models.db", "history.db")
    ]
    from_models, from_history = make_engine(urls[0]), make_engine(urls[1])
    try:
        migrate(from_models)
        migrate(from_history, from_models=False)
        assert drift(from_models) == []
        assert _fingerprint(from_models) == _fingerprint(from_history)
        assert _fingerprint(from_models)["version"] == [SCHEMA_HEAD]
        migrate(from_models)  # at the head: nothing to do
        downgrade(from_models, "base")  # and the history applies to it like to any other
        assert tables(from_models) == set()
    finally:
        from_models.dispose()
        from_history.dispose()


def test_migration_0019_uncounts_resends_that_never_went_out(empty_engine: Engine) -> None:
    """Jobs stored before 0019 counted a resend of an unknown submit when it was decided: one
    cancelled in ``retry_wait`` loses that count and owes it (a downgrade counts it again); one
    whose resend went out keeps it."""
    from jobs.models import JobEvent
    from jobs.states import JobState as S
    from tests.step_runtime import add_batch, job_ids

    migrate(empty_engine, from_models=False)
    batch_id = add_batch(empty_engine, "m19", [("fal-ai/wan-22", {"prompt": p}) for p in ("a", "b")])
    cancelled, resent = job_ids(empty_engine, batch_id)
    unknown = [(S.SUBMITTING, S.SUBMIT_UNKNOWN), (S.SUBMIT_UNKNOWN, S.RETRY_WAIT)]
    moves = {
        cancelled: [*unknown, (S.RETRY_WAIT, S.CANCELLED)],
        resent: [*unknown, (S.RETRY_WAIT, S.SUBMITTING)],
    }
    downgrade(empty_engine, "0018")
    with empty_engine.begin() as conn:
        for job_id, steps in moves.items():
            attempts = 1 if job_id == cancelled else 2
            conn.execute(
                text("UPDATE jobs SET possible_duplicate_charges = 1, attempts = :a WHERE id = :j"),
                {"a": attempts, "j": job_id},
            )
            for version, (before, after) in enumerate(steps, start=10):
                conn.execute(
                    insert(JobEvent).values(job_id=job_id, from_state=before, to_state=after, version=version)
                )

    def counts() -> dict[str, tuple[int, int | None]]:
        with empty_engine.connect() as conn:
            rows = conn.execute(text("SELECT id, possible_duplicate_charges, resend_attempt FROM jobs"))
            return {r[0]: (r[1], r[2]) for r in rows}

    migrate(empty_engine, from_models=False)
    assert counts() == {cancelled: (0, 2), resent: (1, None)}
    downgrade(empty_engine, "0018")
    with empty_engine.connect() as conn:
        again: dict[str, int] = dict(
            conn.execute(text("SELECT id, possible_duplicate_charges FROM jobs")).all()
        )
    assert again == {cancelled: 1, resent: 1}


def test_migration_0020_drops_uploads_of_unknown_origin(empty_engine: Engine) -> None:
    """Uploads remembered before 0020 do not say which fal stored them: none is reused after."""
    migrate(empty_engine, from_models=False)
    downgrade(empty_engine, "0019")
    with empty_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO uploads (content_sha256, provider_url, size_bytes, content_type, created_at) "
                "VALUES (:sha, 'http://127.0.0.1:8787/files/k/a.png', 1, 'image/png', :at)"
            ),
            {"sha": "ab" * 32, "at": datetime(2026, 1, 1, tzinfo=UTC)},
        )
    migrate(empty_engine, from_models=False)
    with empty_engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM uploads")).scalar_one() == 0
    assert drift(empty_engine) == []


def test_migration_0038_adds_the_clock_mark_table_and_takes_it_away(empty_engine: Engine) -> None:
    """0038 adds ``clock_marks`` (SQLite's timeline high-water mark), empty: the first tick after
    the upgrade sets it; a downgrade drops it, and the rest of the schema is 0037's."""
    migrate(empty_engine, "0037", from_models=False)
    assert "clock_marks" not in tables(empty_engine)
    migrate(empty_engine, from_models=False)
    assert "clock_marks" in tables(empty_engine)
    with empty_engine.begin() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM clock_marks")).scalar_one() == 0
        conn.execute(
            text("INSERT INTO clock_marks (id, high_water) VALUES (1, :at)"),
            {"at": datetime(2026, 1, 1, tzinfo=UTC)},
        )
    assert drift(empty_engine) == []
    downgrade(empty_engine, "0037")
    assert "clock_marks" not in tables(empty_engine)
    migrate(empty_engine, from_models=False)
    assert drift(empty_engine) == []


def _webhook_secret_row(engine: Engine) -> tuple[str, datetime] | None:
    """The database's webhook secret as stored (value, when made), read through the models."""
    from jobs import db, store
    from jobs.models import InstanceSecret

    with db.read_scope(engine) as session:
        found = session.get(InstanceSecret, store.WEBHOOK_SECRET)
        return None if found is None else (found.value, found.created_at)


def test_migration_0046_makes_the_webhook_secret_so_every_backup_holds_it(empty_engine: Engine) -> None:
    """Up to 0045 the webhook secret was made at the first webhook URL minted or checked, so a
    backup taken before then lacked it (restored, every late webhook was refused 403). 0046
    makes it if the database has none — a random one, read back as an aware time's row — and a
    downgrade keeps it (the older version uses it as its own)."""
    migrate(empty_engine, "0045", from_models=False)
    assert _webhook_secret_row(empty_engine) is None
    migrate(empty_engine, from_models=False)
    made = _webhook_secret_row(empty_engine)
    assert made is not None
    assert len(bytes.fromhex(made[0])) == 32
    assert made[1].tzinfo is not None
    assert abs((datetime.now(UTC) - made[1]).total_seconds()) < 300
    downgrade(empty_engine, "0045")
    assert _webhook_secret_row(empty_engine) == made
    migrate(empty_engine, from_models=False)
    assert _webhook_secret_row(empty_engine) == made
    assert drift(empty_engine) == []


def test_migration_0046_keeps_a_webhook_secret_made_before(empty_engine: Engine) -> None:
    """A database whose secret some process made already keeps it: the tokens of the requests
    at fal are keyed by it."""
    from jobs import db, store

    migrate(empty_engine, "0045", from_models=False)
    with db.session_scope(empty_engine) as session:
        value = store.instance_secret(session, store.WEBHOOK_SECRET, store.new_secret_value)
    migrate(empty_engine, from_models=False)
    row = _webhook_secret_row(empty_engine)
    assert row is not None
    assert row[0] == value


def test_a_new_database_holds_its_webhook_secret_from_the_start(empty_engine: Engine) -> None:
    """A database created from the models (a new project's) has its webhook secret before any
    process asks for it: a backup taken before the first run holds it."""
    migrate(empty_engine)
    made = _webhook_secret_row(empty_engine)
    assert made is not None
    assert len(bytes.fromhex(made[0])) == 32


def test_migration_0040_adds_the_dashboard_session_revocations_and_takes_them_away(
    empty_engine: Engine,
) -> None:
    """0040 adds ``dashboard_session_revocations`` (the dashboard logins a logout ended), empty:
    the login values of before the upgrade are refused by their shape, not by a row; a downgrade
    drops it, and the rest of the schema is 0039's."""
    migrate(empty_engine, "0039", from_models=False)
    assert "dashboard_session_revocations" not in tables(empty_engine)
    migrate(empty_engine, from_models=False)
    assert "dashboard_session_revocations" in tables(empty_engine)
    with empty_engine.begin() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM dashboard_session_revocations")).scalar_one() == 0
        conn.execute(
            text(
                "INSERT INTO dashboard_session_revocations (session_id, expires_at, revoked_at) "
                "VALUES (:id, :at, :at)"
            ),
            {"id": "ab" * 16, "at": datetime(2026, 1, 1, tzinfo=UTC)},
        )
    assert drift(empty_engine) == []
    downgrade(empty_engine, "0039")
    assert "dashboard_session_revocations" not in tables(empty_engine)
    migrate(empty_engine, from_models=False)
    assert drift(empty_engine) == []


def test_migration_0039_marks_the_jobs_numbered_after_the_stored_manifests_items(
    empty_engine: Engine,
) -> None:
    """0039 adds ``jobs.not_in_manifest`` (exports' ``in_manifest``, the outcome's and
    ``rerun --failed-only``'s jobs), set for the jobs numbered from the item count of their
    batch's ``manifest_text`` on where that text holds every item: not for a manifest naming an
    ``items_from`` file, nor for a batch without a text or with one that no longer parses (False:
    marked by the next submit)."""
    migrate(empty_engine, "0038", from_models=False)
    texts = {
        "three": "name: three\nendpoint: fal-ai/wan-22\nitems:\n  - {prompt: a}\n  - {prompt: b}\n  - c\n",
        "rows": "name: rows\nendpoint: fal-ai/wan-22\nitems:\n  - {prompt: a}\nitems_from: p.jsonl\n",
        "none": None,
        "broken": "name: [unclosed\n",
    }
    at = datetime(2026, 1, 1, tzinfo=UTC)
    with empty_engine.begin() as conn:
        for n, (name, body) in enumerate(texts.items()):
            conn.execute(
                text(
                    "INSERT INTO batches (id, name, manifest_path, manifest_sha256, created_at, state, "
                    "manifest_text) VALUES (:id, :name, 'm.yaml', :sha, :at, 'active', :body)"
                ),
                {"id": f"{n:032x}", "name": name, "sha": "0" * 64, "at": at, "body": body},
            )
            for item in (0, 2, 3, 5):
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, batch_id, job_key, item_index, variant, endpoint, input, "
                        "state, version, attempts, download_attempts, possible_duplicate_charges, "
                        "est_billing_units, est_usd, created_at, updated_at) VALUES (:id, :b, :key, :item, "
                        "0, 'fal-ai/wan-22', '{}', 'failed', 3, 1, 0, 0, 1, 1, :at, :at)"
                    ),
                    {
                        "id": f"{name}-{item}",
                        "b": f"{n:032x}",
                        "key": f"{n}{item}".ljust(64, "0"),
                        "item": item,
                        "at": at,
                    },
                )
    migrate(empty_engine, from_models=False)
    with empty_engine.connect() as conn:
        marked = sorted(conn.execute(text("SELECT id FROM jobs WHERE not_in_manifest")).scalars())
    assert marked == ["three-3", "three-5"]
    assert drift(empty_engine) == []


#: Jobs of a batch whose stored manifest has one item, numbered after it (so 0039 marks them),
#: by how they stand before the upgrade: which of them are certainly never sent.
_0039_STANDING: dict[str, str] = {
    "unsent": "state = 'pending'",
    "unsent-retry": "state = 'retry_wait'",
    "lease-over": "state = 'pending', lease_owner = 'h:1:x', lease_expires_at = :past",
    # A process holding a lease holds the upgrade back (_require_unused); a lease time alone still counts.
    "leased": "state = 'pending', lease_expires_at = :future",
    "attempted": "state = 'pending', attempts = 1",
    "sent-before": "state = 'retry_wait', attempts = 1, submitted_at = :past, sent_at = :past",
    "request": "state = 'pending', request_id = 'req-1'",
    "input-sent": "state = 'pending', submitted_input = '{}'",
    "refused-429": "state = 'retry_wait', rate_limited_submits = 1",
    "resend-owed": "state = 'retry_wait', resend_attempt = 1",
    "billed": "state = 'pending', actual_usd = 5",
    "ambiguous": "state = 'pending', ambiguous_usd = 5",
    "duplicate": "state = 'pending', possible_duplicate_charges = 1",
    "queued": "state = 'queued', attempts = 1, request_id = 'req-2'",
    "failed": "state = 'failed', attempts = 1",
}


def test_migration_0039_cancels_the_marked_jobs_never_sent(empty_engine: Engine) -> None:
    """The jobs 0039 marks as no longer in their manifest that were certainly never sent
    (``pending``/``retry_wait``, no attempt, nothing of a POST recorded, nothing billed, no lease
    held) are cancelled as a resubmit drops them (``error_type`` ``not_in_manifest``, its error
    text, ``finished_at``, ``version`` + 1, a ``job_events`` row): marked but left ``pending``, the
    next run sent and billed the prompt the user had corrected. Every other job stays as it was,
    and the manifest's own pending job too."""
    from jobs.models import NOT_IN_MANIFEST
    from jobs.store.creating import DROPPED_ERROR

    migrate(empty_engine, "0038", from_models=False)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    moments = {"past": datetime(2026, 1, 2, tzinfo=UTC), "future": datetime(2999, 1, 1, tzinfo=UTC)}
    ids = ["in-manifest", *_0039_STANDING]
    with empty_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batches (id, name, manifest_path, manifest_sha256, created_at, state, "
                "manifest_text) VALUES ('b', 'typo', 'm.yaml', :sha, :at, 'active', :body)"
            ),
            {"sha": "0" * 64, "at": at, "body": "name: typo\nendpoint: fal-ai/wan-22\nitems:\n  - rain\n"},
        )
        for item, job_id in enumerate(ids):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, batch_id, job_key, item_index, variant, endpoint, input, "
                    "state, version, attempts, download_attempts, possible_duplicate_charges, "
                    "est_billing_units, est_usd, created_at, updated_at) VALUES (:id, 'b', :key, :item, "
                    "0, 'fal-ai/wan-22', '{}', 'pending', 4, 0, 0, 0, 1, 1, :at, :at)"
                ),
                {"id": job_id, "key": f"{item:064x}", "item": item, "at": at},
            )
        for job_id, values in _0039_STANDING.items():
            conn.execute(text(f"UPDATE jobs SET {values} WHERE id = :id"), {"id": job_id, **moments})

    def standing() -> dict[str, tuple[Any, ...]]:
        with empty_engine.connect() as conn:
            rows = conn.execute(text("SELECT id, state, version, error_type, finished_at FROM jobs"))
            return {r[0]: tuple(r[1:]) for r in rows}

    before = standing()
    migrate(empty_engine, from_models=False)
    after = standing()
    dropped = {"unsent", "unsent-retry", "lease-over"}
    assert {j for j, row in after.items() if row[0] == "cancelled"} == dropped
    assert {j: after[j] for j in ids if j not in dropped} == {j: before[j] for j in ids if j not in dropped}
    with empty_engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, version, error_type, error, finished_at, lease_owner, lease_expires_at, "
                "actual_usd, not_in_manifest FROM jobs WHERE state = 'cancelled'"
            )
        ).all()
        events = conn.execute(
            text("SELECT job_id, from_state, to_state, version, reason, at FROM job_events ORDER BY job_id")
        ).all()
    for row in rows:
        assert (row.version, row.error_type, row.error) == (5, NOT_IN_MANIFEST, DROPPED_ERROR)
        assert row.finished_at is not None
        assert (row.lease_owner, row.lease_expires_at, row.actual_usd, bool(row.not_in_manifest)) == (
            None,
            None,
            0,
            True,
        )
    assert [(e.job_id, e.from_state, e.to_state, e.version) for e in events] == [
        ("lease-over", "pending", "cancelled", 5),
        ("unsent", "pending", "cancelled", 5),
        ("unsent-retry", "retry_wait", "cancelled", 5),
    ]
    assert all("not in manifest" in e.reason and e.at is not None for e in events)
    assert drift(empty_engine) == []

    # What the running code reads of them: dropped jobs, which the manifest bringing back restores.
    from jobs import db, store

    with db.session_scope(empty_engine) as session:
        jobs = {job.id: job for job in store.jobs_of_batch(session, "b")}
        assert jobs["unsent"].finished_at is not None
        assert jobs["unsent"].finished_at.tzinfo is not None


def test_migration_0021_links_reruns_stored_before_rerun_of(empty_engine: Engine) -> None:
    """Reruns stored before 0014 left ``rerun_of`` NULL (0015 to 0020 never touch it: a database
    at 0020 with NULL links is what an upgrade from before 0014 brings). 0021 links each job to
    its parent's job at the same place whose plain-rerun input it sends, and no other: after
    it, ``rerun --failed-only`` knows the old rerun rendered those jobs."""
    from jobs import db, store
    from jobs.rendered import RERUN_FAILED_STATES, renders

    migrate(empty_engine, "0020", from_models=False)
    wan = "fal-ai/wan-22"

    def batch(
        name: str, jobs: list[tuple[int, int, dict[str, Any], str | None]], parent: str | None
    ) -> list[str]:
        """Jobs as ``(item, variant, input, rerun_of)``; their ids, in that order."""
        with db.session_scope(empty_engine) as session:
            made_id = older_batch(session, name, parent)
            rows = [
                store.NewJob(
                    f"{n:064x}", item, wan, payload, Decimal(1), Decimal("0.1"), variant, rerun_of=origin
                )
                for n, (item, variant, payload, origin) in enumerate(jobs)
            ]
            store.add_jobs(session, made_id, rows)
            # Read by SQL: the models are a later schema's (their columns are not all there yet).
            stored = session.execute(text("SELECT job_key, id FROM jobs WHERE batch_id = :b"), {"b": made_id})
            by_key = {key: job_id for key, job_id in stored}
            return [by_key[row.key] for row in rows]

    a, b, c0, c1, _d, e = parent = batch(
        "p",
        [
            (0, 0, {"prompt": "a", "seed": 7}, None),  # failed, its seed pinned
            (1, 0, {"prompt": "b"}, None),  # failed after fal returned seed 123
            (2, 0, {"prompt": "c", "resolution": "480p"}, None),  # failed, seed 5 returned
            (2, 1, {"prompt": "c", "resolution": "720p"}, None),  # succeeded, seed 9
            (3, 0, {"prompt": "d"}, None),  # failed, no seed known
            (4, 0, {"prompt": "e"}, None),  # failed, no seed known
        ],
        None,
    )
    with empty_engine.begin() as conn:
        parent_id = conn.execute(text("SELECT batch_id FROM jobs WHERE id = :j"), {"j": a}).scalar_one()
        conn.execute(text("UPDATE jobs SET state = 'failed' WHERE batch_id = :b"), {"b": parent_id})
        for job, seed in ((b, "123"), (c0, "5"), (c1, "9")):
            conn.execute(text("UPDATE jobs SET seed = :s WHERE id = :j"), {"s": seed, "j": job})
        conn.execute(text("UPDATE jobs SET state = 'succeeded' WHERE id = :j"), {"j": c1})
    old = batch(
        "p-rerun-1",
        [
            (0, 0, {"prompt": "a", "seed": 7}, None),  # a plain rerun: the stored input
            (1, 0, {"prompt": "b", "seed": 123}, None),  # the seed fal returned
            (2, 0, {"prompt": "c", "resolution": "480p", "seed": 5}, None),  # --vary resolution=480p,720p
            (2, 1, {"prompt": "c", "resolution": "720p", "seed": 5}, None),  # … renumbered: c0's, not c1's
            (3, 0, {"prompt": "d", "seed": 99}, None),  # --new-seeds: another video
            (4, 0, {"prompt": "e"}, e),  # linked already (a rerun made since 0014)
        ],
        parent_id,
    )
    unrelated = batch("q", [(0, 0, {"prompt": "a", "seed": 7}, None)], None)
    with empty_engine.begin() as conn:  # the old rerun rendered them all (e's repeat failed)
        for job in old:
            state = "failed" if job == old[5] else "succeeded"
            conn.execute(text("UPDATE jobs SET state = :s WHERE id = :j"), {"s": state, "j": job})

    migrate(empty_engine, from_models=False)

    with empty_engine.connect() as conn:
        links: dict[str, str | None] = dict(conn.execute(text("SELECT id, rerun_of FROM jobs")).all())
    assert [links[j] for j in old] == [a, b, c0, None, None, e]
    assert all(links[j] is None for j in [*parent, *unrelated])
    with db.read_scope(empty_engine) as session:
        covered = renders(session, parent_id, simulated=False)
        assert {job for job, found in covered.items() if found} == {a, b, c0}
        assert len(store.rerun_repeats(session, parent_id, RERUN_FAILED_STATES)) == 4
    assert drift(empty_engine) == []


def test_a_database_a_newer_wanbatch_migrated_is_refused_in_one_line(empty_engine: Engine) -> None:
    """Alembic's "Can't locate revision" was an internal error of every command: now the one
    line (exit 2) ``doctor`` gives, and nothing is changed."""
    from jobs.errors import ConfigError

    migrate(empty_engine, from_models=False)
    with empty_engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    for change in (partial(migrate, empty_engine), partial(downgrade, empty_engine, "0020")):
        with pytest.raises(ConfigError) as refused:
            change()
        assert "\n" not in str(refused.value)
        assert str(refused.value).startswith("WANBATCH_DATABASE_URL ")
        assert str(refused.value).endswith(
            f"schema 0099 is not one this wanbatch knows (it expects {SCHEMA_HEAD}): a newer wanbatch "
            "migrated it; upgrade wanbatch on this host to the version that migrated the database"
        )
    with empty_engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0099"


@pytest.mark.parametrize("from_models", [True, False], ids=["from-models", "from-history"])
def test_a_database_with_tables_of_its_own_is_refused_not_taken_over(
    empty_engine: Engine, from_models: bool
) -> None:
    """Someone else's database (tables, no alembic_version) got wanbatch's tables added beside
    its own in silence: the upgrade from nothing ran. Now the one line (exit 2), nothing created."""
    from jobs.errors import ConfigError

    with empty_engine.begin() as conn:
        conn.execute(text("CREATE TABLE inventory (sku INTEGER)"))
    with pytest.raises(ConfigError) as refused:
        migrate(empty_engine, from_models=from_models)
    line = str(refused.value)
    assert "\n" not in line
    assert line.startswith("WANBATCH_DATABASE_URL ")
    assert "is not a wanbatch database: it holds tables of its own (inventory) and no wanbatch schema" in line
    assert line.endswith("point WANBATCH_DATABASE_URL at wanbatch's database, or at a new, empty one")
    assert set(inspect(empty_engine).get_table_names()) == {"inventory"}


def _extension_member(engine: Engine, table: str) -> None:
    """Make ``table`` a member of an installed extension, as PostGIS's ``spatial_ref_sys`` is of
    ``postgis``: plpgsql stands in for it (installed in every PostgreSQL database; superuser)."""
    with engine.begin() as conn:
        conn.execute(text(f"ALTER EXTENSION plpgsql ADD TABLE {table}"))


def _members(engine: Engine) -> set[str]:
    """The tables that belong to an extension, as the catalogue says (not as ``jobs.db`` reads it)."""
    with engine.connect() as conn:
        return set(
            conn.execute(
                text(
                    "SELECT objid::regclass::text FROM pg_depend WHERE classid = 'pg_class'::regclass "
                    "AND refclassid = 'pg_extension'::regclass AND deptype = 'e'"
                )
            ).scalars()
        )


@pytest.mark.parametrize("from_models", [True, False], ids=["from-models", "from-history"])
def test_an_extensions_tables_do_not_make_a_database_foreign(
    new_pg_database: Callable[[], str], from_models: bool
) -> None:
    """A PostgreSQL database with an extension whose tables live in its schema (PostGIS's
    ``spatial_ref_sys``) was refused as someone else's. Those tables are the extension's: the
    database is adopted — created, migrated from an older revision with wanbatch's tables there,
    taken down to base and adopted again — and the extension's table is left as it was. It is the
    membership that counts, not the name: the same table, no extension's, is refused."""
    from jobs.errors import ConfigError

    engine = make_engine(new_pg_database())
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE spatial_ref_sys (srid INTEGER PRIMARY KEY, auth_name TEXT)"))
            conn.execute(text("INSERT INTO spatial_ref_sys VALUES (4326, 'EPSG')"))
        with pytest.raises(ConfigError, match=r"tables of its own \(spatial_ref_sys\)"):
            migrate(engine, from_models=from_models)
        _extension_member(engine, "spatial_ref_sys")

        migrate(engine, from_models=from_models)
        assert tables(engine) == set(Base.metadata.tables) | {"spatial_ref_sys"}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == SCHEMA_HEAD
        downgrade(engine, "0020")  # wanbatch's tables there, at an older revision: the migrations
        migrate(engine, from_models=from_models)
        downgrade(engine, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version", "spatial_ref_sys"}
        migrate(engine, from_models=from_models)
        assert tables(engine) == set(Base.metadata.tables) | {"spatial_ref_sys"}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == SCHEMA_HEAD
            assert conn.execute(text("SELECT srid, auth_name FROM spatial_ref_sys")).all() == [(4326, "EPSG")]
        assert _members(engine) == {"spatial_ref_sys"}
    finally:
        engine.dispose()


def test_a_table_of_its_own_beside_an_extensions_is_still_refused(new_pg_database: Callable[[], str]) -> None:
    """An extension's table does not excuse another one: the refusal names only the other."""
    from jobs.errors import ConfigError

    engine = make_engine(new_pg_database())
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE spatial_ref_sys (srid INTEGER PRIMARY KEY)"))
            conn.execute(text("CREATE TABLE inventory (sku INTEGER)"))
        _extension_member(engine, "spatial_ref_sys")
        for from_models in (True, False):
            with pytest.raises(ConfigError) as refused:
                migrate(engine, from_models=from_models)
            assert "it holds tables of its own (inventory) and no wanbatch schema" in str(refused.value)
        assert set(inspect(engine).get_table_names()) == {"inventory", "spatial_ref_sys"}
    finally:
        engine.dispose()


def test_an_empty_database_and_one_taken_down_to_base_are_still_adopted(empty_engine: Engine) -> None:
    """What the refusal above must not catch: a new, empty database, and one every migration was
    taken down from (Alembic's version table left behind, empty)."""
    migrate(empty_engine)
    assert tables(empty_engine) == set(Base.metadata.tables)
    downgrade(empty_engine, "base")
    assert set(inspect(empty_engine).get_table_names()) == {"alembic_version"}
    migrate(empty_engine)
    assert tables(empty_engine) == set(Base.metadata.tables)
    assert drift(empty_engine) == []


def test_migration_0039_adds_not_in_manifest_false_for_stored_jobs_and_takes_it_away(
    empty_engine: Engine,
) -> None:
    """0039 adds ``jobs.not_in_manifest``: False for every job stored before (which jobs an
    earlier resubmit left out is not recorded; the next submit of the manifest marks them), a
    job stored after it is False too; a downgrade drops it, and the rest is 0038's schema."""
    from jobs import db, store
    from tests.step_runtime import add_batch, job_ids

    migrate(empty_engine, "0038", from_models=False)
    assert "not_in_manifest" not in {c["name"] for c in inspect(empty_engine).get_columns("jobs")}
    with empty_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batches (id, name, manifest_path, manifest_sha256, created_at, state, priority, "
                "paused_by_user, reuse_outputs, simulated) VALUES ('b39', 'm39', '/m.yaml', :sha, :at, "
                "'active', 'normal', false, false, false)"
            ),
            {"sha": "0" * 64, "at": datetime(2026, 1, 1, tzinfo=UTC)},
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, batch_id, job_key, item_index, variant, endpoint, input, state, "
                "version, attempts, download_attempts, possible_duplicate_charges, est_billing_units, "
                "est_usd, "
                "created_at, updated_at) VALUES ('j39', 'b39', :key, 0, 0, 'fal-ai/wan-22', '{}', "
                "'failed', 3, 1, 0, 0, 1, 1, :at, :at)"
            ),
            {"key": "1" * 64, "at": datetime(2026, 1, 1, tzinfo=UTC)},
        )
    migrate(empty_engine, from_models=False)
    assert drift(empty_engine) == []
    after = add_batch(empty_engine, "m39-after", [("fal-ai/wan-22", {"prompt": "p"})])
    with db.session_scope(empty_engine) as session:
        flags = {
            job.id: job.not_in_manifest
            for batch in ("b39", after)
            for job in store.jobs_of_batch(session, batch)
        }
    assert flags == {"j39": False, job_ids(empty_engine, after)[0]: False}
    downgrade(empty_engine, "0038")
    assert "not_in_manifest" not in {c["name"] for c in inspect(empty_engine).get_columns("jobs")}
    with empty_engine.connect() as conn:
        assert conn.execute(text("SELECT state FROM jobs WHERE id = 'j39'")).scalar_one() == "failed"
    migrate(empty_engine, from_models=False)
    assert drift(empty_engine) == []


def test_migration_0050_adds_the_manifest_host_unknown_for_stored_batches_and_takes_it_away(
    empty_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0050 adds ``batches.manifest_host``: NULL (unknown) for every batch stored before, which
    a submit from another machine treats as before; read back through the models, a batch
    stored after it records its machine. A downgrade drops it, and the rest is 0049's schema."""
    from jobs import db, machine, store

    migrate(empty_engine, "0049", from_models=False)
    assert "manifest_host" not in {c["name"] for c in inspect(empty_engine).get_columns("batches")}
    with empty_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batches (id, name, manifest_path, manifest_sha256, created_at, state, priority, "
                "paused_by_user, reuse_outputs, simulated) VALUES ('b49', 'm49', '/m.yaml', :sha, :at, "
                "'active', 'normal', false, false, false)"
            ),
            {"sha": "0" * 64, "at": datetime(2026, 1, 1, tzinfo=UTC)},
        )
    migrate(empty_engine, from_models=False)
    assert drift(empty_engine) == []
    monkeypatch.setenv(machine.TEST_MACHINE_ENV, "host-50@" + "5" * 32)
    with db.session_scope(empty_engine) as session:
        before = store.get_batch(session, "b49")
        assert (before.manifest_path, before.manifest_host) == ("/m.yaml", None)
        assert machine.is_here(before.manifest_host) is None  # unknown: neither here nor elsewhere
        after, _ = store.get_or_create_batch(
            session,
            name="m50",
            manifest_path="/m50.yaml",
            manifest_sha256="0" * 64,
            budget_max_usd=None,
            manifest_host=machine.this_machine(),
        )
        after_id = after.id
    with db.read_scope(empty_engine) as session:
        stored = store.get_batch(session, after_id).manifest_host
    assert stored == "host-50@" + "5" * 32
    assert machine.is_here(stored) is True
    downgrade(empty_engine, "0049")
    assert "manifest_host" not in {c["name"] for c in inspect(empty_engine).get_columns("batches")}
    with empty_engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM batches")).scalar_one() == 2
    migrate(empty_engine, from_models=False)
    assert drift(empty_engine) == []


def test_migration_0051_adds_the_heartbeat_limits_unknown_for_stored_rows_and_takes_it_away(
    empty_engine: Engine,
) -> None:
    """0051 adds ``conductor_heartbeats.limits``: NULL (nothing published, not compared) for a
    row stored before; read back through the models, a beat stored after it carries its
    limits. A downgrade drops it, and the rest is 0050's schema."""
    from jobs import db, store
    from jobs.models import ConductorHeartbeat

    migrate(empty_engine, "0050", from_models=False)
    assert "limits" not in {c["name"] for c in inspect(empty_engine).get_columns("conductor_heartbeats")}
    at = datetime(2026, 1, 1, tzinfo=UTC)
    with empty_engine.begin() as conn:
        conn.execute(
            text("INSERT INTO conductor_heartbeats (owner, scope, seen_at) VALUES ('h:1:', 'b50', :at)"),
            {"at": at},
        )
    migrate(empty_engine, from_models=False)
    assert drift(empty_engine) == []
    with db.session_scope(empty_engine) as session:
        stored = session.get(ConductorHeartbeat, ("h:1:", "b50"))
        assert stored is not None
        assert stored.limits is None
        store.record_heartbeat(session, "h:2:", ["b51"], at, limits={"max_outstanding": 40})
    with db.read_scope(empty_engine) as session:
        assert store.live_limits(session, "h:9:", since=at) == {"h:2:": {"max_outstanding": 40}}
    downgrade(empty_engine, "0050")
    assert "limits" not in {c["name"] for c in inspect(empty_engine).get_columns("conductor_heartbeats")}
    with empty_engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM conductor_heartbeats")).scalar_one() == 2
    migrate(empty_engine, from_models=False)
    assert drift(empty_engine) == []


def test_migration_0039_marks_the_dropped_jobs_again_after_a_downgrade(empty_engine: Engine) -> None:
    """A downgrade below 0039 drops ``jobs.not_in_manifest``; its upgrade refilled it only from
    the stored manifest text of batches without ``items_from``, so a job a resubmit had dropped
    from an ``items_from`` batch (``cancelled``, ``error_type`` ``not_in_manifest``) lost its mark,
    and ``rerun --failed-only`` sent and billed it. The upgrade marks every such job again."""
    from sqlalchemy import update

    from jobs import db, store
    from jobs.models import NOT_IN_MANIFEST, Job
    from jobs.rerun import rerun_batch
    from jobs.settings import Settings
    from jobs.states import JobState

    migrate(empty_engine, from_models=False)

    def job(n: int) -> store.NewJob:
        return store.NewJob(
            key=f"{n:064x}",
            item_index=n,
            endpoint="fal-ai/wan-22",
            input={"prompt": f"row {n}"},
            est_billing_units=Decimal(1),
            est_usd=Decimal("0.40"),
        )

    with db.session_scope(empty_engine) as session:
        batch, _ = store.get_or_create_batch(
            session,
            name="rows",
            manifest_path="/m.yaml",
            manifest_sha256="0" * 64,
            budget_max_usd=None,
            manifest_text="name: rows\nendpoint: fal-ai/wan-22\nitems_from: prompts.jsonl\n",
        )
        batch_id = batch.id
        store.add_jobs(session, batch_id, [job(0), job(1)])
        store.resubmit_jobs(session, batch_id, [job(0)], lambda: 1)  # row 1 removed: dropped
        session.execute(update(Job).where(Job.job_key == f"{0:064x}").values(state=JobState.FAILED))
    downgrade(empty_engine, "0038")
    migrate(empty_engine, from_models=False)
    assert drift(empty_engine) == []
    with db.read_scope(empty_engine) as session:
        marks = {
            int(j.job_key, 16): (j.state, j.error_type, j.not_in_manifest)
            for j in store.jobs_of_batch(session, batch_id)
        }
    assert marks == {0: (JobState.FAILED, None, False), 1: (JobState.CANCELLED, NOT_IN_MANIFEST, True)}
    settings = Settings(database_url=empty_engine.url.render_as_string(hide_password=False))
    rerun = rerun_batch("rows", failed_only=True, settings=settings)
    with db.read_scope(empty_engine) as session:
        parent = {j.id: int(j.job_key, 16) for j in store.jobs_of_batch(session, batch_id)}
        assert [parent[str(j.rerun_of)] for j in store.jobs_of_batch(session, rerun.batch_id)] == [0]


def test_migration_0041_stores_batch_names_in_nfc_unless_two_spellings_clash(empty_engine: Engine) -> None:
    """0041 rewrites a batch name stored in another Unicode form than NFC (NFD: ``e`` and a
    combining accent) to NFC, so the manifest that stored it finds its batch again; two batches
    stored under one name in two spellings are both kept as they are (looked up by that name,
    they are refused as ambiguous). ASCII names are untouched; a downgrade changes nothing."""
    import unicodedata

    def form(kind: Any, name: str) -> str:
        return unicodedata.normalize(kind, name)

    names = {
        "a" * 32: form("NFD", "Café Noir"),  # alone: rewritten
        "b" * 32: form("NFC", "Crème"),  # the two spellings of one name: both kept
        "c" * 32: form("NFD", "Crème"),
        "d" * 32: "plain",
        "e" * 32: form("NFC", "Déjà vu"),  # already NFC
    }
    migrate(empty_engine, "0040", from_models=False)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    with empty_engine.begin() as conn:
        for batch_id, name in names.items():
            conn.execute(
                text(
                    "INSERT INTO batches (id, name, manifest_path, manifest_sha256, created_at, state) "
                    "VALUES (:id, :name, 'm.yaml', :sha, :at, 'active')"
                ),
                {"id": batch_id, "name": name, "sha": "0" * 64, "at": at},
            )

    def stored() -> dict[str, str]:
        with empty_engine.connect() as conn:
            return {row.id: row.name for row in conn.execute(text("SELECT id, name FROM batches"))}

    migrate(empty_engine, from_models=False)
    upgraded = {**names, "a" * 32: form("NFC", "Café Noir")}
    assert stored() == upgraded
    assert drift(empty_engine) == []
    downgrade(empty_engine, "0040")
    assert stored() == upgraded
    migrate(empty_engine, from_models=False)
    assert stored() == upgraded
    assert drift(empty_engine) == []


def test_alembic_commands_step_a_sqlite_database_with_data_down_and_up(tmp_path: Path) -> None:
    """``alembic downgrade -1`` connects through ``make_engine``, which turns SQLite's foreign
    keys on: a table rebuilt while another's rows refer to it (0019's ``jobs``, with a job event
    stored) failed with "FOREIGN KEY constraint failed". The command line unchecks them as
    ``migrate`` does, and turns them on again after."""
    from alembic import command

    from jobs.models import JobEvent
    from jobs.states import JobState as S
    from tests.step_runtime import add_batch, job_ids

    url = f"sqlite:///{tmp_path / 'steps.db'}"
    engine = make_engine(url)
    try:
        migrate(engine, from_models=False)
        batch_id = add_batch(engine, "steps", [("fal-ai/wan-22", {"prompt": p}) for p in ("a", "b")])
        jobs = job_ids(engine, batch_id)
        with engine.begin() as conn:
            for job_id in jobs:
                conn.execute(
                    insert(JobEvent).values(job_id=job_id, from_state=S.PENDING, to_state=S.QUEUED, version=1)
                )
    finally:
        engine.dispose()
    cfg = alembic_config()
    cfg.set_main_option("sqlalchemy.url", url)
    steps = [f"{n:04d}" for n in range(52, 14, -1)]  # 0052 (the head) down to 0015
    assert steps[0] == SCHEMA_HEAD
    for below in steps[1:]:
        command.downgrade(cfg, "-1")
        command.upgrade(cfg, "+1")  # and up again from every revision on the way
        command.downgrade(cfg, below)
    command.upgrade(cfg, "head")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == SCHEMA_HEAD
            assert conn.execute(text("SELECT COUNT(*) FROM job_events")).scalar_one() == 2
            assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
            assert conn.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
        assert drift(engine) == []
    finally:
        engine.dispose()


def test_migration_0022_keys_stored_data_uris_by_their_bytes(empty_engine: Engine, tmp_path: Path) -> None:
    """Jobs stored when a data URI was keyed by its text get the key the same manifest gives now
    (the image's bytes, as a file's): submitting it again to its batch adds nothing, and
    ``reuse_outputs`` finds them. A key the former rule does not give for the stored input, or one
    another job of the batch already holds, is left as it is; a downgrade gives the old keys back."""
    import base64
    import hashlib

    from PIL import Image

    from jobs import db, store
    from jobs.endpoints import get_endpoint
    from jobs.manifest import job_key, key_of, load_manifest

    migrate(empty_engine, "0021", from_models=False)
    wan = get_endpoint("fal-ai/wan-i2v")
    image = tmp_path / "a.png"
    Image.new("RGB", (480, 480), (100, 150, 200)).save(image)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    jpg = uri.replace("image/png", "image/x-png")  # the same bytes, another media type
    inline = {"prompt": "p", "seed": 7, "image_url": uri}
    local = {**inline, "seed": 9, "image_url": str(image)}
    rows = [  # (input, stored key, source_files)
        (inline, key_of(wan.id, inline), {"image_url": {"source": uri, "sha256": digest}}),
        ({**inline, "image_url": jpg}, key_of(wan.id, {**inline, "image_url": jpg}), None),  # its twin
        ({**inline, "seed": 8}, "f" * 64, None),  # a key the former rule does not give
        (local, job_key(wan, local), None),  # a file: keyed by its bytes already
    ]
    with db.session_scope(empty_engine) as session:
        store.add_jobs(
            session,
            older_batch(session, "replay"),
            [
                store.NewJob(key, n, wan.id, payload, Decimal(1), Decimal("0.1"), source_files=sources)
                for n, (payload, key, sources) in enumerate(rows)
            ],
        )

    def keys() -> list[str]:
        with empty_engine.connect() as conn:
            return list(conn.execute(text("SELECT job_key FROM jobs ORDER BY item_index")).scalars())

    old = [key for _, key, _ in rows]
    assert keys() == old
    migrate(empty_engine, from_models=False)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"name: replay\nendpoint: fal-ai/wan-i2v\nitems:\n  - {{prompt: p, seed: 7, image_url: '{uri}'}}\n",
        encoding="utf-8",
    )
    (replayed,) = load_manifest(manifest).jobs()
    assert replayed.key == job_key(wan, {**local, "seed": 7}) != old[0]
    assert keys() == [replayed.key, *old[1:]]
    assert drift(empty_engine) == []
    downgrade(empty_engine, "0021")
    assert keys() == old


def test_migration_0022_gives_the_key_to_a_succeeded_twin_and_0024_records_it_for_the_rest(
    empty_engine: Engine, tmp_path: Path
) -> None:
    """Of twins (one image, two spellings) a succeeded one takes the new key, before the first in
    manifest order: a failed twin holding it hid the video from ``reuse_outputs``. The twin left
    on its old key records the new one (``content_key``, 0024); a downgrade gives the old keys
    back."""
    import base64

    from PIL import Image

    from jobs import db, store
    from jobs.endpoints import get_endpoint
    from jobs.manifest import job_key, key_of

    migrate(empty_engine, "0021", from_models=False)
    wan = get_endpoint("fal-ai/wan-i2v")
    image = tmp_path / "a.png"
    Image.new("RGB", (480, 480), (10, 150, 200)).save(image)
    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    first = {"prompt": "p", "seed": 7, "image_url": uri}
    second = {**first, "image_url": uri.replace("image/png", "image/x-png")}
    with db.session_scope(empty_engine) as session:
        store.add_jobs(
            session,
            older_batch(session, "twins"),
            [
                store.NewJob(key_of(wan.id, payload), n, wan.id, payload, Decimal(1), Decimal("0.1"))
                for n, payload in enumerate([first, second])
            ],
        )
    with empty_engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET state = 'failed' WHERE item_index = 0"))
        conn.execute(text("UPDATE jobs SET state = 'succeeded' WHERE item_index = 1"))

    def keys() -> list[tuple[str, ...]]:
        with empty_engine.connect() as conn:
            columns = (
                "job_key, content_key"
                if "content_key" in {c["name"] for c in inspect(conn).get_columns("jobs")}
                else "job_key"
            )
            return [tuple(r) for r in conn.execute(text(f"SELECT {columns} FROM jobs ORDER BY item_index"))]

    old = keys()
    migrate(empty_engine, from_models=False)
    new = job_key(wan, {**first, "image_url": str(image)})
    assert keys() == [(old[0][0], new), (new, None)]
    assert drift(empty_engine) == []
    downgrade(empty_engine, "0021")
    assert keys() == old


def _strict(text_: str) -> Any:
    """``text_`` read as JSON any strict reader takes (``NaN``/``Infinity`` refused)."""
    import json

    def refuse(literal: str) -> None:
        raise ValueError(f"not JSON: {literal}")

    return json.loads(text_, parse_constant=refuse)


def test_migration_0023_nulls_the_non_finite_numbers_sqlite_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Earlier versions wrote a non-finite number of fal's answers to SQLite as Python's ``json``
    writes it, ``NaN``/``Infinity``: no JSON (SQLite's JSON functions, exports and sidecars
    refuse it). 0023 makes each ``null`` in every JSON column, a document that is nothing but one
    SQL NULL, and leaves the rest, and a ``NaN`` in a string, as it was."""
    from sqlalchemy import update

    from jobs import db, store
    from jobs.models import Batch, Job, JobEvent, WebhookDelivery, utcnow
    from jobs.settings import get_settings
    from jobs.states import JobState as S
    from tests.in_process import run_main
    from tests.step_runtime import job_ids

    nan, inf = float("nan"), float("inf")
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    try:
        migrate(engine, "0022", from_models=False)
        with db.session_scope(engine) as session:
            batch_id = older_batch(session, "odd")
            store.add_jobs(
                session,
                batch_id,
                [
                    store.NewJob(
                        "0" * 64,
                        0,
                        "fal-ai/wan-22",
                        {"prompt": "NaN and Infinity, in words"},
                        Decimal(5),
                        Decimal("0.25"),
                    )
                ],
            )
        (job_id,) = job_ids(engine, batch_id)
        with engine.begin() as conn:  # as the JSON type wrote them: json.dumps, NaN allowed
            conn.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    state=S.SUCCEEDED,
                    media={"width": 832, "fps": nan, "duration_s": 5.0},
                    provider_metrics={"inference_time": inf},
                    provider_output={"seed": 7, "timings": [1.5, -inf, {"deep": [nan]}], "note": "NaN"},
                )
            )
            conn.execute(update(Batch).where(Batch.id == batch_id).values(rerun_options={"x": -inf}))
            conn.execute(
                insert(JobEvent).values(
                    job_id=job_id, from_state=S.PENDING, to_state=S.QUEUED, version=1, details=nan
                )
            )
            conn.execute(
                insert(WebhookDelivery).values(
                    request_id="r",
                    body_sha256="0" * 64,
                    status="OK",
                    body={"payload": {"x": inf}},
                    received_at=utcnow(),
                    repeats=0,
                )
            )
            assert "NaN" in conn.execute(text("SELECT media FROM jobs")).scalar_one()
        migrate(engine, from_models=False)
        with engine.connect() as conn:
            job = conn.execute(text("SELECT input, media, provider_metrics, provider_output FROM jobs")).one()
            assert _strict(job.input) == {"prompt": "NaN and Infinity, in words"}
            assert _strict(job.media) == {"width": 832, "fps": None, "duration_s": 5.0}
            assert _strict(job.provider_metrics) == {"inference_time": None}
            assert _strict(job.provider_output) == {
                "seed": 7,
                "timings": [1.5, None, {"deep": [None]}],
                "note": "NaN",
            }
            options = conn.execute(text("SELECT rerun_options FROM batches")).scalar_one()
            assert _strict(options) == {"x": None}
            assert conn.execute(text("SELECT details FROM job_events")).scalar_one() is None  # SQL NULL
            body = conn.execute(text("SELECT body FROM webhook_deliveries")).scalar_one()
            assert _strict(body) == {"payload": {"x": None}}
            assert conn.execute(text("SELECT json_extract(media, '$.fps') FROM jobs")).scalar_one() is None
        assert drift(engine) == []
    finally:
        engine.dispose()
    out = tmp_path / "odd.jsonl"
    monkeypatch.setenv("WANBATCH_DATABASE_URL", url)
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    get_settings.cache_clear()
    db.close_engines()
    try:
        assert run_main(["export", batch_id, "--format", "jsonl", "-o", str(out)], monkeypatch) == 0
    finally:
        get_settings.cache_clear()
        db.close_engines()
    (exported,) = [_strict(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert exported["media"]["fps"] is None


def test_migration_0025_gives_jobs_never_sent_zero_billing_units(empty_engine: Engine) -> None:
    """Jobs that ended failed or cancelled without being sent were stored with ``actual_usd`` 0
    but ``actual_billing_units`` NULL (exports: ``cost_usd`` 0, ``billing_units`` null). 0025
    gives them 0 units (and 0 USD where that was NULL too); a job sent, billed or still running
    keeps what it holds."""
    from tests.step_runtime import add_batch, job_ids

    migrate(empty_engine, from_models=False)
    batch_id = add_batch(empty_engine, "m25", [("fal-ai/wan-22", {"prompt": str(n)}) for n in range(7)])
    jobs = job_ids(empty_engine, batch_id)
    sent = datetime(2026, 1, 1, tzinfo=UTC)
    #: (state, submitted_at, actual_usd, actual_billing_units) as stored before 0025.
    before: list[tuple[str, datetime | None, str | None, str | None]] = [
        ("cancelled", None, "0", None),  # a budget cancel: the case exports showed
        ("failed", None, "0", None),  # failed before its POST left (its input file changed)
        ("cancelled", None, None, None),  # stored before a job never sent got its $0
        ("cancelled", sent, None, None),  # sent, its bill unknown: not "never sent"
        ("failed", None, "0.5", None),  # billed something: left as it is
        ("pending", None, None, None),  # not finished
        ("succeeded", None, "0", "0"),  # reused: both set already
    ]
    downgrade(empty_engine, "0024")
    with empty_engine.begin() as conn:
        for job_id, (state, at, usd, units) in zip(jobs, before, strict=True):
            conn.execute(
                text(
                    "UPDATE jobs SET state = :s, submitted_at = :at, actual_usd = :usd, "
                    "actual_billing_units = :units WHERE id = :j"
                ),
                {"s": state, "at": at, "usd": usd, "units": units, "j": job_id},
            )

    def number(value: Any) -> float | None:
        return None if value is None else float(value)

    def stored() -> list[tuple[float | None, float | None]]:
        with empty_engine.connect() as conn:
            found = conn.execute(text("SELECT id, actual_usd, actual_billing_units FROM jobs"))
            rows = {r[0]: (number(r[1]), number(r[2])) for r in found}
        return [rows[j] for j in jobs]

    migrate(empty_engine, from_models=False)
    assert stored() == [
        (0.0, 0.0),
        (0.0, 0.0),
        (0.0, 0.0),
        (None, None),
        (0.5, None),
        (None, None),
        (0.0, 0.0),
    ]
    downgrade(empty_engine, "0024")  # changes nothing: 0 is what they were meant to hold
    assert stored()[:3] == [(0.0, 0.0)] * 3
    migrate(empty_engine, from_models=False)
    assert drift(empty_engine) == []


# --------------------------------------------------------------------------- live older processes

_PREVIOUS = f"{int(SCHEMA_HEAD) - 1:04d}"


@pytest.fixture
def live_child() -> Iterator[subprocess.Popen[bytes]]:
    """A process of this host that lives until the test ends it: an older wanbatch, as far as the
    rows naming its pid tell."""
    child = subprocess.Popen(["sleep", "600"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def _owner(pid: int) -> str:
    import socket

    return f"{socket.gethostname()}:{pid}:"


def _beat(engine: Engine, owner: str, seen_at: datetime) -> None:
    """A heartbeat row, written with the columns every schema from 0010 on has."""
    from sqlalchemy import String, column, table

    from jobs.models import UTCDateTime

    beats = table(
        "conductor_heartbeats",
        column("owner", String()),
        column("scope", String()),
        column("seen_at", UTCDateTime()),
    )
    with engine.begin() as conn:
        conn.execute(insert(beats).values(owner=owner, scope="*", seen_at=seen_at))


def _version(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one())


def _status(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> int:
    """``wanbatch status`` on ``engine``'s database, in process: its exit code."""
    from jobs import db
    from jobs.settings import get_settings
    from tests.in_process import run_main

    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    get_settings.cache_clear()
    db.close_engines()
    try:
        return run_main(["status"], monkeypatch)
    finally:
        get_settings.cache_clear()
        db.close_engines()


def test_migration_0032_marks_the_earlier_numbers_of_unfinished_sent_jobs_unknown(
    empty_engine: Engine,
) -> None:
    """A job may have been renumbered by a resubmit before 0032 recorded its earlier numbers
    (``earlier_items``): one sent and not finished gets ``[EARLIER_ITEMS_UNKNOWN]``, so its
    download lists the folder as every download did before; the others get NULL (never
    renumbered: no name looked at), and a downgrade drops it."""
    from jobs import db, store
    from jobs.models import EARLIER_ITEMS_UNKNOWN
    from tests.step_runtime import add_batch, job_ids

    migrate(empty_engine, from_models=False)
    batch_id = add_batch(empty_engine, "m32", [("fal-ai/wan-22", {"prompt": str(n)}) for n in range(5)])
    jobs = job_ids(empty_engine, batch_id)
    sent = datetime(2026, 1, 1, tzinfo=UTC)
    before: list[tuple[str, datetime | None]] = [
        ("downloading", sent),  # may hold a video saved under its old number: lists the folder
        ("queued", sent),  # its download is still to come: lists it too
        ("pending", None),  # never sent: no video anywhere
        ("succeeded", sent),  # finished: never downloads again
        ("failed", sent),
    ]
    downgrade(empty_engine, "0031")
    with empty_engine.begin() as conn:
        for job_id, (state, at) in zip(jobs, before, strict=True):
            conn.execute(
                text("UPDATE jobs SET state = :s, submitted_at = :at WHERE id = :j"),
                {"s": state, "at": at, "j": job_id},
            )
    migrate(empty_engine, from_models=False)
    with db.session_scope(empty_engine) as session:  # read as the model reads it
        earlier = {job.id: job.earlier_items for job in store.jobs_of_batch(session, batch_id)}
    unknown = [EARLIER_ITEMS_UNKNOWN]
    assert [earlier[j] for j in jobs] == [unknown, unknown, None, None, None]
    downgrade(empty_engine, "0031")
    columns = {c["name"] for c in inspect(empty_engine).get_columns("jobs")}
    assert "earlier_items" not in columns
    assert "renumbered_at" not in columns


def test_an_upgrade_waits_for_an_older_process_that_beats(
    empty_engine: Engine,
    live_child: subprocess.Popen[bytes],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Any command, a read-only ``status`` too, upgraded the schema under an older ``run`` still
    working on the database, which then sent nothing more and never ended. Now, while a process
    beat within the last minute, every command refuses in one line (exit 2) and changes nothing,
    and ``doctor`` says why; once its heartbeat is a minute old (a worker of another host that
    was stopped: nothing here can ask that host about its pid), the next command upgrades."""
    from datetime import timedelta

    from jobs.db import HEARTBEAT_STALE_SECONDS
    from jobs.models import utcnow
    from jobs.settings import get_settings
    from worker.doctor import check_database

    migrate(empty_engine, from_models=False)
    downgrade(empty_engine, _PREVIOUS)
    owner = _owner(live_child.pid)
    _beat(empty_engine, owner, utcnow())
    capsys.readouterr()
    assert _status(empty_engine, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: WANBATCH_DATABASE_URL ")
    said = (
        f"the database is at schema {_PREVIOUS} and this wanbatch needs {SCHEMA_HEAD}; 1 wanbatch "
        f"process is using it ({owner[:-1]}, last seen "
    )
    assert f": {said}" in line
    assert line.endswith(
        "stop it (a killed one counts until it has been silent 60 s and its job leases expire), "
        "then run any command to upgrade the database"
    )
    assert _version(empty_engine) == _PREVIOUS
    check = check_database(get_settings())  # the env _status set
    assert check.status == "fail"
    assert (
        f"schema {_PREVIOUS}, and this wanbatch needs {SCHEMA_HEAD}; 1 wanbatch process is using it"
        in check.detail
    )
    assert (check.fix or "").startswith("stop it")

    with empty_engine.begin() as conn:  # silent for over a minute: stopped
        conn.execute(text("DELETE FROM conductor_heartbeats"))
    _beat(empty_engine, owner, utcnow() - timedelta(seconds=HEARTBEAT_STALE_SECONDS + 5))
    assert _status(empty_engine, monkeypatch) == 0
    assert _version(empty_engine) == SCHEMA_HEAD
    assert drift(empty_engine) == []


def test_an_upgrade_of_a_schema_without_heartbeats_waits_for_a_live_lease(
    empty_engine: Engine,
    live_child: subprocess.Popen[bytes],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Schema 0008 has no heartbeats: a job leased to a live process until later is what tells
    that an older run works on it. Refused while that process lives; once it has ended, its
    lease (not expired yet) holds nothing back and the next command upgrades."""
    from datetime import timedelta

    from sqlalchemy import update

    from jobs.models import Job, utcnow
    from tests.step_runtime import add_batch

    migrate(empty_engine, from_models=False)
    add_batch(empty_engine, "old", [("fal-ai/wan-22", {"prompt": "a lease"})])
    owner = _owner(live_child.pid)
    with empty_engine.begin() as conn:
        until = utcnow() + timedelta(minutes=5)
        conn.execute(update(Job).values(lease_owner=f"{owner}123", lease_expires_at=until))
    downgrade(empty_engine, "0008")
    assert "conductor_heartbeats" not in tables(empty_engine)
    capsys.readouterr()
    assert _status(empty_engine, monkeypatch) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        f"the database is at schema 0008 and this wanbatch needs {SCHEMA_HEAD}; 1 wanbatch process is "
        f"using it ({owner[:-1]}, holding jobs for "
    ) in line
    assert _version(empty_engine) == "0008"

    live_child.kill()
    live_child.wait()  # ended: the lease it left is no one's
    assert _status(empty_engine, monkeypatch) == 0
    assert _version(empty_engine) == SCHEMA_HEAD


def test_an_upgrade_refused_names_every_worker_not_only_the_leader(
    empty_engine: Engine, live_child: subprocess.Popen[bytes]
) -> None:
    """Only the workers' tick leader beat: a refused upgrade named it alone ("1 wanbatch process
    is using it"), the operator stopped it and was refused again, naming the next. Every worker
    beats now (the leader for every batch, the others as workers, every 10 s), and the refusal
    counts and names them all."""
    import threading

    from jobs.errors import ConfigError
    from tests.step_runtime import make_runtime, settings_for
    from worker.conductor import Conductor

    other = subprocess.Popen(["sleep", "600"])
    try:
        migrate(empty_engine, from_models=False)
        conductors = []
        for pid, leads in ((live_child.pid, True), (other.pid, False)):
            rt = make_runtime(empty_engine, settings_for("https://queue.test", "guard-key-4d1e"))
            rt.owner = f"{_owner(pid)}1"  # as a worker process of its own would be named
            conductor = Conductor(rt, stream=False)
            stopping = threading.Event()
            runner = threading.Thread(
                target=conductor.run,
                args=(stopping,),
                kwargs={"resilient": True, "leads": (lambda lead=leads: lead)},
            )
            runner.start()
            conductors.append((stopping, runner))
        try:
            beaten = {beat_owner(f"{_owner(live_child.pid)}1"), beat_owner(f"{_owner(other.pid)}1")}
            deadline = datetime.now(UTC).timestamp() + 30  # only so that a beat never written fails
            while True:
                with empty_engine.connect() as conn:
                    owners = set(conn.execute(text("SELECT owner FROM conductor_heartbeats")).scalars())
                if owners >= beaten or datetime.now(UTC).timestamp() > deadline:
                    break
                threading.Event().wait(0.05)
        finally:
            for stopping, runner in conductors:  # stopped without closing: their rows stay, as live
                stopping.set()
                runner.join(20)
        downgrade(empty_engine, _PREVIOUS)
        with pytest.raises(ConfigError) as refused:
            migrate(empty_engine, from_models=False)
        said = str(refused.value)
        assert "2 wanbatch processes are using it (" in said, said
        for pid in (live_child.pid, other.pid):
            assert f"{_owner(pid)[:-1]}, last seen " in said, said
        assert said.endswith(
            "stop them (a killed one counts until it has been silent 60 s and its job "
            "leases expire), then run any command to upgrade the database"
        ), said
    finally:
        other.kill()
        other.wait()


def test_a_process_that_upgraded_first_is_not_taken_for_an_older_one(
    empty_engine: Engine, live_child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes of this version starting together: the second read the older schema, then
    waited for the lock while the first upgraded and began to beat. Under the lock it finds the
    schema current and goes on; the first one's heartbeat is not an older process's."""
    from jobs import db
    from jobs.models import utcnow

    migrate(empty_engine, from_models=False)
    _beat(empty_engine, _owner(live_child.pid), utcnow())  # the first process, at work
    read = db._current_schema
    seen_before_the_lock = {_PREVIOUS}
    monkeypatch.setattr(db, "_current_schema", lambda engine: (seen_before_the_lock, read(engine)[1]))
    migrate(empty_engine, from_models=False)  # no refusal
    assert _version(empty_engine) == SCHEMA_HEAD
