"""``submit`` and ``run MANIFEST`` warn, as ``validate`` and ``estimate`` do, when the estimate
exceeds ``WANBATCH_DAILY_BUDGET_USD`` (or what is left of it today): a warning on stderr (with
``--json`` too, and in its ``budget_warnings``), never a refusal. Before, they stored the batch
without a word, and the first anyone heard of the cap was ``run`` cancelling jobs."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import select, update

from falsim.server import SimulatorHandle
from jobs import db, store
from jobs.models import Job, utcnow
from jobs.settings import get_settings
from jobs.states import JobState
from tests.e2e.e2e_helpers import MakeManifest, Wb

#: 4 jobs × $0.20.
FOUR_JOBS = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
  num_frames: 81
  image_url: images/landscape.jpg
matrix:
  seed: [1, 2, 3, 4]
items:
  - prompt: Clouds drifting past the peak
"""

WHOLE = "the estimate $0.80 exceeds today's $0.50 cap (WANBATCH_DAILY_BUDGET_USD): only about 2 of 4"
ADVICE = "the rest end cancelled (daily budget); raise it, or wait for the next UTC day"


def _daily_cap(monkeypatch: pytest.MonkeyPatch, usd: str | None) -> None:
    if usd is None:
        monkeypatch.delenv("WANBATCH_DAILY_BUDGET_USD", raising=False)
    else:
        monkeypatch.setenv("WANBATCH_DAILY_BUDGET_USD", usd)
    get_settings.cache_clear()


def _warned(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "WANBATCH_DAILY_BUDGET_USD" in line]


def test_submit_warns_when_the_estimate_exceeds_the_daily_budget(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = manifest("daily", FOUR_JOBS.format(name="daily"))
    _daily_cap(monkeypatch, "0.50")
    said = wb("estimate", over).stderr  # the words validate and estimate use
    assert WHOLE in " ".join(said.split())

    done = wb("submit", over)
    assert done.code == 0, done.stderr  # a warning, not a refusal: the batch is stored
    (line,) = _warned(done.stderr)  # one line, on stderr
    assert WHOLE in line
    assert ADVICE in line
    assert WHOLE not in done.stdout  # stdout: the batch id alone
    assert done.stdout.strip()

    as_json = wb("submit", over, "--json")
    assert as_json.code == 0, as_json.stderr
    (text,) = as_json.json()["budget_warnings"]
    assert WHOLE in text
    assert any(WHOLE in w for w in as_json.json()["warnings"])
    assert len(_warned(as_json.stderr)) == 1  # on stderr with --json too

    # Under the cap: nothing said; without the setting: nothing said.
    _daily_cap(monkeypatch, "5")
    quiet = wb("submit", over, "--json")
    assert _warned(quiet.stderr) == []
    assert quiet.json()["budget_warnings"] == []
    _daily_cap(monkeypatch, None)
    assert wb("submit", over, "--json").json()["budget_warnings"] == []


def test_submit_counts_what_other_batches_committed_today(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    _daily_cap(monkeypatch, "1.00")
    assert wb("submit", manifest("spent", FOUR_JOBS.format(name="spent"))).code == 0
    engine = db.open_engine(get_settings())
    with db.session_scope(engine) as session:
        batch_id = store.get_batch(session, "spent").id
        session.execute(
            update(Job)
            .where(Job.batch_id == batch_id)
            .values(state=JobState.QUEUED, submitted_at=utcnow(), est_usd=Decimal("0.20"))
        )
    done = wb("submit", manifest("daily", FOUR_JOBS.format(name="daily")))
    assert done.code == 0, done.stderr
    (line,) = _warned(done.stderr)
    left = (
        "the estimate $0.80 exceeds the $0.20 left of today's $1.00 cap (WANBATCH_DAILY_BUDGET_USD; "
        "$0.80 committed today by other batches: spent): only about 1 of 4 job(s) will run today"
    )
    assert left in line


def test_run_warns_before_it_runs(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = manifest("daily", FOUR_JOBS.format(name="daily"))
    _daily_cap(monkeypatch, "0.50")
    done = wb("run", over, "--json", "--no-progress")
    assert done.code == 1, done.stderr  # the cap cancelled some: as before
    (line, *_rest) = _warned(done.stderr)
    assert WHOLE in line
    assert ADVICE in line
    assert done.json()["counts"]["succeeded"] == 2


def _sent_today(name: str, states: dict[int, JobState]) -> None:
    """The batch's jobs (by item index order) in ``states``, sent today at $0.20 each."""
    engine = db.open_engine(get_settings())
    with db.session_scope(engine) as session:
        batch_id = store.get_batch(session, name).id
        ids = list(session.execute(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.id)).scalars())
        for n, state in states.items():
            session.execute(
                update(Job)
                .where(Job.id == ids[n])
                .values(state=state, submitted_at=utcnow(), est_usd=Decimal("0.20"))
            )


def test_submit_again_counts_its_own_sent_jobs_once(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch submitted again (or run again, resumed): its jobs sent today are in today's
    committed money already; the warning weighs what is still to send against what is left,
    never the whole manifest again (its sent jobs counted twice)."""
    _daily_cap(monkeypatch, "1.00")
    path = manifest("again", FOUR_JOBS.format(name="again"))
    assert _warned(wb("submit", path).stderr) == []  # $0.80 under $1.00
    # All four at fal, sent today: $0.80 committed by the batch itself, nothing left to send.
    _sent_today("again", dict.fromkeys(range(4), JobState.QUEUED))
    done = wb("submit", path, "--json")
    assert done.code == 0, done.stderr
    assert _warned(done.stderr) == [], done.stderr  # nothing will be sent, nothing cancelled
    assert done.json()["budget_warnings"] == []


def test_submit_again_weighs_the_unsent_jobs(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    _daily_cap(monkeypatch, "0.70")
    path = manifest("half", FOUR_JOBS.format(name="half"))
    assert len(_warned(wb("submit", path).stderr)) == 1  # $0.80 over $0.70
    # Two sent today ($0.40 committed): the two unsent ($0.40) exceed the $0.30 left.
    _sent_today("half", {0: JobState.QUEUED, 1: JobState.QUEUED})
    (line,) = _warned(wb("submit", path).stderr)
    assert (
        "the estimate $0.40 of the 2 job(s) not sent yet exceeds the $0.30 left of today's $0.70 cap" in line
    ), line
    assert "only about 1 of 2 job(s) will run today" in line, line
