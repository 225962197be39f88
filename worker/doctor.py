"""``wanbatch doctor``: is this host set up to run batches? Each check as a plain function.

A new user's first question is rarely "how do I render" but "why does nothing happen": a key
fal refuses, a broker nobody listens on, an output folder owned by root, a receiver fal cannot
reach. Each of those used to surface only after money was at stake (or never: a run that waits
forever on workers that do not exist). The doctor asks each piece once, cheaply, and says for
each what is wrong and what to do about it:

- **configuration**: every ``WANBATCH_*`` setting (and ``FAL_KEY``) parses;
- **database**: ``WANBATCH_DATABASE_URL`` answers and its schema is the one this wanbatch
  expects (:data:`jobs.db.SCHEMA_HEAD`); read only: the doctor never migrates, and opens a
  SQLite file without creating or changing it (:func:`jobs.db.read_engine`): one not there yet
  is only found creatable; and a SQLite database's disk is not full (the file system's free
  space, :func:`_full_sqlite_disk`: on a full disk reading works and nothing the doctor may do
  without leaving a trace would fail); and no other PostgreSQL session holds, or queues for, a
  lock on one of wanbatch's tables that its reads or its writes would wait for
  (:func:`jobs.db.lock_holders`: ``ACCESS EXCLUSIVE``; ``SHARE`` to ``EXCLUSIVE`` but on
  ``alembic_version``), whether anyone waits yet or not (weaker locks, and other tables', block
  nothing wanbatch does);
- **broker**: with ``WANBATCH_BROKER_URL``, the broker answers, a Redis broker takes a write (a
  key of its own that expires within a second; a read-only replica or a Redis out of memory does
  not, and fails in the words a worker's first start refuses it with:
  :func:`worker.broker_outage.write_refused`), and ``wanbatch worker`` processes answer a ping
  (none: nothing would be processed); embedded mode needs neither. The line names the workers
  that answer (their Celery node names, the first :data:`NAMED_WORKERS`) and, from their
  records on the limiter's Redis (:mod:`worker.peers`), when each was last seen; ``--json``
  lists them all (:attr:`Check.workers`);
- **provider**: one cheap authenticated call to ``WANBATCH_FAL_QUEUE_URL`` — the status of a
  request id that cannot exist. The key is accepted when fal says "not found" (404), refused on
  401, the account refused on 403; it costs nothing and queues nothing. The bundled simulator
  answers exactly so. A 404 saying the *application* is not found (``Application '…' not
  found``, fal's words for a path that names no app) is no answer about a request: the URL is
  not fal's queue, or has a path before the app's (:func:`_application_not_found`);
- **output storage**: ``WANBATCH_OUTPUT_DIR`` (folder or ``s3://``) takes a probe object
  (:meth:`jobs.output_store.OutputStore.check_writable`, what ``run`` checks at start-up); a
  local folder not there yet is only found creatable, not created, and its disk to have room
  for that probe (:func:`_full_output_disk`);
- **receiver**: with ``WANBATCH_WEBHOOK_URL``, the ``wanbatch serve`` behind it answers
  ``GET /healthz`` from this host, fal's signing keys can be fetched from
  ``WANBATCH_WEBHOOK_JWKS_URL`` here, and the receiver says (``/healthz``) it can verify
  signatures (without keys it refuses every delivery) and serves this database (its fingerprint
  is this database's: a receiver of another one refuses every delivery, its webhook secret is
  not the one this database's submits keyed their tokens with);
- **limiter**: the submit-rate limiter's Redis (``WANBATCH_LIMITS_URL``, else a Redis broker)
  answers the limiter's own check script and takes its write (a read-only replica does not),
  as ``run`` and ``worker`` check at start-up
  (:func:`worker.limits.probe_limiter`); embedded without one, the limiter is in process.
  A Redis (the limiter's, a Redis broker) whose ``maxmemory`` is set with a ``maxmemory-policy``
  other than ``noeviction`` fails its check (:mod:`worker.redis_memory`): evicted, the limiter's
  keys hold every submit back, and a broker's queued messages are lost.

The doctor creates nothing: no database file or folder, no output folder, no probe left (the
broker's and the limiter's write each set a key of wanbatch's own that expires within a second).
A check is ``ok``, ``fail`` or ``skip`` (does not apply), with a ``detail`` and, unless ok, a
``fix``. No check raises and none prints ``FAL_KEY``: its value is only ever sent, to the queue
URL, in the ``Authorization`` header.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from jobs.digits import ascii_int
from jobs.url_secrets import mask_urls, masked_url

if TYPE_CHECKING:
    from pathlib import Path

    from jobs.db import LockHolder, SqliteFile
    from jobs.output_store import OutputStore
    from jobs.settings import Settings
    from jobs.store import WorkersBeat

Status = Literal["ok", "fail", "skip"]

#: A request id no fal request can have: asking for its status is free and proves the key.
PROBE_REQUEST_ID = "00000000-0000-4000-8000-000000000000"
#: The endpoint whose queue the provider check asks (any registered one would do).
PROBE_ENDPOINT = "fal-ai/wan-i2v"
#: Seconds each network check may take (the broker check adds its own thread's margin).
TIMEOUT = 10.0
#: The most one check's whole exchange may take: connecting, then the headers, then the body.
EXCHANGE_SECONDS = 3 * TIMEOUT
#: The most of the receiver's ``/healthz`` answer that is read: ``wanbatch serve``'s is a few
#: hundred bytes; whatever answers there instead must not fill the memory.
HEALTHZ_MAX_BYTES = 64 * 1024
KEYS_URL = "https://fal.ai/dashboard/keys"
#: How many of the workers that answer the broker check names in its line (then "and N more");
#: ``doctor --json`` lists every one.
NAMED_WORKERS = 5


@dataclass(frozen=True, slots=True)
class Check:
    """One check's verdict: what was looked at, what was found, and what to do about it."""

    name: str
    status: Status
    detail: str
    fix: str | None = None
    #: The broker check's workers that answer a ping: each one's ``node`` (Celery node name) and
    #: ``last_seen_seconds_ago`` (its record on the limiter's Redis; None: none read). None: the
    #: check did not ask (no broker, or the broker did not answer); the other checks have none.
    workers: list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``doctor --json``'s ``checks`` entries): ``workers`` only where asked."""
        found = asdict(self)
        if self.workers is None:
            del found["workers"]
        return found


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", _said(detail))


def _fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "fail", _said(detail), _said(fix))


def _skip(name: str, detail: str) -> Check:
    return Check(name, "skip", _said(detail))


def _said(text: str) -> str:
    """A check's detail or fix as printed. Every URL masked once more, whatever said it: a
    setting's own validation error, a client's exception (each check masks the URLs it names
    itself, too). And no doubled full stop where a quoted message's own stop met the sentence
    around it (``refused.. Start it``): each check quotes others' words through :func:`clause`
    (:func:`_first_line`), and this is the last line for every check
    (:func:`jobs.printable.single_stops`)."""
    from jobs.printable import single_stops

    return single_stops(mask_urls(text))


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, escaped (:func:`jobs.printable.one_line`): a
    server's words may be in it (a database's, a proxy's), and must not drive the terminal; and
    without the full stop that ends it (:func:`jobs.printable.clause`)."""
    from jobs.printable import clause, first_line

    return clause(first_line(exc, limit=300)) or type(exc).__name__  # its full stop off: the sentence goes on


# --------------------------------------------------------------------------- the checks


def check_configuration(*, simulate: bool = False) -> tuple[Check, Settings | None]:
    """Every setting parses (the same validation every command does first), and the proxy and
    certificate variables are ones httpx can use (what the commands that talk to fal check, for
    what they reach: with ``simulate``, as ``run --simulate``, nothing beyond loopback). One
    that makes only some requests fail (:func:`jobs.http_environment.environment_verdict`) is
    said in the check's detail, which stays ``ok``."""
    from jobs.errors import WanbatchError
    from jobs.settings import get_settings

    get_settings.cache_clear()
    try:
        settings = get_settings()
    except WanbatchError as exc:
        return (
            _fail(
                "configuration",
                str(exc),
                "fix the variable named above (README: Configuration); the other checks need it",
            ),
            None,
        )
    from jobs.http_environment import environment_verdict, refused_line

    # What run, worker and serve refuse to start with, for the URLs doctor reaches too (the
    # receiver's, and fal's signing keys, only with a webhook URL: :func:`check_receiver`).
    reaches = [] if simulate else [settings.fal_queue_url, settings.fal_rest_url]
    if settings.webhook_url and not simulate:
        reaches += [settings.webhook_url, settings.webhook_jwks_url]
    refused, warnings = environment_verdict(reaches=reaches)
    if refused:
        return (
            _fail(
                "configuration",
                refused_line(refused),
                "fix the variable named above (README: Configuration); the other checks need it",
            ),
            None,
        )
    mode = "distributed (WANBATCH_BROKER_URL)" if settings.broker_url else "embedded (no broker)"
    said = "".join(f"; warning: {warning}" for warning in warnings)
    return _ok("configuration", f"settings valid; {mode}{said}"), settings


