"""What validation checked is what ``submit`` and ``run`` store and send: an ``items_from`` file
changed between the validating pass and the storing one is refused, nothing stored.

Audit (money): ``submit`` validated the rows, then read the file again to store them, and
checked nothing of what that second read found. Rows appended meanwhile were stored as read
(``num_frames: 9999``, an unknown field, no prompt); a sweep's row rewritten in place was sent
2,000 times for fal's 422 (``spent $50,400.00 · wasted $49,995.00``); a row fal has no price for
crashed the command (exit 70) in pricing. The storing pass now hashes the bytes it reads and
refuses, in one line, a file that is not the one validated (nothing of the batch is stored:
its insert is one transaction). The hook here rewrites the file between the two passes, as an
export still writing it or a sync tool would in the ~20 s a 100,000-row file gives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jobs import batches
from jobs.manifest import validate_manifest
from tests.e2e.e2e_helpers import Wb, counts

MANIFEST = """\
name: rows
endpoint: fal-ai/wan-22
defaults: {resolution: 480p, enable_prompt_expansion: false}
items_from: prompts.jsonl
"""

SWEEP = """\
name: sweep
endpoint: fal-ai/wan-22
defaults: {resolution: 480p, enable_prompt_expansion: false}
matrix:
  seed: [1, 2]
items_from: prompts.jsonl
"""

ROWS = [{"prompt": f"a lighthouse at dusk, take {i}", "num_frames": 81} for i in range(20)]

REAL_VALIDATE = validate_manifest

CHANGED = "prompts.jsonl changed while submit ran"
AGAIN = "nothing was submitted: run it again once the file is written"


def _text(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _rows(folder: Path, rows: list[dict[str, Any]]) -> Path:
    path = folder / "prompts.jsonl"
    path.write_text(_text(rows), encoding="utf-8")
    return path


def _between_passes(monkeypatch: pytest.MonkeyPatch, change: Callable[[], None]) -> list[int]:
    """``change()`` once, right after the validating pass ends and before the storing pass reads
    the file again: the window the audit wrote into."""
    real = REAL_VALIDATE
    done: list[int] = []

    def validate_then_change(*args: Any, **kwargs: Any) -> Any:
        report = real(*args, **kwargs)
        if not done:
            done.append(1)
            change()
        return report

    monkeypatch.setattr(batches, "validate_manifest", validate_then_change)
    return done


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    return lines[0]


def _refused(done: Any) -> str:
    assert done.code == 2, (done.code, done.stderr)
    line = _one_line(done.stderr)
    assert CHANGED in line, line
    assert line.endswith(AGAIN), line
    return line


def _database() -> str:
    return os.environ["WANBATCH_DATABASE_URL"]


def test_rows_appended_after_validation_are_never_stored(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = _rows(e2e_env, ROWS)
    manifest = e2e_env / "rows.yaml"
    manifest.write_text(MANIFEST, encoding="utf-8")

    def append() -> None:
        with rows.open("a", encoding="utf-8") as fh:
            bad = {"prompt": "never validated", "num_frames": 9999, "bogus_field": True}
            fh.write(json.dumps(bad) + "\n")
            fh.write(json.dumps({"num_frames": 81}) + "\n")  # no prompt at all

    swapped = _between_passes(monkeypatch, append)
    line = _refused(wb("submit", manifest))
    assert swapped == [1]
    assert "bytes" in line  # says what changed: its size
    assert counts(_database()) == (0, 0)  # nothing of the batch is stored

    # The file as it is now is validated as any other: its bad rows are said, nothing stored.
    monkeypatch.setattr(batches, "validate_manifest", REAL_VALIDATE)
    bad = wb("submit", manifest)
    assert bad.code == 2
    assert "num_frames" in bad.stderr
    assert "prompt" in bad.stderr
    assert counts(_database()) == (0, 0)


def test_a_row_rewritten_in_place_is_never_sent_by_run(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same size, so only the bytes tell: a row rewritten after validation (its valid 81
    frames turned into 999) was sent for every seed of the sweep, each a 422 fal bills."""
    rows = _rows(e2e_env, ROWS[:3])
    manifest = e2e_env / "sweep.yaml"
    manifest.write_text(SWEEP, encoding="utf-8")
    before = rows.read_bytes()
    after = before.replace(b'"num_frames": 81}', b'"num_frames": 999}', 1).replace(b"take 0", b"take0", 1)
    assert len(after) == len(before)
    assert after != before

    def rewrite() -> None:
        stat = rows.stat()
        rows.write_bytes(after)
        os.utime(rows, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even its time put back

    _between_passes(monkeypatch, rewrite)
    _refused(wb("run", manifest, "--simulate", "--no-progress"))
    assert counts(_database()) == (0, 0)  # nothing stored, so nothing sent


def test_a_row_no_price_covers_is_the_changed_file_not_a_crash(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crash variant: a row with ``resolution: 1080p`` reached pricing unvalidated, which
    raised ValueError (exit 70, internal error). Written over the second row at the same size,
    so the storing pass opens it, reads it and prices it before anything tells it apart: the
    pricing error is put down to the change, said in its one line."""
    rows = _rows(e2e_env, ROWS)
    manifest = e2e_env / "rows.yaml"
    manifest.write_text(MANIFEST, encoding="utf-8")
    lines = rows.read_text(encoding="utf-8").splitlines(keepends=True)
    wide = json.dumps({"prompt": "", "resolution": "1080p"}) + "\n"
    lines[1] = wide.replace('""', '"' + "w" * (len(lines[1]) - len(wide)) + '"')
    assert len("".join(lines)) == rows.stat().st_size

    def rewrite() -> None:
        rows.write_text("".join(lines), encoding="utf-8")

    _between_passes(monkeypatch, rewrite)
    line = _refused(wb("submit", manifest))
    assert "its bytes differ from those validated" in line
    assert counts(_database()) == (0, 0)


def test_a_resubmit_adds_nothing_from_a_file_changed_while_it_ran(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch stored before: the edited file's rows are neither added nor do they renumber or
    drop the stored jobs (the whole resubmit is one transaction, rolled back)."""
    rows = _rows(e2e_env, ROWS)
    manifest = e2e_env / "rows.yaml"
    manifest.write_text(MANIFEST, encoding="utf-8")
    assert wb("submit", manifest).code == 0
    assert counts(_database()) == (1, 20)
    edited = [{"prompt": "a new first row", "num_frames": 81}, *ROWS[5:]]

    def replace_file() -> None:  # written aside and renamed over it, as editors save
        aside = e2e_env / "prompts.jsonl.tmp"
        aside.write_text(_text([*edited, {"prompt": 7}]), encoding="utf-8")
        aside.replace(rows)

    _between_passes(monkeypatch, replace_file)
    _refused(wb("submit", manifest))
    assert counts(_database()) == (1, 20)
    status = wb("status", "rows", "--json")
    assert status.code == 0, status.stderr
    assert {state: n for state, n in status.json()["counts"].items() if n} == {"pending": 20}


def test_an_unchanged_file_is_stored_as_validated(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check refuses only a change: a file merely touched (its time, not its bytes) between
    the passes is stored, every row once."""
    rows = _rows(e2e_env, ROWS)
    manifest = e2e_env / "rows.yaml"
    manifest.write_text(MANIFEST, encoding="utf-8")
    _between_passes(monkeypatch, lambda: os.utime(rows, ns=(1, 1)))
    done = wb("submit", manifest)
    assert done.code == 0, done.stderr
    assert counts(_database()) == (1, 20)
