"""A reference no database can hold names nothing, on SQLite and PostgreSQL alike.

PostgreSQL's text cannot hold a NUL: a lookup by a batch reference, job id or endpoint filter
carrying one was refused as a data error there (the dashboard's 400) while SQLite simply found
nothing (404). A lone surrogate (a command line that is not UTF-8: ``wanbatch status $'\\xff…'``)
cannot be sent to either: the CLI answered an internal error (exit 70). Both now name nothing
before any query: "no batch …" (exit 2, or 404), an empty list, no such job.
"""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

import cli
from cli import startup
from jobs import listing, store
from jobs.errors import NotFoundError
from jobs.models import Batch
from jobs.settings import get_settings

#: A NUL (PostgreSQL refuses it) and a lone surrogate (what Python makes of a byte that is not
#: UTF-8 on a command line: no database can be sent it).
UNSTORABLE = ("ab\x00cdef", "ab\udcffcdef")


def _batch(session: Session) -> str:
    batch, _created = store.get_or_create_batch(
        session, name="refs", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
    )
    store.add_jobs(
        session,
        batch.id,
        [
            store.NewJob(
                key="0" * 64,
                item_index=0,
                variant=0,
                endpoint="fal-ai/wan-i2v",
                input={"prompt": "a boat"},
                est_billing_units=Decimal(1),
                est_usd=Decimal("0.20"),
            )
        ],
    )
    session.commit()
    return batch.id


@pytest.mark.parametrize("ref", UNSTORABLE)
def test_a_lookup_by_an_unstorable_text_names_nothing(
    session: Session, statements: list[str], ref: str
) -> None:
    """Not found, and nothing asked of the database: on PostgreSQL a refused query would also
    have aborted the transaction, so the session goes on working after it."""
    batch_id = _batch(session)
    statements.clear()
    # Shown as the byte it stands for (``\\xff``), never as a lone surrogate (``\\udcff``).
    with pytest.raises(NotFoundError, match=r"^no batch 'ab\\(x00|xff)cdef': give a batch name"):
        store.get_batch(session, ref)
    with pytest.raises(NotFoundError, match=r"^no batch "):
        store.get_batch(session, batch_id + ref)  # a real id, then the character
    assert listing.job_output(session, ref) is None
    page = listing.list_jobs(session, batch_id, endpoint=f"fal-ai/wan-i2v{ref}")
    assert page.rows == []
    assert not page.has_prev
    assert not page.has_next
    assert statements == []
    assert store.get_batch(session, "refs").id == batch_id  # the transaction is still good
    assert len(listing.list_jobs(session, batch_id, endpoint="fal-ai/wan-i2v").rows) == 1


def test_other_control_characters_are_still_looked_up(session: Session) -> None:
    """Only what no database can hold is refused unasked: a name stored before control
    characters were refused in names (a tab, say) is still found by it."""
    batch_id = _batch(session)
    session.execute(update(Batch).where(Batch.id == batch_id).values(name="old\tname"))
    session.commit()
    assert store.get_batch(session, "old\tname").id == batch_id
    with pytest.raises(NotFoundError, match=r"^no batch 'a\\x01b'"):
        store.get_batch(session, "a\x01b")


@pytest.mark.parametrize("command", ["status", "cancel", "pause", "cost"])
def test_the_cli_says_no_such_batch_for_a_reference_that_is_not_utf8(
    engine: Engine,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    command: str,
) -> None:
    """``wanbatch status $'ab\\xffcdef'``: Python reads the byte as a lone surrogate; it was an
    internal error (exit 70, a crash report), and is the not-found line (exit 2)."""
    _batch(session)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # a crash report (the bug) goes there
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    get_settings.cache_clear()
    # In process: the GC pause of a real start-up would outlive the test (cli.startup).
    monkeypatch.setattr(startup, "pause", lambda: None)
    monkeypatch.setattr(sys, "argv", ["wanbatch", command, UNSTORABLE[1]])
    try:
        with pytest.raises(SystemExit) as ended:
            cli.main()
    finally:
        get_settings.cache_clear()
    out, err = capsys.readouterr()
    assert ended.value.code == 2, (out, err)
    # The byte as typed, never a lone surrogate (``'ab\\udcffcdef'``, as ``{ref!r}`` showed it).
    assert err.startswith("error: no batch 'ab\\xffcdef': give a batch name"), err
    assert "internal error" not in out + err
    assert not list(tmp_path.glob("wanbatch-crash-*"))
