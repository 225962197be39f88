"""The global submit-rate limiter: GCRA, one clock, shared by every worker on every host.

Why GCRA (https://en.wikipedia.org/wiki/Generic_cell_rate_algorithm) in our own Lua script rather
than a library:

* ``limits`` runs Lua on Redis, but its moving-window strategy passes the *client's*
  ``time.time()`` into the script: hosts with skewed clocks disagree about the window, which is
  exactly the failure a cross-host limit must not have. PyrateLimiter's ``RedisBucket`` has the
  same problem (``now()`` is the local clock; "TODO: use a Redis time source").
* redis-cell (``CL.THROTTLE``) is GCRA done right, but is a Redis *module*: managed Redis often
  forbids ``MODULE LOAD``, and its README calls it best-effort maintained.

So: GCRA (a "theoretical arrival time" per key, no drip process) in one atomic script whose
only clock is ``redis.call('TIME')``. One round trip both checks and takes, so no two workers
can read the same state and both pass (the read-modify-write race of boulder#7780). Tolerance
is zero — one submit per emission interval — so any 1-second window holds at most ``rate``
submits; the interval is ``(1 + jitter_allowance) / rate`` so that network jitter between the
grant and fal's receipt cannot squeeze one more into a window *as fal counts it*.

Keys are per API key (a SHA-256 prefix of ``FAL_KEY``, never the key) and, when
``WANBATCH_SUBMIT_RATE_PER_ENDPOINT`` names the endpoint, per endpoint too: a submit needs a
token from every key that applies, granted all together or not at all.

Embedded mode (no Redis) uses :class:`LocalGCRA`, the same algorithm on this process's
monotonic clock — in that mode this process is the only submitter.

If Redis is unreachable, or answers but refuses the limiter's script (a read-only replica, an
ACL without writes, ``maxmemory`` full), :meth:`SubmitLimiter.acquire` raises
:class:`LimiterUnavailableError` and the caller must not submit (fail closed): the database's
outstanding cap and budget still bound what is in flight, but the rate can no longer be
proven. Such an outage is said, not hidden: a ``run`` or ``worker`` refuses to start without
its limiter (:func:`check_limiter`, exit 2; the check writes, as a submit does, so a Redis
that only reads is refused too), and mid-run :class:`RedisGCRA` logs one warning at most every
:data:`UNREACHABLE_WARN_EVERY_SECONDS` while it lasts and one line when it ends
(:class:`Outage`); dispatch claims nothing meanwhile, so jobs wait ``pending``, none fails.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from jobs.errors import ConfigError, WanbatchError
from jobs.key_forms import hide_keys
from jobs.printable import first_line
from jobs.settings import Settings
from jobs.url_secrets import masked_url
from worker import telemetry
from worker.outage_log import OutageLog

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

KEY_PREFIX = "wanbatch:limits:"
#: While the limiter's Redis does not answer: how long dispatch claims nothing, and a job
#: given back for it waits, before Redis is asked again.
UNREACHABLE_RETRY_SECONDS = 5.0
#: At most one warning per this many seconds while the limiter's Redis stays unreachable.
UNREACHABLE_WARN_EVERY_SECONDS = 30.0
#: Seconds the limiter's Redis has to answer (connect, then each reply): at start-up and per call.
TIMEOUT_SECONDS = 2.0

#: How long a rate key outlives its TAT and hold (``store`` below). Long on purpose: a key a
#: process saw, found missing, then means that the limiter lost its state (a flush, a restart
#: without persistence, an eviction) — the rare case where the next grant waits one interval
#: (``restore``) — and not that nobody submitted for a second. A few keys per API key, kept an hour.
KEY_KEEP_SECONDS = 3600

#: What every script below shares. A key is a hash: ``tat``, its theoretical arrival time, and
#: ``hold``, until when a 429 holds it (:data:`HOLD_OFF_LUA`; absent or past: no pause). The
#: two are apart so that a submit's ordinary spacing (the TAT one interval ahead after any
#: grant) is never read as fal's pause. A plain string is a key written before ``hold``
#: existed: its TAT alone. Values are integer microseconds (< 2^53, exact in Lua's doubles) on
#: Redis' clock; the TTL outlives both by :data:`KEY_KEEP_SECONDS`, so idle keys go.
#: ``state(key)``: a key that is not there reads as TAT now, and says so (a third value, true).
#:
#: ``restore(tat, last, iv)``: where a key that is not there starts, for a process that saw the
#: limiter's state (``last``: the key's TAT as it saw it last, µs; 1 when it saw other keys but
#: not this one; 0 when it saw none). Its TAT as seen last is no floor: another process may have
#: granted after it, unseen here, and that grant's time is lost with the key. What is known is
#: that every grant came before the key was lost, so before now: the key restarts at the later of
#: the TAT seen last (a 429's pause heard here) and now plus one interval — never a shorter gap
#: after anyone's last grant, at the cost of at most one interval after the limiter lost its
#: state (or after :data:`KEY_KEEP_SECONDS` without a submit, or at the first submit under a
#: key this process never saw, such as a new endpoint's own limit: a key never written and one
#: lost look the same). A process that saw no state (``last`` 0: a first start) has nothing to
#: keep to and grants at once; so does one started after the loss, before any process that saw
#: the state asked again (the next such ask writes the restored key back for every process).
#: Why not a shadow copy of the last grant instead: one in the limiter's Redis (the leader's
#: policy hash) is lost with the keys by the same flush or restart; one anywhere else is a
#: second store that every grant would write to, outside the one atomic script.
_LUA_STATE = (
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function state(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'hash' then
    local v = redis.call('HMGET', key, 'tat', 'hold')
    return tonumber(v[1]) or now, tonumber(v[2]) or 0
  elseif kind == 'string' then
    return tonumber(redis.call('GET', key)) or now, 0
  end
  return now, 0, true
end
local function restore(tat, last, iv)
  if last > 0 then return math.max(tat, last, now + iv) end
  return tat
end
local function store(key, tat, hold)
  if redis.call('TYPE', key)['ok'] ~= 'hash' then redis.call('DEL', key) end
  if hold > now then
    redis.call('HSET', key, 'tat', string.format('%.0f', tat), 'hold', string.format('%.0f', hold))
  else
    redis.call('HSET', key, 'tat', string.format('%.0f', tat))
    redis.call('HDEL', key, 'hold')
  end
  redis.call('PEXPIRE', key, math.ceil((math.max(tat, hold) - now) / 1000) + """
    + str(KEY_KEEP_SECONDS * 1000)
    + """)
end
"""
)

#: Checks every key's TAT against Redis' clock; grants (advancing every TAT by its interval)
#: only if all keys allow, else returns the wait in microseconds.
#:
#: ``KEYS``: the rate keys, then the policy's key (:func:`policy_key`); ``ARGV``: each key's
#: interval (µs) as this process's settings make it (0: no limit of its own), then each key's
#: field in the policy, then this process's API key id, then the publish stamp (``at``) of the
#: policy this process saw last (empty: none), then each key's interval in that policy (0: none),
#: then each key's TAT as this process saw it last (µs; 1: none, but other keys' seen; 0: none
#: at all), for ``restore``.
#: Every interval is the longer of this process's and the one the tick leader published for the
#: same API key and database (:meth:`RedisGCRA.publish`), read in the same atomic call: no worker,
#: whatever its own settings, grants faster than the leader's limits. When the policy is missing
#: (the limiter's Redis flushed or restarted, the policy expired or deleted), the policy seen last
#: stands in for it (fail safe) until the leader publishes again. A key whose interval is 0 every
#: way limits nothing here. A key that is missing (the limiter flushed or restarted) starts,
#: for a process that saw the limiter's state, one interval from now or later (``restore``, fail
#: safe): the grant after a flush never comes early or in a burst after the last one any process
#: made, whether this process saw that grant or not; and the key is written back even when the
#: answer is a wait (it always is then), so that every other process keeps to it too.
#:
#: Returns the wait (µs), Redis' clock (µs), the policy as ``HGETALL`` gives it when its stamp is
#: not the one this process saw last (else empty), whether a policy is there (1) or not (0),
#: each key's TAT after the call (µs; 0 for a key that limits nothing), for the next call's fallback,
#: and how many keys this call found missing that this process had seen (a TAT of its own, > 1), and
#: restored (:class:`KeysLost` counts them): a key it never saw (1: the first ask under a new
#: endpoint's own key) is restored all the same, but was never lost, so it is not counted.
GCRA_LUA = (
    _LUA_STATE
    + """
local n = #KEYS - 1
local policy = KEYS[n + 1]
local present = redis.call('EXISTS', policy) == 1
local same_key = present and redis.call('HGET', policy, 'key') == ARGV[2 * n + 1]
local wait = 0
local tats, holds, ivs, restored = {}, {}, {}, {}
for i = 1, n do
  local iv = tonumber(ARGV[i])
  local published
  if same_key then
    published = tonumber(redis.call('HGET', policy, ARGV[n + i]) or '0') or 0
  else
    published = tonumber(ARGV[2 * n + 2 + i]) or 0
  end
  if published > iv then iv = published end
  ivs[i] = iv
  if iv > 0 then
    local tat, hold, missing = state(KEYS[i])
    if missing then tat = restore(tat, tonumber(ARGV[3 * n + 2 + i]) or 0, iv) end
    if tat < now then tat = now end
    restored[i] = missing and tat > now
    tats[i], holds[i] = tat, hold
    if tat - now > wait then wait = tat - now end
  end
end
local seen = {}
if same_key and (redis.call('HGET', policy, 'at') or '') ~= ARGV[2 * n + 2] then
  seen = redis.call('HGETALL', policy)
end
local there = 0
if present then there = 1 end
local after = {}
for i = 1, n do after[i] = tats[i] or 0 end
local lost = 0
for i = 1, n do
  if restored[i] and (tonumber(ARGV[3 * n + 2 + i]) or 0) > 1 then lost = lost + 1 end
end
if wait > 0 then
  for i = 1, n do
    if restored[i] then store(KEYS[i], tats[i], holds[i]) end
  end
  return {wait, now, seen, there, after, lost}
end
for i = 1, n do
  if ivs[i] > 0 then
    store(KEYS[i], tats[i] + ivs[i], holds[i])
    after[i] = tats[i] + ivs[i]
  end
end
return {0, now, seen, there, after, lost}
"""
)


