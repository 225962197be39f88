"""``rerun --vary`` holding FAL_KEY is refused as a manifest holding it is, never echoing it.

Found by a secret-leak audit: ``wanbatch rerun quickstart --vary "prompt=my key $FAL_KEY"`` exited
0, and the key landed in ``jobs.input``, ``batches.rerun_options``, the sidecars, the POST body
sent to fal, the dashboard, ``diff --json`` and the ``hf`` card's "generated:" line; and
``--vary resolution=<key>`` (``seed=<key>``, ``<key>=1``) printed the key back in its error line.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import FAL_KEY, TWO_JOBS, MakeManifest, Wb, counts, db_rows

HOLDS = "the value holds FAL_KEY (the fal API key): refused"
NAME_HOLDS = "a field name here holds FAL_KEY"


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (f"prompt=my key {FAL_KEY}", f"--vary: field 'prompt': {HOLDS}"),
        (f"prompt=a calm sea,my key {quote(FAL_KEY, safe='')}", f"--vary: field 'prompt': {HOLDS}"),
        (f"resolution={FAL_KEY}", f"--vary: field 'resolution': {HOLDS}"),
        (f"seed={FAL_KEY}", f"--vary: field 'seed': {HOLDS}"),
        (f"{FAL_KEY}=1", f"--vary: {NAME_HOLDS}"),
        (FAL_KEY, f"--vary: {NAME_HOLDS}"),
    ],
)
def test_a_vary_option_holding_the_key_is_refused_before_anything_is_stored(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, option: str, said: str
) -> None:
    done = wb("run", manifest("vk", TWO_JOBS.format(name="vk")), "--json", "--no-progress")
    assert done.code == 0, done.stderr
    url = os.environ["WANBATCH_DATABASE_URL"]
    before = counts(url)
    accepted = sim.ledger()["accepted"]

    for extra in ((), ("--json",)):
        refused = wb("rerun", "vk", "--vary", option, "--no-progress", *extra)
        assert refused.code == 2, refused.stdout + refused.stderr
        shown = refused.stdout + refused.stderr
        assert FAL_KEY not in shown
        assert quote(FAL_KEY, safe="") not in shown
        assert said in shown
        if extra:
            assert said in refused.json()["error"]
    assert counts(url) == before  # no batch, no job stored
    assert sim.ledger()["accepted"] == accepted  # nothing sent to fal
    stored = db_rows(url, "SELECT coalesce(rerun_options, '') FROM batches")
    assert not any(FAL_KEY in str(row[0]) for row in stored)


def test_parse_vary_refuses_the_known_key_and_a_fal_shaped_value_without_quoting_them() -> None:
    from jobs.errors import UsageError
    from jobs.vary import parse_varies

    key = "5f0c1d9a-7e2b-4c3d-8a9b-0c1d2e3f4a5b:4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b"
    secret = key.partition(":")[2]
    for option, keys, said in [
        (f"prompt=x {secret}", (key,), HOLDS),  # the secret half alone is the key
        (f"negative_prompt=x,y,{quote(key, safe='')}", (key,), HOLDS),
        # no FAL_KEY set: its shape is enough, and what it is told
        (f"prompt=shaped {key}", (), "holds a value shaped like a fal API key"),
    ]:
        with pytest.raises(UsageError) as refused:
            parse_varies([option], keys)
        message = str(refused.value)
        assert said in message
        assert secret not in message
        assert not message.startswith(f"--vary {option[:6]}")  # the option's text is not quoted
    assert parse_varies(["prompt=a calm sea,a storm"], (key,))[0].tokens == ("a calm sea", "a storm")


def test_the_hf_card_masks_a_key_in_the_rerun_options_an_earlier_version_stored(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    """Defence in depth: the card's "generated:" line (the rerun command, ``--vary`` values and
    all) is masked as the rows' input is, for a rerun stored before ``--vary`` was checked."""
    assert wb("run", manifest("card", TWO_JOBS.format(name="card")), "--json", "--no-progress").code == 0
    child = wb("rerun", "card", "--vary", "prompt=a calm sea", "--json", "--no-progress").json()["batch"]
    shaped = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b:0123456789abcdef0123456789abcdef"
    options = json.dumps(
        {"failed_only": False, "new_seeds": False, "max_usd": None, "vary": [f"prompt=k {shaped}"]}
    )
    with sqlite3.connect(tmp_path / "wanbatch.db") as conn:
        conn.execute("UPDATE batches SET rerun_options = ? WHERE id = ?", (options, child))

    folder = tmp_path / "exports" / "hf"
    assert wb("export", child, "--format", "hf", "-o", folder).code == 0
    card = (folder / "README.md").read_text(encoding="utf-8")
    (generated,) = [line for line in card.splitlines() if line.startswith("- generated:")]
    assert shaped not in card
    assert shaped.partition(":")[2] not in card
    assert "--vary 'prompt=k **'" in generated, generated
