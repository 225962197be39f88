"""Which machine this is: where a batch's manifest lives (``batches.manifest_host``).

A batch is found by its ``name:``, and its manifest by its absolute path, but a path says
nothing on a database several machines share (``WANBATCH_DATABASE_URL`` on a team's PostgreSQL):
``/home/me/clip.yaml`` on one laptop is not the file of that name on another, and a dev container
gives every machine the same paths. So a batch records the machine its manifest was submitted
from, and another machine cannot check whether "the old manifest is still there"
(:func:`jobs.batches.refuse_name_taken`).

The identity is ``/etc/machine-id`` when it holds one (systemd's machine ID: 32 lowercase hex
digits, set once at installation and kept across reboots, unlike the boot id
:func:`jobs.processes.namespace_here` reads, or a DHCP-given hostname; see machine-id(5),
https://www.freedesktop.org/software/systemd/man/latest/machine-id.html, which also says an
image not yet booted has it empty or ``uninitialized``: no identity then), else the hostname
(macOS, a container image without one). The hostname is stored beside it to name the machine to
a person: ``HOST@MACHINE-ID``, or ``HOST`` alone when the hostname is the identity.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path

from jobs.processes import IDENTITY_MARK, namespace_here

#: Test-only: a value here is this process's machine (``HOST`` or ``HOST@ID``), so a test can
#: play two machines sharing one database without two machines. Not a setting: never set it
#: outside the test suite (it would let this machine take another's batches unasked).
TEST_MACHINE_ENV = "_WANBATCH_TEST_MACHINE"

#: Between the hostname and the machine id in the stored form.
SEPARATOR = "@"

_MACHINE_ID = re.compile(r"[0-9a-f]{32}")


@functools.cache
def machine_id(path: Path = Path("/etc/machine-id")) -> str | None:
    """This machine's id (machine-id(5)), or None when the file is missing, empty,
    ``uninitialized`` or anything but 32 lowercase hex digits. Read once per process."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _MACHINE_ID.fullmatch(text) else None


def this_machine() -> str:
    """The stored form of this machine: ``HOST@MACHINE-ID``, or ``HOST`` without a machine id."""
    if forced := os.environ.get(TEST_MACHINE_ENV):
        return forced
    host = socket.gethostname().replace(SEPARATOR, "_") or "localhost"
    found = machine_id()
    return f"{host}{SEPARATOR}{found}" if found else host


def identity(stored: str) -> str:
    """What tells machines apart in a stored form: its machine id, else its hostname."""
    _, sep, ident = stored.rpartition(SEPARATOR)
    return ident if sep and ident else stored


def name(stored: str) -> str:
    """How a person knows the machine of a stored form: its hostname."""
    host, sep, _ = stored.rpartition(SEPARATOR)
    return host if sep and host else stored


def is_here(stored: str | None) -> bool | None:
    """Whether stored machine ``stored`` is this one; None when unknown (a batch stored before
    wanbatch recorded it)."""
    if stored is None:
        return None
    return identity(stored) == identity(this_machine())


def elsewhere(stored: str | None) -> bool:
    """Whether ``stored`` names a machine known not to be this one."""
    return is_here(stored) is False


def beat_machine(owner: str) -> str | None:
    """The host name of the machine heartbeat owner ``owner`` (``host:pid:thread``, perhaps
    followed by ``@BOOT.PIDNS.START``, :func:`jobs.processes.beat_owner`) runs on when it is
    known not to be this one; None when it is this machine's (or cannot be told apart from it).

    Another machine: another host name than this machine's (:func:`name` of
    :func:`this_machine`), or the same one with the proof of another boot or pid namespace (one
    dev-container image gives every machine the same name). A beat without that proof (an older
    wanbatch's) is told by its host name alone."""
    host = owner.partition(":")[0]
    if host.replace(SEPARATOR, "_") != name(this_machine()):
        return host
    head, mark, proof = owner.rpartition(IDENTITY_MARK)
    if not mark or ":" not in head:
        return None
    here = namespace_here()
    namespace = proof.rpartition(".")[0]
    return host if here is not None and namespace and namespace != here else None
