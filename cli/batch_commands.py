"""``status``, ``cost``, ``export``, ``diff``, ``run``, ``rerun``, ``cancel``, ``pause`` and ``resume``:
the commands about a stored batch.

``run``, ``rerun`` and ``cancel`` process a batch (embedded, or by waiting on the workers): they
import :mod:`worker` when they run, and :mod:`falsim` only with ``--simulate``
(:func:`fal_settings` is the one place that decides where fal requests go).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import click

from cli import startup
from cli.options import (
    BATCH,
    allow_dir_option,
    json_option,
    progress_option,
    simulate_option,
    take_over_option,
)
from cli.output import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    ReaderGone,
    StdoutError,
    cost_heading,
    cost_rounding_note,
    cost_table,
    daily_cap_origin,
    emit_json,
    emit_json_list,
    err,
    escape,
    fail,
    final_code,
    guarded,
    guarded_read,
    hard_exit_json,
    out,
    print_batches,
    print_budget_note,
    print_report,
    print_summary,
    print_warnings,
    report_ref,
    require_http_environment,
    say,
    short_id,
    usd,
    writing_stdout,
)
from jobs.errors import ConfigError, UsageError
from jobs.printable import first_line, one_line, printable, shell_ref

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.orm import Session

    from falsim.server import SimulatorHandle
    from jobs.batches import BatchReport
    from jobs.diff import JobSide, Pair
    from jobs.errors import WanbatchError
    from jobs.models import Batch
    from jobs.settings import Settings
    from worker.running import Interrupted
    from worker.steps.cancel_tries import GivenUp
    from worker.stranded import Stranded

#: The key a ``--simulate`` run sends, whatever FAL_KEY is (the simulator accepts any key).
SIMULATOR_KEY = "simulator-key"
#: The simulator of the ``--simulate`` command running now (:func:`fal_settings`), else None.
_simulator: SimulatorHandle | None = None


class SimulatedElsewhere(UsageError):
    """``--simulate`` of a batch another live process of this host simulates (exit 2, nothing
    changed): ``pids``, those processes."""

    def __init__(self, message: str, pids: list[int]) -> None:
        super().__init__(message)
        self.pids = pids


def require_usable_cpu(setting: str) -> None:
    """A ``WANBATCH_CPU_AFFINITY`` naming a CPU this process may not use: one line, exit 2,
    before anything is stored (worker.one_cpu)."""
    from worker.one_cpu import named_cpu_problem

    problem = named_cpu_problem(setting)
    if problem is not None:
        raise ConfigError(f"WANBATCH_CPU_AFFINITY: {problem}")


def _no_database_yet(settings: Settings, batch: str | None, as_json: bool) -> bool:
    """``status`` where the default database does not exist yet: nothing to show, and no empty
    database made to show it (it kept a later ``submit`` from finding the real one above). With
    BATCH, one line (exit 2, :func:`jobs.database_home.refuse_missing`); without, "no batches"
    (``{"batches": []}``), and a line naming the database of a parent folder, if there is one.
    False when the database is there (or WANBATCH_DATABASE_URL is set): status goes on."""
    from jobs import database_home

    path = database_home.missing_default(settings)
    if path is None:
        return False
    database_home.refuse_missing(settings, [batch] if batch is not None else [])
    above = database_home.database_above_cwd()
    line = database_home.no_database_line(path, None) if above is not None else None
    if as_json:
        if line is not None:
            err.print(escape(line))
        emit_json({"batches": []})
    else:
        out.print(escape(line) if line is not None else "no batches yet: try `wanbatch submit MANIFEST`")
    return True


@click.command()
@click.argument("batch", type=BATCH, required=False)
@json_option
def status(batch: str | None, as_json: bool) -> None:
    """Counts by state, spend and estimate for BATCH (id, id prefix or name), or for every batch."""

    def action() -> int:
        from jobs import batches
        from jobs.cap_holds import CapCheck
        from jobs.settings import get_settings
        from worker.here import process_here
        from worker.limits import api_key_id

        settings = get_settings()
        if _no_database_yet(settings, batch, as_json):
            return EXIT_OK
        # Which cap holds an active batch's unsent jobs back, counted as a run started from
        # here (or the workers, with a broker) counts it: this environment's key and caps.
        caps = CapCheck.of(settings, api_key_id(settings), process_here(settings).origin)
        # A hold on fal recorded by a process of this host that has ended is not shown.
        from jobs.processes import owner_gone

        silent: dict[str, datetime] = {}
        warnings: list[str] = []
        if settings.broker_url:  # the workers' leader's limits apply, not these: say when they differ
            from jobs.models import utcnow
            from worker.doctor import database_id
            from worker.limits import published_mismatch
            from worker.peers import peer_warnings, read_records, silent_since, unread_warning

            database = database_id(settings)
            # Every worker's record, read once: whose settings differ, and which went silent (a
            # worker killed on another host: the jobs it holds are named before its leases end).
            records = read_records(settings, database)
            silent = silent_since(records, utcnow())
            unread = unread_warning(records)
            if unread:  # Redis does not answer: one line, not the leader's limits' read as well
                warnings.append(unread)
            else:
                warnings += published_mismatch(settings, database)
                warnings += peer_warnings(records.peers, records.leader)
        reports = batches.status(
            batch,
            settings,
            caps,
            broker_url=settings.broker_url,
            gone=owner_gone,
            silent=silent,
            policy=settings.submit_unknown_policy,
            here=process_here(settings),
        )
        if settings.webhook_url and batch is not None and reports:  # fal's webhooks never come
            warnings += _webhooks_silent(settings, reports[0]["batch"])
        if batch is not None and reports:  # its paid videos still on disk? (a stat each)
            _look_at_outputs(settings, reports[0])
        for line in warnings:
            err.print(f"[yellow]warning: {escape(line)}[/yellow]")
        if as_json:
            emit_json(reports[0] if batch is not None else {"batches": reports})
            return EXIT_OK
        if not reports:
            out.print("no batches yet: try `wanbatch submit MANIFEST`")
            return EXIT_OK
        if batch is not None:
            # paused: with the reason; an ETA only while work goes on
            print_report(
                reports[0],
                distributed=bool(settings.broker_url),
                daily_cap_from=daily_cap_origin(settings, reports[0]),
            )
            return EXIT_OK
        print_batches(reports, distributed=bool(settings.broker_url))
        return EXIT_OK

    guarded_read(as_json, action)


def _look_at_outputs(settings: Settings, report: BatchReport, *, after_run: bool = False) -> None:
    """Add to ``report`` whether its succeeded jobs' videos are still on disk as stored
    (:func:`jobs.outputs_on_disk.look`: one ``lstat`` each, S3 objects not looked at), and the
    line naming ``wanbatch refetch`` when some are not: ``status`` and ``run`` said ``8/8 done``
    over an emptied output folder, and the paid videos fal still served were left there.
    ``after_run``: read as a run's report is (:func:`worker.running.read_after_run`), a database
    away for a moment waited out; ``status`` says so at once instead."""
    from jobs import db, moved_outputs
    from jobs.outputs_on_disk import look
    from worker.running import read_after_run

    root = moved_outputs.local_root(settings.output_dir, settings.output_url)
    batch_id = report["batch"]
    if after_run:
        found = read_after_run(batch_id, settings, lambda session: look(session, batch_id, root))
    else:
        with db.read_scope(db.open_engine(settings)) as session:
            found = look(session, batch_id, root)
    report["outputs_on_disk"] = found.as_dict()
    note = found.note(report_ref(report))
    if note is not None and settings.broker_url:  # a worker of another host keeps its own disk
        note += " (looked for on this machine: workers of other hosts store on their own disks)"
    report["outputs_on_disk_note"] = note


def _webhooks_silent(settings: Settings, batch_id: str) -> list[str]:
    """``status``'s line when the batch's jobs sent in the last
    :data:`~jobs.webhook_silence.STATUS_WINDOW_SECONDS` show that fal's webhooks do not arrive
    (:func:`jobs.webhook_silence.silence`)."""
    from datetime import timedelta

    from jobs import db
    from jobs.models import utcnow
    from jobs.webhook_silence import STATUS_WINDOW_SECONDS, silence

    since = utcnow() - timedelta(seconds=STATUS_WINDOW_SECONDS)
    with db.read_scope(db.open_engine(settings)) as session:
        line = silence(session, settings, batch_id, since=since)
    return [line] if line else []


@click.command()
@click.argument("batch", type=BATCH)
@json_option
def cost(batch: str, as_json: bool) -> None:
    """Estimated vs actual (billed) vs wasted USD of BATCH, by endpoint and resolution.

    Actual follows the billing rules (jobs/billing_rules.yaml: 5xx never billed, a 4xx (a 422,
    a model error such as bad_request) billed when a runner spent time, a cancel billed once
    running). Wasted is billed money that bought no output. Possible duplicates (resubmits
    after an unknown outcome), and what submits of unknown outcome may have been billed, are
    shown apart.
    """

    def action() -> int:
        from jobs import database_home, db, store
        from jobs.cost import cost_report
        from jobs.settings import get_settings

        database_home.refuse_missing(get_settings(), [batch])  # no empty database made to say so
        engine = db.open_engine(get_settings())
        with db.session_scope(engine) as session:
            report = cost_report(session, batch)
            mismatches = store.count_media_mismatches(session, report.batch_id)
        if as_json:
            emit_json({**report.as_dict(), "media_mismatches": mismatches})
            return EXIT_OK
        out.print(cost_heading(report))
        out.print(cost_table(report))
        if note := cost_rounding_note(report):
            say(note)
        total = report.total
        if report.budget_max_usd is not None:
            say(f"budget {usd(report.budget_max_usd)}")
        if total.in_flight or total.waiting:
            # Waiting jobs sent before apart from those never sent, as `status` and `cancel` count them.
            parts = [
                f"{n} {what}"
                for n, what in (
                    (total.in_flight, "in flight"),
                    (total.waiting - total.waiting_sent_before, "not sent yet"),
                    (total.waiting_sent_before, "sent before, waiting to be sent again, not at fal now"),
                )
                if n
            ]
            unfinished = total.in_flight + total.waiting
            say(f"{unfinished} job(s) not finished ({'; '.join(parts)}): actual is not final yet")
        if total.cancelled_for_budget:
            say(f"{total.cancelled_for_budget} job(s) cancelled: budget cap reached", "yellow")
        resent = total.possible_duplicate_charges
        if total.possibly_billed_usd:  # resent ones included: one figure, never two to add up
            also = f"; {resent} of them resent (possible duplicate charges)" if resent else ""
            say(
                f"possibly billed: up to {usd(total.possibly_billed_usd)} more than actual, by requests "
                "whose outcome is unknown (a submit whose answer was lost, a request fal lost after it "
                f"started running: fal may have billed them); the budget counts it{also}",
                "yellow",
            )
        elif total.possible_duplicate_usd:  # resent before ambiguous_usd was recorded (migration 0013)
            say(
                f"possible duplicate charges: {resent} "
                f"(up to {usd(total.possible_duplicate_usd)} more than actual)",
                "yellow",
            )
        if confirmed := total.confirmed_duplicate_charges:  # proved: not "possibly" any more
            say(
                f"{confirmed} confirmed duplicate charge(s): requests fal ran besides the ones the "
                "jobs kept, each on its job's history; those fal's webhooks reported done are in "
                "actual and wasted",
                "yellow",
            )
        if mismatches:
            say(f"{mismatches} video(s) not as requested (media_mismatch in `export`)", "yellow")
        return EXIT_OK

    guarded_read(as_json, action)


@click.command()
@click.argument("batch", type=BATCH)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv", "parquet", "hf"], case_sensitive=False),
    default="jsonl",
    show_default=True,
    help="hf: a Hugging Face videofolder (videos, metadata.jsonl, manifest, README.md) in -o DIR.",
)
@click.option(
    "-o",
    "--output",
    "output_given",
    # As typed: a Path would collapse ``s3://b/k`` into the local ``s3:/b/k`` before it is seen.
    type=click.Path(),
    default=None,
    help="File to write (default, or -: stdout); for hf, a new or empty folder (required). A local path.",
)
@click.option(
    "--include",
    type=click.Choice(["failed"], case_sensitive=False),
    default=None,
    help="hf: also failed and cancelled jobs (file_name null); the other formats always have them.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object about the export on stdout (needs -o: else stdout carries the records).",
)
def export(batch: str, fmt: str, output_given: str | None, include: str | None, as_json: bool) -> None:
    """One record per job of BATCH (id, id prefix or name), as JSONL, CSV, Parquet or a HF dataset."""
    # ``-o -`` is standard output, as for most tools: it wrote a file named ``-`` (``-o ./-`` does).
    dash = output_given == STDOUT_DASH
    output = None if output_given is None or dash else Path(output_given)

    def action() -> int:
        from jobs import database_home, db, store
        from jobs import export as exporting
        from jobs.errors import UsageError
        from jobs.export_target import refuse_uri
        from jobs.settings import get_settings

        if output_given is not None:  # before anything is opened: s3://b/ds is not a folder ./s3:/b/ds
            refuse_uri(output_given)
        if dash and fmt == "hf":  # as -o /dev/stdout is: a stream is no folder
            raise UsageError("-o - is standard output, not a folder; choose a new folder (the export is one)")
        if dash and as_json:  # as -o /dev/stdout is
            raise UsageError("--json prints to standard output: -o - must be another file")
        if fmt == "hf" and output is None:
            raise UsageError("--format hf needs -o DIR (a new folder for the dataset)")
        if as_json and output is None:
            raise UsageError("--json needs -o FILE: without it the records themselves go to standard output")
        if as_json and _is_stdout(output):
            raise UsageError(f"--json prints to standard output: -o {str(output)!r} must be another file")
        if fmt == "parquet" and output is None and sys.stdout.isatty():
            raise UsageError("Parquet is binary: give -o FILE or redirect stdout")
        settings = get_settings()
        database_home.refuse_missing(settings, [batch])  # no empty database made to say so
        engine = db.open_engine(settings)
        # A moved or copied project: its videos found under the current output folder are
        # recorded there first (read, hashed, outside the export's snapshot); ``moves`` serves
        # the export should the database refuse to record them (jobs.moved_outputs).
        moves = _follow_batch_outputs(engine, settings, batch)
        statuses: Counter[str] = Counter()  # the records written, by status: what the warnings say
        missing: Counter[str] = Counter()  # records whose video is not on disk: warned of, not refused
        # One snapshot for every statement: the rows, and the counts and money an hf dataset
        # card states beside them, of a batch still running must add up (db.read_scope).
        with db.read_scope(engine, snapshot=True) as session:
            # Found before anything is written: an unknown batch leaves no header, file or folder.
            found = store.get_batch(session, batch)
            exporting.refuse_unusable_outputs(session, found)  # a name this locale cannot open
            if output is not None:  # never over the database, a stored video or a source file
                from jobs.export_target import refuse_own_file

                refuse_own_file(
                    session, output, found, database_url=settings.database_url, output_dir=settings.output_dir
                )
            summary: dict[str, Any] = {
                "ok": True,
                "batch": found.id,
                "name": found.name,
                "simulated": found.simulated,
                "format": fmt,
                "path": None if output is None else str(output),
            }
            if fmt in ("parquet", "hf"):
                from jobs import dataset_export

                if fmt == "hf" and output is not None:
                    hf = dataset_export.write_hf(
                        session,
                        found,
                        settings.output_dir,
                        output,
                        include_failed=include == "failed",
                        moves=moves,
                    )
                    if as_json:
                        emit_json({**summary, "include_failed": include == "failed", **hf.as_dict()})
                    else:
                        # ``copied`` counts the downloads too (as --json does): said apart here.
                        ways = f"{hf.linked} hard-linked, {hf.copied - hf.downloaded} copied"
                        if hf.downloaded:
                            ways += f", {hf.downloaded} downloaded from S3"
                        err.print(
                            f"exported {hf.rows} record(s) and {hf.videos} video(s) ({ways}) "
                            f"to {escape(str(output))}"
                        )
                    _print_export_warnings(hf.warnings)
                    return EXIT_OK
                records = exporting.records(session, found, settings.output_dir, moves)
                rows = exporting.tallied(records, statuses, settings.output_dir, missing)
                if output is None:
                    with writing_stdout("the export "):
                        n = dataset_export.write_parquet(rows, sys.stdout.buffer)
                        sys.stdout.buffer.flush()
                else:
                    n = dataset_export.write_parquet_file(rows, output)
            else:
                records = exporting.records(session, found, settings.output_dir, moves)
                rows = exporting.tallied(records, statuses, settings.output_dir, missing)
                if output is None:
                    with writing_stdout("the export "):
                        n = _write_utf8_stdout(lambda out: exporting.write(rows, fmt, out))
                else:
                    n = exporting.write_file(rows, fmt, output)
            warnings = exporting.record_warnings(found, statuses, missing["videos"])
        if as_json:
            emit_json({**summary, "records": n, "bytes": _file_bytes(output), "warnings": warnings})
        else:
            err.print(f"exported {n} record(s)" + (f" to {escape(str(output))}" if output else ""))
        _print_export_warnings(warnings)
        return EXIT_OK

    guarded_read(as_json, action)


#: What ``export -o`` takes for standard output (a file of that name: ``-o ./-``).
STDOUT_DASH = "-"


def _follow_batch_outputs(engine: Any, settings: Settings, batch: str) -> dict[str, str]:
    """Look for the videos of ``batch`` (a reference: an unknown one is left to the export's
    own lookup to name) under the current output folder when they were stored outside it (a
    moved project: :func:`jobs.moved_outputs.follow_outputs`); the moves found."""
    from jobs import db, moved_outputs, store
    from jobs.errors import NotFoundError

    root = moved_outputs.local_root(settings.output_dir, settings.output_url)
    if root is None:
        return {}
    try:
        with db.read_scope(engine) as session:
            batch_id = store.get_batch(session, batch).id
    except NotFoundError:
        return {}
    return moved_outputs.follow_outputs(engine, [batch_id], root).moves


def _print_export_warnings(warnings: list[str]) -> None:
    """Say on stderr (under ``--json`` too, where the object also lists them) what an export
    leaves out or holds unfinished: a partial dataset must never pass for a whole one."""
    for warning in warnings:
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}")


def _is_stdout(output: Path | None) -> bool:
    """Whether ``-o`` names the file standard output already is (``-o /dev/stdout``, or the file
    stdout is redirected to): ``--json`` would print its object into the export."""
    if output is None:
        return False
    try:
        target = output.stat()
        stdout = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):  # no such file yet; a stdout without a descriptor (io.UnsupportedOperation)
        return False
    return (target.st_dev, target.st_ino) == (stdout.st_dev, stdout.st_ino)


def _file_bytes(output: Path | None) -> int | None:
    """The size of the export just written to ``output``; None for a device or a pipe (no size)."""
    import stat

    if output is None:
        return None
    try:
        info = output.stat()
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _write_utf8_stdout(write: Callable[[TextIO], int]) -> int:
    """Run ``write`` on standard output as UTF-8, whatever the locale says: an export is UTF-8
    with or without ``-o`` (``PYTHONIOENCODING=ascii`` made a non-ASCII prompt an internal
    error, the file half written). Falls back to ``sys.stdout`` when it has no byte stream."""
    sys.stdout.flush()
    raw = getattr(sys.stdout, "buffer", None)
    if raw is None:
        count = write(sys.stdout)
        sys.stdout.flush()
        return count
    wrapper = io.TextIOWrapper(raw, encoding="utf-8", newline="", write_through=True)
    try:
        count = write(wrapper)
        wrapper.flush()
    finally:
        wrapper.detach()  # sys.stdout keeps its byte stream
    return count


#: Rows of non-matching jobs ``diff`` prints before saying how many more there are.
DIFF_ROWS = 50


@click.command()
@click.argument("batch_a", type=BATCH)
@click.argument("batch_b", type=BATCH)
@click.option(
    "--verify",
    is_flag=True,
    help="Hash every compared video (S3 objects too: each downloaded) against its recorded "
    "SHA-256, not only its size.",
)
@json_option
def diff(batch_a: str, batch_b: str, verify: bool, as_json: bool) -> None:
    """Compare BATCH_A with BATCH_B job by job: same video bytes or not, seeds, prompts, costs.

    Jobs pair by job key, else by the same input apart from the seed (how `rerun` relates to its
    parent). Each video is looked at where it is stored, on disk or in S3 (its size, one HEAD
    per object; --verify: its SHA-256): one missing or changed makes its pair different. Exit 0
    when every job matched and every pair has the same video, 1 otherwise.
    """

    def action() -> int:
        from cli.output import diff_table
        from jobs import database_home, db, moved_outputs
        from jobs.diff import S3_LOOKUP_SECONDS, S3_LOOKUPS_AT_ONCE, DiskCheck, diff_batches, varied_of
        from jobs.settings import get_settings

        # A reused output's "same" is one render, not a reproduction: listed, and said below.
        shown: list[Pair] = []
        varied: dict[str, dict[str, Any]] = {}
        settings = get_settings()
        database_home.refuse_missing(settings, [batch_a, batch_b])  # no empty database made

        def announce(objects: int) -> None:
            """Say that S3 is asked (with --json too: stderr is free): a request per object, and
            for a big batch a wait, bounded."""
            err.print(
                escape(
                    f"looking up {objects} S3 object(s): one HEAD each, {S3_LOOKUPS_AT_ONCE} at a time, "
                    f"for at most {S3_LOOKUP_SECONDS:g} s"
                )
            )

        # A moved project's videos are looked for under the current output folder.
        root = moved_outputs.local_root(settings.output_dir, settings.output_url)
        disk = DiskCheck(root, verify=verify, announce=announce)
        with db.session_scope(db.open_engine(settings)) as session:
            result = diff_batches(session, batch_a, batch_b, disk)
            if not as_json:
                shown = [p for p in result.pairs if p.outcome != "same" or p.reused]
                # The input fields that tell an item's jobs apart, of the rows shown only.
                varied = varied_of(session, result, shown[:DIFF_ROWS]) if shown else {}
        code = EXIT_OK if result.identical else EXIT_SOME_FAILED
        if (mixed := result.simulated_note()) is not None:  # with --json too: stderr is free
            err.print(f"[yellow]warning[/yellow] {escape(mixed)}")
        if as_json:  # the jobs written one at a time: never the whole list in memory
            emit_json_list(result.summary(), "jobs", result.job_dicts())
            return code
        if shown:
            labels = _diff_labels(varied, shown[:DIFF_ROWS])
            out.print(diff_table([_diff_row(pair, labels) for pair in shown[:DIFF_ROWS]]))
            if len(shown) > DIFF_ROWS:
                out.print(f"… and {len(shown) - DIFF_ROWS} more (`--json` lists every job)")
        names = f"{one_line(result.batch_a['name'])} vs {one_line(result.batch_b['name'])}"
        out.print(
            escape(
                f"{names}: {result.count('same')} same, {result.count('different')} different, "
                f"{result.count('only_a')} only in A, {result.count('only_b')} only in B"
            )
        )
        if (itself := result.same_batch_note()) is not None:
            out.print(escape(itself))
        if (reused := result.reused_note()) is not None:
            out.print(escape(reused))
        if (priced := result.cost_note()) is not None:
            out.print(escape(priced))
        if (disk_note := result.disk_note()) is not None:
            out.print(escape(disk_note))
        if (lookup_note := result.lookup_note()) is not None:
            out.print(escape(lookup_note))
        return code

    guarded_read(as_json, action)


@click.command()
@click.argument("batch", type=BATCH)
@click.option(
    "--verify",
    is_flag=True,
    help="Hash every video against its recorded SHA-256 (reads them all), not only its size, "
    "to find those to fetch again.",
)
@json_option
def refetch(batch: str, verify: bool, as_json: bool) -> None:
    """Fetch again from fal the videos of BATCH that are missing or changed on disk; never pays.

    Each succeeded job whose video is not on disk as stored (missing, or of another size; with
    --verify, other bytes) is downloaded again from the URL fal's result named, as a first
    download is, checked against the SHA-256 recorded, and stored under its name with its
    sidecar. Nothing is submitted. A video fal no longer serves is said, with the advice (`rerun`
    pays again). Up to WANBATCH_EMBEDDED_CONCURRENCY at once. Refused (exit 2) while another
    process runs the batch. Exit 0 when every video is back (or none was missing), 1 when some are not.
    """

    def action() -> int:
        from jobs import database_home
        from jobs.printable import redraws
        from jobs.settings import get_settings
        from worker.progress_line import batch_progress_display
        from worker.refetch import refetch_batch

        settings = get_settings()
        database_home.refuse_missing(settings, [batch])  # no empty database made to say so
        # The line `run` draws, counting videos: on a terminal only, never with --json.
        display = batch_progress_display(err, disable=as_json or not redraws(err))
        task = display.add_task("videos", total=None, start=False, money="", counts={})
        began = time.monotonic()

        def announce(count: int) -> None:
            nonlocal began
            err.print(escape(f"fetching {count} video(s) again from fal: no submit, nothing paid"))
            began = time.monotonic()
            display.update(task, total=count)
            display.start_task(task)
            display.start()

        def progress(done: int, total: int) -> None:
            pace = (time.monotonic() - began) / done
            display.update(task, completed=done, eta=pace * (total - done))

        try:
            report = refetch_batch(settings, batch, verify=verify, announce=announce, progress=progress)
        finally:
            display.stop()
        code = EXIT_OK if report.complete else EXIT_SOME_FAILED
        if as_json:
            emit_json(report.as_dict())
            return code
        for line in report.lines():
            out.print(escape(line))
        return code

    guarded(as_json, action)


#: Characters of a varied field's value the ``diff`` table shows (a prompt, an image URL).
DIFF_VALUE_CHARS = 24


def _diff_value(value: object) -> str:
    """A varied field's value as the table shows it, masked as an export masks it (a prompt
    holding a fal-shaped key, a URL's credentials)."""
    from jobs.url_secrets import shareable_text

    return shareable_text(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))


