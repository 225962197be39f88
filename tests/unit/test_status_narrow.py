"""`status` at 80 columns degrades gracefully: money and times are never cut, names stay apart.

A new user's audit at 80 columns: a failure reason cut to "the batch's $0.5…" (the cap itself) and
"deadline (2026-12-02 20:3…", rerun names all shown as "seed-resolution-swee…", and the footer
naming the simulated batches cut off. The console is fixed at 80 columns here (``COLUMNS`` says
the width, as for ``status`` in a terminal); the reports are made by hand, as ``status`` gets them.
"""

from __future__ import annotations

import io
import re
from typing import Any, cast

import pytest
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement

from cli import output
from jobs.batches import BatchReport
from jobs.money import usd_text

WIDTH = 80


def _report(n: int, name: str, **fields: Any) -> BatchReport:
    base: dict[str, Any] = {
        "batch": f"{n:08x}" + "ab" * 12,
        "name": name,
        "phase": "done",
        "phase_reason": None,
        "finished": 6,
        "total": 6,
        "in_flight": 0,
        "counts": {"succeeded": 6},
        "spent_usd": 1.8,
        "estimated_usd": 1.8,
        "processing": False,
        "processed_at": None,
        "broker_unreachable_since": None,
        "simulated": False,
        "state": "active",
        "pause_reason": None,
        "paused_by_user": False,
        "failures": [],
    }
    return cast(BatchReport, {**base, **fields})


