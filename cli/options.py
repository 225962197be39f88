"""Options that several ``wanbatch`` commands share, so each is spelled and explained once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click


def batch_reference(value: str) -> str:
    """The type of every command-line argument that names a stored batch (its name, id or id
    prefix): as typed, its bytes read as UTF-8 when they are (:func:`jobs.batch_names.typed_name`),
    whatever the session's locale. ``LC_ALL=C`` made ``wanbatch status mañana`` look for
    ``ma\\udcc3\\udcb1ana``: no such batch. (A plain function, not a ``click.ParamType``
    subclass: that class is generic from click 8.4 on, and wanbatch takes click 8.1.)"""
    from jobs.batch_names import typed_name

    return typed_name(value)


#: ``type=BATCH`` on every argument that names a stored batch.
BATCH = batch_reference

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
simulate_option = click.option(
    "--simulate",
    is_flag=True,
    help="Start the bundled fal simulator and send every request to it (no FAL_KEY needed, nothing billed).",
)
take_over_option = click.option(
    "--take-over",
    is_flag=True,
    help=(
        "The manifest is the stored batch's project moved here (another folder or machine): take "
        "the batch even though its old manifest may still be there or leaves out jobs of it (not "
        "while a run of it on the other machine is alive: one that beat within WANBATCH_LEASE_SECONDS)."
    ),
)
progress_option = click.option(
    "--no-progress",
    is_flag=True,
    help="Do not show progress (the bar, or plain lines when stderr is not a terminal).",
)


def manifest_command(command: Callable[..., None]) -> click.Command:
    """A command on one ``MANIFEST`` that takes ``--json`` and ``--allow-dir``."""
    return click.command()(manifest_argument(json_option(allow_dir_option(command))))