#: fal's 429: pushes every key's TAT to at least ``now + ARGV[1]`` µs (no key grants again
#: before then) and records that pause as the key's ``hold``; neither ever earlier than it was.
#: Then ``ARGV``: each key's interval (µs), then its TAT as this process saw it last (as
#: :data:`GCRA_LUA`'s): a key that is missing starts where a grant would restore it (``restore``),
#: so that a pause shorter than the interval, heard right after a flush, cannot open a shorter
#: gap. Returns Redis' clock and each key's TAT after the call (µs).
HOLD_OFF_LUA = (
    _LUA_STATE
    + """
local until_ = now + tonumber(ARGV[1])
local n = #KEYS
local after = {}
for i, key in ipairs(KEYS) do
  local tat, hold, missing = state(key)
  if missing then tat = restore(tat, tonumber(ARGV[1 + n + i]) or 0, tonumber(ARGV[1 + i]) or 0) end
  if tat < until_ or hold < until_ then
    store(key, math.max(tat, until_), math.max(hold, until_))
  end
  after[i] = math.max(tat, until_)
end
return {now, after}
"""
)


#: The API key's 429 pause (its ``hold``; Redis' clock when none) and Redis' clock, both in
#: microseconds: how long fal's pause still holds every submit. Not the TAT: a submit's
#: ordinary spacing is no pause. Then whether the policy ``KEYS[2]`` is there (1) or not (0): the
#: leader, which asks at each dispatch round, publishes again at once when it is gone.
PAUSE_LEFT_LUA = (
    _LUA_STATE
    + """
local _, hold = state(KEYS[1])
return {hold, now, redis.call('EXISTS', KEYS[2])}
"""
)


#: :data:`PAUSE_LEFT_LUA`'s answer, after writing ``KEYS[2]`` (a key of its own, gone in a
#: second): whether Redis takes the writes a submit's token needs. The start-up check asks it,
#: and dispatch while the limiter is said to be down (a Redis that reads but refuses writes,
#: such as a read-only replica, must not pass for back). It grants nothing and changes no limit.
CHECK_LUA = (
    _LUA_STATE
    + """
redis.call('SET', KEYS[2], '1', 'PX', 1000)
local _, hold = state(KEYS[1])
return {hold, now}
"""
)

#: The key :data:`CHECK_LUA` writes, after the API key's own: beside its limits, so an ACL that
#: lets the limiter write those lets it write this (no endpoint's key: an endpoint id has a /).
CHECK_KEY_SUFFIX = ":limiter-check"

#: How long the copy of the limits published last (:func:`last_policy_key`) outlives the last
#: beat of the leader that published it: long past the policy's hour, so that a leader taking
#: over after the previous one stopped (cleanly: its policy deleted; or died: gone stale) still
#: learns what the limits in force were, and says what its own change. One small hash per API
#: key and database.
LAST_POLICY_KEEP_SECONDS = 7 * 24 * 3600


#: The tick leader's limits replace those published before (returned, as ``HGETALL`` gives them,
#: with Redis' clock in µs): ``KEYS[1]`` the policy (:func:`policy_key`), ``KEYS[2]`` the
#: database's leader record (:func:`leader_key`); ``ARGV``: the TTL in seconds, then field, value,
#: field, value… The field ``at`` is set to Redis' clock (µs): when it was published, by which
#: :data:`POLICY_FRESH_SECONDS` tells a live leader's from a dead one's. The leader record gets the
#: policy's ``key``, ``by`` and ``at``, with the same TTL: which API key the database's leader uses,
#: for a worker with another ``FAL_KEY`` (whose policy is another key's) to learn that it differs.
#: ``KEYS[3]`` (:func:`last_policy_key`), when given, is replaced by the policy's ``key``, ``by``,
#: ``at`` and ``limits``, kept :data:`LAST_POLICY_KEEP_SECONDS`, and what it held is returned
#: third: the limits published last before these, by whichever leader, even one that has stopped
#: since (a clean stop deletes the policy, never this copy), for the new leader to say what changed.
PUBLISH_LUA = (
    """
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
local before = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('HSET', KEYS[1], 'at', now)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
redis.call('DEL', KEYS[2])
local key, by = redis.call('HGET', KEYS[1], 'key'), redis.call('HGET', KEYS[1], 'by')
redis.call('HSET', KEYS[2], 'key', key, 'by', by, 'at', now)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
local last = {}
if #KEYS > 2 then
  last = redis.call('HGETALL', KEYS[3])
  redis.call('DEL', KEYS[3])
  local limits = redis.call('HGET', KEYS[1], 'limits')
  redis.call('HSET', KEYS[3], 'key', key, 'by', by, 'at', now, 'limits', limits)
  redis.call('EXPIRE', KEYS[3], """
    + str(LAST_POLICY_KEEP_SECONDS)
    + """)
end
return {before, now, last}
"""
)

#: The policy ``KEYS[1]`` as ``HGETALL`` gives it, Redis' clock (µs), and the leader record
#: ``KEYS[2]`` (:func:`leader_key`) as ``HGETALL`` gives it (empty when none, or not asked).
READ_POLICY_LUA = """
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
local leader = {}
if #KEYS > 1 then leader = redis.call('HGETALL', KEYS[2]) end
return {redis.call('HGETALL', KEYS[1]), now, leader}
"""

#: A leader's clean stop: deletes the policy ``KEYS[1]`` and the leader record ``KEYS[2]``, each
#: if the process ``ARGV[1]`` published it (another leader's stays).
UNPUBLISH_LUA = """
local gone = 0
for _, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'by') == ARGV[1] then gone = gone + redis.call('DEL', key) end
end
return gone
"""


class LimiterUnavailableError(WanbatchError):
    """The shared limiter cannot be reached: nothing may be submitted until it is back."""


@dataclass(frozen=True, slots=True)
class RateKey:
    """One limit a submit must pass: a key and the time between two submits under it."""

    key: str
    interval: float
    #: The field of the policy (:func:`policy_key`) that holds the tick leader's interval for this key.
    field: str = "iv"


class SubmitLimiter(Protocol):
    """What ``worker.steps.submit`` asks right before the POST."""

    def acquire(self, endpoint: str) -> float:
        """0.0 when this submit may go now (the token is taken); else seconds to wait.

        Raises :class:`LimiterUnavailableError` when the limiter's store is unreachable.
        """
        ...

    def pause_left(self) -> float:
        """Seconds a 429's pause (:meth:`hold_off`), heard by any worker, still holds every
        submit of the API key back (0.0 when none does).

        Dispatch asks, to claim nothing meanwhile. Only such a pause counts, never the
        ordinary spacing between two submits (after any grant the next is one interval away):
        read as a pause, that spacing held dispatch back one interval more per job, and the
        rate ran at half its setting. Raises :class:`LimiterUnavailableError` like
        :meth:`acquire`.
        """
        ...

    def hold_off(self, endpoint: str, seconds: float) -> None:
        """Grant no submit of ``endpoint``'s keys for ``seconds`` from now (fal said 429).

        Every key that applies is held, the API key's too: fal refused the account, and every
        worker sharing the key waits, not only the one that heard it. Never shortens a wait
        already due. Raises :class:`LimiterUnavailableError` like :meth:`acquire`.
        """
        ...


