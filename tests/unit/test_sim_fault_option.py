"""``wanbatch simulator --fault KIND=P|N``: a probability below 1, or a whole count of events."""

from __future__ import annotations

import pytest

from falsim.faults import parse_fault_option


def test_a_probability_and_a_count() -> None:
    assert parse_fault_option("submit_429=0.1")[1].probability == 0.1
    assert parse_fault_option("model_error=3")[1].next == 3


@pytest.mark.parametrize(
    "text", ["submit_429=1.5", "submit_429=2.0001", "submit_429=-1", "submit_429=nan", "x"]
)
def test_anything_else_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(ValueError, match=r"KIND=PROBABILITY .* or KIND=COUNT"):
        parse_fault_option(text)
