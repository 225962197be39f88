"""What the dashboard lists: batches with their progress, and a batch's jobs a page at a time.

A batch may hold 100,000 jobs, and a page must still answer in a blink, so nothing here loads
jobs to count them in Python:

* the batch list is one ``GROUP BY batch_id, state`` over the batches shown (counts, money,
  first submit and recent finishes per state), never a query per batch;
* a batch's page is one ``GROUP BY state, endpoint`` (:func:`batch_summary`): its counts,
  money, media mismatches, duplicate charges and pace, the filter's choices and the number of
  jobs each filter matches all come from that one pass over its jobs;
* the job list is keyset-paginated in item order, ``(item_index, variant, id)``: each page
  reads ``LIMIT n + 1`` rows from where the previous one ended (an index on ``(batch_id,
  item_index, variant, id)`` makes that a short index range, whatever the page), where an
  ``OFFSET`` would read and drop every row before the page.

Money follows :class:`jobs.store.BatchMoney`'s and :class:`jobs.store.BatchCost`'s definitions
(spent: the actual cost of finished work, else its estimate), so the dashboard and ``status``
agree to the cent (``tests/web/test_listing.py`` holds them to it). The state-dependent parts
of those definitions are applied per ``state`` group in Python, on a handful of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import case, false, func, literal_column, select, tuple_, type_coerce
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from jobs import store
from jobs.db import HEARTBEAT_STALE_SECONDS
from jobs.digits import ascii_int
from jobs.models import EVERY_BATCH, Batch, BatchState, Job, KeyRefusal, Money, utcnow
from jobs.money import BUDGET_ERRORS, DAILY_CAP_ERROR
from jobs.processes import beat_owner_ended, owner_prefix
from jobs.schedule import Schedule, format_age, format_duration
from jobs.states import AT_PROVIDER_STATES, TERMINAL_STATES, JobState
from jobs.storable import holds_unstorable
from jobs.url_secrets import shareable_text

#: Finishes this recent make the throughput (jobs per minute) and the ETA: the current pace, not
#: the average since a start that may have been hours (and a paused night) ago.
THROUGHPUT_WINDOW = timedelta(minutes=10)
#: A pause between two finishes at least this long, and :data:`STRETCH_GAP_FACTOR` times the
#: mean spacing of the finishes after it, ends a stretch of work (:func:`stretch_of`): a pause,
#: a stopped ``run``, a closed window. The pace is taken over the current stretch only.
STRETCH_GAP = timedelta(seconds=60)
STRETCH_GAP_FACTOR = 5
#: At most this many of the latest finishes are read for the stretch (:func:`work_stretches`):
#: the pace of the last 200 finishes is the recent pace, and a refresh stays one short query.
STRETCH_FINISHES = 200
#: Job-list page sizes offered; anything else asked for falls back to the default.
PAGE_SIZES = (25, 50, 100, 200)
DEFAULT_PAGE_SIZE = 50
#: Batches per page of the batch list (newest first).
BATCHES_PER_PAGE = 50

#: States whose finish is work done (a budget or deadline cancels thousands at once: not a pace).
_WORK_DONE = (JobState.SUCCEEDED, JobState.FAILED)
#: Jobs something is working on: fal holds them, or their video is being fetched.
BUSY_STATES: frozenset[JobState] = AT_PROVIDER_STATES | {JobState.DOWNLOADING}
#: Jobs waiting to be sent.
WAITING_STATES: frozenset[JobState] = frozenset({JobState.PENDING, JobState.RETRY_WAIT})


# --------------------------------------------------------------------------- totals


@dataclass(slots=True)
class Totals:
    """Jobs and money of a set of jobs (a batch, or its jobs of one endpoint), by state.

    Money as :class:`jobs.store.BatchMoney` and :class:`jobs.store.BatchCost` define it, all
    exact USD: ``estimated``, ``spent`` (what fal billed or will bill: :func:`jobs.store.spent_usd`),
    ``reserved`` (estimates of jobs fal holds), ``actual`` (what fal billed), ``wasted`` (billed
    money that bought no output), ``possibly_billed`` (the part of ``spent`` that submits whose
    outcome stayed unknown, or requests fal lost after they started running, may have cost:
    ``Job.ambiguous_usd``).
    """

    counts: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in JobState})
    estimated_usd: Decimal = Decimal(0)
    spent_usd: Decimal = Decimal(0)
    reserved_usd: Decimal = Decimal(0)
    actual_usd: Decimal = Decimal(0)
    wasted_usd: Decimal = Decimal(0)
    possibly_billed_usd: Decimal = Decimal(0)
    possible_duplicate_charges: int = 0
    confirmed_duplicate_charges: int = 0
    cancelled_for_budget: int = 0
    #: Of those, the jobs ``WANBATCH_DAILY_BUDGET_USD`` cancelled (a new ``--max-usd`` cannot help).
    cancelled_for_daily_budget: int = 0
    media_mismatches: int = 0
    #: Submits fal refused with 429 that were not counted as attempts (``jobs.rate_limited_submits``).
    rate_limited_submits: int = 0
    first_submitted_at: datetime | None = None
    #: Jobs that finished work (succeeded or failed) within :data:`THROUGHPUT_WINDOW`.
    recent: int = 0
    #: The current stretch of work (:func:`work_stretches`), when it was read: the pace is taken
    #: over it (:func:`pace`) rather than over the whole window, which a pause, a restarted run
    #: or a window reopening had left mostly idle.
    stretch: Stretch | None = None
    #: Of ``counts``, by state, the jobs the batch's manifest no longer has (``Job.not_in_manifest``):
    #: the run's exit code and ``status``'s advice judge the others, the manifest's.
    not_in_manifest: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in JobState})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return sum(self.counts[s.value] for s in TERMINAL_STATES)

    @property
    def busy(self) -> int:
        """Jobs something is working on: fal holds them, or their video is being fetched."""
        return sum(self.counts[s.value] for s in BUSY_STATES)

    @property
    def waiting(self) -> int:
        return sum(self.counts[s.value] for s in WAITING_STATES)

    def add(self, state: JobState, row: Any) -> None:
        """Fold in one aggregate row of :func:`_aggregates` for jobs in ``state``."""
        (
            jobs,
            estimated,
            spent,
            actual,
            overrun,
            possible,
            confirmed,
            budget,
            daily,
            mismatches,
            refused,
            first,
            recent,
            ambiguous,
            left_out,
        ) = row
        self.counts[state.value] += int(jobs)
        self.not_in_manifest[state.value] += int(left_out or 0)
        self.estimated_usd += estimated or 0
        self.actual_usd += actual or 0
        self.spent_usd += spent or 0  # store.spent_usd, as store.batch_money sums it
        self.possibly_billed_usd += ambiguous or 0
        if state in AT_PROVIDER_STATES:
            self.reserved_usd += estimated or 0
        if state in (JobState.FAILED, JobState.CANCELLED):
            self.wasted_usd += actual or 0
        elif state == JobState.SUCCEEDED:
            self.wasted_usd += overrun or 0
        self.possible_duplicate_charges += int(possible or 0)
        self.confirmed_duplicate_charges += int(confirmed or 0)
        if state == JobState.CANCELLED:
            self.cancelled_for_budget += int(budget or 0)
            self.cancelled_for_daily_budget += int(daily or 0)
        self.media_mismatches += int(mismatches or 0)
        self.rate_limited_submits += int(refused or 0)
        self.recent += int(recent or 0)
        if first is not None and (self.first_submitted_at is None or first < self.first_submitted_at):
            self.first_submitted_at = first


def _aggregates(since: datetime) -> tuple[ColumnElement[Any], ...]:
    """The per-group figures :meth:`Totals.add` folds in, for a ``GROUP BY`` including state."""
    zero = type_coerce(0, Money())
    overrun = case((Job.actual_usd > Job.est_usd, Job.actual_usd - Job.est_usd), else_=zero)
    return (
        func.count(),
        func.sum(store.estimated_usd()),
        func.sum(store.spent_usd()),
        func.sum(type_coerce(func.coalesce(Job.actual_usd, zero), Money())),
        func.sum(type_coerce(overrun, Money())),
        func.sum(Job.possible_duplicate_charges),
        func.sum(Job.confirmed_duplicate_charges),
        # What a cap stopped of the manifest's jobs: what ``status`` advises a rerun for.
        func.sum(case((Job.error_type.in_(BUDGET_ERRORS) & Job.not_in_manifest.is_(False), 1), else_=0)),
        func.sum(case(((Job.error_type == DAILY_CAP_ERROR) & Job.not_in_manifest.is_(False), 1), else_=0)),
        func.count(Job.media_mismatch),
        func.sum(Job.rate_limited_submits),
        func.min(Job.submitted_at),
        func.sum(case((Job.state.in_(list(_WORK_DONE)) & (Job.finished_at >= since), 1), else_=0)),
        func.sum(Job.ambiguous_usd),
        func.sum(case((Job.not_in_manifest.is_(True), 1), else_=0)),
    )


# --------------------------------------------------------------------------- pace


@dataclass(frozen=True, slots=True)
class Pace:
    """How fast a batch goes now, and when it should be done at that pace.

    ``per_minute`` is None before anything was sent; ``eta_seconds`` is None when there is no
    pace to go by, or when nothing is working on the batch (``held`` then says why: paused,
    waiting for its window, cancelled), because a forecast for a batch that is not moving would
    be a guess presented as a fact.
    """

    per_minute: float | None
    eta_seconds: float | None
    held: str


def eta_beyond_schedule(schedule: Schedule, eta: float | None, now: datetime) -> str | None:
    """What the forecast does not say: the work left at this pace takes longer than the open
    window, or than the deadline allows (``None`` when it fits, or there is no forecast).

    The pace only knows how fast jobs finish, not that sending stops: a batch with two minutes
    of work left and a window closing in 28 s will not be done in two minutes."""
    if not eta:
        return None
    closes = schedule.closes_at(now)
    if closes is None or closes <= now or now + timedelta(seconds=eta) <= closes:
        return None
    left = format_duration((closes - now).total_seconds())
    if schedule.deadline is not None and closes >= schedule.deadline:
        # The deadline ends requests still waiting in fal's queue too (worker.steps.schedule):
        # "what is not sent" alone let a user think the jobs in flight were safe.
        cancelled = "what is not sent by then, or still queued at fal, is cancelled"
        return f"the deadline comes first (in {left}): {cancelled}"
    if schedule.next_open(closes) is None:
        # No window opens again before the deadline (worker.steps.schedule cancels at it).
        return (
            f"the window closes first (in {left}) and nothing opens before the deadline: "
            "what is not sent by then is cancelled"
        )
    return f"the window closes first (in {left}): the rest waits for the next one"


@dataclass(frozen=True, slots=True)
class Stretch:
    """The current stretch of a batch's work within :data:`THROUGHPUT_WINDOW` (:func:`stretch_of`):
    ``finishes`` (succeeded or failed) since ``started_at``; the pace is one over the other."""

    started_at: datetime
    finishes: int


def stretch_of(
    finished: Sequence[tuple[datetime, datetime | None]], *, now: datetime, capped: bool = False
) -> Stretch | None:
    """The current stretch of work of ``finished`` (each job's finish and last submit, the
    window's finishes oldest first; ``capped``: the window held older ones, not read).

    Walking back from the newest finish, it ends at a gap of :data:`STRETCH_GAP` or more that is
    also :data:`STRETCH_GAP_FACTOR` times the mean spacing of the finishes on either side of it
    (after it: up to ``now``; before it: two at least), so that one job finishing every few
    minutes is one stretch, not a new one at each finish. It started when its first finish was
    sent, as far as the typical time a job takes (the median of its jobs' submit to finish) says:
    a resumed batch, a restarted ``run``, a window reopening start then, not at the start of the
    window, and a first wave finishing together is not a pace of its own. Never before the window,
    nor before the finish that ended the previous stretch. ``None`` without finishes.

    Finishes learnt late (:func:`_learnt_late`: a laptop that slept, a ``run`` stopped while fal
    went on) are stamped when the run heard of them, all at the resume: their submit-to-finish
    times hold the pause, and dated back by them the stretch began before it — the frozen minutes
    counted in the pace ("~0:05:29 left" with 2:46 left). The time a job takes is then measured
    on the jobs sent since the resume, else on those before the pause: the stretch starts at the
    resume, less that time."""
    if not finished:
        return None
    times = [at for at, _sent in finished]
    start, earliest = 0, now - THROUGHPUT_WINDOW
    for at in range(len(times) - 1, 1, -1):
        gap = times[at] - times[at - 1]
        after = max(now - times[at], timedelta(0)) / (len(times) - at)
        before = (times[at - 1] - times[0]) / (at - 1)
        if gap >= STRETCH_GAP and gap >= max(after, before) * STRETCH_GAP_FACTOR:
            start, earliest = at, times[at - 1]
            break
    if capped and start == 0:
        # Older finishes were not read: the pace of the ones read, from the first of them.
        return Stretch(started_at=times[0], finishes=len(times) - 1)
    took = _took(finished[start:])
    if _learnt_late(finished[start:], quiet_since=earliest):
        resumed = times[start]
        took = _took((at, sent) for at, sent in finished[start:] if sent is not None and sent >= resumed)
        took = took or _took(finished[:start]) or _took(finished[start:])
    began = times[start] - (took[len(took) // 2] if took else timedelta(0))
    return Stretch(started_at=max(began, earliest), finishes=len(times) - start)


def _took(finished: Iterable[tuple[datetime, datetime | None]]) -> list[timedelta]:
    """The submit-to-finish times of ``finished`` (those with a submit not after their finish), sorted."""
    return sorted(at - sent for at, sent in finished if sent is not None and sent <= at)


def _learnt_late(stretch: Sequence[tuple[datetime, datetime | None]], *, quiet_since: datetime) -> bool:
    """Whether the first finishes of ``stretch`` were learnt late: nothing finished from
    ``quiet_since`` (the finish before the gap, or the window's start) for :data:`STRETCH_GAP` or
    more, yet some of them had been sent before it — in flight all along, finished at fal while
    nobody heard (a sleeping laptop, a stopped ``run``), and stamped at the resume."""
    first = stretch[0][0]
    if first - quiet_since < STRETCH_GAP:
        return False
    return any(sent is not None and sent < quiet_since for _at, sent in stretch)


def work_stretches(session: Session, batch_ids: Collection[str], *, now: datetime) -> dict[str, Stretch]:
    """:class:`Stretch` of each of ``batch_ids`` with finishes within :data:`THROUGHPUT_WINDOW`:
    one query over the window's latest finishes (``ix_jobs_finished_at``, at most
    :data:`STRETCH_FINISHES`: past that, the stretch starts at the oldest of them)."""
    if not batch_ids:
        return {}
    ids = list(batch_ids)
    # By the finish time alone (`|| ''` and NOT IN keep the batch's and the states' indexes out):
    # without statistics SQLite took those and read every finished job of the batch.
    batch = Job.batch_id.concat("")
    rows = session.execute(
        select(Job.batch_id, Job.finished_at, Job.submitted_at)
        .where(
            Job.finished_at >= now - THROUGHPUT_WINDOW,
            batch == ids[0] if len(ids) == 1 else batch.in_(ids),
            Job.state.not_in([s for s in JobState if s not in _WORK_DONE]),
        )
        .order_by(Job.finished_at.desc())
        .limit(STRETCH_FINISHES)
    ).all()
    finished: dict[str, list[tuple[datetime, datetime | None]]] = {}
    for batch_id, at, sent in reversed(rows):
        if at is not None:  # the WHERE keeps none: for the type checker
            finished.setdefault(str(batch_id), []).append((at, sent))
    capped = len(rows) >= STRETCH_FINISHES
    found = {batch_id: stretch_of(jobs, now=now, capped=capped) for batch_id, jobs in finished.items()}
    return {batch_id: stretch for batch_id, stretch in found.items() if stretch is not None}


#: How far a batch's stamps may lie ahead of ``now`` (the clocks of the hosts that wrote them
#: differ a little) before :func:`pace` takes it that the clock went back since.
CLOCK_STEPPED_BACK = timedelta(seconds=5)


def pace(totals: Totals, *, held: str, now: datetime) -> Pace:
    """Throughput over the current stretch of work (:attr:`Totals.stretch`, when read: at most
    :data:`THROUGHPUT_WINDOW`), else over the window or since the first submit, when that is
    more recent, and the ETA of the unfinished jobs at that pace.

    A batch resumed after a 10-minute pause, or a restarted ``run``, that finished 170 jobs in
    the 40 s since goes at that pace, not at 170 over the 10 minutes of the window ("~2h07m
    left" of a batch done in 2): the window's start, or the first submit, no longer counts
    once it lies before a pause.

    ``held`` is why nothing new is sent ("" when jobs may be sent). A held batch gets no ETA,
    whatever is still in flight (it will not finish while held), and neither does a batch with
    nothing in flight: the same rule as ``wanbatch status``.
    """
    first = totals.first_submitted_at
    if first is None:
        return Pace(None, None, held)
    stretch = totals.stretch
    if max(first, stretch.started_at if stretch is not None else first) - now > CLOCK_STEPPED_BACK:
        # The host's clock went back since these were stamped (NTP correcting a clock that ran
        # ahead): the time they span is unknown, and measured against a window cut to a second
        # the pace said "~0:00:00 left" until the clock caught up — no pace rather than a wrong one.
        return Pace(None, None, held)
    if stretch is not None:
        window = max(now - max(stretch.started_at, first, now - THROUGHPUT_WINDOW), timedelta(seconds=1))
        per_minute = stretch.finishes / (window.total_seconds() / 60)
    else:
        window = min(THROUGHPUT_WINDOW, max(now - first, timedelta(seconds=1)))
        per_minute = totals.recent / (window.total_seconds() / 60)
    eta = eta_at_pace(totals.total - totals.finished, per_minute, held=held, busy=totals.busy)
    return Pace(per_minute, eta, held)


def forecast(
    totals: Totals,
    *,
    held: str,
    schedule: Schedule,
    now: datetime,
    proof: ProofWait | None = None,
) -> tuple[float | None, str | None]:
    """The time left and what the schedule cuts short of it (:func:`pace`,
    :func:`eta_beyond_schedule`): the one forecast ``status``, its ``--json`` (``eta_seconds``,
    ``eta_note``) and ``run``'s progress line show, so that they never disagree. ``run`` measured
    its own pace once (rich's 30-second sampling): two jobs finishing within a second promised
    "~0:00:18 left" while ``status`` said "~1m36s left at this pace, but the window closes first".

    ``proof``: jobs that wait for fal's webhook proof of their submit (:func:`proof_waits`). The
    batch is not done before the last of them is settled, at the end of its wait at the earliest,
    so a time left is never shorter than that wait (:func:`until_proof`): the pace of the other
    jobs said "~0:00:15 left" of a job that waited ten minutes more."""
    eta = until_proof(pace(totals, held=held, now=now).eta_seconds, proof, now=now)
    return eta, eta_beyond_schedule(schedule, eta, now)


# --------------------------------------------------------------------------- proof of a submit


@dataclass(frozen=True, slots=True)
class ProofWait:
    """A batch's jobs in ``submit_unknown`` that still wait for fal's webhook to prove whether it
    accepted their submit (``WANBATCH_SUBMIT_UNKNOWN_DEADLINE`` after it was sent, with a
    receiver: ``worker.steps.failures.submit_outcome_unknown``), and when the last wait ends:
    ``WANBATCH_SUBMIT_UNKNOWN_POLICY`` then applies (:func:`proof_wait_text`)."""

    jobs: int
    #: When the last of their waits ends (their ``next_attempt_at``).
    until: datetime


def proof_waits(session: Session, batch_ids: Collection[str], *, now: datetime) -> dict[str, ProofWait]:
    """:class:`ProofWait` of each of ``batch_ids`` that has such jobs, from one query
    (``ix_jobs_batch_id_state_next_attempt_at``, partial: the state is spelt out as its predicate
    has it). A ``submit_unknown`` job whose wait has ended is the reconciler's to settle at once,
    no longer waiting for proof: it is not counted."""
    if not batch_ids:
        return {}
    rows = session.execute(
        select(Job.batch_id, func.count(), func.max(Job.next_attempt_at))
        .where(
            Job.batch_id.in_(list(batch_ids)),
            Job.state == literal_column(f"'{JobState.SUBMIT_UNKNOWN.value}'", type_=Job.state.type),
            Job.next_attempt_at > now,
        )
        .group_by(Job.batch_id)
    )
    return {batch_id: ProofWait(int(jobs), until) for batch_id, jobs, until in rows if jobs and until}


def until_proof(eta: float | None, proof: ProofWait | None, *, now: datetime) -> float | None:
    """``eta`` (seconds), never shorter than the wait of jobs for fal's proof of their submit:
    no such job is settled before its wait ends (unless the proof comes first), so a batch with
    one is not done before. None stays None (no forecast is given)."""
    if eta is None or proof is None or proof.until <= now:
        return eta
    return max(eta, round((proof.until - now).total_seconds(), 1))


#: What ``WANBATCH_SUBMIT_UNKNOWN_POLICY`` does with a job whose wait for proof ended without it.
_PROOF_POLICY = {
    "fail": (
        "fail (WANBATCH_SUBMIT_UNKNOWN_POLICY=fail: submission outcome unknown; a later proof "
        "still fetches its video)"
    ),
    "resubmit": (
        "are sent again while attempts remain (WANBATCH_SUBMIT_UNKNOWN_POLICY=resubmit: a "
        "possible duplicate charge), else fail"
    ),
}


def utc_clock(instant: datetime, *, now: datetime) -> str:
    """``"14:02:11 UTC"`` for an instant on ``now``'s UTC day, ``"2026-12-06 01:02:11 UTC"`` on
    any other: a time of day alone names a day only when it is today's. A wait of hours (an
    overnight render read the next morning) once said "until 01:02:11 UTC" of the next day's."""
    at = instant.astimezone(UTC)
    if at.date() == now.astimezone(UTC).date():
        return f"{at:%H:%M:%S} UTC"
    return f"{at:%Y-%m-%d %H:%M:%S} UTC"


def proof_wait_text(proof: ProofWait | None, *, policy: str, now: datetime) -> str:
    """``1 job(s) wait for fal's webhook proof of their submit until 14:02:11 UTC, then fail
    (WANBATCH_SUBMIT_UNKNOWN_POLICY=fail: …)``: the one wording ``status`` (and its ``--json``'s
    ``proof_wait_note``), ``run``'s progress line and the dashboard's batch page give; "" when no
    job waits. ``policy``: ``WANBATCH_SUBMIT_UNKNOWN_POLICY`` of the process that shows it (the
    one that settles the job is assumed to have the same). Without it such a job was only a
    ``submit_unknown`` count, and the time left ended long before its wait did. ``now``: the
    wait's end names its date when it is not on ``now``'s UTC day (:func:`utc_clock`)."""
    if proof is None:
        return ""
    then = _PROOF_POLICY.get(policy, f"WANBATCH_SUBMIT_UNKNOWN_POLICY={policy} applies")
    return (
        f"{proof.jobs} job(s) wait for fal's webhook proof of their submit until "
        f"{utc_clock(proof.until, now=now)}, then {then}"
    )


# --------------------------------------------------------------------------- requests of another key or queue


@dataclass(frozen=True, slots=True)
class Here:
    """What a process can ask fal about: its API key's id (``worker.limits.api_key_id``, a hash,
    never the key) and its fal queue's origin (``Job.fal_origin``'s form). A request sent with
    another key or to another queue is left to a process that has them. ``key_id`` None: the
    process has no ``FAL_KEY`` (``status`` needs none, nor the dashboard): it cannot tell whose
    key a request was sent with, so no request is said to wait for another key."""

    key_id: str | None
    origin: str


#: The states in which a job waits for what fal says of its request (status, result, cancel).
_FOLLOWED_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.DOWNLOADING, JobState.CANCELLING)

#: Unfinished states a request of another key or queue may wait in (any of them counts as
#: relevant for the one query :func:`elsewhere_waits` makes).
FOLLOWED_STATES: tuple[str, ...] = tuple(s.value for s in _FOLLOWED_STATES)


@dataclass(frozen=True, slots=True)
class ElsewhereWait:
    """A batch's jobs whose request this process cannot ask about, so they wait for another:
    ``reason`` ``"api_key"`` (sent with another API key: ``where`` is its key id) or
    ``"fal_queue"`` (sent to another fal queue: ``where`` is its origin)."""

    reason: str
    where: str
    jobs: int
    #: Of an ``"api_key"`` wait, how many of its requests fal refused to this process's key
    #: ("not found": :func:`jobs.store.note_key_refused`): the ones ``cancel --abandon-other-key``
    #: may write off. The others may be the same account's, which this key can still follow.
    refused: int = 0

    def as_json(self) -> dict[str, Any]:
        if self.reason == "api_key":
            return {"reason": self.reason, "key_id": self.where, "jobs": self.jobs, "refused": self.refused}
        return {"reason": self.reason, "origin": self.where, "jobs": self.jobs}


def elsewhere_waits(
    session: Session, batch_ids: Collection[str], here: Here | None
) -> dict[str, list[ElsewhereWait]]:
    """:class:`ElsewhereWait` of each of ``batch_ids`` with such jobs, from one query: unfinished
    jobs holding a request sent to another fal queue than ``here.origin`` (those first: a process
    of that queue follows them, whatever its key) or with another API key than ``here.key_id``.
    A request whose key or origin was not recorded is anyone's, not counted. ``here`` None: none."""
    if not batch_ids or here is None:
        return {}
    other_queue = Job.fal_origin.is_not(None) & (Job.fal_origin != here.origin)
    other_key = (
        Job.api_key_id.is_not(None) & (Job.api_key_id != here.key_id) if here.key_id is not None else false()
    )
    # fal's refusals of such a request to this process's key (one mark per job and key at most)
    refusal = KeyRefusal.__table__.alias("refusal")
    refused_here = (
        (refusal.c.job_id == Job.id)
        & (refusal.c.key_id == (here.key_id or ""))
        & (refusal.c.request_id == Job.request_id)
        & (refusal.c.sent_with == Job.api_key_id)
    )
    rows = session.execute(
        select(Job.batch_id, Job.fal_origin, Job.api_key_id, func.count(), func.count(refusal.c.job_id))
        .outerjoin(refusal, refused_here)
        .where(
            Job.batch_id.in_(list(batch_ids)),
            Job.state.in_(list(_FOLLOWED_STATES)),
            Job.request_id.is_not(None),
            other_queue | other_key,
        )
        .group_by(Job.batch_id, Job.fal_origin, Job.api_key_id)
    )
    found: dict[str, dict[tuple[str, str], tuple[int, int]]] = {}
    for batch_id, origin, key_id, jobs, refused in rows:
        if origin is not None and origin != here.origin:
            where, refused = ("fal_queue", str(origin)), 0
        else:
            where = ("api_key", str(key_id))
        waits = found.setdefault(str(batch_id), {})
        had_jobs, had_refused = waits.get(where, (0, 0))
        waits[where] = (had_jobs + int(jobs), had_refused + int(refused))
    return {
        batch_id: [
            ElsewhereWait(reason, where, jobs, refused)
            for (reason, where), (jobs, refused) in sorted(waits.items())
        ]
        for batch_id, waits in found.items()
    }


#: How a batch's requests of another key are written off when no process has that key any more
#: (a key of another fal account, revoked): said beside those fal refused to this process's key
#: (:func:`elsewhere_wait_text`), never beside the others (the same account's may be followed).
ABANDON_HINT = "`wanbatch cancel BATCH --abandon-other-key` writes them off"


def elsewhere_wait_text(waits: Sequence[ElsewhereWait]) -> str:
    """``2 request(s) were sent with another API key (key id 0123abcd…) and wait for a process
    with that key``, followed, when fal refused some of them to this process's key, by ``(fal
    does not know 2 of them for this key: …writes them off)``; ``3 request(s) were sent to another fal queue
    (http://host:port) and wait for the process that follows it``: the one wording ``status``
    (its ``--json``'s ``elsewhere_waiting_note``), ``run``'s progress line and the dashboard's
    batch page give; "" when none. Such jobs are asked about again and again by no one here: without it they
    stayed queued/running with nothing saying why, and a run never ended."""
    parts = []
    for wait in waits:
        if wait.reason == "api_key":
            refused = (
                f" (fal does not know {wait.refused} of them for this key: {ABANDON_HINT})"
                if wait.refused
                else ""
            )
            parts.append(
                f"{wait.jobs} request(s) were sent with another API key (key id {wait.where}) "
                f"and wait for a process with that key{refused}"
            )
        else:
            parts.append(
                f"{wait.jobs} request(s) were sent to another fal queue ({wait.where}) "
                "and wait for the process that follows it"
            )
    return "; ".join(parts)


def eta_at_pace(remaining: int, per_minute: float | None, *, held: str, busy: int) -> float | None:
    """When should ``remaining`` unfinished jobs be done at ``per_minute``, in seconds: the one
    rule of every forecast (``status``, the dashboard, ``run``'s progress line), whatever pace
    each goes by.

    0 when nothing is left. None when there is no pace, when something holds the batch back
    (``held``: :func:`held_reason` or :func:`standing`, "" when nothing does: a paused batch, or
    one outside its schedule, sends none of its waiting jobs, so a time for them is a promise
    nobody keeps), or when nothing is in flight (``busy``: nothing is being worked on, so
    nothing says when it will be).
    """
    if remaining <= 0:
        return 0.0
    if held or busy == 0 or per_minute is None or per_minute <= 0:
        return None
    return round(remaining / per_minute * 60, 1)


#: A process working on a batch records so every 10 s (``worker.conductor.HEARTBEAT_SECONDS``);
#: one silent this long has stopped (a Ctrl-C'd or killed ``run``, a closed SSH session). An
#: upgrade of the schema waits for the same silence (:func:`jobs.db.live_processes`).
PROCESSING_STALE_SECONDS = HEARTBEAT_STALE_SECONDS


#: When processes last said they work on a batch: :class:`jobs.store.BatchBeat` (its last
#: sighting, and the last one of a process not known to have ended).
LastBeat = store.BatchBeat


def heartbeats(
    session: Session,
    batch_ids: Collection[str],
    *,
    now: datetime,
    gone: Callable[[str], bool] | None = beat_owner_ended,
) -> dict[str, LastBeat]:
    """When a process last said it works on each of ``batch_ids`` (:func:`jobs.store.batch_beats`):
    the workers' beat from before a batch existed counts only while they are alive (as the
    batch's creation), never as a "last seen" earlier than the batch. A beat of a process of this
    host proved to have ended (``gone``: :func:`jobs.processes.beat_owner_ended`) says when the batch was last
    seen, never that it is processed (:func:`is_processing`): a killed ``run`` no longer looked
    busy, with an ETA, for a minute after its death."""
    if not batch_ids:
        return {}
    live_since = now - timedelta(seconds=PROCESSING_STALE_SECONDS)
    return store.batch_beats(session, batch_ids, live_since=live_since, gone=gone)


def heartbeat(session: Session, batch_id: str, *, now: datetime) -> LastBeat | None:
    """:func:`heartbeats` of one batch."""
    return heartbeats(session, [batch_id], now=now).get(batch_id)


def broker_down_since(session: Session, *, now: datetime) -> datetime | None:
    """Since when the distributed workers' leader, alive (a beat within
    :data:`PROCESSING_STALE_SECONDS`), cannot reach the broker; None: it can, or none is alive."""
    live_since = now - timedelta(seconds=PROCESSING_STALE_SECONDS)
    return store.workers_broker_down_since(session, live_since=live_since)


#: The longest pause between two probes of a process that cannot connect to fal
#: (``worker.steps.fal_reach``: 1 s, doubling with each failed probe, up to this).
FAL_PROBE_PAUSE_MAX = 60.0
#: A process holding its submits renews its :class:`~jobs.models.FalHold` row at most this
#: often, when a probe fails (the start and the end of a hold are written at once).
FAL_HOLD_RENEW_SECONDS = 30.0
#: A hold not renewed for this long is a process's that died holding (or that has nothing
#: more to send): ``status`` and the dashboard no longer show it. Two of the longest pauses: a
#: process that probes renews its row at least once per pause.
FAL_HOLD_STALE_SECONDS = 2 * FAL_PROBE_PAUSE_MAX


@dataclass(frozen=True, slots=True)
class FalHoldView:
    """A process that cannot connect to fal, holding its submits: what ``status`` shows."""

    owner: str
    since: datetime
    #: When its next probe goes, as far as can be told (:func:`next_probe`).
    next_probe_at: datetime
    pause_seconds: float
    error: str

    @property
    def host(self) -> str:
        return self.owner.partition(":")[0]

    @property
    def pid(self) -> int | None:
        pid = self.owner.partition(":")[2].partition(":")[0]
        return int(pid) if pid.isascii() and pid.isdigit() else None

    def who(self) -> str:
        """``worker-3 (pid 4242)``."""
        return f"{self.host} (pid {self.pid})" if self.pid is not None else self.host

    def as_json(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "host": self.host,
            "pid": self.pid,
            "since": self.since.isoformat(),
            "next_probe_at": self.next_probe_at.isoformat(),
            "pause_seconds": self.pause_seconds,
            "error": self.error,
        }


def next_probe(at: datetime, pause: float, *, now: datetime) -> tuple[datetime, float]:
    """The next probe at or after ``now`` of a process whose row says its next probe goes ``at``
    with ``pause`` seconds between probes then: each probe due since failed (had one answered,
    the row would be gone), doubling the pause up to :data:`FAL_PROBE_PAUSE_MAX`."""
    pause = max(pause, 0.001)
    while at < now and pause < FAL_PROBE_PAUSE_MAX:
        pause = min(FAL_PROBE_PAUSE_MAX, pause * 2)
        at += timedelta(seconds=pause)
    if at < now:  # every pause the longest now: whole pauses until after now
        steps = -(-(now - at).total_seconds() // pause)
        at += timedelta(seconds=steps * pause)
    return at, pause


def fal_holds(
    session: Session,
    batch_id: str,
    *,
    now: datetime,
    simulated: bool = False,
    gone: Callable[[str], bool] | None = None,
) -> list[FalHoldView]:
    """The processes that hold submits of ``batch_id`` because they cannot connect to fal: an
    embedded ``run`` of it, or distributed workers (every batch but a ``--simulate`` run's),
    whose row was renewed within :data:`FAL_HOLD_STALE_SECONDS`; ``gone`` tells owners known to
    have ended (a process of this host whose pid no longer runs: left out at once)."""
    scopes = _hold_scopes(batch_id, simulated)
    live_since = now - timedelta(seconds=FAL_HOLD_STALE_SECONDS)
    return _hold_views(store.fal_holds(session, scopes, live_since=live_since), now=now, gone=gone)


def fal_holds_of_batches(
    session: Session,
    batches: Sequence[Batch],
    *,
    now: datetime,
    gone: Callable[[str], bool] | None = None,
) -> dict[str, list[FalHoldView]]:
    """:func:`fal_holds` of each of ``batches`` (by id), from one query."""
    if not batches:
        return {}
    live_since = now - timedelta(seconds=FAL_HOLD_STALE_SECONDS)
    rows = store.fal_holds(session, [*(b.id for b in batches), EVERY_BATCH], live_since=live_since)
    found = {}
    for batch in batches:
        scopes = set(_hold_scopes(batch.id, batch.simulated))
        found[batch.id] = _hold_views([row for row in rows if row.scope in scopes], now=now, gone=gone)
    return found


def _hold_scopes(batch_id: str, simulated: bool) -> list[str]:
    """The holds that hold a batch's submits: an embedded run's of it, and (unless it is a
    simulation, which only its own run sends) the distributed workers'."""
    return [batch_id] if simulated else [batch_id, EVERY_BATCH]


def _hold_views(
    rows: Iterable[store.FalHoldRow], *, now: datetime, gone: Callable[[str], bool] | None
) -> list[FalHoldView]:
    """One view per owner of ``rows`` (longest-standing first), owners ``gone`` left out."""
    shown: dict[str, FalHoldView] = {}
    for row in rows:
        if row.owner in shown or (gone is not None and gone(row.owner)):
            continue
        at, pause = next_probe(row.next_probe_at, row.pause_seconds, now=now)
        shown[row.owner] = FalHoldView(row.owner, row.since, at, pause, row.error)
    return list(shown.values())


def fal_hold_text(holds: Sequence[FalHoldView], *, now: datetime) -> str:
    """``fal unreachable from worker-3 (pid 4242) since 14:02:11 UTC (submits held, next probe in
    32s): could not connect (ConnectError): …``; "" when no process holds. The hold's start
    names its date when not on ``now``'s UTC day (:func:`utc_clock`)."""
    if not holds:
        return ""
    first = holds[0]  # the longest-standing
    who = first.who() if len(holds) == 1 else f"{first.who()} and {len(holds) - 1} other process(es)"
    wait = max(0, round((first.next_probe_at - now).total_seconds()))
    said = f": {first.error}" if first.error else ""
    return (
        f"fal unreachable from {who} since {utc_clock(first.since, now=now)} "
        f"(submits held, next probe in {wait}s){said}"
    )


# --------------------------------------------------------------------------- lease holders


def holder_who(owner: str) -> str:
    """``123@worker-3`` for lease owner ``worker-3:123:456`` (the owner as stored otherwise)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return f"{pid}@{host}" if owner_prefix(owner) is not None else owner


def _held_jobs(
    holders: Sequence[store.LeaseHolder | DeadHolder], name: Callable[[str], str] = str
) -> tuple[int, datetime, str]:
    """How many jobs ``holders`` hold, when the last lease ends, and whose (the first one's
    owner as ``name`` puts it, and how many others): the words :func:`waiting_note` and
    :func:`dead_holders_text` share."""
    jobs = sum(h.jobs for h in holders)
    until = max(h.until for h in holders)
    first = name(holders[0].owner)
    who = first if len(holders) == 1 else f"{first} and {len(holders) - 1} other(s)"
    return jobs, until, who


def waiting_note(holders: list[store.LeaseHolder], now: datetime, *, gone: Collection[str] = ()) -> str:
    """``waiting for 3 job(s) leased to host:123:4 (another process) until 14:02:11 UTC``: why
    jobs of the batch do not move while another process holds them (``gone``: owners known to
    have ended, whose submits in flight are waited for: "a process that has ended"). What an
    embedded run's progress line says (``worker.running.leases_note``) of holders that do not
    work on the batch now (gone, or their heartbeat stale: not those of
    :func:`working_beside_note`), with no ETA; ``status`` says the
    same of holders that are gone (:func:`dead_holders_text`). The wait's end names its date
    when not on ``now``'s UTC day (:func:`utc_clock`)."""
    live = [h for h in holders if h.until > now]
    if not live:
        return ""
    jobs, until, who = _held_jobs(live)
    if all(h.owner in gone for h in live):
        return (
            f"waiting for {jobs} job(s) leased to {who} (a process that has ended; submits whose "
            f"outcome is checked then) until {utc_clock(until, now=now)}"
        )
    # No countdown: the words stay the same while the wait lasts (a plain progress line is
    # printed again whenever they change).
    return f"waiting for {jobs} job(s) leased to {who} (another process) until {utc_clock(until, now=now)}"


def working_beside_note(holders: Sequence[store.LeaseHolder]) -> str:
    """``another process works on this batch too: 11835@vm (5 job(s) leased to it)``: other
    live processes that work on the batch beside this run (their heartbeat is fresh: a second
    ``run`` of the batch, the distributed workers), whose leases come and go as they send and
    collect jobs ("" when none). What an embedded run's progress line says of them, with the
    batch's ETA: :func:`waiting_note` ("waiting for … until", the lease's end renewed for as
    long as they work) said nothing of the batch's pace and looked like a stall."""
    if not holders:
        return ""
    # By process: the threads of one (``host:pid:thread``) are one process.
    processes = list(dict.fromkeys(owner_prefix(h.owner) or h.owner for h in holders))
    jobs = sum(h.jobs for h in holders)
    first = holder_who(holders[0].owner)
    if len(processes) == 1:
        return f"another process works on this batch too: {first} ({jobs} job(s) leased to it)"
    who = f"{first} and {len(processes) - 1} other(s)"
    return f"{len(processes)} other processes work on this batch too: {who} ({jobs} job(s) leased to them)"


@dataclass(frozen=True, slots=True)
class DeadHolder:
    """A process that holds leases on a batch's unfinished jobs and is gone: it has ended (a
    process of this host whose pid no longer runs), its heartbeat went stale, or (a worker that
    does not lead, on any host) its own record on the workers' Redis was not refreshed
    (``silent``, :func:`dead_holders`). Its jobs wait for the lease to end, then are taken over
    (a submit's outcome checked by the reconciler): naming it changes nothing of that."""

    owner: str
    jobs: int
    #: When the last of its leases ends.
    until: datetime
    #: Its last heartbeat; None when it never beat (a worker that did not lead the ticks).
    last_seen: datetime | None
    #: Known to have ended (its pid no longer runs on this host).
    ended: bool
    #: Named because its worker record on Redis went stale (``silent`` of :func:`dead_holders`).
    record_stale: bool = False

    def as_json(self) -> dict[str, Any]:
        host, _, rest = self.owner.partition(":")
        pid = rest.partition(":")[0]
        return {
            "owner": self.owner,
            "host": host,
            "pid": int(pid) if pid.isascii() and pid.isdigit() else None,
            "jobs": self.jobs,
            "lease_until": self.until.isoformat(),
            "last_seen": self.last_seen.isoformat() if self.last_seen is not None else None,
            "ended": self.ended,
            "worker_record_stale": self.record_stale,
        }


def dead_holders(
    holders: Sequence[store.LeaseHolder],
    last_seen: dict[str, datetime],
    *,
    now: datetime,
    gone: Callable[[str], bool] | None = None,
    silent: Mapping[str, datetime] | None = None,
) -> list[DeadHolder]:
    """Those of ``holders`` that are gone: known to have ended (``gone``: a process of this host
    whose pid no longer runs), whose last heartbeat (``last_seen``, by ``host:pid:``) is older
    than :data:`PROCESSING_STALE_SECONDS`, or that are ``silent``: worker processes (by
    ``host:pid:``, when each was last seen) whose own record on the workers' Redis has not been
    refreshed for several of their beats (:data:`worker.peers.PEER_GONE_SECONDS`, decided by the
    caller) and that have no fresher heartbeat here. A holder with neither that cannot be told
    gone (another host, a worker that never led and has no record) is not named: nothing says
    it died. Its last sighting is the later of the two."""
    found = []
    for h in holders:
        prefix = owner_prefix(h.owner)
        if prefix is None or h.until <= now:
            continue
        seen = last_seen.get(prefix)
        ended = gone is not None and gone(h.owner)
        stale = seen is not None and (now - seen).total_seconds() > PROCESSING_STALE_SECONDS
        record = silent.get(prefix) if silent else None
        # A heartbeat fresher than the record's staleness says it is alive (its Redis writes fail).
        quiet = record is not None and (seen is None or stale)
        if ended or stale or quiet:
            latest = max(at for at in (seen, record) if at is not None) if quiet else seen
            found.append(DeadHolder(h.owner, h.jobs, h.until, latest, ended, record_stale=quiet))
    return found


def read_dead_holders(
    session: Session,
    batch_ids: Collection[str],
    *,
    now: datetime,
    excluding: str,
    gone: Callable[[str], bool] | None = None,
    silent: Mapping[str, datetime] | None = None,
) -> dict[str, list[DeadHolder]]:
    """:func:`dead_holders` of each of ``batch_ids`` (all of them keys), from two queries;
    ``excluding``: this process's ``host:pid:``."""
    holders = store.lease_holders_of_batches(session, batch_ids, now=now, excluding=excluding)
    prefixes = {p for hs in holders.values() for h in hs if (p := owner_prefix(h.owner)) is not None}
    seen = store.owners_last_seen(session, prefixes)
    return {b: dead_holders(holders.get(b, []), seen, now=now, gone=gone, silent=silent) for b in batch_ids}


def dead_holders_text(dead: Sequence[DeadHolder], *, now: datetime, processing: bool = True) -> str:
    """``1 job held by worker 123@host, not seen for 40s: taken over at 23:41:07 UTC when its
    lease ends``; "" when none. Without it ``status`` showed "1 in flight · ~0m02s left" for a
    lease's length, and nothing of the killed worker holding it. The takeover names its date
    when not on ``now``'s UTC day (:func:`utc_clock`).

    Not ``processing`` (the workers' tick leader is frozen, :func:`leader_stalled`: the
    reconciler that takes leases over does not run), nothing takes the jobs over when the lease
    ends: the line says they are taken over once a process works on the batch again.

    A holder known to have ended (``ended``: a pid of this host that no longer runs,
    :func:`jobs.processes.owner_gone`) is said to have, whenever it last beat: "not seen for 4s"
    of a run killed a moment ago read as a process that may be alive, while the progress line
    and ``--json``'s ``ended`` said it had ended."""
    if not dead:
        return ""
    jobs, until, who = _held_jobs(dead, holder_who)
    first = dead[0]
    if first.ended or first.last_seen is None:
        state = "which has ended"
    else:
        state = f"not seen for {format_age((now - first.last_seen).total_seconds())}"
    noun = "job" if jobs == 1 else "jobs"
    ends = "its lease ends" if len(dead) == 1 else "their leases end"
    at = utc_clock(until, now=now)
    if not processing:
        return (
            f"{jobs} {noun} held by process {who}, {state}: taken over once a process works on the "
            f"batch again ({ends} at {at})"
        )
    return f"{jobs} {noun} held by process {who}, {state}: taken over at {at} when {ends}"


def is_fresh(at: datetime | None, *, now: datetime) -> bool:
    """Whether a beat at ``at`` is recent enough (:data:`PROCESSING_STALE_SECONDS`) to say that
    its process works now."""
    return at is not None and (now - at).total_seconds() <= PROCESSING_STALE_SECONDS


def leader_stalled(beats: store.WorkersBeat | None, *, now: datetime | None = None) -> bool:
    """Whether workers beat in this database (one that does not lead, within
    :data:`PROCESSING_STALE_SECONDS`) while their tick leader does not: a leader frozen while it
    holds the lead (``kill -STOP``, Ctrl-Z, a debugger, a paused VM), not workers that serve
    another database, nor no worker at all."""
    at = now or utcnow()
    return (
        beats is not None and is_fresh(beats.others_seen, now=at) and not is_fresh(beats.leader_seen, now=at)
    )


def stalled_leader_text(beats: store.WorkersBeat, *, now: datetime | None = None) -> str:
    """What :func:`leader_stalled` means, naming the leader and how long it has been silent.

    The other workers end a silent leader's lock session and take the lead over (after about
    half a minute: :func:`worker.ticker.leader_silent_after`), unless their database role may
    not end that session; until then, nothing is dispatched or collected."""
    at = now or utcnow()
    owner = beats.leader_owner
    who = holder_who(owner) if owner is not None else None
    if who is None or beats.leader_seen is None:
        leader = "the workers' tick leader has not beaten yet"
    else:
        silent = format_age(max(0.0, (at - beats.leader_seen).total_seconds()))
        leader = f"the workers' tick leader (process {who}) has not beaten for {silent}"
    return (
        f"{leader}, while the other workers on this database still do: it is likely frozen "
        "(stopped by Ctrl-Z or kill -STOP, in a debugger, a paused VM) while it holds the lead, and "
        "nothing is dispatched or collected meanwhile. Another worker ends its session and takes "
        "the lead over once it has been silent for about half a minute (its log says so; if it "
        "says its database role may not, resume the frozen worker with kill -CONT, or stop it)"
    )


def is_processing(last_beat: LastBeat | None, *, now: datetime) -> bool:
    """Whether a process not known to have ended said recently enough (``last_beat``) that it
    works on a batch."""
    return last_beat is not None and is_fresh(last_beat.live, now=now)


def ended_run(last_beat: LastBeat | None, *, now: datetime) -> bool:
    """Whether the process that last worked on a batch is known to have ended (a killed ``run``
    of this host) and no other works on it now: what a cap or fal's queue seemed to hold back
    was that process's, and ``status`` says that nothing processes the batch instead."""
    return last_beat is not None and last_beat.ended and not is_processing(last_beat, now=now)


def idle_reason(totals: Totals, last_beat: LastBeat | None, *, now: datetime) -> str:
    """ "nothing is processing it" when a batch has work left but no process works on it (its
    ``run`` was stopped or killed, no worker runs); "" otherwise. Jobs waiting at fal hold no
    lease, so without this a stopped batch looked as busy as a running one, and got a forecast."""
    if totals.finished >= totals.total or is_processing(last_beat, now=now):
        return ""
    return not_processing(last_beat.seen if last_beat is not None else None, now=now)


def not_processing(last_beat: datetime | None, *, now: datetime) -> str:
    """ "nothing is processing it", and since when when a process ever said it did."""
    if last_beat is None:
        return "nothing is processing it"
    return f"nothing is processing it (last seen {format_age((now - last_beat).total_seconds())} ago)"


def standing(batch: Batch, totals: Totals, last_beat: LastBeat | None, *, now: datetime) -> str:
    """Why ``batch`` does not move now, in words ("" when it does): what holds it back
    (:func:`held_reason`), else that nothing processes it (:func:`idle_reason`). A cancelled
    batch with jobs still at fal or downloading (a video fal finished despite the cancel, proved
    by a webhook after its run ended) says both: ``run BATCH`` collects them."""
    held = held_reason(batch, now=now)
    if held == "cancelled" and totals.busy and (idle := idle_reason(totals, last_beat, now=now)):
        return f"cancelled; {totals.busy} job(s) at fal or downloading and {idle}"
    return held or idle_reason(totals, last_beat, now=now)


#: :func:`jobs.batches.schedule_state` of a batch its user paused (``wanbatch pause``) with work
#: left, and :func:`held_reason` of one.
PAUSED_BY_USER = "paused by user"
#: How :func:`jobs.batches.schedule_state` (and :meth:`Schedule.describe`) starts for a batch
#: whose deadline has passed.
PAST_DEADLINE = "past deadline"
#: How :func:`jobs.batches.schedule_state` starts for a schedule that will never send again: its
#: deadline passed, or comes before the window next opens (:meth:`Schedule.describe`).
SCHEDULE_OVER = (PAST_DEADLINE, "closed: nothing opens before the deadline")


def batch_phase(
    *,
    state: str,
    total: int,
    finished: int,
    pause_reason: str | None,
    paused_by_user: bool,
    schedule_state: str,
) -> tuple[str, str | None]:
    """What a person should read as a batch's state, and why when it is held back: the one
    decision ``status`` (its ``phase``), :func:`held_reason` and the dashboard go by.

    The stored ``state`` says only whether jobs may be sent, so a batch whose every job
    finished is still ``active`` there; a script polling ``status --json`` needs ``done``.
    ``paused`` covers both a batch fal's refusal paused (its ``pause_reason``) and a user's
    ``wanbatch pause``; ``waiting`` a schedule that is closed now; ``deadline`` a schedule whose
    deadline passed (paused or not: resuming sends nothing then); ``done`` every job finished.
    """
    if state == BatchState.CANCELLED:
        return "cancelled", None
    if total and finished >= total:
        return "done", None
    # Past its deadline the refusal holds nothing back either: nothing is sent any more, and the
    # next run ends what is left (its unsent jobs cancelled, reason ``deadline``).
    if state == BatchState.PAUSED and not schedule_state.startswith(PAST_DEADLINE):
        return "paused", pause_reason or "see the log"
    # Past its deadline (or the window opens only after it) the user's pause holds nothing back
    # any more: resuming would send nothing (see :func:`jobs.batches.schedule_state`).
    if paused_by_user and not schedule_state.startswith(SCHEDULE_OVER):
        return "paused", "by its user"
    if schedule_state.startswith(PAST_DEADLINE):
        return "deadline", schedule_state
    if schedule_state and not schedule_state.startswith("open"):
        return "waiting", schedule_state
    return "active", None


def held_reason(batch: Batch, *, now: datetime) -> str:
    """Why no new job of ``batch`` is sent right now, in words ("" when they may be).

    Decided by :func:`batch_phase`, as ``status`` decides its phase: past its deadline (or with a
    window that opens only after it) a batch is held by its schedule, not by a pause, whoever
    paused it (resuming would send nothing); whether every job finished is not asked here."""
    schedule = store.batch_schedule(batch)
    phase, reason = batch_phase(
        state=batch.state,
        total=0,
        finished=0,
        pause_reason=batch.pause_reason,
        paused_by_user=batch.paused_by_user,
        schedule_state=schedule.describe(now),
    )
    if phase == "cancelled":
        return "cancelled"
    if phase == "paused":  # fal's refusal (or the outputs) first, as batch_phase decides
        if batch.state == BatchState.PAUSED:
            return f"paused: {batch.pause_reason}" if batch.pause_reason else "paused"
        return PAUSED_BY_USER
    return reason or ""  # "deadline" and "waiting": the schedule's words; "active": nothing


# --------------------------------------------------------------------------- the batch list


def totals_of_batches(session: Session, batch_ids: Sequence[str], *, now: datetime) -> dict[str, Totals]:
    """:class:`Totals` of each of ``batch_ids`` (a batch without jobs: empty ones), from one
    ``GROUP BY batch_id, state`` over their jobs: the figures :func:`batch_summary` gives one
    batch (money is exact, so summed by state or by state and endpoint it is the same)."""
    totals = {batch_id: Totals() for batch_id in batch_ids}
    if totals:
        rows = session.execute(
            select(Job.batch_id, Job.state, *_aggregates(now - THROUGHPUT_WINDOW))
            .where(Job.batch_id.in_(list(totals)))
            .group_by(Job.batch_id, Job.state)
        )
        for batch_id, state, *figures in rows:
            totals[batch_id].add(JobState(state), figures)
        for batch_id, stretch in work_stretches(session, list(totals), now=now).items():
            totals[batch_id].stretch = stretch
    return totals


@dataclass(frozen=True, slots=True)
class BatchRow:
    """One batch as the batch list shows it (the ORM row is loaded and detached-safe). Its
    forecast is ``status``'s, by its rules (:func:`jobs.batches.batch_forecasts`): not decided
    here, where the workers' broker was not asked."""

    batch: Batch
    totals: Totals


@dataclass(frozen=True, slots=True)
class BatchList:
    """A page of the batch list, newest first."""

    rows: list[BatchRow]
    #: Batches stored in all (the list may show only some of them).
    total_batches: int
    page: int
    pages: int


def list_batches(
    session: Session, *, page: int = 1, per_page: int = BATCHES_PER_PAGE, now: datetime | None = None
) -> BatchList:
    """A page of batches, newest first, with their totals: two queries in all, one of them a
    single ``GROUP BY batch_id, state`` over the jobs of the batches shown."""
    now = now or utcnow()
    total_batches = int(session.scalar(select(func.count()).select_from(Batch)) or 0)
    pages = max(1, -(-total_batches // per_page))
    page = min(max(page, 1), pages)
    batches = list(
        session.scalars(
            select(Batch)
            .order_by(Batch.created_at.desc(), Batch.id.desc())
            .limit(per_page)
            .offset((page - 1) * per_page)
        )
    )
    totals = totals_of_batches(session, [b.id for b in batches], now=now)
    return BatchList(
        rows=[BatchRow(batch=b, totals=totals[b.id]) for b in batches],
        total_batches=total_batches,
        page=page,
        pages=pages,
    )


# --------------------------------------------------------------------------- one batch


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """A batch's totals per endpoint and in all: the page's figures and its filter's choices."""

    by_endpoint: dict[str, Totals]
    all: Totals

    @property
    def endpoints(self) -> dict[str, int]:
        """Jobs per endpoint, busiest first."""
        jobs = {ep: t.total for ep, t in self.by_endpoint.items()}
        return dict(sorted(jobs.items(), key=lambda kv: (-kv[1], kv[0])))

    def counts(self, endpoint: str | None = None) -> dict[str, int]:
        """Jobs per state (every state, 0 when none), of one endpoint or all."""
        if endpoint is None:
            return self.all.counts
        found = self.by_endpoint.get(endpoint)
        return found.counts if found is not None else Totals().counts

    def matching(self, states: Sequence[JobState] = (), endpoint: str | None = None) -> int:
        """How many jobs a filter matches (no states: any state; no endpoint: any endpoint)."""
        counts = self.counts(endpoint)
        return sum(counts[s.value] for s in states) if states else sum(counts.values())


def batch_summary(session: Session, batch_id: str, *, now: datetime | None = None) -> BatchSummary:
    """:class:`BatchSummary` of one batch, from one ``GROUP BY state, endpoint`` over its jobs
    (and its current stretch of work: :func:`work_stretches`)."""
    now = now or utcnow()
    since = now - THROUGHPUT_WINDOW
    rows = session.execute(
        select(Job.state, Job.endpoint, *_aggregates(since))
        .where(Job.batch_id == batch_id)
        .group_by(Job.state, Job.endpoint)
    )
    everything = Totals()
    by_endpoint: dict[str, Totals] = {}
    for state, endpoint, *figures in rows:
        job_state = JobState(state)
        everything.add(job_state, figures)
        by_endpoint.setdefault(str(endpoint), Totals()).add(job_state, figures)
    # The batch's pace (per endpoint, the window's finishes: no stretch is read for each).
    everything.stretch = work_stretches(session, [batch_id], now=now).get(batch_id)
    return BatchSummary(by_endpoint=by_endpoint, all=everything)


@dataclass(frozen=True, slots=True)
class Cursor:
    """A position in a batch's item order: the job list's keyset (``item.variant.id`` in URLs)."""

    item_index: int
    variant: int
    id: str

    def encode(self) -> str:
        return f"{self.item_index}.{self.variant}.{self.id}"

    @classmethod
    def decode(cls, text: str | None) -> Cursor | None:
        """The cursor ``text`` encodes, or None for anything malformed (the list starts over)."""
        if not text:
            return None
        parts = text.split(".")
        if len(parts) != 3 or not all(parts):
            return None
        item, variant = ascii_int(parts[0], max_digits=9), ascii_int(parts[1], max_digits=9)
        job_id = parts[2]
        if item is None or variant is None:
            return None
        if len(job_id) > 32 or not (job_id.isascii() and job_id.isalnum()):
            return None
        return cls(item, variant, job_id)


@dataclass(frozen=True, slots=True)
class JobRow:
    """One job as the job list shows it."""

    id: str
    item_index: int
    variant: int
    endpoint: str
    state: str
    attempts: int
    seed: int | None
    #: The prompt as the manifest gave it, and as fal's prompt expansion rewrote it (if it did),
    #: each masked as an export masks it (:func:`jobs.url_secrets.shareable_text`: FAL_KEY, a fal
    #: key's shape, URL credentials): the dashboard shows them.
    prompt: str | None
    actual_prompt: str | None
    error: str | None
    error_type: str | None
    est_usd: Decimal
    actual_usd: Decimal | None
    #: What its submits whose outcome stayed unknown may have cost (``Job.ambiguous_usd``): shown
    #: apart from ``actual_usd``, as fal may or may not have billed it.
    ambiguous_usd: Decimal
    media: dict[str, Any] | None
    media_mismatch: str | None
    output_path: str | None
    reused_from: str | None
    possible_duplicate_charges: int
    updated_at: datetime

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.item_index, self.variant, self.id)

    @property
    def counted_usd(self) -> Decimal:
        """What the job counts in its batch's spent money (:func:`jobs.store.finished_usd`, the
        rule of ``status``, the dashboard's totals and ``/metrics``) apart from ``ambiguous_usd``,
        which the job list shows on its own line: in ``downloading``, what earlier attempts cost
        plus the estimate of the one fal just finished, whose bill is not written yet."""
        return store.finished_usd(JobState(self.state), self.actual_usd, self.est_usd)


@dataclass(frozen=True, slots=True)
class JobPage:
    """One page of a batch's jobs in item order, and where the pages around it start."""

    rows: list[JobRow]
    has_prev: bool
    has_next: bool

    @property
    def first(self) -> Cursor | None:
        return self.rows[0].cursor if self.rows else None

    @property
    def last(self) -> Cursor | None:
        return self.rows[-1].cursor if self.rows else None


_ROW_COLUMNS = (
    Job.id,
    Job.item_index,
    Job.variant,
    Job.endpoint,
    Job.state,
    Job.attempts,
    Job.seed,
    Job.input["prompt"].as_string(),
    Job.actual_prompt,
    Job.error,
    Job.error_type,
    Job.est_usd,
    Job.actual_usd,
    Job.ambiguous_usd,
    Job.media,
    Job.media_mismatch,
    Job.output_path,
    Job.reused_from,
    Job.possible_duplicate_charges,
    Job.updated_at,
)


def list_jobs(
    session: Session,
    batch_id: str,
    *,
    states: Sequence[JobState] = (),
    endpoint: str | None = None,
    after: Cursor | None = None,
    before: Cursor | None = None,
    last: bool = False,
    limit: int = DEFAULT_PAGE_SIZE,
) -> JobPage:
    """A page of ``limit`` jobs of a batch in item order, filtered by state and endpoint.

    With no position: the first page. ``after``: the page after that job; ``before``: the page
    before it; ``last``: the last page. Each reads at most ``limit + 1`` rows (the extra one
    says whether there is more beyond), whichever page it is. An ``endpoint`` no database can
    hold (a NUL) matches no job: an empty page, on every database alike, without a query.
    """
    if endpoint is not None and holds_unstorable(endpoint):
        return JobPage(rows=[], has_prev=False, has_next=False)
    order = tuple_(Job.item_index, Job.variant, Job.id)
    query = select(*_ROW_COLUMNS).where(Job.batch_id == batch_id)
    if states:
        query = query.where(Job.state.in_(list(states)))
    if endpoint is not None:
        query = query.where(Job.endpoint == endpoint)
    backwards = before is not None or (last and after is None)
    if after is not None:
        query = query.where(order > tuple_(after.item_index, after.variant, after.id))
    elif before is not None:
        query = query.where(order < tuple_(before.item_index, before.variant, before.id))
    if backwards:
        query = query.order_by(Job.item_index.desc(), Job.variant.desc(), Job.id.desc())
    else:
        query = query.order_by(Job.item_index, Job.variant, Job.id)
    fetched = [_job_row(row) for row in session.execute(query.limit(limit + 1))]
    more = len(fetched) > limit
    rows = fetched[:limit]
    if backwards:
        rows.reverse()
        return JobPage(rows=rows, has_prev=more, has_next=before is not None)
    return JobPage(rows=rows, has_prev=after is not None, has_next=more)


def _job_row(row: Any) -> JobRow:
    (
        job_id,
        item_index,
        variant,
        endpoint,
        state,
        attempts,
        seed,
        prompt,
        actual_prompt,
        error,
        error_type,
        est_usd,
        actual_usd,
        ambiguous_usd,
        media,
        media_mismatch,
        output_path,
        reused_from,
        duplicates,
        updated_at,
    ) = row
    return JobRow(
        id=job_id,
        item_index=int(item_index),
        variant=int(variant),
        endpoint=endpoint,
        state=JobState(state).value,
        attempts=int(attempts),
        seed=seed,
        prompt=_shown(prompt),
        actual_prompt=_shown(actual_prompt),
        error=error,
        error_type=error_type,
        est_usd=est_usd,
        actual_usd=actual_usd,
        ambiguous_usd=ambiguous_usd or Decimal(0),
        media=media,
        media_mismatch=media_mismatch,
        output_path=output_path,
        reused_from=reused_from,
        possible_duplicate_charges=int(duplicates or 0),
        updated_at=updated_at,
    )


def _shown(text: str | None) -> str | None:
    """A stored prompt as the job list shows it: masked as an export masks it."""
    return shareable_text(text) if isinstance(text, str) else text


def job_output(session: Session, job_id: str) -> tuple[str, str | None] | None:
    """``(batch_id, output_path)`` of a job, or None when there is no such job (as for an id no
    database can hold, a NUL in a URL: asked of none, which PostgreSQL would refuse)."""
    if holds_unstorable(job_id):
        return None
    row = session.execute(select(Job.batch_id, Job.output_path).where(Job.id == job_id)).first()
    return None if row is None else (str(row[0]), row[1])


def child_batches(session: Session, batch_id: str) -> list[tuple[str, str]]:
    """``(id, name)`` of the batches rerun from this one, oldest first."""
    rows = session.execute(
        select(Batch.id, Batch.name)
        .where(Batch.parent_batch_id == batch_id)
        .order_by(Batch.created_at, Batch.id)
    )
    return [(str(i), str(n)) for i, n in rows]


@dataclass(frozen=True, slots=True)
class ReusedSource:
    """Where some of a batch's reused videos were made: the batch of the jobs their
    ``reused_from`` names (None when such a job is no longer stored), and how many."""

    batch_id: str | None
    name: str | None
    jobs: int


def reused_sources(session: Session, batch_id: str, states: Collection[JobState]) -> list[ReusedSource]:
    """The batches whose jobs made the videos the batch's jobs in ``states`` took instead of
    being sent (``reused_from``: ``reuse_outputs``, or a rerun taking a staged video back),
    most jobs first, then by name (jobs no longer stored last): one ``GROUP BY`` over the
    batch's reused jobs."""
    source = aliased(Job)
    jobs = func.count(Job.id)
    rows = session.execute(
        select(source.batch_id, Batch.name, jobs)
        .select_from(Job)
        .outerjoin(source, source.id == Job.reused_from)
        .outerjoin(Batch, Batch.id == source.batch_id)
        .where(Job.batch_id == batch_id, Job.reused_from.is_not(None), Job.state.in_(list(states)))
        .group_by(source.batch_id, Batch.name)
        .order_by(jobs.desc(), source.batch_id.is_(None), Batch.name, source.batch_id)  # gone ones last
    )
    return [ReusedSource(found, name, int(n)) for found, name, n in rows]