def _diff_labels(varied: dict[str, dict[str, Any]], pairs: list[Pair]) -> dict[str, dict[str, str]]:
    """Job id → the varied fields of its item (:meth:`jobs.diff.BatchDiff.varied`) as the item
    column shows them, for the jobs of ``pairs``: a value of up to :data:`DIFF_VALUE_CHARS`
    whole, a longer one cut in the middle so that it could be no other value of that field in the
    table (two prompts that start alike kept their start only and read the same), and whole when
    no cut tells it apart."""
    from cli.output import distinct_fits

    texts = {
        side.job_id: {name: one_line(_diff_value(v)) for name, v in varied.get(side.job_id, {}).items()}
        for pair in pairs
        for side in (pair.a, pair.b)
        if side is not None
    }
    by_field: dict[str, list[str]] = {}
    for fields in texts.values():
        for name, text in fields.items():
            by_field.setdefault(name, []).append(text)
    shown = {name: distinct_fits(values, DIFF_VALUE_CHARS) for name, values in by_field.items()}
    return {
        job_id: {name: shown[name][text] or text for name, text in fields.items()}
        for job_id, fields in texts.items()
    }


def _diff_job(pair: Pair, labels: dict[str, dict[str, str]]) -> str:
    """The row's job: its item, and the input fields that tell it from the item's other jobs
    (``0 resolution=720p``); ``A/B`` when the two sides of the pair ask different values."""
    side = pair.a or pair.b
    assert side is not None
    a = labels.get(pair.a.job_id, {}) if pair.a else {}
    b = labels.get(pair.b.job_id, {}) if pair.b else {}
    fields = []
    for name in sorted(a.keys() | b.keys()):
        values = [v[name] for v in (a, b) if name in v]
        fields.append(f"{name}={'/'.join(dict.fromkeys(values))}")
    return " ".join([str(side.item_index), *fields])