def check_database(settings: Settings) -> Check:
    """The database answers, and its schema is this wanbatch's (read only: nothing migrated,
    and for SQLite no file or folder created: a database not there yet is fine when the first
    command could create it)."""
    from sqlalchemy.pool import NullPool

    from jobs import db
    from jobs.clock import utcnow
    from jobs.errors import WanbatchError
    from jobs.fs import CURRENT_FOLDER_GONE, current_folder_gone_fix, lost_with_current_folder

    name = "database"
    where = db.safe_url(settings.database_url)
    try:
        url = db.normalize_url(settings.database_url)
        target = db.sqlite_file(url)
        if target is not None:
            if lost_with_current_folder(target.path):  # what every command refuses (exit 2)
                return _fail(
                    name, f"{where}: {CURRENT_FOLDER_GONE}", current_folder_gone_fix("WANBATCH_DATABASE_URL")
                )
            missing = _missing_sqlite_file(name, where, target)
            if missing is not None and missing.status == "fail":
                return missing
            if (full := _full_sqlite_disk(name, where, target)) is not None:
                return full
            if missing is not None:
                return missing
        connect_args = {"connect_timeout": int(TIMEOUT)} if url.get_backend_name() == "postgresql" else {}
        engine = db.read_engine(url, poolclass=NullPool, connect_args=connect_args)
    except WanbatchError as exc:
        return _fail(name, str(exc), "fix WANBATCH_DATABASE_URL")
    live: list[db.LiveProcess] = []
    now = utcnow()
    try:
        heads, tables = db._current_schema(engine)  # read only: the doctor never migrates
        if heads and heads != {db.SCHEMA_HEAD}:  # what holds an upgrade back
            with engine.connect() as conn:
                live = db.live_processes(conn, tables, now=now)
        # Another session's lock that wanbatch's reads or writes of one of its tables would wait
        # for (a `LOCK TABLE jobs` left open in psql, a migration's ALTER TABLE, a plain CREATE
        # INDEX), whether or not anyone waits yet: in silence, for as long as it stays.
        locks = db.lock_holders(engine)
        # Every write refused (submit, run, the workers, the receiver): reachable is not enough.
        read_only = db.read_only_reason(engine) if target is None else db.sqlite_read_only_reason(url)
    except WanbatchError:  # the bound of _guarded: its line
        raise
    except Exception as exc:  # unreachable, refused, no such database, wrong password …
        if db.is_lock_timeout(exc):
            # A read that waited out WANBATCH_DATABASE_LOCK_WAIT (a migration's uncommitted ALTER
            # TABLE, a `LOCK TABLE alembic_version`): the server answered, so not "cannot
            # connect": the bound's line naming the session, and its fix (in _guarded).
            raise db.database_locked_error(settings.database_url, engine) from None
        return _fail(
            name,
            f"{where}: cannot connect: {_first_line(exc)}",
            "start the database or fix WANBATCH_DATABASE_URL (host, port, user, database name)",
        )
    finally:
        engine.dispose()
    if heads == {db.SCHEMA_HEAD}:
        if absent := db._missing_tables(tables):  # what every command refuses (exit 2)
            return _fail(
                name,
                f"{where}: not a wanbatch database, or its tables were dropped "
                f"(no table {', '.join(absent)})",
                "point WANBATCH_DATABASE_URL at wanbatch's database, or at a new, empty one",
            )
        if locks:
            more = f", and {len(locks) - 1} more such lock(s)" if len(locks) > 1 else ""
            return _fail(
                name,
                f"{where}: reachable, schema {db.SCHEMA_HEAD} (current), but locked by another "
                f"session: {locks[0].said()}{more}; {_what_waits(locks[0])}",
                _locked_fix(locks[0].pid),
            )
        if read_only is not None:
            return _read_only(name, f"{where}: reachable, schema {db.SCHEMA_HEAD} (current)", read_only)
        return _ok(name, f"{where}: reachable, schema {db.SCHEMA_HEAD} (current)")
    if foreign := db.foreign_tables(heads, tables):  # what every command refuses (exit 2)
        return _fail(name, f"{where}: {db.foreign_database(foreign)}", db.FOREIGN_DATABASE_FIX)
    revisions = [ascii_int(h, max_digits=12) for h in heads]
    numbers = [n for n in revisions if n is not None]
    # A newer wanbatch's schema, before a read-only one: every command refuses it, writable or
    # not (exit 2), and a database this user may write would fix nothing.
    if len(numbers) < len(revisions) or max(numbers, default=0) >= int(db.SCHEMA_HEAD):
        return _fail(name, f"{where}: {db.newer_schema(heads)}", db.NEWER_SCHEMA_FIX)
    if read_only is not None:  # neither the first command's schema nor the next one's upgrade
        return _read_only(
            name, f"{where}: reachable, schema {', '.join(sorted(heads)) or 'none yet'}", read_only
        )
    if not heads:
        return _ok(name, f"{where}: reachable, empty (the first command creates the schema)")
    if live:  # what every command refuses (exit 2)
        return _fail(
            name,
            f"{where}: schema {', '.join(sorted(heads))}, and this wanbatch needs {db.SCHEMA_HEAD}; "
            f"{db.live_processes_said(live, now=now)}",
            db.live_processes_fix(live),
        )
    return _ok(
        name,
        f"{where}: reachable, schema {', '.join(sorted(heads))} (the next command upgrades it to "
        f"{db.SCHEMA_HEAD})",
    )


def _read_only(name: str, found: str, reason: str) -> Check:
    """The verdict on a database that answers but refuses every write (``reason``, from
    :func:`jobs.db.read_only_reason`): ``status``, ``export`` and a dashboard would work, but
    ``submit``, ``run``, the workers and the receiver refuse to (exit 2, 503), so not "ok"."""
    return _fail(
        name,
        f"{found}, but read-only: {reason}; submit, run, the workers and the webhook receiver "
        "refuse to write to it (status, export and the dashboard's pages still read it)",
        "point WANBATCH_DATABASE_URL at a database this user may write (SQLite: no mode=ro, a file "
        "and folder it may write; PostgreSQL: not a standby, default_transaction_read_only off)",
    )


def _missing_sqlite_file(name: str, where: str, target: SqliteFile) -> Check | None:
    """The verdict on a SQLite database file that is not there (None: it is, go and read it).

    Opening it would create it (and its folder), which the doctor does not do: instead it says
    whether the first command could, by looking only (:func:`jobs.fs.creatable`)."""
    from jobs.fs import creatable, file_kind, is_missing, os_reason, shown_path

    path = target.path.absolute()
    shown = shown_path(path)
    kind = file_kind(path)
    if not isinstance(kind, OSError) or target.path.is_symlink():
        return None  # there (or a link): reading it says what it is
    if not is_missing(kind):
        return _fail(
            name,
            f"{where}: cannot look at {shown}: {os_reason(kind)}",
            "make the database's folder searchable for this user, or fix WANBATCH_DATABASE_URL",
        )
    if not target.creates:
        return _fail(
            name,
            f"{where}: {shown} does not exist, and mode=ro (or rw) opens only an existing database",
            "point WANBATCH_DATABASE_URL at the existing database, or drop mode= so that the first "
            "command creates it",
        )
    parent = file_kind(path.parent)
    if not target.makes_folders and isinstance(parent, OSError) and is_missing(parent):
        # SQLite's URI form: SQLite creates the file, not its folder.
        why: str | None = f"its folder {shown_path(path.parent)} does not exist (SQLite creates no folder)"
    else:
        _under, why = creatable(path)
    if why is not None:
        return _fail(
            name,
            f"{where}: the database file {shown} does not exist and cannot be created: {why}",
            "make the folder named above a folder this user can write to, or point "
            "WANBATCH_DATABASE_URL at one",
        )
    return _ok(name, f"{where}: not created yet: the first command creates it at {shown}")


