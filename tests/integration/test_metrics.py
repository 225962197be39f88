"""``/metrics`` of ``wanbatch serve``: parsed with prometheus-client's own parser, checked against
the database after a real embedded run against the simulator (SQLite and PostgreSQL).

The run meets faults on purpose (a 429 at submit, a dropped submit whose outcome is unknown,
model errors that are retried) so the numbers are not all zeros. The database-derived metrics
must equal what SQL says about the same rows; this process's own counters (:mod:`worker.telemetry`)
must agree with the simulator's ledger, the provider's side of the story.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import Engine, text, update
from starlette.applications import Starlette
from starlette.testclient import TestClient

from falsim import SimulatorOptions, running_simulator
from falsim.server import SimulatorHandle
from jobs import batches, db, store
from jobs.db import make_engine
from jobs.metrics import DURATION_BUCKETS, MAX_ERROR_GROUPS, snapshot
from jobs.models import Job, utcnow
from jobs.settings import Settings
from jobs.states import JobState
from tests.ports import unused_port
from tests.step_runtime import add_batch, ended_beat_owner
from web.app import create_app
from web.metrics import metrics_route
from worker import telemetry
from worker.running import process_batch

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"
KEY = "b-metrics-key-4c7e1a9f:2b6d0e8c3a5f"
JOBS = 8
MANIFEST = """\
name: {name}
endpoint: fal-ai/wan-22
defaults:
  resolution: 480p
items:
""" + "".join(f"  - prompt: metrics scene {i}\n" for i in range(JOBS))

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_text(text_body: str) -> Samples:
    """Every sample of an exposition, by (sample name, sorted labels): parsed by prometheus-client."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text_body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(engine: Engine, settings: Settings, **headers: str) -> Samples:
    app = Starlette(routes=[metrics_route(engine, settings)])
    with TestClient(app) as client:
        response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    return scrape_text(response.text)


def process_samples() -> Samples:
    """This process's own counters right now (they accumulate over the whole test session)."""
    from prometheus_client import generate_latest

    return scrape_text(generate_latest(telemetry.registry()).decode())


