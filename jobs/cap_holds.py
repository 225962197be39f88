"""Which caps hold a batch's submits back now, whose jobs fill them, and how that is said.

A batch whose unsent jobs stay ``pending`` is waiting for something the user cannot see: the
outstanding cap (the account's, or an endpoint's), the download backlog, the queue-wait
back-off, or, for a ``priority: low`` batch under the workers, the normal-priority batches sent
first. ``status`` (its ``phase_reason``), the dashboard's batch page and ``run``'s progress line
(:mod:`worker.running`) name that cap, the batches whose jobs fill it and what frees it.

The explanation must name the cap that really holds, so it counts as the sender does:
:class:`CapCheck` is a process's caps as its settings give them, :meth:`CapCheck.scope` what an
embedded ``run`` or the workers' leader counts, and the counts are the dispatcher's own
(:func:`jobs.store.cap_holders`, :func:`jobs.store.queue_waits`). The decisions themselves are
:mod:`worker.steps.dispatch`'s; this module only explains them. It imports nothing of
:mod:`jobs.batches`, which builds ``status`` on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from jobs import store
from jobs.models import Batch, utcnow
from jobs.printable import shell_ref
from jobs.settings import Settings
from jobs.states import JobState


@dataclass(frozen=True, slots=True)
class CapHold:
    """A cap that holds a batch's submits back now, and whose jobs fill it (:func:`cap_holds`)."""

    #: ``downloads`` (the download backlog), ``outstanding`` (fal's account, or ``endpoint``'s),
    #: ``queue`` (the queue-wait back-off: requests wait long in fal's queue, and it keeps
    #: ``limit`` waiting there; ``holders``: whose requests wait there) or ``priority`` (a
    #: ``priority: low`` batch the workers send only once the normal-priority batches in
    #: ``holders``, which have jobs to send, have sent them; their counts are 0: not counted).
    kind: str
    #: The setting that sets the cap, named so that the user knows what to raise.
    setting: str
    limit: int
    #: ``(batch id, name, jobs)`` of each batch whose jobs count against it, the most first.
    holders: tuple[tuple[str, str, int], ...]
    endpoint: str | None = None
    #: ``queue``: the requests ``queued`` at fal longer than the back-off's ``seconds``, and
    #: those fal runs (the kept depth is a quarter of them, at least one).
    waited_long: int = 0
    running: int = 0
    seconds: float = 0.0
    #: Counted as the distributed workers' leader counts (``WANBATCH_BROKER_URL``), which shares
    #: the cap between every batch with jobs to send; else as an embedded ``run``, which sends its
    #: own batch only.
    distributed: bool = False
    #: The other live processes dispatching for the same account whose value of :attr:`setting`
    #: differs (``another run (bob-laptop pid 4242) runs with WANBATCH_MAX_OUTSTANDING=40``):
    #: every one applies the strictest (:mod:`jobs.account_limits`), so raising this process's
    #: own value frees nothing, and the note says so instead of advising it.
    others: tuple[str, ...] = ()
    #: The jobs that count against the cap (summed once: ``status`` with no batch names one
    #: hold, shared by hundreds of batches, for each of them).
    total: int = field(init=False, repr=False, compare=False)
    #: The batches of :attr:`holders`.
    _held: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", sum(n for _id, _name, n in self.holders))
        object.__setattr__(self, "_held", frozenset(held_id for held_id, _name, _n in self.holders))

    def holds(self, batch_id: str) -> bool:
        """Whether ``batch_id``'s jobs count against the cap."""
        return batch_id in self._held

    def others_than(self, batch_id: str) -> int:
        """How many other batches' jobs count against it."""
        return len(self.holders) - self.holds(batch_id)