def api_key_id(settings: Settings) -> str:
    """A stable, non-reversible name for the API key (never the key itself)."""
    return _key_name(settings.fal_key.get_secret_value() if settings.fal_key is not None else "")


@functools.lru_cache(maxsize=8)
def _key_name(key: str) -> str:
    # Asked on every dispatch round and submit; a process uses one key (tests a few).
    return hashlib.sha256(key.encode()).hexdigest()[:16] if key else "no-key"


def api_key_rate(settings: Settings) -> RateKey:
    """The API key's own limit: every submit with the key, whatever the endpoint, passes it."""
    spread = 1.0 + settings.submit_jitter_allowance
    return RateKey(f"{KEY_PREFIX}{api_key_id(settings)}:submit", spread / settings.submit_rate)


def stale_grant_seconds(settings: Settings) -> float:
    """How old a granted submit may be when its POST is about to go out.

    The spacing leaves ``submit_jitter_allowance`` seconds per window for the spread between
    grant and fal's receipt; half of it is for this process (recording the lease), half for the
    network. A grant older than that (a stalled commit) is void and the submit takes a fresh one:
    otherwise several workers stalled on the same database would send their grants together,
    more than the rate in one of fal's windows. No allowance, no check (every grant would be stale).
    """
    allowance = settings.submit_jitter_allowance
    return allowance / 2 if allowance > 0 else math.inf


def _int(value: str | None) -> int:
    """A published interval (µs) as the policy holds it; 0 when none or unreadable."""
    try:
        return int(value or 0)
    except ValueError:
        return 0


def rate_keys(settings: Settings, endpoint: str) -> list[RateKey]:
    """The limits that apply to one submit of ``endpoint``: the API key's, and the endpoint's if set."""
    own = api_key_rate(settings)
    per_endpoint = settings.submit_rate_per_endpoint.get(endpoint)
    if per_endpoint is None or per_endpoint <= 0:
        return [own]
    spread = 1.0 + settings.submit_jitter_allowance
    return [own, RateKey(f"{own.key}:{endpoint}", spread / per_endpoint, f"ep:{endpoint}")]


def _with_endpoint_key(settings: Settings, endpoint: str) -> list[RateKey]:
    """:func:`rate_keys`, always with the endpoint's key (interval 0 when this process sets no
    limit there): the tick leader may have published one (:data:`GCRA_LUA`)."""
    keys = rate_keys(settings, endpoint)
    if len(keys) == 1:
        keys.append(RateKey(f"{keys[0].key}:{endpoint}", 0.0, f"ep:{endpoint}"))
    return keys


# --------------------------------------------------------------------------- the published limits

#: How long a published policy outlives the last beat of the leader that published it.
POLICY_TTL_SECONDS = 3600
#: How old a published policy may be (three of the leader's beats, ``HEARTBEAT_SECONDS``) and
#: still be said to be a live leader's: older, it is a stopped or dead leader's, and no warning
#: names it (the grants still honour it, :data:`GCRA_LUA`: erring on the strict side).
POLICY_FRESH_SECONDS = 30.0


def policy_key(key_id: str, database: str | None) -> str:
    """The Redis hash in which the tick leader publishes its limits for every worker
    (:meth:`RedisGCRA.publish`): the submit intervals every grant honours (:data:`GCRA_LUA`), and
    what it applies at dispatch, for the workers, ``doctor`` and ``status`` to compare with their own.

    One per API key id (fal's limits are per account) and per database (``database``: its
    fingerprint, :func:`worker.steps.webhooks.database_fingerprint`; None: not known, a process
    without one): two deployments sharing a limiter Redis (staging and production, several
    SQLite runs) each keep their own leader's."""
    return f"{KEY_PREFIX}{key_id}:{database or 'no-database'}:policy"


def last_policy_key(key_id: str, database: str | None) -> str:
    """The copy of the limits published last for ``key_id`` and ``database`` (:data:`PUBLISH_LUA`):
    the policy (:func:`policy_key`) goes when its leader stops cleanly, this copy stays
    (:data:`LAST_POLICY_KEEP_SECONDS`), so the next leader compares its limits with the ones that
    were in force, not with none (:func:`publish_limits`)."""
    return f"{policy_key(key_id, database)}:last"


def leader_key(database: str | None) -> str:
    """The Redis hash naming the API key (its id, :func:`api_key_id`) the tick leader of
    ``database`` (its fingerprint; None: not known) uses, who it is and when it last published
    (:data:`PUBLISH_LUA`): one per database, whatever the key, so that a worker with another
    ``FAL_KEY`` — which reads another key's policy (:func:`policy_key`) — learns of the leader too."""
    return f"{KEY_PREFIX}{database or 'no-database'}:leader"


@dataclass(frozen=True, slots=True)
class Leader:
    """The tick leader of a database as its record (:func:`leader_key`) names it."""

    key_id: str
    by: str
    #: When it last published (Redis' clock, epoch seconds).
    at: float

    @classmethod
    def parse(cls, raw: list[bytes] | dict[bytes, bytes]) -> Leader | None:
        """The leader of a :func:`leader_key` hash (a dict, or ``HGETALL``'s flat list); None: none."""
        fields = raw if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2], strict=True))
        try:
            by = fields.get(b"by", b"").decode()
            return cls(fields[b"key"].decode(), by, int(fields[b"at"]) / 1_000_000)
        except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError):
            return None

    def fresh(self, now: float) -> bool:
        """Whether it published lately (:data:`POLICY_FRESH_SECONDS`; ``now``: Redis' clock, s)."""
        return now - self.at <= POLICY_FRESH_SECONDS


@dataclass(frozen=True, slots=True)
class Limits:
    """The global limits as one process's settings make them, or as the tick leader published
    them (``by``: the leader's process, ``host:pid:``)."""

    key_id: str
    submit_rate: float
    jitter: float
    max_outstanding: int
    rate_per_endpoint: dict[str, float]
    outstanding_per_endpoint: dict[str, int]
    by: str = ""
    #: When the leader published them (Redis' clock, epoch seconds); 0.0: not published.
    at: float = 0.0
    #: Where the process's outputs go (:func:`output_location`) and fal's URLs it sends to
    #: (credentials masked): no limits, nothing a grant reads, only compared with a worker's own
    #: (:func:`elsewhere`), never enforced. None: not published (a leader of a version before they
    #: were, whose policy has no ``where`` field): not compared.
    output: str | None = None
    #: The same folder with its symlinks followed (:func:`output_real`); None for object storage.
    output_real: str | None = None
    fal_queue_url: str | None = None
    fal_rest_url: str | None = None

    @classmethod
    def of(cls, settings: Settings, by: str = "") -> Limits:
        return cls(
            key_id=api_key_id(settings),
            submit_rate=float(settings.submit_rate),
            jitter=float(settings.submit_jitter_allowance),
            max_outstanding=int(settings.max_outstanding),
            rate_per_endpoint={k: float(v) for k, v in settings.submit_rate_per_endpoint.items() if v > 0},
            outstanding_per_endpoint={k: int(v) for k, v in settings.max_outstanding_per_endpoint.items()},
            by=by,
            output=output_location(settings),
            output_real=output_real(settings),
            fal_queue_url=fal_location(settings.fal_queue_url),
            fal_rest_url=fal_location(settings.fal_rest_url),
        )

    def fresh(self, now: float) -> bool:
        """Whether a live leader published these lately (``now``: Redis' clock, epoch seconds)."""
        return now - self.at <= POLICY_FRESH_SECONDS

    def fields(self) -> dict[str, str]:
        """The hash :func:`policy_key` names holds: the intervals :data:`GCRA_LUA` reads, and the rest."""
        spread = 1.0 + self.jitter
        out = {
            "key": self.key_id,
            "by": self.by,
            "iv": str(round(spread / self.submit_rate * 1_000_000)),
            "limits": json.dumps(
                {
                    "submit_rate": self.submit_rate,
                    "jitter": self.jitter,
                    "max_outstanding": self.max_outstanding,
                    "rate_per_endpoint": self.rate_per_endpoint,
                    "outstanding_per_endpoint": self.outstanding_per_endpoint,
                },
                sort_keys=True,
            ),
        }
        where = {name: getattr(self, name) for name in _WHERE if getattr(self, name) is not None}
        if where:  # a field of its own: a previous version's reader takes ``limits`` alone
            out["where"] = json.dumps(where, sort_keys=True)
        for endpoint, rate in self.rate_per_endpoint.items():
            out[f"ep:{endpoint}"] = str(round(spread / rate * 1_000_000))
        return out

    @classmethod
    def parse(cls, raw: dict[bytes, bytes]) -> Limits | None:
        """The limits of a :func:`policy_key` hash; None when there is none (or it is not ours)."""
        try:
            doc = json.loads(raw[b"limits"])
            where = _where(raw.get(b"where"))
            return cls(
                key_id=raw[b"key"].decode(),
                submit_rate=float(doc["submit_rate"]),
                jitter=float(doc["jitter"]),
                max_outstanding=int(doc["max_outstanding"]),
                rate_per_endpoint={str(k): float(v) for k, v in doc["rate_per_endpoint"].items()},
                outstanding_per_endpoint={str(k): int(v) for k, v in doc["outstanding_per_endpoint"].items()},
                by=raw.get(b"by", b"").decode(),
                at=int(raw.get(b"at", b"0")) / 1_000_000,
                output=where.get("output"),
                output_real=where.get("output_real"),
                fal_queue_url=where.get("fal_queue_url"),
                fal_rest_url=where.get("fal_rest_url"),
            )
        except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError):
            return None

    def _differing(self, other: Limits) -> list[tuple[str, object, object]]:
        """Each limit (the API key apart) whose value differs: its variable, this one's, ``other``'s."""
        pairs: list[tuple[str, object, object]] = [
            ("WANBATCH_SUBMIT_RATE", self.submit_rate, other.submit_rate),
            ("WANBATCH_SUBMIT_JITTER_ALLOWANCE", self.jitter, other.jitter),
            ("WANBATCH_SUBMIT_RATE_PER_ENDPOINT", self.rate_per_endpoint, other.rate_per_endpoint),
            ("WANBATCH_MAX_OUTSTANDING", self.max_outstanding, other.max_outstanding),
            (
                "WANBATCH_MAX_OUTSTANDING_PER_ENDPOINT",
                self.outstanding_per_endpoint,
                other.outstanding_per_endpoint,
            ),
        ]
        return [(name, mine, theirs) for name, mine, theirs in pairs if mine != theirs]

    def differences(self, other: Limits) -> list[str]:
        """``NAME here, other there`` for each limit that differs (the API key apart)."""
        differing = self._differing(other)
        return [f"{name} {_shown(mine)} here, {_shown(theirs)} there" for name, mine, theirs in differing]

    def changes(self, before: Limits) -> list[str]:
        """``NAME before -> now`` for each limit these change from ``before`` (the API key apart)."""
        return [f"{name} {_shown(old)} -> {_shown(new)}" for name, new, old in self._differing(before)]