def _sqlite_free_bytes(target: SqliteFile) -> int | None:
    """The bytes left for this user beside the SQLite database ``target`` when too few for any
    command that writes (:data:`jobs.db.NO_ROOM_BYTES`: its disk is full); None when there is room
    or that cannot be told."""
    from jobs.db import NO_ROOM_BYTES, free_bytes_beside

    free = free_bytes_beside(target.path)
    return free if free is not None and free < NO_ROOM_BYTES else None


#: Why the checks that read the database beside their own (the workers', the receiver's, the
#: limiter's) leave a SQLite database whose disk is full unopened: a connection to a WAL database
#: there leaves the ``-wal`` and ``-shm`` it could not grow behind (the doctor creates nothing),
#: and the database check says what is wrong.
_SQLITE_DISK_FULL = "its disk is full (see database)"


def _sqlite_closed(target: SqliteFile | None) -> bool:
    """Whether the checks beside the database's leave the SQLite database ``target`` unopened:
    its disk is full (:data:`_SQLITE_DISK_FULL`). Not SQLite (None): opened."""
    return target is not None and _sqlite_free_bytes(target) is not None


def _full_sqlite_disk(name: str, where: str, target: SqliteFile) -> Check | None:
    """The verdict on a SQLite database whose disk is full (None: there is room).

    Reading succeeds on a full disk, and so would a write rolled back before its commit (SQLite
    keeps it in memory): only a commit meets the full disk, and the doctor commits nothing. So
    it asks the file system holding the database how much this user may still write there: less
    than :data:`jobs.db.NO_ROOM_BYTES` is what every command refuses ("the database's disk is
    full")."""
    from jobs.fs import shown_path
    from jobs.printable import size_text

    free = _sqlite_free_bytes(target)
    if free is None:
        return None
    folder = shown_path(target.path.absolute().parent)
    return _fail(
        name,
        f"{where}: the database's disk is full ({size_text(free)} free for {folder}): every "
        "command that writes refuses to start",
        "free space on that disk (or point WANBATCH_DATABASE_URL at a disk with room), then run "
        "`wanbatch doctor` again",
    )


def check_clock(settings: Settings) -> Check:
    """This host's clock against the database's (PostgreSQL's ``clock_timestamp()``): wanbatch
    stamps and compares every lease, retry and heartbeat on the database's clock
    (:mod:`jobs.clock`), so a skew is said, not a failure; except past what fal allows a signed
    webhook (:data:`~worker.fal.webhooks.TIMESTAMP_TOLERANCE`), judged by this host's own clock.
    SQLite's database is on this host: its clock is this host's."""
    from sqlalchemy.pool import NullPool

    from jobs import clock, db
    from jobs.errors import WanbatchError
    from worker.fal.webhooks import TIMESTAMP_TOLERANCE

    name = "clock"
    try:
        url = db.normalize_url(settings.database_url)
    except WanbatchError:
        return _skip(name, "not checked: WANBATCH_DATABASE_URL cannot be used (see database)")
    if url.get_backend_name() != "postgresql":
        return _skip(name, "the database is on this host: wanbatch uses this host's clock")
    try:
        engine = db.read_engine(url, poolclass=NullPool, connect_args={"connect_timeout": int(TIMEOUT)})
        try:
            with engine.connect() as conn:
                db.measure_clock(conn.connection.dbapi_connection, say=False)  # said here
        finally:
            engine.dispose()
    except Exception:  # what the database check says
        return _skip(name, "not checked: the database cannot be reached (see database)")
    offset = clock.offset()
    if offset is None:
        return _skip(name, "not checked: the database did not say its time")
    if abs(offset) > TIMESTAMP_TOLERANCE:
        return _fail(
            name,
            f"{clock.skew_text(offset)}; wanbatch uses the database's, but fal's signed webhooks are "
            f"refused when this host's clock is more than {clock.span(TIMESTAMP_TOLERANCE)} off",
            "set this host's clock right (NTP: `timedatectl set-ntp true`, or chrony)",
        )
    if abs(offset) > clock.SKEW_WARN_SECONDS:
        return _ok(name, f"{clock.skew_text(offset)}; wanbatch uses the database's")
    return _ok(
        name, f"this host's clock agrees with the database's (within {clock.span(clock.SKEW_WARN_SECONDS)})"
    )


def check_broker(settings: Settings) -> Check:
    """With a broker: it answers, a Redis broker takes a write (as a worker's first start checks,
    :func:`worker.broker_outage.check_writable`: a read-only replica or a full Redis is a
    configuration to fix, said as the worker says it), at least one ``wanbatch worker`` answers
    a ping, and the workers work on this database (their leader's heartbeat in it is fresh).
    Workers that answer but never beat here serve another database — two deployments sharing
    one Redis, a typo in one host's URL — and a ``run`` here would wait forever. A Redis broker
    that may evict keys (:mod:`worker.redis_memory`) fails too, whatever the workers: a queued
    message evicted is lost."""
    verdict = _check_broker(settings)
    url = settings.broker_url
    if verdict.status == "skip" or not url or not url.startswith(("redis://", "rediss://")):
        return verdict
    from worker.redis_memory import BROKER_LOSES, FIX, eviction_at
    from worker.redis_memory import problem as eviction_problem

    evicts = eviction_problem(eviction_at(url), BROKER_LOSES)
    if evicts is None:
        return verdict
    said = f"{verdict.detail}; {'but' if verdict.status == 'ok' else 'and'} its Redis {evicts}"
    fix = FIX if verdict.status == "ok" else f"{verdict.fix}; {FIX}"
    return replace(verdict, status="fail", detail=_said(said), fix=_said(fix))


def _check_broker(settings: Settings) -> Check:
    """:func:`check_broker` but for the broker's memory policy."""
    from jobs.db import safe_url as db_safe_url
    from jobs.errors import WanbatchError
    from jobs.listing import leader_stalled, stalled_leader_text
    from jobs.store import WorkersBeat
    from worker.broker_outage import write_refused
    from worker.running import beating_here, check_broker, worker_nodes

    name = "broker"
    if not settings.broker_url:
        return _skip(name, "no WANBATCH_BROKER_URL: embedded mode, `wanbatch run` does the work itself")
    where = masked_url(settings.broker_url)
    try:
        check_broker(settings, timeout=3.0)
    except WanbatchError as exc:
        return _fail(name, str(exc), "start the broker or fix WANBATCH_BROKER_URL")
    # Before the workers are asked: asking them writes, and a broker that refuses writes failed
    # as "asking its workers failed" with the fix "run `wanbatch doctor` again".
    refused = write_refused(settings.broker_url)
    if refused is not None:
        return _fail(
            name, refused.cause(), f"{refused.fix()}: `wanbatch worker` refuses to start with this one"
        )
    nodes = worker_nodes(settings, timeout=2.0)
    if nodes is None:
        return _fail(name, f"{where} answers, but asking its workers failed", "run `wanbatch doctor` again")
    if not nodes:
        return replace(
            _fail(
                name,
                f"{where} answers; no `wanbatch worker` does: nothing would be processed",
                "start `wanbatch worker` (same WANBATCH_BROKER_URL and WANBATCH_DATABASE_URL) on a host",
            ),
            workers=[],
        )
    pinged = f"{where} answers; {len(nodes)} worker(s) answer a ping"
    seen = _last_seen(settings, nodes)
    named = f"; the workers: {_named(nodes, seen)}"
    listed = [{"node": node, "last_seen_seconds_ago": _rounded(seen.get(node))} for node in nodes]
    beats = _workers_beat(settings)
    beat = beats.leader_seen if isinstance(beats, WorkersBeat) else beats
    if isinstance(beat, str):  # the database could not be read: its own check says why
        verdict = _ok(name, f"{pinged} (whether they work on this database is not known: {beat}){named}")
    elif isinstance(beats, WorkersBeat) and leader_stalled(beats):
        verdict = _fail(
            name,
            f"{pinged}, and work on this database {db_safe_url(settings.database_url)}, but "
            f"{stalled_leader_text(beats)}{named}",
            "find the frozen worker (the process named above) and resume it (kill -CONT, fg) or stop "
            "it; if the other workers' logs say their database role may not end its session, give "
            "the workers one role (or grant theirs pg_signal_backend and pg_read_all_stats)",
        )
    elif beat is None or not beating_here(beat):
        last = "none ever" if beat is None else f"the last {_ago(beat)} ago"
        verdict = _fail(
            name,
            f"{pinged}, but none works on this database {db_safe_url(settings.database_url)}: no "
            f"worker heartbeat in it within the last minute ({last}), so nothing would be processed{named}",
            "the workers likely use another WANBATCH_DATABASE_URL (another deployment sharing this "
            "broker, or a typo on one host): give them and this host the same WANBATCH_DATABASE_URL, "
            "or each deployment a broker of its own (another Redis database number); a worker started "
            "just now beats within seconds: run `wanbatch doctor` again",
        )
    else:
        verdict = _ok(name, f"{pinged}, and work on this database (heartbeat {_ago(beat)} ago){named}")
    return replace(verdict, workers=listed)