@dataclass(frozen=True, slots=True)
class CapCheck:
    """How a process with these settings counts the caps: its key (a hash of ``FAL_KEY``), its
    caps, and whether the distributed workers process the batches (``WANBATCH_BROKER_URL``)."""

    api_key_id: str
    max_outstanding: int
    download_backlog: int
    per_endpoint: dict[str, int]
    distributed: bool
    #: The origin of the fal queue it sends to (:attr:`jobs.store.CapScope.origin`); None: it
    #: counts every queue's requests, as before the origin was recorded.
    origin: str | None = None
    #: ``WANBATCH_QUEUE_WAIT_BACKOFF`` (0: off).
    queue_wait_backoff: float = 0.0
    #: The counting process's heartbeat owner (:attr:`jobs.store.CapScope.me`); "" for ``status``.
    me: str = ""
    #: By variable, the other live processes whose account-wide limit differs from this one's
    #: (:attr:`worker.steps.context.Runtime.peer_limits`); the caps above are then the strictest.
    differing: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def others(self, setting: str) -> tuple[str, ...]:
        """The parts of :attr:`differing` for ``setting`` (none: every live process agrees)."""
        return next((parts for name, parts in self.differing if name == setting), ())

    @classmethod
    def of(
        cls,
        settings: Settings,
        api_key_id: str,
        origin: str | None = None,
        me: str = "",
        differing: dict[str, tuple[str, ...]] | None = None,
    ) -> CapCheck:
        """The caps ``run`` (or the workers, with a broker) would apply with ``settings``, sending
        to the fal queue at ``origin`` (``worker.here.queue_origin`` of its queue URL);
        ``differing``: the other live processes whose limits differ (:attr:`differing`)."""
        return cls(
            api_key_id=api_key_id,
            max_outstanding=settings.max_outstanding,
            download_backlog=settings.download_backlog,
            per_endpoint={
                endpoint: int(cap) for endpoint, cap in settings.max_outstanding_per_endpoint.items()
            },
            distributed=bool(settings.broker_url),
            origin=origin,
            queue_wait_backoff=settings.queue_wait_backoff,
            me=me,
            differing=tuple(sorted((differing or {}).items())),
        )

    def waited_long_before(self, now: datetime) -> datetime:
        """A request sent before this and still ``queued`` has waited long (the back-off's
        threshold; beyond ten years, "never", as dispatch reads it)."""
        return now - timedelta(seconds=min(self.queue_wait_backoff, store.LONGEST_WAIT_SECONDS))

    def scope(self, batch: Batch) -> store.CapScope:
        """What the caps count for a process sending ``batch``: an embedded ``run`` (its own
        batch, its own key's requests), the workers (every batch; their leader's dispatch counts
        every key's requests: :attr:`jobs.store.CapScope.every_key`) or a ``--simulate`` run
        (its own simulator)."""
        if self.distributed and not batch.simulated:
            return self.workers_scope()
        return store.CapScope.of(
            api_key_id=self.api_key_id,
            batch_ids={batch.id},
            simulated=batch.simulated,
            origin=self.origin,
            me=self.me,
        )

    def workers_scope(self) -> store.CapScope:
        """What the distributed workers' leader counts (``Runtime.cap_scope`` without a batch
        scope): every batch's downloads, and the requests at fal of every key, since a worker
        with another ``FAL_KEY`` sends with its own. An explanation counting only this key's
        said "3 of 10" while dispatch saw 10 of 10 and sent nothing."""
        return store.CapScope.of(
            api_key_id=self.api_key_id,
            batch_ids=None,
            simulated=False,
            every_key=True,
            origin=self.origin,
            me=self.me,
        )


