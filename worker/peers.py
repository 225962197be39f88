"""Every worker's outcome-deciding settings, published beside the tick leader's limits, and
compared: a worker that fails a job another would pass, or stores its videos elsewhere, is named.

The tick leader's policy (:func:`worker.limits.policy_key`) carries only the leader's limits and
where it works, and is compared with each process's *own* settings: a worker that differed from
the others was said in its own log alone, while ``doctor`` (run on a host that agrees with the
leader) said all was well and ``status`` nothing. Yet most settings that decide a job's outcome
are applied by whichever worker runs the step: ``WANBATCH_MEDIA_MISMATCH`` (the download step
fails or flags a video that does not match), ``WANBATCH_MAX_ATTEMPTS``, the retry and
submit-unknown policies, where the video is stored, which fal a request goes to. The global limits
(:data:`LEADER_APPLIED`) are compared too, but said otherwise: the tick leader applies its own for
every worker, so a difference there names the value in force, the leader's (:func:`global_disagreements`).

So every ``wanbatch worker`` (leader or not) writes its own record, at each heartbeat, into one
Redis hash per database (:func:`peers_key`; a field per process, ``host:pid:``): Redis' clock
and a JSON object of those settings (:func:`outcome_settings`; never a secret: ``FAL_KEY`` by its
key id only, every URL by scheme, host, port and path, :func:`worker.limits.fal_location`). A
worker deletes its field when it stops cleanly (and writes it no more: :meth:`Announcer.withdraw`);
a dead worker's goes stale (:data:`worker.limits.POLICY_FRESH_SECONDS`) and its settings are named by
nothing, then it is pruned (:data:`PEERS_KEEP_SECONDS`). ``doctor`` (its ``limiter`` check fails)
and ``status`` read the live records and name the odd worker and the setting (:func:`disagreements`).

A record also carries the worker's Celery node name (``wanbatch-PID@HOST`` unless ``worker
--name`` gave another; :func:`name_this_node`), so ``doctor`` can say when each worker that
answers the broker's ping last wrote it (:func:`last_seen`).

A record not refreshed for :data:`PEER_GONE_SECONDS` is also how ``status`` and the dashboard
tell that a worker on another host died (:func:`silent_since`): the database alone says so of a
worker that does not lead the ticks only once its job leases end (it records no heartbeat there,
and its pid cannot be looked up from here). Reporting only: its leases are taken over as before.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from jobs.settings import Settings
from worker.limits import (
    KEY_PREFIX,
    POLICY_FRESH_SECONDS,
    Leader,
    LimiterUnavailableError,
    RedisGCRA,
    SubmitLimiter,
    _client,
    _reason,
    _shown,
    api_key_id,
    backend,
    client_error,
    describe,
    fal_location,
    leader_key,
    output_location,
    output_real,
    say_mismatch,
)

log = logging.getLogger(__name__)

#: A stopped or dead worker's record is pruned this long after its last beat (by the next
#: worker's write, :data:`ANNOUNCE_LUA`; the whole hash expires so when no worker writes).
PEERS_KEEP_SECONDS = 3600

#: A worker writes its record every beat (``worker.conductor.HEARTBEAT_SECONDS``, 10 s), between
#: two rounds of its loop. One not refreshed for this long is named gone by ``status`` and the
#: dashboard when it holds job leases (:func:`silent_since`): three beats missed in a row, plus
#: 15 s for a beat put off by a slow round (a non-leader's round is one leader-lock query; a
#: database that does not answer makes it wait out its connect timeout) and the Redis round
#: trips (:data:`worker.limits.TIMEOUT_SECONDS` each). Past :data:`POLICY_FRESH_SECONDS` (its
#: settings are no longer compared) and well under a job lease (minutes), so a worker killed -9
#: on another host is named within a minute instead of when its leases end.
PEER_GONE_SECONDS = 3 * 10.0 + 15.0

#: Write this process's record ``ARGV[1]`` = ``ARGV[2]`` (JSON) into the hash ``KEYS[1]``,
#: stamped with Redis' clock (µs), prune records older than ``ARGV[3]`` seconds, and return the
#: hash (``HGETALL``), the clock, and the database's tick leader record ``KEYS[2]``
#: (:func:`worker.limits.leader_key`, ``HGETALL``; empty when none or not asked): which worker's
#: global limits apply to all (:func:`peer_warnings`), in the same round trip.
ANNOUNCE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stamp = string.format('%.0f', now)
redis.call('HSET', KEYS[1], ARGV[1], stamp .. ' ' .. ARGV[2])
local all = redis.call('HGETALL', KEYS[1])
local keep = {}
for i = 1, #all, 2 do
  local at = tonumber(string.match(all[i + 1], '^(%d+) ')) or 0
  if now - at > tonumber(ARGV[3]) * 1000000 then
    redis.call('HDEL', KEYS[1], all[i])
  else
    table.insert(keep, all[i]); table.insert(keep, all[i + 1])
  end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
local leader = {}
if #KEYS > 1 then leader = redis.call('HGETALL', KEYS[2]) end
return {keep, stamp, leader}
"""

