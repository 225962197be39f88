"""A manifest's batch name (or fal's words) cannot drive the operator's terminal: every human
output shows control characters as escapes (``jobs.printable``)."""

from __future__ import annotations

from tests.e2e.e2e_helpers import MakeManifest, Wb

NAME = "night\x1b]0;pwned\x07\x1b[2J\u202erun"
RAW = ("\x1b", "\x07", "\u202e")


def test_a_hostile_batch_name_is_shown_inert(wb: Wb, manifest: MakeManifest) -> None:
    path = manifest(
        "hostile-name",
        f'name: "{NAME.encode("unicode_escape").decode()}"\nendpoint: fal-ai/wan-22\n'
        "items:\n  - prompt: a harbour at night\n",
    )
    outputs = [wb("run", "--simulate", path, "--no-progress")]
    batch = wb("status", "--json").json()["batches"][0]["batch"]
    outputs += [wb("status"), wb("status", batch), wb("cost", batch), wb("validate", path)]
    for done in outputs:
        assert done.code == 0, done.stderr
        for raw in RAW:
            assert raw not in done.stdout + done.stderr
    assert "night\\x1b]0;pwned\\x07" in outputs[2].stdout
    assert wb("status", batch, "--json").json()["name"] == NAME  # the data itself is kept as written
