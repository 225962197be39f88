"""The database schema: batches, their jobs, each job's history, and uploaded files.

The job row is the system of record: Celery messages only carry a job id (as Celery's guide
advises: https://docs.celeryq.dev/en/stable/userguide/tasks.html#state), and every change of
state goes through :func:`jobs.store.transition`, a compare-and-set on ``state`` (and optionally
``version``, the fencing token).

Three column types exist because PostgreSQL and SQLite differ where it matters here:

* :class:`Money` — money and billing units must be exact. PostgreSQL stores ``NUMERIC(24, 9)``;
  SQLite has no decimal type (it would store a REAL), so there the value is an integer count of
  nano-units in a ``BIGINT``. Both come back as :class:`~decimal.Decimal`, and so does ``SUM()``
  over the column, because SQLAlchemy gives ``sum`` the column's own type.
* :class:`BigIntText` — fal's seeds are unsigned 64-bit and can exceed ``2**63 - 1``, the
  largest ``BIGINT``; they are stored as decimal text and come back as ``int``.
* :class:`UTCDateTime` — SQLite forgets time zones, so naive values are refused on the way in
  and every value comes back as an aware UTC datetime.

And one for what the database must never hold: :class:`KeyFreeText`, the type of the columns
that say why a job or a batch is where it is, masks FAL_KEY in every value written to them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from enum import StrEnum
from types import SimpleNamespace
from typing import Any, Protocol

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    Connection,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine

from jobs.clock import utcnow as utcnow  # the schema's clock, where it always was
from jobs.redaction import redact_text
from jobs.states import JobState

#: Digits kept after the decimal point for money and billing units (nano-dollars): exact for every
#: price times every unit count the registry can produce, with room for user price overrides.
MONEY_SCALE = 9
_QUANTUM = Decimal(1).scaleb(-MONEY_SCALE)


def new_id() -> str:
    """A random 32-hex-digit id for batches and jobs (uuid4): unguessable and globally unique."""
    return uuid.uuid4().hex


def _plain(value: Decimal) -> Decimal:
    """``0.450000000`` → ``0.45`` and ``100.000000000`` → ``100`` (never ``1E+2``)."""
    value = value.normalize()
    if value.as_tuple().exponent > 0:  # type: ignore[operator]
        value = value.quantize(Decimal(1))
    return value


class Money(TypeDecorator[Decimal]):
    """An exact decimal (USD or billing units) on both PostgreSQL and SQLite.

    Values are rounded half-even to :data:`MONEY_SCALE` places before they are stored, so both
    dialects hold the very same number. Floats are refused: they are how cents go missing.
    """

    impl = BigInteger
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(24, MONEY_SCALE))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, float) or not isinstance(value, Decimal | int):
            raise TypeError(f"money must be a Decimal or an int, not {type(value).__name__}")
        exact = Decimal(value).quantize(_QUANTUM, rounding=ROUND_HALF_EVEN)
        if dialect.name == "sqlite":
            return int(exact.scaleb(MONEY_SCALE))
        return exact

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            if isinstance(value, float):  # only if someone wrote a REAL behind our back
                raise TypeError("a money column holds a float; refusing to guess its exact value")
            return _plain(Decimal(int(value)).scaleb(-MONEY_SCALE))
        return _plain(Decimal(value))


class BigIntText(TypeDecorator[int]):
    """An integer of any size (fal seeds reach ``2**64 - 1``), stored as its decimal text."""

    impl = String(40)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an int, not {type(value).__name__}")
        return str(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        return None if value is None else int(value)


class UTCDateTime(TypeDecorator[datetime]):
    """A point in time, always aware and in UTC when read back, on every dialect."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError(f"timestamps must be timezone-aware datetimes, got {value!r}")
        utc: datetime = value.astimezone(UTC)
        # SQLite stores text without an offset; all values are UTC so text order is time order.
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment: datetime = value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class JSONDocument(TypeDecorator[Any]):
    """A JSON document: JSONB on PostgreSQL (compact, comparable), JSON text on SQLite.

    Python ``None`` is SQL NULL (not JSON ``null``), so ``IS NULL`` means "not set" everywhere.
    What ``JSON().with_variant(postgresql.JSONB(), "postgresql")`` would be, except that the
    PostgreSQL dialect (with its asyncpg, pg8000 and psycopg modules, about 20 ms of every
    process's start-up) is imported only when a PostgreSQL database uses the type.
    """

    impl = JSON(none_as_null=True)
    cache_ok = True
    hashable = False  # as JSON's: a dict or list value cannot be hashed (``Result.unique()``)

    def coerce_compared_value(self, op: Any, value: Any) -> Any:
        """The other side of an operator as JSON's own rule types it: a ``->`` or ``->>`` key is
        text or an integer, not a JSON document (a TypeDecorator's default would bind the key
        ``'inference_time'`` as JSONB, and PostgreSQL has no ``jsonb -> jsonb``)."""
        return self.impl_instance.coerce_compared_value(op, value)

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB(none_as_null=True))
        return dialect.type_descriptor(self.impl_instance)