#: The hash ``KEYS[1]``, Redis' clock (µs), and the leader record ``KEYS[2]`` as :data:`ANNOUNCE_LUA`.
READ_PEERS_LUA = """
local t = redis.call('TIME')
local leader = {}
if #KEYS > 1 then leader = redis.call('HGETALL', KEYS[2]) end
local now = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
return {redis.call('HGETALL', KEYS[1]), now, leader}
"""

#: The compared settings that only the tick leader applies, for every worker: dispatch runs on it
#: alone (:func:`worker.steps.dispatch.dispatch_in`, from the leader's ticks), and reads there the
#: outstanding caps, the download backlog's bound (``_room_for_downloads``), the queue-wait
#: back-off, the daily budget and the prices a job not sent yet is priced again with
#: (``_priced_now``); and every submit's token, on any worker, is spaced by the leader's published
#: rates (:data:`worker.limits.GCRA_LUA`), or the worker's own when stricter (:data:`SPACING`).
#: A worker's own value of these decides nothing while another leads, and everything once it leads.
LEADER_APPLIED = (
    "WANBATCH_SUBMIT_RATE",
    "WANBATCH_SUBMIT_RATE_PER_ENDPOINT",
    "WANBATCH_SUBMIT_JITTER_ALLOWANCE",
    "WANBATCH_MAX_OUTSTANDING",
    "WANBATCH_MAX_OUTSTANDING_PER_ENDPOINT",
    "WANBATCH_MAX_DOWNLOAD_BACKLOG",
    "WANBATCH_QUEUE_WAIT_BACKOFF",
    "WANBATCH_DAILY_BUDGET_USD",
    "WANBATCH_PRICING_OVERRIDES",
)
#: Of :data:`LEADER_APPLIED`, those a worker's own stricter value also applies to the submits it
#: makes (the stricter of its interval and the leader's, :data:`worker.limits.GCRA_LUA`).
SPACING = ("WANBATCH_SUBMIT_RATE", "WANBATCH_SUBMIT_RATE_PER_ENDPOINT", "WANBATCH_SUBMIT_JITTER_ALLOWANCE")


def peers_key(database: str | None) -> str:
    """The Redis hash holding every worker's record for ``database`` (its fingerprint)."""
    return f"{KEY_PREFIX}{database or 'no-database'}:workers"


def _url_or_unset(url: str | None) -> str:
    return fal_location(url) if url else "(unset)"