def _diff_seed(side: JobSide) -> str:
    """The seed fal used; for a job never sent, the one its input pinned, marked ``(pinned)``."""
    if side.seed is not None:
        return str(side.seed)
    return "–" if side.pinned_seed is None else f"{side.pinned_seed} (pinned)"


def _diff_row(pair: Pair, labels: dict[str, dict[str, str]]) -> tuple[str, ...]:
    """One ``diff`` table row: the job (item and varied fields, :func:`_diff_labels`), result
    (with ``by MATCHED_BY`` on a second line), what differs (first ``reused output`` for a pair
    that is one render, :attr:`Pair.reused`; for a job compared with itself, which differs in
    nothing, ``no video (STATUS)`` when it has none; a video not on disk as recorded with its
    side and path), and seed, video and cost of A and B."""

    def both(show: Callable[[JobSide], str]) -> str:
        return " / ".join("–" if s is None else show(s) for s in (pair.a, pair.b))

    from jobs.fs import shown_path

    on_disk = pair.disk_problems()
    what = ["reused output"] * pair.reused + [d for d in pair.differs() if d not in on_disk]
    if pair.same_job and pair.a is not None and pair.a.video_sha256 is None:
        what.append(f"no video ({pair.a.status})")
    # A video not on disk as recorded: which side, and the path looked at.
    sides = [("", pair.a)] if pair.same_job else [("A ", pair.a), ("B ", pair.b)]
    what += [
        f"{label}{side.disk_problem}: {shown_path(side.video_path or '')}"
        for label, side in sides
        if side is not None and side.disk_problem is not None
    ]
    return (
        _diff_job(pair, labels),
        # How the pair was matched (job_key, input, origin, item) under the result: "different"
        # by origin or by item is another request, not evidence of non-determinism.
        pair.outcome if pair.matched_by is None else f"{pair.outcome}\nby {pair.matched_by}",
        ", ".join(what),
        both(_diff_seed),
        both(lambda s: (s.video_sha256 or "no video")[:12]),
        both(lambda s: "–" if s.cost_usd is None else usd(s.cost_usd)),
    )


# --------------------------------------------------------------------------- processing a batch


def refuse_simulate_with_broker(settings: Settings, simulate: bool) -> None:
    """``--simulate`` with ``WANBATCH_BROKER_URL`` set: a ConfigError (exit 2), said before
    anything is stored or changed."""
    from jobs.errors import ConfigError

    if simulate and settings.broker_url:
        # The workers process what a broker carries, with their own settings: with fal's.
        raise ConfigError(
            "--simulate runs the work in this process, but WANBATCH_BROKER_URL is set: the workers "
            "would send it to fal; unset WANBATCH_BROKER_URL to simulate"
        )


@contextlib.contextmanager
def fal_settings(
    settings: Settings, simulate: bool, *, check: bool = True, keyless: bool = False
) -> Iterator[Settings]:
    """The settings to process with: fal's, or with ``--simulate`` a simulator's started for now.

    With ``check`` (before anything is stored or sent) a missing ``FAL_KEY`` (real fal only; not
    ``keyless``: a run that makes no call to fal, :func:`_ends_without_fal`, or a ``rerun``, which
    requires the key itself once it knows it has jobs to send), a broker that does
    not answer, or a submit-rate limiter whose Redis does not or refuses its writes
    (``WANBATCH_LIMITS_URL``, else a Redis broker) is a :class:`~jobs.errors.ConfigError`
    (exit 2) at once, rather than a silent wait. The simulator runs in this process for the ``with`` block: it
    accepts any key, answers within a fraction of a second and bills nothing.

    Embedded (no broker), this process's metrics are served on ``WANBATCH_METRICS_PORT`` for the
    ``with`` block, from before anything is stored: a port in use is refused like the rest, where
    it used to be found only when the work began, the batch (or ``r-rerun-N``) stored and left
    pending. :func:`_run_and_report` therefore has ``process_batch`` serve none of its own.
    """
    refuse_simulate_with_broker(settings, simulate)
    if check:
        from worker.limits import check_limiter
        from worker.running import check_broker

        if not simulate and not keyless:
            settings.require_fal_key()
        check_broker(settings)
        check_limiter(settings)
    stop_metrics = None
    if not settings.broker_url:  # with a broker the workers do the work, and serve theirs
        from worker.running import serve_run_metrics

        stop_metrics = serve_run_metrics(settings)
    try:
        with _simulated(settings, simulate) as target:
            yield target
    finally:
        if stop_metrics is not None:
            stop_metrics()


@contextlib.contextmanager
def _simulated(settings: Settings, simulate: bool) -> Iterator[Settings]:
    """``settings``, or with ``simulate`` a simulator's started for the ``with`` block (see
    :func:`fal_settings`)."""
    if not simulate:
        yield settings
        return
    from pydantic import SecretStr

    from falsim import SimulatorOptions, running_simulator
    from worker.running import Interrupted

    global _simulator
    ran: SimulatorHandle | None = None
    stopped: Interrupted | None = None
    try:
        with running_simulator(SimulatorOptions(concurrency_limit=40, latency_seconds=0.3)) as sim:
            ran = _simulator = sim
            try:
                yield settings.model_copy(
                    update={
                        "fal_queue_url": sim.url,
                        "fal_rest_url": sim.url,
                        # Never the user's FAL_KEY: it goes to fal only. A key of its own also keeps
                        # the simulation's requests out of fal's outstanding cap (counted per key).
                        "fal_key": SecretStr(SIMULATOR_KEY),
                        # fal's webhook receiver is for fal: the simulator would post there (the
                        # receiver rejects its signature, counted as forged), and the run, waiting for
                        # webhooks instead of following status streams, would learn of each completion
                        # only from the poll after WANBATCH_WEBHOOK_POLL_AFTER (30 s by default).
                        "webhook_url": None,
                        "poll_min_interval": min(settings.poll_min_interval, 0.2),
                        "tick_interval": min(settings.tick_interval, 0.1),
                    }
                )
            finally:
                _simulator = None
    except Interrupted as exc:
        stopped = exc
        raise
    finally:
        if ran is not None:
            _hand_over_finished(settings, ran, stopped)
            _release_claims(settings, ran)


def _release_claims(settings: Settings, sim: SimulatorHandle) -> None:
    """This process's claims on the batches it simulated end with its simulator
    (:func:`worker.steps.dead_leases.release_simulation`), once what it finished is handed over:
    the next ``--simulate`` run of the batch goes on at once. A database that cannot take it
    leaves the claim of a process that ends now: it holds nothing once the process is gone
    (:func:`~worker.steps.dead_leases.claim_simulation`). So a stopping run whose database
    another process holds locked does not wait for it (:func:`jobs.db.stop_waiting_for_lock`)."""
    from sqlalchemy.exc import SQLAlchemyError

    from jobs import database_home, db
    from jobs.errors import WanbatchError
    from worker.here import queue_origin
    from worker.steps.dead_leases import release_simulation

    if database_home.missing_default(settings) is not None:  # nothing stored, nothing claimed
        return
    with (
        contextlib.suppress(SQLAlchemyError, WanbatchError, OSError),
        db.session_scope(db.open_engine(settings)) as session,
    ):
        release_simulation(session, queue_origin(sim.url))