class KeyFreeText(TypeDecorator[str]):
    """Text that never holds FAL_KEY: every value is masked as it is written
    (:func:`jobs.redaction.redact_text`: the key in every form this process knows, and anything
    of a fal key's shape or an ``Authorization`` value, whatever key it knows).

    The type of the columns that say why a job or a batch is where it is (``jobs.error``,
    ``job_events.reason``, ``batches.pause_reason``): their text is built from what a provider
    answered (an error's detail, a redirect's location) on many paths — a download's error
    never passes through the fal client's scrubbing — and is then shown by ``status``, ``run``,
    the dashboard and exports. Masked here, at the one place every path writes through (ORM,
    Core and the store's prepared statements all bind through the column's type), none can
    miss it. A text without anything to mask costs a few substring tests.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return redact_text(value) if isinstance(value, str) else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        """Masked as it is read too: a row written before this type masked on write (an error
        stored by an earlier version that echoed the key) shows no key in ``status``, the
        dashboard or an export either."""
        return redact_text(value) if isinstance(value, str) else value


#: The type of every JSON column.
JSONDoc = JSONDocument()

#: How many earlier item numbers a job keeps (:attr:`Job.earlier_items`): a download makes at
#: most this many ``stat`` calls looking for a video saved under one of them. The SQL that keeps
#: them (``jobs.store.creating._APPENDED_PG`` and ``_APPENDED_SQLITE``) says it literally.
EARLIER_ITEMS_KEPT = 8
#: In :attr:`Job.earlier_items`: numbers nobody recorded (a job sent before schema 0032 may have
#: been renumbered): its download lists the output folder (``jobs.outputs.under_another_item``).
#: Dropped when the job is sent as a new request (``jobs.store.record_send``): a file under such
#: a number predates that request, which a download never takes. No item number is negative.
EARLIER_ITEMS_UNKNOWN = -1


def _str_enum(enum_cls: type[StrEnum]) -> Enum:
    """Store a StrEnum by its value in a VARCHAR (no native enum: adding a state needs no DDL)."""
    return Enum(
        enum_cls,
        native_enum=False,
        create_constraint=False,
        length=32,
        values_callable=lambda cls: [member.value for member in cls],
        validate_strings=True,
    )


#: ``error_type`` of a job its batch's manifest no longer has, cancelled by the resubmit that left
#: it out because it was never sent (:func:`jobs.store.resubmit_jobs`): nothing of it reached fal.
#: Its estimate is no longer counted; the manifest bringing it back makes it ``pending`` again.
NOT_IN_MANIFEST = "not_in_manifest"

#: ``error_type`` of a job the user's cancel (``wanbatch cancel``, the dashboard's) ended, however
#: it ended: never sent, or its request cancelled at fal — whether fal answered ``client_cancelled``
#: or no longer knew the request (404). One type, as the deadline's is one (``deadline``), so that
#: ``status`` counts a cancel as one reason (sent and never sent apart) and exports group it as
#: one; fal's own word stays in the job's history (the event's reason).
USER_CANCELLED = "cancelled"

#: ``error_type`` of a job given back unsent, uncounted, because fal could not be reached from the
#: process that had it (``worker.steps.submit``): its ``next_attempt_at`` is that process's probe
#: backoff, which ends with its hold (:func:`jobs.store.end_fal_waits`).
FAL_UNREACHABLE = "fal_unreachable"


class BatchState(StrEnum):
    """Whether a batch's jobs may be submitted. Jobs have their own states (:class:`JobState`)."""

    ACTIVE = "active"
    PAUSED = "paused"
    """Submission stopped (e.g. the account was refused, or the budget is reached); resumable."""
    CANCELLED = "cancelled"
    """The user cancelled the batch: nothing more is submitted, queued requests are cancelled."""


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base; the naming convention gives every constraint a stable name for Alembic."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobSnapshot(SimpleNamespace):
    """A job's columns as one Core query read them (:func:`jobs.store.job_snapshots`), by name.

    What a step starts from when loading the job as an ORM object would cost more than the
    step's other reads (the conductor hands a completed job's download to a thread with one).
    Detached by nature: a step may note on it what it learned since (fal's result), which
    writes nothing; the store's verbs write."""


class BatchRecord(Protocol):
    """A batch's columns as read, by name: a loaded :class:`Batch`, or a Core row of its table
    (what a dispatch round reads on every completion, without building ORM objects)."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def schedule(self) -> dict[str, Any] | None: ...
    @property
    def priority(self) -> str: ...
    @property
    def paused_by_user(self) -> bool: ...
    @property
    def simulated(self) -> bool: ...
    @property
    def reuse_outputs(self) -> bool: ...
    @property
    def budget_max_usd(self) -> Decimal | None: ...
    @property
    def manifest_path(self) -> str: ...


class JobRecord(Protocol):
    """A job's columns as read, by name: a loaded :class:`Job`, or a Core row of its table (a
    dispatch round's claims). Read only: a move never updates it (see :meth:`jobs.store.Fence.moved`)."""

    @property
    def id(self) -> str: ...
    @property
    def batch_id(self) -> str: ...
    @property
    def job_key(self) -> str: ...
    @property
    def content_key(self) -> str | None: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def input(self) -> dict[str, Any]: ...
    @property
    def source_files(self) -> dict[str, Any] | None: ...
    @property
    def state(self) -> JobState: ...
    @property
    def version(self) -> int: ...
    @property
    def attempts(self) -> int: ...
    @property
    def est_usd(self) -> Decimal: ...
    @property
    def price_table(self) -> dict[str, Any] | None: ...
    @property
    def actual_usd(self) -> Decimal | None: ...
    @property
    def ambiguous_usd(self) -> Decimal: ...
    @property
    def submitted_at(self) -> datetime | None: ...
    @property
    def rerun_of(self) -> str | None: ...
    @property
    def item_index(self) -> int: ...
    @property
    def est_billing_units(self) -> Decimal: ...
    @property
    def actual_billing_units(self) -> Decimal | None: ...


#: The columns :class:`JobRecord` names: all a dispatch round's claim reads of a job
#: (:func:`jobs.store.claim_due`). Every use of a claimed job is typed by the protocol, so mypy
#: holds them to these; the other forty-odd columns (fal's answers, outputs, media) cost the claim
#: most of its CPU to read and convert, for nothing.
JOB_RECORD_FIELDS: frozenset[str] = frozenset(
    name for name, member in vars(JobRecord).items() if isinstance(member, property)
)


