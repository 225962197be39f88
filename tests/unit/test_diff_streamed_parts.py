"""The parts of ``wanbatch diff`` that now stream give what the whole lists gave.

:func:`cli.output.emit_json_list` writes ``--json``'s ``jobs`` a few at a time, and
:meth:`jobs.diff.BatchDiff.varied` names an item's varying fields from each item's first job
rather than from every job's input at once (:func:`jobs.diff.varied_of` reads them again for
the rows a table shows). Both are compared here with what they replace.
"""

from __future__ import annotations

import io
import random
from collections import defaultdict
from typing import Any

import pytest

from cli import output
from jobs.diff import BatchDiff, JobSide, Pair
from jobs.manifest import canonical_json


def _written(monkeypatch: pytest.MonkeyPatch, write: Any) -> str:
    buffer = io.StringIO()
    monkeypatch.setattr("sys.stdout", buffer)
    write()
    return buffer.getvalue()


@pytest.mark.parametrize("count", [0, 1, 2, output.JSON_LIST_CHUNK, 2 * output.JSON_LIST_CHUNK + 3])
def test_a_list_written_in_chunks_is_the_document_emit_json_writes(
    count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = {"batch_a": {"batch": "x", "name": 'é \u2028 "q"'}, "same": 1, "identical": False}
    items = [
        {"n": n, "cost": float("nan") if n == 1 else n / 3, "a": None, "ok": [n, "ü"]} for n in range(count)
    ]
    whole = _written(monkeypatch, lambda: output.emit_json({**head, "jobs": items}))
    streamed = _written(monkeypatch, lambda: output.emit_json_list(head, "jobs", iter(items)))
    assert streamed == whole


def _old_varied(pairs: list[Pair]) -> dict[str, dict[str, Any]]:
    """:meth:`BatchDiff.varied` as it was: every input of every item at once."""
    groups: dict[tuple[str, int], list[JobSide]] = defaultdict(list)
    for pair in pairs:
        for which, side in (("a", pair.a), ("b", pair.b)):
            if side is not None:
                groups[which, side.item_index].append(side)
    keys: dict[int, set[str]] = defaultdict(set)
    for (_, item), sides in groups.items():
        inputs = [side.filled_input() for side in sides]
        names = {name for values in inputs for name in values} - {"seed"}
        keys[item] |= {
            name for name in names if len({canonical_json(values.get(name)) for values in inputs}) > 1
        }
    return {
        side.job_id: {name: side.filled_input().get(name) for name in sorted(keys[item])}
        for (_, item), sides in groups.items()
        for side in sides
    }


def _side(rng: random.Random, n: int) -> JobSide:
    fields = {
        "prompt": rng.choice(["a lake", "a hill", None]),
        "resolution": rng.choice(["480p", "720p"]),
        "num_frames": rng.choice([81, 121, None]),
        "seed": rng.randrange(3),
        "extra": rng.choice([{"x": 1}, [1, 2], "t"]),
    }
    given = {name: value for name, value in fields.items() if rng.random() < 0.7}
    return JobSide(
        job_id=f"job-{n}",
        job_key=f"key-{n}",
        item_index=rng.randrange(4),
        variant=n,
        endpoint=rng.choice(["fal-ai/wan-i2v", "fal-ai/wan-22", "unknown/endpoint"]),
        status="succeeded",
        seed=None,
        prompt=None,
        video_sha256=None,
        cost_usd=None,
        unseeded=str(n),
        input=given,
    )


@pytest.mark.parametrize("seed", range(40))
def test_the_varied_fields_are_those_every_input_at_once_gave(seed: int) -> None:
    rng = random.Random(seed)
    sides = [_side(rng, n) for n in range(rng.randrange(1, 12))]
    pairs = [Pair(side, rng.choice([None, *sides]), None) for side in sides]
    pairs += [Pair(None, side, None) for side in sides if rng.random() < 0.3]
    diff = BatchDiff({"batch": "a", "name": "a", "simulated": False}, {"batch": "b", "name": "b"}, pairs)
    assert diff.varied() == _old_varied(pairs)