def outcome_settings(settings: Settings) -> dict[str, str]:
    """The settings of this process that decide a job's outcome, where its output goes, or the
    limits and budget dispatch applies, by their variable's name, as shown in a warning. Nothing
    secret: ``FAL_KEY`` by key id (a hash prefix), URLs without credentials, query or fragment."""
    s3 = settings.output_url is not None
    hosts = settings.download_allowed_hosts
    budget = settings.daily_budget_usd
    proxy = settings.download_proxy.get_secret_value() if settings.download_proxy is not None else None
    per_endpoint = settings.submit_rate_per_endpoint
    values: dict[str, object] = {
        "FAL_KEY": f"key id {api_key_id(settings)}" if settings.fal_key is not None else "(unset)",
        "WANBATCH_FAL_QUEUE_URL": fal_location(settings.fal_queue_url),
        "WANBATCH_FAL_REST_URL": fal_location(settings.fal_rest_url),
        "WANBATCH_DISABLE_FALLBACKS": "true" if settings.disable_fallbacks else "false",
        "WANBATCH_WEBHOOK_URL": _url_or_unset(settings.webhook_url),
        "WANBATCH_OUTPUT_DIR": output_location(settings),
        "AWS_ENDPOINT_URL": _url_or_unset(settings.aws_endpoint_url if s3 else None),
        "AWS_ENDPOINT_URL_S3": _url_or_unset(settings.aws_endpoint_url_s3 if s3 else None),
        "WANBATCH_MEDIA_MISMATCH": settings.media_mismatch,
        "WANBATCH_MAX_ATTEMPTS": settings.max_attempts,
        "WANBATCH_RETRY_BASE_DELAY": settings.retry_base_delay,
        "WANBATCH_RETRY_MAX_DELAY": settings.retry_max_delay,
        "WANBATCH_SUBMIT_UNKNOWN_POLICY": settings.submit_unknown_policy,
        "WANBATCH_SUBMIT_UNKNOWN_DEADLINE": settings.submit_unknown_deadline,
        "WANBATCH_DOWNLOAD_ATTEMPTS": settings.download_attempts,
        "WANBATCH_DOWNLOAD_MAX_BYTES": settings.download_max_bytes,
        "WANBATCH_DOWNLOAD_TIMEOUT": settings.download_timeout,
        "WANBATCH_DOWNLOAD_ALLOWED_HOSTS": ",".join(hosts) if hosts is not None else "(unset)",
        "WANBATCH_DOWNLOAD_PROXY": fal_location(proxy)
        if proxy not in (None, "env")
        else (proxy or "(unset)"),
        "WANBATCH_LEASE_SECONDS": settings.lease_seconds,
        "WANBATCH_SUBMIT_RATE": float(settings.submit_rate),
        "WANBATCH_SUBMIT_JITTER_ALLOWANCE": float(settings.submit_jitter_allowance),
        "WANBATCH_SUBMIT_RATE_PER_ENDPOINT": {k: float(v) for k, v in per_endpoint.items()},
        "WANBATCH_MAX_OUTSTANDING": settings.max_outstanding,
        "WANBATCH_MAX_OUTSTANDING_PER_ENDPOINT": dict(settings.max_outstanding_per_endpoint),
        "WANBATCH_MAX_DOWNLOAD_BACKLOG": settings.download_backlog,
        "WANBATCH_QUEUE_WAIT_BACKOFF": settings.queue_wait_backoff,
        "WANBATCH_DAILY_BUDGET_USD": str(budget) if budget is not None else "(unset)",
        "WANBATCH_PRICING_OVERRIDES": settings.pricing_overrides,
    }
    return {name: _shown(value) for name, value in values.items()}


@dataclass(frozen=True, slots=True)
class Peer:
    """One worker's record (:func:`peers_key`)."""

    #: ``host:pid:``.
    owner: str
    #: When it last wrote it (Redis' clock, epoch seconds).
    at: float
    settings: Mapping[str, str]
    #: Its output folder with symlinks followed (:func:`worker.limits.output_real`); None: S3.
    output_real: str | None = None
    #: Its Celery node name as it answers a ping; None: not recorded (an earlier version's
    #: record, or a process that is no Celery worker): :attr:`node_name` then assumes the default.
    node: str | None = None

    @classmethod
    def of(cls, owner: str, settings: Settings, at: float = 0.0, node: str | None = None) -> Peer:
        return cls(owner, at, outcome_settings(settings), output_real(settings), node)

    def record(self) -> str:
        """The JSON stored in the hash (Redis stamps the time)."""
        doc: dict[str, object] = {"settings": dict(self.settings), "output_real": self.output_real}
        if self.node is not None:
            doc["node"] = self.node
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def parse(cls, owner: bytes, raw: bytes) -> Peer | None:
        """A record as stored; None when it is not one (written by hand, or by a later version)."""
        try:
            stamp, _, body = raw.decode().partition(" ")
            doc = json.loads(body)
            shown = {str(k): str(v) for k, v in doc["settings"].items()}
            real = doc.get("output_real")
            node = doc.get("node")
            return cls(
                owner.decode(),
                int(stamp) / 1_000_000,
                shown,
                real if isinstance(real, str) else None,
                node if isinstance(node, str) and node else None,
            )
        except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError):
            return None

    @property
    def name(self) -> str:
        """``worker pid 123@host``."""
        host, _, rest = self.owner.partition(":")
        pid = rest.split(":", 1)[0]
        return f"worker pid {pid}@{host}" if pid else f"worker {self.owner}"

    @property
    def node_name(self) -> str | None:
        """The Celery node name this worker answers a ping with: the recorded one, else the
        default ``wanbatch-PID@HOST`` (``host:pid:``); None when the owner names no pid."""
        if self.node is not None:
            return self.node
        host, _, rest = self.owner.partition(":")
        pid = rest.split(":", 1)[0]
        return f"wanbatch-{pid}@{host}" if pid and host else None


