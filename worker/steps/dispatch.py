"""Dispatch: claim due jobs within the outstanding caps, the submit rate and the budgets,
mark them ``submitting`` and hand them to the submit task. Run by the tick leader only."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cache, partial
from typing import Any, cast

from sqlalchemy.orm import Session

from jobs import db, moved_outputs, output_store, store
from jobs.endpoints import all_endpoints
from jobs.models import BatchRecord, BatchState, Job, JobRecord, utcnow
from jobs.money import BATCH_CAP_ERROR, DAILY_CAP_ERROR, DaySpender, others_today, usd_apart, usd_text
from jobs.output_store import OutputReadError
from jobs.outputs import OutputWriteError
from jobs.pricing import priced_otherwise
from jobs.rendered import rerun_input
from jobs.states import JobState
from worker import logs
from worker.limits import UNREACHABLE_RETRY_SECONDS, LimiterUnavailableError, api_key_id
from worker.steps.adopt import ADOPTED, adopt, look_up
from worker.steps.context import DOWNLOAD_QUEUE, Runtime, S, SubmitTicket
from worker.steps.failures import backoff
from worker.steps.staged import find_staged
from worker.steps.verified_outputs import VERIFIED, Candidate, storage_of

log = logging.getLogger(__name__)

#: How long a dispatch round reuses the previous round's read of which batches other live
#: processes follow (:func:`_followed`): heartbeats come every 10 s and count for 60 s.
FOLLOWED_REFRESH_SECONDS = 1.0
#: With ``reuse_outputs``, how many succeeded twins' outputs a job checks (oldest first, one HEAD
#: each for S3) before it is sent: the original's may be gone while a rerun's is intact.
REUSE_CHECKS = 5
#: Above this many jobs waiting for another reuse check, the counts start over (memory stays
#: bounded; a count that starts over only means more tries).
REUSE_FAILURES_KEPT = 10_000
#: How many rounds one :func:`dispatch` runs at most while rounds leave jobs whose twin's output
#: is to be read first (:class:`~worker.steps.verified_outputs.VerifiedOutputs`): the read, then
#: the round that decides; a third for a twin that changed in between.
VERIFY_ROUNDS = 3

#: What :func:`_reuse` decided for a claimed job: it took a twin's output, it is to be sent, or it
#: stays where it is (its check failed: tried again later, or its batch was paused). ``TAKEN``
#: (:func:`_take_staged`): it takes the paid video the job it reruns left in the staging folder,
#: and is to be downloaded (stored) instead.
REUSED, SEND, WAIT, TAKEN = "reused", "send", "wait", "taken"


def dispatch(rt: Runtime) -> list[str]:
    """Claim due jobs within the caps and budget, mark them ``submitting``; returns their ids.

    The budget is checked in the same transaction that claims: a job's estimate counts as
    reserved from the moment it is ``submitting``, so the cap holds even with many in flight.
    Only jobs of ``rt.batch_ids`` are claimed, but the outstanding caps count every batch's
    requests at fal for the key: the account's limit is global. The download backlog counts the
    downloads this runtime makes, and a simulation its own batch only
    (:meth:`~worker.steps.context.Runtime.cap_scope`).

    A round that let jobs go until their twin's output is read (``reuse_outputs``:
    :attr:`Dispatched.unverified`) is followed by another at once, up to :data:`VERIFY_ROUNDS`
    in all: the read happens between the two, with no transaction open.
    """
    sent: list[str] = []
    for _ in range(VERIFY_ROUNDS):
        with db.session_scope(rt.engine) as session:
            claimed = dispatch_in(session, rt)
        sent += claimed.hand_on(rt)
        if not claimed.unverified:
            break
    return sent


@dataclass
class Dispatched:
    """What a dispatch round did in its transaction; :meth:`hand_on` once it has committed."""

    sent: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    #: Jobs moved to ``downloading`` to store a staged video they took (:func:`_take_staged`).
    taken: list[str] = field(default_factory=list)
    tickets: list[SubmitTicket] = field(default_factory=list)
    #: Submit-rate tokens taken but not used (claimed fewer jobs than granted).
    unused: int = 0
    #: Jobs a budget cap ended (``cancelled``) in the round: those it claimed, and every other
    #: unsent job of their batches that cannot fit either (:func:`_end_what_cannot_fit`).
    cancelled: int = 0
    #: Jobs let go (pending, due at once) until these twins' outputs are read, per job in the
    #: order it would take them (:func:`_reuse`); :meth:`hand_on` reads them.
    unverified: list[list[Candidate]] = field(default_factory=list)

    def hand_on(self, rt: Runtime) -> list[str]:
        """Give the unused rate back and hand the jobs on; the ids sent. Then read the outputs
        of :attr:`unverified`, outside the round's transaction (it has committed): run another
        round (:func:`dispatch`) for the jobs that wait for them."""
        if self.unused > 0 and rt.bucket is not None:
            rt.bucket.tokens += self.unused
        rt.budget_cancelled += self.cancelled
        if rt.submit_tickets is not None:  # committed: the submits may start from what was read
            for ticket in self.tickets:
                rt.submit_tickets[ticket.fence.job_id] = ticket
        for job_id in self.sent:
            rt.enqueue_submit(job_id)
        for job_id in self.reused:
            rt.notify("done", job_id)
        for job_id in self.taken:
            rt.enqueue_download(job_id)
        if self.unverified:
            VERIFIED.verify(self.unverified)
        return self.sent


def dispatch_in(session: Session, rt: Runtime) -> Dispatched:
    """:func:`dispatch`'s work in the caller's transaction (the conductor applies the statuses
    that freed the slots in the same one); hand on what it returns once that commits."""
    store.lock_dispatch(session)  # one round at a time, whoever dispatches: the caps hold across them
    now = utcnow()
    done = Dispatched()
    key_id = api_key_id(rt.settings)  # the caps are per API key, as fal's account limits are
    assert rt.bucket is not None
    rt.bucket.short = False  # set again below when jobs are left waiting for the rate
    rt.downloads_held = False  # likewise, when the download backlog holds jobs back
    scope = rt.cap_scope()  # what the caps count: never jobs that only another process moves on
    waited = timedelta(seconds=min(rt.settings.queue_wait_backoff, store.LONGEST_WAIT_SECONDS))
    # who follows another fal queue's requests: one small read of the heartbeats per round, bound
    # into the counts (a correlated look-up per in-flight row cost a 20,000-row backlog 50 ms a round)
    followed = _followed(session, rt, scope, now)
    flight = store.in_flight(  # and the shared submit rate's bucket (_shared_rate), in one statement
        session,
        scope=scope,
        sent_before=now - waited,
        now=now,
        followed=followed,
        pending_of=rt.batch_ids,
        rate_of=key_id,
        wall=time.time(),
    )
    rt.nothing_in_flight = flight.outstanding == 0 and flight.downloading == 0
    below_cap = rt.settings.max_outstanding - flight.outstanding
    free = _room_at_fal(session, rt, flight, below_cap, scope, now - waited)
    room = _room_for_downloads(rt, flight.downloading)
    # `run` then says which cap holds jobs back, and whose jobs fill it (jobs.cap_holds.cap_holds):
    # the queue-wait back-off too, when it lets nothing go though the cap has room
    rt.capped = below_cap <= 0 or room <= 0 or free <= 0
    rt.downloads_held = room < free  # until the claim below shows whether any job is left waiting
    free = min(free, room)
    if free <= 0:
        return done
    if not flight.pending and not flight.retry_due:
        # Nothing this round could claim (it claims ``pending`` jobs of its batches, and due
        # ``retry_wait`` ones only when one is due), read in this transaction, which holds the
        # dispatch lock: the rate's buckets, the batches and the claim would only take tokens
        # and give them back (a write of the shared bucket each tick, and four more statements,
        # while every job waits at fal). Nothing waits for the rate or the backlog then.
        rt.downloads_held = False
        return done
    _heed_pause(rt)
    free = _heed_fal_reach(rt, free)
    free = rt.bucket.take(free)
    if free <= 0:
        return done
    free = _shared_rate(session, rt, free, key_id, now, flight.rate)
    if free <= 0:
        return done
    batches = _RoundBatches(session, rt.batch_ids or ())
    closed = batches.closed(now)
    states = [S.PENDING, S.RETRY_WAIT] if flight.retry_due else [S.PENDING]
    jobs = _claim_within_caps(session, rt, free, now, scope, closed, states, followed)
    rt.downloads_held = rt.downloads_held and len(jobs) >= free  # fewer: nothing else waited
    if jobs:
        VERIFIED.next_round()  # outputs read for the previous round only serve this one
    batches.read({job.batch_id for job in jobs})
    jobs = _priced_now(session, rt, jobs, batches)
    if len(jobs) < free:
        # Fewer due than tokens: nothing waits for the rate, whatever the bucket could not grant
        # (it holds a second's worth, often less than the cap has room for). Left "short", the
        # conductor came back every 20 ms to find nothing, all night.
        rt.bucket.short = False
    done.unused = free
    committed = _Committed(session, batches, now, rt.settings.daily_budget_usd)
    paused: set[str] = set()  # batches a failed reuse check paused in this round: send none of them
    refused: set[str] = set()  # batches a budget cap refused a job of in this round
    looked = look_up(rt, jobs, batches.get)  # S3: the jobs' own sidecar objects, read at once
    for job in jobs:
        if job.batch_id in paused:
            continue  # claimed, but left as it was (pending): due again once the batch resumes
        # Its own paid output already stored (the database is behind the outputs): never sent.
        verdict = adopt(session, rt, job, batches.get(job.batch_id), done.unverified, VERIFIED, looked)
        if verdict == ADOPTED:
            done.reused.append(job.id)
            continue
        if verdict == WAIT:
            continue
        verdict = _take_staged(session, rt, job, batches, paused)
        if verdict == TAKEN:
            done.taken.append(job.id)
            continue
        if verdict == SEND:
            verdict = _reuse(session, rt, job, batches, paused, done.unverified)
        if verdict == REUSED:
            done.reused.append(job.id)
            continue
        if verdict == WAIT:
            continue
        refusal = _budget_refusal(committed, job)
        if refusal is not None:
            error, kind = refusal
            if store.mark_cancelled(session, rt.fence(job), reason="budget", error=error, error_type=kind):
                done.cancelled += 1
                # One line per job a cap refused at its claim (the others of its batch that cannot
                # fit are counted in one dispatch.budget_cancelled line): said once committed.
                said = partial(
                    logs.step_done,
                    log,
                    "dispatch",
                    job.id,
                    "cancelled",
                    error=error,
                    error_type=kind,
                    batch_id=job.batch_id,
                )
                db.after_commit(session, said)
            refused.add(job.batch_id)
            continue
        fence, attempt = rt.fence(job), job.attempts + 1
        moved = store.mark_submitting(
            session, fence, attempt=attempt, api_key_id=key_id, lease_expires_at=rt.lease_until(now)
        )
        if moved:
            committed.add(job)
            done.sent.append(job.id)
            done.unused -= 1
            if rt.submit_tickets is not None:
                ticket = SubmitTicket.of(fence.moved(S.SUBMITTING), job, batches.get(job.batch_id), attempt)
                done.tickets.append(ticket)
    for batch_id in sorted(refused - paused):
        done.cancelled += _end_what_cannot_fit(session, rt, committed, batches.get(batch_id), now)
    if done.unused > 0:  # the shared bucket's too (the local one gets them in hand_on)
        store.return_submit_tokens(session, key_id, done.unused, capacity=rt.bucket.capacity)
    return done


class _PricedAgain:
    """A claimed job's columns as read, its estimate as this round priced it again
    (:func:`_priced_now`): what its budget check and its reservation go by."""

    def __init__(self, job: JobRecord, billing_units: Decimal, usd: Decimal) -> None:
        self._job = job
        self.est_billing_units = billing_units
        self.est_usd = usd

    def __getattr__(self, name: str) -> Any:
        return getattr(self._job, name)


def _priced_now(
    session: Session, rt: Runtime, jobs: list[JobRecord], batches: _RoundBatches
) -> list[JobRecord]:
    """``jobs`` (this round's claims) with the estimates of those never sent priced by this
    process's prices in force, when they were stored with others (:func:`jobs.pricing.priced_otherwise`).

    The estimate a cap reserves is decided here, by the process that sends: in distributed mode
    a worker's ``WANBATCH_PRICING_OVERRIDES``, not the prices of whoever submitted the manifest
    (a price corrected after the submit was ignored: 9 of 10 jobs went out under a cap that
    had room for 3). Every job of such a batch not sent yet is priced again at once
    (:func:`jobs.store.reprice_unsent`), so the jobs a refusal ends with it
    (:func:`_end_what_cannot_fit`, by their estimate in SQL) are judged by the same prices; one
    line says how the batch's estimate changed. A job sent before keeps its estimate.
    """
    stale = {
        job.batch_id
        for job in jobs
        if job.attempts == 0
        and job.submitted_at is None
        and priced_otherwise(job.endpoint, job.price_table, rt.settings)
    }
    if not stale:
        return jobs
    priced: dict[str, tuple[Decimal, Decimal]] = {}
    for batch_id in sorted(stale):
        wanted = [job.id for job in jobs if job.batch_id == batch_id]
        repriced = store.reprice_unsent(session, batch_id, rt.settings, wanted=wanted)
        priced.update(repriced.wanted)
        if repriced.changed:
            after = store.batch_estimated_usd(session, batch_id)
            was, now = usd_apart(after - repriced.after_usd + repriced.before_usd, after)
            said = partial(
                log.warning,
                "batch %s: estimates changed with the prices in force: %s → %s (%d job(s) not sent "
                "yet priced again; jobs already sent keep theirs)",
                batches.get(batch_id).name,
                was,
                now,
                repriced.jobs,
                extra={"event": "dispatch.repriced", "batch_id": batch_id},
            )
            db.after_commit(session, said)
    return [cast(JobRecord, _PricedAgain(job, *priced[job.id])) if job.id in priced else job for job in jobs]


class _RoundBatches:
    """The batches one dispatch round reads, each read once: those that may be held back
    (a schedule, paused by their user) and the runtime's own, in one query; any other batch of
    a claimed job when first needed. The round's session does not keep them by itself (its
    identity map holds objects weakly), and they were read up to four times per round."""

    def __init__(self, session: Session, own: Collection[str]) -> None:
        self._session = session
        self._own = frozenset(own)
        self._by_id: dict[str, BatchRecord] = {b.id: b for b in store.dispatch_batches(session, own)}

    def read(self, batch_ids: Collection[str]) -> None:
        """Read those of ``batch_ids`` not read yet, in one query (the batches of the jobs just
        claimed: a distributed leader knows no batch of its own)."""
        missing = set(batch_ids) - self._by_id.keys()
        self._by_id.update((b.id, b) for b in store.batch_records(self._session, missing))

    def get(self, batch_id: str) -> BatchRecord:
        batch = self._by_id.get(batch_id)
        if batch is None:
            batch = self._by_id[batch_id] = store.get_batch(self._session, batch_id)
        return batch

    def closed(self, now: datetime) -> set[str]:
        """Active batches that may not send now: paused by their user, closed by their
        schedule (before ``not_before``, outside the daily window, past the deadline), or
        simulations this round does not work on by name: only the ``--simulate`` run that
        processes one sends it (to its own simulator); workers never send one to fal."""
        return {
            batch.id
            for batch in self._by_id.values()
            if batch.paused_by_user
            or (batch.simulated and batch.id not in self._own)
            or (batch.schedule is not None and not store.batch_schedule(batch).is_open(now))
        }


def _shared_rate(
    session: Session, rt: Runtime, free: int, key_id: str, now: datetime, rate: store.RateRead | None
) -> int:
    """Of the ``free`` submits this process's bucket grants, those the rate's bucket shared by
    every dispatching process grants too (``WANBATCH_SUBMIT_RATE`` is one cap for all of them:
    two ``wanbatch run`` side by side sent twice the rate); the rest go back to the local one.
    ``rate``: that bucket as the round's count read it (:func:`jobs.store.in_flight`)."""
    assert rt.bucket is not None
    took = store.take_submit_tokens(
        session,
        key_id,
        free,
        rate=rt.bucket.rate,
        capacity=rt.bucket.capacity,
        now=now,
        wall=time.time(),
        # A 429's pause another process heard (the database's pause), as :func:`_heed_pause`.
        hold_over=rt.settings.submit_wait_max,
        read=rate,
    )
    # Whether another process shares the pacing, for this process's submits (no query of theirs).
    rt.pacing.shared_for(took.shared_for)
    if took.granted < free:
        rt.bucket.shared_short(free - took.granted, took.wait)
    return took.granted


