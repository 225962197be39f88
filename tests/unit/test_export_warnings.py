"""What exports say about a batch they hold only part of, and what an ``hf`` card reads from the
stored manifest text: the pure pieces, without a database."""

from __future__ import annotations

import pytest

from jobs.dataset_export import items_from_of, left_out_warnings, refuse_empty
from jobs.errors import UsageError
from jobs.export import by_state, record_warnings, unfinished_of
from jobs.models import Batch


def _batch(name: str = "sweep", simulated: bool = False) -> Batch:
    return Batch(id="0123456789abcdef0123456789abcdef", name=name, simulated=simulated)


def test_states_are_listed_in_lifecycle_order_without_empty_ones() -> None:
    counts = {"running": 2, "succeeded": 0, "pending": 11, "queued": 1}
    assert by_state(counts) == "11 pending, 1 queued, 2 running"
    assert unfinished_of({"succeeded": 3, "failed": 1, "running": 2, "pending": 0}) == {"running": 2}


def test_a_finished_batch_with_videos_needs_no_warning() -> None:
    assert record_warnings(_batch(), {"succeeded": 2, "failed": 1}) == []
    assert left_out_warnings(_batch(), {}) == []


def test_records_of_an_unfinished_simulation_say_how_to_finish_it() -> None:
    (warning,) = record_warnings(_batch(simulated=True), {"succeeded": 1, "pending": 2})
    assert warning.startswith("batch sweep has not finished: 2 of 3 record(s) have no result yet (2 pending)")
    assert "`wanbatch run sweep --simulate` if nothing is processing it" in warning


def test_a_name_a_shell_would_need_quoted_is_named_by_id_in_the_hint() -> None:
    (warning,) = record_warnings(_batch(name="my batch\x1b[2J"), {"queued": 1})
    assert "my batch\\x1b[2J" in warning  # shown inert, never a control sequence
    assert "`wanbatch status 0123456789ab`" in warning


def test_an_empty_dataset_is_refused_with_what_would_fill_it() -> None:
    with pytest.raises(UsageError) as refused:
        refuse_empty(_batch(), {"failed": 2, "cancelled": 1, "running": 1}, include_failed=False)
    message = str(refused.value)
    assert "none succeeded (1 running, 2 failed, 1 cancelled); nothing was written" in message
    assert "`--include failed`" in message
    assert "export again once it has finished" in message
    refuse_empty(_batch(), {"failed": 2}, include_failed=True)  # a dataset of failures: allowed
    with pytest.raises(UsageError, match=r"none has finished \(3 pending\)"):
        refuse_empty(_batch(), {"pending": 3}, include_failed=True)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("name: a\nitems_from: sub/rows.csv\n", "sub/rows.csv"),
        ('{"name": "a", "items_from": "rows.jsonl"}', "rows.jsonl"),
        ("name: a\nitems: []\n", None),
        ("name: a\nitems_from: [1, 2]\n", None),
        ("- a list\n", None),
        ("name: [unclosed\n", None),
        (None, None),
    ],
)
def test_the_items_from_reference_is_read_from_the_manifest_text(text: str | None, named: str | None) -> None:
    assert items_from_of(text) == named
