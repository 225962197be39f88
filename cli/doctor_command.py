"""``wanbatch doctor``: check this host's setup, one line per piece, each with what to fix.

The checks themselves are :mod:`worker.doctor` (plain functions, usable from tests and the
dashboard); this module only prints them — a table for people, one JSON object with ``--json``
— and exits 0 when every check is ok or skipped, 1 otherwise.
"""

from __future__ import annotations

import click

from cli.options import json_option
from cli.output import EXIT_OK, EXIT_SOME_FAILED, emit_json, guarded, out, say, width, working

#: How each status is marked for people.
MARKS = {"ok": "[green]✓[/green]", "fail": "[red]✗[/red]", "skip": "[dim]-[/dim]"}


@click.command()
@json_option
@click.option(
    "--simulate",
    is_flag=True,
    help="Check the setup of `--simulate` runs: no FAL_KEY, broker or receiver needed.",
)
def doctor(as_json: bool, simulate: bool) -> None:
    """Check the configuration, database, broker and workers, provider and key, output storage
    and webhook receiver; say what to fix. Exit 0 when all is well, 1 otherwise.
    With `--simulate`, what `run --simulate` needs (no key: the provider check is skipped).

    Nothing is changed, submitted or billed: the key is proven with the status of a request id
    that cannot exist, the output storage with a probe file that is removed at once.
    """

    def action() -> int:
        from rich.text import Text

        from worker.doctor import run_checks

        with working("checking the database, broker, provider, storage and receiver …"):
            checks = run_checks(simulate=simulate)
        failed = [c for c in checks if c.status == "fail"]
        code = EXIT_SOME_FAILED if failed else EXIT_OK
        if as_json:
            emit_json({"ok": not failed, "checks": [c.as_dict() for c in checks]})
            return code
        indent = 2 + max(len(c.name) for c in checks) + 1
        room = max(width() - indent, 20)
        for check in checks:
            lines = Text(check.detail).wrap(out, room)
            if check.fix:
                lines.extend(Text.assemble(("fix: ", "yellow"), check.fix).wrap(out, room))
            for number, line in enumerate(lines):
                line.rstrip()
                lead = (
                    f"{MARKS[check.status]} [bold]{check.name:<{indent - 3}}[/bold] " if number == 0 else ""
                )
                out.print(Text.from_markup(lead) + line if lead else Text(" " * indent) + line)
        if failed:
            say(f"[red]{len(failed)} problem(s)[/red]: see the fix lines above")
        else:
            say("[green]all well[/green]")
        return code

    guarded(as_json, action)