def _heed_pause(rt: Runtime) -> None:
    """Claim nothing while the shared limiter holds every submit back longer than a submit
    would wait for its token: fal answered a 429, maybe to a worker on another host
    (:meth:`~worker.limits.SubmitLimiter.hold_off`). Jobs claimed now would only be handed back,
    one history entry each, until the pause ends; dispatch comes back when it does. Only that
    pause: the limiter's ordinary spacing (the next token one interval away after any submit) is
    the rate, which this process's bucket already keeps; held back for it too, dispatch waited
    two intervals per job and the rate ran at half its setting.

    Likewise while the limiter cannot be asked (its Redis is down): no submit could take a
    token, so claiming would only prepare (upload) each job's input and give it back, every few
    seconds, until Redis returns. Jobs stay ``pending`` (none fails) and this asks again in
    :data:`~worker.limits.UNREACHABLE_RETRY_SECONDS`; the limiter says why (bounded warnings).
    A job claimed before the outage was noticed fails closed at its submit all the same."""
    assert rt.bucket is not None
    if rt.limiter is None:
        return
    try:
        left = rt.limiter.pause_left()
    except LimiterUnavailableError:
        rt.bucket.hold_off(UNREACHABLE_RETRY_SECONDS)
        return
    if left > rt.settings.submit_wait_max:
        rt.bucket.hold_off(left)