def _last_seen(settings: Settings, nodes: list[str]) -> dict[str, float | None]:
    """How long ago (s, by Redis' clock) each worker of ``nodes`` last wrote its record for this
    database on the limiter's Redis (:func:`worker.peers.last_seen`; None: it has none). Nothing
    when there is no Redis limiter, it does not answer (the limiter check says so), or this
    database cannot be read (which records are its own is then not known)."""
    from worker.peers import last_seen, read_records

    database = _database_fingerprint(settings)
    if isinstance(database, _Unknown):
        return {}
    return last_seen(read_records(settings, database), nodes)


def _named(nodes: list[str], seen: dict[str, float | None]) -> str:
    """The first :data:`NAMED_WORKERS` of ``nodes``, each with when it was last seen when the
    records were read (``seen``), then how many more (``doctor --json`` lists them all)."""

    def one(node: str) -> str:
        if node not in seen:
            return node
        age = seen[node]
        if age is None:
            return f"{node} (no record on the limiter's Redis for this database)"
        return f"{node} (last seen {_seconds_ago(age)} ago)"

    shown = ", ".join(one(node) for node in nodes[:NAMED_WORKERS])
    more = len(nodes) - NAMED_WORKERS
    return f"{shown} and {more} more" if more > 0 else shown


def _rounded(age: float | None) -> float | None:
    return None if age is None else round(age, 1)


def _seconds_ago(age: float) -> str:
    from jobs.schedule import format_age

    return format_age(max(0.0, age))


def _workers_beat(settings: Settings) -> WorkersBeat | str | None:
    """The workers' latest heartbeats in this database, their tick leader's and the others'
    (None: none), read only — no file, folder or table created; or why they could not be read.
    A SQLite file not there yet has none."""
    from sqlalchemy.pool import NullPool

    from jobs import db, store

    try:
        url = db.normalize_url(settings.database_url)
        target = db.sqlite_file(url)
        if target is not None and not target.path.exists():
            return None  # no workers write to a database that does not exist
        if _sqlite_closed(target):
            return f"cannot open the database: {_SQLITE_DISK_FULL}"
        connect_args = {"connect_timeout": int(TIMEOUT)} if url.get_backend_name() == "postgresql" else {}
        engine = db.read_engine(url, poolclass=NullPool, connect_args=connect_args)
    except Exception as exc:
        return f"cannot open the database: {_first_line(exc)}"
    try:
        with db.read_scope(engine) as session:
            return store.workers_beats(session)
    except Exception as exc:
        if db.is_schema_missing(exc):  # no tables: no worker ever ran on this database
            return None
        return f"cannot read the database: {_first_line(exc)}"  # unreachable: its own check says so
    finally:
        engine.dispose()


def _ago(moment: datetime) -> str:
    """How long ago ``moment`` was, as ``status`` says it (``3m20s``)."""
    from jobs.models import utcnow
    from jobs.schedule import format_age

    return format_age(max(0.0, (utcnow() - moment).total_seconds()))


def check_provider(settings: Settings) -> Check:
    """One free authenticated call: the status of a request id that cannot exist."""
    import httpx

    name = "provider"
    key = settings.fal_key.get_secret_value() if settings.fal_key is not None else ""
    if not key:
        return _fail(
            name,
            "FAL_KEY is not set",
            f"export FAL_KEY=… (a key from {KEYS_URL}); only batches sent to fal need it: "
            "`--simulate` needs no key (`wanbatch doctor --simulate` checks a setup for simulations)",
        )
    from jobs.endpoints.registry import app_base

    url = (
        f"{settings.fal_queue_url.rstrip('/')}/{app_base(PROBE_ENDPOINT)}/requests/{PROBE_REQUEST_ID}/status"
    )
    base = masked_url(settings.fal_queue_url.rstrip("/"))  # as printed: a password or token masked
    from jobs.errors import ConfigError

    try:
        answer = _get_capped(url, {"Authorization": f"Key {key}", "Accept": "application/json"})
    except ConfigError as exc:
        return _fail(name, str(exc), "fix the variable named above (README: Configuration)")
    except httpx.HTTPError as exc:
        from worker.fal.errors import transport_words
        from worker.fal.proxy_failure import setting_fix

        said = transport_words(exc)  # "(ConnectError): …", the proxy or the CA bundle named
        at_fault = setting_fix(said, "fal's queue")
        if at_fault is None:
            said = f"{type(exc).__name__}: {_first_line(exc)}"
        else:
            said = said.replace(f"({type(exc).__name__}): ", f"{type(exc).__name__}: ", 1)
        return _fail(
            name,
            f"cannot reach {base}: {said}",
            at_fault or "check WANBATCH_FAL_QUEUE_URL, the network and any proxy (HTTPS_PROXY)",
        )
    if isinstance(answer, str):
        return _fail(
            name,
            f"{base}: {answer}",
            "fal may be having trouble (https://status.fal.ai); or WANBATCH_FAL_QUEUE_URL is not fal's queue",
        )
    code = answer.status_code
    said = _detail(answer, key)
    if code == 401:
        shape = settings.key_shape_problem(refused=True)  # fal's 401 says only "rejected": say what is odd
        return _fail(
            name,
            f"{base} refused the key (401{said})",
            f"check FAL_KEY: a valid key from {KEYS_URL}" + (f" ({shape})" if shape else ""),
        )
    if code == 403:
        return _fail(
            name,
            f"{base} refused the account (403{said})",
            "the account is locked or out of balance: see https://fal.ai/dashboard/billing",
        )
    if code == 404 and _application_not_found(answer):
        return _fail(
            name,
            f"{base} answered that the application it was asked about is not found (404{said}): the "
            "URL is not fal's queue, or its path is wrong",
            "set WANBATCH_FAL_QUEUE_URL to fal's queue (unset it for https://queue.fal.run) or the "
            "simulator's URL, with no path after the host",
        )
    if code in (400, 404, 405, 422, 429) or 200 <= code < 300:
        return _ok(name, f"{base} accepted the key (a made-up request id: {code}, as expected)")
    return _fail(
        name,
        f"{base} answered {code}{said}",
        "fal may be having trouble (https://status.fal.ai); or WANBATCH_FAL_QUEUE_URL is not fal's queue",
    )


#: fal's media hosts (its CDN), where its generated videos and uploaded files are served:
#: ``https://v3.fal.media/files/…`` and ``https://v3b.fal.media/files/…``
#: (https://fal.ai/docs/model-apis/data-retention; ``fal_client``'s ``CDN_URL`` is
#: ``https://v3.fal.media``). A download's own URL is per job: these are what the check reaches.
FAL_MEDIA_ORIGINS = ("https://v3.fal.media", "https://v3b.fal.media")


def check_downloads(settings: Settings) -> Check:
    """Downloads reach fal's media hosts the way they will go: directly, or through
    ``WANBATCH_DOWNLOAD_PROXY`` — the very client a download uses (its address guard, its
    proxy), one GET of each host's root, any HTTP answer counting as reached (its body unread).
    Against the simulator, its media URL (``--public-url``, else its own). Fails naming the
    setting to change; says when the environment names a proxy that downloads do not use."""
    import httpx

    from worker.fal.http import cut_off_at
    from worker.steps.download import download_policy, environment_proxy, unreached_fix

    name = "downloads"
    found = _media_origins(settings)
    if found is None:
        return _skip(
            name,
            f"{masked_url(settings.fal_queue_url)} does not answer: whose media it serves cannot be told",
        )
    targets, whose = found
    policy = download_policy(settings)
    scheme = urlsplit(targets[0]).scheme
    route = _download_route(settings, scheme)
    unused = environment_proxy(scheme) if settings.download_proxy is None else None
    note = (
        f" ({unused} is set, but downloads do not use it: WANBATCH_DOWNLOAD_PROXY=env would)"
        if unused
        else ""
    )
    timeout = httpx.Timeout(TIMEOUT)
    problems: list[tuple[str, str, str | None]] = []
    for url in targets:
        host = urlsplit(url).netloc
        reached = _reach(url, policy, timeout, cut_off_at)
        if reached is not None:
            problems.append((host, *reached))
    shown = ", ".join(urlsplit(url).netloc for url in targets)
    if not problems:
        verb = "answers" if len(targets) == 1 else "answer"
        return _ok(name, f"{whose} ({shown}) {verb}, reached {route}{note}")
    host, why, setting = problems[0]
    if setting is not None:  # the download policy refused it: the allow-list decides, not the network
        return _fail(
            name,
            f"downloads refuse {whose}: {why}; a paid video waits, never fails, until the setting allows it",
            f"set {setting} (hosts beyond fal's that downloads may reach, at any address: only "
            "hosts you trust)",
        )
    return _fail(
        name,
        f"cannot reach {whose} {route}: {host}: {why}{note}; a paid video waits, never fails, until one can",
        unreached_fix(settings, host, _proxy_in(why)),
    )


