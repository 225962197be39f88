"""The strictest of the live processes' account-wide limits (:mod:`jobs.account_limits`)."""

from __future__ import annotations

from pydantic import SecretStr

from jobs import account_limits
from jobs.account_limits import PeerLimits, parse, published, strictest
from jobs.settings import Settings

KEY = "unit-limits-key-0001:abcdefabcdefabcdefabcdefabcdef"
I2V = "wan/v2.6/image-to-video"


def _settings(**limits: object) -> Settings:
    return Settings(FAL_KEY=SecretStr(KEY), **limits)  # type: ignore[arg-type]


def _peer(owner: str, **limits: object) -> PeerLimits:
    doc = published(
        _settings(**limits), key_id="k", origin="https://queue.fal.run", simulated=False, by="run"
    )
    found = parse(owner, doc)
    assert found is not None
    return found


def test_each_limit_is_the_strictest_of_them_and_an_endpoint_limit_only_one_sets_holds() -> None:
    own = _settings(max_outstanding=40, submit_rate=20.0, submit_jitter_allowance=0.05)
    peer = _peer(
        "alice:1:",
        max_outstanding=10,
        submit_rate=5.0,
        submit_jitter_allowance=0.2,
        max_outstanding_per_endpoint={I2V: 2},
        submit_rate_per_endpoint={I2V: 1.0},
    )
    applied = strictest(own, [peer])
    assert (applied.max_outstanding, applied.submit_rate, applied.submit_jitter_allowance) == (10, 5.0, 0.2)
    assert applied.max_outstanding_per_endpoint == {I2V: 2}
    assert applied.submit_rate_per_endpoint == {I2V: 1.0}
    assert applied.download_backlog == 40  # its own downloads: its own bound
    assert strictest(own, [_peer("bob:2:", max_outstanding=80, submit_rate=30.0)]) is own


def test_a_document_that_is_not_one_is_never_trusted_with_a_limit() -> None:
    docs: list[object] = [None, [], {"key": "k"}, {"key": "k", "max_outstanding": 0, "submit_rate": 1.0}]
    for doc in docs:
        assert parse("x:1:", doc) is None
    assert parse("x:1:", {"key": "k", "max_outstanding": 5, "submit_rate": float("inf")}) is None
    assert parse("x:1:", {"key": "k", "max_outstanding": True, "submit_rate": 1.0}) is None


def test_the_held_message_names_the_process_that_differs() -> None:
    parts = account_limits.differing(_settings(), [_peer("bob-laptop:4242:", max_outstanding=40)])
    assert parts == {
        "WANBATCH_MAX_OUTSTANDING": (
            "another run (bob-laptop pid 4242) runs with WANBATCH_MAX_OUTSTANDING=40",
        )
    }
