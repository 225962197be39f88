""":attr:`jobs.diff.Pair.reused`: one render on both sides, never a job compared with itself."""

from __future__ import annotations

from jobs.diff import BatchDiff, JobSide, Pair


def _side(job_id: str, *, reused_from: str | None = None, video: str | None = "ab" * 32) -> JobSide:
    return JobSide(
        job_id=job_id,
        job_key="key",
        item_index=0,
        variant=0,
        endpoint="fal-ai/wan-i2v",
        status="succeeded" if video else "cancelled",
        seed=7 if video else None,
        prompt="a lake",
        video_sha256=video,
        cost_usd=0.2 if video else 0.0,
        unseeded="u",
        pinned_seed=7,
        reused_from=reused_from,
    )


def _diff(a: str, b: str, pairs: list[Pair]) -> BatchDiff:
    return BatchDiff(
        {"batch": a, "name": a, "simulated": False}, {"batch": b, "name": b, "simulated": False}, pairs
    )


def test_a_job_compared_with_itself_is_no_reuse_and_differs_in_nothing() -> None:
    took = _side("j2", reused_from="j1")  # it did take another job's output: not this pair's doing
    cancelled = _side("j3", video=None)
    pairs = [Pair(took, took, "job_key"), Pair(cancelled, cancelled, "job_key")]
    assert [p.same_job for p in pairs] == [True, True]
    assert [p.reused for p in pairs] == [False, False]
    assert [p.differs() for p in pairs] == [[], []]
    assert [p.outcome for p in pairs] == ["same", "different"]  # only the job with a video is same

    diff = _diff("x", "x", pairs)
    assert diff.same_batch
    assert diff.reused == 0
    assert diff.reused_note() is None
    note = diff.same_batch_note()
    assert note is not None
    assert "every job is compared with itself" in note
    assert diff.as_dict()["same_batch"] is True
    assert diff.as_dict()["reused"] == 0


def test_a_real_reuse_across_batches_is_still_flagged() -> None:
    original = _side("j1")
    pairs = [
        Pair(_side("j2", reused_from="j1"), original, "job_key"),  # A's job took B's job's output
        Pair(original, _side("j2", reused_from="j1"), "job_key"),  # and the other way round
        Pair(_side("j2", reused_from="j1"), _side("j3", reused_from="j1"), "job_key"),  # one original
    ]
    assert [p.reused for p in pairs] == [True, True, True]
    diff = _diff("x", "y", pairs)
    assert not diff.same_batch
    assert diff.same_batch_note() is None
    assert diff.reused == 3
    assert diff.as_dict()["same_batch"] is False


def test_a_same_video_whose_cost_differs_is_counted_and_said() -> None:
    """Pricing changed between the runs: the pair is the same video, and still the text output
    must say the costs differ (the table lists only pairs that are not the same)."""
    cheap = _side("j1")
    dear = JobSide(**{**{f: getattr(cheap, f) for f in JobSide.__slots__}, "job_id": "j2", "cost_usd": 0.3})
    diff = _diff("x", "y", [Pair(cheap, dear, "job_key"), Pair(cheap, _side("j3"), "job_key")])
    assert [p.outcome for p in diff.pairs] == ["same", "same"]
    assert diff.cost_differs == 1
    assert diff.as_dict()["cost_differs"] == 1
    note = diff.cost_note()
    assert note is not None
    assert note.startswith("1 of the same pairs differ in cost")
    assert _diff("x", "y", [Pair(cheap, _side("j3"), "job_key")]).cost_note() is None


def test_input_fields_that_differ_and_videos_not_on_disk_are_named() -> None:
    pair = Pair(_side("j1"), _side("j2"), "origin", input_differs=("end_image_url", "resolution"))
    assert pair.differs() == ["input:end_image_url", "input:resolution"]
    gone = JobSide(**{**{f: getattr(_side("j2"), f) for f in JobSide.__slots__}, "on_disk": "missing"})
    pair = Pair(_side("j1"), gone, "job_key")
    assert pair.outcome == "different"  # the recorded SHA-256 is equal, the file is gone
    assert pair.differs() == ["missing on disk"]
    assert Pair(gone, gone, "job_key").differs() == ["missing on disk"]  # diff X X says it too


def test_a_cost_difference_from_a_billed_failed_attempt_is_not_taken_for_a_price_change() -> None:
    """The same video, one side's job billed for a failed attempt before it (attempts 2, $0.40
    against 1, $0.20): the note said "the price changed between the runs?"."""
    once = JobSide(**{**{f: getattr(_side("j1"), f) for f in JobSide.__slots__}, "attempts": 1})
    twice = JobSide(
        **{**{f: getattr(_side("j2"), f) for f in JobSide.__slots__}, "attempts": 2, "cost_usd": 0.4}
    )
    repriced = JobSide(
        **{**{f: getattr(_side("j3"), f) for f in JobSide.__slots__}, "attempts": 1, "cost_usd": 0.3}
    )
    pairs = [Pair(once, twice, "job_key") for _ in range(3)]
    note = _diff("x", "y", pairs).cost_note()
    assert note is not None
    assert note.startswith("3 of the same pairs differ in cost: 3 of them paid for more than one attempt")
    assert "price" not in note
    assert [p.attempts_differ for p in pairs] == [True, True, True]

    mixed = _diff("x", "y", [*pairs, Pair(once, repriced, "job_key")]).cost_note()
    assert mixed is not None
    assert "4 of the same pairs differ in cost: 3 of them paid for more than one attempt" in mixed
    assert "1 with as many attempts on each side (the price changed between the runs?)" in mixed
