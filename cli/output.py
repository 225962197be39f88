"""What the ``wanbatch`` commands print, and how a command ends.

Output rules (the contract): with ``--json`` exactly one JSON object goes to stdout; human
output goes to stdout; progress and logs go to stderr. Exit codes: 0 success, 1 some jobs
failed or were cancelled, 2 invalid input or usage (and 70 for a bug, see :func:`cli.main`).
Bad input never prints a traceback: every command runs its work through :func:`guarded`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NoReturn

from rich.console import Console
from rich.table import Table

from jobs.errors import Issue, ManifestError, WanbatchError
from jobs.states import JobState

if TYPE_CHECKING:
    from jobs.batches import BatchReport, SubmitResult
    from jobs.cost import CostLine, CostReport
    from jobs.pricing import EstimateReport

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

EXIT_OK, EXIT_SOME_FAILED = 0, 1


def emit_json(obj: Mapping[str, object]) -> None:
    """Print one JSON object on stdout (the contract's ``--json`` output)."""
    sys.stdout.write(json.dumps(obj, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def escape(text: str) -> str:
    """``text`` with rich's markup brackets made literal."""
    return text.replace("[", r"\[")


def issue_line(issue: Issue) -> str:
    """One validation issue, its severity in colour."""
    style = "red" if issue.severity == "error" else "yellow"
    return f"[{style}]{issue.severity}[/{style}] {escape(str(issue))}"


def fail(exc: WanbatchError, as_json: bool) -> NoReturn:
    """Report a deliberate error (no traceback) and exit with its code."""
    if as_json:
        payload: dict[str, Any] = {"ok": False, "error": str(exc).splitlines()[0].rstrip(":")}
        if isinstance(exc, ManifestError):
            payload["issues"] = [i.as_dict() for i in exc.issues]
        emit_json(payload)
    elif isinstance(exc, ManifestError):
        errors = [i for i in exc.issues if i.severity == "error"]
        for issue in exc.issues:
            err.print(issue_line(issue))
        err.print(f"[red]✗ {len(errors)} error(s); nothing was submitted.[/red]")
    else:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
    sys.exit(exc.exit_code)


def guarded(as_json: bool, action: Callable[[], int | None]) -> None:
    """Run ``action``; turn deliberate errors into a message and the contract's exit code."""
    try:
        code = action()
    except WanbatchError as exc:
        fail(exc, as_json)
    sys.exit(code or EXIT_OK)


def print_budget_note(result: SubmitResult) -> None:
    """Say on stderr that (re)submitting changed the batch's budget cap."""
    note = result.budget_note()
    if note:
        err.print(f"[yellow]{escape(note)}[/yellow]")


def final_code(report: BatchReport) -> int:
    """1 when a job of the batch failed, was cancelled or is not finished; else 0."""
    counts = report["counts"]
    unfinished = report["total"] - report["finished"]
    return (
        EXIT_SOME_FAILED if counts.get("failed", 0) or counts.get("cancelled", 0) or unfinished else EXIT_OK
    )


def status_table(report: BatchReport) -> Table:
    """A human table of one batch's counts and money."""
    table = Table(title=f"{report['name']}  ({report['batch']})", show_header=True)
    table.add_column("state")
    table.add_column("jobs", justify="right")
    for state in JobState:
        n = report["counts"].get(state.value, 0)
        if n:
            table.add_row(state.value, str(n))
    table.add_section()
    table.add_row("total", str(report["total"]))
    return table


def eta_text(seconds: float | None) -> str:
    """``~3m20s left`` style, or empty when there is no forecast."""
    if seconds is None or seconds <= 0:
        return ""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"~{hours}h{minutes:02d}m left" if hours else f"~{minutes}m{secs:02d}s left"


def money_line(report: BatchReport) -> str:
    """Estimated, spent and budget on one line."""
    line = f"estimated ${report['estimated_usd'] or 0:.2f} · spent ${report['spent_usd'] or 0:.2f}"
    if report["budget_max_usd"] is not None:
        line += f" · budget ${report['budget_max_usd']:.2f}"
    if report["possible_duplicate_charges"]:
        line += f" · [yellow]{report['possible_duplicate_charges']} possible duplicate charge(s)[/yellow]"
    if report["wasted_usd"]:
        line += f" · wasted ${report['wasted_usd']:.2f}"
    if report["media_mismatches"]:
        line += f" · [yellow]{report['media_mismatches']} video(s) not as requested[/yellow] (see `export`)"
    if report["cancelled_for_budget"]:
        line += (
            f" · [yellow]{report['cancelled_for_budget']} job(s) cancelled: budget cap reached[/yellow]"
            f" (to run them: `wanbatch rerun {escape(report['batch'][:12])} --failed-only "
            "--max-usd AMOUNT`)"
        )
    return line


def print_failures(report: BatchReport) -> None:
    """Why jobs failed or were cancelled, commonest first (the full list is in `export`)."""
    for f in report["failures"]:
        kind = f["error_type"] or "error"
        out.print(f"[red]{f['count']} {f['state']}[/red] ({kind}): {escape(f['example'][:200])}")


def print_summary(report: BatchReport) -> None:
    """A finished batch for a human: the counts, the money line and why jobs failed."""
    out.print(status_table(report))
    out.print(money_line(report))
    print_failures(report)


def batches_table(reports: list[BatchReport]) -> Table:
    """One row per batch (``wanbatch status`` without a batch)."""
    table = Table(title="batches")
    for col in (
        "batch",
        "name",
        "total",
        "succeeded",
        "failed",
        "cancelled",
        "in flight",
        "spent",
        "estimated",
    ):
        table.add_column(col, justify="right" if col not in ("batch", "name") else "left")
    for r in reports:
        c = r["counts"]
        flight = r["total"] - r["finished"]
        table.add_row(
            r["batch"][:12],
            r["name"],
            str(r["total"]),
            str(c.get("succeeded", 0)),
            str(c.get("failed", 0)),
            str(c.get("cancelled", 0)),
            str(flight),
            f"${r['spent_usd'] or 0:.2f}",
            f"${r['estimated_usd'] or 0:.2f}",
        )
    return table


def usd(value: Decimal) -> str:
    """Exact dollars as dollars and cents."""
    return f"${value:.2f}"


def cost_table(report: CostReport) -> Table:
    """A human table of a batch's cost report (``wanbatch cost``)."""
    table = Table(title=f"cost of {report.name}  ({report.batch_id})")
    for col in ("endpoint", "resolution", "jobs", "estimated", "actual", "wasted", "possible dup."):
        table.add_column(col, justify="left" if col in ("endpoint", "resolution") else "right")
    for (endpoint, resolution), line in sorted(report.lines.items()):
        table.add_row(endpoint, resolution, *_cost_cells(line))
    table.add_section()
    table.add_row("total", "", *_cost_cells(report.total))
    return table


def _cost_cells(line: CostLine) -> tuple[str, ...]:
    return (
        str(line.jobs),
        usd(line.estimated_usd),
        usd(line.actual_usd),
        usd(line.wasted_usd),
        str(line.possible_duplicate_charges),
    )


def estimate_table(title: str, data: EstimateReport) -> Table:
    """A human table of a manifest's estimate (``wanbatch estimate``); ``*`` marks assumed prices."""
    table = Table(title=title)
    table.add_column("endpoint")
    table.add_column("jobs", justify="right")
    table.add_column("billing units", justify="right")
    table.add_column("USD", justify="right")
    for endpoint, line in data["by_endpoint"].items():
        mark = " *" if endpoint in data["price_assumptions"] else ""
        table.add_row(endpoint + mark, str(line["jobs"]), f"{line['billing_units']:g}", f"${line['usd']:.2f}")
    table.add_section()
    table.add_row("total", str(data["jobs"]), f"{data['billing_units']:g}", f"${data['usd']:.2f}")
    return table
