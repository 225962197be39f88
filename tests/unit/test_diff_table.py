"""`wanbatch diff`'s table at 80 columns: the item label that tells rows apart is never cut.

Output into a pipe is 80 columns wide. The table cut its item column with an ellipsis, so the two
rows of a sweep (``0 resolution=480p``, ``0 resolution=720p``) both read ``0 resolutio…``, and
two prompts that start alike kept only their common start. The pairs are made by hand here, as
:func:`jobs.diff.match` makes them.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.cells import cell_len
from rich.console import Console

from cli import output
from cli.batch_commands import DIFF_VALUE_CHARS, _diff_labels, _diff_row
from jobs.diff import BatchDiff, JobSide, Pair

WIDTH = 80


def _side(n: int, item: int, seed: int, **fields: Any) -> JobSide:
    job_input = {"prompt": "a lake", "image_url": "images/lake.png", "resolution": "480p", **fields}
    return JobSide(
        job_id=f"job-{n}",
        job_key=f"key-{n}",
        item_index=item,
        variant=n,
        endpoint="fal-ai/wan-i2v",
        status="succeeded",
        seed=seed,
        prompt=str(job_input["prompt"]),
        video_sha256=f"{n:02d}" * 32,
        cost_usd=0.2,
        unseeded=str(n),
        input=job_input,
    )


def _table(pairs: list[Pair]) -> tuple[list[tuple[str, ...]], list[str], int]:
    """The rows, the printed lines at 80 columns, and the width of the item column."""
    diff = BatchDiff({"batch": "a", "name": "a", "simulated": False}, {"batch": "b", "name": "b"}, pairs)
    labels = _diff_labels(diff.varied(), pairs)
    rows = [_diff_row(pair, labels) for pair in pairs]
    table = output.diff_table(rows)
    buffer = io.StringIO()
    Console(file=buffer, width=WIDTH, soft_wrap=True, highlight=False).print(table)
    width = table.columns[0].width
    assert width is not None
    return rows, buffer.getvalue().splitlines(), width


@pytest.fixture(autouse=True)
def narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "out", Console(file=io.StringIO(), width=WIDTH))


def test_a_sweeps_rows_show_their_whole_labels() -> None:
    pairs = [
        Pair(_side(i, 0, 4279467537, resolution=res), _side(10 + i, 0, 557868455, resolution=res), "input")
        for i, res in enumerate(["480p", "720p"])
    ]
    rows, lines, _ = _table(pairs)

    assert [row[0] for row in rows] == ["0 resolution=480p", "0 resolution=720p"]
    assert all(cell_len(line.rstrip()) <= WIDTH for line in lines)
    assert "…" not in "\n".join(lines)
    for label in ("0 resolution=480p", "0 resolution=720p"):
        assert sum(line.startswith(label + " ") for line in lines) == 1, "\n".join(lines)
    assert any("$0.20" in line for line in lines)  # money is never cut


def test_long_labels_fold_whole_and_prompts_that_start_alike_stay_apart() -> None:
    start = "A calm mountain landscape at dawn, clouds drifting slowly past the peak, take "
    sides = [
        _side(n, 0, 10**9 + n, prompt=start + take, num_frames=frames, resolution=res)
        for n, (take, frames, res) in enumerate(
            [("one", 81, "480p"), ("two", 100, "720p"), ("three", 81, "720p")], start=1
        )
    ]
    pairs = [Pair(side, _side(10 + i, 0, 7, **side.input), "input") for i, side in enumerate(sides)]
    rows, lines, width = _table(pairs)

    labels = [row[0] for row in rows]
    assert len(set(labels)) == 3  # "prompt=A calm mountain l…" for each, before
    for label in labels:
        prompt = label.split("prompt=", 1)[1].split(" resolution=")[0]
        assert cell_len(prompt) <= DIFF_VALUE_CHARS
    assert all(cell_len(line.rstrip()) <= WIDTH for line in lines)
    # What the item column shows, line by line, is every label in full, in order.
    body = lines[next(i for i, line in enumerate(lines) if line.startswith("─")) + 1 :]
    shown = "".join(line[:width] for line in body).replace(" ", "")
    assert shown == "".join(labels).replace(" ", "")
