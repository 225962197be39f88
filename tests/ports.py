"""A loopback TCP port for a server some *other* process will bind later.

Asking the kernel for port 0 and closing the socket is not enough: the port it returns comes
from the ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``, 32768–60999 by default),
the same range every outgoing connection and every later ``bind(0)`` draws from. Between the
pick and the server's ``bind``, a Redis client or the simulator can take it, and the server
fails with "Address already in use" (seen in CI: a worker's metrics port). A port below that
range is never handed out implicitly, so only another explicit pick could collide with it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10000  # above the well-known and most registered service ports
_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS/BSD start higher (49152)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def unused_port() -> int:
    """A port on 127.0.0.1 that is free now and that the kernel will not hand out by itself.

    Each call returns a different port within one test run, so two servers a test starts
    one after the other never get the same one.
    """
    top = _ephemeral_start()
    candidates = list(range(_LOWEST, top)) if top > _LOWEST + 100 else list(range(_LOWEST, 30000))
    for port in random.sample(candidates, k=min(200, len(candidates))):
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free loopback port in {_LOWEST}-{top - 1}")