def _heed_fal_reach(rt: Runtime, free: int) -> int:
    """Of ``free`` submits, those this process may hand on while fal is unreachable from it
    (:class:`~worker.steps.fal_reach.FalReach`): none until the next probe may go (the bucket
    grants nothing until then, and dispatch comes back then), then one — the probe. Claimed
    now, the others would only go back, one history entry each. Only this process's submits
    are held: a distributed leader, whose workers send, hears nothing here, and their submit
    steps hold the jobs instead."""
    assert rt.bucket is not None
    left = rt.fal_reach.held_for()
    if left > 0:
        rt.bucket.hold_off(left)
        return free
    return min(free, 1) if rt.fal_reach.down else free


def _reuse(
    session: Session,
    rt: Runtime,
    job: JobRecord,
    batches: _RoundBatches,
    paused: set[str],
    unverified: list[list[Candidate]],
) -> str:
    """With ``reuse_outputs``, give a claimed pinned-seed job the output of a succeeded twin:
    :data:`REUSED`, :data:`SEND` (no intact twin: send it as usual) or :data:`WAIT`.

    Decided here, in the claim's transaction, so a reused job is never sent, holds no slot and
    reserves no budget. Only jobs whose input pins ``seed``: an unseeded request is a new draw,
    and taking another job's video would silently stand in for it. Up to :data:`REUSE_CHECKS`
    twins are checked, oldest first (twins that reused another's output are their source's
    stand-ins, not checked again); the first whose file is on disk (or whose object is in S3) at
    the recorded size *and* with the recorded SHA-256 is taken (:func:`_verified`): the job then
    records that SHA-256 as its video's, so it must be the bytes stored now. A twin whose file
    changed since it was stored is passed over with a warning naming the file. A twin of a moved
    or copied project is looked for under the current output folder first, then where it was
    recorded (:func:`jobs.moved_outputs.places_to_look`): a file there of the recorded size but
    other bytes never hides the intact original. Only when every one checked is gone or changed
    is the job sent. No sidecar is written for the reusing job: it
    points at the original's file, and its export record carries ``reused_from``.

    No video is read here: the transaction holds SQLite's write lock (on PostgreSQL, the claimed
    rows), and hashing a video reads all of it. The round only looks at each twin's stamp (one
    ``lstat``, or one ``HEAD`` for S3) and takes the SHA-256 read for exactly that stamp
    (:class:`~worker.steps.verified_outputs.VerifiedOutputs`). When a twin it would come to is
    not known so, the job is let go, due at once and nothing recorded (:data:`WAIT`), with the
    twins to read in ``unverified``: :meth:`Dispatched.hand_on` reads them once the round has
    committed, and the next round decides — on the stamp it sees then, so a file changed between
    the read and the claim is read again, never taken for the bytes read before. Its warnings are
    said by the round that decides, once.

    A check that fails for another reason than "not there" (S3 refusing the HEAD or the GET, unreachable,
    late) never turns into a paid render: the job stays ``pending`` (:data:`WAIT`) and is
    checked again after the step's backoff, up to ``WANBATCH_DOWNLOAD_ATTEMPTS`` times (as an
    upload is); a refusal (access denied, credentials refused), which waiting does not heal,
    and a failure past those tries pause the batch like storage that refuses outputs
    (``paused`` gets its id: the round sends none of its jobs).
    """
    batch = batches.get(job.batch_id)
    if job.input.get("seed") is None or not batch.reuse_outputs:
        return SEND
    sources = store.find_reusable(session, job, simulated=batch.simulated, limit=REUSE_CHECKS)
    # A moved project's twin is looked for under the current output folder (jobs.moved_outputs).
    root = moved_outputs.local_root(rt.settings.output_dir, rt.settings.output_url) if sources else None
    failed: OutputReadError | None = None
    failing: set[str] = set()  # storages (buckets) whose check failed: not asked again this time
    checked: set[str] = set()
    changed: list[tuple[Job, str, str]] = []  # (twin, path, why) passed over: said once decided
    to_read: list[Candidate] = []
    taken: Job | None = None
    for source in sources:
        recorded = source.output_path
        if recorded is None or recorded in checked or storage_of(recorded) in failing:
            continue
        checked.add(recorded)
        # A moved (or copied) project's twin under the current output folder first, then where it
        # was recorded: a file there of the recorded size but other bytes hides no intact original.
        for path in moved_outputs.places_to_look(recorded, source.output_bytes, root):
            try:
                intact = _verified(source, path, changed)
            except OutputReadError as exc:
                failing.add(storage_of(path))
                failed = exc if failed is None or (exc.refused and not failed.refused) else failed
                break
            if intact is None:  # to be read first
                to_read.append(Candidate(path, source.output_sha256))
            elif intact:
                taken = source
                if path != recorded:  # found moved: recorded
                    moved_outputs.record_move(session, source.id, recorded, path)
                break
        if taken is not None:
            break
    if to_read:  # decided by the next round, once read: taken is the twin after them
        unverified.append(to_read)
        store.release_lease(session, rt.fence(job))
        return WAIT
    for source, path, why in changed:
        if taken is source:  # its copy under the current folder differs; its recorded file is taken
            log.warning(
                "job %s: %s is not the output job %s stored (%s); reusing that output where it was "
                "stored, %s",
                job.id,
                path,
                source.id,
                why,
                source.output_path,
                extra={"event": "reuse.output_changed", "job_id": job.id, "batch_id": job.batch_id},
            )
            continue
        log.warning(
            "job %s: not reusing the output of job %s: %s changed since it was stored (%s)",
            job.id,
            source.id,
            path,
            why,
            extra={"event": "reuse.output_changed", "job_id": job.id, "batch_id": job.batch_id},
        )
    if taken is not None:
        rt.reuse_check_failures.pop(job.id, None)
        return REUSED if store.mark_reused(session, rt.fence(job), taken) else WAIT
    if failed is not None:
        return _reuse_check_failed(session, rt, job, failed, paused)
    rt.reuse_check_failures.pop(job.id, None)
    if checked:
        log.info(
            "job %s: the output of its %d twin(s) to reuse is gone or changed; sending",
            job.id,
            len(checked),
            extra={"event": "reuse.output_gone", "job_id": job.id, "batch_id": job.batch_id},
        )
    return SEND


