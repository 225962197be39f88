"""Properties of the job lifecycle table (jobs.states) that the rest of the system relies on."""

from __future__ import annotations

from collections import deque

import pytest

from jobs.states import (
    ALLOWED_TRANSITIONS,
    AT_PROVIDER_STATES,
    TERMINAL_STATES,
    JobState,
    can_transition,
)


def reachable(start: JobState) -> set[JobState]:
    """Every state reachable from ``start`` (excluding ``start`` unless there is a cycle back)."""
    seen: set[JobState] = set()
    todo = deque(ALLOWED_TRANSITIONS[start])
    while todo:
        state = todo.popleft()
        if state not in seen:
            seen.add(state)
            todo.extend(ALLOWED_TRANSITIONS[state])
    return seen


def test_table_covers_every_state() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(JobState)
    for targets in ALLOWED_TRANSITIONS.values():
        assert targets <= set(JobState)


def test_terminal_states_are_exactly_those_without_exits() -> None:
    assert {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED} == TERMINAL_STATES
    # failed/cancelled → queued: only a webhook proving that fal ran the job's request to the end
    # after all (paid work back); cancelled → pending: only a job dropped from its manifest, never
    # sent, that the manifest has again.
    back = {JobState.FAILED: {JobState.QUEUED}, JobState.CANCELLED: {JobState.QUEUED, JobState.PENDING}}
    exits = {s: t - back.get(s, set()) for s, t in ALLOWED_TRANSITIONS.items()}
    assert {s for s, targets in exits.items() if not targets} == TERMINAL_STATES
    assert ALLOWED_TRANSITIONS[JobState.FAILED] == {JobState.QUEUED}
    assert ALLOWED_TRANSITIONS[JobState.CANCELLED] == {JobState.QUEUED, JobState.PENDING}
    for state in JobState:
        assert state.terminal == (state in TERMINAL_STATES)


@pytest.mark.parametrize("state", sorted(set(JobState) - TERMINAL_STATES))
def test_every_non_terminal_state_can_finish(state: JobState) -> None:
    # No job can be stuck forever by construction: failing it is always possible eventually.
    assert reachable(state) & TERMINAL_STATES
    assert JobState.FAILED in reachable(state)


def test_every_state_is_reachable_from_pending() -> None:
    assert reachable(JobState.PENDING) | {JobState.PENDING} == set(JobState)


def test_no_self_loops() -> None:
    # A transition always changes the state, so an event row always records a real move.
    for state in JobState:
        assert not can_transition(state, state)


def test_success_only_after_download() -> None:
    into_succeeded = {s for s, targets in ALLOWED_TRANSITIONS.items() if JobState.SUCCEEDED in targets}
    # pending/retry_wait → succeeded only by reuse_outputs (store.mark_reused): nothing is sent.
    assert into_succeeded == {JobState.DOWNLOADING, JobState.PENDING, JobState.RETRY_WAIT}


def test_paid_work_is_never_cancelled() -> None:
    # Once fal completed the request we have paid: the job keeps its output or fails, never "cancelled".
    assert not can_transition(JobState.DOWNLOADING, JobState.CANCELLED)


def test_unknown_submission_is_never_resent_directly() -> None:
    # Resending after an ambiguous submit must go through retry_wait (counted as a possible duplicate).
    assert not can_transition(JobState.SUBMIT_UNKNOWN, JobState.SUBMITTING)
    assert not can_transition(JobState.SUBMIT_UNKNOWN, JobState.PENDING)


def test_submission_only_through_submitting() -> None:
    into_queued = {s for s, targets in ALLOWED_TRANSITIONS.items() if JobState.QUEUED in targets}
    # failed/cancelled → queued adopts a request a late proof proved, and retry_wait/pending →
    # queued one proved before its pending resend went out: nothing is sent.
    assert into_queued == {
        JobState.SUBMITTING,
        JobState.SUBMIT_UNKNOWN,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.RETRY_WAIT,
        JobState.PENDING,
    }


def test_provider_states() -> None:
    assert not (AT_PROVIDER_STATES & TERMINAL_STATES)
    assert JobState.PENDING not in AT_PROVIDER_STATES
    assert JobState.RETRY_WAIT not in AT_PROVIDER_STATES
    for state in AT_PROVIDER_STATES:
        assert state.at_provider
        # A request at fal can always be wound down: cancelled, or failed when that is impossible.
        assert reachable(state) & {JobState.CANCELLED, JobState.FAILED}


def test_values_fit_the_database_column() -> None:
    values = [s.value for s in JobState]
    assert len(values) == len(set(values))
    assert all(v == v.lower() and len(v) <= 32 for v in values)


def test_can_transition_matches_table() -> None:
    for current in JobState:
        for new in JobState:
            assert can_transition(current, new) == (new in ALLOWED_TRANSITIONS[current])