class Batch(Base):
    """One submitted manifest. Totals are computed from its jobs, never stored twice."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    manifest_path: Mapped[str] = mapped_column(Text)
    #: The machine ``manifest_path`` is a path of (:mod:`jobs.machine`: ``HOST@MACHINE-ID``, or
    #: ``HOST``): on a database several machines share, a path alone does not say whose file it
    #: is, so a manifest of the same name from another machine is not taken for this one moved
    #: (:func:`jobs.batches.refuse_name_taken`). NULL for batches stored before it was kept: unknown.
    #: Deferred, as ``manifest_text``: read by a submit and by ``status``/``pause``/``cancel``
    #: (:func:`jobs.store.list_batches` loads it with the rows), never on the hot paths that load
    #: a batch.
    manifest_host: Mapped[str | None] = mapped_column(Text, deferred=True)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: The batch this one re-runs (``wanbatch rerun``), if any.
    parent_batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"))
    budget_max_usd: Mapped[Decimal | None] = mapped_column(Money())
    state: Mapped[BatchState] = mapped_column(_str_enum(BatchState), default=BatchState.ACTIVE)
    pause_reason: Mapped[str | None] = mapped_column(KeyFreeText())
    #: When the batch may be sent (``schedule:`` in the manifest): ``Schedule.as_json()`` of
    #: :mod:`jobs.schedule`, NULL when it may be sent at any time. Read it with
    #: :func:`jobs.store.batch_schedule`.
    schedule: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)
    #: fal queue priority of every submit of this batch: ``normal`` or ``low``.
    priority: Mapped[str] = mapped_column(String(8), default="normal", server_default="normal")
    #: ``wanbatch pause``: no new submits until ``wanbatch resume``. A flag beside ``state``, not a
    #: state, so it neither hides nor clears a pause fal's refusal of the account caused.
    paused_by_user: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    #: ``reuse_outputs:`` in the manifest: a pinned-seed job equal to an already succeeded one
    #: (same job key, any batch) takes that output instead of being sent. Opt-in, as fal may
    #: change a model behind an endpoint; a re-submit applies the manifest's current value.
    reuse_outputs: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    #: Run with ``--simulate``: its requests went to the bundled simulator, never to fal. Only a
    #: ``--simulate`` run processes it (workers never send it, a plain ``run`` refuses it), and a
    #: ``--simulate`` run never touches a batch sent to fal: simulated videos never mix with paid ones.
    simulated: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    #: The manifest file's text as submitted (a re-submit stores the new text): provenance that
    #: survives the file being edited or deleted. NULL for batches stored before it was kept.
    #: Deferred: read only for provenance (re-submit, rerun), never on the hot paths that load a batch.
    manifest_text: Mapped[str | None] = mapped_column(Text, deferred=True)
    #: How ``wanbatch rerun`` made this batch (:func:`jobs.rerun.rerun_options`): ``failed_only``,
    #: ``new_seeds``, ``max_usd`` (as given, or null), ``vary`` (each option's text) and, only
    #: when given, ``pay_again`` (``--pay-again``), for the
    #: command an ``hf`` export's dataset card shows. NULL for a batch a manifest made, and for
    #: reruns stored before it was kept. Deferred, as ``manifest_text``: provenance only.
    rerun_options: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, deferred=True)

    def __repr__(self) -> str:
        return f"<Batch {self.id[:8]} {self.name!r} {self.state.value}>"


class Job(Base):
    """One request to one endpoint; the unit that is submitted, tracked, paid for and downloaded."""

    __tablename__ = "jobs"
    __table_args__ = (
        # Submitting the same manifest twice adds nothing: the key is a hash of the resolved job.
        UniqueConstraint("batch_id", "job_key"),
        # Claims read these in order (oldest first) and stop at their limit: see store.claim_jobs.
        # (ix_jobs_batch_id_state_order, which on PostgreSQL also covers the totals: below.)
        Index("ix_jobs_state_order", "state", "created_at", "item_index", "id"),
        # (The due retries, the request ids and the finish times: partial indexes, below.)
        # reuse_outputs looks up a succeeded job with the same key in any batch.
        Index("ix_jobs_job_key", "job_key"),
        # … or a stored job whose key is an older rule's (content_key): see migration 0024.
        Index("ix_jobs_content_key", "content_key"),
        # The dashboard pages a batch's jobs in item order (keyset): see jobs.listing.
        Index("ix_jobs_batch_id_item_order", "batch_id", "item_index", "variant", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"))
    job_key: Mapped[str] = mapped_column(String(64))
    #: The key its input gives now (:func:`jobs.manifest.keys.stored_content_key`), only when
    #: ``job_key`` is another: a job stored before schema 0022 whose data URI's key another job
    #: of its batch took (its twin: the same image under another spelling, or as a file), or
    #: stored before schema 0034 with a whole-number float whose new key its twin took
    #: (``guide_scale: 5.0`` beside ``5``). Set by migrations 0024 and 0034 alone;
    #: ``reuse_outputs`` looks jobs up by either. None for every other.
    content_key: Mapped[str | None] = mapped_column(String(64))
    #: The key of the manifest's job this one stands for, when that is not ``job_key``: the
    #: manifest spells the same request otherwise, an endpoint default written out or left out
    #: since this job was sent (:func:`jobs.store.creating._match_written_defaults`). A resubmit
    #: finds it by that key as it finds any job by its own (:func:`jobs.store.resubmit_jobs`):
    #: nothing is stored for it, nothing sent. ``job_key`` and ``input`` stay what was sent.
    #: None for every other job (schema 0043).
    manifest_key: Mapped[str | None] = mapped_column(String(64))
    item_index: Mapped[int] = mapped_column(Integer)
    #: The matrix combination's index within its item (0 for an item without a matrix).
    variant: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: The item numbers this job had before a resubmit of an edited manifest changed its
    #: ``item_index`` (:func:`jobs.store.resubmit_jobs`), most recent last, each once, the last
    #: :data:`EARLIER_ITEMS_KEPT` of them; NULL when it never had another. Output file names hold
    #: the number, so a video an earlier try saved before such a change waits under an old one:
    #: the download looks for it under exactly these names, one ``stat`` each
    #: (``worker.steps.download._downloaded_before``), instead of listing its batch's whole
    #: output folder. Numbers, not a time: a resubmit's clock and a worker's need not agree.
    #: :data:`EARLIER_ITEMS_UNKNOWN` stands for numbers nobody recorded: a job unfinished and
    #: sent when schema 0032 added the column (it may have been renumbered before), whose
    #: download lists the folder as every download did before — until the job is sent as a new
    #: request, which drops it (``jobs.store.record_send``).
    earlier_items: Mapped[list[int] | None] = mapped_column(JSONDoc)
    #: The manifest its batch was last submitted from no longer has this job (its key): set and
    #: cleared by every resubmit (:func:`jobs.store.resubmit_jobs`), the one place that knows.
    #: Such a job is numbered after the manifest's items; one never sent is ``cancelled`` there
    #: (``error_type`` :data:`NOT_IN_MANIFEST`), one that may have reached fal stays. ``run``'s
    #: exit code, ``status``'s advice and ``rerun --failed-only`` judge the other jobs: the
    #: manifest's. False for a job stored before schema 0039 until its manifest is submitted again.
    #: The database's default alone (no Python one): an INSERT names the column only when it
    #: sets it, as a database one schema older has none.
    not_in_manifest: Mapped[bool] = mapped_column(Boolean, server_default="0")
    endpoint: Mapped[str] = mapped_column(String(255))
    #: The resolved input as validated (local image paths still local).
    input: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    #: The exact JSON sent to fal, image references as sent (data URI or upload URL).
    submitted_input: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)

    state: Mapped[JobState] = mapped_column(_str_enum(JobState), default=JobState.PENDING)
    #: Fencing token: +1 on every transition and every claim; a stale writer's UPDATE matches 0 rows.
    version: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Which API key the current or last attempt was sent with: a 16-hex-digit SHA-256 prefix,
    #: never the key. The outstanding cap is per key, as fal's account limits are.
    api_key_id: Mapped[str | None] = mapped_column(String(32))
    #: The origin (``scheme://host:port``) of the fal queue the current or last attempt was sent
    #: to. Only a process configured with that queue asks about the request (status, stream,
    #: result, cancel): any other fal never had it and answers 404. NULL: sent before schema
    #: 0035, followed by any process as before.
    fal_origin: Mapped[str | None] = mapped_column(String(255))
    #: Failed downloads of this job's output so far; the output is paid for, so a failed
    #: download is retried (never regenerated) until ``WANBATCH_DOWNLOAD_ATTEMPTS``.
    download_attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Submits fal refused with 429 (rate limited) that were *not* counted as attempts: a refusal
    #: is not the job's failure, but after ``worker.steps.submit.FREE_RATE_LIMIT_REFUSALS`` of
    #: them each further one counts, so a storm that never ends still ends the job.
    #: ``server_default``: jobs stored before the column existed.
    rate_limited_submits: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Of ``attempts``, the requests fal ended in its queue before they started because the
    #: batch's window closed (its start timeout, or our cancel): sent, so counted in
    #: ``attempts`` (the export shows them), but never run nor billed, so not counted against
    #: ``WANBATCH_MAX_ATTEMPTS`` (:attr:`counted_attempts`): the next window sends the job again.
    #: ``server_default``: jobs stored before the column existed (their attempts left out such
    #: requests).
    unstarted_requests: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: When the job is next due (retry backoff, next status poll); NULL means "now".
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    request_id: Mapped[str | None] = mapped_column(String(255))
    gateway_request_id: Mapped[str | None] = mapped_column(String(255))
    status_url: Mapped[str | None] = mapped_column(Text)
    response_url: Mapped[str | None] = mapped_column(Text)
    cancel_url: Mapped[str | None] = mapped_column(Text)

    seed: Mapped[int | None] = mapped_column(BigIntText())
    actual_prompt: Mapped[str | None] = mapped_column(Text)
    output_path: Mapped[str | None] = mapped_column(Text)
    output_sha256: Mapped[str | None] = mapped_column(String(64))
    output_bytes: Mapped[int | None] = mapped_column(BigInteger)
    provider_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)
    provider_output: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)
    #: The downloaded video as probed (``worker.probe.MediaInfo.as_json``); NULL before success.
    media: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)
    #: What the video got wrong against the request, in words; NULL when it matched.
    media_mismatch: Mapped[str | None] = mapped_column(Text)
    #: The job whose output this one took instead of being sent (``reuse_outputs``); NULL if sent.
    reused_from: Mapped[str | None] = mapped_column(String(32))
    #: The parent batch's job this one repeats (``wanbatch rerun``; NULL for a manifest's job):
    #: ``wanbatch diff`` pairs a rerun's jobs with their originals by it, whatever ``--vary``
    #: did to their inputs and variant numbers.
    rerun_of: Mapped[str | None] = mapped_column(String(32))
    #: Per media field: ``{"source": path or URL as the manifest named it, "sha256": hex or null}``,
    #: so an exported row stays traceable without the inline data URI.
    source_files: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)
    #: SHA-256 of the endpoint's registry entry (``jobs/endpoints/<id>.yaml`` text) at submit.
    registry_sha256: Mapped[str | None] = mapped_column(String(64))
    #: The pricing entry the estimate used (``EndpointSpec.pricing`` as JSON).
    price_table: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)

    est_billing_units: Mapped[Decimal] = mapped_column(Money())
    est_usd: Mapped[Decimal] = mapped_column(Money())
    actual_billing_units: Mapped[Decimal | None] = mapped_column(Money())
    actual_usd: Mapped[Decimal | None] = mapped_column(Money())
    #: Submissions resent after an ambiguous outcome: the provider may have billed each twice.
    #: Counted when the resend's POST is recorded as sent (:func:`jobs.store.take_lease` with
    #: ``sending``), not when the resend is decided: a job cancelled before it never resent.
    possible_duplicate_charges: Mapped[int] = mapped_column(Integer, default=0)
    #: The attempt (a value of ``attempts``) that resends a submit whose outcome stayed unknown
    #: (``WANBATCH_SUBMIT_UNKNOWN_POLICY=resubmit``), set when the resend is decided; NULL when
    #: none was. Its POST, once recorded as sent, counts in ``possible_duplicate_charges``; a
    #: POST of it given back unsent uncounts it, and the same attempt number sent later counts.
    resend_attempt: Mapped[int | None] = mapped_column(Integer)
    #: Requests of this job fal proved (by a signed webhook) it accepted and ran besides the one
    #: the job kept: each was billed. ``server_default``: jobs stored before the column existed.
    confirmed_duplicate_charges: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: The estimates of this job's submits whose outcome stayed unknown: each left
    #: ``submit_unknown`` without proof (failed, resent or cancelled), and fal may have accepted
    #: and billed it; and the estimate of a request fal lost after it started running
    #: (``request_not_found``) or left at fal unfollowed (``abandoned_other_key``). Counted as
    #: spent (the budget holds against the worst case) and shown apart as "possibly billed".
    #: ``server_default``: jobs stored before the column existed.
    ambiguous_usd: Mapped[Decimal] = mapped_column(Money(), default=Decimal(0), server_default="0")

    error: Mapped[str | None] = mapped_column(KeyFreeText())
    error_type: Mapped[str | None] = mapped_column(String(255))

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: When the job's last request was sent: fal's answer accepting it arrived (or a webhook
    #: proved it), or, for a submit whose outcome stayed unknown, its POST went out
    #: (:attr:`sent_at`). NULL for a job never sent. The day of it is the one the daily budget
    #: counts the job's money under (:class:`BatchTotals`).
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: When the current attempt's POST went out (or may have): written with ``submitted_input``
    #: right before it, cleared when the next attempt is claimed or the POST is given back (fal
    #: never accepted it: :func:`jobs.store.give_back`). A submit whose answer is lost takes it
    #: as its ``submitted_at`` (:func:`jobs.store.transition`).
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: When the start timeout the current attempt's POST carried (``X-Fal-Request-Start-Timeout``,
    #: the batch's window end or deadline as of its sending) ends: fal never starts the request
    #: after it, and ends it unstarted (``request_timeout``, not billed). Written with
    #: :attr:`sent_at` by every POST (NULL too), and kept until the next POST: a resend dropped
    #: for its earlier attempt's proof keeps that attempt's request and timeout. A POST given
    #: back (fal refused it, or it never went out: :func:`jobs.store.give_back`) leaves the
    #: timeout of the request still possibly at fal — the earlier attempt's, for a resend of an
    #: unknown submit (:attr:`earlier_start_timeout_at`) — and NULL when there is none. NULL
    #: when the POST carried none (no window or deadline)
    #: or the job was sent before schema 0030. What a ``request_timeout`` is judged by
    #: (:func:`worker.steps.schedule.start_timeout_expired`), not the batch's schedule now.
    start_timeout_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: The :attr:`start_timeout_at` the job held when its current POST was recorded
    #: (:func:`jobs.store.record_send`), which that POST replaced: the earlier attempt's, whose
    #: request may still be at fal when the POST resends a submit whose outcome stayed unknown.
    #: :func:`jobs.store.give_back` puts it back when fal refuses the POST (429) or it never goes
    #: out, so a proof of that attempt adopted afterwards (:func:`jobs.store.adopt_before_resend`)
    #: keeps the timeout it was sent with. Read only then (schema 0031).
    earlier_start_timeout_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: When fal reported the request completed.
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: When the job reached a terminal state here.
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    @property
    def counted_attempts(self) -> int:
        """The attempts ``WANBATCH_MAX_ATTEMPTS`` counts: every request sent, less those fal
        ended unstarted at a window's end (:attr:`unstarted_requests`)."""
        return max(0, self.attempts - (self.unstarted_requests or 0))

    def __repr__(self) -> str:
        return f"<Job {self.id[:8]} #{self.item_index} {self.state.value} v{self.version}>"