def _hand_over_finished(settings: Settings, sim: SimulatorHandle, stopped: Interrupted | None = None) -> None:
    """Once this run's simulator has stopped: record which requests it finished successfully,
    with their seeds, wherever this run left them unfinished — on the simulations' jobs the
    database still has ``queued``, ``running`` or ``cancelling`` (the run stopped before it
    learnt of the completion: :func:`jobs.store.note_simulated_finished`), and in the journal
    this process leaves (the submissions the database could not take:
    :mod:`worker.steps.unrecorded`). That simulator billed them; the next ``--simulate`` run
    gives them to its own simulator finished (:meth:`falsim.engine.Engine.take_back_finished`:
    the same video, unbilled) instead of running and billing them a second time. Read after the
    stop, so the ledger no longer changes (a request still running then was not billed:
    :meth:`falsim.engine.Engine.stop`). ``stopped``: the interruption that ended the run, whose
    line says what could not be recorded (:func:`_note_finished_in_database`)."""
    from worker.steps.unrecorded import Journal

    finished = {
        entry["request_id"]: entry["seed"]
        for entry in sim.engine.ledger.snapshot()["entries"]
        if entry["outcome"] == "ok"
    }
    if not finished:
        return
    Journal(settings.database_url).note_finished(finished)  # local, at once
    _note_finished_in_database(settings, finished, stopped)


def _note_finished_in_database(
    settings: Settings, finished: dict[str, int | None], stopped: Interrupted | None = None
) -> None:
    """:func:`jobs.store.note_simulated_finished` for :func:`_hand_over_finished`, as the run
    ends: a database that cannot take it (its disk is full, it is gone) is said in one line, the
    run's own outcome kept. Stopped (``stopped``) while another process holds the database's lock
    (:func:`jobs.db.gave_up_on_lock`), said in the stop's line, which says that lock already."""
    from sqlalchemy.exc import SQLAlchemyError

    from jobs import db, store
    from jobs.errors import WanbatchError

    try:
        with db.session_scope(db.open_engine(settings)) as session:
            store.note_simulated_finished(session, finished)
    except (SQLAlchemyError, WanbatchError, OSError) as exc:
        if stopped is not None and db.gave_up_on_lock(exc):
            stopped.also(
                f"which {len(finished)} request(s) the simulator finished could not be recorded: "
                "the next --simulate run runs them again (its ledger counts their videos twice)"
            )
            return
        said = "its disk is full" if db.is_disk_full(exc) else first_line(exc)
        err.print(
            "[yellow]warning: the database could not record which requests the simulator finished "
            f"before it stopped ({escape(said)}): the next --simulate run runs them again, and the "
            "simulation's ledger counts their videos twice[/yellow]"
        )


def _resume_at_simulator(batch_id: str, settings: Settings) -> None:
    """With ``--simulate``, give the simulator of this run the batch's requests that an earlier,
    stopped run left "at fal" (queued, running, being cancelled, or finished and not yet
    downloaded): real fal still has them after a Ctrl-C, and "run again to resume" must hold
    against the simulator too, instead of every such job failing as a request fal lost.

    A request still queued goes back with what is left of the start timeout its submit carried
    (``X-Fal-Request-Start-Timeout``: the time to the batch's window end or deadline as of its
    sending): fal never starts such a request after that, and one whose start deadline passed
    while the run was stopped is timed out in the simulator's queue at once, unbilled, as fal
    does — rather than run (and billed) after the deadline.

    A finished one (``downloading``: its video waited for room on a full disk, or the run
    stopped before fetching it) goes back finished: fal keeps its result and video, never runs
    or bills it again, and neither does the simulator (it makes the video again, unbilled, from
    the seed its result carried, only to serve it). The result the earlier run fetched names
    that run's simulator, gone with it: it is forgotten, and the download asks this run's
    simulator for it again. So does one the database still has ``queued``, ``running`` or
    ``cancelling`` that the earlier run's simulator had finished (and billed) before that run
    learnt of it: the earlier run recorded it once its simulator had stopped, with its seed
    (:func:`_hand_over_finished`), and it goes back finished too, its record then forgotten.

    The submissions the earlier run's simulator accepted whose ids the database could not take
    (its disk was full: :mod:`worker.steps.unrecorded`) go back too, from the journal that run
    left: this run records them (:func:`worker.steps.reconcile.adopt_unrecorded`) and follows
    them at its simulator, which must hold them. Those the earlier run's simulator had finished
    (the journal says so: :func:`_hand_over_finished`) go back finished, as the ``downloading``
    ones do, never billed again; the others are run, and billed, by this one — the earlier
    simulator billed none of them (a request it was still running when it stopped is not
    billed there: :meth:`falsim.engine.Engine.stop`).

    A local file the earlier run uploaded (rather than sent inline) went with its simulator: the
    input each request goes back with names the file uploaded again to this run's simulator
    (:func:`_uploads_at`), so that the model sees the image the request was sent with (its size
    gives the video's shape, its bytes the video) and makes the video an uninterrupted run would
    have made. The job's ``submitted_input`` stays what was sent."""
    if _simulator is None:
        return
    from jobs import db, store
    from jobs.models import utcnow
    from jobs.states import JobState

    at_fal = (JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING, JobState.DOWNLOADING)
    with db.read_scope(db.open_engine(settings)) as session:
        requests = store.batch_requests(session, batch_id, at_fal)
        seeds: dict[str, int | None] = {}
        requests += _journaled_requests(session, batch_id, settings, {r[1] for r in requests}, seeds)
        results = store.simulated_results(session, batch_id) if requests else {}
        results.update({request_id: {"seed": seed} for request_id, seed in seeds.items()})
        schedule = store.batch_schedule(store.get_batch(session, batch_id)) if requests else None
    if not requests or schedule is None:
        return
    now = utcnow()
    resumed: list[tuple[str, str, Any, float | None]] = []
    finished: list[tuple[str, str, Any, int | None]] = []
    upload_here = _uploads_at(_simulator)
    for endpoint, request_id, sent, state, sent_at, start_timeout_at, stored, sources in requests:
        payload = upload_here(endpoint, sent, stored, sources)
        # Finished: downloading, or recorded so by the stopped run (queued, running, cancelling).
        if state == JobState.DOWNLOADING or results.get(request_id) is not None:
            seed = (results.get(request_id) or {}).get("seed")
            finished.append((endpoint, request_id, payload, seed if type(seed) is int else None))
            continue
        start_timeout = None
        if state == JobState.QUEUED and sent_at is not None:
            # As worker.steps.submit computed it when sending: the window's end or the deadline
            # (recorded with the POST; for one sent before that was, the batch's schedule now).
            closes = start_timeout_at or schedule.closes_at(sent_at)
            if closes is not None:
                start_timeout = max((closes - now).total_seconds(), 0.0)
        resumed.append((endpoint, request_id, payload, start_timeout))
    _simulator.resume(resumed, finished)
    if finished:
        with db.session_scope(db.open_engine(settings)) as session:
            store.forget_simulated_results(session, batch_id, [f[1] for f in finished])


def _uploads_at(simulator: SimulatorHandle) -> Callable[[str, Any, Any, Any], Any]:
    """``(endpoint, submitted input, stored input, source files) -> input`` for a request
    given back to ``simulator``: the submitted input with each local file that went as an
    upload to the earlier run's simulator uploaded again to this one, its bytes checked against
    the SHA-256 recorded at validation (:func:`worker.fal.storage.upload_again`); each distinct
    file once. The submitted input as it is when there is nothing to upload again."""
    from jobs.endpoints import get_endpoint
    from jobs.errors import UsageError
    from worker.fal.storage import MediaPreparer, upload_again

    urls: dict[tuple[str, str], str] = {}  # (SHA-256, content type) -> its URL at ``simulator``

    def record(digest: str, url: str, size: int, content_type: str) -> None:
        urls[digest, content_type] = url

    # Always as an upload, however small: the request was sent with a URL.
    preparer = MediaPreparer(
        simulator.upload, inline_max_bytes=-1, lookup=lambda d, t: urls.get((d, t)), record=record
    )

    def upload_here(endpoint: str, sent: Any, stored: Any, sources: Any) -> Any:
        if not (isinstance(sent, dict) and isinstance(stored, dict)):
            return sent
        try:
            spec = get_endpoint(endpoint)
        except UsageError:  # an endpoint this version no longer knows: sent as it was
            return sent
        fields = {fld.name: fld.type for fld in spec.media_fields}
        return upload_again(sent, stored, fields, preparer=preparer, source_files=sources)

    return upload_here


def _journaled_requests(
    session: Session, batch_id: str, settings: Settings, known: set[str], seeds: dict[str, int | None]
) -> list[tuple[str, str, Any, Any, datetime | None, datetime | None, Any, Any]]:
    """The batch's submissions an earlier run's simulator accepted whose ids the database could
    not take, from the journals ended processes left (:mod:`worker.steps.unrecorded`), as
    :func:`jobs.store.batch_requests` gives them: those its jobs still wait for (the next
    reconcile records them), each as queued (or running, when its answer said so) from its
    sending, or as ``downloading`` when that simulator finished it (its seed then goes into
    ``seeds``, by request id). ``known``: request ids recorded already."""
    from jobs import store
    from jobs.errors import NotFoundError
    from jobs.states import JobState
    from worker.steps.late_answers import adoptable, awaits_answer
    from worker.steps.unrecorded import Journal, read_journal

    found: list[tuple[str, str, Any, Any, datetime | None, datetime | None, Any, Any]] = []
    for path in Journal(settings.database_url).left_by_others():
        for accepted in read_journal(path) or []:
            if accepted.request_id in known:
                continue
            try:
                job = store.get_job(session, accepted.job_id)
            except NotFoundError:
                continue
            if job.batch_id != batch_id or job.submitted_input is None:
                continue
            if not (awaits_answer(job, accepted.attempt) or adoptable(session, job, accepted.attempt)):
                continue
            known.add(accepted.request_id)
            state = JobState.RUNNING if accepted.running else JobState.QUEUED
            if accepted.finished:
                state = JobState.DOWNLOADING
                seeds[accepted.request_id] = accepted.seed
            sent = job.sent_at or accepted.submitted_at
            payload, timeout_at, files = job.submitted_input, job.start_timeout_at, job.source_files
            found.append(
                (job.endpoint, accepted.request_id, payload, state, sent, timeout_at, job.input, files)
            )
    return found


def _run_and_report(
    batch_id: str,
    settings: Settings,
    as_json: bool,
    progress: bool,
    *,
    command: str = "run",
    again: str | None = None,
    keyless: bool = False,
) -> int:
    """Process the batch, then its summary and exit code.

    ``again``: how to go on once the batch is paused, for ``rerun`` (`wanbatch run NAME`: running
    ``rerun`` again would store another batch); by default, the same command again. ``keyless``:
    the run makes no call to fal (:func:`_ends_without_fal`), and runs without ``FAL_KEY``.
    """
    from jobs import batches
    from jobs.output_store import open_output_store
    from worker.logs import console_job_end_cap
    from worker.running import load_machinery, process_batch

    # Before the simulator adopts anything: a simulation is never sent to fal, nor a paid batch
    # to the simulator.
    batches.check_simulation(batch_id, settings, simulated=_simulator is not None, command=command)
    # Before the simulator is given the requests "at fal": a batch another live process
    # simulates is that process's (refused), else this one's for its life (claimed).
    if _simulator is not None:
        _claim_simulation(batch_id, settings)
    # Not for cancel; not with workers (they write to their own disks); not for a simulation
    # (its placeholder videos are not the size of fal's).
    sending = command != "cancel" and not settings.broker_url and _simulator is None
    if sending and (room := batches.space_note(batch_id, settings)):
        err.print(f"[yellow]warning: {escape(room)}[/yellow]")
    _resume_at_simulator(batch_id, settings)
    load_machinery(settings)  # imported before the GC comes back: frozen with the start-up
    startup.resume()  # the machinery is loaded: freeze it, collect from here on
    # A batch failing wholesale is not one WARNING line per job on the terminal: the first few,
    # then how many more and where they are (the summary below groups them by reason).
    with console_job_end_cap(_job_lines_held_back(batch_id, settings)):
        report, stats = process_batch(
            batch_id,
            settings,
            console=err,
            # With --json too: stdout holds the one JSON object, the progress goes to stderr (plain
            # lines into a file, as without it); --no-progress is what silences it.
            show_progress=progress,
            serve_metrics=False,  # fal_settings serves them, bound before anything was stored
            keyless=keyless,
            **({"again": again} if again else {}),
        )
    if command != "cancel":  # its paid videos still on disk? (a stat each; said in the summary)
        _look_at_outputs(settings, report, after_run=True)
    held = None if command == "cancel" else _held_line(report, again)
    extra: dict[str, object] = {"ok": False, "error": held} if held else {}
    if stats.uncancelled:  # requests fal would not cancel: the run ended with them at fal
        extra["uncancelled"] = [
            {"job": g.job_id, "request_id": g.request_id, "error": g.error, "tries": g.tries}
            for g in stats.uncancelled
        ]
        retry = f"`wanbatch cancel {report_ref(report)}{_simulate_flag(_simulator is not None)}`"
        for line in uncancelled_lines(stats.uncancelled, retry, workers=bool(settings.broker_url)):
            err.print(f"[yellow]{escape(line)}[/yellow]")
    if stats.stranded:  # only requests of another key fal does not know for this one were left
        simulate = _simulate_flag(_simulator is not None)
        stuck = _say_stranded(stats.stranded, report_ref(report), settings, extra, simulate=simulate)
        held = held or stuck
        extra["error"] = held
    if as_json:
        emit_json(
            {
                **report,
                **extra,
                "wall_seconds": round(stats.wall_seconds, 3),
                "status_calls": stats.status_calls,
            }
        )
    else:
        print_summary(
            report, distributed=bool(settings.broker_url), daily_cap_from=daily_cap_origin(settings, report)
        )
        where = open_output_store(settings).describe()
        say(escape(f"outputs in {where}; finished in {stats.wall_seconds:.1f}s"))
    return EXIT_USAGE if held else final_code(report)


