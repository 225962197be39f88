"""Every worker's outcome-deciding settings, published beside the tick leader's limits, and
compared: a worker that fails a job another would pass, or stores its videos elsewhere, is named.

The tick leader's policy (:func:`worker.limits.policy_key`) carries only the leader's limits and
where it works, and is compared with each process's *own* settings: a worker that differed from
the others was said in its own log alone, while ``doctor`` (run on a host that agrees with the
leader) said all was well and ``status`` nothing. Yet most settings that decide a job's outcome
are applied by whichever worker runs the step: ``WANBATCH_MEDIA_MISMATCH`` (the download step
fails or flags a video that does not match), ``WANBATCH_MAX_ATTEMPTS``, the retry and
submit-unknown policies, where the video is stored, which fal a request goes to.

So every ``wanbatch worker`` (leader or not) writes its own record, at each heartbeat, into one
Redis hash per database (:func:`peers_key`; a field per process, ``host:pid:``): Redis' clock
and a JSON object of those settings (:func:`outcome_settings`; never a secret: ``FAL_KEY`` by its
key id only, every URL by scheme, host, port and path, :func:`worker.limits.fal_location`). A
worker deletes its field when it stops cleanly; a dead worker's goes stale
(:data:`worker.limits.POLICY_FRESH_SECONDS`) and is named by nothing, then pruned. ``doctor`` (its
``limiter`` check fails) and ``status`` read the live records and name the odd worker and the
setting (:func:`disagreements`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from jobs.settings import Settings
from worker.limits import (
    KEY_PREFIX,
    POLICY_FRESH_SECONDS,
    LimiterUnavailableError,
    RedisGCRA,
    SubmitLimiter,
    _client,
    _shown,
    api_key_id,
    backend,
    client_error,
    fal_location,
    output_location,
    output_real,
    say_mismatch,
)

log = logging.getLogger(__name__)

#: A stopped or dead worker's record is pruned this long after its last beat.
PEERS_KEEP_SECONDS = 3600

#: Write this process's record ``ARGV[1]`` = ``ARGV[2]`` (JSON) into the hash ``KEYS[1]``,
#: stamped with Redis' clock (µs), prune records older than ``ARGV[3]`` seconds, and return the
#: hash (``HGETALL``) and the clock.
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
return {keep, stamp}
"""

#: The hash ``KEYS[1]`` and Redis' clock (µs).
READ_PEERS_LUA = """
local t = redis.call('TIME')
return {redis.call('HGETALL', KEYS[1]), string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))}
"""


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

    @classmethod
    def of(cls, owner: str, settings: Settings, at: float = 0.0) -> Peer:
        return cls(owner, at, outcome_settings(settings), output_real(settings))

    def record(self) -> str:
        """The JSON stored in the hash (Redis stamps the time)."""
        return json.dumps({"settings": dict(self.settings), "output_real": self.output_real}, sort_keys=True)

    @classmethod
    def parse(cls, owner: bytes, raw: bytes) -> Peer | None:
        """A record as stored; None when it is not one (written by hand, or by a later version)."""
        try:
            stamp, _, body = raw.decode().partition(" ")
            doc = json.loads(body)
            shown = {str(k): str(v) for k, v in doc["settings"].items()}
            real = doc.get("output_real")
            return cls(owner.decode(), int(stamp) / 1_000_000, shown, real if isinstance(real, str) else None)
        except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError):
            return None

    @property
    def name(self) -> str:
        """``worker pid 123@host``."""
        host, _, rest = self.owner.partition(":")
        pid = rest.split(":", 1)[0]
        return f"worker pid {pid}@{host}" if pid else f"worker {self.owner}"


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


def disagreements(peers: list[Peer]) -> list[str]:
    """One line per setting on which the live workers ``peers`` disagree, naming the odd worker
    and its value against the others' (``worker pid 123@host: WANBATCH_MEDIA_MISMATCH=fail, the
    others flag``), or, with no majority, each value and its workers. Nothing when they agree."""
    if len(peers) < 2:
        return []
    names: list[str] = []
    for peer in peers:
        names += [name for name in peer.settings if name not in names]
    lines = []
    for name in names:
        groups: list[list[Peer]] = []
        for peer in peers:
            for group in groups:
                if _same(name, group[0], peer):
                    group.append(peer)
                    break
            else:
                groups.append([peer])
        if len(groups) < 2:
            continue
        groups.sort(key=len, reverse=True)

        def value(group: list[Peer], name: str = name) -> str:
            return group[0].settings.get(name, "(not published)")

        if len(groups[0]) > len(groups[1]):
            others = value(groups[0])
            odd = "; ".join(f"{_names(g)}: {name}={value(g)}" for g in groups[1:])
            lines.append(f"{odd}, the others {others}")
        else:
            lines.append(
                f"the workers disagree on {name}: " + "; ".join(f"{value(g)} on {_names(g)}" for g in groups)
            )
    return lines


def peer_warnings(peers: list[Peer]) -> list[str]:
    """:func:`disagreements` as one warning line (empty when the workers agree)."""
    found = disagreements(peers)
    if not found:
        return []
    return [
        f"the workers run with different settings: {'; '.join(found)}. Each worker applies its own "
        "to the steps it runs (a video one fails another flags, a job one retries another fails, "
        "outputs stored in two places), so a batch's outcome depends on which worker ran each job; "
        "give every worker the same settings and restart the odd one"
    ]


def read_peers(settings: Settings, database: str | None) -> list[Peer]:
    """The live workers' records for ``database`` on the limiter's Redis; empty when there is no
    Redis limiter, or it does not answer (the limiter's own check says that)."""
    found = backend(settings)
    if found is None:
        return []
    client = _client(found[1])
    try:
        raw, now_us = client.register_script(READ_PEERS_LUA)(keys=[peers_key(database)])
        return _live(raw, now_us)
    except Exception:  # unreachable, refused: said by the limiter's own checks
        return []
    finally:
        client.close()


def workers_mismatch(settings: Settings, database: str | None) -> list[str]:
    """What ``doctor`` and ``status`` say about the workers of ``database`` disagreeing."""
    return peer_warnings(read_peers(settings, database))


class Announcer:
    """A worker's record on the limiter's Redis (:func:`peers_key`), written at its beats."""

    def __init__(self, limiter: RedisGCRA, owner: str) -> None:
        self.limiter = limiter
        self.owner = owner
        self._announce = limiter.client.register_script(ANNOUNCE_LUA)
        self._record = Peer.of(owner, limiter.settings).record()
        self._key: str | None = None

    @property
    def key(self) -> str:
        """The hash of this worker's database (resolved once, as the limiter's policy key)."""
        if self._key is None:
            self._key = self.limiter.prefix + peers_key(self.limiter.database)
        return self._key

    def announce(self) -> list[Peer]:
        """Write this worker's record; the live workers' (this one's included). Raises the client's error."""
        raw, now_us = self._announce(keys=[self.key], args=[self.owner, self._record, PEERS_KEEP_SECONDS])
        return _live(raw, now_us)

    def withdraw(self) -> None:
        """A clean stop: this worker's record goes."""
        with contextlib.suppress(client_error()):
            self.limiter.client.hdel(self.key, self.owner)


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
    say_mismatch(peer_warnings(peers))


def withdraw_settings(announcer: Announcer | None) -> None:
    """A worker's clean stop: its record goes (:meth:`Announcer.withdraw`)."""
    if announcer is not None:
        announcer.withdraw()
