"""The ``wanbatch`` command's domain half: validate, estimate, submit, status.

Thin by design: parse options, call one function of :mod:`jobs.batches`, print. Commands that
need execution (run, worker, rerun, cancel, export, simulator) are added by :mod:`worker.cli`,
which imports this group — so the domain package never imports the worker package.

Output rules (the contract): with ``--json`` exactly one JSON object goes to stdout; human
output goes to stdout; progress and logs go to stderr. Exit codes: 0 success, 1 some jobs
failed or were cancelled, 2 invalid input or usage. Bad input never prints a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from jobs import batches, store
from jobs.errors import Issue, ManifestError, WanbatchError
from jobs.manifest import validate_manifest
from jobs.states import JobState

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2

json_option = click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
manifest_argument = click.argument("manifest", type=click.Path(path_type=Path))
allow_dir_option = click.option(
    "--allow-dir",
    "allow_dirs",
    multiple=True,
    type=click.Path(path_type=Path, file_okay=False),
    metavar="DIR",
    help=(
        "Also accept local files (images, items_from) from DIR; repeatable. By default only the "
        "manifest's folder is allowed (see also WANBATCH_ALLOWED_INPUT_DIRS)."
    ),
)


def emit_json(obj: dict[str, Any]) -> None:
    """Print one JSON object on stdout (the contract's ``--json`` output)."""
    sys.stdout.write(json.dumps(obj, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _issue_line(issue: Issue) -> str:
    style = "red" if issue.severity == "error" else "yellow"
    return f"[{style}]{issue.severity}[/{style}] {_escape(str(issue))}"


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


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
            err.print(_issue_line(issue))
        err.print(f"[red]✗ {len(errors)} error(s); nothing was submitted.[/red]")
    else:
        err.print(f"[red]error:[/red] {_escape(str(exc))}")
    sys.exit(exc.exit_code)


def guarded(as_json: bool, action: Callable[[], int | None]) -> None:
    """Run ``action``; turn deliberate errors into a message and the contract's exit code."""
    try:
        code = action()
    except WanbatchError as exc:
        fail(exc, as_json)
    sys.exit(code or EXIT_OK)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="wanbatch")
def cli() -> None:
    """wanbatch: batch orchestration for fal.ai's Wan video endpoints.

    Validate a manifest, estimate its cost, submit it, run it, watch it, export it.
    """


@cli.command()
@manifest_argument
@json_option
@allow_dir_option
def validate(manifest: Path, as_json: bool, allow_dirs: tuple[Path, ...]) -> None:
    """Check MANIFEST and every expanded job; submits nothing."""

    def action() -> int:
        dirs = batches.input_dirs(allow_dirs)
        with err.status(f"validating {manifest} …"):
            report = validate_manifest(manifest, dirs)
        if not report.ok:
            raise ManifestError(report.issues)
        if as_json:
            emit_json(
                {
                    "ok": True,
                    "manifest": str(manifest),
                    "name": report.manifest.name if report.manifest else None,
                    "jobs": report.job_count,
                    "issues": [i.as_dict() for i in report.issues],
                }
            )
        else:
            for issue in report.issues:
                err.print(_issue_line(issue))
            out.print(f"[green]✓[/green] {manifest}: {report.job_count} job(s), all valid")
        return EXIT_OK

    guarded(as_json, action)


@cli.command()
@manifest_argument
@json_option
@allow_dir_option
def estimate(manifest: Path, as_json: bool, allow_dirs: tuple[Path, ...]) -> None:
    """Job count, billing units and USD per endpoint and in total; submits nothing."""

    def action() -> int:
        with err.status(f"validating and pricing {manifest} …"):
            _report, totals = batches.estimate_manifest(manifest, allowed_dirs=allow_dirs)
        data = totals.as_dict()
        if as_json:
            emit_json(data)
            return EXIT_OK
        table = Table(title=f"Estimate for {manifest}")
        table.add_column("endpoint")
        table.add_column("jobs", justify="right")
        table.add_column("billing units", justify="right")
        table.add_column("USD", justify="right")
        for endpoint, line in data["by_endpoint"].items():
            mark = " *" if endpoint in data["price_assumptions"] else ""
            table.add_row(
                endpoint + mark, str(line["jobs"]), f"{line['billing_units']:g}", f"${line['usd']:.2f}"
            )
        table.add_section()
        table.add_row("total", str(data["jobs"]), f"{data['billing_units']:g}", f"${data['usd']:.2f}")
        out.print(table)
        if data["price_assumptions"]:
            out.print(
                "* price not published by fal: an assumption (see README, override with "
                "WANBATCH_PRICING_OVERRIDES)"
            )
        return EXIT_OK

    guarded(as_json, action)


def print_budget_note(result: batches.SubmitResult) -> None:
    """Say on stderr that (re)submitting changed the batch's budget cap."""
    note = result.budget_note()
    if note:
        err.print(f"[yellow]{_escape(note)}[/yellow]")


@cli.command()
@manifest_argument
@json_option
@allow_dir_option
def submit(manifest: Path, as_json: bool, allow_dirs: tuple[Path, ...]) -> None:
    """Validate MANIFEST, store its jobs and queue them; prints the batch id.

    Submitting the same manifest again adds no duplicate jobs, and applies its current budget.
    """

    def action() -> int:
        with err.status(f"validating {manifest}, then storing its jobs …"):
            result = batches.submit_manifest(manifest, allowed_dirs=allow_dirs)
        print_budget_note(result)
        if as_json:
            emit_json(result.as_dict())
        else:
            for warning in result.warnings:
                err.print(f"[yellow]warning[/yellow] {_escape(warning)}")
            verb = "created" if result.created else "updated"
            out.print(
                f"batch [bold]{result.batch_id}[/bold] ({result.name}) {verb}: {result.total} job(s), "
                f"{result.added} new, {result.existing} already stored"
            )
        return EXIT_OK

    guarded(as_json, action)


def status_table(report: dict[str, Any]) -> Table:
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


def money_line(report: dict[str, Any]) -> str:
    """Estimated, spent and budget on one line."""
    line = f"estimated ${report['estimated_usd'] or 0:.2f} · spent ${report['spent_usd'] or 0:.2f}"
    if report.get("budget_max_usd") is not None:
        line += f" · budget ${report['budget_max_usd']:.2f}"
    if report.get("possible_duplicate_charges"):
        line += f" · [yellow]{report['possible_duplicate_charges']} possible duplicate charge(s)[/yellow]"
    if report.get("wasted_usd"):
        line += f" · wasted ${report['wasted_usd']:.2f}"
    if report.get("cancelled_for_budget"):
        line += (
            f" · [yellow]{report['cancelled_for_budget']} job(s) cancelled: budget cap reached[/yellow]"
            f" (to run them: `wanbatch rerun {_escape(report['batch'][:12])} --failed-only "
            "--max-usd AMOUNT`)"
        )
    return line


def print_failures(report: dict[str, Any]) -> None:
    """Why jobs failed or were cancelled, commonest first (the full list is in `export`)."""
    for f in report.get("failures", []):
        kind = f["error_type"] or "error"
        out.print(f"[red]{f['count']} {f['state']}[/red] ({kind}): {_escape(f['example'][:200])}")


@cli.command()
@click.argument("batch", required=False)
@json_option
def status(batch: str | None, as_json: bool) -> None:
    """Counts by state, spend and estimate for BATCH (id, id prefix or name), or for every batch."""

    def action() -> int:
        reports = batches.status(batch)
        if as_json:
            emit_json(reports[0] if batch is not None else {"batches": reports})
            return EXIT_OK
        if not reports:
            out.print("no batches yet: try `wanbatch submit MANIFEST`")
        if batch is not None:
            out.print(status_table(reports[0]))
            out.print(money_line(reports[0]))
            if reports[0].get("state") == "paused":  # e.g. fal refused the account (401/402/403)
                reason = reports[0].get("pause_reason") or "see the log"
                out.print(f"[yellow]paused: {_escape(reason)}[/yellow]")
            if eta := eta_text(reports[0].get("eta_seconds")):
                out.print(f"{reports[0]['finished']}/{reports[0]['total']} done, {eta}")
            print_failures(reports[0])
            return EXIT_OK
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
        out.print(table)
        return EXIT_OK

    guarded(as_json, action)


def _usd(value: str) -> str:
    return f"${Decimal(value):.2f}"


def cost_table(data: dict[str, Any]) -> Table:
    """A human table of a batch's cost report (``wanbatch cost``)."""
    table = Table(title=f"cost of {data['name']}  ({data['batch']})")
    for col in ("endpoint", "resolution", "jobs", "estimated", "actual", "wasted", "possible dup."):
        table.add_column(col, justify="left" if col in ("endpoint", "resolution") else "right")
    for line in data["by_endpoint"]:
        table.add_row(
            line["endpoint"],
            line["resolution"],
            str(line["jobs"]),
            _usd(line["estimated_usd"]),
            _usd(line["actual_usd"]),
            _usd(line["wasted_usd"]),
            str(line["possible_duplicate_charges"]),
        )
    total = data["total"]
    table.add_section()
    table.add_row(
        "total",
        "",
        str(total["jobs"]),
        _usd(total["estimated_usd"]),
        _usd(total["actual_usd"]),
        _usd(total["wasted_usd"]),
        str(total["possible_duplicate_charges"]),
    )
    return table


@cli.command()
@click.argument("batch")
@json_option
def cost(batch: str, as_json: bool) -> None:
    """Estimated vs actual (billed) vs wasted USD of BATCH, by endpoint and resolution.

    Actual follows the billing rules (jobs/billing_rules.yaml: 5xx never billed, a 422 billed
    when a runner spent time, a cancel billed once running). Wasted is billed money that bought
    no output. Possible duplicates (resubmits after an unknown outcome) are shown apart.
    """
    from jobs.cost import cost_report
    from jobs.settings import get_settings

    def action() -> int:
        engine = batches.open_engine(get_settings())
        with store.session_scope(engine) as session:
            data = cost_report(session, batch).as_dict()
        if as_json:
            emit_json(data)
            return EXIT_OK
        out.print(cost_table(data))
        total = data["total"]
        if total["in_flight"]:
            out.print(f"{total['in_flight']} job(s) still in flight: actual is not final yet")
        if total["cancelled_for_budget"]:
            out.print(
                f"[yellow]{total['cancelled_for_budget']} job(s) cancelled: budget cap reached[/yellow]"
            )
        if total["possible_duplicate_charges"]:
            out.print(
                f"[yellow]possible duplicate charges: {total['possible_duplicate_charges']} "
                f"(up to {_usd(total['possible_duplicate_usd'])} more than actual)[/yellow]"
            )
        return EXIT_OK

    guarded(as_json, action)


@cli.command()
@click.argument("batch")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), default=None, help="File to write (default: stdout)."
)
def export(batch: str, fmt: str, output: Path | None) -> None:
    """One record per job of BATCH (id, id prefix or name), as JSONL or CSV."""
    from jobs import export as exporting
    from jobs.settings import get_settings

    def action() -> int:
        settings = get_settings()
        engine = batches.open_engine(settings)
        with store.session_scope(engine) as session:
            rows = exporting.records(session, batch, settings.output_dir)
            if output is None:
                n = exporting.write(rows, fmt, sys.stdout)
            else:
                n = exporting.write_file(rows, fmt, output)
        err.print(f"exported {n} record(s)" + (f" to {output}" if output else ""))
        return EXIT_OK

    guarded(False, action)


def main() -> None:
    """Console-script entry point for the domain commands alone."""
    cli(prog_name="wanbatch")