def _proxy_in(why: str) -> str | None:
    """The download proxy a failure happened through, as :func:`_unreachable` says it."""
    marker = "through the download proxy "
    return why.split(marker, 1)[1].split(" ", 1)[0] if marker in why else None


def _unreachable(url: str, policy: Any, timeout: Any, cut_off_at: Any) -> str | None:
    """Why a GET of ``url`` through a download client of ``policy`` got no HTTP answer (or only
    its download proxy's own gateway error: :func:`~worker.fal.storage.proxy_gateway_error`), or None."""
    found = _reach(url, policy, timeout, cut_off_at)
    return None if found is None else found[0]


def _reach(url: str, policy: Any, timeout: Any, cut_off_at: Any) -> tuple[str, str | None] | None:
    """As :func:`_unreachable`, with beside the why the setting that would allow the host when
    the download policy refused it (:class:`~worker.fal.errors.DownloadRefusedError`: an
    allow-list leaving it out, an internal address), else None: the network is what to check."""
    import httpx

    from jobs.errors import ProviderError
    from worker.fal.errors import DownloadRefusedError
    from worker.fal.storage import answered_through, guarded_client, proxy_gateway_error, proxy_of

    try:
        with (
            cut_off_at(time.monotonic() + EXCHANGE_SECONDS, f"no answer within {EXCHANGE_SECONDS:g} s"),
            guarded_client(policy, timeout) as client,
            client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as answer,
        ):
            if answer.status_code == 407:
                return "the proxy asked for credentials (HTTP 407)", None
            if (own := proxy_gateway_error(answer)) is not None:  # the proxy's own 502/503/504
                return (
                    f"HTTP {answer.status_code} through the download proxy {answered_through(answer)} "
                    f"({own}): it could not reach the host"
                ), None
            return None
    except DownloadRefusedError as exc:  # the address guard or the allow-list refused it
        return exc.why, exc.setting
    except ProviderError as exc:  # refused otherwise (a key in the URL)
        return str(exc), None
    except httpx.HTTPError as exc:
        proxy = proxy_of(exc)
        via = f" through the download proxy {proxy}" if proxy else ""
        return f"{type(exc).__name__}{via}: {_first_line(exc)}", None


def _download_route(settings: Settings, scheme: str) -> str:
    """How downloads of ``scheme`` URLs go, in words: directly, or through which proxy
    (credentials masked)."""
    from jobs.settings import DOWNLOAD_PROXY_FROM_ENV
    from worker.steps.download import environment_proxy

    if settings.download_proxy is None:
        return "directly"
    value = settings.download_proxy.get_secret_value()
    if value == DOWNLOAD_PROXY_FROM_ENV:
        variable = environment_proxy(scheme)
        return (
            f"through the proxy {variable} names"
            if variable
            else "directly (WANBATCH_DOWNLOAD_PROXY=env, no proxy set)"
        )
    return f"through the download proxy {masked_url(value)}"


def _media_origins(settings: Settings) -> tuple[list[str], str] | None:
    """Where this deployment's media are served from: fal's media hosts, or — when
    ``WANBATCH_FAL_QUEUE_URL`` is the bundled simulator (it answers ``GET /_sim/options``) —
    the simulator's media URL (its ``public_url``, else its own URL). None when a queue URL
    other than fal's does not answer at all: whose media it serves cannot be told (the
    provider check says why it does not answer)."""
    import httpx

    queue = settings.fal_queue_url.rstrip("/")
    host = (urlsplit(queue).hostname or "").lower()
    if host == "fal.run" or host.endswith(".fal.run"):
        return list(FAL_MEDIA_ORIGINS), "fal's media hosts"
    from jobs.errors import ConfigError
    from worker.fal.errors import parse_json

    try:
        answer = _get_capped(f"{queue}/_sim/options", {"Accept": "application/json"}, 64 * 1024)
    except (httpx.HTTPError, ConfigError):
        return None
    try:
        body = (
            parse_json(answer.content) if not isinstance(answer, str) and answer.status_code == 200 else None
        )
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict) and "public_url" in body:
        public = body.get("public_url")
        media = public.rstrip("/") if isinstance(public, str) and public else queue
        return [media], "the simulator's media URL"
    return list(FAL_MEDIA_ORIGINS), "fal's media hosts"  # a proxy in front of fal's API


#: fal's answer (and the simulator's) to a path that names no application: ``{"detail":
#: "Application 'x' not found"}`` — not the "Request … not found" of a request it does not know.
_APPLICATION_NOT_FOUND = re.compile(r"Application '.*' not found", re.DOTALL)


def _application_not_found(answer: Any) -> bool:
    """Whether a 404's JSON ``detail`` says the application (not the request) is not found."""
    from worker.fal.errors import parse_json

    try:
        body = parse_json(answer.content)
    except (ValueError, RecursionError):
        return False
    detail = body.get("detail") if isinstance(body, dict) else None
    return isinstance(detail, str) and _APPLICATION_NOT_FOUND.fullmatch(detail.strip()) is not None


def _get_capped(url: str, headers: dict[str, str], limit: int | None = None) -> Any:
    """The answer to a GET of ``url``, its body read as every answer from fal is
    (:func:`worker.fal.client.read_capped`: at most ``limit`` bytes, 1 MiB by default, a
    compressed one inflated a bounded step at a time, whole within :data:`TIMEOUT`), or why it
    was not read (text). Transport errors (``httpx.HTTPError``) pass, but for a redirect whose
    Location is no URL (:func:`worker.fal.errors.malformed_redirect`: httpx fails making its next
    request even though it follows none), which is told as text, without the location.

    A redirect is not followed: it is the answer, its body unread (:func:`_redirected`). httpx
    reads the body of every redirect it follows whole, uncapped (``Response.read()``), and
    would carry the check to a host nobody configured.

    ``Client.get`` read the body whole: a 2 KB ``gzip`` of a ``gzip`` of zeros from a host
    playing fal took the check to gigabytes of memory.

    The whole exchange, headers included, ends within :data:`EXCHANGE_SECONDS`
    (:func:`worker.fal.http.cut_off_at`): :data:`TIMEOUT` bounds each wait for bytes, so headers
    sent a byte at a time held the check for as long as they lasted."""
    import httpx

    from jobs.http_environment import beyond_loopback
    from worker.fal.errors import malformed_redirect
    from worker.fal.http import (
        ACCEPT_ENCODING,
        cut_off_at,
        direct_mounts,
        environment_checked,
        shared_ssl_context,
        with_deadlines,
    )

    with environment_checked():  # a proxy or certificate variable httpx cannot use: a ConfigError
        made = with_deadlines(
            httpx.Client(
                timeout=TIMEOUT,
                follow_redirects=False,
                verify=shared_ssl_context(),  # SSL_CERT_FILE/SSL_CERT_DIR, as the fal client's
                # As the fal client does: loopback is never proxied, and a client that reaches
                # nothing else reads no proxy variable (doctor did not refuse one for it).
                trust_env=beyond_loopback([url]),
                mounts=direct_mounts([url]),
                headers={"Accept-Encoding": ACCEPT_ENCODING},
            )
        )
    with (
        cut_off_at(time.monotonic() + EXCHANGE_SECONDS, f"no whole answer within {EXCHANGE_SECONDS:g} s"),
        made as client,
    ):
        try:
            return _read_capped_answer(client, url, headers, limit)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            if malformed_redirect(exc):  # its text unsaid: the server's, and it may hold the key
                return "answered a redirect to a malformed location (not followed)"
            raise