class JobEvent(Base):
    """One transition of one job, appended in the same transaction as the change it records."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    from_state: Mapped[JobState | None] = mapped_column(_str_enum(JobState))
    to_state: Mapped[JobState] = mapped_column(_str_enum(JobState))
    #: The job's version after the transition.
    version: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(KeyFreeText())
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)
    worker: Mapped[str | None] = mapped_column(String(255))


def _partial_index(name: str, *columns: Any, where: ColumnElement[bool]) -> Index:
    """An index of the rows for which ``where`` holds, on SQLite and PostgreSQL alike.

    PostgreSQL is given the predicate as it creates the index (``create_all``; the migrations
    spell theirs out), not as ``postgresql_where=`` here: SQLAlchemy would import its PostgreSQL
    dialect to check that keyword, about 20 ms of every process's start-up, SQLite's included.
    """
    index = Index(name, *columns, sqlite_where=where)

    def on_postgresql(target: Index, connection: Connection, **_: Any) -> None:
        if connection.dialect.name == "postgresql":
            target.dialect_options["postgresql"]["where"] = where

    event.listen(index, "before_create", on_postgresql)
    return index


def _covering_on_postgresql(name: str, *columns: Any, include: Sequence[Any]) -> Index:
    """An index of ``columns`` that on PostgreSQL also holds ``include`` in its entries
    (``INCLUDE``: not keys, only there to be read), so that a query reading only those columns
    is an index-only scan, never a visit of every row. SQLite has no such clause: there it is
    the index of ``columns`` alone. Set as it is created, as :func:`_partial_index` sets its
    predicate (no PostgreSQL-only keyword here: that would load SQLAlchemy's PostgreSQL dialect
    at every process's start). https://www.postgresql.org/docs/current/indexes-index-only-scans.html
    """
    index = Index(name, *columns)

    def on_postgresql(target: Index, connection: Connection, **_: Any) -> None:
        if connection.dialect.name == "postgresql":
            target.dialect_options["postgresql"]["include"] = [column.name for column in include]

    event.listen(index, "before_create", on_postgresql)
    return index


#: Claims read a batch's jobs of a state through this index in order (oldest first) and stop at
#: their limit: see store.claim_jobs. On PostgreSQL its entries also hold every column ``status``
#: and the dashboard's batch list sum per batch and state (``jobs.listing.totals_of_batches``),
#: so that ``status`` with no batch reads this index, not every job's row (2.4 s for 400,000
#: jobs of 2,000 batches, ten times the index's pages: a job's row holds its input and its
#: results). No index more for a job's moves to write: every move changes ``state``, a key of
#: this one, so each rewrote its entry already (migration 0052).
STATE_ORDER_INCLUDES = (
    Job.est_usd,
    Job.actual_usd,
    Job.ambiguous_usd,
    Job.error_type,
    Job.not_in_manifest,
    Job.possible_duplicate_charges,
    Job.confirmed_duplicate_charges,
    Job.media_mismatch,
    Job.rate_limited_submits,
    Job.submitted_at,
    Job.finished_at,
)
_covering_on_postgresql(
    "ix_jobs_batch_id_state_order",
    Job.batch_id,
    Job.state,
    Job.created_at,
    Job.item_index,
    Job.id,
    include=STATE_ORDER_INCLUDES,
)

#: A resubmit looks up, a chunk of the manifest's keys at a time, the jobs that stand for a
#: spelling of theirs (:attr:`Job.manifest_key`): few jobs have one, so only those are indexed.
_partial_index(
    "ix_jobs_batch_id_manifest_key", Job.batch_id, Job.manifest_key, where=Job.manifest_key.is_not(None)
)

#: /metrics counts ambiguous submits (see store.count_events_into) without scanning every event.
_partial_index(
    "ix_job_events_submit_unknown", JobEvent.job_id, where=JobEvent.to_state == JobState.SUBMIT_UNKNOWN
)

#: /metrics keeps the sums of finished jobs between scrapes and counts the changes of finished
#: jobs (store.count_finished_changes) without scanning every event: the rare events of a job
#: that was finished (a late proof taking it back, a note on its books).
_FROM_FINISHED = JobEvent.from_state.in_([JobState.CANCELLED, JobState.FAILED, JobState.SUCCEEDED])
_partial_index("ix_job_events_from_finished", JobEvent.id, where=_FROM_FINISHED)


#: The budget checks sum the few pending jobs an earlier attempt billed, a batch's or the day's,
#: without reading the many that never ran (store.batch_committed_usd and committed_usd_today,
#: whose queries repeat these terms literally: SQLite uses a partial index only then). Covering
#: both queries, so SQLite, which has no statistics to go by, prefers it to the indexes that
#: would read every pending job of the batch (ix_jobs_batch_id_state_order) or of the database.
#: A pending job counts when an earlier attempt was billed, or may have been (``ambiguous_usd``).
_PENDING_BILLED = (Job.state == JobState.PENDING) & (Job.actual_usd.is_not(None) | (Job.ambiguous_usd > 0))
_partial_index(
    "ix_jobs_pending_billed",
    Job.state,
    Job.batch_id,
    Job.submitted_at,
    Job.actual_usd,
    Job.ambiguous_usd,
    where=_PENDING_BILLED,
)


#: A dispatch round finds the batches with jobs to send — ``pending``, or waiting for a retry —
#: through this index (store.due._due_batches: one look per such batch, a loose index scan),
#: whatever the number of batches whose jobs are all finished. Its queries repeat the term
#: literally (``state IN ('pending', 'retry_wait')``): SQLite uses a partial index only then.
_partial_index(
    "ix_jobs_to_send_batch_id", Job.batch_id, where=Job.state.in_([JobState.PENDING, JobState.RETRY_WAIT])
)

#: The states whose jobs are looked up by when their wait ends (``next_attempt_at``): the due
#: retries (store.due._due_retries, a claim for a retry reads only the due ones, not every retry
#: still backing off) and the unknown submits waiting for fal's proof (listing.proof_waits).
#: Only their jobs are in the two indexes below (migration 0049): every move of a job rewrote an
#: entry of each, two B-tree pages, five times a job, while hardly any job ever waits so. Spelt
#: as an OR of equalities, not ``IN``: SQLite sees ``state = 'retry_wait'`` (or a parameter bound
#: to it) imply only that form, and its queries repeat the literal state (store.due).
WAITING_STATES = (JobState.RETRY_WAIT, JobState.SUBMIT_UNKNOWN)
_WAITING = (Job.state == WAITING_STATES[0]) | (Job.state == WAITING_STATES[1])
#: Both partial on SQLite only. PostgreSQL keeps every job in them: its planner reads the
#: unfinished jobs of /metrics (``state IN`` the unfinished states, store.MetricsScope) through
#: these narrow indexes, and without them chose, on a small table, to read every job through
#: another (and the CPU a write costs there is the server's, not a wanbatch process's).
Index(
    "ix_jobs_batch_id_state_next_attempt_at",
    Job.batch_id,
    Job.state,
    Job.next_attempt_at,
    sqlite_where=_WAITING,
)
Index("ix_jobs_state_next_attempt_at", Job.state, Job.next_attempt_at, sqlite_where=_WAITING)

#: A request is looked up by its id, never by the lack of one; and /metrics reads the jobs
#: finished lately, not all of them (store.MetricsScope): the jobs without a request or not
#: finished are in neither index (every comparison implies the column is not NULL, on both
#: dialects), so a job's first request id and its finish each write one entry, not also the
#: removal of its NULL one (migration 0049).
_partial_index("ix_jobs_request_id", Job.request_id, where=Job.request_id.is_not(None))
_partial_index("ix_jobs_finished_at", Job.finished_at, where=Job.finished_at.is_not(None))

#: The events of jobs adopted from the outputs folder (``jobs.store.outcomes.mark_adopted``), so
#: ``status`` counts them without reading every event of every succeeded job (migration 0047).
#: The reason is spelt out: SQLite uses a partial index only for a query that repeats the term.
ADOPTED_REASON = "adopted from outputs on disk"
_partial_index("ix_job_events_adopted", JobEvent.job_id, where=JobEvent.reason == ADOPTED_REASON)


class BatchTotals(Base):
    """Money of a batch's finished jobs, summed as they finish, per day they were submitted.

    The budget caps are checked against everything committed — a batch's (``budget.max_usd``)
    and the day's across batches (``WANBATCH_DAILY_BUDGET_USD``) — on every dispatch round that
    claims a job. Summing that over the jobs each time cost O(jobs) per completion (55 ms for a
    100,000-job batch; the daily sum read every job ever stored). Finished jobs never change
    again, so their share is kept here, added by the transaction that finishes them
    (``store.transition``), and only the few unfinished jobs are summed
    (``store.batch_committed_usd``, ``store.committed_usd_today``).

    Keyed by batch *and* UTC day of the job's last submit (``""`` for a job never sent): a
    batch's total is its few rows, the day's is that day's rows, and no single row is written
    by every finishing job of every batch. A table of its own, not columns of ``batches``: its
    rows are written last in a transaction, in key order, and by nothing else, so their locks
    never join a lock cycle with statements that update batches.
    """

    __tablename__ = "batch_totals"
    __table_args__ = (Index("ix_batch_totals_day", "day"),)

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"), primary_key=True)
    #: ``YYYY-MM-DD`` (UTC) of the finished jobs' last submit; ``""``: never submitted.
    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    #: Σ of what those jobs were billed (for a succeeded job with no reported cost, its
    #: estimate), as :class:`store.BatchMoney` counts spent money.
    finished_usd: Mapped[Decimal] = mapped_column(Money(), default=Decimal(0), server_default="0")


#: :attr:`ConductorHeartbeat.scope` of a process that works on every batch (a distributed worker).
EVERY_BATCH = "*"
#: :attr:`ConductorHeartbeat.scope` of a ``wanbatch serve``: it works on no batch, but its actions
#: write (a rerun, a cancel), so an upgrade of the schema waits for it as for any process
#: (:func:`jobs.db.live_processes`). No batch id (32 hex digits) is spelled so: every reader of
#: a batch's heartbeats passes it by.
SERVE_SCOPE = "serve"
#: :attr:`ConductorHeartbeat.scope` of a distributed worker that does not lead the ticks: it
#: sends and downloads (its leases say so only while it holds one), so an upgrade of the schema
#: waits for it, and names it (:func:`jobs.db.live_processes`). Its beat tells ``status`` nothing
#: of any batch (the leader's :data:`EVERY_BATCH` does).
WORKER_SCOPE = "worker"


class ConductorHeartbeat(Base):
    """A process that works on batches says so here, every few seconds, while it does.

    Jobs waiting at fal hold no lease, so nothing else in the database tells a batch that an
    embedded ``run`` (or the distributed workers' tick leader) is still following it from one
    whose run was stopped — by Ctrl-C, a closed SSH session, a crash. ``status`` reads these
    rows: a batch nothing has beaten for within :data:`jobs.listing.PROCESSING_STALE_SECONDS`
    gets no forecast, and says what would go on with it. A process that stops cleanly deletes
    its rows; one that dies leaves them to go stale.
    """

    __tablename__ = "conductor_heartbeats"

    #: The process (``host:pid:``…, as lease owners are named).
    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    #: The batch it works on, or :data:`EVERY_BATCH`.
    scope: Mapped[str] = mapped_column(String(32), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: The workers' leader could not reach the broker (Redis, RabbitMQ) since then: its
    #: hand-offs fail, so submits and downloads wait (``status`` says so); None: it answers.
    broker_down_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: The account-wide limits this process dispatches with, its own (its settings, not what it
    #: applies): the outstanding caps, the submit rates and the jitter allowance, with its API key
    #: id and fal queue origin (:func:`jobs.account_limits.published`). Every dispatching process
    #: applies the strictest of the live ones sharing its key and queue
    #: (:func:`jobs.account_limits.strictest`), and ``doctor`` compares them. None: a process that
    #: dispatches nothing (a ``serve``, a worker that does not lead), or an earlier version's row.
    limits: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)


class FalHold(Base):
    """A process that cannot connect to fal at all holds its submits: since when, and when it
    tries again (:mod:`worker.steps.fal_reach`).

    Written when a hold begins, renewed at most every
    :data:`~jobs.listing.FAL_HOLD_RENEW_SECONDS` while the process keeps probing (its own
    heartbeat: never once per probe), deleted the moment fal answers it. ``status`` and the
    dashboard show a hold only while it is renewed (within
    :data:`~jobs.listing.FAL_HOLD_STALE_SECONDS`) and its process is not known to have ended:
    the row of one that died holding goes stale by itself.
    """

    __tablename__ = "fal_holds"

    #: The process (``host:pid:``, the prefix of its lease owners).
    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    #: The batch whose submits it holds (an embedded ``run``'s), or :data:`EVERY_BATCH` (a
    #: distributed worker's).
    scope: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: Since when fal has not answered it.
    since: Mapped[datetime] = mapped_column(UTCDateTime())
    #: When its next submit may go, as the probe; and the pause between probes then (doubling
    #: with each failed probe, up to a minute).
    next_probe_at: Mapped[datetime] = mapped_column(UTCDateTime())
    pause_seconds: Mapped[float] = mapped_column(Float)
    #: The last connect failure, in short.
    error: Mapped[str] = mapped_column(String(255), default="")
    #: When the process last wrote this row (its renewal).
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime())


class HeldSubmission(Base):
    """A submit fal accepted whose request id the database refused to record, held in the
    journal of the process that has it (:mod:`worker.steps.unrecorded`): no other process
    calls its outcome unknown, nor sends it again, while this mark is renewed.

    Not on the job's own row: that is the write the database refused (a trigger, a constraint,
    a value out of range). The holder writes the mark when the record is refused and renews it
    every :data:`worker.steps.held.RENEW_SECONDS` while it holds the submission; recording it
    deletes the mark. A mark not renewed for :data:`worker.steps.held.STALE_SECONDS` is a
    holder's that is gone: it holds nothing (:func:`jobs.store.held_job_ids`), and the lease
    rules apply to its job as to any other.
    """

    __tablename__ = "held_submissions"

    #: The job (no foreign key: deleting a batch never waits on, nor fails for, a mark).
    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: The process that holds it (``host:pid:``).
    owner: Mapped[str] = mapped_column(String(255))
    #: The request id fal gave it, for ``status`` and whoever reads the table.
    request_id: Mapped[str] = mapped_column(String(255))
    #: When the holder last wrote this row (its renewal).
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime())


class KeyRefusal(Base):
    """fal's "not found" (or refusal) of a request sent with another API key, when asked with
    the key ``key_id`` (:mod:`worker.steps.other_key`): a key of another fal account, or one
    since revoked, is told the request does not exist. Written where a poll, a download or a
    cancel got that answer, so that every process sees it — a ``run`` watching the workers, a
    ``cancel`` — not only the one that asked: the run ends (exit 2) once only such requests are
    left, ``status`` names the way out, and ``cancel --abandon-other-key`` writes off only these.

    A mark holds while the job still waits on that very request with that very key
    (``Job.request_id`` = ``request_id``, ``Job.api_key_id`` = ``sent_with``): a request fal
    answers later (``Job.api_key_id`` becomes the asking key's, :func:`jobs.store.followed_with_key`,
    which also deletes the marks) or a new attempt leaves a stale mark, ignored; a move of the
    job out of :data:`jobs.store.REFUSABLE_STATES` (finished, or back to be sent anew) deletes
    its marks (:func:`jobs.store.transition`), so the table holds only jobs that may need them.
    """

    __tablename__ = "key_refusals"

    #: The job (no foreign key: deleting a batch never waits on, nor fails for, a mark).
    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: The key (its id, a hash, never the key) fal refused the request to.
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: The request fal refused, and the key id the job recorded it was sent with then.
    request_id: Mapped[str] = mapped_column(String(255))
    sent_with: Mapped[str] = mapped_column(String(32))
    #: When fal first refused it to that key.
    refused_at: Mapped[datetime] = mapped_column(UTCDateTime())


class SubmitRate(Base):
    """The submit rate's token bucket of one API key, shared by every process that dispatches.

    Each dispatch round takes its tokens here, inside the round's transaction (rounds of every
    process take turns: :func:`jobs.store.lock_dispatch`), so ``WANBATCH_SUBMIT_RATE`` holds for
    all of them together: two ``wanbatch run`` side by side, or one beside the workers' leader,
    claimed twice the rate when each kept the bucket in its own memory.

    The bucket paces *claims*, and holds a second's submits: what paces the POSTs themselves
    when processes share only the database is :class:`SubmitPace`.
    """

    __tablename__ = "submit_rate"

    #: ``Job.api_key_id``: fal's limits are per account.
    api_key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: Whole and partial submits the bucket holds as of ``stamp`` (never below zero: each
    #: process keeps a 429's pause in its own bucket).
    tokens: Mapped[float] = mapped_column(Float)
    stamp: Mapped[datetime] = mapped_column(UTCDateTime())


class SubmitPace(Base):
    """The submit pacing of one API key shared through the database, for processes that share
    it without a limiter Redis (:mod:`worker.steps.shared_pacing`).

    :class:`SubmitRate`'s bucket paces *claims*, and holds a second's submits: on top of its
    refill, processes that pace their POSTs in their own memory could still send up to about
    twice the rate in one second. So, without a limiter Redis, while another live process shares
    the database (``shared_until``), every submit takes its slot here right before its POST
    (``pace_at``: :func:`jobs.store.take_pace_slot`), and a 429 any process hears holds them all
    (``hold_until``). The three are epoch seconds on the database's clock (PostgreSQL's
    ``clock_timestamp()``; on SQLite, where every process is on the file's host, theirs).

    A row of its own, not :class:`SubmitRate`'s: each dispatch round writes the bucket early and
    keeps its row locked through its claims until it commits, and a slot taken there waited for
    the whole round. Dispatch only reads this row (a plain ``SELECT``, which takes no lock).
    """

    __tablename__ = "submit_pace"

    #: ``Job.api_key_id``: fal's limits are per account.
    api_key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: The next POST's slot, GCRA's theoretical arrival time (:func:`jobs.store.take_pace_slot`);
    #: NULL: none taken yet.
    pace_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Until when fal's 429 holds every process's submits of the key (:func:`jobs.store.hold_submits`);
    #: NULL or past: no pause.
    hold_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Until when processes share this key's pacing (:func:`jobs.store.share_pacing`): each
    #: process without a limiter Redis that sees another live one renews it at its heartbeat.
    shared_until: Mapped[float | None] = mapped_column(Float, nullable=True)


class InstanceSecret(Base):
    """A random secret of this database, made once and shared by every process that uses it.

    ``webhook``: the key of the token each ``fal_webhook`` URL carries
    (:func:`worker.steps.webhooks.binding_token`). fal signs the webhooks of *every* account with
    the same keys, so a signature proves only that fal sent a delivery, not that the request was
    ours: any fal user could name one of our jobs in a ``fal_webhook`` URL of their own. The
    token proves the URL (its job id and attempt) came from one of our submits. It lives here,
    not in a setting, because the submitting processes and the receiver share nothing else.
    """

    __tablename__ = "instance_secrets"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    #: Hex of random bytes (:func:`secrets.token_hex`).
    value: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DashboardSessionRevocation(Base):
    """A dashboard login ended by ``POST /logout`` (:mod:`web.auth`): its session id is refused
    by every ``serve`` of this database until the session would have expired anyway.

    A login cookie is signed and carries its issue time, so it is refused once 30 days old with
    no row at all; a logout must end it sooner, for every process that might be shown it (two
    ``serve`` behind one proxy share nothing else). One row per logout, not per login: a login
    writes nothing, and each logout first clears the rows whose sessions are past their age
    (:func:`jobs.store.revoke_dashboard_session`).
    """

    __tablename__ = "dashboard_session_revocations"

    #: The session's random id, as its cookie carries it (hex).
    session_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: When the session would have expired (issued + 30 days): the row is useless after it.
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Upload(Base):
    """A local file already uploaded to fal's storage: each distinct content is uploaded once
    per fal (its REST API's origin), and reused until ``expires_at``.

    A file of one fal's storage means nothing to another (a simulator's loopback URL sent to
    real fal, or a URL the other fal never stored), hence the origin in the key.
    """

    __tablename__ = "uploads"

    #: ``scheme://host:port`` of ``WANBATCH_FAL_REST_URL`` when it was uploaded (never credentials).
    origin: Mapped[str] = mapped_column(String(255), primary_key=True)
    content_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    provider_url: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: When the provider may have deleted the file; a later job re-uploads after this.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookDelivery(Base):
    """One verified webhook from fal, stored before it is answered: the receiver's inbox.

    fal repeats deliveries and sends them out of order (even before the submit's answer was
    stored), so a delivery is stored once per distinct ``(request_id, body_sha256)`` (repeats
    are counted in ``repeats``) and applied to its job later, by the receiver or by the tick,
    with the same compare-and-set moves the poller makes. ``job_id`` and ``attempt`` come from
    the query of the ``fal_webhook`` URL the submit gave fal (fal calls that exact URL); they are
    not a foreign key: a delivery for a job this database does not know is kept and ignored.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("request_id", "body_sha256"),
        Index("ix_webhook_deliveries_processed_at", "processed_at"),
        Index("ix_webhook_deliveries_job_id", "job_id"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    request_id: Mapped[str] = mapped_column(String(255))
    #: SHA-256 of the raw body as received (what fal's signature covers).
    body_sha256: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(64))
    attempt: Mapped[int | None] = mapped_column(Integer)
    #: fal's ``status``: ``OK`` or ``ERROR``.
    status: Mapped[str] = mapped_column(String(16))
    #: The body, with FAL_KEY scrubbed should it ever appear in it.
    body: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: When it was applied to its job (or found to need nothing); NULL: still to apply.
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: What applying it did (``completed``, ``adopted``, ``duplicate-charge``, ``ignored: …``).
    outcome: Mapped[str | None] = mapped_column(String(255))
    #: How many more times fal delivered the very same body.
    repeats: Mapped[int] = mapped_column(Integer, default=0)
    #: The fal account fal signed it for (``X-Fal-Webhook-User-Id``), checked again when it is
    #: applied or read as proof (:class:`FalAccount`); NULL: stored before schema 0037, as before.
    user_id: Mapped[str | None] = mapped_column(String(255))


