"""A batch name taken from another machine never merges two people's batches.

Audit (a team sharing one PostgreSQL database, each running embedded ``wanbatch run`` from a
laptop): Alice ran ``name: clip`` from her laptop, Bob his own ``name: clip`` manifest from his.
Alice's manifest is not on Bob's machine, so "the old manifest is still there" was false there:
Bob got ``batch clip moved: its manifest is now …``, Alice's never-sent jobs were cancelled as
"no longer in its manifest", and both runs exited 0. With the same project path on both
machines (one dev-container layout) no move was even considered: Bob's submit replaced Alice's
cap. Then Alice re-running took the batch back.

Two machines are played in one process by :data:`jobs.machine.TEST_MACHINE_ENV` (a test-only
variable); what Bob's machine cannot see of Alice's is moved out of the way while he acts (the
audit's ``unshare -m`` + tmpfs over her folder). The database is a PostgreSQL one of its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from falsim.server import SimulatorHandle
from jobs import store
from jobs.clock import utcnow
from jobs.db import close_engines, open_engine, session_scope
from jobs.machine import TEST_MACHINE_ENV
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import EXAMPLES, db_rows
from tests.in_process import run_main

MANIFEST = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults: {{resolution: 480p}}
budget: {{max_usd: {cap}}}
items:
{items}"""
ALICE = (
    "  - {prompt: alice one, image_url: images/landscape.jpg, seed: 1}\n"
    "  - {prompt: alice two, image_url: images/night.jpg, seed: 2}\n"
    "  - {prompt: alice three, image_url: images/landscape.jpg, seed: 3}\n"
)
BOB = "  - {prompt: bob's own, image_url: images/night.jpg, seed: 99}\n"
ALICE_HOST, BOB_HOST = "alice-laptop", "bob-laptop"


@pytest.fixture
def shared_db(new_pg_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch) -> str:
    """One PostgreSQL database both "machines" use (``WANBATCH_DATABASE_URL``)."""
    url = new_pg_database()
    monkeypatch.setenv("WANBATCH_DATABASE_URL", url)
    get_settings.cache_clear()
    close_engines()
    return url


def _project(folder: Path, name: str, items: str, cap: str) -> Path:
    """``folder/m.yaml`` beside a copy of the example images; its path."""
    if not (folder / "images").exists():
        shutil.copytree(EXAMPLES / "images", folder / "images")
    path = folder / "m.yaml"
    path.write_text(MANIFEST.format(name=name, items=items, cap=cap), encoding="utf-8")
    return path