def cap_holds(session: Session, batch_id: str, scope: store.CapScope, check: CapCheck) -> list[CapHold]:
    """The caps that hold ``batch_id``'s submits back, as a dispatcher counting ``scope`` with
    ``check``'s caps finds them (dispatch's own counts: :func:`jobs.store.cap_holders`).

    The download backlog whenever it is full. An outstanding cap (the account's, or that of an
    endpoint the batch has jobs waiting for) when it is full and not only of the batch's own
    requests: full of its own, the cap is simply at work for it, and its counts say so. The
    queue-wait back-off whenever it lets nothing go (:func:`queue_hold`).
    """
    return _cap_holds(
        Held.of(store.cap_holders(session, scope)),
        batch_id,
        check,
        waiting=lambda: store.batch_endpoints(session, batch_id, [JobState.PENDING]),
        queue=lambda: queue_waits(session, scope, check, now=utcnow()),
        ahead=lambda: normal_batches_ahead(session, batch_id, now=utcnow()),
    )


def normal_batches_ahead(
    session: Session, batch_id: str, *, now: datetime
) -> tuple[tuple[str, str, int], ...]:
    """When ``batch_id`` is ``priority: low``, the normal-priority batches the workers' leader
    sends before it: active ones with a job to send, not paused by their user, their schedule
    open, not simulations (``(id, name, 0)``, oldest first; not counted). Empty for a batch of
    normal priority."""
    due = store.batches_with_jobs_to_send(session)
    if not any(b.id == batch_id and b.low for b in due):
        return ()
    normal = {b.id: b for b in due if not b.low}
    ahead = [
        batch
        for batch in store.batch_records(session, normal)
        if not batch.paused_by_user
        and not batch.simulated
        and (batch.schedule is None or store.batch_schedule(batch).is_open(now))
    ]
    ahead.sort(key=lambda batch: (normal[batch.id].created_at, batch.id))
    return tuple((batch.id, batch.name, 0) for batch in ahead)


def queue_waits(
    session: Session, scope: store.CapScope, check: CapCheck, *, now: datetime
) -> store.QueueWaits | None:
    """The queue-wait back-off's counts as dispatch reads them with ``check``'s settings at
    ``now`` (:func:`jobs.store.queue_waits`); None while the back-off is off."""
    if check.queue_wait_backoff <= 0:
        return None
    return store.queue_waits(session, scope, sent_before=check.waited_long_before(now))


def queue_hold(waits: store.QueueWaits | None, check: CapCheck) -> CapHold | None:
    """The queue-wait back-off as a :class:`CapHold` when it lets nothing go: requests of the
    process's fal queue wait there over ``WANBATCH_QUEUE_WAIT_BACKOFF`` and as many wait as it
    keeps there (a quarter of those fal runs, at least one). Named whoever's requests wait:
    nothing else shows why a batch's unsent jobs stay ``pending`` with the cap far from full."""
    if waits is None or not waits.holds:
        return None
    return CapHold(
        "queue",
        "WANBATCH_QUEUE_WAIT_BACKOFF",
        waits.depth,
        waits.waiting_by_batch,
        waited_long=waits.waiting_long,
        running=waits.running,
        seconds=check.queue_wait_backoff,
    )


class Sums:
    """``(batch id, name, endpoint, jobs)`` rows of one count (requests at fal, or downloads),
    summed per batch for each cap (:func:`_per_batch`) once, each cap's :class:`CapHold` made
    once: ``status`` with no batch asks the same caps for every active batch, and summing every
    holder again for each of them made it quadratic (seconds at 500 active batches)."""

    __slots__ = ("_holds", "rows")

    def __init__(self, rows: Sequence[tuple[str, str, str, int]]) -> None:
        self.rows = rows
        self._holds: dict[tuple[object, ...], CapHold] = {}

    def hold(self, kind: str, setting: str, limit: int, endpoint: str | None, check: CapCheck) -> CapHold:
        """The :class:`CapHold` of the cap ``setting`` (of ``endpoint``, or every endpoint: None)
        counting these rows, as ``check`` counts it."""
        key = (kind, setting, limit, endpoint, check.distributed, check.others(setting))
        found = self._holds.get(key)
        if found is None:
            rows = ((held_id, name, n) for held_id, name, at, n in self.rows if endpoint in (None, at))
            distributed = check.distributed if kind == "outstanding" else False
            others = check.others(setting) if kind == "outstanding" else ()
            holders = _per_batch(rows)
            found = CapHold(kind, setting, limit, holders, endpoint, distributed=distributed, others=others)
            self._holds[key] = found
        return found


