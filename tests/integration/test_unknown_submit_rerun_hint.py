"""The command a job failed for its unknown submit outcome suggests works when copied.

Audit: its error (shown by ``status``, the dashboard and ``export``) ended "`wanbatch rerun
--failed-only` sends it again"; copied, that was ``error: Missing argument 'BATCH'``. It names
the batch now: a batch for fal by its name (which never changes), a simulation by its id's first
characters (a batch for fal that takes its name renames it ``NAME-simulated``, and the old name
would then rerun the paid batch).
"""

from __future__ import annotations

import re
import shlex

import pytest
from sqlalchemy import Engine

from cli.batch_commands import rerun
from jobs import db, store
from jobs.states import JobState
from tests.hostile import HostileProvider, reset
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.steps import dispatch, submit

T2V = "fal-ai/wan-22"
KEY = "4b2e9d1c-7a3f-4e5d-9c8b-1a2b3c4d5e6f:9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"


def _failed_for_unknown_outcome(
    engine: Engine, hostile: HostileProvider, name: str, *, simulated: bool
) -> str:
    """A batch ``name`` of one job whose submit's answer was lost and that failed for it
    (policy ``fail``; a simulation: no attempt left); its id."""
    hostile.route("POST", rf"/{T2V}", reset())  # the request arrives, the answer never does
    batch_id = add_batch(engine, name, [(T2V, {"prompt": "a lighthouse"})], simulated=simulated)
    settings = settings_for(hostile.url, KEY, submit_unknown_policy="fail", max_attempts=1)
    rt = make_runtime(
        engine, settings, simulated=simulated, batch_ids=frozenset({batch_id}) if simulated else None
    )
    try:
        (job_id,) = dispatch(rt)
        assert submit(rt, job_id) == "failed"  # settled at once: no receiver, no attempt left
    finally:
        rt.client.close()
    with db.read_scope(engine) as session:
        (job,) = store.jobs_of_batch(session, batch_id)
        assert (job.state, job.error_type) == (JobState.FAILED, "submit_unknown")
    return batch_id


def _copied(error: str) -> list[str]:
    """The ``wanbatch rerun …`` command the error suggests, as the shell splits it; click reads
    it as ``rerun`` does (a missing BATCH raised "Missing argument 'BATCH'")."""
    (command,) = re.findall(r"`(wanbatch rerun [^`]*)`", error)
    words = shlex.split(command)
    rerun.make_context("rerun", words[2:])
    return words


def _error(engine: Engine, batch_id: str) -> str:
    with db.read_scope(engine) as session:
        (job,) = store.jobs_of_batch(session, batch_id)
        return job.error or ""


def test_a_batch_for_fal_is_named(engine: Engine, hostile: HostileProvider) -> None:
    batch_id = _failed_for_unknown_outcome(engine, hostile, "night-sweep", simulated=False)
    error = _error(engine, batch_id)
    assert "fal may have accepted (and billed) it" in error
    assert _copied(error) == ["wanbatch", "rerun", "night-sweep", "--failed-only"]
    # The advice says what following it costs (an audit paid 3 videos twice by following it).
    assert error.endswith(
        "`wanbatch rerun night-sweep --failed-only` sends it again, which pays a "
        "second time if fal did accept it"
    ), error


def test_a_name_the_shell_would_split_is_given_as_the_id(engine: Engine, hostile: HostileProvider) -> None:
    batch_id = _failed_for_unknown_outcome(engine, hostile, "night sweep", simulated=False)
    words = _copied(_error(engine, batch_id))
    assert words == ["wanbatch", "rerun", batch_id[:12], "--failed-only"]


def test_a_simulation_is_named_by_its_id_which_a_rename_leaves_its_own(
    engine: Engine, hostile: HostileProvider
) -> None:
    batch_id = _failed_for_unknown_outcome(engine, hostile, "rehearsal", simulated=True)
    error = _error(engine, batch_id)
    assert "a simulation, nothing was billed" in error
    assert "pays a second time" not in error  # a simulation's resend costs nothing
    words = _copied(error)
    assert words == ["wanbatch", "rerun", batch_id[:12], "--failed-only", "--simulate"]
    # A batch for fal of the same manifest takes the name: the simulation becomes
    # `rehearsal-simulated`, and the copied command still names it, not the paid batch.
    with db.session_scope(engine) as session:
        name, renamed = store.name_for_batch(session, "rehearsal", simulated=False)
        assert (name, renamed) == ("rehearsal", [("rehearsal", "rehearsal-simulated")])
    with db.read_scope(engine) as session:
        assert store.get_batch(session, words[2]).id == batch_id


@pytest.mark.parametrize("simulated", [False, True])
def test_the_suggested_command_is_never_without_its_batch(
    engine: Engine, hostile: HostileProvider, simulated: bool
) -> None:
    batch_id = _failed_for_unknown_outcome(engine, hostile, "plain", simulated=simulated)
    assert "`wanbatch rerun --failed-only" not in _error(engine, batch_id)