def _live(raw: list[bytes], now_us: bytes | int) -> list[Peer]:
    now = int(now_us) / 1_000_000
    pairs = dict(zip(raw[::2], raw[1::2], strict=True))
    peers = [Peer.parse(owner, value) for owner, value in pairs.items()]
    return sorted(
        (p for p in peers if p is not None and now - p.at <= POLICY_FRESH_SECONDS), key=lambda p: p.owner
    )


def _same(name: str, a: Peer, b: Peer) -> bool:
    if a.settings.get(name) == b.settings.get(name):
        return True
    # One folder by another path on one host (a symlink): the same output (as limits.same_output).
    return name == "WANBATCH_OUTPUT_DIR" and a.output_real is not None and a.output_real == b.output_real


def _names(group: list[Peer]) -> str:
    return ", ".join(p.name for p in group)


def _setting_names(peers: list[Peer]) -> list[str]:
    """Every setting any of ``peers`` published, in the order first met."""
    names: list[str] = []
    for peer in peers:
        names += [name for name in peer.settings if name not in names]
    return names


def _groups(name: str, peers: list[Peer]) -> list[list[Peer]]:
    """``peers`` grouped by their value of ``name`` (:func:`_same`), the largest group first."""
    groups: list[list[Peer]] = []
    for peer in peers:
        for group in groups:
            if _same(name, group[0], peer):
                group.append(peer)
                break
        else:
            groups.append([peer])
    groups.sort(key=len, reverse=True)
    return groups


def _value(group: list[Peer], name: str) -> str:
    return group[0].settings.get(name, "(not published)")


def disagreements(peers: list[Peer]) -> list[str]:
    """One line per setting each worker applies itself to the steps it runs on which the live
    workers ``peers`` disagree, naming the odd worker and its value against the others' (``worker
    pid 123@host: WANBATCH_MEDIA_MISMATCH=fail, the others flag``), or, with no majority, each
    value and its workers. Nothing when they agree. The tick leader's global limits are not
    among them (:data:`LEADER_APPLIED`): one value applies to all, :func:`global_disagreements`."""
    if len(peers) < 2:
        return []
    lines = []
    for name in _setting_names(peers):
        if name in LEADER_APPLIED:
            continue
        groups = _groups(name, peers)
        if len(groups) < 2:
            continue
        if len(groups[0]) > len(groups[1]):
            odd = "; ".join(f"{_names(g)}: {name}={_value(g, name)}" for g in groups[1:])
            lines.append(f"{odd}, the others {_value(groups[0], name)}")
        else:
            lines.append(
                f"the workers disagree on {name}: "
                + "; ".join(f"{_value(g, name)} on {_names(g)}" for g in groups)
            )
    return lines


def global_disagreements(peers: list[Peer], leader: str | None) -> list[str]:
    """One part per global limit (:data:`LEADER_APPLIED`) on which the live workers ``peers``
    disagree, naming the value in force: the tick leader's (``leader``: its ``host:pid:``, from its
    live record; None: no live leader is known), which applies to every worker, and the workers
    that have another (``WANBATCH_MAX_OUTSTANDING: the tick leader's (vm:11452) value 8 applies to
    all workers; worker pid 11460@vm has 20``). Nothing when they agree.

    Not "each worker applies its own", as for the other settings: that was false for these, and
    named no value in force, though it is the leader's, and changes when another worker leads."""
    if len(peers) < 2:
        return []
    chief = next((p for p in peers if p.owner == leader), None)
    who = f" ({leader.rstrip(':')})" if leader else ""
    parts = []
    for name in _setting_names(peers):
        groups = _groups(name, peers) if name in LEADER_APPLIED else []
        if len(groups) < 2:
            continue
        if chief is not None:
            head = f"the tick leader's{who} value {_value([chief], name)} applies to all workers"
            others = [g for g in groups if not _same(name, g[0], chief)]
        elif leader is not None:
            head = f"the tick leader's{who} value applies to all workers (it published no record of its own)"
            others = groups
        else:
            head = "the tick leader's value applies to all workers (no live tick leader is known)"
            others = groups
        rest = "; ".join(f"{_names(g)} {'has' if len(g) == 1 else 'have'} {_value(g, name)}" for g in others)
        parts.append(f"{name}: {head}; {rest}")
    return parts


