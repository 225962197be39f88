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

If Redis is unreachable :meth:`SubmitLimiter.acquire` raises :class:`LimiterUnavailableError`
and the caller must not submit (fail closed): the database's outstanding cap and budget
still bound what is in flight, but the rate can no longer be proven.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from jobs.errors import WanbatchError
from jobs.settings import Settings
from worker import telemetry

if TYPE_CHECKING:
    import redis

KEY_PREFIX = "wanbatch:limits:"

#: Checks every key's theoretical arrival time (TAT) against Redis' clock; grants (advancing
#: every TAT by its interval) only if all keys allow, else returns the wait in microseconds.
#: Values are integer microseconds (< 2^53, exact in Lua's doubles); TTLs clean idle keys.
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait = 0
local tats = {}
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  tats[i] = tat
  if tat - now > wait then wait = tat - now end
end
if wait > 0 then
  return {wait, now}
end
for i, key in ipairs(KEYS) do
  local new = tats[i] + tonumber(ARGV[i])
  redis.call('SET', key, string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
end
return {0, now}
"""


#: Pushes every key's TAT to at least ``now + ARGV[1]`` µs (never earlier than it was): no key
#: grants again before then. Same clock, same TTL rule as :data:`GCRA_LUA`.
HOLD_OFF_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local until_ = now + tonumber(ARGV[1])
for _, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < until_ then
    redis.call('SET', key, string.format('%.0f', until_), 'PX', math.ceil((until_ - now) / 1000) + 1000)
  end
end
return now
"""


#: The API key's TAT and Redis' clock, both in microseconds: how long until it grants again.
PAUSE_LEFT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
return {tonumber(redis.call('GET', KEYS[1])) or now, now}
"""


class LimiterUnavailableError(WanbatchError):
    """The shared limiter cannot be reached: nothing may be submitted until it is back."""


@dataclass(frozen=True, slots=True)
class RateKey:
    """One limit a submit must pass: a key and the time between two submits under it."""

    key: str
    interval: float


class SubmitLimiter(Protocol):
    """What ``worker.steps.submit`` asks right before the POST."""

    def acquire(self, endpoint: str) -> float:
        """0.0 when this submit may go now (the token is taken); else seconds to wait.

        Raises :class:`LimiterUnavailableError` when the limiter's store is unreachable.
        """
        ...

    def pause_left(self) -> float:
        """Seconds until the API key's limit grants a submit again (0.0 when it would now).

        Dispatch asks, to claim nothing while a 429's pause (:meth:`hold_off`), heard by any
        worker, holds every submit back. Raises :class:`LimiterUnavailableError` like
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


def rate_keys(settings: Settings, endpoint: str) -> list[RateKey]:
    """The limits that apply to one submit of ``endpoint``: the API key's, and the endpoint's if set."""
    own = api_key_rate(settings)
    per_endpoint = settings.submit_rate_per_endpoint.get(endpoint)
    if per_endpoint is None or per_endpoint <= 0:
        return [own]
    spread = 1.0 + settings.submit_jitter_allowance
    return [own, RateKey(f"{own.key}:{endpoint}", spread / per_endpoint)]


def client_error() -> type[Exception]:
    """Redis' own error root, imported when a Redis limiter is in use (never by an embedded run)."""
    import redis

    return redis.RedisError


class RedisGCRA:
    """GCRA over Redis, clocked by Redis ``TIME``: one limit for every worker on every host."""

    def __init__(self, settings: Settings, client: redis.Redis[bytes], *, prefix: str = "") -> None:
        self.settings = settings
        self.client = client
        self.prefix = prefix
        self._script = client.register_script(GCRA_LUA)
        self._hold_off = client.register_script(HOLD_OFF_LUA)
        self._pause_left = client.register_script(PAUSE_LEFT_LUA)

    @classmethod
    def from_url(cls, settings: Settings, url: str, *, prefix: str = "") -> RedisGCRA:
        """A limiter on the Redis at ``url`` (short timeouts: a slow limiter must not stall submits)."""
        import redis  # only a deployment with Redis loads its client (an embedded run never does)

        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        return cls(settings, client, prefix=prefix)

    def acquire(self, endpoint: str) -> float:
        return self.acquire_at(endpoint)[0]

    def acquire_at(self, endpoint: str) -> tuple[float, float]:
        """Like :meth:`acquire`, plus Redis' clock at the decision (epoch seconds), for audits."""
        keys = rate_keys(self.settings, endpoint)
        try:
            wait_us, now_us = self._script(
                keys=[self.prefix + k.key for k in keys],
                args=[round(k.interval * 1_000_000) for k in keys],
            )
        except client_error() as exc:
            raise LimiterUnavailableError(f"the submit-rate limiter (Redis) is unreachable: {exc}") from exc
        return int(wait_us) / 1_000_000, int(now_us) / 1_000_000

    def pause_left(self) -> float:
        key = self.prefix + api_key_rate(self.settings).key
        try:
            tat_us, now_us = self._pause_left(keys=[key])
        except client_error() as exc:
            raise LimiterUnavailableError(f"the submit-rate limiter (Redis) is unreachable: {exc}") from exc
        return max(0, int(tat_us) - int(now_us)) / 1_000_000

    def hold_off(self, endpoint: str, seconds: float) -> None:
        keys = rate_keys(self.settings, endpoint)
        try:
            self._hold_off(keys=[self.prefix + k.key for k in keys], args=[round(seconds * 1_000_000)])
        except client_error() as exc:
            raise LimiterUnavailableError(f"the submit-rate limiter (Redis) is unreachable: {exc}") from exc

    def close(self) -> None:
        """Release the connection pool."""
        self.client.close()


class LocalGCRA:
    """The same GCRA in this process, for embedded mode (one process is the whole deployment)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tat: dict[str, float] = {}
        self._lock = threading.Lock()

    def acquire(self, endpoint: str) -> float:
        keys = rate_keys(self.settings, endpoint)
        with self._lock:
            now = time.monotonic()
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
            return max(0.0, self._tat.get(key, 0.0) - time.monotonic())

    def hold_off(self, endpoint: str, seconds: float) -> None:
        with self._lock:
            until = time.monotonic() + seconds
            for k in rate_keys(self.settings, endpoint):
                self._tat[k.key] = max(self._tat.get(k.key, until), until)


def limiter_for(settings: Settings) -> SubmitLimiter:
    """Redis GCRA when a Redis is configured (``WANBATCH_LIMITS_URL`` or a Redis broker), else local."""
    url = settings.limits_backend_url()
    if url:
        return RedisGCRA.from_url(settings, url)
    return LocalGCRA(settings)


def wait_for_token(limiter: SubmitLimiter, endpoint: str, max_wait: float) -> float:
    """Take a token, sleeping while the wait is short; 0.0 when taken, else the wait still needed.

    A worker slot held for a fraction of a second is cheaper than a round trip through the
    database and the broker; a longer wait gives the job back (the caller's choice).
    """
    deadline = time.monotonic() + max_wait
    while True:
        wait = limiter.acquire(endpoint)
        if wait <= 0:
            return 0.0
        if time.monotonic() + wait > deadline:
            telemetry.count_limiter_wait("held_back")
            return wait
        telemetry.count_limiter_wait("slept", wait)
        time.sleep(wait)