def _verified(source: Job, path: str, changed: list[tuple[Job, str, str]]) -> bool | None:
    """Whether the output ``source`` recorded at ``path`` is still the video it stored: there,
    of the recorded size (a local file's ``lstat``, or the object's HEAD when outputs are in S3),
    and with the recorded SHA-256 as read for the stamp it has now — None when that is not known
    yet (to be read, outside the transaction: :func:`_reuse`). A file of another size or other
    bytes changed since it was stored: added to ``changed`` (with why), for one warning. A file
    gone (or unreadable) is said by the caller (sent, unless a later twin's is intact).
    :class:`OutputReadError` when the storage cannot be asked (now, or when it was to be read)."""
    stamp = output_store.output_stamp(path)
    if stamp is None:
        return False
    if stamp.size != source.output_bytes:
        changed.append((source, path, f"{stamp.size:,} bytes, not the {source.output_bytes or 0:,} recorded"))
        return False
    known = VERIFIED.known(path, stamp)
    if known is None:
        return None
    if known.digest is None:
        if known.why is not None:
            changed.append((source, path, known.why))
        return False  # unreadable, or changing
    if known.digest != source.output_sha256:
        why = f"SHA-256 {known.digest[:12]}…, not the {(source.output_sha256 or '')[:12]}… recorded"
        changed.append((source, path, why))
        return False
    return True