def peer_warnings(peers: list[Peer], leader: str | None = None, *, leaderless: bool = True) -> list[str]:
    """:func:`disagreements` as one warning line, and :func:`global_disagreements` (``leader``: the
    live tick leader's ``host:pid:``; None: none known) as another (empty when the workers agree).
    ``leaderless`` False: no line for the global limits while no live leader is known (a worker's
    log, between a leader's clean stop and the next one's first publish: said once one is)."""
    lines = []
    found = disagreements(peers)
    if found:
        lines.append(
            f"the workers run with different settings: {'; '.join(found)}. Each worker applies its own "
            "to the steps it runs (a video one fails another flags, a job one retries another fails, "
            "outputs stored in two places), so a batch's outcome depends on which worker ran each job; "
            "give every worker the same settings and restart the odd one"
        )
    limits = global_disagreements(peers, leader) if leader is not None or leaderless else []
    if limits:
        lines.append(
            f"the workers run with different global limits: {'. '.join(limits)}. The tick leader "
            "applies these for every worker (dispatch runs on it alone: the outstanding caps, the "
            "download backlog, the queue-wait back-off, the daily budget and the prices; every "
            "submit, on any worker, is spaced by the leader's rates, or by the worker's own where "
            "stricter), so the values in force change when another worker takes the lead; give "
            "every worker the same settings"
        )
    return lines


@dataclass(frozen=True, slots=True)
class WorkerRecords:
    """What the workers' records for a database say (:func:`read_records`)."""

    #: The live workers (written within :data:`POLICY_FRESH_SECONDS`), by owner.
    peers: list[Peer] = field(default_factory=list)
    #: Workers (``host:pid:``) whose record has not been refreshed for more than
    #: :data:`PEER_GONE_SECONDS`: how long ago each last wrote it (s, by Redis' clock).
    silent: dict[str, float] = field(default_factory=dict)
    #: Why the records could not be read (one line, never a password); None: read, or no Redis.
    error: str | None = None
    #: Every record's age (s, by Redis' clock), by the worker's node name (:attr:`Peer.node_name`;
    #: two records of one name, a worker restarted under a ``--name`` of its own: the newer).
    seen: dict[str, float] = field(default_factory=dict)
    #: Whether the records were read (False: no Redis limiter, or it did not answer).
    read: bool = False
    #: The live tick leader (``host:pid:``, its record: :func:`worker.limits.leader_key`), whose
    #: global limits apply to every worker; None: none published lately.
    leader: str | None = None


def _live_leader(raw_leader: list[bytes], now_us: bytes | int) -> str | None:
    """The tick leader (``host:pid:``) of a leader record as ``HGETALL`` gives it, if it published
    within :data:`worker.limits.POLICY_FRESH_SECONDS` (None: none, or a stopped or dead one's)."""
    found = Leader.parse(raw_leader)
    return found.by if found is not None and found.by and found.fresh(int(now_us) / 1_000_000) else None


def _records(raw: list[bytes], now_us: bytes | int, raw_leader: list[bytes] | None = None) -> WorkerRecords:
    now = int(now_us) / 1_000_000
    silent: dict[str, float] = {}
    seen: dict[str, float] = {}
    for owner, value in zip(raw[::2], raw[1::2], strict=True):
        peer = Peer.parse(owner, value)
        if peer is None:
            continue
        age = max(0.0, now - peer.at)
        if now - peer.at > PEER_GONE_SECONDS:
            silent[peer.owner] = age
        node = peer.node_name
        if node is not None:
            seen[node] = min(age, seen.get(node, age))
    leader = _live_leader(raw_leader or [], now_us)
    return WorkerRecords(_live(raw, now_us), silent, seen=seen, read=True, leader=leader)