#: The fields of :class:`Limits` that say where a process works rather than how fast.
_WHERE = ("output", "output_real", "fal_queue_url", "fal_rest_url")


def _where(raw: bytes | None) -> dict[str, str]:
    """The ``where`` field of a published policy (:meth:`Limits.fields`), each value a string; a
    value missing or not a string, or a field missing or not JSON (a leader of a version before
    it, or a policy written by hand), is left out: not compared, never a crash nor a warning."""
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {}
    return {name: doc[name] for name in _WHERE if isinstance(doc.get(name), str) and doc[name]}


def output_location(settings: Settings) -> str:
    """Where this process's outputs go, as :func:`mismatch` compares it: ``WANBATCH_OUTPUT_DIR``'s
    ``s3://bucket/prefix`` as given (normalised by the settings, no credentials: they are refused
    there), else its folder made absolute against this process's working folder and normalised
    (``a/../b``), symlinks not followed: two hosts' same path is taken for the same (shared)
    folder, whatever each host's symlinks lead to (``/data`` a symlink on one, a mount on the
    other). Another path to the same folder on one host is matched by :func:`output_real`."""
    if settings.output_url:
        return settings.output_url
    return os.path.normpath(settings.output_dir.absolute())


def output_real(settings: Settings) -> str | None:
    """The output folder with its symlinks followed, for :func:`same_output` (None for object
    storage, or a path that cannot be resolved: a symlink loop, an unreadable parent)."""
    if settings.output_url:
        return None
    try:
        return str(settings.output_dir.resolve())
    except (OSError, RuntimeError):
        return None


def same_output(mine: Limits, theirs: Limits) -> bool:
    """Whether two processes' outputs go to one place: the same location as written (made
    absolute: one path every host shares, whatever its symlinks lead to on each), or the same
    folder once symlinks are followed (another path to it on one host)."""
    if mine.output == theirs.output:
        return True
    return mine.output_real is not None and mine.output_real == theirs.output_real