def _take_staged(
    session: Session, rt: Runtime, job: JobRecord, batches: _RoundBatches, paused: set[str]
) -> str:
    """A rerun's job whose original failed with its paid video left in the staging folder
    (``output_not_kept``: its batch was cancelled while the storage was down) takes that video
    instead of being sent to fal again: :data:`TAKEN` (moved to ``downloading``, where the
    download step stores it, costing nothing more than what fal billed the job's own earlier
    attempts, if any; ``reused_from`` naming the job fal made it for), else
    :data:`SEND` (the usual way on, :func:`_reuse` first).

    Only for a job that repeats the original's input exactly (its stored input and the seed
    fal returned: no ``--new-seeds``, no ``--vary``), in a batch of the same kind (a simulation
    never takes a paid video), and only a file that is still exactly the one the original
    downloaded: its size and SHA-256 as the download step recorded them. A file gone, or not
    those bytes, is not taken (a warning says which and why) and the job is sent as usual.
    Hashed here, in the claim's transaction: this concerns a handful of jobs after a storage
    outage, never a batch's ordinary sends (a job that reruns nothing costs no query).

    A staging folder that cannot be looked in (its batch folder a link out of it, a relative
    folder whose working folder is gone) sends nothing: that would pay again for a video that
    may well be there. The batch is paused with the reason (:data:`WAIT`).
    """
    if job.rerun_of is None:
        return SEND
    original = store.staged_original(session, job, simulated=batches.get(job.batch_id).simulated)
    if original is None or original.endpoint != job.endpoint:
        return SEND
    if dict(job.input) != rerun_input(original.input, original.seed):
        return SEND  # --new-seeds or --vary: another input, another video
    try:
        path, why = find_staged(session, rt.settings, original)
    except OutputWriteError as exc:
        reason = (
            f"{store.OUTPUTS_PAUSE_PREFIX}be looked for in the staging folder: {exc} — the paid "
            f"video job {original.id} left there is taken by the next run once the folder can be "
            "looked in, never made again"
        )
        return _pause_unsent(session, job, reason, paused, "rerun.staged_paused")
    if path is None:
        log.warning(
            "job %s: the paid video job %s left in the staging folder is not taken: %s; sending it "
            "to fal (rendered and paid again)",
            job.id,
            original.id,
            why,
            extra={"event": "rerun.staged_refused", "job_id": job.id, "batch_id": job.batch_id},
        )
        return SEND
    queued = {"lease_owner": DOWNLOAD_QUEUE, "lease_expires_at": rt.lease_until(utcnow())}
    if not store.mark_taking_staged(session, rt.fence(job), original, staged=str(path), **queued):
        return WAIT
    log.info(
        "job %s: takes the paid video job %s left in the staging folder (%s); not sent",
        job.id,
        original.id,
        path,
        extra={"event": "rerun.staged_taken", "job_id": job.id, "batch_id": job.batch_id},
    )
    return TAKEN


def _reuse_check_failed(
    session: Session, rt: Runtime, job: JobRecord, exc: OutputReadError, paused: set[str]
) -> str:
    """No twin's output could be checked (:func:`_reuse`): keep the job, try again later, and
    pause its batch once waiting will not help."""
    failures = rt.reuse_check_failures.get(job.id, 0) + 1
    tries = rt.settings.download_attempts
    if not exc.refused and failures < tries:
        if len(rt.reuse_check_failures) >= REUSE_FAILURES_KEPT:
            rt.reuse_check_failures.clear()
        rt.reuse_check_failures[job.id] = failures
        delay = backoff(rt.settings, failures)
        store.release_lease(session, rt.fence(job), next_attempt_at=utcnow() + timedelta(seconds=delay))
        log.warning(
            "job %s: cannot check the output to reuse: %s; not sent, checking again in %.0fs (try %d of %d)",
            job.id,
            exc,
            delay,
            failures,
            tries,
            extra={"event": "reuse.check_failed", "job_id": job.id, "batch_id": job.batch_id},
        )
        return WAIT
    rt.reuse_check_failures.pop(job.id, None)
    after = "" if exc.refused else f" (after {failures} tries)"
    reason = (
        f"{store.OUTPUTS_PAUSE_PREFIX}be read back to reuse them (reuse_outputs): {exc}{after} — "
        "give the credentials read access (s3:GetObject, and s3:ListBucket so that a missing "
        "object is told from a refused one) or fix the storage; nothing of the batch is sent "
        "meanwhile, so no render that could be reused is paid for"
    )
    return _pause_unsent(session, job, reason, paused, "reuse.check_paused")


