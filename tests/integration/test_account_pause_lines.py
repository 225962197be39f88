"""A key fal stops accepting pauses the batch with one warning line, not one per refused call;
fal's 401 for a key without ``:`` says what is wrong with its shape.

Found by an audit of fal credentials: a key revoked mid-run gave the right result (the batch
paused, nothing failed) but seven warning lines — a "batch … paused" line for every call fal
refused (submits, status and result calls alike), and a "result refused" line for every job
whose result was refused besides. The pause is news once per batch: it is said when the batch's
state changes, and each refusal after it only at debug level. And a key without ``:`` (fal's keys
are ``<key id>:<key secret>``) was paused with fal's bare "the API key was rejected (HTTP 401)".

The simulator on loopback, which answers 401 to a key it does not accept, as fal does; both
databases.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs import db, store
from jobs.models import BatchState
from tests.step_runtime import add_batch, job_states, make_runtime, settings_for, wait_until
from worker.steps import dispatch, download, poll, submit

T2V = "fal-ai/wan-22"
KEY = "11111111-1111-1111-1111-111111111111:" + "a" * 32
OTHER = "22222222-2222-2222-2222-222222222222:" + "b" * 32


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator(
        SimulatorOptions(latency_seconds=0.05, latency_jitter=0.0, concurrency_limit=8, rng_seed=3)
    ) as handle:
        yield handle


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_key_revoked_mid_run_pauses_the_batch_in_one_warning_line(
    engine: Engine, sim: SimulatorHandle, caplog: pytest.LogCaptureFixture
) -> None:
    handed: list[str] = []
    rt = make_runtime(engine, settings_for(sim.url, KEY, max_outstanding=8), enqueue_download=handed.append)
    batch_id = add_batch(engine, "revoked", [(T2V, {"prompt": f"a lantern {i}"}) for i in range(4)])
    try:
        first = dispatch(rt)
        assert len(first) == 4
        for job_id in first[:3]:
            assert submit(rt, job_id) == "submitted"
        # Three finish at fal; their downloads are handed on, not run yet.
        wait_until(lambda: len(handed) == 3, step=lambda: poll(rt))

        sim.update_options(accepted_keys=[OTHER])  # the key is revoked: fal answers 401 to it
        caplog.clear()
        caplog.set_level(logging.DEBUG)
        for job_id in handed:  # three result calls refused
            assert download(rt, job_id) == "paused"
        assert submit(rt, first[3]) == "account-locked"  # and a submit
    finally:
        rt.client.close()

    with db.read_scope(engine) as session:
        batch = store.get_batch(session, batch_id)
        assert batch.state == BatchState.PAUSED
        assert "the API key was rejected (HTTP 401)" in (batch.pause_reason or "")
    assert job_states(engine, batch_id).get("failed", 0) == 0
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"batch {batch_id} paused: fal result: the API key was rejected (HTTP 401)")
    repeats = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(m.startswith(f"batch {batch_id} still paused: ") for m in repeats), repeats


def test_a_batch_paused_by_the_user_is_said_paused_for_the_key_once(
    engine: Engine, sim: SimulatorHandle, caplog: pytest.LogCaptureFixture
) -> None:
    """A change of reason is a change: paused by `wanbatch pause`, then refused by fal."""
    handed: list[str] = []
    rt = make_runtime(engine, settings_for(sim.url, KEY), enqueue_download=handed.append)
    batch_id = add_batch(engine, "user-paused", [(T2V, {"prompt": f"a kite {i}"}) for i in range(2)])
    try:
        for job_id in dispatch(rt):
            assert submit(rt, job_id) == "submitted"
        wait_until(lambda: len(handed) == 2, step=lambda: poll(rt))
        with db.session_scope(engine) as session:
            store.set_batch_state(session, batch_id, BatchState.PAUSED, reason="paused by the user")
        sim.update_options(accepted_keys=[OTHER])
        caplog.set_level(logging.WARNING)
        caplog.clear()
        for job_id in handed:
            assert download(rt, job_id) == "paused"
    finally:
        rt.client.close()
    assert len(_warnings(caplog)) == 1, _warnings(caplog)


def test_fal_s_401_for_a_key_without_a_colon_says_so(engine: Engine, sim: SimulatorHandle) -> None:
    odd = KEY.replace(":", "")
    sim.update_options(accepted_keys=[KEY])
    rt = make_runtime(engine, settings_for(sim.url, odd))
    batch_id = add_batch(engine, "no-colon", [(T2V, {"prompt": "a gull"})])
    try:
        (job_id,) = dispatch(rt)
        assert submit(rt, job_id) == "account-locked"
    finally:
        rt.client.close()
    with db.read_scope(engine) as session:
        reason = store.get_batch(session, batch_id).pause_reason or ""
    assert "the API key was rejected (HTTP 401)" in reason
    assert reason.endswith(
        f"; FAL_KEY has no ':' ({len(odd)} characters), where fal's keys are <key id>:<key secret>, "
        "as https://fal.ai/dashboard/keys shows them"
    )
    assert odd not in reason
    assert "a" * 32 not in reason


def test_doctor_s_refused_key_says_it_has_no_colon(sim: SimulatorHandle) -> None:
    """`wanbatch doctor`'s provider check, fal answering its one call with 401."""
    from worker.doctor import check_provider

    sim.update_options(accepted_keys=[KEY])
    odd = KEY.replace(":", "")
    check = check_provider(settings_for(sim.url, odd))
    assert (check.status, check.detail.split(" (")[0]) == ("fail", f"{sim.url} refused the key")
    assert check.fix is not None
    assert check.fix.endswith(
        f"(FAL_KEY has no ':' ({len(odd)} characters), where fal's keys are "
        "<key id>:<key secret>, as https://fal.ai/dashboard/keys shows them)"
    )
    well_shaped = check_provider(settings_for(sim.url, OTHER))
    assert well_shaped.fix is not None
    assert "no ':'" not in well_shaped.fix