@dataclass(frozen=True, slots=True)
class Held:
    """The jobs that count against a scope's caps (:func:`jobs.store.cap_holders`' rows), split
    into its requests at fal (the outstanding caps') and its downloads (the backlog's): what
    :func:`_cap_holds` decides from. ``status`` with no batch shares the requests between the
    batches whose scopes count the same ones (:class:`HeldByScope`)."""

    requests: Sums
    downloads: Sums

    @classmethod
    def of(cls, holders: Iterable[store.CapHolder]) -> Held:
        rows = list(holders)
        return cls(
            Sums([(h.batch_id, h.name, h.endpoint, h.requests) for h in rows if h.requests]),
            Sums([(h.batch_id, h.name, h.endpoint, h.downloads) for h in rows if h.downloads]),
        )


class HeldByScope:
    """:class:`Held` of any scope from :func:`jobs.store.cap_counts` (every batch's in-flight
    jobs, read once by ``status`` with no batch), as :func:`jobs.store.holders_in` picks a
    scope's rows: the counts of a scope whose requests are every batch's (an embedded run's, the
    workers') are summed once for all of them, and only the batch's own rows are read for the
    rest (its downloads, a simulation's requests). Linear in the batches, not quadratic."""

    def __init__(self, counts: Iterable[store.CapCounts]) -> None:
        self.counts = list(counts)
        self.by_batch: dict[str, list[store.CapCounts]] = {}
        for c in self.counts:
            self.by_batch.setdefault(c.batch_id, []).append(c)
        self._shared: dict[tuple[object, ...], Sums] = {}

    def held(self, scope: store.CapScope) -> Held:
        """``scope``'s :class:`Held`: the same rows as ``Held.of(holders_in(counts, scope))``."""
        return Held(self._requests(scope), self._downloads(scope))

    def _of(self, batch_ids: frozenset[str] | None) -> Iterable[store.CapCounts]:
        if batch_ids is None:
            return self.counts
        return [c for batch_id in sorted(batch_ids) for c in self.by_batch.get(batch_id, ())]

    def _requests(self, scope: store.CapScope) -> Sums:
        mode = "paid" if scope.every_key else "key" if scope.api_key_id is not None else "any"

        def count(c: store.CapCounts) -> int:
            return c.requests_paid if mode == "paid" else c.requests_with_key if mode == "key" else c.requests

        return self._sums(("requests", mode), scope.requests_of, count)

    def _downloads(self, scope: store.CapScope) -> Sums:
        if scope.downloads_of is None:
            return self._sums(("downloads", "paid"), None, lambda c: c.downloads_paid)
        return self._sums(("downloads", "all"), scope.downloads_of, lambda c: c.downloads)

    def _sums(
        self, key: tuple[str, str], batch_ids: frozenset[str] | None, count: Callable[[store.CapCounts], int]
    ) -> Sums:
        """The rows of ``batch_ids`` (None: every batch's, summed once per ``key``)."""
        if batch_ids is None and key in self._shared:
            return self._shared[key]
        found = Sums([(c.batch_id, c.name, c.endpoint, n) for c in self._of(batch_ids) if (n := count(c))])
        if batch_ids is None:
            self._shared[key] = found
        return found