def _pause_unsent(session: Session, job: JobRecord, reason: str, paused: set[str], event: str) -> str:
    """Pause ``job``'s batch for ``reason`` without sending the job (it waits, kept), note the
    batch in ``paused`` (the round sends nothing more of it) and say so: :data:`WAIT`."""
    store.set_batch_state(session, job.batch_id, BatchState.PAUSED, reason=reason)
    paused.add(job.batch_id)
    log.warning(
        "job %s: not sent; batch paused: %s",
        job.id,
        reason,
        extra={"event": event, "job_id": job.id, "batch_id": job.batch_id},
    )
    return WAIT


def _followed(session: Session, rt: Runtime, scope: store.CapScope, now: datetime) -> store.Followed:
    """Which batches other live processes follow (:func:`jobs.store.followed_now`), read at
    most every :data:`FOLLOWED_REFRESH_SECONDS`: a drain runs a round per completion, and a read
    per round was one more query per job for what changes on the heartbeats' 10 s beat."""
    seen = time.monotonic()
    if rt.followed is not None and seen - rt.followed[0] < FOLLOWED_REFRESH_SECONDS:
        return rt.followed[1]
    followed = store.followed_now(session, scope, now)
    rt.followed = (seen, followed)
    return followed


def _room_at_fal(
    session: Session, rt: Runtime, flight: store.InFlight, free: int, scope: store.CapScope, before: datetime
) -> int:
    """Keep a small queue waiting at fal beyond the requests it runs, sized from what is seen.

    fal runs 2 to 40 requests at once per account, depending on its tier, and queues the rest
    (FIFO, not billed while queued). A few requests waiting there mean fal starts the next one
    the instant a slot frees, whatever our reaction time; many waiting only lengthen fal's
    queue, losing control of cancel, budget and result expiry. So while no request we sent to
    this process's fal queue has waited ``queue_wait_backoff`` seconds there (sent before
    ``before``), the full cap applies; once one has (the account runs fewer than our cap),
    dispatch keeps only a quarter of the requests fal is seen running (at least one) waiting
    there (:class:`jobs.store.QueueWaits`). When nothing waits that long any more (jobs start,
    or the tier was raised) the full cap applies again.

    Only the requests of this process's own queue count (``Job.fal_origin``, or none recorded):
    it follows them, so they move. One at another queue (a stand-in stopped with requests
    waiting) stayed ``queued`` in the database for good, and every later run sent nothing.

    The hold is said within bounds (:class:`~worker.outage_log.HoldLog`: when it begins, when
    the number kept changes twofold, else once a minute; its end once): a round runs with
    every completion and tick, and its line each round was 57 a minute for one unchanged state.
    """
    threshold = rt.settings.queue_wait_backoff
    if free <= 0 and threshold > 0:
        return free  # the cap is full: whether the back-off would hold is not asked
    if threshold <= 0 or flight.waiting_long == 0:
        _queue_hold_ended(rt, threshold)
        return free
    waits = store.queue_waits(session, scope, sent_before=before)
    room = waits.room(free)
    if room >= free:
        _queue_hold_ended(rt, threshold)
        return room
    held = rt.queue_hold.holds(waits.depth)
    if held.due:
        log.info(
            "requests wait in fal's queue over %.0fs: keeping %d waiting (%d wait; room %d of %d)%s",
            threshold,
            waits.depth,
            waits.waiting,
            room,
            free,
            held.for_how_long,
            extra={"event": "dispatch.queue_backoff"},
        )
    return room


def _queue_hold_ended(rt: Runtime, threshold: float) -> None:
    """The queue-wait back-off holds nothing back this round: say the end of a hold it said
    (:class:`~worker.outage_log.HoldLog`)."""
    lasted = rt.queue_hold.ended()
    if lasted is not None:
        log.info(
            "no request waits in fal's queue over %.0fs any more: submits fill the cap again "
            "(held back for %.0fs)",
            threshold,
            lasted,
            extra={"event": "dispatch.queue_backoff_ended"},
        )


def forget_holds(rt: Runtime) -> None:
    """``rt``'s process no longer dispatches (the workers' tick leader found the lead another
    worker's): the holds its rounds said are no longer its to follow, nor to say the end of
    (:meth:`~worker.outage_log.HoldLog.forget`); the new leader says those it finds."""
    rt.queue_hold.forget()
    rt.backlog_hold.forget()


def _room_for_downloads(rt: Runtime, backlog: int) -> int:
    """How many more may be sent before the jobs waiting for their download reach the bound.

    Every request sent now becomes a download later; when downloads stall (a full disk, a slow
    link, an unreachable CDN) sending on would only pile paid outputs up at fal, whose files
    expire. So the download backlog (``WANBATCH_MAX_DOWNLOAD_BACKLOG``, by default the outstanding
    cap) holds submits back, and they resume as downloads drain. Said within bounds
    (:class:`~worker.outage_log.HoldLog`): a round runs every few hundred milliseconds.
    """
    bound = rt.settings.download_backlog
    if backlog >= bound:
        held = rt.backlog_hold.holds(backlog)
        if held.due:
            log.info(
                "%d jobs wait for their download (bound %d): holding submits%s",
                backlog,
                bound,
                held.for_how_long,
                extra={"event": "dispatch.download_backlog"},
            )
    elif (lasted := rt.backlog_hold.ended()) is not None:
        log.info(
            "%d jobs wait for their download (bound %d): submits resume (held back for %.0fs)",
            backlog,
            bound,
            lasted,
            extra={"event": "dispatch.download_backlog_ended"},
        )
    return max(0, bound - backlog)


