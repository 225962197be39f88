"""``wanbatch submit MANIFEST`` prints the batch id (CONTRACT.md, README): on stdout the id alone,
so ``B=$(wanbatch submit m.yaml); wanbatch status "$B"`` works; what was stored is said on stderr.

stdout held a sentence, ``batch b4ee496d… (name) created: 2 job(s), 2 new, 0 already stored``
(the id in bold on a colour terminal), so ``status "$B"`` failed with exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.e2e.e2e_helpers import WANBATCH, MakeManifest, Wb

TWO = (
    "name: {name}\nendpoint: fal-ai/wan-22\nitems:\n"
    "  - {{prompt: a harbour at dawn, seed: 1}}\n  - {{prompt: a harbour at dusk, seed: 2}}\n"
)
#: Longer than COLUMNS below, with markup brackets rich would read.
LONG_NAME = "a-[bold]-batch-name-longer-than-the-terminal-is-wide"


def test_submit_prints_the_batch_id_alone_on_stdout_and_the_sentence_on_stderr(
    wb: Wb, manifest: MakeManifest
) -> None:
    path = manifest("long", TWO.format(name=f'"{LONG_NAME}"'))
    first = wb("submit", path)
    assert first.code == 0, first.stderr
    batch = wb("status", LONG_NAME, "--json").json()["batch"]
    assert first.stdout == f"{batch}\n"
    assert f"batch {batch} ({LONG_NAME}) created: 2 job(s), 2 new, 0 already stored\n" in first.stderr

    again = wb("submit", path)
    assert again.code == 0, again.stderr
    assert again.stdout == f"{batch}\n"
    assert f"batch {batch} ({LONG_NAME}) updated: 2 job(s), 0 new, 2 already stored\n" in again.stderr

    as_json = wb("submit", path, "--json")  # unchanged: the one object, the id as `batch`
    assert as_json.code == 0, as_json.stderr
    assert as_json.json()["batch"] == batch
    assert "already stored" not in as_json.stderr


def test_the_id_submit_prints_is_what_status_takes_in_a_shell(manifest: MakeManifest, tmp_path: Path) -> None:
    """The README's script, on a colour terminal (FORCE_COLOR) 20 columns wide: no escape code,
    no wrap in what ``$(…)`` reads."""
    path = manifest("night", TWO.format(name="night"))
    script = (
        f'B=$("{WANBATCH}" submit "{path}") && printf "%s" "$B" > id.txt && "{WANBATCH}" status "$B" --json'
    )
    done = subprocess.run(
        ["bash", "-c", script],
        env={**os.environ, "FORCE_COLOR": "1", "COLUMNS": "20", "TERM": "xterm-256color"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    batch = (tmp_path / "id.txt").read_text()
    assert len(batch) == 32, repr(batch)
    assert batch.isalnum(), repr(batch)
    report = json.loads(done.stdout)
    assert (report["batch"], report["name"], report["total"]) == (batch, "night", 2)
    assert f"batch \x1b[1m{batch}\x1b[0m (night) created: 2 job(s), 2 new, 0 already stored" in done.stderr