def _read_capped_answer(client: Any, url: str, headers: dict[str, str], limit: int | None) -> Any:
    """:func:`_get_capped`'s GET on ``client``."""
    from jobs.errors import ProviderError
    from worker.fal.client import MAX_ANSWER_BYTES, AnswerBudget, read_capped
    from worker.fal.http import with_body

    with client.stream("GET", url, headers=headers) as streamed:
        if streamed.is_redirect:  # its status and Location are what is told; its body is not read
            return with_body(streamed, b"", drop=("content-encoding", "content-length"))
        try:
            return read_capped(
                streamed, "check", MAX_ANSWER_BYTES if limit is None else limit, budget=AnswerBudget(TIMEOUT)
            )
        except ProviderError as exc:
            return str(exc).removeprefix("fal check: ")


def _redirected(answer: Any, url: str) -> str | None:
    """``redirects (302) to HOST`` when ``answer`` (to a GET of ``url``) is a redirect, else None.

    Only the host (and port) of its ``Location`` is told, escaped: its path, query and any
    credentials may hold secrets (a token, a password), and the header is the server's text."""
    from urllib.parse import urljoin

    from jobs.printable import one_line

    if not answer.is_redirect:
        return None
    location = answer.headers.get("location", "")
    try:
        target = urlsplit(urljoin(url, location))
        host = target.hostname or ""
        port = target.port
    except ValueError:  # not a URL (a port out of range, a malformed IPv6 address)
        host, port = "", None
    shown = f"[{host}]" if ":" in host else host
    if shown and port is not None:
        shown += f":{port}"
    where = f"to {one_line(shown)[:100]}" if shown else "with no usable Location"
    return f"redirects ({answer.status_code}) {where}"


def _detail(answer: Any, key: str) -> str:
    """``: <detail>`` from a JSON error body, else empty (never the request headers).

    The detail is the provider's text, and a queue host or a proxy may echo the Authorization
    header in a 401 or a 5xx: it is masked (:func:`worker.fal.redact.redact_text`) before it is
    cut to length, so no part of the key reaches the output, which ends up in CI logs and
    tickets and passes through no log filter. Then it is escaped
    (:func:`jobs.printable.one_line`, as ``run`` and ``status`` show fal's words): a control
    sequence in it (``ESC ] 0;`` retitling the window, ``ESC [ 2 J`` clearing the screen), a
    bidirectional override or a line break is shown as its escape, never obeyed.
    """
    from jobs.printable import one_line
    from worker.fal.errors import parse_json
    from worker.fal.redact import redact_text

    try:
        body = parse_json(answer.content)
    except (ValueError, RecursionError):
        return ""
    detail = body.get("detail") if isinstance(body, dict) else None
    return f": {one_line(redact_text(str(detail), [key])[:200])}" if detail else ""


def check_storage(settings: Settings) -> Check:
    """The output folder or bucket takes a probe, as ``run`` checks before sending anything. A
    local folder (the output folder, or S3's staging folder) not there yet is not created: it is
    fine when it could be (its nearest existing folder is writable)."""
    from jobs.errors import WanbatchError
    from jobs.fs import CURRENT_FOLDER_GONE, current_folder_gone_fix, lost_with_current_folder, shown_path
    from jobs.output_store import open_output_store

    name = "output storage"
    try:
        store = open_output_store(settings)
        if lost_with_current_folder(root := store.local_root()):  # its probe would need it
            setting = "WANBATCH_OUTPUT_STAGING_DIR" if store.is_remote else "WANBATCH_OUTPUT_DIR"
            return _fail(
                name,
                f"{setting} {shown_path(root)} is relative, and {CURRENT_FOLDER_GONE}",
                current_folder_gone_fix(setting),
            )
        under = store.check_writable(create=False)
    except WanbatchError as exc:
        fix = (
            "check the bucket, the AWS_* credentials and AWS_ENDPOINT_URL, or fix WANBATCH_OUTPUT_DIR"
            if settings.output_url
            else "create the folder, make it writable for this user, free some space, "
            "or fix WANBATCH_OUTPUT_DIR"
        )
        return _fail(name, str(exc), fix)
    except Exception as exc:  # a storage client's own error: still one line
        return _fail(name, f"{type(exc).__name__}: {_first_line(exc)}", "check WANBATCH_OUTPUT_DIR")
    if under is None:
        return _ok(name, f"{store.describe()} is writable")
    if (full := _full_output_disk(name, store, under)) is not None:
        return full
    folder = shown_path(store.local_root().resolve())
    created = f"not created yet: the first run creates it ({shown_path(under)} is writable)"
    if store.is_remote:
        return _ok(name, f"{store.describe()} is writable; the staging folder {folder}: {created}")
    return _ok(name, f"{folder}: {created}")


def _full_output_disk(name: str, store: OutputStore, under: Path) -> Check | None:
    """The verdict on a local output folder not created yet (the output folder, or S3's staging
    folder) whose disk cannot take ``run``'s start-up probe (None: it can). A folder that is
    there takes the probe itself and fails on a full disk ("No space left on device"); one not
    there yet was only found creatable, and said "✓ … the first run creates it" on a full disk
    while that run refused to start. :data:`jobs.output_store.OUTPUT_PROBE_BYTES` is what the
    probe writes."""
    from jobs.fs import free_bytes_in, shown_path
    from jobs.output_store import OUTPUT_PROBE_BYTES
    from jobs.printable import size_text

    free = free_bytes_in(under)
    if free is None or free >= OUTPUT_PROBE_BYTES:
        return None
    setting = "WANBATCH_OUTPUT_STAGING_DIR" if store.is_remote else "WANBATCH_OUTPUT_DIR"
    return _fail(
        name,
        f"{setting} '{shown_path(store.local_root())}' cannot take the outputs: its disk is full "
        f"({size_text(free)} free for {shown_path(under)}), so `run` refuses to start",
        f"free space on that disk, or point {setting} at a disk with room",
    )


def healthz_url(webhook_url: str) -> str | None:
    """``https://host/prefix/healthz`` for ``https://host/prefix/webhooks/fal`` (None: not that shape)."""
    parts = urlsplit(webhook_url)
    path = parts.path.rstrip("/")
    if parts.scheme not in ("http", "https") or not parts.netloc or not path.endswith("/webhooks/fal"):
        return None
    return urlunsplit((parts.scheme, parts.netloc, path.removesuffix("webhooks/fal") + "healthz", "", ""))