def read_records(settings: Settings, database: str | None) -> WorkerRecords:
    """Every worker's record for ``database`` on the limiter's Redis, read once: the live ones
    and the silent ones (ages by Redis' clock, never this host's). Nothing when there is no
    Redis limiter; when it does not answer, why (``error``)."""
    found = backend(settings)
    if found is None:
        return WorkerRecords()
    setting, url = found
    client = _client(url)
    try:
        raw, now_us, raw_leader = client.register_script(READ_PEERS_LUA)(
            keys=[peers_key(database), leader_key(database)]
        )
        return _records(raw, now_us, raw_leader)
    except Exception as exc:  # unreachable, refused: one line, never a traceback
        return WorkerRecords(error=f"{describe(setting, url)}: {_reason(exc, url)}")
    finally:
        client.close()


def read_peers(settings: Settings, database: str | None) -> list[Peer]:
    """The live workers' records for ``database`` on the limiter's Redis; empty when there is no
    Redis limiter, or it does not answer (the limiter's own check says that)."""
    return read_records(settings, database).peers


def silent_since(records: WorkerRecords, now: datetime) -> dict[str, datetime]:
    """When each silent worker (``host:pid:``) was last seen, on ``now``'s clock (its record's
    age by Redis' clock taken from ``now``: no two clocks compared): what ``status`` and the
    dashboard pass as ``silent`` to name the jobs such a worker holds
    (:func:`jobs.listing.dead_holders`)."""
    return {owner: now - timedelta(seconds=age) for owner, age in records.silent.items()}


def unread_warning(records: WorkerRecords) -> str:
    """The line ``status`` prints when the records could not be read ("" when they were)."""
    if records.error is None:
        return ""
    return (
        f"could not read the workers' records on the limiter's Redis {records.error}: a worker "
        "killed on another host is named only once its job leases end, and differing worker "
        "settings are not checked"
    )


def last_seen(records: WorkerRecords, nodes: list[str]) -> dict[str, float | None]:
    """How long ago (s, by Redis' clock) each worker of ``nodes`` (Celery node names, as they
    answer a ping) last wrote its record for this database; None: it has none (a worker of
    another database, or of a version that wrote none). Nothing when the records were not read."""
    if not records.read:
        return {}
    return {node: records.seen.get(node) for node in nodes}


def workers_mismatch(settings: Settings, database: str | None) -> list[str]:
    """What ``doctor`` and ``status`` say about the workers of ``database`` disagreeing."""
    records = read_records(settings, database)
    return peer_warnings(records.peers, records.leader)


def other_key_refusal(settings: Settings, database: str | None, me: str) -> str | None:
    """Why ``wanbatch worker`` must not start beside the live workers of ``database``: one of
    them (``me``, ``host:pid:``, apart: this process's own record from before a fresh start) or
    their tick leader uses another ``FAL_KEY`` (key ids only, never a key). None: every live one
    uses this key, or none is known (no Redis limiter, or it does not answer: said by its checks).

    fal keeps a request for the account that sent it, and tells a key of another account it does
    not exist. On one database a submit task runs on any worker, so the batch's requests would be
    split between two accounts, while the tick leader alone follows them (with its own key: the
    other account's stay queued, paid, never downloaded) and its caps count both accounts' requests
    against one account's limits. Refusing keeps one account per database; a key is rotated by
    stopping every worker, then starting them all with the new one."""
    if settings.fal_key is None:
        return None
    mine = api_key_id(settings)
    others: dict[str, list[str]] = {}
    for peer in read_peers(settings, database):
        shown = peer.settings.get("FAL_KEY", "")
        key = shown.removeprefix("key id ") if shown.startswith("key id ") else None
        if peer.owner != me and key is not None and key != mine:
            others.setdefault(key, []).append(peer.name)
    from worker.limits import read_leadership

    leader = read_leadership(settings, database)[1]
    if leader is not None and leader.by != me and leader.key_id != mine:
        named = f"the tick leader, {leader.by.rstrip(':') or 'unknown'}"
        others.setdefault(leader.key_id, [])
        if not others[leader.key_id]:
            others[leader.key_id].append(named)
    if not others:
        return None
    theirs = "; ".join(f"key id {key} ({', '.join(names)})" for key, names in sorted(others.items()))
    return (
        f"this worker's FAL_KEY (key id {mine}) is not the one the live workers of this database use "
        f"({theirs}): fal answers a request only to a key of the account that sent it, so workers "
        "with keys of two accounts leave each other's requests unfollowed (queued at fal, billed, "
        "never downloaded); the worker was not started: give every worker the same FAL_KEY (to "
        "rotate the key, stop every worker, then start them all with the new one)"
    )


