"""``jobs.store.places_after``: how a resubmit numbers the jobs its manifest no longer has."""

from __future__ import annotations

from jobs.store import places_after


def test_jobs_no_longer_in_the_manifest_follow_its_items_an_old_item_keeping_its_variants_together() -> None:
    rows = [("a", 1, 0), ("b", 1, 1), ("c", 4, 0), ("d", 7, 2)]
    assert places_after(rows, 3) == [3, 3, 4, 5]


def test_a_place_two_jobs_shared_before_renumbering_existed_becomes_two_places() -> None:
    # Numbers stored before resubmits renumbered: two jobs of "item 0, variant 0".
    rows = [("a", 0, 0), ("b", 0, 0), ("c", 0, 1), ("d", 2, 0)]
    places = places_after(rows, 5)
    assert places == [5, 6, 6, 7]
    assert len({(item, variant) for item, (_, _, variant) in zip(places, rows, strict=True)}) == 4