def check_receiver(settings: Settings) -> Check:
    """With ``WANBATCH_WEBHOOK_URL``: the ``wanbatch serve`` behind it answers ``/healthz``, and
    fal's signing keys can be fetched, from this host and (as its ``/healthz`` says) by it:
    without them every delivery is refused (503), however well the receiver answers."""
    import httpx

    from jobs.errors import ConfigError
    from jobs.printable import one_line
    from jobs.settings import Settings
    from worker.fal.webhooks import JwksKeys

    name = "receiver"
    if not settings.webhook_url:
        return _skip(
            name,
            "no WANBATCH_WEBHOOK_URL: completions come from fal's status streams, "
            "the few requests no stream follows are polled (fine)",
        )
    healthz = healthz_url(settings.webhook_url)
    if healthz is None:
        return _fail(
            name,
            f"WANBATCH_WEBHOOK_URL {masked_url(settings.webhook_url)!r} does not end in /webhooks/fal",
            "point it at the receiver: https://YOUR-HOST/webhooks/fal (`wanbatch serve`)",
        )
    probe = masked_url(healthz)  # as printed: the receiver's password masked
    try:
        answer = _get_capped(healthz, {}, HEALTHZ_MAX_BYTES)
    except ConfigError as exc:
        return _fail(name, str(exc), "fix the variable named above (README: Configuration)")
    except httpx.HTTPError as exc:
        return _fail(
            name,
            f"cannot reach {probe}: {type(exc).__name__}: {_first_line(exc)}",
            "start `wanbatch serve` and make WANBATCH_WEBHOOK_URL lead to it",
        )
    if isinstance(answer, str):
        return _fail(
            name,
            f"{probe}: {answer}",
            "make WANBATCH_WEBHOOK_URL lead to `wanbatch serve` (path /webhooks/fal)",
        )
    redirected = _redirected(answer, healthz)
    if redirected is not None:
        return _fail(
            name,
            f"{probe} {redirected}; not followed",
            "point WANBATCH_WEBHOOK_URL at the address `wanbatch serve` answers on itself "
            "(e.g. https:// where http:// is redirected), not at one that redirects",
        )
    try:
        body = answer.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("database_read_only") is True:
        # It answers and serves a database, but may not write to it: every delivery refused (503).
        return _fail(
            name,
            f"{probe} answers, but its database is read-only: it refuses every delivery (503) and "
            "completions come only from the slow poll (WANBATCH_WEBHOOK_POLL_AFTER)",
            "give `wanbatch serve` a WANBATCH_DATABASE_URL it may write (SQLite: no mode=ro, a file "
            "and folder its user may write; PostgreSQL: not a standby, default_transaction_read_only "
            "off for its role and database), then restart it",
        )
    if answer.status_code != 200 or not (isinstance(body, dict) and body.get("ok") is True):
        prefix = urlsplit(healthz).path.removesuffix("/healthz")
        stripped = (
            f"; a reverse proxy serving it under {prefix} must strip that prefix (serve answers "
            "/healthz and /webhooks/fal)"
            if prefix
            else ""
        )
        return _fail(
            name,
            f"{probe} answered {answer.status_code}, not as `wanbatch serve` does",
            f"make WANBATCH_WEBHOOK_URL lead to `wanbatch serve` (path /webhooks/fal){stripped}",
        )
    # A receiver of another database refuses every delivery (403) though it answers: the tokens
    # of this database's webhook URLs are keyed by this database's secret. Asked after its answer,
    # so that a secret its first /healthz just made in this very database is found here.
    serves = _serves_this_database(settings, body, probe)
    if isinstance(serves, Check):
        return serves
    # Without fal's signing keys the receiver refuses every delivery (503) though it answers.
    # Whether it holds them is its own word (/healthz's `can_verify_signatures`): this host's
    # fetch says only what this host reaches. A failed fetch here once said "the receiver refuses
    # every delivery" of a receiver that held its keys and accepted every one.
    jwks_url = masked_url(settings.webhook_jwks_url)  # as printed: a password or token masked
    here = JwksKeys(settings.webhook_jwks_url, timeout=TIMEOUT).health()
    there = body.get("can_verify_signatures")  # absent: a wanbatch that does not say
    said = body.get("signing_keys_error")
    why = f" ({one_line(said)[:200]})" if isinstance(said, str) and said else ""
    fal_jwks = Settings.model_fields["webhook_jwks_url"].default
    from worker.fal.proxy_failure import setting_fix

    at_fault = setting_fix(here.error or "", "the key fetch") if not here.can_verify else None
    url_fix = (
        f"fix WANBATCH_WEBHOOK_JWKS_URL here and for `wanbatch serve` (fal's: {fal_jwks}), "
        "or let both hosts reach it (network, HTTPS_PROXY)"
    )
    if there is False:
        fetched = (
            f"this host fetched them from {jwks_url}"
            if here.can_verify
            else f"this host could not fetch them either from {jwks_url}: {here.error}"
        )
        return _fail(
            name,
            f"{probe} answers, but cannot verify fal's signatures{why}: it refuses every "
            f"delivery (503); {fetched}",
            "give `wanbatch serve` the WANBATCH_WEBHOOK_JWKS_URL above (a changed setting needs "
            "a restart), and let its host reach it (network, HTTPS_PROXY)"
            if here.can_verify
            else at_fault or url_fix,
        )
    if not here.can_verify:
        if there is True:
            receiver = (
                f"{probe} says it can verify fal's signatures now (keys it holds), so it accepts "
                "deliveries; it refuses them (503) if it must fetch the keys again (they age, or "
                "fal changes them) and cannot"
            ) + (f"; its own last fetch failed too{why}" if why else "")
        else:
            receiver = (
                f"{probe} does not say whether it holds keys: if it cannot fetch them either, it "
                "refuses every delivery (503)"
            )
        return _fail(
            name,
            f"this host could not fetch fal's signing keys from WANBATCH_WEBHOOK_JWKS_URL "
            f"{jwks_url}: {here.error}; {receiver}",
            at_fault or url_fix,
        )
    return _ok(
        name,
        f"{probe} answers (from this host; fal must reach it from the internet){serves}; "
        f"fal's signing keys fetched from {jwks_url}",
    )


def _serves_this_database(settings: Settings, body: dict[str, Any], probe: str) -> Check | str:
    """Whether the receiver that answered ``body`` (its ``/healthz``) serves this host's database:
    a failed check if not (or if it cannot read its own), else what to add to the ok line.

    Its ``database`` is a fingerprint of the database's webhook secret
    (:func:`worker.steps.webhooks.database_fingerprint`), compared with this database's. A
    receiver that does not say (an older wanbatch) is taken at its word, as before."""
    from jobs.db import safe_url as db_safe_url
    from jobs.printable import one_line

    name = "receiver"
    if "database" not in body:
        return ""
    theirs = body.get("database")
    if not isinstance(theirs, str):
        said = body.get("database_error")
        why = f" ({one_line(said)[:200]})" if isinstance(said, str) and said else ""
        return _fail(
            name,
            f"{probe} answers, but cannot use its database{why}: it refuses every delivery (503)",
            "let `wanbatch serve` reach its database (its WANBATCH_DATABASE_URL: this host's), then "
            "run `wanbatch doctor` again",
        )
    ours = _database_fingerprint(settings)
    if isinstance(ours, _Unknown):  # this database cannot be read: its own check says why
        return f" (whether it serves this database is not known: {ours.why})"
    if ours != theirs:  # None: this database has no webhook secret, so no receiver serves it
        return _fail(
            name,
            f"{probe} answers, but serves another database than this host's "
            f"{db_safe_url(settings.database_url)}: it refuses every delivery of this host's "
            "submits (403: their webhook tokens are keyed by this database's secret)",
            f"the receiver at {masked_url(settings.webhook_url or '')} serves another database: start "
            "`wanbatch serve` with this WANBATCH_DATABASE_URL (a changed setting needs a restart), or "
            "point WANBATCH_WEBHOOK_URL at the receiver of this database",
        )
    return " and serves this database"


@dataclass(frozen=True, slots=True)
class _Unknown:
    """This host's database could not be read, and why."""

    why: str


def database_id(settings: Settings) -> str | None:
    """This database's fingerprint, read only; None when it has none or cannot be read."""
    found = _database_fingerprint(settings)
    return found if isinstance(found, str) else None


def _database_fingerprint(settings: Settings) -> str | _Unknown | None:
    """This database's fingerprint (:func:`worker.steps.webhooks.database_fingerprint`; None: it
    has no webhook secret yet, or does not exist), read only — no file, folder, table or secret
    created; or why it could not be read."""
    from sqlalchemy.pool import NullPool

    from jobs import db, store
    from jobs.fingerprint import database_fingerprint
    from jobs.store import WEBHOOK_SECRET

    try:
        url = db.normalize_url(settings.database_url)
        target = db.sqlite_file(url)
        if target is not None and not target.path.exists():
            return None  # no secret in a database that does not exist
        if _sqlite_closed(target):
            return _Unknown(f"cannot open the database: {_SQLITE_DISK_FULL}")
        connect_args = {"connect_timeout": int(TIMEOUT)} if url.get_backend_name() == "postgresql" else {}
        engine = db.read_engine(url, poolclass=NullPool, connect_args=connect_args)
    except Exception as exc:
        return _Unknown(f"cannot open the database: {_first_line(exc)}")
    try:
        with db.read_scope(engine) as session:
            secret = store.instance_secret_if_made(session, WEBHOOK_SECRET)
    except Exception as exc:
        if db.is_schema_missing(exc):  # no tables: no secret either
            return None
        return _Unknown(f"cannot read the database: {_first_line(exc)}")
    finally:
        engine.dispose()
    return None if secret is None else database_fingerprint(bytes.fromhex(secret))


def check_limiter(settings: Settings) -> Check:
    """The submit-rate limiter's Redis answers and takes its write, as ``run`` and ``worker`` check
    before sending."""
    from worker.limits import probe_limiter

    name = "limiter"
    probed = probe_limiter(settings)
    limits = dispatchers_differ(settings)
    if probed is None:
        if limits:
            return _fail(
                name,
                f"no WANBATCH_LIMITS_URL and no Redis broker; {_LIMITS_DIFFER}{'. '.join(limits)}",
                _SAME_LIMITS,
            )
        return _skip(
            name,
            "no WANBATCH_LIMITS_URL and no Redis broker: each process spaces its submits in its own "
            "memory, and the processes dispatching on one database share the submit rate and the "
            "outstanding caps through it (each applies the strictest of the live ones')",
        )
    problem = probed.problem()
    if problem is not None:
        if probed.refused:
            fix = f"{probed.remedy()}: `run` and `worker` refuse to start with this one"
        else:
            fix = f"start that Redis or fix {probed.setting}: `run` and `worker` refuse to start without it"
        return _fail(name, problem, fix)
    from worker.limits import backend, published_mismatch
    from worker.peers import workers_mismatch
    from worker.redis_memory import FIX, LIMITER_LOSES, eviction_at
    from worker.redis_memory import problem as eviction_problem

    found = backend(settings)
    evicts = eviction_problem(eviction_at(found[1]), LIMITER_LOSES) if found else None
    if evicts is not None:  # fine now, but under a tenant writing fast no submit would go out
        return _fail(name, f"{probed.where} answers, but {evicts}", FIX)
    database = database_id(settings)
    # Said, not failed: a host that only watches (status, doctor) may differ on purpose.
    differ = published_mismatch(settings, database)
    warning = "".join(f"; warning: {line}" for line in differ)
    # Failed: the workers themselves disagree, so a job's outcome depends on which one ran it.
    peers = workers_mismatch(settings, database)
    if limits:
        peers.append(f"{_LIMITS_DIFFER}{'. '.join(limits)}")
    if peers:
        return _fail(
            name,
            f"{probed.where} answers; {' '.join(peers)}{warning}",
            "give every `wanbatch worker` (and `wanbatch run` on this database) the same settings "
            "(the variables named) and restart the odd one",
        )
    return _ok(name, f"{probed.where} answers{warning}")


