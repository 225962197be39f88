"""The account-wide limits of the processes that dispatch on one database, and which one applies.

Several processes may dispatch on one database with one fal account: embedded ``wanbatch run``
side by side (three people sharing a PostgreSQL database and a ``FAL_KEY``), or one beside the
distributed workers' tick leader. Their dispatch rounds take turns and count every process's
requests, yet each used its own ``WANBATCH_MAX_OUTSTANDING`` against that one count: with 40 in
one and the default 10 in another, the first kept sending up to 40 while the second was told its
cap was full at "21 of 10" and advised to raise it (an arms race). The submit rate too: the
database's bucket and pacing row are one per key, but each process refilled and spaced them by
its own ``WANBATCH_SUBMIT_RATE`` (20 and 5: 11 submits in one second).

fal's concurrency and rate limits are the account's, whichever process sends. So each
dispatching process publishes its own limits with its heartbeat (:func:`published`,
``conductor_heartbeats.limits``) and applies, for as long as the others are live, the STRICTEST
of its own and theirs (:func:`strictest`): the lowest outstanding cap and submit rate, the
lowest cap and rate of each endpoint any of them limits, the largest jitter allowance. The
account's limit then holds whichever process's setting is the right one, and a process whose
setting was looser is told so (:func:`differing`), as are ``run``'s held message and ``doctor``.
Only processes that send to the same account and queue are compared: the same API key id and
fal queue origin, neither a ``--simulate`` run (a simulation's requests are at its own simulator).

Pure functions over settings and the published documents; the database reads are
:func:`jobs.store.live_limits`'s, the applying :mod:`worker.steps.peer_limits`'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jobs.settings import Settings

#: The settings compared and applied strictest, by their variable's name (a subset of
#: ``worker.peers.LEADER_APPLIED``: those that are the account's, not the dispatching process's
#: own: its download backlog counts its own downloads, its budget and back-off are compared there).
ACCOUNT_WIDE = (
    "WANBATCH_MAX_OUTSTANDING",
    "WANBATCH_MAX_OUTSTANDING_PER_ENDPOINT",
    "WANBATCH_SUBMIT_RATE",
    "WANBATCH_SUBMIT_RATE_PER_ENDPOINT",
    "WANBATCH_SUBMIT_JITTER_ALLOWANCE",
)

#: The field of :class:`~jobs.settings.Settings` behind each of :data:`ACCOUNT_WIDE`.
_FIELDS = {
    "WANBATCH_MAX_OUTSTANDING": "max_outstanding",
    "WANBATCH_MAX_OUTSTANDING_PER_ENDPOINT": "max_outstanding_per_endpoint",
    "WANBATCH_SUBMIT_RATE": "submit_rate",
    "WANBATCH_SUBMIT_RATE_PER_ENDPOINT": "submit_rate_per_endpoint",
    "WANBATCH_SUBMIT_JITTER_ALLOWANCE": "submit_jitter_allowance",
}

#: What a process that dispatches is, in :func:`published` (``by``): an embedded ``run``, or the
#: distributed workers' tick leader.
RUN = "run"
WORKERS = "workers"


def published(settings: Settings, *, key_id: str, origin: str, simulated: bool, by: str) -> dict[str, Any]:
    """What a dispatching process writes with its heartbeat: its own account-wide limits (never
    what it applies: a process must not pass on another's value as its own), the account they
    are for (``key_id``, a hash prefix of ``FAL_KEY``, never the key; ``origin``, its fal queue's),
    whether it simulates, and what it is (``by``: :data:`RUN` or :data:`WORKERS`)."""
    return {
        "key": key_id,
        "origin": origin,
        "simulated": simulated,
        "by": by,
        "max_outstanding": settings.max_outstanding,
        "max_outstanding_per_endpoint": dict(settings.max_outstanding_per_endpoint),
        "submit_rate": float(settings.submit_rate),
        "submit_rate_per_endpoint": {k: float(v) for k, v in settings.submit_rate_per_endpoint.items()},
        "submit_jitter_allowance": float(settings.submit_jitter_allowance),
    }


@dataclass(frozen=True, slots=True)
class PeerLimits:
    """Another live process's published limits (:func:`parse`)."""

    #: ``host:pid:``.
    owner: str
    #: :data:`RUN` or :data:`WORKERS`.
    by: str
    key: str
    origin: str
    simulated: bool
    max_outstanding: int
    max_outstanding_per_endpoint: Mapping[str, int]
    submit_rate: float
    submit_rate_per_endpoint: Mapping[str, float]
    submit_jitter_allowance: float

    @property
    def name(self) -> str:
        """``another run (bob-laptop pid 4242)``, ``the workers' tick leader (vm pid 11452)``."""
        host, _, rest = self.owner.partition(":")
        pid = rest.split(":", 1)[0]
        where = f"{host} pid {pid}" if pid else self.owner
        return f"the workers' tick leader ({where})" if self.by == WORKERS else f"another run ({where})"

    def value(self, setting: str) -> Any:
        return getattr(self, _FIELDS[setting])


def _positive(value: object, *, whole: bool) -> float | None:
    """``value`` as a limit: a finite number above 0 (a whole one for a cap); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value <= 0 or (whole and value != int(value)):
        return None
    return float(value)


def _per_endpoint(value: object, *, whole: bool) -> dict[str, float] | None:
    if not isinstance(value, dict):
        return None
    found: dict[str, float] = {}
    for endpoint, limit in value.items():
        number = _positive(limit, whole=whole)
        if not isinstance(endpoint, str) or number is None:
            return None
        found[endpoint] = number
    return found


def parse(owner: str, doc: object) -> PeerLimits | None:
    """A published document (:func:`published`) as read back; None when it is not one (another
    version's, or written by hand): such a process is not compared, never trusted with a limit."""
    if not isinstance(doc, dict):
        return None
    cap = _positive(doc.get("max_outstanding"), whole=True)
    rate = _positive(doc.get("submit_rate"), whole=False)
    caps = _per_endpoint(doc.get("max_outstanding_per_endpoint", {}), whole=True)
    rates = _per_endpoint(doc.get("submit_rate_per_endpoint", {}), whole=False)
    jitter = doc.get("submit_jitter_allowance", 0.0)
    key, origin = doc.get("key"), doc.get("origin")
    if cap is None or rate is None or caps is None or rates is None or not isinstance(key, str):
        return None
    if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter <= 1:
        return None
    return PeerLimits(
        owner=owner,
        by=WORKERS if doc.get("by") == WORKERS else RUN,
        key=key,
        origin=origin if isinstance(origin, str) else "",
        simulated=doc.get("simulated") is True,
        max_outstanding=int(cap),
        max_outstanding_per_endpoint={e: int(n) for e, n in caps.items()},
        submit_rate=rate,
        submit_rate_per_endpoint=rates,
        submit_jitter_allowance=float(jitter),
    )


def same_account(peer: PeerLimits, *, key_id: str, origin: str, simulated: bool) -> bool:
    """Whether ``peer`` sends to the account and queue this process sends to: the same key id and
    queue origin, and neither simulates (a ``--simulate`` run's requests are its simulator's)."""
    return not simulated and not peer.simulated and peer.key == key_id and peer.origin == origin


def _lowest(mine: Mapping[str, float], theirs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each endpoint any of them limits, at the lowest limit set for it."""
    found = dict(mine)
    for limits in theirs:
        for endpoint, limit in limits.items():
            found[endpoint] = min(found.get(endpoint, limit), limit)
    return found


def strictest(own: Settings, peers: Sequence[PeerLimits]) -> Settings:
    """``own`` with the account-wide limits the strictest of its own and ``peers``' (already
    those of the same account: :func:`same_account`); ``own`` itself when they are its own.
    The download backlog stays ``own``'s (it defaults to the outstanding cap, but bounds this
    process's own downloads)."""
    if not peers:
        return own
    update: dict[str, Any] = {
        "max_outstanding": min([own.max_outstanding, *(p.max_outstanding for p in peers)]),
        "max_outstanding_per_endpoint": {
            e: int(n)
            for e, n in _lowest(
                {e: float(n) for e, n in own.max_outstanding_per_endpoint.items()},
                [p.max_outstanding_per_endpoint for p in peers],
            ).items()
        },
        "submit_rate": min([float(own.submit_rate), *(p.submit_rate for p in peers)]),
        "submit_rate_per_endpoint": _lowest(
            {e: float(r) for e, r in own.submit_rate_per_endpoint.items()},
            [p.submit_rate_per_endpoint for p in peers],
        ),
        "submit_jitter_allowance": max(
            [float(own.submit_jitter_allowance), *(p.submit_jitter_allowance for p in peers)]
        ),
    }
    applied = own.model_copy(update={**update, "max_download_backlog": own.download_backlog})
    return own if same_limits(own, applied) else applied


def same_limits(a: Settings, b: Settings) -> bool:
    """Whether ``a`` and ``b`` have the same account-wide limits (:data:`ACCOUNT_WIDE`)."""
    return all(own_value(a, setting) == own_value(b, setting) for setting in ACCOUNT_WIDE)


def _shown(value: object) -> str:
    """A limit as a warning shows it (``40``, ``2.5``, ``{"wan/v2.6/image-to-video": 2}``)."""
    if isinstance(value, Mapping):
        return json.dumps({str(k): _number(v) for k, v in value.items()}, sort_keys=True)
    return str(_number(value))


def _number(value: object) -> object:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def own_value(settings: Settings, setting: str) -> str:
    """``settings``' value of ``setting`` (one of :data:`ACCOUNT_WIDE`), as shown."""
    return _shown(getattr(settings, _FIELDS[setting]))


def differing(own: Settings, peers: Sequence[PeerLimits]) -> dict[str, tuple[str, ...]]:
    """For each of :data:`ACCOUNT_WIDE` on which a live process of ``peers`` differs from
    ``own`` (this process's own settings), one part per such process: ``another run
    (bob-laptop pid 4242) runs with WANBATCH_MAX_OUTSTANDING=40``. Empty when they all agree."""
    found: dict[str, tuple[str, ...]] = {}
    for setting in ACCOUNT_WIDE:
        mine = own_value(own, setting)
        parts = tuple(
            f"{peer.name} runs with {setting}={_shown(peer.value(setting))}"
            for peer in peers
            if _shown(peer.value(setting)) != mine
        )
        if parts:
            found[setting] = parts
    return found


def disagreements(peers: Sequence[PeerLimits]) -> list[str]:
    """One part per setting of :data:`ACCOUNT_WIDE` on which the live processes ``peers``
    (grouped by account: :func:`same_account`) disagree, each value and its processes, and the
    value in force (the strictest): what ``doctor`` says. Nothing when they agree."""
    groups: dict[tuple[str, str], list[PeerLimits]] = {}
    for peer in peers:
        if not peer.simulated:
            groups.setdefault((peer.key, peer.origin), []).append(peer)
    parts: list[str] = []
    for (_key, _origin), group in sorted(groups.items()):
        if len(group) < 2:
            continue
        for setting in ACCOUNT_WIDE:
            values: dict[str, list[str]] = {}
            for peer in group:
                values.setdefault(_shown(peer.value(setting)), []).append(_bare(peer))
            if len(values) < 2:
                continue
            applied = _strictest_of(setting, group)
            listed = "; ".join(f"{', '.join(who)}: {value}" for value, who in values.items())
            parts.append(f"{setting} ({listed}): each applies the strictest, {applied}")
    return parts


def _bare(peer: PeerLimits) -> str:
    """``run bob-laptop pid 4242``; ``tick leader vm pid 11452``."""
    return peer.name.replace("another run (", "run ").replace("the workers' tick leader (", "tick leader ")[
        :-1
    ]


def _strictest_of(setting: str, group: Sequence[PeerLimits]) -> str:
    """The strictest value of ``setting`` among ``group``, shown (as :func:`strictest` picks it)."""
    values = [peer.value(setting) for peer in group]
    if setting == "WANBATCH_SUBMIT_JITTER_ALLOWANCE":
        return _shown(max(values))
    if setting.endswith("_PER_ENDPOINT"):
        return _shown(_lowest({}, values))
    return _shown(min(values))
