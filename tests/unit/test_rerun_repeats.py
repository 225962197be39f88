"""The warning of a `rerun --vary` whose jobs repeat others says why in the user's words.

It said "e.g. one of item 0's is item 0 variant 0": the place the job would have had, which
tells a user nothing about which value to drop.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from jobs.rerun import _repeat_cause
from jobs.store import NewJob
from jobs.vary import parse_varies


def _row(item: int, origin: str, **fields: Any) -> NewJob:
    job_input = {"prompt": "a lake", "image_url": "images/lake.png", "resolution": "480p", **fields}
    return NewJob(
        key="same",
        item_index=item,
        endpoint="fal-ai/wan-i2v",
        input=job_input,
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.2"),
        rerun_of=origin,
    )


def test_a_value_given_more_than_once_is_named_with_its_option() -> None:
    vary = parse_varies(["seed=1..2", "num_frames=81,81,081"])
    row = _row(0, "j1", seed=1, num_frames=81)
    said = _repeat_cause(row, row, {}, vary)
    assert said == "num_frames=81 is listed 3 times in --vary num_frames=81,81,081"


def test_jobs_of_two_items_that_become_one_name_what_they_were() -> None:
    vary = parse_varies(["resolution=720p"])
    before: dict[str, dict[str, Any]] = {"j1": {"resolution": "480p", "seed": 3}, "j2": {"seed": 3}}
    twin, row = _row(0, "j1", resolution="720p", seed=3), _row(2, "j2", resolution="720p", seed=3)
    assert _repeat_cause(row, twin, before, vary) == (
        "item 0's job with resolution=480p and item 2's job with no resolution both become resolution=720p"
    )


def test_jobs_that_asked_the_same_already_say_so() -> None:
    before: dict[str, dict[str, Any]] = {"j1": {"seed": 5}, "j2": {"seed": 5}}
    twin, row = _row(1, "j1", seed=5), _row(1, "j2", seed=5)
    assert _repeat_cause(row, twin, before, ()) == "two jobs of item 1 now ask exactly the same"
