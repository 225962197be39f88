"""The invariants every chaos scenario must leave intact, checked over the recorded history.

Three independent records are compared: the project database (``jobs`` and ``job_events``),
the simulator's ledger (what "fal" accepted and billed, including submits whose answer never
reached a worker) and the output folder. Ledger entries are matched to jobs by the hash of the
input sent; every job of a chaos manifest has its own seed, so no two jobs share an input.

* **I1** every job is terminal, with a reason (``error``) when it failed or was cancelled, and
  its output when it succeeded; the job count equals the manifest's (0 lost).
* **I2** per job, accepted submits minus the attempts the worker *knew* had failed at fal
  (their request id is in the job's history and the request ended in error) is at most 1 —
  unless the job recorded an ambiguous outcome (an event into ``submit_unknown``). Every extra
  accepted submit is reported on the job (``possible_duplicate_charges``). Paid duplicates
  (two billed requests for one job) are counted and must also be covered by those reports.
* **I3** no partial file is visible: every ``.mp4`` in the output folder is the output of a
  succeeded job with the recorded size and SHA-256 (temporary files are hidden ``.*.part``).
* **I5** fal never held more outstanding requests than ``WANBATCH_MAX_OUTSTANDING`` (plus, under
  the ``resubmit`` policy, the orphans of ambiguous submits, which we cannot see by definition).
* **History** each job's events chain: ``from_state`` of each equals ``to_state`` of the one
  before (the first starts at ``pending``), versions strictly increase, and the last event's
  state is the job's state. A note (``from_state`` = ``to_state``: a request the job does not
  keep, put on its history by ``jobs.store.note_request``) moves nothing: it repeats the state
  of the move before it, at no lower a version, and may follow a terminal state.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import psycopg
from psycopg.rows import class_row

from falsim.engine import canonical_sha256
from falsim.ledger import EntryRecord, LedgerReport

TERMINAL = {"succeeded", "failed", "cancelled"}
KNOWN_FAILURE_OUTCOMES = {"error", "invalid", "cancelled", "timeout"}


@dataclass(frozen=True)
class JobRow:
    """The columns of ``jobs`` the invariants read."""

    id: str
    state: str
    error: str | None
    error_type: str | None
    input: dict[str, Any]
    submitted_input: dict[str, Any] | None
    attempts: int
    request_id: str | None
    possible_duplicate_charges: int
    output_path: str | None
    output_sha256: str | None
    output_bytes: int | None


@dataclass(frozen=True)
class EventRow:
    """The columns of ``job_events`` the history rule reads."""

    job_id: str
    from_state: str | None
    to_state: str
    version: int
    reason: str | None


class FailureExample(TypedDict):
    """A job that did not succeed, with its history (the first few are kept in the figures)."""

    job: str
    error: str | None
    accepted_at_fal: int
    history: list[str]


class InvariantFigures(TypedDict):
    """What :func:`check` measured, whether or not an invariant broke."""

    jobs: int
    stored: int
    states: dict[str, int]
    lost: int
    accepted_submits: int
    billed: int
    ambiguous_outcomes: int
    jobs_with_ambiguous_outcome: int
    extra_accepted_submits: int
    duplicate_paid_submissions: int
    reported_possible_duplicates: int
    max_outstanding_at_fal: int
    outstanding_cap: int
    late_answers_recorded: int
    hidden_temp_files_left: int
    events: int
    unsuccessful_examples: list[FailureExample]


@dataclass
class Violations:
    """Every invariant violation found (empty = all hold); the first 200 are kept."""

    messages: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        if len(self.messages) < 200:
            self.messages.append(message)


@dataclass(frozen=True)
class Findings:
    """Figures of one check and every invariant violation found (empty = all hold)."""

    figures: InvariantFigures
    violations: list[str]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check(
    db_url: str,
    ledger: LedgerReport,
    output_dir: Path,
    *,
    expected_jobs: int,
    max_outstanding: int,
    policy: str,
) -> Findings:
    """Evaluate I1, I2, I3, I5 and the history rule; return figures and violations."""
    found = Violations()
    with psycopg.connect(db_url) as conn:
        jobs = (
            conn.cursor(row_factory=class_row(JobRow))
            .execute(
                "SELECT id, state, error, error_type, input, submitted_input, attempts, request_id, "
                "possible_duplicate_charges, output_path, output_sha256, output_bytes FROM jobs"
            )
            .fetchall()
        )
        events = (
            conn.cursor(row_factory=class_row(EventRow))
            .execute("SELECT job_id, from_state, to_state, version, reason FROM job_events ORDER BY id")
            .fetchall()
        )

        # The budget check's running total of finished money (batch_totals, kept by the
        # transactions that finish jobs; what submits of unknown outcome may have cost included)
        # must equal the sum over the finished jobs themselves,
        # whatever was killed, fenced off or rolled back on the way.
        totals = conn.execute(
            "SELECT b.id, t.finished_usd, COALESCE((SELECT SUM(CASE WHEN j.state = 'succeeded' "
            "THEN COALESCE(j.actual_usd, j.est_usd) ELSE COALESCE(j.actual_usd, 0) END "
            "+ j.ambiguous_usd) FROM jobs j "
            "WHERE j.batch_id = b.id AND j.state IN ('succeeded', 'failed', 'cancelled')), 0) "
            "FROM batches b LEFT JOIN (SELECT batch_id, SUM(finished_usd) AS finished_usd "
            "FROM batch_totals GROUP BY batch_id) t ON t.batch_id = b.id"
        ).fetchall()
    for batch_id, kept, summed in totals:
        if (kept or 0) != summed:
            found.fail(f"batch {batch_id}: finished money kept as {kept}, its finished jobs sum to {summed}")

    history: dict[str, list[EventRow]] = defaultdict(list)
    for ev in events:
        history[ev.job_id].append(ev)

    # ------------------------------------------------------------------ I1
    states: dict[str, int] = defaultdict(int)
    for job in jobs:
        states[job.state] += 1
        if job.state not in TERMINAL:
            found.fail(f"job {job.id} is not terminal: {job.state}")
        elif job.state in ("failed", "cancelled") and not job.error:
            found.fail(f"job {job.id} ended {job.state} without a reason")
        elif job.state == "succeeded" and not (job.output_path and job.output_sha256):
            found.fail(f"job {job.id} succeeded without a recorded output")
    lost = expected_jobs - sum(n for s, n in states.items() if s in TERMINAL)
    if len(jobs) != expected_jobs:
        found.fail(f"{len(jobs)} jobs stored, manifest has {expected_jobs}")

    # ------------------------------------------------------------------ history
    for job in jobs:
        chain = history.get(job.id, [])
        previous_state, previous_version = "pending", -1
        for ev in chain:
            if ev.from_state == ev.to_state:  # a note (a late answer's request): it moves nothing
                if ev.to_state != previous_state or ev.version < previous_version:
                    found.fail(f"job {job.id}: note in {ev.to_state} v{ev.version} after {previous_state}")
                continue
            moved = (ev.from_state, ev.to_state)
            late_proof = moved == ("failed", "queued") and "late proof" in (ev.reason or "")
            if previous_state in TERMINAL and not late_proof:
                found.fail(f"job {job.id}: event {ev.from_state}->{ev.to_state} after terminal")
            if ev.from_state != previous_state:
                found.fail(f"job {job.id}: event {ev.from_state}->{ev.to_state} after {previous_state}")
            if ev.version <= previous_version:
                found.fail(f"job {job.id}: version {ev.version} after {previous_version}")
            previous_state, previous_version = ev.to_state, ev.version
        if previous_state != job.state:
            found.fail(f"job {job.id}: history ends in {previous_state}, the job is {job.state}")

    # ------------------------------------------------------------------ I2
    by_hash: dict[str, JobRow] = {}
    for job in jobs:
        sent = job.submitted_input if job.submitted_input is not None else job.input
        by_hash[canonical_sha256(sent)] = job
    entries: dict[str, list[EntryRecord]] = defaultdict(list)
    unmatched = 0
    for entry in ledger["entries"]:
        matched = by_hash.get(entry["input_sha256"])
        if matched is None:
            unmatched += 1
            continue
        entries[matched.id].append(entry)
    if unmatched:
        found.fail(f"{unmatched} accepted submit(s) match no job's input")

    ambiguous_jobs = 0
    ambiguous_events = 0
    unheard = 0
    extra_accepted = 0
    duplicate_paid = 0
    reported = 0
    failures: list[FailureExample] = []
    for job in jobs:
        chain = history.get(job.id, [])
        unknown = sum(1 for ev in chain if ev.to_state == "submit_unknown")
        ambiguous_events += unknown
        ambiguous_jobs += bool(unknown)
        reported += job.possible_duplicate_charges
        reasons = " ".join(ev.reason or "" for ev in chain)
        mine = entries.get(job.id, [])
        known_failed = sum(
            1 for e in mine if e["request_id"] in reasons and e["outcome"] in KNOWN_FAILURE_OUTCOMES
        )
        extra = max(0, len(mine) - known_failed - 1)
        paid = sum(1 for e in mine if e["billed"])
        if unknown:  # fal's requests of this job other than the one it kept and counted
            unheard += sum(1 for e in mine if e["request_id"] != job.request_id)
        extra_accepted += extra
        duplicate_paid += max(0, paid - 1)
        if extra and not unknown:
            found.fail(
                f"job {job.id}: {len(mine)} accepted submits ({known_failed} known failures) "
                "and no ambiguous outcome recorded"
            )
        if extra > job.possible_duplicate_charges:
            found.fail(
                f"job {job.id}: {extra} extra accepted submit(s) but only "
                f"{job.possible_duplicate_charges} reported as possible duplicate charges"
            )
        if paid > 1 and paid - 1 > job.possible_duplicate_charges:
            found.fail(f"job {job.id}: paid {paid} times, reported {job.possible_duplicate_charges}")
        if job.state != "succeeded" and len(failures) < 10:
            failures.append(
                FailureExample(
                    job=job.id[:12],
                    error=job.error,
                    accepted_at_fal=len(mine),
                    history=[f"{ev.to_state}: {ev.reason}" for ev in chain],
                )
            )
        if job.state == "succeeded" and not mine:
            found.fail(f"job {job.id} succeeded but fal never accepted its input")

    # ------------------------------------------------------------------ I3
    outputs = {Path(j.output_path).resolve(): j for j in jobs if j.state == "succeeded" and j.output_path}
    for path, job in outputs.items():
        if not path.is_file():
            found.fail(f"job {job.id}: output {path} is missing")
        elif path.stat().st_size != job.output_bytes or _sha256(path) != job.output_sha256:
            found.fail(f"job {job.id}: output {path} differs from its recorded size/sha256")
        sidecar = path.with_suffix(".json")
        if path.is_file() and (not sidecar.is_file() or json.loads(sidecar.read_text())["job_id"] != job.id):
            found.fail(f"job {job.id}: sidecar {sidecar} missing or wrong")
    visible = [p for p in output_dir.rglob("*.mp4") if not p.name.startswith(".")]
    for path in visible:
        if path.resolve() not in outputs:
            found.fail(f"{path} is visible but is no succeeded job's output")
    leftovers = [p for p in output_dir.rglob(".*") if p.is_file()]

    # ------------------------------------------------------------------ I5
    # A request fal accepted whose answer no worker heard (a worker killed with its POST out, the
    # answer lost) is invisible: its job's slot comes back when the policy ends the job (`fail`:
    # at once, without a receiver to prove anything; an answer heard late is only noted on the
    # ended job) or sends it again (`resubmit`), while fal may still hold the request. Nothing can
    # count a request it did not know of when it counted, so the cap holds for the requests the
    # jobs kept: those of an ambiguous outcome beyond them come on top.
    allowed = max_outstanding + (ambiguous_events if policy == "resubmit" else unheard)
    if ledger["max_outstanding"] > allowed:
        found.fail(f"fal held {ledger['max_outstanding']} requests at once; the cap allows {allowed}")

    figures = InvariantFigures(
        jobs=expected_jobs,
        stored=len(jobs),
        states=dict(sorted(states.items())),
        lost=lost,
        accepted_submits=ledger["accepted"],
        billed=ledger["billed_count"],
        ambiguous_outcomes=ambiguous_events,
        jobs_with_ambiguous_outcome=ambiguous_jobs,
        extra_accepted_submits=extra_accepted,
        duplicate_paid_submissions=duplicate_paid,
        reported_possible_duplicates=reported,
        max_outstanding_at_fal=ledger["max_outstanding"],
        outstanding_cap=max_outstanding,
        late_answers_recorded=sum(1 for ev in events if (ev.reason or "").startswith("late answer")),
        hidden_temp_files_left=len(leftovers),
        events=len(events),
        unsuccessful_examples=failures,
    )
    return Findings(figures, found.messages)
