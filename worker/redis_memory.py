"""Whether a Redis (the broker's, the limiter's) may evict wanbatch's keys.

With ``maxmemory`` set, any ``maxmemory-policy`` but ``noeviction`` lets Redis delete keys to make
room: Celery's queue lists (a queued message lost: its job waits for its lease, unless the
broker's marker went too and the tick leader sees it gone, :func:`worker.tasks.redis_epoch`),
and the limiter's rate keys (each found missing restarts one interval from now, fail safe: under a
tenant writing fast, every ask waits and nothing is sent). The ``volatile-*`` policies evict keys
with a TTL only, which the limiter's are. A Redis that holds Celery's queues needs ``noeviction``
for the same reason: a message must never be dropped to make room
(https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/redis.html#caveats).

The policy is read with ``CONFIG GET``; where that is disabled or renamed (managed Redis services,
an ACL without ``CONFIG``), from ``INFO memory``'s ``maxmemory`` and ``maxmemory_policy``.
``doctor`` fails such a Redis, ``wanbatch worker`` warns of it as it starts (:func:`warnings_for`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from jobs.url_secrets import masked_url

if TYPE_CHECKING:
    import redis

    from jobs.settings import Settings

log = logging.getLogger(__name__)

NOEVICTION = "noeviction"
#: The fix line, wherever an evicting Redis is said.
FIX = "set maxmemory-policy noeviction, as Celery's Redis broker needs"
#: What an evicted key costs, by whose Redis it is.
BROKER_LOSES = (
    "a queued message evicted is lost, and its job may wait for its lease (WANBATCH_LEASE_SECONDS) to run out"
)
LIMITER_LOSES = "the submit-rate limiter's keys evicted hold every submit back"
#: Seconds each Redis has to answer.
TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Eviction:
    """A Redis' ``maxmemory`` (bytes; 0: none) and ``maxmemory-policy``."""

    maxmemory: int
    policy: str

    @property
    def evicts(self) -> bool:
        """Whether Redis may delete keys to make room: a limit, and a policy that evicts."""
        return self.maxmemory > 0 and self.policy != NOEVICTION

    def words(self) -> str:
        """``maxmemory 64mb with maxmemory-policy allkeys-lru``."""
        return f"maxmemory {_size(self.maxmemory)} with maxmemory-policy {self.policy}"


def _size(n: int) -> str:
    """Bytes as Redis' configuration writes them, where exact (``64mb``), else in bytes."""
    for unit, factor in (("gb", 1024**3), ("mb", 1024**2), ("kb", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n} bytes"


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def read_eviction(client: redis.Redis[bytes]) -> Eviction | None:
    """``client``'s Redis' memory limit and policy; None when it cannot be told (down, or neither
    ``CONFIG GET`` nor ``INFO memory`` allowed). Raises nothing."""
    import redis as redis_module

    try:
        try:
            found = {_text(k): _text(v) for k, v in client.config_get("maxmemory*").items()}
            if "maxmemory" in found and "maxmemory-policy" in found:
                return Eviction(int(found["maxmemory"]), found["maxmemory-policy"])
        except redis_module.ResponseError:  # CONFIG disabled, renamed or not allowed: INFO says it
            pass
        info = client.info("memory")
        if "maxmemory" in info and "maxmemory_policy" in info:
            return Eviction(int(info["maxmemory"]), _text(info["maxmemory_policy"]))
    except (redis_module.RedisError, ValueError, TypeError):
        return None
    return None


def eviction_at(url: str) -> Eviction | None:
    """:func:`read_eviction` of the Redis at ``url`` (its own short-lived connection)."""
    import redis as redis_module

    try:
        client = redis_module.Redis.from_url(
            url, socket_timeout=TIMEOUT_SECONDS, socket_connect_timeout=TIMEOUT_SECONDS
        )
    except (ValueError, redis_module.RedisError):
        return None
    try:
        return read_eviction(client)
    finally:
        client.close()


def problem(eviction: Eviction | None, loses: str) -> str | None:
    """One clause saying that a Redis may evict keys and what that costs (``may evict keys
    (maxmemory 64mb with maxmemory-policy allkeys-lru): …``); None when it does not (or cannot
    be told)."""
    if eviction is None or not eviction.evicts:
        return None
    return f"may evict keys ({eviction.words()}): {loses}"


def _server(url: str) -> str:
    """The Redis server a URL names (host and port, or socket path), whatever its database."""
    try:
        parts = urlsplit(url)
        return f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else parts.path
    except ValueError:
        return url


def warnings_for(settings: Settings) -> list[str]:
    """What ``wanbatch worker`` warns of as it starts: each Redis it uses (the broker's, the
    limiter's; one line for one server) that evicts keys. It starts all the same: nothing is
    wrong until Redis is full, and the limiter and the tick leader then say what they find."""
    uses: dict[str, tuple[str, list[str]]] = {}
    broker = settings.broker_url
    if broker and broker.startswith(("redis://", "rediss://")):
        uses.setdefault(_server(broker), (broker, []))[1].append(BROKER_LOSES)
    limits = settings.limits_backend_url()
    if limits:
        uses.setdefault(_server(limits), (limits, []))[1].append(LIMITER_LOSES)
    lines = []
    for url, losses in uses.values():
        said = problem(eviction_at(url), "; ".join(losses))
        if said is not None:
            lines.append(f"the Redis at {masked_url(url)} {said}. Fix: {FIX}")
    return lines


def warn_at_start(settings: Settings) -> None:
    """Log :func:`warnings_for`, one warning line each."""
    for line in warnings_for(settings):
        log.warning(line, extra={"event": "redis.evicts"})