_LIMITS_DIFFER = (
    "the live processes dispatching on this database for one fal account run with different "
    "account-wide limits: "
)
_SAME_LIMITS = (
    "give every `wanbatch run` and `wanbatch worker` on this database the same values (your fal "
    "account's limits); until then each applies the strictest of the live ones'"
)


def dispatchers_differ(settings: Settings) -> list[str]:
    """Where the live processes dispatching on this database (embedded ``run``s, the workers'
    tick leader) differ on an account-wide limit they published with their heartbeat
    (:func:`jobs.account_limits.disagreements`). Read only; nothing when the database cannot be
    read (its own check says why) or its schema is older than the column."""
    from datetime import timedelta

    from sqlalchemy.pool import NullPool

    from jobs import account_limits, db, store
    from jobs.models import utcnow
    from jobs.processes import process_prefix

    try:
        url = db.normalize_url(settings.database_url)
        target = db.sqlite_file(url)
        if (target is not None and not target.path.exists()) or _sqlite_closed(target):
            return []
        connect_args = {"connect_timeout": int(TIMEOUT)} if url.get_backend_name() == "postgresql" else {}
        engine = db.read_engine(url, poolclass=NullPool, connect_args=connect_args)
    except Exception:
        return []
    try:
        with db.read_scope(engine) as session:
            since = utcnow() - timedelta(seconds=db.HEARTBEAT_STALE_SECONDS)
            docs = store.live_limits(session, process_prefix(), since=since)
    except Exception:  # unreachable, no such column yet: said by the database check
        return []
    finally:
        engine.dispose()
    peers = [p for owner, doc in docs.items() if (p := account_limits.parse(owner, doc)) is not None]
    return account_limits.disagreements(peers)


# --------------------------------------------------------------------------- all of them


def check_broker_for_simulation(settings: Settings) -> Check:
    """``doctor --simulate``: a simulation runs in its own process, so a broker is in the way."""
    if settings.broker_url:
        return _fail(
            "broker",
            "WANBATCH_BROKER_URL is set: `--simulate` runs the work in its own process and is "
            "refused with a broker (the workers would send the jobs to fal)",
            "unset WANBATCH_BROKER_URL to simulate",
        )
    return _skip("broker", "no WANBATCH_BROKER_URL: a simulation runs in its own process (fine)")


def _not_for_simulation(name: str, why: str) -> Callable[[Settings], Check]:
    return lambda _settings: _skip(name, why)


def run_checks(*, simulate: bool = False) -> list[Check]:
    """Every check, in order. The network checks run side by side (each bounded by
    :data:`TIMEOUT`), so a doctor with several things down answers in seconds, not a minute.

    ``simulate`` (``doctor --simulate``): the setup of ``--simulate`` runs, which need no
    ``FAL_KEY``, no broker and no receiver (they talk to a simulator of their own)."""
    from jobs import clock

    clock.said_elsewhere()  # the clock check says it, in its line
    config, settings = check_configuration(simulate=simulate)
    later: list[tuple[str, Callable[[Settings], Check]]] = [
        ("database", check_database),
        ("clock", check_clock),
        ("broker", check_broker_for_simulation if simulate else check_broker),
        (
            "provider",
            _not_for_simulation("provider", "--simulate: the bundled simulator, no FAL_KEY needed")
            if simulate
            else check_provider,
        ),
        (
            "downloads",
            _not_for_simulation("downloads", "--simulate: the bundled simulator's media are on loopback")
            if simulate
            else check_downloads,
        ),
        ("output storage", check_storage),
        (
            "receiver",
            _not_for_simulation("receiver", "--simulate: a simulation follows its simulator's status streams")
            if simulate
            else check_receiver,
        ),
        ("limiter", check_limiter),  # a simulation takes its tokens from it too
    ]
    if settings is None:
        return [config, *(_skip(name, "not checked: the configuration is invalid") for name, _ in later)]
    _import_for_checks()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(later)) as pool:
        futures = [(name, pool.submit(_guarded, name, check, settings)) for name, check in later]
        return [config, *(future.result() for _name, future in futures)]


def _import_for_checks() -> None:
    """Import, in this thread, what the checks import when they run: they run side by side, and
    two threads importing ``worker.steps`` (a package whose modules import each other) for the
    first time at once can each find the other's module half loaded (``ImportError: cannot import
    name 'poll' from partially initialized module 'worker.steps.poll'``). Every doctor with a
    broker failed its downloads and limiter checks so, and never ran them."""
    import worker.broker_outage
    import worker.fal.storage
    import worker.limits
    import worker.peers
    import worker.redis_memory
    import worker.running
    import worker.steps  # noqa: F401 - its modules, for the downloads and receiver checks


def _what_waits(lock: LockHolder) -> str:
    """What of wanbatch waits for ``lock`` (:func:`jobs.db.lock_holders`: one that blocks its
    reads, or its writes, of that table)."""
    if lock.blocks_reads:
        return (
            f"every command that reads or writes table {lock.table} waits for it (`status`, `export` "
            "and the dashboard give up after WANBATCH_DATABASE_LOCK_WAIT; the workers, `run` and the "
            "webhook receiver wait as long as it takes)"
        )
    return (
        f"the workers, `run` and the webhook receiver wait for it to write table {lock.table}, as "
        "long as it takes (reads go on)"
    )


def _locked_fix(pid: int | None) -> str:
    """What to do about another session's lock on wanbatch's tables (``pid``: that session's)."""
    end = f"; `SELECT pg_terminate_backend({pid})` ends that session" if pid is not None else ""
    return (
        f"end that session's transaction (COMMIT or ROLLBACK where it was opened{end}) or wait "
        "for it, then run `wanbatch doctor` again"
    )


def _guarded(name: str, check: Callable[[Settings], Check], settings: Settings) -> Check:
    """A check that raised anyway (a bug) is still one failed line, never a traceback; and no
    check's lines hold FAL_KEY (:func:`_without_key`). Its reads wait for another session's
    lock at most ``WANBATCH_DATABASE_LOCK_WAIT`` (:func:`jobs.db.lock_waits_bounded`): a
    ``LOCK TABLE`` left open in ``psql`` is a failed line naming it, not a doctor that hangs."""
    from jobs import db
    from jobs.errors import DatabaseLockedError

    try:
        # Each check on a thread of its own: the bound is entered here, not inherited.
        with db.lock_waits_bounded(settings):
            verdict = check(settings)
    except DatabaseLockedError as exc:  # a read another session's lock held up: the bound's line
        verdict = _fail(name, str(exc), _locked_fix(exc.pid))
    except Exception as exc:
        verdict = _fail(
            name, f"the check itself failed: {type(exc).__name__}: {_first_line(exc)}", "please report it"
        )
    return _without_key(verdict, settings.fal_key.get_secret_value() if settings.fal_key else "")


def _without_key(verdict: Check, key: str) -> Check:
    """``verdict`` with FAL_KEY, in any of its forms, masked in its detail and fix
    (:func:`worker.fal.redact.redact_text`). The settings refuse a URL or folder that holds the
    key, so no check should ever name it; this is the last line, whatever a check quotes. And
    whatever it quotes cannot drive the terminal (:func:`jobs.printable.printable`)."""
    from jobs.printable import printable
    from worker.fal.redact import redact_text

    fix = printable(redact_text(verdict.fix, [key])) if verdict.fix else verdict.fix
    return replace(verdict, detail=printable(redact_text(verdict.detail, [key])), fix=fix)
