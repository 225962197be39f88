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