def _say_stranded(
    stranded: Sequence[Stranded],
    ref: str,
    settings: Settings,
    extra: dict[str, object],
    *,
    simulate: str = "",
) -> str:
    """:func:`stranded_line` printed (yellow, stderr) and put in the ``--json`` object's ``extra``
    (``ok`` false, ``error``, ``other_key``); the line. The key fal refused them to: the one the
    database names (the workers', watching them), else this process's."""
    from worker.limits import api_key_id

    mine = next((n.refused_to for n in stranded if n.refused_to), None) or api_key_id(settings)
    stuck = stranded_line(stranded, ref, mine, simulate=simulate)
    extra.update(ok=False, error=stuck)
    extra["other_key"] = [{"job": n.job_id, "request_id": n.request_id, "key_id": n.key_id} for n in stranded]
    err.print(f"[yellow]{escape(stuck)}[/yellow]")
    return stuck


def stranded_line(stranded: Iterable[Stranded], ref: str, mine: str, *, simulate: str = "") -> str:
    """The line a run (or ``cancel``) that ended with only requests of another API key left
    (:mod:`worker.steps.other_key`) exits 2 with: how many, each key id (never a key), and the
    ways out — the command again with that key, or writing them off."""
    by_key = Counter(n.key_id for n in stranded)
    sent = "; ".join(f"{count} with key id {key}" for key, count in sorted(by_key.items()))
    return (
        f"{sum(by_key.values())} request(s) of this batch were sent with another API key ({sent}) "
        f"and fal does not know them for this FAL_KEY (key id {mine}): a key of another fal "
        "account, or that key was revoked. They are left at fal, where they may still run and "
        f"bill; run `wanbatch run {ref}{simulate}` with the FAL_KEY they were sent with to collect "
        f"them, or `wanbatch cancel {ref}{simulate} --abandon-other-key` to write them off (failed, "
        "their estimate counted as possibly billed)"
    )


def uncancelled_lines(uncancelled: Iterable[GivenUp], retry: str, *, workers: bool = False) -> list[str]:
    """One line per request whose cancel a run gave up (:mod:`worker.steps.cancel_tries`): the
    job is left where fal holds it, which may still run and bill it. Embedded, nothing follows
    it once this command ends: ``retry`` (the command that tries again, and fetches the video
    should fal have finished it meanwhile) is named. With ``workers`` (a broker), they go on
    following it, and ask fal to cancel it again every few minutes."""
    if workers:
        from worker.steps.cancel_tries import GIVEN_UP_RETRY_SECONDS

        after = (
            "the workers go on following the job, ask fal to cancel it again every "
            f"{GIVEN_UP_RETRY_SECONDS / 60:g} minutes and fetch its video should fal finish it"
        )
    else:
        after = (
            f"nothing follows the job once this command ends; {retry} tries again, and fetches its "
            "video should fal finish it"
        )
    return [
        f"warning: job {g.job_id}: request {g.request_id} could not be cancelled at fal "
        f"({printable(g.error)}; {g.tries} tries): fal may still run and bill it, and {after}"
        for g in uncancelled
    ]


def _job_lines_held_back(batch_id: str, settings: Settings) -> Callable[[int], str]:
    """The console's last word on the job lines it did not show (:func:`worker.logs.console_job_end_cap`):
    how many, and the command that lists every job with its error. The batch's name is read now,
    while the database answers (the line may come after a full disk stopped the run)."""
    from jobs import db, store
    from worker.logs import CONSOLE_JOB_END_LINES

    with db.read_scope(db.open_engine(settings)) as session:
        ref = shell_ref(store.get_batch(session, batch_id).name, batch_id)

    def note(held_back: int) -> str:
        return (
            f"{held_back} more job(s) failed or were cancelled: their lines are not shown here, "
            f"only the first {CONSOLE_JOB_END_LINES} (WANBATCH_LOG_FORMAT=json logs every one); "
            f"`wanbatch export {ref}` lists every job with its status and error"
        )

    return note


def _held_line(report: BatchReport, again: str | None) -> str | None:
    """Why a run ended with jobs of its batch left unsent, when that is no job's failure: its
    user paused it, fal refused the key or the account (HTTP 401/402/403), or its outputs could
    not be stored (a full disk, a read-only folder). Such a run exits 2, as a run of a paused
    batch or a missing FAL_KEY does, saying what to fix and how to go on: exit 1 says jobs
    failed or were cancelled, and a script that reads it as "the batch is over, rerun what
    failed" would never finish it. None: exit by the jobs' outcome."""
    from jobs import batches

    words = {"again": again} if again else {}
    if _held_by_user(report):  # and when its schedule is closed too, until when (as `status`)
        closed = batches.paused_schedule_text(report["paused_schedule_state"])
        return batches.paused_line(report["name"], report_ref(report), **words, closed=closed)
    if batches.outputs_paused(report):
        return batches.outputs_line(report, **words)
    if batches.inputs_paused(report):
        return batches.inputs_line(report)
    if batches.refused_by_fal(report):
        return batches.refused_line(report, **words)
    return None


def _held_by_user(report: BatchReport) -> bool:
    """Whether a run ended with jobs left because the batch's user paused it."""
    return (
        bool(report["paused_by_user"])
        and report["state"] == "active"
        and report["finished"] < report["total"]
    )


def _processing(
    as_json: bool,
    action: Callable[[], int],
    resume: Callable[[str | None], str],
    *,
    stored: Callable[[], str | None] = lambda: None,
    unlooked: Callable[[], str | None] = lambda: None,
    known: Callable[[], str | None] = lambda: None,
) -> None:
    """:func:`guarded`, plus what Ctrl-C and SIGTERM do to a command that processes a batch.

    The first signal stops the work within seconds (see :mod:`worker.running`) and exits 130
    with one line saying what was given back and how to resume (``resume(batch_id)``); a
    second one exits at once. A signal before the processing began (while the batch was being
    stored, or the run set up) carries no batch: ``stored()`` then says which batch the command
    had stored, if any — by asking the database; when the database does not answer at all
    (the stop ended without it: :class:`worker.running.HangWatch`), ``unlooked()`` says which
    batch it may have stored, without asking. A second signal ends the process on the spot,
    without asking either: its ``--json`` object names the batch being processed, else
    ``known()``, the batch the command has stored (or read) for sure, if any.
    """

    def interruptible() -> int:
        from jobs.errors import DatabaseFullError
        from worker.running import INTERRUPTED_AGAIN, Interrupted, processing_batch, stop_on_signals

        def last_words() -> bytes | None:
            """A second signal's ``--json`` object (:func:`hard_exit_json`)."""
            return hard_exit_json(INTERRUPTED_AGAIN, processing_batch() or known())

        def hung(line: str, batch_id: str | None) -> None:
            """The stop ends without the database, which does not answer (130, one line)."""
            batch_id = batch_id or unlooked()
            _exit_interrupted(Interrupted(line, batch_id=batch_id), as_json, resume(batch_id), locked=True)

        try:
            with stop_on_signals(last_words=last_words if as_json else None, on_hang=hung, again=resume):
                return action()
        except Interrupted as exc:
            exc.batch_id = exc.batch_id or stored()
            _exit_interrupted(exc, as_json, exc.hint or resume(exc.batch_id))
        except DatabaseFullError as exc:  # its one line; steps may still be on their way out
            _exit_now(exc, as_json)

    guarded(as_json, interruptible)


def _exit_now(exc: WanbatchError, as_json: bool) -> NoReturn:
    """:func:`fail`, ending the process at once, as :func:`_exit_interrupted` does: a run the
    database's full disk stopped may leave a download on its way in a worker thread."""
    with contextlib.suppress(SystemExit, StdoutError, ReaderGone):  # no stdout: exit all the same
        fail(exc, as_json)
    _flush_both()
    os._exit(exc.exit_code)


def _flush_both() -> None:
    """Flush stdout and stderr before an ``os._exit``, as far as they can be."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError, ReaderGone):  # closed, full…
            stream.flush()


def _exit_interrupted(exc: Interrupted, as_json: bool, hint: str, *, locked: bool = False) -> NoReturn:
    """Report an interruption and end the process now.

    ``os._exit``, not ``sys.exit``: a download abandoned in a worker thread would otherwise keep
    the interpreter alive (thread pools are joined at exit) for as long as it takes.
    ``locked``: the caller holds :data:`worker.running.exit_lock` already (the hang watch);
    else it is taken here, so one last line is written, never two.
    """
    from worker.running import exit_lock

    if not locked:
        exit_lock.acquire()  # held by the hang watch: it is ending the process, with its line
    line = f"{exc}; {hint}"
    if as_json:
        with contextlib.suppress(StdoutError, ReaderGone):  # stdout unwritable: the line below still
            emit_json({"ok": False, "error": line, "interrupted": True, "batch": exc.batch_id})
    err.print(f"[yellow]{escape(line)}[/yellow]")
    _flush_both()
    os._exit(exc.exit_code)


def _simulate_flag(simulate: bool) -> str:
    """What a suggested command needs after its batch reference to go on as this one did: a
    simulation is processed by ``--simulate`` commands only (:func:`jobs.batches.refuse_other_way`)."""
    return " --simulate" if simulate else ""


#: What :func:`_batch_ref` says of a bare name with nothing readable there (no file, or one
#: that cannot be looked at), and of one where something other than a file is (a folder).
_NO_FILE, _NOT_A_FILE = "no file", "not a file"


def _batch_ref(ref: Path) -> str | None:
    """Whether ``run REF`` may mean a stored batch: None when REF is a manifest (a file, or a
    symlink to one; a path of several parts; a manifest suffix), else :data:`_NO_FILE` or
    :data:`_NOT_A_FILE`.

    A name that cannot be looked at as a file (longer than a file name may be, a symlink loop)
    is no file: it may still name a batch, whose name has no such limit. Nor is a folder (or a
    pipe, a device) of that name a manifest: ``run sw`` beside a folder ``sw/`` resumes batch
    ``sw``; only when no batch has that name is it the manifest's "not a regular file".
    """
    from jobs.fs import file_kind

    if len(ref.parts) != 1 or ref.suffix.lower() in (".yaml", ".yml", ".json"):
        return None
    kind = file_kind(ref)
    if isinstance(kind, OSError):
        return _NO_FILE
    return None if kind == "file" else _NOT_A_FILE


def _ref_name(ref: Path) -> str:
    """The batch reference ``run REF`` names when REF is no file: as typed, its bytes read as
    UTF-8 when they are (what :data:`cli.options.BATCH` does for every other command)."""
    from jobs.batch_names import typed_name

    return typed_name(str(ref))


def _refuse_unknown_ref(ref: Path, settings: Settings) -> None:
    """``run REF`` where REF is neither a file nor a stored batch: say both, before anything else
    (a missing ``FAL_KEY`` said first hid that REF was a typo). Likewise a batch ``wanbatch
    cancel`` ended: its refusal comes before the key's, which only sent the user off to set a key
    to be refused again. Only looks; never resumes. A folder of that name naming no batch either
    is left to the manifest's own error."""
    if _batch_ref(ref) != _NO_FILE:
        return
    from jobs import batches, db, store
    from jobs.errors import NotFoundError, UsageError
    from jobs.fs import shown_path

    try:
        with db.read_scope(db.open_engine(settings)) as session:
            batches.refuse_cancelled(session, store.get_batch(session, _ref_name(ref)), manifest=False)
    except NotFoundError as exc:
        raise UsageError(f"no manifest file '{shown_path(ref)}', and {exc}") from None


