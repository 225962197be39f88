"""The connections ``wanbatch serve`` keeps open: a deadline for each request's head, and a cap
on the connections of one peer.

uvicorn counts every open connection toward ``limit_concurrency`` (beyond it, each request is
answered 503), and its h11 protocol has no deadline for a request's head (request line and
headers): its keep-alive timer is armed only after a response, and any byte cancels it. So a
hundred connections that send nothing — or a header a byte every few seconds — held every slot
for ever, and every webhook delivery, ``/healthz`` and the dashboard got 503 meanwhile (fal gives
up on a webhook after 10 tries over about 2 hours). :class:`GuardedH11Protocol`, passed as
``uvicorn.Config(http=...)``, closes a connection that has not sent a whole head within
:data:`HEAD_DEADLINE` — from the moment it opens, and again from the end of each response for
the next request on a keep-alive connection (nginx's ``client_header_timeout``) — and refuses a
peer's connection beyond its share (:func:`guarded_h11`), so that one host cannot take every slot
even by reconnecting. Only public (globally routed) addresses have a share: the proxies
``WANBATCH_SERVE_FORWARDED_ALLOW_IPS`` trusts, and any private, loopback or link-local peer
(a proxy or tunnel on this host, Docker's bridge gateway that every client of a published port
comes through, a caller in the same cluster), have none: everything behind such a peer comes
from its address, and a cap on it would let one client behind it lock every other one out.

Each connection closed is counted (``wanbatch_serve_connections_closed_total``, by reason) and
logged, one warning line per peer and reason at most every :data:`LOG_INTERVAL` seconds, never
a traceback: a flood of connections is one line a minute, not one per connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from web.auth import trusted_peer
from web.bodies import BODY_DEADLINE
from worker import telemetry

log = logging.getLogger(__name__)

#: Seconds a connection has to send a whole request head (request line and headers), from the
#: moment it opens and again from the end of each response: as long as a body has
#: (:data:`web.bodies.BODY_DEADLINE`), which a few KiB of headers need far less than. A client
#: that sends nothing, or drips its headers, holds one of ``serve``'s connection slots (uvicorn
#: answers 503 once they are all held) for at most this long, not for ever. Read when each
#: deadline is set, so a test can shorten it.
HEAD_DEADLINE = BODY_DEADLINE
#: Seconds between two warning lines about one peer's connections closed for one reason: the
#: first is logged at once, the rest of a flood summed up in one line at the end of the interval.
LOG_INTERVAL = 60.0

#: The ``reason`` of a connection closed because its request head did not come in time.
HEAD_TIMEOUT = "head_timeout"
#: The ``reason`` of a connection refused because its peer had its share open already.
PEER_LIMIT = "peer_limit"


def _unmapped(host: str) -> str:
    """``host`` as an address, an IPv4-mapped IPv6 one (``::ffff:10.0.0.5``, what a dual-stack
    listener, ``serve --host ::``, sees of an IPv4 client) as IPv4, a zone left out; a name
    that is no address as it is."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def capped(host: str) -> bool:
    """Whether connections from ``host`` count toward a share: only a public (globally routed)
    address's do (:mod:`ipaddress`'s ``is_global``). A private, loopback or link-local peer is a
    proxy, a tunnel, a container network's gateway or a neighbour, with many clients behind it."""
    try:
        return ipaddress.ip_address(_unmapped(host)).is_global
    except ValueError:
        return False