def _cap_holds(
    held: Held,
    batch_id: str,
    check: CapCheck,
    *,
    waiting: Callable[[], set[str]],
    queue: Callable[[], store.QueueWaits | None] = lambda: None,
    ahead: Callable[[], tuple[tuple[str, str, int], ...]] = lambda: (),
) -> list[CapHold]:
    """:func:`cap_holds` from the scope's ``held`` jobs; ``waiting``: the endpoints of the batch's
    pending jobs (asked only when there are per-endpoint caps); ``queue``: the queue-wait
    back-off's counts (asked only when no outstanding cap holds: that one goes first);
    ``ahead``: the normal-priority batches sent before the batch (:func:`normal_batches_ahead`,
    asked only as the workers count): while there are any, that is what holds it back, whatever
    the outstanding caps. Each cap's hold is summed once per :class:`Sums` (shared between
    batches by ``status`` with no batch), and nothing here reads every holder again."""
    holds: list[CapHold] = []
    backlog = check.download_backlog
    downloads = held.downloads.hold("downloads", "WANBATCH_MAX_DOWNLOAD_BACKLOG", backlog, None, check)
    if downloads.total >= downloads.limit:
        holds.append(downloads)
    if check.distributed and (normal := ahead()):
        return [*holds, CapHold("priority", "priority", 0, normal, distributed=True)]
    caps: list[tuple[str, int, str | None]] = [("WANBATCH_MAX_OUTSTANDING", check.max_outstanding, None)]
    if check.per_endpoint:
        caps += [
            ("WANBATCH_MAX_OUTSTANDING_PER_ENDPOINT", check.per_endpoint[e], e)
            for e in sorted(waiting() & check.per_endpoint.keys())
        ]
    for setting, limit, endpoint in caps:
        requests = held.requests.hold("outstanding", setting, limit, endpoint, check)
        if requests.total >= limit and requests.others_than(batch_id):
            holds.append(requests)
    account = next((h for h in holds if h.kind == "outstanding" and h.endpoint is None), None)
    if account is None and (hold := queue_hold(queue(), check)) is not None:
        holds.append(hold)
    return holds


def _per_batch(rows: Iterable[tuple[str, str, int]]) -> tuple[tuple[str, str, int], ...]:
    """``(batch id, name, jobs)`` summed per batch (rows come per batch and endpoint), the most first."""
    per: dict[tuple[str, str], int] = {}
    for held_id, name, n in rows:
        if n:
            per[(held_id, name)] = per.get((held_id, name), 0) + n
    ordered = sorted(per.items(), key=lambda item: (-item[1], item[0][1], item[0][0]))
    return tuple((held_id, name, n) for (held_id, name), n in ordered)


#: The holders a note names; the rest are counted ("and 3 more batches").
NAMED_HOLDERS = 3


def cap_note(holds: Sequence[CapHold], batch_id: str, *, short: bool = False) -> str:
    """What ``status`` says (and ``run``, once, when it begins) of the caps that hold
    ``batch_id`` back: which cap, how many jobs of which batches fill it, and what frees it.
    ``short``: the progress line's few words ("held: outstanding cap full (3 of c)")."""
    if short:
        return "; ".join(_short_text(h, batch_id) for h in holds)
    return "; ".join(_hold_text(h, batch_id) for h in holds)


def _short_text(hold: CapHold, batch_id: str) -> str:
    """``held: outstanding cap full (3 of c)``; ``held: queue-wait backoff (2 waiting at fal
    over 60s: 2 of c; keeps 1)``."""
    if hold.kind == "queue":
        return (
            f"held: {_cap_name(hold)} ({hold.waited_long} waiting at fal over {hold.seconds:.0f}s: "
            f"{_who(hold, batch_id, short=True)}; keeps {hold.limit})"
        )
    if hold.kind == "priority":
        return f"held: low priority (behind {_names(hold, batch_id, short=True)})"
    return f"held: {_cap_name(hold)} full ({_who(hold, batch_id, short=True)})"


def _cap_name(hold: CapHold) -> str:
    if hold.kind == "downloads":
        return "download backlog"
    if hold.kind == "queue":
        return "queue-wait backoff"
    return f"outstanding cap of {hold.endpoint}" if hold.endpoint else "outstanding cap"