#: This process's Celery node name (:func:`name_this_node`); None: not a Celery worker.
_this_node: str | None = None


def name_this_node(node: str | None) -> None:
    """Say which Celery node name this process's worker answers a ping with (``wanbatch
    worker`` does, before it starts): its :class:`Announcer` records it."""
    global _this_node
    _this_node = node


class Announcer:
    """A worker's record on the limiter's Redis (:func:`peers_key`), written at its beats."""

    def __init__(self, limiter: RedisGCRA, owner: str, node: str | None = None) -> None:
        self.limiter = limiter
        self.owner = owner
        self._announce = limiter.client.register_script(ANNOUNCE_LUA)
        #: Its Celery node name: the one given, else this process's (:func:`name_this_node`).
        self.node = node if node is not None else _this_node
        self._record = Peer.of(owner, limiter.settings, node=self.node).record()
        self._key: str | None = None
        #: The live tick leader (``host:pid:``) as the last :meth:`announce` found it; None: none.
        self.leader: str | None = None
        #: Held while writing or deleting the record.
        self._lock = threading.Lock()
        #: Set by the first :meth:`withdraw`: the record is never written again.
        self._withdrawn = False
        #: Set once a :meth:`withdraw` deleted the record: later calls have nothing to do.
        self._deleted = False
        #: Set once a :meth:`withdraw` said it could not delete the record: said once only.
        self._said_left = False

    @property
    def key(self) -> str:
        """The hash of this worker's database (resolved once, as the limiter's policy key)."""
        if self._key is None:
            self._key = self.limiter.prefix + peers_key(self.limiter.database)
        return self._key

    def announce(self) -> list[Peer]:
        """Write this worker's record; the live workers' (this one's included). Nothing once it
        was withdrawn. Raises the client's error."""
        with self._lock:
            if self._withdrawn:
                return []
            raw, now_us, raw_leader = self._announce(
                keys=[self.key, self.limiter.leader_record],
                args=[self.owner, self._record, PEERS_KEEP_SECONDS],
            )
        self.leader = _live_leader(raw_leader, now_us)
        return _live(raw, now_us)

    def withdraw(self) -> None:
        """A clean stop: this worker's record goes, and is never written again. The loop that
        writes it may still be in a round when the stop comes from another thread (a worker's
        shutdown waits for it only so long): a beat after the delete would leave a record that
        goes stale, and ``status`` would name a cleanly stopped worker gone.

        Safe to repeat. A stopping worker closes its conductor twice (the ticker thread as it
        ends, then the worker's shutdown making sure): a call after one that could not delete the
        record tries again (a brief Redis failure at the first close no longer leaves a record
        that ``status`` names silent for an hour), but "could not delete" is said once: with the
        limiter's Redis down each call said it again, the same record, the same outage."""
        with self._lock:
            self._withdrawn = True
            if self._deleted:
                return
            try:
                self.limiter.client.hdel(self.key, self.owner)
            except client_error() as exc:
                if not self._said_left:
                    self._said_left = True
                    log.warning(
                        "could not delete this worker's record on the limiter's Redis (%s); it goes "
                        "stale by itself and is pruned",
                        _reason(exc, ""),
                        extra={"event": "peers.record_left"},
                    )
                return
            self._deleted = True


def announcer_for(limiter: SubmitLimiter | None, owner: str) -> Announcer | None:
    """This worker's :class:`Announcer` (``owner``: ``host:pid:``); None for the in-process limiter."""
    return Announcer(limiter, owner) if isinstance(limiter, RedisGCRA) else None


def announce_settings(announcer: Announcer | None) -> None:
    """Every worker, at each heartbeat: publish its outcome-deciding settings beside the others'
    and say (once each, :func:`worker.limits.say_mismatch`) where the live workers disagree. An
    unreachable limiter is said by the limiter itself."""
    if announcer is None:
        return
    try:
        peers = announcer.announce()
    except (client_error(), LimiterUnavailableError):
        return
    say_mismatch(peer_warnings(peers, announcer.leader, leaderless=False))


def withdraw_settings(announcer: Announcer | None) -> None:
    """A worker's clean stop: its record goes (:meth:`Announcer.withdraw`)."""
    if announcer is not None:
        announcer.withdraw()