def labelled(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every label set of ``name`` that includes ``labels``."""
    wanted = set(labels.items())
    return sum(v for (sample, lab), v in samples.items() if sample == name and wanted <= set(lab))


def rows(engine: Engine, sql: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql)))


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator(
        SimulatorOptions(latency_seconds=0.05, latency_jitter=0.0, concurrency_limit=20, rng_seed=14)
    ) as handle:
        yield handle


def settings_for(db_url: str, sim: SimulatorHandle, tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(
        database_url=db_url,
        FAL_KEY=SecretStr(KEY),
        fal_queue_url=sim.url,
        fal_rest_url=sim.url,
        output_dir=tmp_path / "outputs",
        poll_min_interval=0.05,
        poll_max_interval=0.2,
        tick_interval=0.05,
        retry_base_delay=0,
        submit_rate=100,
        max_outstanding=20,
        max_attempts=4,
        **overrides,
    )


def test_metrics_match_the_database_after_an_embedded_run(
    db_url: str, engine: Engine, sim: SimulatorHandle, tmp_path: Path
) -> None:
    sim.reset()
    # A metrics port: without one an embedded run counts nothing (nobody could read the counts).
    settings = settings_for(db_url, sim, tmp_path, metrics_port=unused_port())
    shutil.copytree(EXAMPLES / "images", tmp_path / "images")
    manifest = tmp_path / "metrics.yaml"
    manifest.write_text(MANIFEST.format(name="metrics-run"), encoding="utf-8")
    submitted = batches.submit_manifest(manifest, settings)
    sim.set_faults(
        submit_429={"next": 1},
        submit_drop={"next": 1},
        model_error={"next": 2, "error_type": "runner_disconnected"},
    )
    before = process_samples()
    report, _stats = process_batch(submitted.batch_id, settings, show_progress=False)
    after = process_samples()
    assert report["finished"] == report["total"] == JOBS
    ledger = sim.ledger()

    samples = scrape(engine, settings)
    assert value(samples, "wanbatch_database_up") == 1

    # Jobs by state: every state present, each equal to the database's own count.
    by_state = {dict(labels)["state"]: n for labels, n in labelled(samples, "wanbatch_jobs").items()}
    assert set(by_state) == {state.value for state in JobState}
    in_db = {state: n for state, n in rows(engine, "SELECT state, count(*) FROM jobs GROUP BY state")}
    assert by_state == {state.value: float(in_db.get(state.value, 0)) for state in JobState}
    assert sum(by_state.values()) == JOBS
    assert by_state["failed"] >= 1  # the dropped submit: its outcome is unknown, so it failed

    # Submissions, retries and ambiguous submits, as the jobs and their history record them.
    ((attempts, retries),) = rows(
        engine, "SELECT sum(attempts), sum(CASE WHEN attempts > 1 THEN attempts - 1 ELSE 0 END) FROM jobs"
    )
    assert value(samples, "wanbatch_submits_total") == attempts
    assert value(samples, "wanbatch_retries_total") == retries >= 1  # the model errors (a 429 is no attempt)
    ((rate_limited,),) = rows(engine, "SELECT sum(rate_limited_submits) FROM jobs")
    assert rate_limited == 1
    ((unknown,),) = rows(engine, "SELECT count(*) FROM job_events WHERE to_state = 'submit_unknown'")
    assert value(samples, "wanbatch_ambiguous_submits_total") == unknown == 1

    # Errors by state and type.
    errors = {
        (dict(labels)["state"], dict(labels)["error_type"]): n
        for labels, n in labelled(samples, "wanbatch_job_errors").items()
    }
    in_db_errors = rows(
        engine, "SELECT state, error_type, count(*) FROM jobs WHERE error_type IS NOT NULL GROUP BY 1, 2"
    )
    assert errors == {(state, error_type): float(n) for state, error_type, n in in_db_errors}
    assert errors[("failed", "submit_unknown")] == 1

    # Money: the same sums as status and cost.
    with db.read_scope(engine) as session:
        money = store.batch_money(session, submitted.batch_id)
        cost = store.batch_cost(session, submitted.batch_id)
    assert total(samples, "wanbatch_estimated_usd") == pytest.approx(float(money.estimated_usd), abs=1e-9)
    assert total(samples, "wanbatch_spent_usd") == pytest.approx(float(money.spent_usd), abs=1e-9)
    assert total(samples, "wanbatch_reserved_usd") == 0
    assert total(samples, "wanbatch_wasted_usd") == pytest.approx(float(cost.wasted_usd), abs=1e-9)
    assert money.spent_usd > 0
    assert set(dict(labels)["endpoint"] for labels in labelled(samples, "wanbatch_spent_usd")) == {
        "fal-ai/wan-22"
    }
    assert value(samples, "wanbatch_possible_duplicate_charges_total") == money.possible_duplicate_charges

    # Histograms: cumulative buckets ending at +Inf == count, over the jobs that have the times.
    ((sent_and_done,),) = rows(
        engine, "SELECT count(*) FROM jobs WHERE submitted_at IS NOT NULL AND completed_at IS NOT NULL"
    )
    ((downloaded,),) = rows(engine, "SELECT count(*) FROM jobs WHERE state = 'succeeded'")
    expected_counts = {"fal": sent_and_done, "download": downloaded}
    for name in ("wait", "fal", "inference", "download"):
        family = f"wanbatch_job_{name}_seconds"
        buckets = [(dict(labels)["le"], n) for labels, n in labelled(samples, f"{family}_bucket").items()]
        assert [le for le, _ in buckets] == [*(repr(b) for b in DURATION_BUCKETS), "+Inf"]
        counts = [n for _, n in buckets]
        assert counts == sorted(counts)
        assert counts[-1] == value(samples, f"{family}_count") > 0
        assert value(samples, f"{family}_sum") >= 0
        if name in expected_counts:
            assert counts[-1] == expected_counts[name]

    # This process's counters against the simulator's ledger.
    accepted = delta(
        after, before, "wanbatch_worker_submits_total", endpoint="fal-ai/wan-22", outcome="accepted"
    )
    ambiguous = delta(
        after, before, "wanbatch_worker_submits_total", endpoint="fal-ai/wan-22", outcome="ambiguous"
    )
    refused = delta(
        after, before, "wanbatch_worker_submits_total", endpoint="fal-ai/wan-22", outcome="rate_limited"
    )
    assert accepted + ambiguous == ledger["accepted"]  # a dropped submit was queued all the same
    assert ambiguous == 1
    assert refused == sum(1 for r in ledger["rejections"] if r["status_code"] == 429) == 1
    assert delta(after, before, "wanbatch_worker_ambiguous_submits_total") == 1
    # Every retry here followed a provider error: the model errors that met our requests (one may
    # have met the dropped request, which nobody here follows). The 429 gave its job back uncounted.
    assert delta(after, before, "wanbatch_worker_retries_total", cause="provider_error") == retries
    assert delta(after, before, "wanbatch_worker_provider_errors_total", type="http_429") == 1
    disconnected = delta(after, before, "wanbatch_worker_provider_errors_total", type="runner_disconnected")
    assert disconnected == retries >= 1
    submit_calls = total(after, "wanbatch_fal_request_duration_seconds_count", operation="submit") - total(
        before, "wanbatch_fal_request_duration_seconds_count", operation="submit"
    )
    assert submit_calls == accepted + ambiguous + refused
    assert (
        delta(
            after, before, "wanbatch_fal_request_duration_seconds_count", operation="submit", status="error"
        )
        == ambiguous
    )  # the dropped connection: no answer
    assert total(after, "wanbatch_fal_request_duration_seconds_count", operation="status") > total(
        before, "wanbatch_fal_request_duration_seconds_count", operation="status"
    ) or total(after, "wanbatch_fal_request_duration_seconds_count", operation="result") > total(
        before, "wanbatch_fal_request_duration_seconds_count", operation="result"
    )
    # The serve page carries this process's registry too.
    assert (
        value(samples, "wanbatch_worker_submits_total", endpoint="fal-ai/wan-22", outcome="accepted")
        >= accepted
    )
    assert KEY not in str(samples)


def _set(engine: Engine, sql: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text(sql), params)


def test_histogram_buckets_are_le_and_odd_provider_values_are_skipped(engine: Engine) -> None:
    batch = add_batch(engine, "durations", [("fal-ai/wan-22", {"prompt": f"d{i}"}) for i in range(6)])
    with db.read_scope(engine) as session:
        ids = [job.id for job in store.jobs_of_batch(session, batch)]
    # fal time (completed - submitted): exactly a bound, just over it, tiny, beyond every bound,
    # negative (a clock stepped back: left out), and none (never sent).
    fal_seconds = [30.0, 30.5, 0.05, 200000.0, -5.0, None]
    inference: list[Any] = [30, "30", {"x": 1}, 2.5, None, True]
    sent = datetime(2026, 5, 1, 22, 0, tzinfo=UTC)
    with engine.begin() as conn:
        for job_id, seconds, inference_time in zip(ids, fal_seconds, inference, strict=True):
            times = (
                {}
                if seconds is None
                else {"submitted_at": sent, "completed_at": sent + timedelta(seconds=seconds)}
            )
            conn.execute(
                update(Job)
                .where(Job.id == job_id)
                # Finished: only a finished job's times are counted (they no longer move).
                .values(provider_metrics={"inference_time": inference_time}, state=JobState.FAILED, **times)
            )

    with db.read_scope(engine) as session:
        snap = snapshot(session)
    fal = dict(snap.durations["fal"].cumulative())
    assert snap.durations["fal"].count == 4  # the negative and the unsent are not counted
    assert fal["10.0"] == 1  # 0.05 s
    assert fal["30.0"] == 2  # 30.0 s is "le 30", not in the next bucket
    assert fal["60.0"] == 3  # 30.5 s
    assert fal["86400.0"] == 3
    assert fal["+Inf"] == 4  # beyond every bound
    assert snap.durations["fal"].total == pytest.approx(30.0 + 30.5 + 0.05 + 200000.0, rel=1e-6)
    inf = dict(snap.durations["inference"].cumulative())
    assert snap.durations["inference"].count == 2  # 30 and 2.5: the string, object, null, bool skipped
    assert inf["2.5"] == 1
    assert inf["30.0"] == 2
    assert snap.durations["inference"].total == pytest.approx(32.5)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_metrics_an_earlier_version_stored_as_no_json_are_skipped(engine: Engine) -> None:
    """Before fal's ``1e999`` was read as null, SQLite stored it as ``Infinity``, which its
    ``json_type`` refuses: the whole snapshot failed (``wanbatch_database_up 0``)."""
    batch = add_batch(engine, "infinite", [("fal-ai/wan-22", {"prompt": f"i{i}"}) for i in range(2)])
    with db.read_scope(engine) as session:
        first, second = (job.id for job in store.jobs_of_batch(session, batch))
    update_metrics = "UPDATE jobs SET provider_metrics = :m, state = 'failed' WHERE id = :id"
    _set(engine, update_metrics, m='{"inference_time": Infinity}', id=first)
    _set(engine, update_metrics, m='{"inference_time": 2.5}', id=second)

    with db.read_scope(engine) as session:
        snap = snapshot(session)
    assert (snap.durations["inference"].count, snap.durations["inference"].total) == (1, 2.5)


def test_errors_by_type_are_bounded(engine: Engine) -> None:
    count = MAX_ERROR_GROUPS + 15
    batch = add_batch(engine, "many-errors", [("fal-ai/wan-22", {"prompt": f"e{i}"}) for i in range(count)])
    with db.read_scope(engine) as session:
        ids = [job.id for job in store.jobs_of_batch(session, batch)]
    for i, job_id in enumerate(ids):
        kind = "common" if i < 10 else f"invented_by_the_provider_{i}"
        _set(engine, "UPDATE jobs SET state = 'failed', error_type = :t WHERE id = :id", t=kind, id=job_id)
    with db.read_scope(engine) as session:
        snap = snapshot(session)
    assert len(snap.errors) == MAX_ERROR_GROUPS + 1
    assert snap.errors[("failed", "common")] == 10
    assert sum(snap.errors.values()) == count
    assert snap.errors[("failed", "other")] == count - 10 - (MAX_ERROR_GROUPS - 1)


def test_a_simulations_jobs_count_but_not_its_made_up_money(engine: Engine) -> None:
    """The money gauges are fal's money: a ``--simulate`` batch's estimates and bills are made up."""
    wan = [("fal-ai/wan-22", {"prompt": "p"})]
    add_batch(engine, "paid", wan * 2, est_usd=Decimal("0.25"))
    add_batch(engine, "rehearsal", wan * 3, est_usd=Decimal("0.25"), simulated=True)
    with db.session_scope(engine) as session:
        session.execute(update(Job).values(state=JobState.SUCCEEDED, actual_usd=Decimal("0.30")))
    with db.read_scope(engine) as session:
        snap = snapshot(session)
    assert snap.jobs["succeeded"] == 5
    money = snap.usd["fal-ai/wan-22"]
    assert (money.estimated, money.spent) == (Decimal("0.50"), Decimal("0.60"))


def test_batches_nothing_processes_are_counted_for_alerts(engine: Engine) -> None:
    def unattended() -> float:
        return value(scrape(engine, Settings()), "wanbatch_batches_unattended")

    def at_fal(batch_id: str) -> None:
        _set(engine, "UPDATE jobs SET state = 'queued' WHERE batch_id = :b", b=batch_id)

    assert unattended() == 0
    stopped = add_batch(engine, "stopped-run", [("fal-ai/wan-22", {"prompt": "at fal"})])
    at_fal(stopped)  # its run died with the request at fal: nobody will collect it
    never_run = add_batch(engine, "never-run", [("fal-ai/wan-22", {"prompt": "ready"})])  # only submitted
    held = add_batch(engine, "held", [("fal-ai/wan-22", {"prompt": "waits on purpose"})])
    with db.session_scope(engine) as session:
        store.set_paused_by_user(session, held, True)  # paused with nothing at fal: not stalled
    assert unattended() == 2

    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "run:1:", [stopped], utcnow())
        store.record_heartbeat(session, "run:2:", [never_run], utcnow() - timedelta(minutes=5))  # stale
    assert unattended() == 1
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "worker:3:", ["*"], utcnow())  # a worker's leader: every batch
    assert unattended() == 0
    with db.session_scope(engine) as session:
        store.drop_heartbeats(session, "worker:3:")
        store.drop_heartbeats(session, "run:1:")
    at_fal(held)  # paused, but a request at fal still needs collecting
    assert unattended() == 3


def test_a_batch_whose_run_was_killed_is_unattended_at_once(engine: Engine) -> None:
    """A killed ``run`` (kill -9, a closed SSH session) leaves its heartbeat behind: the batch was
    counted as attended for the minute that beat stayed fresh, though nothing collected its
    requests. A beat of a process of this host that has ended counts for nothing; another
    host's counts until it goes stale, as before."""
    import socket
    import subprocess
    import sys

    def unattended() -> float:
        return value(scrape(engine, Settings()), "wanbatch_batches_unattended")

    killed = add_batch(engine, "killed-run", [("fal-ai/wan-22", {"prompt": "at fal"})])
    elsewhere = add_batch(engine, "run-elsewhere", [("fal-ai/wan-22", {"prompt": "at fal too"})])
    _set(engine, "UPDATE jobs SET state = 'queued'")  # both runs have a request at fal
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(30)  # a process of this host that has ended: the killed run
    with db.session_scope(engine) as session:
        store.record_heartbeat(
            session, ended_beat_owner(f"{socket.gethostname()}:{child.pid}:1"), [killed], utcnow()
        )
        store.record_heartbeat(session, "otherhost:4242:1", [elsewhere], utcnow())
    assert unattended() == 1


def test_a_database_that_does_not_answer_is_a_gauge_not_a_failed_scrape(tmp_path: Path) -> None:
    dead = make_engine("postgresql://postgres@127.0.0.1:1/nowhere")
    samples = scrape(dead, Settings())
    assert value(samples, "wanbatch_database_up") == 0
    assert not labelled(samples, "wanbatch_jobs")
    assert ("process_cpu_seconds_total", ()) in samples  # the process's own metrics still answer


def test_openmetrics_when_the_scraper_asks_for_it(engine: Engine) -> None:
    app = Starlette(routes=[metrics_route(engine, Settings())])
    with TestClient(app) as client:
        response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    assert 'wanbatch_jobs{state="pending"} 0' in response.text


def test_webhook_deliveries_are_counted_by_result(engine: Engine) -> None:
    settings = Settings(webhook_jwks_url="http://127.0.0.1:9/jwks.json", connect_timeout=0.5)
    before = process_samples()
    with TestClient(create_app(settings, engine=engine)) as client:
        unsigned = client.post("/webhooks/fal?job_id=abc&attempt=1", content=b'{"status": "OK"}')
    assert 400 <= unsigned.status_code < 600
    samples = scrape(engine, settings)
    assert delta(samples, before, "wanbatch_webhook_deliveries_total", result="rejected") == 1
    assert delta(samples, before, "wanbatch_webhook_deliveries_total", result="accepted") == 0


def test_serve_mounts_metrics_behind_the_token(engine: Engine) -> None:
    token = "b-metrics-serve-token-51c0"
    settings = Settings(serve_token=SecretStr(token), webhook_jwks_url="http://127.0.0.1:9/jwks.json")
    with TestClient(create_app(settings, engine=engine)) as client:  # "testclient": not loopback
        refused = client.get("/metrics")
        allowed = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code in (401, 403)
    assert "wanbatch_jobs" not in refused.text
    assert allowed.status_code == 200
    samples = scrape_text(allowed.text)
    assert value(samples, "wanbatch_database_up") == 1
    states = {dict(labels)["state"] for labels in labelled(samples, "wanbatch_jobs")}
    assert states == {state.value for state in JobState}
    assert token not in allowed.text