def _on(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next commands run on machine ``host``."""
    monkeypatch.setenv(TEST_MACHINE_ENV, host)


@contextmanager
def _hidden(folder: Path) -> Iterator[None]:
    """``folder`` is not on this machine while the block runs (another person's laptop)."""
    aside = folder.with_name(f".{folder.name}-elsewhere")
    folder.rename(aside)
    try:
        yield
    finally:
        aside.rename(folder)


def _batch(url: str, name: str) -> tuple[str, str | None, Decimal]:
    """The batch's manifest path, machine (host name part) and cap (USD, as PostgreSQL stores it)."""
    path, host, cap = db_rows(
        url, f"SELECT manifest_path, manifest_host, budget_max_usd FROM batches WHERE name = '{name}'"
    )[0]
    return path, (host.rpartition("@")[0] or host) if host else None, Decimal(cap)


def _states(url: str, name: str) -> list[tuple[str, str]]:
    """Each job's prompt and state, in item order."""
    rows = db_rows(
        url,
        "SELECT j.input, j.state FROM jobs j JOIN batches b ON b.id = j.batch_id "
        f"WHERE b.name = '{name}' ORDER BY j.item_index, j.variant",
    )
    return [
        ((json.loads(given) if isinstance(given, str) else given)["prompt"], state) for given, state in rows
    ]


def _lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if line]


def test_the_same_name_from_another_machine_is_refused_not_merged(
    sim: SimulatorHandle,
    shared_db: str,
    e2e_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The audit's first repro: Bob's ``submit`` and ``run`` of his own ``name: clip`` are refused
    in one line naming Alice's machine and path, nothing of hers changes and nothing is sent;
    Alice's run then sends all three of her jobs, with no "moved" line."""
    alice = _project(e2e_env / "alice", "clip", ALICE, "20")
    _on(ALICE_HOST, monkeypatch)
    assert run_main(["submit", "alice/m.yaml"], monkeypatch) == 0
    bob = _project(e2e_env / "bob", "clip", BOB, "1")
    capsys.readouterr()

    _on(BOB_HOST, monkeypatch)
    with _hidden(e2e_env / "alice"):
        assert run_main(["submit", "bob/m.yaml"], monkeypatch) == 2
        assert _lines(capsys.readouterr().err) == [
            f"error: batch clip belongs to {ALICE_HOST}:{alice} (another machine), and bob/m.yaml asks "
            "for none of its jobs: give this manifest another `name:` (or, if it is the same project "
            "moved to this machine, run the command again with `--take-over`)"
        ]
        assert run_main(["run", "bob/m.yaml", "--no-progress"], monkeypatch) == 2
        assert "error: batch clip belongs to alice-laptop:" in capsys.readouterr().err
    assert sim.ledger()["accepted"] == 0
    assert _batch(shared_db, "clip") == (str(alice), ALICE_HOST, Decimal(20))
    assert [state for _, state in _states(shared_db, "clip")] == ["pending"] * 3
    assert bob.is_file()

    # Alice runs again from her laptop: nothing moved back, every job of hers sent.
    _on(ALICE_HOST, monkeypatch)
    assert run_main(["run", "alice/m.yaml", "--no-progress"], monkeypatch) == 0
    err = capsys.readouterr().err
    assert " moved: " not in err, err
    assert _states(shared_db, "clip") == [
        ("alice one", "succeeded"),
        ("alice two", "succeeded"),
        ("alice three", "succeeded"),
    ]
    assert sim.ledger()["accepted"] == 3


def test_the_same_path_on_another_machine_does_not_replace_the_cap(
    shared_db: str, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The audit's second repro: both machines keep the project at the same path (one
    dev-container layout). Bob's manifest there, with a $1 cap and one job of Alice's, is refused
    (it leaves out two of hers): her $20 cap stays and none of her jobs is dropped."""
    alice = _project(e2e_env / "proj", "clip", ALICE, "20")
    _on(ALICE_HOST, monkeypatch)
    assert run_main(["submit", "proj/m.yaml"], monkeypatch) == 0
    hers = alice.read_text(encoding="utf-8")
    capsys.readouterr()

    _on(BOB_HOST, monkeypatch)  # his own file, at the very same path on his machine
    shared_one = BOB + "  - {prompt: alice one, image_url: images/landscape.jpg, seed: 1}\n"
    alice.write_text(MANIFEST.format(name="clip", items=shared_one, cap="1"), encoding="utf-8")
    assert run_main(["submit", "proj/m.yaml"], monkeypatch) == 2
    assert _lines(capsys.readouterr().err) == [
        f"error: batch clip belongs to {ALICE_HOST}:{alice} (another machine), and proj/m.yaml leaves "
        "out 2 of its 3 job(s): give this manifest another `name:` (or, if it is the same project moved "
        "to this machine, run the command again with `--take-over`)"
    ]
    assert _batch(shared_db, "clip") == (str(alice), ALICE_HOST, Decimal(20))
    assert [state for _, state in _states(shared_db, "clip")] == ["pending"] * 3

    # The same project on a shared folder (every job asked for): taken, and said so.
    alice.write_text(hers, encoding="utf-8")
    assert run_main(["submit", "proj/m.yaml"], monkeypatch) == 0
    assert [line for line in _lines(capsys.readouterr().err) if " moved: " in line] == [
        f"batch clip moved: its manifest is now proj/m.yaml on this machine ({BOB_HOST}) "
        f"(was {ALICE_HOST}:{alice})"
    ]
    assert _batch(shared_db, "clip") == (str(alice), BOB_HOST, Decimal(20))
    assert [state for _, state in _states(shared_db, "clip")] == ["pending"] * 3


def test_a_take_over_moves_the_batch_on_purpose_and_the_other_machine_cannot_take_it_back(
    sim: SimulatorHandle,
    shared_db: str,
    e2e_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The audit's third repro, ping-pong: once a batch is another machine's, the first one's
    manifest (asking for none of its jobs now) is refused too, naming that machine. A batch
    moves between machines only when the manifest asks for all its jobs, or by ``--take-over``."""
    alice = _project(e2e_env / "alice", "clip", ALICE, "20")
    _on(ALICE_HOST, monkeypatch)
    assert run_main(["submit", "alice/m.yaml"], monkeypatch) == 0
    bob = _project(e2e_env / "bob", "clip", BOB, "1")
    capsys.readouterr()

    _on(BOB_HOST, monkeypatch)
    with _hidden(e2e_env / "alice"):
        assert run_main(["submit", "bob/m.yaml", "--take-over"], monkeypatch) == 0
    err = capsys.readouterr().err
    assert (
        f"batch clip moved: its manifest is now bob/m.yaml on this machine ({BOB_HOST}) "
        f"(was {ALICE_HOST}:{alice})"
    ) in err, err
    assert _batch(shared_db, "clip") == (str(bob), BOB_HOST, Decimal(1))

    _on(ALICE_HOST, monkeypatch)
    with _hidden(e2e_env / "bob"):
        assert run_main(["run", "alice/m.yaml", "--no-progress"], monkeypatch) == 2
    assert _lines(capsys.readouterr().err) == [
        f"error: batch clip belongs to {BOB_HOST}:{bob} (another machine), and alice/m.yaml asks for "
        "none of its jobs: give this manifest another `name:` (or, if it is the same project moved to "
        "this machine, run the command again with `--take-over`)"
    ]
    assert _batch(shared_db, "clip") == (str(bob), BOB_HOST, Decimal(1))
    assert sim.ledger()["accepted"] == 0


def test_status_pause_and_cancel_name_the_machine_the_batch_belongs_to(
    shared_db: str, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On Bob's machine, ``status``, ``pause`` and ``cancel`` of Alice's batch each say in one
    line whose it is and where its manifest is; on hers, none does."""
    alice = _project(e2e_env / "alice", "clip", ALICE, "20")
    _on(ALICE_HOST, monkeypatch)
    assert run_main(["submit", "alice/m.yaml"], monkeypatch) == 0
    assert run_main(["status", "clip"], monkeypatch) == 0
    assert "another machine" not in capsys.readouterr().out
    note = (
        f"batch clip belongs to {ALICE_HOST}:{alice} (another machine): its manifest was last "
        "submitted from there"
    )

    _on(BOB_HOST, monkeypatch)
    assert run_main(["status", "clip"], monkeypatch) == 0
    assert note in capsys.readouterr().out.replace("\n", " ")
    assert run_main(["status", "clip", "--json"], monkeypatch) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert (report["manifest_host"], report["manifest_path"]) == (ALICE_HOST, str(alice))
    assert report["manifest_elsewhere_note"] == note
    assert run_main(["pause", "clip"], monkeypatch) == 0
    assert _lines(capsys.readouterr().err) == [note]
    assert run_main(["resume", "clip"], monkeypatch) == 0
    capsys.readouterr()
    monkeypatch.setenv("FAL_KEY", "k-not-used")  # nothing of it is at fal: no call is made
    get_settings.cache_clear()
    run_main(["cancel", "clip", "--no-progress"], monkeypatch)
    assert _lines(capsys.readouterr().err)[0] == note

    _on(ALICE_HOST, monkeypatch)
    assert run_main(["status", "clip", "--json"], monkeypatch) == 0
    assert json.loads(capsys.readouterr().out)["manifest_elsewhere_note"] == ""


def _mount_namespaces() -> bool:
    """Whether this process may give a child a mount namespace of its own (``unshare -m``: root,
    or a kernel allowing it), where another person's folder can be made not there."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False).returncode == 0


def _on_a_machine_of_its_own(command: list[str], hidden: Path) -> list[str]:
    """``command`` as run on another machine: ``hidden`` (the other person's project) is an empty
    tmpfs for it, as in the audit's repro, when mount namespaces are available; else as it is."""
    if not _mount_namespaces():
        return command
    return ["unshare", "-m", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"', str(hidden), *command]


def test_two_machines_submitting_the_same_name_at_once_never_merge(shared_db: str, e2e_env: Path) -> None:
    """Alice and Bob start at the same moment, each from a machine of their own (two processes,
    neither seeing the other's folder where ``unshare -m`` is allowed): whichever stores the
    batch first has it, the other is refused naming the first one's machine, in either order."""
    _project(e2e_env / "alice", "clip", ALICE, "20")
    _project(e2e_env / "bob", "clip", BOB, "1")
    env = {**os.environ, "WANBATCH_DATABASE_URL": shared_db}
    people = (("alice", ALICE_HOST, "bob"), ("bob", BOB_HOST, "alice"))
    started = [
        subprocess.Popen(
            _on_a_machine_of_its_own(
                [sys.executable, "-m", "cli", "submit", f"{who}/m.yaml"], e2e_env / other
            ),
            cwd=e2e_env,
            env={**env, TEST_MACHINE_ENV: host},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who, host, other in people
    ]
    ended = [(proc.wait(timeout=120), proc.communicate()[1]) for proc in started]
    codes = sorted(code for code, _ in ended)
    assert codes == [0, 2], ended
    winner = ALICE_HOST if ended[0][0] == 0 else BOB_HOST
    refused = next(err for code, err in ended if code == 2)
    assert f"error: batch clip belongs to {winner}:" in refused, refused
    prompts = [prompt for prompt, _ in _states(shared_db, "clip")]
    assert prompts == (["alice one", "alice two", "alice three"] if winner == ALICE_HOST else ["bob's own"])
    assert _batch(shared_db, "clip")[1] == winner


def test_a_rerun_records_the_machine_it_was_made_on(
    sim: SimulatorHandle,
    shared_db: str,
    e2e_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A rerun stored no machine (``manifest_host`` NULL): on a shared database it was nobody's,
    so ``status`` (and ``pause``, ``cancel``) on another machine said nothing of whose it was, as
    they do of a submitted batch. It records the machine ``rerun`` ran on: Bob's rerun of
    Alice's batch is Bob's, and said to be on Alice's machine; on Bob's, nothing is said."""
    _project(e2e_env / "alice", "clip", ALICE, "20")
    _on(ALICE_HOST, monkeypatch)
    assert run_main(["run", "alice/m.yaml", "--no-progress"], monkeypatch) == 0
    capsys.readouterr()

    _on(BOB_HOST, monkeypatch)
    assert run_main(["rerun", "clip", "--no-progress", "--json"], monkeypatch) == 0
    rerun = json.loads(capsys.readouterr().out)["name"]
    assert _batch(shared_db, rerun)[1] == BOB_HOST
    assert run_main(["status", rerun, "--json"], monkeypatch) == 0
    assert json.loads(capsys.readouterr().out)["manifest_elsewhere_note"] == ""

    note = f"batch {rerun} belongs to {BOB_HOST} (another machine): a rerun made there"
    _on(ALICE_HOST, monkeypatch)
    assert run_main(["status", rerun, "--json"], monkeypatch) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert report["manifest_host"] == BOB_HOST
    assert report["manifest_elsewhere_note"] == note
    assert run_main(["status", rerun], monkeypatch) == 0
    assert note in capsys.readouterr().out.replace("\n", " ")
    # Its parent stays Alice's: nothing is said of it on her machine.
    assert run_main(["status", "clip", "--json"], monkeypatch) == 0
    assert json.loads(capsys.readouterr().out)["manifest_elsewhere_note"] == ""


def _alice_runs(url: str, name: str, *, seconds_ago: float) -> None:
    """A run of batch ``name`` on Alice's laptop last beat ``seconds_ago`` (database clock): the row
    its heartbeat writes, owner ``host:pid:thread@BOOT.PIDNS.START`` of another boot."""
    batch_id = db_rows(url, f"SELECT id FROM batches WHERE name = '{name}'")[0][0]
    owner = f"{ALICE_HOST}:4242:140001@0e4a4b7c-alice-boot.4026531836.777"
    engine = open_engine(get_settings())
    with session_scope(engine) as session:
        store.record_heartbeat(session, owner, [batch_id], utcnow() - timedelta(seconds=seconds_ago))


def test_a_take_over_is_refused_while_the_other_machines_run_is_alive(
    sim: SimulatorHandle,
    shared_db: str,
    e2e_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Alice's ``run`` of clip still beats on her laptop: Bob's ``--take-over`` (``submit`` and
    ``run``) is refused in one line naming her machine and how recently it was seen, nothing
    stored or sent. Before, it took the batch, and both machines sent and fetched its jobs, each
    into its own output folder. Once her run has been silent for a lease's length
    (``WANBATCH_LEASE_SECONDS``), the take-over goes through."""
    alice = _project(e2e_env / "alice", "clip", ALICE, "20")
    _on(ALICE_HOST, monkeypatch)
    assert run_main(["submit", "alice/m.yaml"], monkeypatch) == 0
    bob = _project(e2e_env / "bob", "clip", BOB, "1")
    _alice_runs(shared_db, "clip", seconds_ago=3)
    capsys.readouterr()

    _on(BOB_HOST, monkeypatch)
    with _hidden(e2e_env / "alice"):
        assert run_main(["submit", "bob/m.yaml", "--take-over"], monkeypatch) == 2
        [line] = _lines(capsys.readouterr().err)
        assert re.fullmatch(
            rf"error: batch clip is still being run on {ALICE_HOST} \(another machine\), last seen [3-9]s "
            r"ago: taken over now, both machines would send and fetch its jobs, each into its own output "
            r"folder; stop that run there, or wait until it has been silent for 2m "
            r"\(WANBATCH_LEASE_SECONDS\), then run the command again with `--take-over`",
            line,
        ), line
        assert run_main(["run", "bob/m.yaml", "--no-progress", "--take-over"], monkeypatch) == 2
        assert f"error: batch clip is still being run on {ALICE_HOST} (another machine)" in (
            capsys.readouterr().err
        )
        assert sim.ledger()["accepted"] == 0
        assert _batch(shared_db, "clip") == (str(alice), ALICE_HOST, Decimal(20))

        _alice_runs(shared_db, "clip", seconds_ago=121)  # silent for longer than a lease
        assert run_main(["submit", "bob/m.yaml", "--take-over"], monkeypatch) == 0
    assert _batch(shared_db, "clip") == (str(bob), BOB_HOST, Decimal(1))