def _stored_batch(ref: Path, settings: Settings) -> str | None:
    """The id of the stored batch ``run REF`` names when REF is no file (None: treat it as a manifest).

    ``run BATCH`` resumes a batch that has no manifest of its own to run again (an interrupted
    ``rerun``); never one ``wanbatch cancel`` ended (:func:`jobs.batches.refuse_cancelled`). Only
    a bare name is looked up, so a mistyped manifest path still gets the manifest's "file not
    found", and no database is created for it. A bare name that names no batch was refused
    already (:func:`_refuse_unknown_ref`), unless something other than a file has that name (a
    folder): then it is read as a manifest, which says it is not a regular file.
    """
    kind = _batch_ref(ref)
    if kind is None:
        return None
    from jobs import batches, db, store
    from jobs.errors import NotFoundError
    from jobs.models import BatchState, utcnow

    with db.session_scope(db.open_engine(settings)) as session:
        try:
            target = store.get_batch(session, _ref_name(ref))
        except NotFoundError:
            if kind == _NOT_A_FILE:
                return None
            raise
        # Refusals first: a refused command (exit 2) has changed nothing.
        batches.refuse_other_way(target, simulated=_simulator is not None)
        _refuse_busy(session, target)
        batches.refuse_cancelled(session, target, manifest=False)
        batches.refuse_paused(session, target)
        if target.state == BatchState.PAUSED:  # running it again is the user saying "go on"
            store.resume_batch(session, target.id)
        if note := batches.schedule_over_note(target, utcnow()):  # as `run MANIFEST` warns
            err.print(f"[yellow]warning[/yellow] {escape(note)}")
        if note := batches.manifest_edited_note(target):  # the file edited since: not applied
            err.print(f"[yellow]{escape(note)}[/yellow]")
        return target.id


def _refuse_busy(session: Session, batch: Batch) -> None:
    """What a ``run`` of ``batch`` is refused for (exit 2, nothing changed) while another process
    holds it: a ``refetch`` of it downloading (:func:`jobs.refetch_lock.refuse_refetching`: both
    would write its videos under the same names), or, with ``--simulate``, another simulation
    (:func:`_refuse_simulated_elsewhere`, which claims it otherwise)."""
    from jobs.refetch_lock import refuse_refetching

    refuse_refetching(session, batch)
    _refuse_simulated_elsewhere(session, batch)


def _refuse_simulated_elsewhere(session: Session, batch: Batch) -> None:
    """``--simulate`` of a batch another live process of this host processes: a
    :class:`SimulatedElsewhere` (a :class:`~jobs.errors.UsageError`, exit 2) before anything
    changes; otherwise the batch is claimed for this process, in ``session``'s transaction
    (:func:`worker.steps.dead_leases.claim_simulation`: the check and the claim are one step, so
    of two runs started together exactly one goes on — a run still starting has neither
    heartbeat nor lease, and both ran the batch). The claim holds while this process runs and
    ends with its simulator (:func:`_simulated`). That run's simulator, in its own process,
    holds the requests it sent: this run's would get a copy of those "at fal" now
    (:func:`_resume_at_simulator`) and answer every one sent later "not found", failing jobs
    that were rendering fine. A run that was killed left its claim, heartbeat and leases behind,
    but its pid no longer runs: it holds nothing back (the next run takes over, as ever).
    Without ``--simulate`` nothing is refused: fal holds every run's requests alike."""
    if _simulator is None:
        return
    from jobs import batches
    from jobs.models import utcnow
    from worker.here import queue_origin
    from worker.steps.dead_leases import claim_simulation

    pids = claim_simulation(session, batch.id, queue_origin(_simulator.url), now=utcnow())
    if pids:
        raise SimulatedElsewhere(batches.simulated_elsewhere_line(batch.name, pids[0]), pids)


def _claim_simulation(batch_id: str, settings: Settings) -> None:
    """:func:`_refuse_simulated_elsewhere` in a transaction of its own, for a command that
    processes a stored batch with ``--simulate`` (``run`` claimed it already, with its submit:
    this renews that; ``rerun`` and ``cancel`` claim it here)."""
    from jobs import db, store

    with db.session_scope(db.open_engine(settings)) as session:
        _refuse_simulated_elsewhere(session, store.get_batch(session, batch_id))


def _simulating_elsewhere(batch_id: str, settings: Settings) -> list[int]:
    """The pids of the other live processes of this host that work on ``batch_id`` (one that
    simulates it holds its requests in its own simulator): a look, no claim."""
    from jobs import db
    from jobs.models import utcnow
    from worker.steps.dead_leases import live_runs_here

    with db.read_scope(db.open_engine(settings)) as session:
        return live_runs_here(session, batch_id, now=utcnow())


def _refuse_simulation_early(ref: Path, settings: Settings) -> None:
    """``run NAME`` of a simulation without ``--simulate``: its refusal (and the command that goes
    on) before ``FAL_KEY`` is asked for — without a key, "FAL_KEY is not set" sent a newcomer off
    to get one for a batch that never goes to fal. Read only: :func:`_stored_batch` refuses
    again, and acts, once the settings to process with are known."""
    if _batch_ref(ref) is None:
        return
    from jobs import batches, db, store
    from jobs.errors import NotFoundError

    with db.read_scope(db.open_engine(settings)) as session:
        try:
            batch = store.get_batch(session, _ref_name(ref))
        except NotFoundError:
            return  # a folder of that name, read as a manifest: its own words come later
        batches.refuse_other_way(batch, simulated=False)


def reached_fal(settings: Settings, simulate: bool, *, calls_fal: bool = True) -> list[str]:
    """The fal URLs this process is about to talk to (what the proxy and certificate variables
    are judged for: :func:`cli.output.require_http_environment`): fal's configured ones, or none
    with ``--simulate`` (its own simulator, on loopback over plain HTTP, which no proxy carries),
    with a broker (the workers call fal, with their own variables), or when the work calls fal
    nowhere (``calls_fal``: :func:`_makes_no_fal_call`)."""
    if simulate or settings.broker_url or not calls_fal:
        return []
    return [settings.fal_queue_url, settings.fal_rest_url]


def _makes_no_fal_call(ref: Path, settings: Settings) -> bool:
    """Whether ``run REF`` names a stored batch whose processing makes no call to fal at all
    (:func:`jobs.batches.makes_no_fal_call`: every job has ended, or
    :func:`_ends_without_fal`). Read only; a manifest (which may add jobs) calls fal."""
    from jobs import batches

    return _stored_batch_is(ref, settings, batches.makes_no_fal_call)


def _ends_without_fal(ref: Path, settings: Settings) -> bool:
    """Whether ``run REF`` names a stored batch whose processing makes no call to fal
    (:func:`jobs.batches.ends_without_fal`: past its deadline, only unsent jobs left): the run
    ends those jobs (reason ``deadline``), as ``status`` and ``resume`` advise, without
    ``FAL_KEY``. Read only; a manifest (which may add jobs) always needs the key."""
    from jobs import batches

    return _stored_batch_is(ref, settings, batches.ends_without_fal)


def _stored_batch_is(ref: Path, settings: Settings, judge: Callable[[Any, Any, Any], bool]) -> bool:
    """``judge(session, batch, now)`` of the stored batch ``run REF`` names, in a read; False when
    ``REF`` names none (a manifest, or a folder of that name read as one)."""
    if _batch_ref(ref) is None:
        return False
    from jobs import db, store
    from jobs.errors import NotFoundError
    from jobs.models import utcnow

    with db.read_scope(db.open_engine(settings)) as session:
        try:
            batch = store.get_batch(session, _ref_name(ref))
        except NotFoundError:
            return False  # a folder of that name, read as a manifest
        return judge(session, batch, utcnow())


def _say_collecting(batch_id: str, settings: Settings) -> None:
    """Say, before the progress, that ``run`` of a batch its user paused (or cancelled) only
    collects what was paid for (:func:`jobs.batches.refuse_paused`,
    :func:`jobs.batches.refuse_cancelled` let it through for that): without the line the run
    looked as if it had ignored the pause."""
    from jobs import batches, db, store

    with db.read_scope(db.open_engine(settings)) as session:
        batch = store.get_batch(session, batch_id)
        if cancelled := batches.cancelled_collecting(session, batch):
            line = batches.cancelled_collecting_line(batch.name, cancelled)
        elif collecting := batches.paused_collecting(session, batch):
            line = batches.collecting_line(batch.name, shell_ref(batch.name, batch.id), collecting)
        else:
            return
    err.print(f"[yellow]{escape(line)}[/yellow]")


def _broker_warnings(settings: Settings) -> None:
    """Warn (never fail) when the workers that carry out a recorded change cannot be reached,
    or when those that answer work on another database (no heartbeat in this one)."""
    from jobs.errors import ConfigError
    from worker.running import check_broker, live_workers, no_worker_warning, workers_warning

    try:
        check_broker(settings)
    except ConfigError as exc:
        err.print(f"[yellow]warning: {escape(str(exc))}[/yellow]")
        return
    workers = live_workers(settings)
    if workers == 0:
        err.print(f"[yellow]{no_worker_warning(settings, waiting=False)}[/yellow]")
    elif workers and (warning := workers_warning(settings, workers, waiting=False)) is not None:
        err.print(f"[yellow]{escape(warning)}[/yellow]")