def _who(hold: CapHold, batch_id: str, *, short: bool = False) -> str:
    """``7 of batch c, 3 of this batch`` (``7 of c, 3 of this batch`` when ``short``)."""
    parts = []
    named = 0
    for held_id, name, n in hold.holders[:NAMED_HOLDERS]:
        named += n
        if held_id == batch_id:
            parts.append(f"{n} of this batch")
        else:
            ref = shell_ref(name, held_id)
            parts.append(f"{n} of {ref}" if short else f"{n} of batch {ref}")
    rest = len(hold.holders) - NAMED_HOLDERS
    if rest > 0:  # the rest's jobs from the total: not summed again for each batch shown
        parts.append(f"{hold.total - named} of {rest} more batch(es)")
    return ", ".join(parts)


def _names(hold: CapHold, batch_id: str, *, short: bool = False) -> str:
    """The batches of ``hold`` other than ``batch_id``, by name: ``batch c, batch d`` (``c, d``
    when ``short``), the first :data:`NAMED_HOLDERS` of them and how many more."""
    # The first few others are among the first few holders (the batch itself is one at most):
    # only those are read, and the others counted without a pass over every holder.
    head = hold.holders[: NAMED_HOLDERS + 1]
    others = [(held_id, name) for held_id, name, _n in head if held_id != batch_id][:NAMED_HOLDERS]
    parts = [shell_ref(name, ref) if short else f"batch {shell_ref(name, ref)}" for ref, name in others]
    more = hold.others_than(batch_id) - NAMED_HOLDERS
    if more > 0:
        parts.append(f"{more} more batch(es)")
    return ", ".join(parts)


def _hold_text(hold: CapHold, batch_id: str) -> str:
    if hold.kind == "queue":
        return (
            f"submits held back: {hold.waited_long} request(s) have waited in fal's queue over "
            f"{hold.seconds:.0f}s ({hold.setting}), so the account runs fewer at once than the cap: "
            f"only {hold.limit} is kept waiting there (a quarter of the {hold.running} fal runs, at "
            f"least one) and {hold.total} wait ({_who(hold, batch_id)}); sending resumes as fal "
            f"starts them, or set {hold.setting}=0 to keep the full cap at fal"
        )
    full = f"{hold.total} of {hold.limit}, {hold.setting}"
    if hold.kind == "downloads":
        return (
            f"submits held back: the download backlog is full ({full}): jobs wait for their download "
            f"({_who(hold, batch_id)}); sending resumes as they are stored (a full disk or a slow "
            f"link stalls them), or raise {hold.setting}"
        )
    if hold.kind == "priority":
        return (
            f"submits held back: this batch is `priority: low`, and the workers send a low-priority "
            f"batch's jobs only while no normal-priority batch has jobs to send ({_names(hold, batch_id)} "
            "has); it is sent once they are sent, or give it `priority: normal` and submit it again"
        )
    if hold.distributed:  # the workers' leader shares each slot out (jobs.store.due._share)
        shared = (
            f"the cap is shared with {_names(hold, batch_id)}, and each slot fal frees goes to the "
            "batch with jobs to send that holds the fewest (normal priority before `priority: low`)"
        )
    else:  # every `run` sends its own batch, into the slots it finds free
        shared = (
            f"the cap is shared with {_names(hold, batch_id)}, and each `run` sends its own batch's "
            "jobs into the slots it finds free"
        )
    if hold.others:  # raising this process's own value would change nothing: the strictest holds
        advice = (
            f"every live process sending with this fal key applies the strictest {hold.setting} "
            f"of theirs, {hold.limit} here, and {'; '.join(hold.others)}: give them all the same "
            "value, your fal account's limit"
        )
    else:
        advice = f"or raise {hold.setting} if your fal account runs more at once"
    return (
        f"submits held back: the {_cap_name(hold)} is full ({full}): requests at fal "
        f"({_who(hold, batch_id)}); sending resumes as fal finishes them: {shared}; {advice}"
    )
