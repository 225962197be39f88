"""What the caps count: the requests in flight at fal per scope (:class:`CapScope`), who
holds them, cancels, waits at fal's queue and the submits of an origin."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, func, literal, or_, select, true
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import BindParameter

from jobs import db
from jobs.models import EVERY_BATCH, Batch, ConductorHeartbeat, Job, utcnow
from jobs.states import AT_PROVIDER_STATES, JobState
from jobs.store.core import _paid, _prepared, _run, _sent_with, sent_to_origin, session_connection
from jobs.store.dispatch import RateRead, rate_columns
from jobs.store.due import _DUE, _any_due_retry


@dataclass(frozen=True, slots=True)
class CapScope:
    """Which jobs a dispatcher's caps count (:meth:`of`): those it shares a limit with, never
    jobs that cannot hold it back.

    The outstanding cap guards fal's account, so it counts the requests really at that
    provider with this key, whatever their batch; the download backlog guards this process's
    own downloads piling up, so it counts the downloads this process makes. Counting more held
    every later run back for ever: a batch interrupted during its downloads (whose own run
    alone downloads them) or a simulation whose simulator had exited (its requests are at no
    provider this run talks to) left ``pending`` jobs of every other batch waiting in silence.
    """

    #: The key whose requests count against the outstanding cap; None: whatever key (a
    #: simulation's requests, which only its own simulator holds).
    api_key_id: str | None
    #: Only these batches' requests count against the outstanding cap; None: every batch's.
    requests_of: frozenset[str] | None = None
    #: Only these batches' downloads count in the backlog; None: every batch sent to fal (the
    #: distributed workers download all of them, and never a simulation's).
    downloads_of: frozenset[str] | None = None
    #: The requests at fal of every key count against the outstanding cap, not only
    #: ``api_key_id``'s (never a simulation's): the distributed workers' dispatch, where a worker
    #: with another ``FAL_KEY`` sends a job with its own key (``record_send``). Counting them all
    #: errs on the safe side: no account ever holds more than the cap.
    every_key: bool = False
    #: The origin of the counting process's fal queue (``Job.fal_origin``'s form). A request sent
    #: to another queue counts against the outstanding cap while a live process other than
    #: :attr:`me` works on its batch, or on every batch (:class:`Followed`): then its state moves
    #: and its slot comes back when it ends, and if that queue is fal's under another URL, it does
    #: hold one of the account's slots. Nobody following it (its run stopped), its row keeps the
    #: state it was last seen in for good, while fal — if that URL is fal's — still queues or
    #: runs it for a while: it counts until :data:`UNFOLLOWED_SECONDS` after it was last heard of
    #: (``Job.updated_at``) or, still waiting to start, after its start timeout ends if that is
    #: later (:func:`_heard_lately`); then it stops counting (a stand-in stopped with requests
    #: waiting held every later run's slots for good). The queue-wait back-off counts this
    #: queue's requests only (:attr:`QueueWaits`). A request with no origin recorded counts as
    #: this queue's. None: every queue's count (a simulation's scope: its requests are its run's
    #: simulator's, whichever port that one had).
    origin: str | None = None
    #: The heartbeat owner of the counting process (``Runtime.owner``), whose own beats do not
    #: make another queue's requests followed; "" for a process that does not beat (``status``).
    me: str = ""

    @classmethod
    def of(
        cls,
        *,
        api_key_id: str,
        batch_ids: Collection[str] | None,
        simulated: bool,
        every_key: bool = False,
        origin: str | None = None,
        me: str = "",
    ) -> CapScope:
        """The caps' scope of a process working on ``batch_ids`` (None: every batch, the
        distributed workers) with the key ``api_key_id`` and the fal queue at ``origin``
        (:attr:`origin`; ``me``: its heartbeat owner); ``simulated``: its fal is the simulator
        of a ``run --simulate``.

        A simulator holds the requests of the one batch its run processes and nothing else,
        so only that batch's requests and downloads count; an embedded run downloads its own
        batch only (other batches' results wait for their own run), while its requests share
        fal's account with every batch sent with the key to its queue, or to another one that
        a live process follows.
        """
        own = frozenset(batch_ids) if batch_ids is not None else None
        if simulated:
            return cls(api_key_id=None, requests_of=own or frozenset(), downloads_of=own or frozenset())
        return cls(
            api_key_id=api_key_id,
            requests_of=None,
            downloads_of=own,
            every_key=every_key,
            origin=origin,
            me=me,
        )


@dataclass(frozen=True, slots=True)
class InFlight:
    """What a dispatch round needs to know of the jobs in flight, read in one query
    (:func:`in_flight`)."""

    #: Requests at fal (or being sent) within the scope: the outstanding cap counts these.
    outstanding: int
    #: Jobs done at fal and waiting for a download within the scope (the download backlog).
    downloading: int
    #: Requests of the scope's own fal queue (:attr:`CapScope.origin`) still ``queued`` that were
    #: sent before the given moment: the queue-wait back-off's signal.
    waiting_long: int
    #: Whether any job waiting for a retry is due (any batch, any key): none, and no claim need
    #: look for them. Not a count of them all: a 5xx outage leaves thousands waiting out their
    #: backoff, and counting them read every one on every round.
    retry_due: bool
    #: Whether any ``pending`` job of the batches :func:`in_flight` was given (every batch when
    #: none) exists, whether due or not, paused or not: none, and with :attr:`retry_due` False a
    #: claim can find nothing (the round claims only those two states), so the round stops there.
    pending: bool = True
    #: The shared submit bucket and pacing of the key :func:`in_flight` was asked to read them
    #: for (None: not asked).
    rate: RateRead | None = None


#: How long a request sent to another fal queue (:attr:`CapScope.origin`) that no live process
#: follows keeps counting against the outstanding cap after it was last heard of, or after its
#: start timeout ends (one still waiting to start): a bound on how long fal runs a request once
#: started (an hour: Wan renders take minutes, ``typical_seconds`` 60 to 150; fal lets a started
#: request run to its end). Until then that URL may be fal's under another name (a proxy), which
#: still runs the request on the account; after it, a stand-in's requests stop holding runs back.
UNFOLLOWED_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Followed:
    """Which batches a live process other than the counting one follows (:func:`followed_now`):
    their requests at another fal queue count as long as they are at fal (:attr:`CapScope.origin`).
    Read once per dispatch round, one small query on the heartbeats, and bound into the counts."""

    #: A live process beats for every batch (the distributed workers' leader): every request counts.
    every: bool = False
    #: The batches live processes beat for (sorted), when not :attr:`every`.
    batch_ids: tuple[str, ...] = ()


#: A scope with no origin, or nothing else to go by: every request counts as followed.
FOLLOWED_ALL = Followed(every=True)


def followed_now(session: Session, scope: CapScope, now: datetime) -> Followed:
    """:class:`Followed` as of ``now`` for ``scope``: the batches (or every batch) a process
    other than :attr:`CapScope.me` beat for within :data:`jobs.db.HEARTBEAT_STALE_SECONDS` — the
    rule the adoption of a batch's requests at another queue goes by
    (``worker.steps.dead_leases``): nothing else beats for the batch, and nobody follows them
    but its next run. No query for a scope without an origin (every queue counts)."""
    if scope.origin is None:
        return FOLLOWED_ALL

    def build() -> Any:
        return (
            select(ConductorHeartbeat.scope)
            .where(
                ConductorHeartbeat.seen_at >= bindparam("live_since"),
                ConductorHeartbeat.owner != bindparam("me"),
            )
            .distinct()
        )

    params = {"live_since": now - timedelta(seconds=db.HEARTBEAT_STALE_SECONDS), "me": scope.me}
    scopes = {str(row[0]) for row in _run(session, _prepared(("followed_now",), build), params).all()}
    if EVERY_BATCH in scopes:
        return FOLLOWED_ALL
    return Followed(batch_ids=tuple(sorted(scopes)))


def _requests_in(
    scope: CapScope, *, own_queue: bool = False, followed: Followed = FOLLOWED_ALL
) -> list[ColumnElement[bool]]:
    """The conditions of :attr:`CapScope.api_key_id`, :attr:`CapScope.requests_of` and
    :attr:`CapScope.origin`, their values bound as ``api_key_id``, ``requests_of``, ``origin``,
    ``followed`` and ``heard_since`` (:func:`_scope_params`). ``own_queue``: only the requests
    of the scope's own fal queue (the queue-wait back-off's); else those at another queue too
    while a live process follows their batch (``followed``: the same shape must be bound with
    the same :class:`Followed`'s values) or fal may still hold them (:func:`_heard_lately`)."""
    conditions: list[ColumnElement[bool]] = []
    if scope.every_key:
        conditions.append(_paid(Job.batch_id))
    elif scope.api_key_id is not None:
        conditions.append(_sent_with(bindparam("api_key_id")))
    if scope.requests_of is not None:
        conditions.append(Job.batch_id.in_(bindparam("requests_of", expanding=True)))
    if scope.origin is not None and (own_queue or not followed.every):
        conditions.append(_at_fal_for(sent_to_origin(bindparam("origin")), own_queue, followed))
    return conditions


def _at_fal_for(here: ColumnElement[bool], own_queue: bool, followed: Followed) -> ColumnElement[bool]:
    """``here`` (the own queue's requests), or with them those at another queue that count now."""
    if own_queue:
        return here
    if followed.every:
        return true()
    if followed.batch_ids:  # never an empty IN: the driver-direct path refuses one
        return or_(here, Job.batch_id.in_(bindparam("followed", expanding=True)), _heard_lately())
    return or_(here, _heard_lately())


def _heard_lately() -> ColumnElement[bool]:
    """A request nobody follows that fal may still queue or run: last heard of (its row last
    changed: its state as last seen, a poll) since ``heard_since`` (:data:`UNFOLLOWED_SECONDS`
    ago), or still waiting to start with a start timeout that ended since then (fal may start
    it until then, and it then runs). Plain comparisons with bound values: no date arithmetic,
    each dialect's own."""
    since: BindParameter[datetime] = bindparam("heard_since")
    return or_(
        Job.updated_at >= since,
        and_(Job.state.in_(list(WAITING_AT_FAL)), Job.start_timeout_at >= since),
    )


def _downloads_in(scope: CapScope) -> ColumnElement[bool]:
    """The condition of :attr:`CapScope.downloads_of`, bound as ``downloads_of``."""
    if scope.downloads_of is not None:
        return Job.batch_id.in_(bindparam("downloads_of", expanding=True))
    return _paid(Job.batch_id)


def _scope_params(
    scope: CapScope, now: datetime | None = None, followed: Followed = FOLLOWED_ALL
) -> dict[str, Any]:
    """The values :func:`_requests_in` and :func:`_downloads_in` bind (``now``: the clock when
    None; ``followed``: the one the statement's shape was built with)."""
    return {
        "api_key_id": scope.api_key_id,
        "requests_of": sorted(scope.requests_of or ()),
        "downloads_of": sorted(scope.downloads_of or ()),
        "origin": scope.origin,
        "followed": list(followed.batch_ids),
        "heard_since": (now or utcnow()) - timedelta(seconds=UNFOLLOWED_SECONDS),
    }


def _scope_shape(scope: CapScope, followed: Followed = FOLLOWED_ALL) -> tuple[bool, ...]:
    """What tells the statements of different scopes apart (:func:`_prepared`'s key)."""
    return (
        scope.api_key_id is None,
        scope.requests_of is None,
        scope.downloads_of is None,
        scope.every_key,
        scope.origin is None,
        followed.every,
        bool(followed.batch_ids),
    )


def in_flight(
    session: Session,
    *,
    scope: CapScope,
    sent_before: datetime,
    now: datetime,
    followed: Followed | None = None,
    pending_of: Collection[str] | None = None,
    rate_of: str | None = None,
    wall: float = 0.0,
) -> InFlight:
    """The counts of :class:`InFlight` in ``scope``, in one pass over the in-flight states' index
    entries, and whether a ``retry_wait`` job is due at ``now`` (one look at the index on
    (``state``, ``next_attempt_at``)). ``followed``: :func:`followed_now`, read here when None.
    Whether any ``pending`` job of ``pending_of`` (None: of any batch) exists: the first entry of
    an index on (``batch_id``, ``state``) or on (``state``) says, in the same statement.

    A dispatch round runs on every completion; the three counts it used to ask one by one,
    and a claim query for retries when there were none, were a third of its statements.

    ``rate_of``: an API key id whose shared submit bucket and pacing the same statement reads
    (:attr:`InFlight.rate`, for :func:`jobs.store.take_submit_tokens`, which read them in a
    statement of its own a little later in the round, under the same lock; ``wall``: this
    process's epoch seconds, for SQLite). Read by rounds that then take no token too: four looks
    by primary key cost less than a statement.
    """

    if followed is None:
        followed = followed_now(session, scope, now)

    def build() -> Any:
        requests = _requests_in(scope, followed=followed)
        unsent = [Job.state == JobState.PENDING]
        if pending_of is not None:
            unsent.append(Job.batch_id.in_(bindparam("pending_of", expanding=True)))
        any_pending = select(literal(1)).select_from(Job).where(*unsent).correlate(None).exists()
        return select(
            func.count().filter(Job.state.in_(bindparam("at_fal", expanding=True)), *requests),
            func.count().filter(Job.state == JobState.DOWNLOADING, _downloads_in(scope)),
            func.count().filter(
                Job.state == JobState.QUEUED,
                Job.submitted_at.is_not(None),
                Job.submitted_at <= bindparam("before"),
                *_requests_in(scope, own_queue=True),
            ),
            or_(*(_any_due_retry(due) for due in _DUE)),
            any_pending,
            *(rate_columns(dialect) if dialect is not None else ()),
        ).where(Job.state.in_(bindparam("states", expanding=True)))

    at_fal = sorted(AT_PROVIDER_STATES, key=lambda state: state.value)
    params = {
        "at_fal": at_fal,
        "states": [*at_fal, JobState.DOWNLOADING],
        "before": sent_before,
        "now": now,
        **_scope_params(scope, now, followed),
    }
    if pending_of is not None:
        params["pending_of"] = sorted(pending_of)
    dialect = session_connection(session).dialect.name if rate_of is not None else None
    if rate_of is not None:
        params.update(key=rate_of, wall=wall)
    shape = ("in_flight", pending_of is None, dialect, *_scope_shape(scope, followed))
    row: Any = _run(session, _prepared(shape, build), params).one()
    rate = RateRead(*row[5:]) if rate_of is not None else None
    return InFlight(int(row[0]), int(row[1]), int(row[2]), bool(row[3]), bool(row[4]), rate)


@dataclass(frozen=True, slots=True)
class CapHolder:
    """One batch's jobs that count against a dispatcher's caps (:func:`cap_holders`)."""

    batch_id: str
    name: str
    endpoint: str
    #: Its requests at fal (or being sent) within the scope: the outstanding caps'.
    requests: int
    #: Its jobs waiting for their download within the scope: the download backlog's.
    downloads: int


def cap_holders(session: Session, scope: CapScope) -> list[CapHolder]:
    """Who holds the caps of ``scope``, per batch and endpoint, in one pass over the in-flight
    jobs (the same counts as :func:`in_flight`): what ``run`` and ``status`` name when a cap
    holds submits back."""
    now = utcnow()
    followed = followed_now(session, scope, now)
    at_fal = sorted(AT_PROVIDER_STATES, key=lambda state: state.value)
    requests = func.count().filter(Job.state.in_(at_fal), *_requests_in(scope, followed=followed))
    downloads = func.count().filter(Job.state == JobState.DOWNLOADING, _downloads_in(scope))
    query = (
        select(Job.batch_id, Batch.name, Job.endpoint, requests, downloads)
        .join(Batch, Batch.id == Job.batch_id)
        .where(Job.state.in_([*at_fal, JobState.DOWNLOADING]))
        .group_by(Job.batch_id, Batch.name, Job.endpoint)
        .order_by(Job.batch_id, Job.endpoint)
    )
    rows = session.execute(query, _scope_params(scope, now, followed))
    return [
        CapHolder(str(batch_id), str(name), str(endpoint), int(n_requests), int(n_downloads))
        for batch_id, name, endpoint, n_requests, n_downloads in rows
        if n_requests or n_downloads
    ]


@dataclass(frozen=True, slots=True)
class CapCounts:
    """One batch's in-flight jobs per endpoint as every :class:`CapScope` of one key may count
    them (:func:`cap_counts`); :func:`holders_in` picks a scope's."""

    batch_id: str
    name: str
    endpoint: str
    #: Requests at fal (or being sent): sent with the key (or none recorded), of any key, and of
    #: any key in a batch that is not a simulation; the first and the last of the fal queue
    #: :func:`cap_counts` was given, or of another one that counts now (:attr:`CapScope.origin`).
    requests_with_key: int
    requests: int
    requests_paid: int
    #: Jobs waiting for their download: all, and those of batches that are not simulations.
    downloads: int
    downloads_paid: int


def cap_counts(session: Session, api_key_id: str | None, origin: str | None = None) -> list[CapCounts]:
    """The in-flight jobs of every batch per endpoint, counted for every scope of
    ``api_key_id`` and the fal queue at ``origin`` at once (one pass, as :func:`cap_holders`):
    what ``status`` with no batch reads once, and :func:`holders_in` answers each batch's scope
    from. ``origin`` (:attr:`CapScope.origin`) applies to the counts of a key's or every key's
    requests, not to a simulation's (its scope has no origin); None: every queue's."""
    now = utcnow()
    counting = CapScope(api_key_id=api_key_id, origin=origin)  # ``status``: it beats for nothing
    followed = followed_now(session, counting, now)
    at_fal = sorted(AT_PROVIDER_STATES, key=lambda state: state.value)
    on_fal = Job.state.in_(at_fal)
    on_fal_here: ColumnElement[bool] = on_fal
    if origin is not None and not followed.every:  # as :func:`_requests_in` counts them
        on_fal_here = on_fal & _at_fal_for(sent_to_origin(bindparam("origin")), False, followed)
    downloading = Job.state == JobState.DOWNLOADING
    query = (
        select(
            Job.batch_id,
            Batch.name,
            Job.endpoint,
            func.count().filter(on_fal_here, _sent_with(bindparam("api_key_id"))),
            func.count().filter(on_fal),
            func.count().filter(on_fal_here, _paid(Job.batch_id)),
            func.count().filter(downloading),
            func.count().filter(downloading, _paid(Job.batch_id)),
        )
        .join(Batch, Batch.id == Job.batch_id)
        .where(Job.state.in_([*at_fal, JobState.DOWNLOADING]))
        .group_by(Job.batch_id, Batch.name, Job.endpoint)
        .order_by(Job.batch_id, Job.endpoint)
    )
    return [
        CapCounts(str(batch_id), str(name), str(endpoint), *(int(n) for n in counts))
        for batch_id, name, endpoint, *counts in session.execute(
            query, _scope_params(counting, now, followed)
        )
    ]


def holders_in(counts: Iterable[CapCounts], scope: CapScope) -> list[CapHolder]:
    """:func:`cap_holders` of ``scope`` from :func:`cap_counts` (read with ``scope``'s key, or
    any key when ``scope`` has none): the same rows, without a query."""
    holders = []
    for c in counts:
        if scope.every_key:
            requests = c.requests_paid
        elif scope.api_key_id is not None:
            requests = c.requests_with_key
        else:
            requests = c.requests
        if scope.requests_of is not None and c.batch_id not in scope.requests_of:
            requests = 0
        if scope.downloads_of is not None:
            downloads = c.downloads if c.batch_id in scope.downloads_of else 0
        else:
            downloads = c.downloads_paid
        if requests or downloads:
            holders.append(CapHolder(c.batch_id, c.name, c.endpoint, requests, downloads))
    return holders


def _sent_filter(sent: bool | None) -> list[Any]:
    """``sent``: only jobs a request of which went to fal (``submitted_at``, as ``status``'s
    failure groups tell them apart), only jobs never sent, or None: all."""
    if sent is None:
        return []
    return [Job.submitted_at.is_not(None) if sent else Job.submitted_at.is_(None)]


def count_cancelled(session: Session, batch_id: str, error_type: str, *, sent: bool | None = None) -> int:
    """How many jobs of a batch's manifest ended cancelled for ``error_type`` (``deadline``,
    ``budget``, …): not those it no longer has (``Job.not_in_manifest``), which ``status``
    counts apart and ``rerun --failed-only`` leaves out. ``sent``: see :func:`_sent_filter`."""
    query = (
        select(func.count())
        .select_from(Job)
        .where(
            Job.batch_id == batch_id,
            Job.state == JobState.CANCELLED,
            Job.error_type == error_type,
            Job.not_in_manifest.is_(False),
            *_sent_filter(sent),
        )
    )
    return int(session.scalar(query) or 0)


def count_cancelled_of_batches(
    session: Session, batch_ids: Collection[str], error_type: str, *, sent: bool | None = None
) -> dict[str, int]:
    """:func:`count_cancelled` of each of ``batch_ids`` in one query (batches with none left out)."""
    if not batch_ids:
        return {}
    query = (
        select(Job.batch_id, func.count())
        .where(
            Job.batch_id.in_(sorted(batch_ids)),
            Job.state == JobState.CANCELLED,
            Job.error_type == error_type,
            Job.not_in_manifest.is_(False),
            *_sent_filter(sent),
        )
        .group_by(Job.batch_id)
    )
    return {str(batch_id): int(n) for batch_id, n in session.execute(query)}


def submitted_at_in_state(
    session: Session, batch_ids: Collection[str], state: JobState
) -> list[tuple[str, datetime | None]]:
    """``(batch id, submitted_at)`` of every job in ``state`` of ``batch_ids``, in one query."""
    if not batch_ids:
        return []
    query = select(Job.batch_id, Job.submitted_at).where(
        Job.batch_id.in_(sorted(batch_ids)), Job.state == state
    )
    return [(str(batch_id), at) for batch_id, at in session.execute(query)]


def first_submitted_at(session: Session, batch_id: str) -> datetime | None:
    """When the batch's first request was sent (the start of its throughput), or None."""
    return session.scalar(select(func.min(Job.submitted_at)).where(Job.batch_id == batch_id))


def count_waiting_since(
    session: Session, state: JobState, *, submitted_before: datetime, api_key_id: str | None = None
) -> int:
    """How many jobs have been in ``state`` since they were submitted before ``submitted_before``
    (e.g. requests still IN_QUEUE at fal long after we sent them), optionally for one API key."""

    def build() -> Any:
        query = (
            select(func.count())
            .select_from(Job)
            .where(
                Job.state == bindparam("state"),
                Job.submitted_at.is_not(None),
                Job.submitted_at <= bindparam("before"),
            )
        )
        if api_key_id is not None:
            query = query.where(_sent_with(bindparam("api_key_id")))
        return query

    query = _prepared(("count_waiting_since", api_key_id is not None), build)
    params = {"state": state, "before": submitted_before, "api_key_id": api_key_id}
    return int(_run(session, query, params).scalar() or 0)


def count_in_states_by_endpoint(
    session: Session, states: Iterable[JobState], *, scope: CapScope, followed: Followed | None = None
) -> dict[str, int]:
    """How many jobs of ``scope``'s requests are in ``states`` per endpoint (per-endpoint
    outstanding caps); ``followed``: :func:`followed_now`, read here when None."""
    now = utcnow()
    if followed is None:
        followed = followed_now(session, scope, now)
    requests = _requests_in(scope, followed=followed)
    query = select(Job.endpoint, func.count()).where(Job.state.in_(list(states)), *requests)
    rows = session.execute(query.group_by(Job.endpoint), _scope_params(scope, now, followed))
    return {str(endpoint): int(n) for endpoint, n in rows}


def batch_endpoints(session: Session, batch_id: str, states: Iterable[JobState]) -> set[str]:
    """The endpoints of the batch's jobs in ``states`` (whose per-endpoint caps may hold them)."""
    query = select(Job.endpoint).where(Job.batch_id == batch_id, Job.state.in_(list(states))).distinct()
    return {str(endpoint) for endpoint in session.scalars(query)}


def batches_endpoints(
    session: Session, batch_ids: Collection[str], states: Iterable[JobState]
) -> dict[str, set[str]]:
    """:func:`batch_endpoints` of each of ``batch_ids``, in one query (batches with none left out)."""
    if not batch_ids:
        return {}
    query = (
        select(Job.batch_id, Job.endpoint)
        .where(Job.batch_id.in_(sorted(batch_ids)), Job.state.in_(list(states)))
        .distinct()
    )
    found: dict[str, set[str]] = {}
    for batch_id, endpoint in session.execute(query):
        found.setdefault(str(batch_id), set()).add(str(endpoint))
    return found


def count_requests(session: Session, states: Iterable[JobState], *, scope: CapScope) -> int:
    """How many of ``scope``'s requests are in ``states``."""
    now = utcnow()
    followed = followed_now(session, scope, now)
    requests = _requests_in(scope, followed=followed)
    query = select(func.count()).select_from(Job).where(Job.state.in_(list(states)), *requests)
    return int(session.execute(query, _scope_params(scope, now, followed)).scalar() or 0)


#: ``WANBATCH_QUEUE_WAIT_BACKOFF`` beyond this (ten years) means "never": no date is that far back.
LONGEST_WAIT_SECONDS = 10 * 365 * 86400.0
#: Once fal is seen queueing our requests, how many to keep waiting there, as a share of those it
#: runs (:attr:`QueueWaits.depth`).
QUEUE_DEPTH_SHARE = 0.25
#: The states in which a request waits to be run at fal (or to be known there): the queue-wait
#: back-off keeps few of them (:class:`QueueWaits`).
WAITING_AT_FAL = (JobState.SUBMITTING, JobState.SUBMIT_UNKNOWN, JobState.QUEUED)


@dataclass(frozen=True, slots=True)
class QueueWaits:
    """The queue-wait back-off's counts (:func:`queue_waits`), of the requests of a scope's own
    fal queue only (:attr:`CapScope.origin`): what dispatch decides by, and ``run``, ``status``
    and the dashboard name when it holds submits back. Requests at another queue say nothing of
    how long one sent to this queue waits, and nothing moves those that no one follows."""

    #: Requests still ``queued`` that were sent before the back-off's threshold.
    waiting_long: int
    #: Requests that fal runs.
    running: int
    #: ``(batch id, name, requests)`` waiting at fal (:data:`WAITING_AT_FAL`), the most first.
    waiting_by_batch: tuple[tuple[str, str, int], ...] = ()

    @property
    def waiting(self) -> int:
        return sum(n for _id, _name, n in self.waiting_by_batch)

    @property
    def depth(self) -> int:
        """How many to keep waiting at fal: a quarter of those it runs, at least one."""
        return max(1, math.ceil(self.running * QUEUE_DEPTH_SHARE))

    def room(self, free: int) -> int:
        """Of ``free`` submits, how many the back-off lets go: all while nothing waited long."""
        if self.waiting_long == 0:
            return free
        return min(free, max(0, self.depth - self.waiting))

    @property
    def holds(self) -> bool:
        """Whether the back-off lets nothing go now."""
        return self.room(1) == 0


def queue_waits(session: Session, scope: CapScope, *, sent_before: datetime) -> QueueWaits:
    """:class:`QueueWaits` of ``scope``'s own fal queue (requests ``queued`` since before
    ``sent_before`` count as waiting long), in one grouped pass over those requests."""
    own = _requests_in(scope, own_queue=True)
    long = (Job.state == JobState.QUEUED) & Job.submitted_at.is_not(None) & (Job.submitted_at <= sent_before)
    query = (
        select(
            Job.batch_id,
            Batch.name,
            func.count().filter(Job.state.in_(WAITING_AT_FAL)),
            func.count().filter(Job.state == JobState.RUNNING),
            func.count().filter(long),
        )
        .join(Batch, Batch.id == Job.batch_id)
        .where(Job.state.in_([*WAITING_AT_FAL, JobState.RUNNING]), *own)
        .group_by(Job.batch_id, Batch.name)
    )
    waiting: list[tuple[str, str, int]] = []
    running = waiting_long = 0
    for batch_id, name, n_waiting, n_running, n_long in session.execute(query, _scope_params(scope)):
        running += int(n_running)
        waiting_long += int(n_long)
        if n_waiting:
            waiting.append((str(batch_id), str(name), int(n_waiting)))
    waiting.sort(key=lambda row: (-row[2], row[1], row[0]))
    return QueueWaits(waiting_long, running, tuple(waiting))
