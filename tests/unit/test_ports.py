"""The port helper never hands out a port the kernel could give away by itself."""

from __future__ import annotations

import socket

from tests.ports import _ephemeral_start, unused_port


def test_ports_are_below_the_ephemeral_range_distinct_and_bindable() -> None:
    ports = [unused_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    assert all(10000 <= port < _ephemeral_start() for port in ports)
    for port in ports:
        with socket.socket() as server:
            server.bind(("127.0.0.1", port))  # free: a server can take it


def test_a_kernel_pick_is_never_below_the_ephemeral_start() -> None:
    """Why the helper works: ``bind(0)`` draws from the ephemeral range only."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        assert probe.getsockname()[1] >= _ephemeral_start()
