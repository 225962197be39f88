"""Under ``--json``, a Ctrl-C that ends the process on the spot (``os._exit``) still prints the
contract's ``{"ok": false, "error": "interrupted…"}`` on stdout.

Two paths exit that way: a Ctrl-C during start-up (:func:`cli._exit_interrupted`, before the
command's own handling) and a second Ctrl-C while a run stops (:func:`worker.running.stop_on_signals`).
Both wrote only their line on stderr: a script reading stdout read nothing. Each is driven here in
process, deterministically: the handler called as the signal would call it, ``os._exit`` made an
exception, fd 1 captured (the object goes there with ``os.write``, not through ``sys.stdout``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest

import cli
from tests.e2e.e2e_helpers import db_rows
from tests.in_process import run_main
from worker import running


def _exit_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """``os._exit(code)`` raises SystemExit(code): the test goes on, and reads the code."""

    def fake_exit(code: int) -> NoReturn:
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)


def _strict(text: str) -> dict[str, Any]:
    def refuse(constant: str) -> NoReturn:
        raise ValueError(constant)

    lines = text.splitlines()
    assert len(lines) == 1, text
    document: dict[str, Any] = json.loads(lines[0], parse_constant=refuse)
    return document


@pytest.mark.parametrize(
    ("argv", "printed"),
    [
        (["run", "--simulate", "--json", "m.yaml"], True),
        (["run", "--simulate", "m.yaml"], False),
        (["run", "--simulate", "m.yaml", "--", "--json"], False),  # after --: a file name
    ],
    ids=["json", "plain", "after-dashes"],
)
def test_ctrl_c_during_start_up_prints_the_json_error(
    argv: list[str], printed: bool, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["wanbatch", *argv])
    _exit_raises(monkeypatch)
    with pytest.raises(SystemExit) as ended:
        cli._exit_interrupted(signal.SIGINT, None)
    assert ended.value.code == 130
    out, err = capfd.readouterr()
    assert err == "interrupted\n"
    if printed:
        assert _strict(out) == {"ok": False, "error": "interrupted"}
    else:
        assert out == ""


def test_a_second_ctrl_c_under_json_prints_the_json_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "twice.yaml"
    manifest.write_text("name: twice\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: hi\n")

    def interrupted_twice(*_args: object, **_kwargs: object) -> NoReturn:
        running._waiting.set()  # as while the batch is processed: the first signal only asks it to stop
        signal.raise_signal(signal.SIGINT)
        assert running._stop_requested.is_set()
        signal.raise_signal(signal.SIGINT)  # handled before raise_signal returns: exits
        raise AssertionError("the second Ctrl-C did not end the process")

    monkeypatch.setattr(running, "process_batch", interrupted_twice)
    _exit_raises(monkeypatch)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = run_main(["run", "--simulate", "--json", "--no-progress", str(manifest)], monkeypatch)
    finally:  # the exit on the spot left the run's handlers installed
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        running._waiting.clear()
        running._stop_requested.clear()
    assert code == 130
    out, err = capfd.readouterr()
    assert "interrupted again: exiting now" in err
    # The batch was stored before its processing was interrupted: the object names it (it said
    # null, though the database held the batch and its pending jobs).
    ((stored,),) = db_rows(os.environ["WANBATCH_DATABASE_URL"], "SELECT id FROM batches")
    assert _strict(out) == {
        "ok": False,
        "error": "interrupted again: exiting now",
        "interrupted": True,
        "batch": stored,
    }