@click.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@json_option
@simulate_option
@progress_option
@allow_dir_option
@take_over_option
def run(
    manifest: Path,
    as_json: bool,
    simulate: bool,
    no_progress: bool,
    allow_dirs: tuple[Path, ...],
    take_over: bool,
) -> None:
    """Submit MANIFEST, then process it until every job is terminal, showing progress.

    Without WANBATCH_BROKER_URL the work runs in this process (embedded) and touches this batch
    only; with one, the `wanbatch worker` processes do it and this waits. Ctrl-C stops within
    seconds (exit 130); run again to resume. MANIFEST may also name a stored batch (`run BATCH`).
    """

    batch = _RunBatch()

    def action() -> int:
        from jobs import batches, database_home
        from jobs.fs import shown_path
        from jobs.settings import get_settings

        settings = get_settings()
        # No database here yet (the default, not created): a name names no stored batch, and
        # nothing looks it up (which would create an empty database just to find nothing).
        fresh = database_home.missing_default(settings) is not None
        if fresh and _batch_ref(manifest) == _NO_FILE:
            no_file = f"no manifest file '{shown_path(manifest)}', and "
            database_home.refuse_missing(settings, [_ref_name(manifest)], prefix=no_file)
        if not fresh:
            _refuse_unknown_ref(manifest, settings)
        if not simulate and not fresh:
            _refuse_simulation_early(manifest, settings)
        # A batch past its deadline with only unsent jobs left: the run ends them, keyless.
        keyless = not simulate and not fresh and _ends_without_fal(manifest, settings)
        # The proxy and certificate variables its clients will read, for the fal it will call.
        calls_fal = not keyless and (fresh or not _makes_no_fal_call(manifest, settings))
        require_http_environment(reached_fal(settings, simulate, calls_fal=calls_fal))
        if simulate or not settings.broker_url:  # this process does the work: enough open files?
            from jobs.open_files import require_open_files

            require_open_files(settings.embedded_concurrency)
            require_usable_cpu(settings.cpu_affinity)
        batches.check_output_dir(settings)  # before anything is stored or sent
        with fal_settings(settings, simulate, keyless=keyless) as target:
            stored = None if fresh else _stored_batch(manifest, target)
            if stored is None:
                result = batches.submit_manifest(
                    manifest,
                    target,
                    allow_dirs,
                    simulated=simulate,
                    refuse_paused_batch=True,
                    refuse=_refuse_busy,
                    take_over=take_over,
                    on_batch=batch.storing,
                )
                if note := result.database_note:  # the default database, made here: said once
                    err.print(escape(note))
                print_warnings(result)
                if note := result.simulation_note():
                    err.print(f"[yellow]{escape(note)}[/yellow]")
                if note := result.moved_note():
                    err.print(f"[yellow]{escape(note)}[/yellow]")
                print_budget_note(result)
                if note := result.schedule_note():
                    err.print(f"[yellow]{escape(note)}[/yellow]")
                stored = result.batch_id
            batch.sure = stored
            _say_collecting(stored, target)
            return _run_and_report(stored, target, as_json, not no_progress, keyless=keyless)

    def again(_batch_id: str | None) -> str:
        return "run the same command again to resume"  # a submit is idempotent: stored or not

    _processing(as_json, action, again, stored=batch.stored, unlooked=batch.known, known=batch.known)


class _RunBatch:
    """The batch ``run`` stores (or reads), for what a signal that comes before its processing
    began reports: ``--json``'s ``batch`` named none while the database held it, pending jobs
    and all. Running the same command again resumes it either way (a submit is idempotent)."""

    def __init__(self) -> None:
        #: Named by ``submit_manifest`` inside its transaction: stored only once that committed.
        self.named: str | None = None
        #: Stored (or read) for sure: ``submit_manifest`` returned it, or ``run BATCH`` names it.
        self.sure: str | None = None

    def storing(self, batch_id: str) -> None:
        """``submit_manifest``'s ``on_batch``: the batch, found or created, not committed yet."""
        self.named = batch_id

    def stored(self) -> str | None:
        """The batch the database holds, asked only when it may be stored and not known to be
        (:func:`_batch_found`); None when it is not, or the database does not answer."""
        if self.sure is None and self.named is not None and _batch_found(self.named):
            self.sure = self.named
        return self.sure

    def known(self) -> str | None:
        """The batch stored for sure, without asking the database."""
        return self.sure


@click.command()
@click.argument("batch", type=BATCH)
@click.option("--failed-only", is_flag=True, help="Only the jobs that ended failed or cancelled.")
@click.option("--new-seeds", is_flag=True, help="Draw fresh seeds instead of reusing the returned ones.")
@click.option(
    "--max-usd",
    "max_usd",
    default=None,
    metavar="AMOUNT",
    help="Budget cap of the new batch in USD (default: the parent's cap).",
)
@click.option(
    "--vary",
    "vary",
    multiple=True,
    metavar="FIELD=VALUES",
    help="Sweep an input field over a comma list (resolution=480p,720p) or an integer range "
    "(seed=1..8): every job once per value, the rest exact. Repeatable: the product.",
)
@click.option(
    "--pay-again",
    is_flag=True,
    help="With --failed-only: also send the jobs an earlier rerun already rendered, or still "
    "renders, with the same input (left out by default: they would be paid for twice).",
)
@click.option(
    "--now",
    "send_now",
    is_flag=True,
    help="Send the new batch at once: no window, deadline or not_before (by default a rerun "
    "keeps the parent's daily window and waits for it).",
)
@json_option
@simulate_option
@progress_option
def rerun(
    batch: str,
    failed_only: bool,
    new_seeds: bool,
    max_usd: str | None,
    vary: tuple[str, ...],
    pay_again: bool,
    send_now: bool,
    as_json: bool,
    simulate: bool,
    no_progress: bool,
) -> None:
    """A new batch from BATCH, processed like `run`: by default the exact inputs and returned seeds.

    `--vary FIELD=VALUES` sweeps a field (values checked against each endpoint's schema first).
    With `--failed-only` and no failed or cancelled job, it says so and creates nothing (exit 0).
    `--failed-only` leaves out jobs an earlier rerun already rendered, or an unfinished one still
    renders, with the same input (it names that rerun) unless `--pay-again`.
    A rerun keeps the parent's daily window (and waits for it when closed): `--now` sends it at once,
    and is refused (exit 2) while an earlier rerun of the same jobs waits for its window: cancel it first.
    """

    new = _NewRerun(simulate)

    def action() -> int:
        from jobs import batches, database_home, estimates
        from jobs.models import utcnow
        from jobs.rerun import NothingToRerun, rerun_batch, rerun_wait_note
        from jobs.settings import get_settings
        from jobs.vary import parse_varies

        cap = None if max_usd is None else batches.parse_usd(max_usd)  # one-line UsageError
        settings = get_settings()
        # The syntax, and no FAL_KEY in any option; the values are checked per endpoint by rerun_batch.
        sweeps = parse_varies(vary, estimates.fal_keys(settings))
        database_home.refuse_missing(settings, [batch])  # no empty database made to say so
        # The proxy and certificate variables its clients will read, for the fal it will call.
        require_http_environment(reached_fal(settings, simulate))
        if simulate or not settings.broker_url:  # this process does the work: enough open files?
            from jobs.open_files import require_open_files

            require_open_files(settings.embedded_concurrency)
            require_usable_cpu(settings.cpu_affinity)
        batches.check_output_dir(settings)  # before anything is stored or sent
        options: dict[str, Any] = {
            "failed_only": failed_only,
            "new_seeds": new_seeds,
            "max_usd": cap,
            "vary": sweeps,
            "pay_again": pay_again,
            "send_now": send_now,
        }
        # FAL_KEY is required once the rerun is known to send something (before_storing), not
        # here: `--failed-only` of a batch with nothing failed answers "nothing to rerun" (exit
        # 0) without a key, as it does with `--simulate` (whose target holds the simulator's).
        with fal_settings(settings, simulate, keyless=True) as target:
            try:
                result = rerun_batch(
                    batch,
                    settings=target,
                    simulated=simulate,
                    on_batch=new.storing,
                    before_storing=target.require_fal_key,
                    **options,
                )
            except NothingToRerun as nothing:  # not an error: say so, create nothing
                if as_json:
                    emit_json({"ok": True, "batch": None, "total": 0, "counts": {}, "message": str(nothing)})
                else:
                    say(escape(str(nothing)))
                return nothing.exit_code
            new.committed = result.batch_id
            print_warnings(result)
            print_budget_note(result)
            if note := rerun_wait_note(result, utcnow()):
                err.print(f"[yellow]{escape(note)}[/yellow]")
            again = f"run `{new.run_command(result.batch_id)}`"  # never `rerun` again: another batch
            return _run_and_report(result.batch_id, target, as_json, not no_progress, again=again)

    _processing(as_json, action, new.hint, stored=new.stored, unlooked=new.unlooked, known=new.known)


class _NewRerun:
    """The batch a ``rerun`` makes, for the line Ctrl-C prints: how to go on with it.

    ``rerun_batch`` names it (:meth:`storing`) before its jobs are stored, in the same
    transaction, so a signal can land before, during or after the commit. Only a look at the
    database then tells "stored: `wanbatch run NAME` resumes it" from "nothing was stored":
    "run the same command again" after the commit would store a second batch of the same jobs,
    paid twice if both run.
    """

    def __init__(self, simulate: bool) -> None:
        self.simulate = simulate
        self.batch_id: str | None = None
        self.name = ""
        #: Set once :meth:`stored` looked: True when the database could not say (not stored
        #: is ``batch_id`` None then).
        self.unsure = False
        #: The new batch once ``rerun_batch`` returned it: stored for sure.
        self.committed: str | None = None

    def storing(self, batch_id: str, name: str) -> None:
        """``rerun_batch``'s ``on_batch``: the new batch, not committed yet."""
        self.batch_id, self.name = batch_id, name

    def stored(self) -> str | None:
        """The new batch's id when it may be stored (found, or the database did not answer);
        asked only of a signal that came before the batch was being processed."""
        if self.batch_id is not None:
            found = _batch_found(self.batch_id)
            self.unsure = found is None
            if found is False:  # its transaction was rolled back: nothing was stored
                self.batch_id = None
        return self.batch_id

    def unlooked(self) -> str | None:
        """The new batch's id when it may be stored, without asking the database (it does not
        answer): unsure from the moment it was named."""
        self.unsure = self.batch_id is not None
        return self.batch_id

    def known(self) -> str | None:
        """The new batch when it is stored for sure, without asking the database."""
        return self.committed

    def hint(self, batch_id: str | None) -> str:
        """How to go on: run the stored batch (never ``rerun`` again), or start over."""
        if batch_id is None:
            return "nothing was stored (no new batch); run the same command again to start over"
        command = f"`{self.run_command(batch_id)}`"
        again = "(running `rerun` again would start another)"
        if self.unsure:
            found = f"if `wanbatch status {self.ref(batch_id)}` finds it, {command} resumes it"
            return f"the new batch may have been stored: {found} {again}"
        return f"{command} resumes the new batch {again}"

    def ref(self, batch_id: str) -> str:
        """What the user types for the batch: a reference `run` reads as this batch (never the
        32-character id)."""
        return shell_ref(self.name if batch_id == self.batch_id else "", batch_id)

    def run_command(self, batch_id: str) -> str:
        """The command that goes on with the new batch: ``run`` of it, with `--simulate` for a
        simulation, which `run` refuses to go on with otherwise."""
        return f"wanbatch run {self.ref(batch_id)}{_simulate_flag(self.simulate)}"


def _batch_found(batch_id: str) -> bool | None:
    """Whether the database holds the batch ``batch_id``; None when it could not be asked."""
    from sqlalchemy.exc import SQLAlchemyError

    from jobs import db, store
    from jobs.errors import NotFoundError, WanbatchError
    from jobs.settings import get_settings

    try:
        with db.read_scope(db.open_engine(get_settings())) as session:
            store.get_batch(session, batch_id)
    except NotFoundError:
        return False
    except (SQLAlchemyError, WanbatchError):  # what to check is said instead
        return None
    return True