def peer_key(host: str) -> str:
    """Whose share a connection from ``host`` counts toward: the address itself (an IPv4-mapped
    IPv6 address as IPv4), but an IPv6 host's whole /64, which one subscriber usually holds."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class PeerGuard:
    """One server's open connections by peer, its cap, and the rate-limited warnings.

    Used on the server's event loop only (every protocol callback runs there): no lock."""

    def __init__(self, per_peer: int, trusted: Callable[[str | None], bool]) -> None:
        self.per_peer = per_peer
        self.trusted = trusted
        self.open: dict[str, int] = {}
        #: Peers and reasons logged in the current interval, and how many closed since.
        self._logged: dict[tuple[str, str], int] = {}

    def admit(self, host: str | None) -> tuple[bool, str | None]:
        """Whether a new connection from ``host`` may stay (not when its peer has ``per_peer``
        open already), and the key it was counted under (None: a trusted proxy, or no address,
        has no share)."""
        if host is None or self.trusted(host) or self.trusted(_unmapped(host)) or not capped(host):
            return True, None
        key = peer_key(host)
        held = self.open.get(key, 0)
        if held >= self.per_peer:
            return False, None
        self.open[key] = held + 1
        return True, key

    def release(self, key: str) -> None:
        """A connection :meth:`admit` counted has ended."""
        held = self.open.get(key, 0) - 1
        if held > 0:
            self.open[key] = held
        else:
            self.open.pop(key, None)

    def closed(self, loop: asyncio.AbstractEventLoop, peer: str, reason: str) -> None:
        """Count one connection closed for ``reason``; the first of an interval is logged at once,
        the others summed up at its end."""
        telemetry.count_connection_closed(reason)
        key = (peer, reason)
        if key in self._logged:
            self._logged[key] += 1
            return
        self._logged[key] = 0
        log.warning("%s", _why(reason, peer, 1, self.per_peer), extra={"event": f"serve.{reason}"})
        loop.call_later(LOG_INTERVAL, self._interval_over, loop, key)

    def _interval_over(self, loop: asyncio.AbstractEventLoop, key: tuple[str, str]) -> None:
        count = self._logged.pop(key, 0)
        if count:
            peer, reason = key
            line = _why(reason, peer, count, self.per_peer, since=f" in the last {LOG_INTERVAL:g} s")
            log.warning("%s", line, extra={"event": f"serve.{reason}"})
            self._logged[key] = 0  # the next interval's are summed up at its end too
            loop.call_later(LOG_INTERVAL, self._interval_over, loop, key)


def _why(reason: str, peer: str, count: int, per_peer: int, since: str = "") -> str:
    """The warning line for ``count`` connections from ``peer`` closed for ``reason``."""
    some = f"{count} more connection{'s' if count > 1 else ''}" if since else "a connection"
    more = "" if since else f"; any more from it are summed up in {LOG_INTERVAL:g} s"
    if reason == HEAD_TIMEOUT:
        return (
            f"serve: closed {some} from {peer}{since}: no whole request head within "
            f"{HEAD_DEADLINE:g} s (an idle or slow client holds one of serve's connection slots){more}"
        )
    return (
        f"serve: refused {some} from {peer}{since}: it has {per_peer} open already, the most one "
        f"peer may (a proxy in WANBATCH_SERVE_FORWARDED_ALLOW_IPS has no such cap){more}"
    )


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request's head and a cap per peer.

    Made for one server by :func:`guarded_h11`, which sets :attr:`guard`."""

    guard: ClassVar[PeerGuard]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head_timer: asyncio.TimerHandle | None = None
        #: The request cycle when the deadline was set: another one means a head came whole.
        self._head_cycle: object | None = None
        self._peer: str | None = None  # the key counted in the guard, if any

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        admitted, self._peer = self.guard.admit(host)
        if not admitted:
            # Not one of the connections uvicorn counts toward its limit: gone at once.
            self.connections.discard(self)
            self.guard.closed(self.loop, peer_key(host or "?"), PEER_LIMIT)
            transport.close()
            return
        self._set_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        self._release()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self._head_timer is not None and self.cycle is not self._head_cycle:
            self._cancel_head_deadline()  # h11 gave a whole h11.Request: its head is in

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            # Before uvicorn's, which handles a pipelined request at once (and so cancels it).
            self._set_head_deadline()
        super().on_response_complete()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        # The connection becomes the WebSocket protocol's (serve has no WebSocket route): no
        # longer ours to time or count.
        self._cancel_head_deadline()
        self._release()
        super().handle_websocket_upgrade(event)

    def _set_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_cycle = self.cycle
        self._head_timer = self.loop.call_later(HEAD_DEADLINE, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _release(self) -> None:
        if self._peer is not None:
            self.guard.release(self._peer)
            self._peer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        host = self.client[0] if self.client else "?"
        self.guard.closed(self.loop, peer_key(host), HEAD_TIMEOUT)
        self.transport.close()


def guarded_h11(per_peer: int, allow_ips: str) -> type[GuardedH11Protocol]:
    """The protocol class for one server (``uvicorn.Config(http=...)``, which takes a class
    as it is): at most ``per_peer`` connections open from one peer, except the proxies
    ``allow_ips`` names (``WANBATCH_SERVE_FORWARDED_ALLOW_IPS``, as the app believes them)."""
    guard = PeerGuard(per_peer, trusted_peer(allow_ips))

    class ServeProtocol(GuardedH11Protocol):
        pass

    ServeProtocol.guard = guard
    return ServeProtocol