def fal_location(url: str) -> str:
    """fal's URL as :func:`elsewhere` compares and the leader publishes it: scheme, host, port and
    path only — no user, password, query, fragment or path parameters, where a proxy's token may
    stand (nothing secret reaches Redis or a log line) — with the scheme and host in lower case and
    a default port left out, so ``HTTPS://Queue.Fal.Run:443/`` is ``https://queue.fal.run``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(not a URL)"
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"https": 443, "http": 80}.get(scheme)
    netloc = host if port is None or port == default else f"{host}:{port}"
    path = "/".join(segment.split(";", 1)[0] for segment in parts.path.split("/")).rstrip("/")
    return hide_keys(f"{scheme}://{netloc}{path}")  # refused in a URL by the settings: the last line


def _shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return json.dumps({k: value[k] for k in sorted(value)}) if value else "(none)"
    return str(value)


def _other_key(mine: str, by: str, theirs: str) -> str:
    """The line saying this process's API key is not the tick leader's (key ids only, never a key)."""
    return (
        f"this process's FAL_KEY (key id {mine}) is not the key the tick leader "
        f"({by.rstrip(':') or 'unknown'}) uses (key id {theirs}): its submits count against another "
        "fal account, outside the limits the other workers keep; give every worker the same FAL_KEY"
    )


def mismatch(settings: Settings, published: Limits | None, leader_found: Leader | None = None) -> list[str]:
    """What this process should say, one line each, when its settings are not the limits the
    tick leader published (``published``; None: none published for this process's API key), or
    when the database's leader (``leader_found``, its record: :func:`leader_key`) uses another
    API key: nothing when they agree."""
    if settings.fal_key is None:  # no key: this process submits nothing
        return []
    mine = Limits.of(settings)
    if leader_found is not None and leader_found.key_id != mine.key_id:
        return [_other_key(mine.key_id, leader_found.by, leader_found.key_id)]
    if published is None:
        return []
    leader = f"the tick leader ({published.by.rstrip(':') or 'unknown'})"
    if mine.key_id != published.key_id:
        return [_other_key(mine.key_id, published.by, published.key_id)]
    lines = []
    if found := mine.differences(published):
        lines.append(
            f"this process's limits differ from those {leader} applies to every worker: "
            f"{'; '.join(found)}. The leader's apply to all (a submit rate set stricter here also "
            "slows every submit this process makes); set the same values on every worker"
        )
    return lines + elsewhere(mine, published, leader)


def elsewhere(mine: Limits, published: Limits, leader: str) -> list[str]:
    """One line for each of what :func:`mismatch` says besides the limits, when this process's
    settings differ from the tick leader's (``leader``: how the line names it): where its outputs
    go (``WANBATCH_OUTPUT_DIR``), and which fal it sends to (``WANBATCH_FAL_QUEUE_URL``,
    ``WANBATCH_FAL_REST_URL``; credentials masked on both sides). A value the leader did not
    publish (a previous version's) is not compared. Said, never enforced, as the limits are:
    either side may be the one to fix, and a host that only watches (``status``, ``doctor``)
    may differ on purpose."""
    lines = []
    if published.output is not None and not same_output(mine, published):
        lines.append(
            f"this process's outputs go elsewhere than those of {leader}: WANBATCH_OUTPUT_DIR "
            f"{mine.output} here, {published.output} there. Each worker stores the videos it "
            "downloads in its own location, so a batch's outputs are split between the two, while "
            "`wanbatch export` and the dashboard, run with either setting, look for all of them in "
            "one (and a local folder may be on one host's disk only); set the same "
            "WANBATCH_OUTPUT_DIR on every worker and wherever those commands run: the same "
            "s3:// URL, or an absolute path to one folder every host shares"
        )
    urls = [
        (name, here, there)
        for name, here, there in (
            ("WANBATCH_FAL_QUEUE_URL", mine.fal_queue_url, published.fal_queue_url),
            ("WANBATCH_FAL_REST_URL", mine.fal_rest_url, published.fal_rest_url),
        )
        if there is not None and here != there
    ]
    if urls:
        lines.append(
            f"this process sends to another fal than {leader}: "
            f"{'; '.join(f'{name} {here} here, {there} there' for name, here, there in urls)}. "
            "The requests it submits (and the images it uploads) go to its URL, while the leader "
            "follows every request at its own, where those are unknown: such jobs fail as "
            "requests fal lost (and a simulator's are not real renders; real fal's are paid for "
            "while the others simulate); set the same WANBATCH_FAL_QUEUE_URL and "
            "WANBATCH_FAL_REST_URL on every worker"
        )
    return lines


def read_leadership(settings: Settings, database: str | None) -> tuple[Limits | None, Leader | None]:
    """What the tick leader of ``database`` (its fingerprint) published on the limiter's Redis:
    its limits for this process's API key (:func:`policy_key`), and its record (:func:`leader_key`:
    which API key it uses, whatever this process's). Either is None when not there, when older than
    :data:`POLICY_FRESH_SECONDS` (a stopped or dead leader's), when the limiter is in process, or
    when its Redis does not answer (the start-up check says that)."""
    found = backend(settings)
    if found is None:
        return None, None
    client = _client(found[1])
    try:
        raw, now_us, raw_leader = client.register_script(READ_POLICY_LUA)(
            keys=[policy_key(api_key_id(settings), database), leader_key(database)]
        )
        published = Limits.parse(dict(zip(raw[::2], raw[1::2], strict=True)))
        leader = Leader.parse(raw_leader)
    except Exception:  # unreachable, refused: said by the limiter's own checks
        return None, None
    finally:
        client.close()
    now = int(now_us) / 1_000_000
    return (
        published if published is not None and published.fresh(now) else None,
        leader if leader is not None and leader.fresh(now) else None,
    )


def published_mismatch(settings: Settings, database: str | None) -> list[str]:
    """What ``worker`` at start-up, ``status`` and ``doctor`` say (:func:`mismatch`) about the
    tick leader of ``database``: its limits when they differ from this process's settings, or
    that it uses another ``FAL_KEY``. Nothing when none is there or the limiter does not answer."""
    return mismatch(settings, *read_leadership(settings, database))


def client_error() -> type[Exception]:
    """Redis' own error root, imported when a Redis limiter is in use (never by an embedded run)."""
    import redis

    return redis.RedisError


# --------------------------------------------------------------------------- where the limiter is


def backend(settings: Settings) -> tuple[str, str] | None:
    """The setting that names the limiter's Redis and its URL; None: the in-process limiter."""
    url = settings.limits_backend_url()
    if not url:
        return None
    return ("WANBATCH_LIMITS_URL" if settings.limits_url else "WANBATCH_BROKER_URL"), url


def describe(setting: str, url: str) -> str:
    """``redis://:**@host:6379/0 (WANBATCH_LIMITS_URL)``: where the limiter is, for messages."""
    return f"{masked_url(url)} ({setting})"


#: What Redis adds to an error raised inside a script: its SHA and line, no help to anyone.
_SCRIPT_SUFFIX = re.compile(r"[.\s]*\bscript: [0-9a-f]{40}\b.*$")


def _reason(exc: BaseException, url: str) -> str:
    """The first line of a Redis client's error, never a password that was in ``url``."""
    text = _SCRIPT_SUFFIX.sub("", first_line(exc)).rstrip(".") or type(exc).__name__
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "**") if password else text


def _client(url: str) -> redis.Redis[bytes]:
    import redis  # only a deployment with Redis loads its client (an embedded run never does)

    return redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_SECONDS, socket_timeout=TIMEOUT_SECONDS)


def _refused(exc: BaseException) -> bool:
    """Whether Redis answered and refused (an error reply: read-only replica, ACL, out of
    memory), rather than not answering (refused connection, timeout, password, loading)."""
    import redis

    return isinstance(exc, redis.ResponseError)


@dataclass(frozen=True, slots=True)
class LimiterProbe:
    """What asking the limiter's Redis once found (:func:`probe_limiter`)."""

    #: The setting that names it (``WANBATCH_LIMITS_URL`` or ``WANBATCH_BROKER_URL``).
    setting: str
    #: Its URL, password masked, and the setting: :func:`describe`.
    where: str
    #: None when it answered and took the write; else the client's error, one line.
    error: str | None = None
    #: Whether it answered and refused the limiter's script (rather than not answering).
    refused: bool = False

    def problem(self) -> str | None:
        """One line saying what is wrong; None when nothing is."""
        if self.error is None:
            return None
        if self.refused:
            return (
                f"the submit-rate limiter's Redis at {self.where} answers but refuses the limiter's "
                f"script: {self.error}"
            )
        return f"cannot reach the submit-rate limiter's Redis at {self.where}: {self.error}"

    def remedy(self) -> str:
        """What to do about :meth:`problem`, lower case."""
        if self.refused:
            return (
                f"point {self.setting} at a Redis the limiter may write to (a primary, not a read-only "
                f"replica; Lua scripts and {KEY_PREFIX}* keys allowed; memory to spare)"
            )
        return f"start it or fix {self.setting}"


def probe_limiter(settings: Settings) -> LimiterProbe | None:
    """Ask the limiter's Redis once, as a submit would (the connection, the password, the right
    to run scripts and to write beside its keys: :data:`CHECK_LUA`, which grants nothing), None
    when the limiter is in process. Bounded: the client's timeouts, and a thread for what they
    do not cover (a name that takes long to resolve)."""
    found = backend(settings)
    if found is None:
        return None
    setting, url = found
    where = describe(setting, url)
    failure: list[BaseException] = []

    def attempt() -> None:
        try:
            limiter = RedisGCRA(settings, _client(url), where=where, url=url)
            try:
                limiter._check_now()
            finally:
                limiter.close()
        except Exception as exc:  # any client error (refused, auth, ACL, read-only, a bad answer): one line
            failure.append(exc)

    thread = threading.Thread(target=attempt, name="wanbatch-limiter-check", daemon=True)
    thread.start()
    thread.join(2 * TIMEOUT_SECONDS + 2.0)
    if thread.is_alive():
        return LimiterProbe(setting, where, f"no answer within {2 * TIMEOUT_SECONDS + 2.0:.0f}s")
    if not failure:
        return LimiterProbe(setting, where)
    return LimiterProbe(setting, where, _reason(failure[0], url), refused=_refused(failure[0]))


def check_limiter(settings: Settings) -> None:
    """Raise :class:`ConfigError` (exit 2, one line) unless the limiter's Redis answers and
    takes the limiter's writes.

    Called by ``run``/``rerun`` and ``worker`` before anything is stored or sent: without it a
    run whose ``WANBATCH_LIMITS_URL`` led nowhere, or to a read-only replica, held every job
    back without end."""
    probed = probe_limiter(settings)
    problem = probed.problem() if probed is not None else None
    if probed is None or problem is None:
        return
    remedy = probed.remedy()
    raise ConfigError(f"{problem}. {remedy[0].upper()}{remedy[1:]}; nothing was sent")


#: While a worker started afresh waits for the limiter's Redis (:func:`wait_for_limiter`), how
#: often it asks again.
RESTART_CHECK_EVERY_SECONDS = 2.0


def wait_for_limiter(
    settings: Settings,
    *,
    pause: float = RESTART_CHECK_EVERY_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """:func:`check_limiter` for a ``wanbatch worker`` started afresh after Celery stopped it on
    its own (a broker connection lost, a Redis out of memory): its limiter's Redis unreachable
    or refusing the limiter's script is then an outage under way, not a mistake in the
    configuration that was checked when it first started. So it waits, as a running worker
    waits for its limiter (:class:`Outage`: one warning line, again every
    :data:`UNREACHABLE_WARN_EVERY_SECONDS`, and one when it answers), instead of ending with
    exit 2 and leaving the deployment with one worker fewer. Returns at once when it answers."""
    probed = probe_limiter(settings)
    if probed is None or probed.error is None:
        return
    log.warning(
        "this worker, started afresh, waits for the submit-rate limiter's Redis at %s before it "
        "starts again (no task runs meanwhile)",
        probed.where,
        extra={"event": "worker.limiter_wait"},
    )
    outage = Outage(probed.where, clock=clock)
    while probed is not None and probed.error is not None:
        outage.failed(probed.error, refused=probed.refused)
        sleep(pause)
        probed = probe_limiter(settings)
    outage.answered()


class Outage:
    """Whether the limiter's Redis answers, and saying so within bounds.

    Every failed call is :meth:`failed`, every answered one :meth:`answered`. The first failure
    is a warning at once, then one every ``every`` seconds while the outage lasts (not one per
    job and retry); the first answer after it a line saying that sending resumes. ``refused``:
    Redis answered with an error (a read-only replica, an ACL, ``maxmemory``) rather than not
    at all, and the words say so.
    """

    def __init__(
        self,
        where: str,
        every: float = UNREACHABLE_WARN_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.where = where
        self._log = OutageLog(every, clock)
        self.error = ""
        #: Whether the last failure was an error reply (Redis answered and refused).
        self.refused = False

    @property
    def clock(self) -> Callable[[], float]:
        """Monotonic seconds (replaced in tests)."""
        return self._log.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self._log.clock = clock

    def failed(self, error: str, *, refused: bool = False) -> None:
        self.error = error
        self.refused = refused
        said = self._log.failed()
        if said.due:
            if refused:
                what, until = f"answers but refuses the limiter's script{said.for_how_long}", "accepts it"
            else:
                what, until = f"is unreachable{said.for_how_long}", "answers"
            log.warning(
                "the submit-rate limiter's Redis at %s %s: %s; nothing is submitted until it %s "
                "(jobs wait, none fails)",
                self.where,
                what,
                error,
                until,
                extra={"event": "limiter.unavailable"},
            )

    def answered(self) -> None:
        lasted = self._log.answered()
        if lasted is not None:
            log.warning(
                "the submit-rate limiter's Redis at %s %s again after %.0fs: sending resumes",
                self.where,
                "accepts the limiter's script" if self.refused else "answers",
                lasted,
                extra={"event": "limiter.recovered"},
            )

    @property
    def down(self) -> bool:
        """Whether the limiter is said to be unreachable or refusing (until it answers again)."""
        return self._log.down

    def note(self) -> str | None:
        """What the progress line says while the limiter is unreachable; None while it answers."""
        if not self._log.down:
            return None
        if self.refused:
            return "limiter refused by its Redis: submits held"
        return "limiter unreachable: submits held"


#: How many grants in a row must find a rate key this process saw gone (and restore it, one
#: interval from now) before the limiter says that its keys are being evicted. One is a flush or
#: a restart, the case ``restore`` is for: the grant writes the key back, and the next finds it.
#: A second in a row means it went again within one interval, which two flushes can still do;
#: three cannot be one loss, and at 2 submits a second is 1.5 s of held submits: soon enough.
EVICTED_IN_A_ROW = 3
#: While grants keep finding the keys gone, the warning is said again at most this often.
EVICTED_WARN_EVERY_SECONDS = 60.0


class KeysLost:
    """Counts the grants in a row that found a rate key gone (a flush, a restart, an eviction)
    and restored it (:data:`GCRA_LUA`'s last answer), and says, at most every
    :data:`EVICTED_WARN_EVERY_SECONDS`, when :data:`EVICTED_IN_A_ROW` did: the keys are being
    evicted (a ``maxmemory-policy`` that evicts, a tenant writing fast), and every submit waits.
    It says so only: the grants stay what they are (a key found gone never allows a burst)."""

    def __init__(
        self, where: str, client: redis.Redis[bytes], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.where = where
        self.client = client
        #: Monotonic seconds (replaced in tests).
        self.clock = clock
        self.in_a_row = 0
        self._said_at: float | None = None
        self._lock = threading.Lock()

    def found(self, lost: int) -> None:
        """A grant's answer: ``lost`` keys it found gone and restored (0: every key there)."""
        with self._lock:
            if lost <= 0:
                self.in_a_row = 0
                return
            self.in_a_row += 1
            now = self.clock()
            due = self.in_a_row >= EVICTED_IN_A_ROW and (
                self._said_at is None or now - self._said_at >= EVICTED_WARN_EVERY_SECONDS
            )
            if due:
                self._said_at = now
            in_a_row = self.in_a_row
        if due:
            self._say(in_a_row)

    def _say(self, in_a_row: int) -> None:
        from worker.redis_memory import FIX, read_eviction

        eviction = read_eviction(self.client)
        policy = f" ({eviction.words()})" if eviction is not None and eviction.evicts else ""
        log.warning(
            "the submit-rate limiter's Redis at %s lost its rate keys %d times in a row: its keys "
            "are being evicted%s, or deleted; each submit then waits one interval from its ask, and "
            "sending stalls. Fix: %s (or give that Redis memory to spare)",
            self.where,
            in_a_row,
            policy,
            FIX,
            extra={"event": "limiter.keys_evicted"},
        )


class RedisGCRA:
    """GCRA over Redis, clocked by Redis ``TIME``: one limit for every worker on every host.

    ``database``: the database's fingerprint (or a function giving it, asked once, when first
    needed), which names the tick leader's policy with the API key (:func:`policy_key`)."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis[bytes],
        *,
        prefix: str = "",
        where: str | None = None,
        url: str = "",
        database: str | Callable[[], str | None] | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.prefix = prefix
        if where is None:  # a client made elsewhere: its address (never its password)
            kwargs = client.connection_pool.connection_kwargs
            where = str(kwargs.get("path") or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}")
        #: Whether the Redis answers; ``where`` names it in what is said (password masked).
        self.outage = Outage(where)
        self._url = url  # only to keep its password out of the messages
        self._database = database
        self._policy_key: str | None = None
        self._leader_key = ""
        self._script = client.register_script(GCRA_LUA)
        self._hold_off = client.register_script(HOLD_OFF_LUA)
        self._pause_left = client.register_script(PAUSE_LEFT_LUA)
        self._check = client.register_script(CHECK_LUA)
        self._publish = client.register_script(PUBLISH_LUA)
        self._read_policy = client.register_script(READ_POLICY_LUA)
        self._unpublish = client.register_script(UNPUBLISH_LUA)
        self._lock = threading.Lock()
        #: Held while ``_leading_as`` changes or a publish goes out for it.
        self._leading_lock = threading.Lock()
        #: Called (any thread) instead of publishing again at once when the policy is found gone
        #: or the limiter answers again (:meth:`_answered`): the tick leader's conductor, which
        #: publishes only right after checking that it still holds the leader lock. None: at once.
        self.on_republish: Callable[[], None] | None = None
        #: The policy seen last (the leader's limits; its raw fields, its ``at`` stamp): what
        #: the grants honour when the policy is gone from Redis (:data:`GCRA_LUA`, fail safe).
        self.seen: Limits | None = None
        self._seen_fields: dict[str, str] = {}
        self._seen_at = ""
        #: Who this process published as while it leads (None: it does not): it publishes
        #: again at once when the policy is found gone or the limiter answers again. Cleared by
        #: :meth:`resign` (the leader lock lost) and :meth:`unpublish` (a clean stop).
        self._leading_as: str | None = None
        #: Each rate key's TAT as the limiter's answers showed it last (µs, Redis' clock): that
        #: this process saw the limiter's state, so a key found gone (a flushed limiter) restarts
        #: one interval from now, or at this TAT if later (``restore`` in :data:`_LUA_STATE`).
        self._tats: dict[str, int] = {}
        #: The database leader's record seen last (:func:`leader_key`), by :meth:`watch_policy`.
        self.leader: Leader | None = None
        #: Counts the grants that found a rate key gone, and says when they keep doing so.
        self.evictions = KeysLost(where, client)

    @classmethod
    def from_url(
        cls,
        settings: Settings,
        url: str,
        *,
        prefix: str = "",
        database: str | Callable[[], str | None] | None = None,
    ) -> RedisGCRA:
        """A limiter on the Redis at ``url`` (short timeouts: a slow limiter must not stall submits)."""
        found = backend(settings)
        where = describe(found[0], url) if found is not None and found[1] == url else masked_url(url)
        return cls(settings, _client(url), prefix=prefix, where=where, url=url, database=database)

    @property
    def policy(self) -> str:
        """The Redis key of the tick leader's policy for this API key and database."""
        if self._policy_key is None:
            database = self._database() if callable(self._database) else self._database
            self._database = database  # asked once
            self._policy_key = self.prefix + policy_key(api_key_id(self.settings), database)
            self._leader_key = self.prefix + leader_key(database)
        return self._policy_key

    @property
    def database(self) -> str | None:
        """The database's fingerprint (found once, when first needed; None: not known)."""
        _ = self.policy
        return self._database if isinstance(self._database, str) else None

    @property
    def last_published(self) -> str:
        """The Redis key of the copy of the limits published last (:func:`last_policy_key`)."""
        return self.policy + ":last"

    @property
    def leader_record(self) -> str:
        """The Redis key of the database's leader record (:func:`leader_key`), whatever the API key."""
        _ = self.policy  # resolves the database once, for both keys
        return self._leader_key

    def _unreachable(self, exc: Exception) -> LimiterUnavailableError:
        why = _reason(exc, self._url)
        refused = _refused(exc)
        self.outage.failed(why, refused=refused)
        what = "answers but refuses the limiter's script" if refused else "is unreachable"
        return LimiterUnavailableError(
            f"the submit-rate limiter's Redis at {self.outage.where} {what}: {why}"
        )

    def _answered(self, *, policy_there: bool = True) -> None:
        """The limiter answered: say so when it had not (:meth:`Outage.answered`); a leader
        publishes again after an outage, or when its policy is gone (a flushed or restarted
        Redis), rather than at its next beat: through its conductor when one is attached
        (:attr:`on_republish`, which checks the leader lock first), else at once."""
        recovered = self.outage.down
        self.outage.answered()
        if self._leading_as is None or not (recovered or not policy_there):
            return
        ask = self.on_republish
        if ask is not None:  # the conductor publishes, once it checked that it still holds the lock
            ask()
            return
        with self._leading_lock:  # never after resign(): asked again under the lock it takes
            leading_as = self._leading_as
            if leading_as is not None:
                with contextlib.suppress(LimiterUnavailableError):
                    self._publish_as(leading_as)

    def _check_now(self) -> tuple[int, int]:
        """:data:`CHECK_LUA` on the API key's key: its 429 pause's end and Redis' clock (µs),
        after a write as a grant makes. Raises the client's own error."""
        key = self.prefix + api_key_rate(self.settings).key
        hold_us, now_us = self._check(keys=[key, key + CHECK_KEY_SUFFIX])
        return int(hold_us), int(now_us)

    def acquire(self, endpoint: str) -> float:
        return self.acquire_at(endpoint)[0]

    def acquire_at(self, endpoint: str) -> tuple[float, float]:
        """Like :meth:`acquire`, plus Redis' clock at the decision (epoch seconds), for audits."""
        wait_us, now_us = self.grant(endpoint)
        return wait_us / 1_000_000, now_us / 1_000_000

    def grant(self, endpoint: str) -> tuple[int, int]:
        """:meth:`acquire`'s answer as the script gives it: the wait and Redis' clock, in µs."""
        keys = _with_endpoint_key(self.settings, endpoint)
        names = [self.prefix + k.key for k in keys]
        with self._lock:
            seen_at, seen_fields = self._seen_at, self._seen_fields
            tats = self._last_tats(names)
        try:
            wait_us, now_us, raw, there, after, lost = self._script(
                keys=[*names, self.policy],
                args=[
                    *(round(k.interval * 1_000_000) for k in keys),
                    *(k.field for k in keys),
                    api_key_id(self.settings),
                    seen_at,
                    *(seen_fields.get(k.field, "0") for k in keys),
                    *tats,
                ],
            )
        except client_error() as exc:
            raise self._unreachable(exc) from exc
        self._saw_tats(zip(names, (int(tat) for tat in after), strict=True))
        self.evictions.found(int(lost))
        if raw:
            self._heard(raw, int(now_us))
        self._answered(policy_there=bool(there))
        return int(wait_us), int(now_us)

    def _last_tats(self, names: list[str]) -> list[int]:
        """Each key's TAT as this process saw it last, for ``restore`` (:data:`_LUA_STATE`): 1 for
        a key it never saw when it saw others (the limiter had state: a key found missing may be
        one lost with it), 0 when it saw none (a first start). Under ``_lock``."""
        known = 1 if self._tats else 0
        return [self._tats.get(name, known) for name in names]

    def _saw_tats(self, tats: Iterable[tuple[str, int]]) -> None:
        """Keep each key's latest TAT the limiter showed (0: none): the fallback of the next grant."""
        with self._lock:
            for name, tat in tats:
                if tat > self._tats.get(name, 0):
                    self._tats[name] = tat

    def _heard(self, raw: list[bytes], now_us: int) -> None:
        """A policy not seen before (``HGETALL``'s answer): kept, for the grants while the policy
        is gone (fail safe), and compared with this process's settings when a leader first
        appears or another one takes over: each distinct difference said once, never a stale one's
        (a dead leader's, :data:`POLICY_FRESH_SECONDS`)."""
        fields = {k.decode(): v.decode() for k, v in zip(raw[::2], raw[1::2], strict=True)}
        published = Limits.parse({k.encode(): v.encode() for k, v in fields.items()})
        if published is None:
            return
        with self._lock:
            before = self.seen
            self.seen = published
            self._seen_fields = fields
            self._seen_at = fields.get("at", "")
            new_leader = before is None or before.by != published.by
        if new_leader and published.fresh(now_us / 1_000_000) and published.by != self._leading_as:
            say_mismatch(mismatch(self.settings, published))

    def watch_policy(self) -> Limits | None:
        """Read the tick leader's policy (a worker that does not lead, at its rounds): what
        :meth:`_heard` keeps and says; and the database's leader record (:func:`leader_key`),
        to say once per leader when it uses another API key than this process (whose policy is
        then another key's: :meth:`_heard` never sees it). Returns the policy seen last (None:
        none yet). Raises :class:`LimiterUnavailableError` like :meth:`acquire`."""
        try:
            raw, now_us, raw_leader = self._read_policy(keys=[self.policy, self.leader_record])
        except client_error() as exc:
            raise self._unreachable(exc) from exc
        if raw and dict(zip(raw[::2], raw[1::2], strict=True)).get(b"at", b"").decode() != self._seen_at:
            self._heard(raw, int(now_us))
        leader = Leader.parse(raw_leader)
        if leader is not None:
            self.leader = leader
            if leader.fresh(int(now_us) / 1_000_000) and leader.by != self._leading_as:
                say_mismatch(mismatch(self.settings, None, leader))  # said once per leader
        self._answered(policy_there=bool(raw))
        return self.seen

    def pause_left(self) -> float:
        key = self.prefix + api_key_rate(self.settings).key
        there = 1
        try:
            if self.outage.down:
                # Back only when Redis takes a write again, as a submit's token needs: a Redis
                # that answers reads and refuses writes (a read-only replica) would otherwise
                # pass for back each round, and each claim be given back.
                hold_us, now_us = self._check_now()
            else:
                hold_us, now_us, there = self._pause_left(keys=[key, self.policy])
        except client_error() as exc:
            raise self._unreachable(exc) from exc
        self._answered(policy_there=bool(there))
        return max(0, int(hold_us) - int(now_us)) / 1_000_000

    def hold_off(self, endpoint: str, seconds: float) -> None:
        keys = rate_keys(self.settings, endpoint)
        names = [self.prefix + k.key for k in keys]
        pause_us = round(seconds * 1_000_000)
        with self._lock:
            seen_fields = self._seen_fields
            tats = self._last_tats(names)
        # The interval a grant would keep (the leader's seen last, if longer), for a missing key.
        intervals = [max(round(k.interval * 1_000_000), _int(seen_fields.get(k.field))) for k in keys]
        try:
            _, after = self._hold_off(keys=names, args=[pause_us, *intervals, *tats])
        except client_error() as exc:
            raise self._unreachable(exc) from exc
        self._saw_tats(zip(names, (int(tat) for tat in after), strict=True))
        self._answered()

    def publish(self, by: str) -> Limits | None:
        """Publish this process's limits as every worker's (the tick leader does, at each beat):
        the intervals every grant honours from now on (:data:`GCRA_LUA`). Returns the limits
        published before if a live leader published them (None: none, or a stale policy, older
        than :data:`POLICY_FRESH_SECONDS`). Raises :class:`LimiterUnavailableError` like :meth:`acquire`."""
        return self.publish_over(by)[0]

    def publish_over(self, by: str) -> tuple[Limits | None, Limits | None]:
        """:meth:`publish`, and the limits published last before these, by whichever leader, live
        or not, this one too (None: none kept): the policy replaced, else, when there was none
        (its leader stopped cleanly), its copy (:func:`last_policy_key`)."""
        with self._leading_lock:
            self._leading_as = by
            return self._publish_as(by)

    def _publish_as(self, by: str) -> tuple[Limits | None, Limits | None]:
        """:meth:`publish_over`, for a process that leads already (``by``: as what)."""
        flat = [part for pair in Limits.of(self.settings, by).fields().items() for part in pair]
        try:
            before, now_us, last = self._publish(
                keys=[self.policy, self.leader_record, self.last_published], args=[POLICY_TTL_SECONDS, *flat]
            )
        except client_error() as exc:
            raise self._unreachable(exc) from exc
        self.outage.answered()
        found = Limits.parse(dict(zip(before[::2], before[1::2], strict=True)))
        fresh = found if found is not None and found.fresh(int(now_us) / 1_000_000) else None
        # The policy replaced, while there is one, is what was in force (stale or not): the copy
        # is for a policy gone (a leader's clean stop), and one of a version that keeps no copy
        # (a rolling upgrade) leaves an older leader's copy behind it.
        return fresh, found or Limits.parse(dict(zip(last[::2], last[1::2], strict=True)))

    def unpublish(self) -> None:
        """A leader's clean stop: its policy goes with it (if still its own), so no later
        warning names a process that is gone. The workers' grants keep to the policy they saw
        last until the next leader publishes (:data:`GCRA_LUA`). Best effort, said by nothing:
        the policy goes stale by itself."""
        with self._leading_lock:
            by, self._leading_as = self._leading_as, None
        if by is None:
            return
        with contextlib.suppress(client_error()):
            self._unpublish(keys=[self.policy, self.leader_record], args=[by])

    def resign(self) -> None:
        """This process no longer holds the leader lock: it publishes nothing more (not even
        after an outage or when the policy is found gone, :meth:`_answered`), so its limits never
        fight the new leader's. What it published stays: the new leader replaces it, or it goes
        stale by itself."""
        if self._leading_as is None:  # the usual case: no lock
            return
        with self._leading_lock:  # waits out a publish under way (_answered)
            self._leading_as = None

    @property
    def leading(self) -> bool:
        """Whether this process publishes as the tick leader (:meth:`publish`, until :meth:`resign`)."""
        return self._leading_as is not None

    def close(self) -> None:
        """Release the connection pool."""
        self.client.close()


class LocalGCRA:
    """The same GCRA in this process, for embedded mode (one process is the whole deployment)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        #: Monotonic seconds (a test's own clock: a pause read without time passing meanwhile).
        self.clock = clock
        self._tat: dict[str, float] = {}
        #: Until when (monotonic) a 429 holds each key (:meth:`hold_off`): apart from the TAT,
        #: which after any grant is one interval ahead and is no pause.
        self._hold: dict[str, float] = {}
        self._lock = threading.Lock()

    def acquire(self, endpoint: str) -> float:
        keys = rate_keys(self.settings, endpoint)
        with self._lock:
            now = self.clock()
            tats = [max(self._tat.get(k.key, now), now) for k in keys]
            wait = max(tat - now for tat in tats)
            if wait > 0:
                return wait
            for k, tat in zip(keys, tats, strict=True):
                self._tat[k.key] = tat + k.interval
            return 0.0

    def pause_left(self) -> float:
        key = api_key_rate(self.settings).key
        with self._lock:
            return max(0.0, self._hold.get(key, 0.0) - self.clock())

    def hold_off(self, endpoint: str, seconds: float) -> None:
        with self._lock:
            until = self.clock() + seconds
            for k in rate_keys(self.settings, endpoint):
                self._tat[k.key] = max(self._tat.get(k.key, until), until)
                self._hold[k.key] = max(self._hold.get(k.key, until), until)


def limiter_for(settings: Settings, database: str | Callable[[], str | None] | None = None) -> SubmitLimiter:
    """Redis GCRA when a Redis is configured (``WANBATCH_LIMITS_URL`` or a Redis broker), else
    local. ``database``: the database's fingerprint, or how to find it (:class:`RedisGCRA`)."""
    url = settings.limits_backend_url()
    if url:
        return RedisGCRA.from_url(settings, url, database=database)
    return LocalGCRA(settings)


def publish_limits(limiter: SubmitLimiter | None, by: str) -> None:
    """The tick leader's beat: publish its limits for every worker (:meth:`RedisGCRA.publish`),
    and say so (:func:`limits_changed`) when they differ from the ones another leader published
    last, live or not: a stopped or dead leader's limits were in force until now all the same.
    Nothing for the in-process limiter; an unreachable Redis is said by the limiter (and retried
    at once when it answers again)."""
    if not isinstance(limiter, RedisGCRA):
        return
    seen = limiter.seen  # before this publish: the previous leader's, when this process watched it
    try:
        before, last = limiter.publish_over(by)
    except LimiterUnavailableError:
        return
    # The limits in force until now: the policy replaced (stale or not; one published by a version
    # without the copy too), else the copy of the last published (stays when its leader stops
    # cleanly), else the policy this process saw last (the limiter's Redis flushed meanwhile).
    previous = last or before or seen
    if previous is None or previous.by == by:
        return
    line = limits_changed(Limits.of(limiter.settings, by), previous, live=before is not None)
    if line is not None:
        log.warning(line, extra={"event": "limits.changed"})


def limits_changed(mine: Limits, previous: Limits, *, live: bool) -> str | None:
    """What a new tick leader (``mine``, by its ``by``) says when its limits, which now apply to
    every worker, are not those published last (``previous``, by another leader; ``live``: that
    leader still published lately). None when they are the same.

    Said whether the previous leader is live or not: a leader that stopped cleanly took its policy
    with it and one that died left it to go stale, yet the workers kept to its limits until now,
    and the new leader's replace them for every worker (a cap raised from 8 to 20 on a failover
    was said by nothing). Said once: the next beat finds this leader's own limits published last."""
    changes = mine.changes(previous)
    if not changes:
        return None
    who = previous.by.rstrip(":") or "unknown"
    state = "live" if live else "no longer live"
    return (
        f"global limits changed with the new tick leader {mine.by.rstrip(':') or 'unknown'}: "
        f"{'; '.join(changes)} (the previous values were published by {who}, {state}); the new "
        "leader's apply to every worker: give every worker the same settings"
    )


def resign_limits(limiter: SubmitLimiter | None) -> None:
    """The leader lock is not (or no longer) this process's: it stops publishing its limits
    (:meth:`RedisGCRA.resign`)."""
    if isinstance(limiter, RedisGCRA):
        limiter.resign()


def republish_through(limiter: SubmitLimiter | None, ask: Callable[[], None]) -> None:
    """When ``limiter`` finds the tick leader's policy gone or answers again after an outage,
    call ``ask`` rather than publish at once (:attr:`RedisGCRA.on_republish`): the conductor then
    publishes after checking the leader lock, so a process that lost it publishes nothing."""
    if isinstance(limiter, RedisGCRA):
        limiter.on_republish = ask


def unpublish_limits(limiter: SubmitLimiter | None) -> None:
    """The tick leader's clean stop: its published limits go with it (:meth:`RedisGCRA.unpublish`)."""
    if isinstance(limiter, RedisGCRA):
        limiter.unpublish()


def watch_limits(limiter: SubmitLimiter | None) -> None:
    """A worker that does not lead, at its rounds: read the leader's policy, to keep it (fail
    safe) and say once how this process's settings differ when a leader first publishes or
    another takes over (:meth:`RedisGCRA.watch_policy`). An unreachable Redis is said by the limiter."""
    if isinstance(limiter, RedisGCRA):
        with contextlib.suppress(LimiterUnavailableError):
            limiter.watch_policy()


_said_lock = threading.Lock()
#: The mismatch lines this process said already: each distinct difference once.
_said: set[str] = set()
#: This process is a child of a ``wanbatch worker``'s prefork pool (:func:`in_pool_child`): its
#: worker's main process says the differences, not it.
_pool_child = False


def in_pool_child(**_: object) -> None:
    """In a prefork pool's child (Celery's ``worker_process_init``): leave the differences with
    the leader's limits to the worker's main process.

    Every child is forked from the main process, so it has the very settings the main process
    compares, and it reads the same leader's policy (at its first submit after a leader appears
    or another takes over): each of them said the main process's line again, a worker with 8
    children 9 times. The main process's ticker reads the policy at each heartbeat when it does
    not lead (:func:`watch_limits`) and says each difference once; a child logs it at debug level."""
    global _pool_child
    _pool_child = True


def say_mismatch(lines: list[str]) -> None:
    """Warn each of ``lines`` (:func:`mismatch`) this process has not said yet (in a prefork
    child, :func:`in_pool_child`, only at debug level: its worker's main process says it)."""
    with _said_lock:
        new = [line for line in lines if line not in _said]
        _said.update(new)
    level = logging.DEBUG if _pool_child else logging.WARNING
    for line in new:
        log.log(level, line, extra={"event": "limits.mismatch"})


def unreachable_note(limiter: SubmitLimiter | None) -> str | None:
    """The progress line's note while ``limiter``'s Redis does not answer; None otherwise
    (and always for the in-process limiter)."""
    outage: Outage | None = getattr(limiter, "outage", None)
    return outage.note() if outage is not None else None


def wait_for_token(limiter: SubmitLimiter, endpoint: str, max_wait: float) -> float:
    """Take a token, sleeping while the wait is short; 0.0 when taken, else the wait still needed.

    A worker slot held for a fraction of a second is cheaper than a round trip through the
    database and the broker; a longer wait gives the job back (the caller's choice).

    Counted once per call, not per sleep: a submit that slept (once, or again because another
    worker took the token it waited for) is one ``slept``, observed with the whole time it
    slept, once it has its token; one given back is one ``held_back`` (and, if it slept before
    giving up, that time is not a wait that ended in a token: it is not observed).
    """
    deadline = time.monotonic() + max_wait
    slept = 0.0
    while True:
        wait = limiter.acquire(endpoint)
        if wait <= 0:
            if slept > 0:
                telemetry.count_limiter_wait("slept", slept)
            return 0.0
        if time.monotonic() + wait > deadline:
            telemetry.count_limiter_wait("held_back")
            return wait
        time.sleep(wait)
        slept += wait
