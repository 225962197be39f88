"""The sizes `run`'s free-space warning shows: decimal units, as `df -H` and disk labels use."""

from __future__ import annotations

import pytest

from jobs.printable import size_text


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0 bytes"),
        (999, "999 bytes"),
        (1_000, "1.0 kB"),
        (37_299, "37 kB"),
        (4_150_000, "4.2 MB"),
        (123_456_789, "123 MB"),
        (1_200_000_000, "1.2 GB"),
        (3_400_000_000_000, "3.4 TB"),
        (34_000_000_000_000, "34 TB"),
    ],
)
def test_size_text(size: int, shown: str) -> None:
    assert size_text(size) == shown