@pytest.fixture
def shown(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """What ``cli.output`` prints, at 80 columns."""
    buffer = io.StringIO()
    monkeypatch.setattr(output, "out", Console(file=buffer, width=WIDTH, soft_wrap=True, highlight=False))
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    return buffer


REPORTS = [
    _report(1, "seed-resolution-sweep", simulated=True),
    _report(2, "seed-resolution-sweep-rerun-1", simulated=True),
    _report(3, "seed-resolution-sweep-rerun-2", simulated=True),
    _report(4, "seed-resolution-sweep-rerun-3", simulated=True),
    _report(5, "quickstart-simulated", simulated=True),
    _report(6, "quickstart"),
    _report(
        7,
        "prompt-dataset-1000",
        phase="cancelled",
        finished=1000,
        total=1000,
        counts={"succeeded": 79, "failed": 0, "cancelled": 921},
        spent_usd=12_345.675,
        estimated_usd=30_000,
    ),
    _report(
        8,
        "overnight-render",
        phase="waiting",
        phase_reason="waiting for window (opens 22:00 Europe/Berlin, in 3h12m)",
        finished=0,
        total=40,
        counts={"pending": 40},
        spent_usd=0,
        estimated_usd=8,
        simulated=True,
    ),
]


def test_the_batch_list_keeps_money_whole_and_names_apart_at_80_columns(shown: io.StringIO) -> None:
    output.print_batches(REPORTS)
    text = shown.getvalue()
    lines = text.splitlines()
    assert all(cell_len(line.rstrip()) <= WIDTH for line in lines), text
    rows = {r["batch"][:8]: next(line for line in lines if line.startswith(r["batch"][:8])) for r in REPORTS}
    for r in REPORTS:
        row = rows[r["batch"][:8]]
        assert f"{r['finished']}/{r['total']}" in row, row
        assert usd_text(r["spent_usd"]) in row, row  # $12,345.68, whole
        assert usd_text(r["estimated_usd"]) in row, row
        assert re.search(rf"\b{r['phase']}\b", row), row
    # No two batches look alike: what each row shows of its name (its start and end around "…"
    # when cut) could be that name and no other, reruns ("…-rerun-2") included.
    every = [r["name"] for r in REPORTS]
    for r in REPORTS:
        name = rows[r["batch"][:8]].split()[1]
        head, _, tail = name.rpartition("…") if "…" in name else (name, "", "")
        could_be = [n for n in every if n.startswith(head) and n.endswith(tail)]
        assert could_be == [r["name"]] if "…" in name else name == r["name"], (name, could_be)
    assert "quickstart" in rows[REPORTS[5]["batch"][:8]].split()

    # The notes below the table wrap: the window's time and every simulated batch, whole.
    table_end = max(lines.index(row) for row in rows.values())
    prose = " ".join(line.strip() for line in lines[table_end + 1 :])
    assert "opens 22:00 Europe/Berlin, in 3h12m" in prose, text
    listed = re.search(r"simulated \(`--simulate`\): ([0-9a-f, ]+)", prose)
    assert listed is not None, text
    assert listed.group(1).split(", ") == [r["batch"][:8] for r in REPORTS if r["simulated"]]
    assert "`wanbatch run overnight-render --simulate` goes on" in prose, text


def test_a_failure_reason_wraps_instead_of_cutting_money_or_time(shown: io.StringIO) -> None:
    budget = (
        "budget: submitting would commit $0.60 of the batch's $0.50 cap (already committed "
        "$0.40); raise budget.max_usd or rerun with --max-usd"
    )
    deadline = "not sent before the batch's deadline (2026-12-02 20:36 +00:00)"
    report = _report(
        9,
        "audit",
        failures=[
            {"state": "cancelled", "error_type": "budget", "count": 2, "example": budget, "sent": False},
            {
                "state": "cancelled",
                "error_type": "deadline",
                "count": 921,
                "example": deadline,
                "sent": False,
            },
            {
                "state": "failed",
                "error_type": "model_error",
                "count": 1,
                "example": "word " * 200,
                "sent": True,
            },
        ],
    )
    output.print_failures(report)
    text = shown.getvalue()
    lines = text.splitlines()
    assert all(cell_len(line.rstrip()) <= WIDTH for line in lines), text
    assert "…" not in text.split("921 cancelled")[0]  # the short reasons are whole
    flat = " ".join(line.strip() for line in lines)
    assert f"2 cancelled (budget): {budget}" in flat
    assert f"921 cancelled (deadline): {deadline}" in flat
    long = [line for line in lines if "model_error" in line or line.startswith("word")]
    assert len(long) == output.FAILURE_LINES  # a long text takes a few lines, then "…"
    assert long[-1].endswith("word …"), long


def test_into_a_pipe_each_note_and_reason_is_one_whole_line(
    shown: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS")  # no width given: a script greps it, nothing to wrap at
    output.print_batches(REPORTS)
    failure = {
        "state": "cancelled",
        "error_type": "deadline",
        "count": 3,
        "example": "x " * 100,
        "sent": False,
    }
    output.print_failures(_report(9, "audit", failures=[failure]))
    lines = shown.getvalue().splitlines()
    assert any(line.startswith("simulated (`--simulate`): ") and line.count(",") == 5 for line in lines)
    assert f"3 cancelled (deadline): {'x ' * 99}x" in lines


def test_a_name_is_cut_in_the_middle_where_the_cut_tells_it_apart() -> None:
    assert output.fit_middle("seed-resolution-sweep-rerun-2", 17) == "seed-res…-rerun-2"
    assert output.fit_middle("short", 17) == "short"
    assert cell_len(output.fit_middle("東京の夜景-an-overnight-sweep", 12)) <= 12
    shown = output.distinct_fits(["run-2026-12-01-a", "run-2026-12-02-a", "run-2026-12-01-b"], 9)
    assert len(set(shown.values())) == 3
    assert all(v is not None and cell_len(v) <= 9 for v in shown.values())
    assert output.distinct_fits(["seed-sweep-rerun-1", "seed-sweep-rerun-2"], 12) == {
        "seed-sweep-rerun-1": "seed-s…run-1",
        "seed-sweep-rerun-2": "seed-s…run-2",
    }
    # Names that differ only where no cut keeps: shown whole (the column wraps them).
    assert output.distinct_fits(["aaaa-x-aaaa", "aaaa-y-aaaa"], 4) == {
        "aaaa-x-aaaa": None,
        "aaaa-y-aaaa": None,
    }


#: A long-lived deployment's batch names: one start, a date and a number at the end.
MANY = [f"wan22-i2v-product-shots-2026-{1 + i // 200:02d}-{i % 200:03d}" for i in range(2000)]


def test_names_are_told_apart_without_comparing_each_with_every_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``status`` on 2,000 batches: each cut of a long name was checked against every other
    name (millions of comparisons, 1.6 s at 80 columns for names that share their start); it
    is checked against the few that start or end as the cut does."""
    compared = 0
    could_be = output._could_be

    def counted(shown: str, name: str) -> bool:
        nonlocal compared
        compared += 1
        return could_be(shown, name)

    monkeypatch.setattr(output, "_could_be", counted)
    shown = output.distinct_fits(MANY, 20)
    assert compared <= 10 * len(MANY)  # was some 4,000,000
    assert len({v for v in shown.values()}) == len(MANY)
    assert all(v is not None and cell_len(v) <= 20 and "…" in v for v in shown.values())
    monkeypatch.setattr(output, "_could_be", could_be)
    assert output.distinct_fits(MANY[:50], 20) == {n: shown_alone(n, MANY[:50]) for n in MANY[:50]}


def shown_alone(name: str, names: list[str]) -> str | None:
    """What the first cut of ``name`` that no other of ``names`` could be is (by hand: the rule)."""
    keep = 19
    for tail in [*range(keep // 2, keep + 1), *range(keep // 2 - 1, -1, -1)]:
        cut = output.fit_middle(name, 20, tail)
        if not any(other != name and output._could_be(cut, other) for other in names):
            return cut
    return None


def test_the_batch_table_measures_only_the_cells_whose_width_is_not_known(shown: io.StringIO) -> None:
    """Every column but the name's is as wide as its widest cell (:func:`output.fixed_column`):
    rich measured each of their cells anyway, three times over, some 40,000 measures for
    2,000 batches. The table printed is the same."""
    reports = [_report(i, name) for i, name in enumerate(MANY[:300])]
    calls = 0
    measure = Measurement.get.__func__  # type: ignore[attr-defined]

    def counted(cls: type[Measurement], *args: Any, **kwargs: Any) -> Measurement:
        nonlocal calls
        calls += 1
        return cast(Measurement, measure(cls, *args, **kwargs))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Measurement, "get", classmethod(counted))
        output.out.print(output.batches_table(reports))
    assert calls <= 8 * len(reports)  # the names' cells (was 48 a row: every cell)
    lines = shown.getvalue().splitlines()
    assert lines[0].split() == ["batch", "name", "state", "done", "fail", "canc", "spent", "estimate"]
    assert len(lines) == 2 + len(reports)
    assert all(cell_len(line) <= WIDTH for line in lines)
