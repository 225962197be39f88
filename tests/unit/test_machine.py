"""Which machine this is (:mod:`jobs.machine`): ``/etc/machine-id`` when it holds one, else the
hostname; a stored form compared by its identity and named by its hostname."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from jobs import machine

ID = "3d1219c7c4c5404aaa1f6d2a48adfda4"


@pytest.mark.parametrize(
    ("text", "found"),
    [
        (f"{ID}\n", ID),
        ("", None),  # an image not booted yet (machine-id(5))
        ("uninitialized\n", None),  # systemd's first boot
        (ID.upper(), None),  # not the documented form: no identity rather than a wrong one
        (ID[:-1], None),
    ],
)
def test_the_machine_id_is_taken_only_in_its_documented_form(
    tmp_path: Path, text: str, found: str | None
) -> None:
    path = tmp_path / f"machine-id-{len(text)}-{text[:3]}"
    path.write_text(text, encoding="ascii")
    assert machine.machine_id(path) == found
    assert machine.machine_id(tmp_path / "missing") is None


def test_without_a_machine_id_the_hostname_is_the_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(machine.TEST_MACHINE_ENV, raising=False)
    monkeypatch.setattr(machine, "machine_id", lambda: None)
    monkeypatch.setattr(socket, "gethostname", lambda: "laptop")
    assert machine.this_machine() == "laptop"
    monkeypatch.setattr(machine, "machine_id", lambda: ID)
    assert machine.this_machine() == f"laptop@{ID}"


def test_a_stored_machine_is_compared_by_its_id_and_named_by_its_hostname(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(machine.TEST_MACHINE_ENV, f"renamed@{ID}")
    assert machine.is_here(f"laptop@{ID}") is True  # the hostname changed, the machine did not
    assert machine.elsewhere(f"laptop@{'0' * 32}")
    assert machine.name(f"laptop@{ID}") == "laptop"
    assert machine.is_here(None) is None  # stored before 0050
    assert not machine.elsewhere(None)
    monkeypatch.setenv(machine.TEST_MACHINE_ENV, "laptop")
    assert machine.is_here("laptop") is True
    assert machine.elsewhere(f"laptop@{ID}")  # one has an id the other lacks: not the same


def test_a_heartbeat_is_another_machines_by_its_host_or_by_its_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``--take-over`` asks of a run's heartbeat owner (``host:pid:thread@BOOT.PIDNS.START``):
    another host name is another machine; the same name is another machine only with the proof
    of another boot or pid namespace (one dev-container image, one host name); a beat without
    that proof cannot be told apart from this machine's."""
    monkeypatch.setenv(machine.TEST_MACHINE_ENV, f"laptop@{ID}")
    monkeypatch.setattr(machine, "namespace_here", lambda: "boot-here.4026531836")
    assert machine.beat_machine("alice-laptop:4242:1@boot-there.4026531836.777") == "alice-laptop"
    assert machine.beat_machine("alice-laptop:4242:1") == "alice-laptop"
    assert machine.beat_machine("laptop:4242:1@boot-there.4026531836.777") == "laptop"
    assert machine.beat_machine("laptop:4242:1@boot-here.4026531836.777") is None
    assert machine.beat_machine("laptop:4242:1") is None
    assert machine.beat_machine("laptop:4242:simulating 777 http://127.0.0.1:9") is None