def _claim_within_caps(
    session: Session,
    rt: Runtime,
    free: int,
    now: datetime,
    scope: store.CapScope,
    closed: set[str],
    states: list[JobState],
    followed: store.Followed,
) -> list[JobRecord]:
    """Claim up to ``free`` due jobs in ``states``, no endpoint beyond its own cap
    (``max_outstanding_per_endpoint``)."""
    claim: dict[str, Any] = {  # every job claimed is moved in the round's transaction: claim_due
        "states": states,
        "now": now,
        "active_batches_only": True,
        "batch_ids": rt.batch_ids,  # only the runtime's own batches; the caps count every batch
        "exclude_batch_ids": closed,
    }
    caps = rt.settings.max_outstanding_per_endpoint
    if not caps:
        return store.claim_due(session, limit=free, **claim)
    outstanding = store.count_in_states_by_endpoint(
        session, states_at_provider(), scope=scope, followed=followed
    )
    jobs: list[JobRecord] = []
    for endpoint, cap in sorted(caps.items()):
        rt.capped = rt.capped or outstanding.get(endpoint, 0) >= cap
        room = min(free - len(jobs), cap - outstanding.get(endpoint, 0))
        if room > 0:
            jobs += store.claim_due(session, limit=room, endpoints=[endpoint], **claim)
    uncapped = [e.id for e in all_endpoints() if e.id not in caps]
    if free - len(jobs) > 0 and uncapped:
        jobs += store.claim_due(session, limit=free - len(jobs), endpoints=uncapped, **claim)
    return jobs


class _Committed:
    """The money the budget caps count as committed, read once per dispatch round and kept
    current by this round's own moves.

    Both sums are aggregates over many jobs (:func:`jobs.store.batch_committed_usd` over a batch,
    :func:`jobs.store.committed_usd_today` over the day); asking them again for every claimed job
    made a round cost O(jobs × batch). Within the claim's transaction only this round changes
    them (one round at a time: :func:`jobs.store.lock_dispatch`), and a
    budget refusal changes neither (a cancelled job keeps what it was billed), so each is read
    once — per batch, when its first job comes up — and moved by :meth:`add` as jobs are marked
    ``submitting``. The caps hold exactly as when the sums were read before every job.
    """

    def __init__(
        self, session: Session, batches: _RoundBatches, now: datetime, daily_cap: Decimal | None
    ) -> None:
        self._session = session
        self._round_batches = batches
        self.since = now.replace(hour=0, minute=0, second=0, microsecond=0)
        self.daily_cap = daily_cap
        self._batches: dict[str, tuple[Decimal | None, Decimal]] = {}  # id → (cap, committed)
        self._today: Decimal | None = None
        self._by_batch: dict[str, DaySpender] | None = None  # the day's sum by batch: whose

    def batch(self, batch_id: str) -> tuple[Decimal | None, Decimal]:
        """The batch's cap (None: no cap) and what it has committed."""
        if batch_id not in self._batches:
            cap = self._round_batches.get(batch_id).budget_max_usd
            committed = store.batch_committed_usd(self._session, batch_id) if cap is not None else Decimal(0)
            self._batches[batch_id] = (cap, committed)
        return self._batches[batch_id]

    def today(self) -> Decimal:
        """What every batch has committed today (the daily budget)."""
        if self._today is None:
            self._today = store.committed_usd_today(self._session, self.since)
        return self._today

    def others_today(self, batch_id: str) -> str:
        """Whose spending the day's cap counts besides ``batch_id``'s, for its refusal's
        ``error`` (:func:`_daily_cap_error`): ``"; $30.59 of it by other batches: bob-lh,
        carol-lh"``, or "" when no other batch committed anything today.

        The breakdown is one grouped query (:func:`jobs.store.committed_usd_today_by_batch`),
        read only once a round refuses a job for the day's cap, then kept current by
        :meth:`add` as the day's sum is."""
        if self._by_batch is None:
            spenders = store.committed_usd_today_by_batch(self._session, self.since)
            self._by_batch = {s.batch_id: s for s in spenders}
        spenders = sorted(self._by_batch.values(), key=lambda s: (-s.usd, s.name))
        usd, names = others_today(spenders, batch_id)
        return f"; {usd_text(usd)} of it by other batches: {names}" if names else ""

    def counts_today(self, batch_id: str) -> bool:
        """Whether the batch's money counts toward the daily budget: a simulation's never does
        (the simulator bills nothing; :func:`jobs.store.committed_usd_today` leaves it out)."""
        return not self._round_batches.get(batch_id).simulated

    def add(self, job: JobRecord) -> None:
        """``job`` (claimed ``pending``/``retry_wait``) was just marked ``submitting``.

        Its estimate is now reserved, in its batch and in the day, on top of what its earlier
        attempts were (or may have been) billed: both sums count a job by
        :func:`jobs.store.committed_usd`. That billed money stays counted in the batch; the day
        counted it already when the job was last sent today, and counts it from now on
        whenever it was (a job at fal counts, whatever day it was last sent: see
        :func:`jobs.store.committed_usd_since`).
        """
        if job.batch_id in self._batches:
            cap, committed = self._batches[job.batch_id]
            self._batches[job.batch_id] = (cap, committed + job.est_usd)
        if self._today is not None and self.counts_today(job.batch_id):
            self._today += self.adds_today(job)
            self._add_by_batch(job)

    def _add_by_batch(self, job: JobRecord) -> None:
        """:meth:`add` for the day's sum by batch, once it was read (:meth:`others_today`)."""
        if self._by_batch is None:
            return
        was = self._by_batch.get(job.batch_id)
        name = was.name if was is not None else self._round_batches.get(job.batch_id).name
        usd = (was.usd if was is not None else Decimal(0)) + self.adds_today(job)
        self._by_batch[job.batch_id] = DaySpender(batch_id=job.batch_id, name=name, usd=usd)

    def adds_today(self, job: JobRecord) -> Decimal:
        """What sending ``job`` adds to the day's committed sum: its estimate, and what its
        earlier attempts were (or may have been) billed unless the day counts that already
        (it was last sent today)."""
        billed_today = job.submitted_at is not None and job.submitted_at >= self.since
        earlier = (job.actual_usd or Decimal(0)) + (job.ambiguous_usd or Decimal(0))
        return job.est_usd + (Decimal(0) if billed_today else earlier)