@click.command()
@click.argument("batch", type=BATCH)
@json_option
@simulate_option
@progress_option
@click.option(
    "--abandon-other-key",
    is_flag=True,
    help="Also write off the requests sent with another FAL_KEY than this one that fal does not "
    "know for this key (each is asked about first; one fal answers is the same account's, "
    "followed and cancelled as the rest): they end failed, left at fal unfollowed, their "
    "estimate counted as possibly billed.",
)
def cancel(batch: str, as_json: bool, simulate: bool, no_progress: bool, abandon_other_key: bool) -> None:
    """Stop BATCH: pending jobs are never submitted, queued ones are cancelled at fal.

    Embedded, this waits until every job is terminal; with workers, they finish the cancel.
    """

    #: The batch's name by id, for the hint an interruption prints.
    names: dict[str, str] = {}

    def action() -> int:
        from jobs import batches, database_home
        from jobs.settings import get_settings

        settings = get_settings()
        database_home.refuse_missing(settings, [batch])  # no empty database made to say so
        # The proxy and certificate variables its clients will read, for the fal it will call.
        require_http_environment(reached_fal(settings, simulate))
        refuse_simulate_with_broker(settings, simulate)  # before anything changes
        if abandon_other_key:
            _refuse_abandon_without_key(settings, simulate)
        # The one cancel the dashboard's makes too; what it refuses (exit 2) it refuses unchanged.
        done = batches.cancel_batch(batch, settings, by="cli", simulate=simulate)
        batch_id = done.batch_id
        names[batch_id] = done.name
        if done.manifest_elsewhere_note:  # another machine's project: said first, whose and where
            err.print(f"[yellow]{escape(done.manifest_elsewhere_note)}[/yellow]")

        def reported() -> int:
            report = batches.status(batch_id, settings, policy=settings.submit_unknown_policy)[0]
            emit_json(report) if as_json else print_summary(report, distributed=bool(settings.broker_url))
            return final_code(report)  # 1: jobs were cancelled (or are still being cancelled at fal)

        if abandon_other_key:
            abandoned = _abandon_other_key(batch_id, settings)
            done = replace(
                done, at_fal=max(0, done.at_fal - abandoned), unfinished=max(0, done.unfinished - abandoned)
            )
            if abandoned and not done.unfinished:
                return reported()

        if not done.changed and not done.unfinished:  # nothing left to stop: a finished batch stays `done`
            why = "has finished" if done.finished else "was already cancelled"
            err.print(f"nothing to cancel: batch {escape(done.name)} ({short_id(batch_id)}) {why}")
            return reported()
        # What fal does not hold has ended; the rest needs a cancel call each, made by the tick
        # (queued ones first, newest first: they are free).
        ended = batches.cancelled_at_once(done.at_once)
        earlier = ""
        if done.already_cancelled:  # a cancel stopped half-way (or still at it elsewhere)
            earlier = " (the batch was already cancelled: this finishes that cancel)"
        # With workers, the requests of another key fal already refused to their key (noted in
        # the database) are not being cancelled there: named, exit 2, as an embedded cancel ends.
        stranded = _refused_at_fal(batch_id, settings) if settings.broker_url else []
        at_fal = max(0, done.at_fal - sum(1 for n in stranded if n.at_fal))
        err.print(f"cancel: {escape(ended)}; {at_fal} at fal being cancelled there{earlier}")
        if (waiting := batches.outputs_waiting_line(done)) is not None:
            err.print(escape(waiting))  # what the cancel waits for, never minutes in silence
        if settings.broker_url:
            _broker_warnings(settings)  # the cancel is recorded; the workers carry it out
            if stranded:
                return _stranded_cancel(batch_id, settings, [n.stranded for n in stranded], as_json)
            return reported()
        if done.unfinished == 0:
            return reported()
        if simulate:
            return _cancel_simulated(done.name, batch_id, settings, as_json, not no_progress, reported)
        with fal_settings(settings, simulate, check=False) as target:
            return _run_and_report(batch_id, target, as_json, not no_progress, command="cancel")

    def again(batch_id: str | None) -> str:
        # The batch as `shell_ref` names it (what the user typed may have needed quotes), and
        # `--simulate` for a simulation, which `cancel` refuses to go on with otherwise.
        known = batch_id or next(iter(names), None)
        if known is None:  # stopped before the batch was read
            return "run the same command again to finish cancelling"
        ref = shell_ref(names.get(known, ""), known)
        return f"run `wanbatch cancel {ref}{_simulate_flag(simulate)}` again to finish cancelling"

    def read() -> str | None:
        """The batch the cancel has read (and recorded its cancel for), if it got that far."""
        return next(iter(names), None)

    _processing(as_json, action, again, stored=read, unlooked=read, known=read)


def _abandon_other_key(batch_id: str, settings: Settings) -> int:
    """``cancel --abandon-other-key``, once the batch is cancelled: fal is asked about each of
    its requests sent with another API key, with this key (:func:`worker.abandon.ask_about_other_keys`);
    those it answers (the same fal account's) are followed with this key and cancelled (or
    downloaded) as the rest of the batch; those it refuses to this key are written off
    (:func:`jobs.batches.abandon_other_key`); those it could not be asked about are left. Says
    each (stderr); how many were written off."""
    from jobs import batches
    from worker.abandon import ask_about_other_keys
    from worker.here import queue_origin
    from worker.limits import api_key_id

    mine = api_key_id(settings)
    origin = queue_origin(settings.fal_queue_url)
    asked = ask_about_other_keys(batch_id, settings, key_id=mine, origin=origin)
    abandoned = batches.abandon_other_key(batch_id, settings, key_id=mine, origin=origin, by="cli")
    err.print(
        f"cancel: {abandoned} request(s) sent with another API key than this one (key id "
        f"{mine}) written off, fal not knowing them for this key: failed, left at fal unfollowed "
        "(fal may still run and bill them), their estimate counted as possibly billed"
    )
    if asked.answered:
        err.print(
            f"cancel: {asked.answered} request(s) sent with another API key were answered for this "
            "key (the same fal account): followed with it and cancelled with the rest of the batch "
            "(one fal finished is downloaded), not written off"
        )
    if asked.unanswered:
        err.print(
            f"[yellow]cancel: fal could not be asked about {asked.unanswered} request(s) sent with "
            "another API key (no answer): left as they were, not written off; run the command "
            "again to ask again[/yellow]"
        )
    return abandoned


@dataclass(frozen=True, slots=True)
class _RefusedAtFal:
    """A request of another key fal refused to the workers' key, and whether it is at fal
    (``queued``/``running``: counted among those "being cancelled there")."""

    stranded: Stranded
    at_fal: bool


def _refused_at_fal(batch_id: str, settings: Settings) -> list[_RefusedAtFal]:
    """The requests of batch ``batch_id`` that fal refused to the workers' key (noted in the
    database by the worker that asked: :func:`jobs.store.refused_requests`; every worker has
    one key, taken to be this process's, or any when it has none)."""
    from jobs import db, store
    from jobs.db import open_engine
    from jobs.states import AT_PROVIDER_STATES
    from worker.limits import api_key_id
    from worker.stranded import Stranded

    key = api_key_id(settings) if settings.fal_key and settings.fal_key.get_secret_value() else None
    with db.read_scope(open_engine(settings)) as session:
        refused = store.refused_requests(session, batch_id, key_id=key)
        heads = store.job_heads(session, {r.job_id for r in refused})
    return [
        _RefusedAtFal(
            Stranded(r.job_id, r.request_id, r.sent_with, r.key_id),
            (head := heads.get(r.job_id)) is not None and head.state in AT_PROVIDER_STATES,
        )
        for r in refused
    ]


def _stranded_cancel(batch_id: str, settings: Settings, stranded: list[Stranded], as_json: bool) -> int:
    """A cancel with workers of a batch some of whose requests fal refused to the workers' key:
    the status report with the line naming them and the ways out (:func:`stranded_line`), exit 2
    — what an embedded cancel ends with once only such requests are left."""
    from jobs import batches

    report = batches.status(batch_id, settings, policy=settings.submit_unknown_policy)[0]
    extra: dict[str, object] = {}
    _say_stranded(stranded, report_ref(report), settings, extra)
    if as_json:
        emit_json({**report, **extra})
    else:
        print_summary(report, distributed=True)
    return EXIT_USAGE


def _refuse_abandon_without_key(settings: Settings, simulate: bool) -> None:
    """``cancel --abandon-other-key`` writes off the requests sent with another key than this
    process's: it needs one (exit 2 without), and none with ``--simulate`` (a simulation's
    requests are all its simulator's key's)."""
    from jobs.errors import ConfigError

    if simulate:
        raise UsageError(
            "--abandon-other-key is not for --simulate: a simulation's requests are all sent with "
            "its simulator's key; nothing was cancelled"
        )
    if not (settings.fal_key and settings.fal_key.get_secret_value()):
        raise ConfigError(
            "FAL_KEY is not set: --abandon-other-key writes off the requests sent with another API "
            "key than this process's, so it needs the key; nothing was cancelled"
        )


#: How often (s) ``cancel --simulate`` looks whether the process it leaves the cancel to still runs.
SIMULATING_LOOK_SECONDS = 1.0


def _cancel_simulated(
    name: str, batch_id: str, settings: Settings, as_json: bool, progress: bool, reported: Callable[[], int]
) -> int:
    """``cancel --simulate`` once the cancel is recorded: the requests at fal are cancelled by
    the simulator that holds them.

    When another live process of this host simulates the batch (its own simulator accepted its
    requests: one here, given a copy of those "at fal" now, knew nothing of those it sent later,
    answered them 404, and their jobs failed "provider lost the request"), that run's dispatch
    sees the cancel and cancels them at its simulator: this one watches until the batch ends, as
    a ``cancel`` of a batch for fal follows it until every job is terminal, then reports (exit 1:
    jobs were cancelled). Should that process end first, or none simulate the batch, this one
    claims the batch and cancels there itself, with its own simulator."""
    while True:
        pids = _simulating_elsewhere(batch_id, settings)
        if not pids:
            try:
                with fal_settings(settings, True, check=False) as target:
                    return _run_and_report(batch_id, target, as_json, progress, command="cancel")
            except SimulatedElsewhere as exc:  # a run claimed it meanwhile: it cancels there
                pids = exc.pids
        if _watch_simulation(name, batch_id, settings, pids[0], progress):
            return reported()
        err.print(
            f"cancel: process {pids[0]} ended before batch {escape(name)} did: "
            "this cancel goes on with its own simulator"
        )


def _watch_simulation(name: str, batch_id: str, settings: Settings, pid: int, progress: bool) -> bool:
    """Watch the batch process ``pid`` simulates until it ends (True) or no other live process
    works on it any more (False), said first (:func:`_cancel_simulated`)."""
    from worker.running import watch_batch

    err.print(
        f"cancel: batch {escape(name)} is being simulated by process {pid} on this host, whose own "
        "simulator holds its requests: that run cancels them there; watching until the batch ends"
    )
    looked = time.monotonic()

    def still() -> bool:
        nonlocal looked
        if time.monotonic() - looked < SIMULATING_LOOK_SECONDS:
            return True
        looked = time.monotonic()
        return bool(_simulating_elsewhere(batch_id, settings))

    ref = shell_ref(name, batch_id)
    return watch_batch(
        batch_id,
        settings,
        console=err,
        show_progress=progress,
        still=still,
        stopped=f"stopped watching batch {name}: process {pid} goes on cancelling it",
        hint=f"`wanbatch status {ref}` follows it; running the same command again watches it",
    )


def _pause_or_resume(batch: str, paused: bool, as_json: bool) -> None:
    def action() -> int:
        from jobs import batches, database_home
        from jobs.settings import get_settings

        database_home.refuse_missing(get_settings(), [batch])  # no empty database made to say so
        result = batches.set_paused(batch, paused, get_settings())
        if result.manifest_elsewhere_note:  # another machine's project: whose, and where
            err.print(f"[yellow]{escape(result.manifest_elsewhere_note)}[/yellow]")
        if as_json:
            emit_json(result.as_dict())
        else:
            out.print(escape(result.message))
        return EXIT_OK

    guarded(as_json, action)


@click.command()
@click.argument("batch", type=BATCH)
@json_option
def pause(batch: str, as_json: bool) -> None:
    """Stop sending new jobs of BATCH (id, id prefix or name); jobs in flight finish and download.

    Every worker on every host stops sending at its next dispatch round. `wanbatch resume BATCH`
    goes on; `cancel` is still what ends a batch.
    """
    _pause_or_resume(batch, True, as_json)


@click.command()
@click.argument("batch", type=BATCH)
@json_option
def resume(batch: str, as_json: bool) -> None:
    """Go on sending the jobs of BATCH (id, id prefix or name) after `wanbatch pause`.

    A batch paused because fal refused the account, or because its outputs could not be written,
    stays paused (the line says so): `wanbatch run BATCH` or submitting its manifest again resumes that.
    """
    _pause_or_resume(batch, False, as_json)
