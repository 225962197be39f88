"""A ``WANBATCH_METRICS_PORT`` in use is refused before anything is stored, as every start-up refusal is.

``run`` and ``rerun`` found the port taken only when the work began: exit 2 with the right line,
but the batch stayed stored, ``active`` with its jobs ``pending``, and a refused ``rerun`` used up
its ``-rerun-N`` number. The limiter, the output folder and ``FAL_KEY`` were refused before; the
port now is too (:func:`cli.batch_commands.fal_settings` binds it first).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, counts
from tests.ports import unused_port

SMALL = """name: metrics-port
endpoint: fal-ai/wan-22
items:
  - prompt: one
  - prompt: two
"""


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else listens on for the test."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        yield taken.getsockname()[1]


@pytest.mark.parametrize("simulate", [True, False], ids=["simulated", "fal"])
@pytest.mark.parametrize("command", ["run", "rerun"])
def test_a_metrics_port_in_use_stores_nothing_and_sends_nothing(
    command: str,
    simulate: bool,
    taken_port: int,
    wb: Wb,
    sim: SimulatorHandle,
    manifest: MakeManifest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = manifest("metrics-port", SMALL)
    simulated = ["--simulate"] if simulate else []
    if command == "rerun":  # a batch to rerun, processed without the setting
        assert wb("run", path, *simulated, "--json", "--no-progress").code == 0
    db = os.environ["WANBATCH_DATABASE_URL"]
    before = counts(db) if command == "rerun" else (0, 0)
    accepted = sim.ledger()["accepted"]
    monkeypatch.setenv("WANBATCH_METRICS_PORT", str(taken_port))

    target = path if command == "run" else "metrics-port"
    result = wb(command, target, *simulated, "--no-progress")

    assert result.code == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"error: WANBATCH_METRICS_PORT={taken_port}: cannot serve metrics on 127.0.0.1:{taken_port} "
        "(Address already in use); choose another port or unset it"
    ]
    if command == "run":
        assert not os.path.exists(db.removeprefix("sqlite:///")) or counts(db) == (0, 0)
    else:
        assert counts(db) == before  # no metrics-port-rerun-1
    assert sim.ledger()["accepted"] == accepted  # nothing sent

    # With a free port the same command works, and the rerun is still the first one.
    port = unused_port()
    monkeypatch.setenv("WANBATCH_METRICS_PORT", str(port))
    report = wb(command, target, *simulated, "--json", "--no-progress").json()
    assert report["name"] == ("metrics-port" if command == "run" else "metrics-port-rerun-1")
    assert report["counts"]["succeeded"] == 2
    with socket.socket() as again:  # the run is over: its metrics port is free again
        again.bind(("127.0.0.1", port))