def _budget_refusal(committed: _Committed, job: JobRecord) -> tuple[str, str] | None:
    """Why submitting ``job`` would cross a budget cap (its batch's, or the day's), and which
    (the ``error_type``: :data:`~jobs.money.BATCH_CAP_ERROR` or :data:`~jobs.money.DAILY_CAP_ERROR`),
    else None.

    Checked in the claim's transaction, one round at a time: what is committed (spent +
    the estimates of everything in flight) plus what sending this job adds must stay within
    the cap (for the day, :meth:`_Committed.adds_today`: a job billed on an earlier day counts
    that bill again today once it is sent).
    """
    cap, batch_committed = committed.batch(job.batch_id)
    if cap is not None and batch_committed + job.est_usd > cap:
        return _batch_cap_error(batch_committed, cap, job.est_usd), BATCH_CAP_ERROR
    daily_cap = committed.daily_cap
    if daily_cap is not None and committed.counts_today(job.batch_id):
        today, adds = committed.today(), committed.adds_today(job)
        if today + adds > daily_cap:
            whose = committed.others_today(job.batch_id)
            return _daily_cap_error(today, daily_cap, adds, whose), DAILY_CAP_ERROR
    return None


def _batch_cap_error(batch_committed: Decimal, cap: Decimal, est_usd: Decimal) -> str:
    """The ``error`` of a job its batch's cap refused (:data:`~jobs.money.BATCH_CAP_ERROR`): the
    two amounts with the decimals that tell them apart (:func:`~jobs.money.usd_apart`)."""
    would, capped = usd_apart(batch_committed + est_usd, cap)
    return f"budget: submitting would commit {would} of the batch's {capped} cap"


def _daily_cap_error(today: Decimal, daily_cap: Decimal, est_usd: Decimal, others: str = "") -> str:
    """The ``error`` of a job the day's cap refused (:data:`~jobs.money.DAILY_CAP_ERROR`), its
    amounts as :func:`_batch_cap_error` writes them; ``others``: the part other batches hold,
    and which (:meth:`_Committed.others_today`), since the cap counts every batch's money and a
    user was refused by a total that was mostly someone else's. The cap's amount stays where
    :func:`jobs.money.daily_cap_in` reads it back (``status`` compares it with its own)."""
    would, capped = usd_apart(today + est_usd, daily_cap)
    cap = f"today's {capped} cap (WANBATCH_DAILY_BUDGET_USD{others})"
    return f"budget: submitting would commit {would} of {cap}"


def _end_what_cannot_fit(
    session: Session, rt: Runtime, committed: _Committed, batch: BatchRecord, now: datetime
) -> int:
    """A budget cap refused a job of ``batch`` in this round: end, set-based, every other unsent
    job of it that cannot fit either — what :func:`_budget_refusal` would say of each, were it
    claimed now, at the end of the round (what is committed only grows within it). Returns how
    many it cancelled.

    Claimed one round at a time (as many as the outstanding cap has room for, ten by default)
    and the tick idle meanwhile, a batch's unsent jobs took hours to end once its cap was
    reached (50,000 jobs: about six). Exactly the jobs that would be refused are ended, with the
    same words: the batch's cap first (its estimate above the room its cap has left), then the
    day's; a cheaper job that still fits stays ``pending`` and is sent as usual. A job that may
    be given an output without being sent (a twin's, or a staged video) is left to its claim
    (:func:`jobs.store.cancel_unsent_over`).
    """
    common: dict[str, Any] = {
        "reason": "budget",
        "worker": rt.owner,
        "now": now,
        "keep_reusable": batch.reuse_outputs,
    }
    # Which cap ended how many, for the warning: it once blamed "its budget" for jobs only the
    # day's cap (WANBATCH_DAILY_BUDGET_USD) ended, of a batch with no budget at all.
    by_cap: list[tuple[str, str, int]] = []  # the cap as named, in short, how many it ended
    cap, batch_committed = committed.batch(batch.id)
    if cap is not None:
        over = store.cancel_unsent_over(
            session,
            batch.id,
            over_usd=cap - batch_committed,
            error_for=partial(_batch_cap_error, batch_committed, cap),
            error_type=BATCH_CAP_ERROR,
            **common,
        )
        if over:
            by_cap.append((f"its budget ({usd_text(cap)})", "its budget", over))
    daily_cap = committed.daily_cap
    if daily_cap is not None and committed.counts_today(batch.id):
        today = committed.today()
        # Whose spending it is, read only if some job is over (cancel_unsent_over asks the words then).
        whose = cache(partial(committed.others_today, batch.id))
        over = store.cancel_unsent_over(
            session,
            batch.id,
            over_usd=daily_cap - today,
            error_for=lambda est_usd: _daily_cap_error(today, daily_cap, est_usd, whose()),
            error_type=DAILY_CAP_ERROR,
            **common,
        )
        if over:
            by_cap.append(
                (f"today's cap ({usd_text(daily_cap)}, WANBATCH_DAILY_BUDGET_USD)", "today's cap", over)
            )
    ended = sum(n for _name, _short, n in by_cap)
    if ended:  # a WARNING, as each job's end: a `run` logging warnings only says it too
        caps = " or ".join(name for name, _short, _n in by_cap)
        each = ", ".join(f"{n} over {short}" for _name, short, n in by_cap)
        each = f" ({each})" if len(by_cap) > 1 else ""
        log.warning(
            "batch %s: %d unsent job(s) cannot fit %s: cancelled%s",
            batch.id,
            ended,
            caps,
            each,
            extra={"event": "dispatch.budget_cancelled", "batch_id": batch.id},
        )
    return ended


def states_at_provider() -> list[JobState]:
    """States that count against the outstanding cap."""
    return [s for s in JobState if s.at_provider]
