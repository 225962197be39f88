"""Seeds are 0..2**64-1 everywhere a seed is chosen: fal documents no bound, but the dataset
exports store seeds as uint64, so a seed outside it (``-5``, ``10**29``) once validated and ran,
and only the Parquet export refused it. The bound lives in the endpoint registry."""

from __future__ import annotations

import pytest

from jobs.endpoints import get_endpoint, known_endpoint_ids
from jobs.errors import UsageError
from jobs.validation import check_value
from jobs.vary import checked_values, parse_vary

LARGEST = 2**64 - 1


@pytest.mark.parametrize("endpoint", known_endpoint_ids())
def test_every_endpoint_bounds_its_seed_to_uint64(endpoint: str) -> None:
    seed = get_endpoint(endpoint).field("seed")
    assert seed is not None
    assert seed.minimum == 0
    assert seed.maximum == LARGEST
    assert isinstance(seed.maximum, int)  # as a float, 2**64 would pass the check
    assert seed.allowed() == "an integer from 0 to 18446744073709551615"
    assert check_value(seed, 0) == []
    assert check_value(seed, LARGEST) == []
    for bad in (-1, -5, LARGEST + 1, 10**29):
        (problem,) = check_value(seed, bad)
        assert problem.message == f"{bad!r} is out of range"


@pytest.mark.parametrize("text", ["seed=-3..-1", "seed=18446744073709551616", "seed=1,-2"])
def test_rerun_vary_seed_obeys_the_bound(text: str) -> None:
    with pytest.raises(
        UsageError, match=r"is out of range for fal-ai/wan-22 \(allowed: an integer from 0 to"
    ):
        checked_values(get_endpoint("fal-ai/wan-22"), parse_vary(text))


def test_rerun_vary_seed_takes_the_largest() -> None:
    assert checked_values(get_endpoint("fal-ai/wan-22"), parse_vary(f"seed=0,{LARGEST}")) == [0, LARGEST]