class FalAccount(Base):
    """The fal account an API key's webhooks are signed for, learnt once (trust on first use).

    fal signs the webhooks of every account with the same keys and names the account in each
    (``X-Fal-Webhook-User-Id``, covered by the signature). The first verified delivery of a
    request whose id a submit with that key recorded from fal's own answer (the job's request)
    is provably ours (fal gives each account's requests ids of their own): its account is pinned
    here, and from then on a delivery naming an attempt sent with that key, signed for another
    account, is refused (``worker.steps.accounts.account_verdict``), even with the right token in its
    URL. ``WANBATCH_FAL_USER_ID``, when set, names the accounts instead, and nothing is learnt.

    Pinned per key *and signer*: an account learnt from deliveries verified against one JWKS
    (``wanbatch simulator``'s, say, with the real ``FAL_KEY``) never judges those verified against
    another's keys (fal's), which would otherwise be refused for good.
    """

    __tablename__ = "fal_accounts"

    #: ``Job.api_key_id``: a 16-hex-digit SHA-256 prefix of the key, never the key.
    api_key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: Whose keys verified the deliveries: the origin (``scheme://host:port``) of
    #: ``WANBATCH_WEBHOOK_JWKS_URL`` (``worker.steps.accounts.signer_of``).
    signer: Mapped[str] = mapped_column(String(255), primary_key=True)
    #: fal's user id for the account, as its webhooks name it.
    user_id: Mapped[str] = mapped_column(String(255))
    #: The request whose delivery proved it.
    request_id: Mapped[str] = mapped_column(String(255))
    learnt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookInboxTotals(Base):
    """The webhook inbox's counters, kept as deliveries are stored and applied (one row, ``id``
    1), so that ``/metrics`` reads one row instead of every stored delivery
    (:func:`jobs.store.delivery_counts`), and pruning applied deliveries
    (:func:`jobs.store.prune_deliveries`) takes nothing off them. One short update in the
    transaction that stores (or settles) a delivery: the receiver's own, never a job's."""

    __tablename__ = "webhook_inbox_totals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    #: Distinct deliveries ever stored.
    stored: Mapped[int] = mapped_column(BigInteger, default=0)
    #: Repeats of stored deliveries (the very same body again).
    repeats: Mapped[int] = mapped_column(BigInteger, default=0)
    #: Deliveries applied as ``ignored: …``.
    ignored: Mapped[int] = mapped_column(BigInteger, default=0)


class ClockMark(Base):
    """The latest time any ticking process read on the database's timeline (one row, ``id`` 1):
    SQLite's only (its timeline is this host's clock). A tick that reads a time more than
    :data:`jobs.clock.STEP_SECONDS` before it finds the clock stepped back, brings every wait
    forward by the difference and sets the mark to its own time, in one ``BEGIN IMMEDIATE``
    transaction (:func:`jobs.store.catch_up_with_timeline`): the next process to tick finds
    nothing to do, so the waits move once, however many processes share the file."""

    __tablename__ = "clock_marks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    #: The high-water mark of the timeline, as ticks read it.
    high_water: Mapped[datetime] = mapped_column(UTCDateTime())


#: A job as a step holds it: loaded whole by the ORM, or read as a :class:`JobSnapshot`.
JobView = Job | JobSnapshot
