"""The default database's place, and a look for another one before a new one is made.

Without ``WANBATCH_DATABASE_URL`` the database is ``./.wanbatch/wanbatch.db``: relative to the
folder a command runs in. Run from another folder, ``wanbatch submit proj/m.yaml`` silently
started a new, empty database there and stored (and ``run`` sent, and paid for) every job of a
batch another database already held. So, only while the default is in use and its file does
not exist yet, the commands look for ``.wanbatch/wanbatch.db`` in the manifest's folder and its
parents (or, for a command that reads a batch by name, the current folder's parents), as git
looks for its repository. Both as the user names them (through symlinks: ``proj/shots`` a symlink
to ``real/shots`` is in ``proj``; a relative path from ``$PWD``) and as the folders they are:
walking the resolved path alone, ``cd proj/shots && wanbatch submit m.yaml`` never found
``proj/.wanbatch`` and stored (and ``run`` would have paid for) the batch again.

* ``submit`` / ``run MANIFEST`` (:func:`before_creating`): a database found there that holds a
  batch of the manifest's name is a refusal (one line, exit 2; nothing created) — unless
  ``--simulate``, which spends nothing: a note then. One without that batch is a note. The new
  database is always said once (:attr:`DatabaseHome.note`).
* the commands that read a batch by name (:func:`refuse_missing`): one line naming the file
  looked at (and the one found above), never an empty database created just to say "no batch".

Every path these lines show is masked as an error line is (:func:`_shown`): a folder named after
FAL_KEY was printed in clear by the note of a command that succeeded.

Cheap: a few ``stat`` calls, and one short read-only SQLite connection when a candidate exists.
Nothing here migrates, writes or creates anything; a candidate that cannot be read (an old
schema, a locked or unreadable file, not SQLite at all) is a database found, its batches unknown.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from jobs.db import sqlite_holds_batch
from jobs.errors import NotFoundError, UsageError
from jobs.printable import one_line
from jobs.redaction import masked_error
from jobs.settings import DEFAULT_STATE_DIR, DatabaseSettings

#: The default database's file, relative to the current folder (``DatabaseSettings.database_url``'s default).
DEFAULT_DATABASE = DEFAULT_STATE_DIR / "wanbatch.db"
#: How it is shown: where it is, relative to the folder the command runs in.
SHOWN = f"./{DEFAULT_DATABASE.as_posix()}"
#: The most folders looked at above the start (a bound, whatever the depth of the tree).
MAX_LEVELS = 32


def default_database(settings: DatabaseSettings) -> Path | None:
    """The default database's file when ``WANBATCH_DATABASE_URL`` is not set, else None
    (set to anything, the default's path included, is the user's choice: nothing is looked for)."""
    if "database_url" in settings.model_fields_set:
        return None
    return DEFAULT_DATABASE


def missing_default(settings: DatabaseSettings) -> Path | None:
    """The default database's file when it is in use and does not exist yet (a command that
    opens it creates it), else None."""
    path = default_database(settings)
    if path is None or os.path.lexists(path):
        return None
    try:
        Path.cwd()
    except OSError:  # the current folder is gone: opening the database says so, as it always did
        return None
    return path


Identity = tuple[int, int]


def _identity(path: Path | str) -> Identity | None:
    """The folder (or file) ``path`` is, whatever path leads to it (device and inode; None:
    it cannot be looked at)."""
    try:
        info = Path(path).stat()
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def _ceilings() -> tuple[set[Path], Identity | None]:
    """The user's home folder, where the look upwards stops: as ``$HOME`` names it and as it
    resolves (a walk through symlinks meets the one, a walk of the physical folders the other),
    and the folder it is, however a walk reaches it (empty, None: unknown)."""
    with contextlib.suppress(RuntimeError, KeyError, OSError, ValueError):
        home = Path.home()
        return {Path(os.path.normpath(home)), home.resolve()}, _identity(home)
    return set(), None


def logical_cwd() -> Path | None:
    """The current folder as the shell names it: ``$PWD`` (a symlink's path, not the folder it
    points to), when it is absolute and names the folder this process runs in (a program may
    change folder without changing ``$PWD``); None else."""
    pwd = os.environ.get("PWD", "")
    if not pwd or not Path(pwd).is_absolute():
        return None
    here = _identity(".")
    if here is None or _identity(pwd) != here:
        return None
    return Path(os.path.normpath(pwd))


def _walks_from(start: Path) -> list[Path]:
    """Where the look upwards from ``start`` begins: ``start`` as typed (made absolute against
    :func:`logical_cwd`, ``..`` taken as the shell takes it, symlinks kept: ``proj/shots`` is in
    ``proj``) and as the folder it is (symlinks resolved, as the batch records its manifest:
    ``real/shots``); once when they are the same."""
    walks: list[Path] = []
    base = logical_cwd() if not start.is_absolute() else None
    with contextlib.suppress(OSError, ValueError):
        walks.append(Path(os.path.normpath(base / start if base is not None else start.absolute())))
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        walks.append(start.resolve())
    return list(dict.fromkeys(walks))


def database_above(*starts: Path) -> Path | None:
    """The nearest ``.wanbatch/wanbatch.db`` in each of ``starts`` and their parents, both as
    typed (through symlinks) and as the folders they are (:func:`_walks_from`), up to the user's
    home folder (included, however it is reached) or the filesystem root, at most
    :data:`MAX_LEVELS` up; never the current folder's own (it is the one about to be made).

    The walks go up side by side, a level at a time (the nearest wins; the one typed first at
    a level); a folder one walk has looked at ends any other walk that reaches it."""
    here = _identity(".")
    names, home = _ceilings()
    walks = list(dict.fromkeys(walk for start in starts for walk in _walks_from(start)))
    looked: set[Path] = set()
    for _ in range(MAX_LEVELS + 1):
        going: list[Path] = []
        for folder in walks:
            if folder in looked:
                continue  # another walk came this way: it goes on from here
            looked.add(folder)
            identity = _identity(folder)
            if identity is not None and identity != here:
                candidate = folder / DEFAULT_DATABASE
                with contextlib.suppress(OSError):
                    if candidate.is_file():
                        return candidate
            at_home = folder in names or (identity is not None and identity == home)
            if not at_home and folder.parent != folder:
                going.append(folder.parent)
        if not going:
            return None
        walks = going
    return None


def database_above_cwd() -> Path | None:
    """:func:`database_above` the current folder: its parents as the shell names them
    (:func:`logical_cwd`) and as they are."""
    logical = logical_cwd()
    return database_above(*([logical.parent] if logical is not None else []), Path.cwd().parent)


def _shown(path: Path) -> str:
    """A path for a message: whole (it is to be copied), on one line, inert (:func:`one_line`),
    and with FAL_KEY masked (:func:`jobs.redaction.masked_error`), as every error line is: a
    folder named after the key is printed by the note of a command that succeeds, which no
    error masking passes over. Every path of every line made here comes through here."""
    return masked_error(one_line(str(path)))


def _url(path: Path) -> str:
    """The ``WANBATCH_DATABASE_URL`` of a SQLite file, absolute."""
    return f"sqlite:///{_shown(path.absolute())}"


def _home_of(database: Path) -> str:
    """The folder a database's ``.wanbatch`` folder is in: where to run from to use it."""
    return _shown(database.absolute().parent.parent)


@dataclass(frozen=True, slots=True)
class DatabaseHome:
    """What :func:`before_creating` found: the default database about to be made, and the one
    found above it (if any) that holds the batch or not."""

    #: The default database's file (relative to the current folder), about to be created.
    new: Path
    #: The nearest database found above (None: none).
    other: Path | None = None
    #: Whether ``other`` holds the batch (None: none found, or not known).
    holds: bool | None = None
    #: The batch's name in the manifest.
    name: str = ""

    @property
    def note(self) -> str:
        """The one line saying the new database is made, and where the other one is."""
        new = f"new database {SHOWN} ({_shown(self.new.absolute())})"
        if self.other is None:
            return f"{new}: the default, in the current folder (WANBATCH_DATABASE_URL chooses another)"
        use = f"run from {_home_of(self.other)}, or set WANBATCH_DATABASE_URL={_url(self.other)}, to use it"
        if self.holds:
            return f"{new}, though batch {self.name!r} is stored in {_shown(self.other)}: {use}"
        return f"{new}, while another database exists at {_shown(self.other)}: {use}"

    def refusal(self) -> str:
        """The one line refusing to store again, in a new database, a batch the other one holds."""
        assert self.other is not None, "refused only for a database found"
        return (
            f"batch {self.name!r} is stored in {_shown(self.other)}, but WANBATCH_DATABASE_URL is not "
            f"set and this command would start a new, empty database {SHOWN} here "
            f"({_shown(self.new.absolute())}) and send every job again: run from "
            f"{_home_of(self.other)}, or set WANBATCH_DATABASE_URL={_url(self.other)} "
            f"(or ={_url(self.new)} to start afresh here)"
        )


def before_creating(
    settings: DatabaseSettings, manifest: Path, name: str, *, refuse: bool = True
) -> DatabaseHome | None:
    """Before the default database is created for a manifest's batch ``name``: None when there
    is nothing to say (``WANBATCH_DATABASE_URL`` set, or the default database exists already);
    else what was found above the manifest's folder (:class:`DatabaseHome`, whose ``note`` the
    command prints once the database is made). ``refuse``: a database found there that holds
    the batch is a :class:`~jobs.errors.UsageError` (exit 2), raised before anything is created."""
    new = missing_default(settings)
    if new is None:
        return None
    other = database_above(manifest.parent)
    holds = sqlite_holds_batch(other, name) if other is not None else None
    home = DatabaseHome(new=new, other=other, holds=holds, name=name)
    if holds and refuse:
        raise UsageError(home.refusal())
    return home


def refuse_missing(settings: DatabaseSettings, names: Iterable[str], *, prefix: str = "") -> None:
    """For a command that reads batches by name: while the default database is in use and does
    not exist, a :class:`~jobs.errors.NotFoundError` (exit 2) naming the file looked at, and the
    database found in a parent folder if any — instead of an empty database made just to find
    no batch in it (whose existence then kept ``submit`` from looking for the real one).
    ``prefix`` goes before the line (``run NAME``: "no manifest file 'NAME', and ")."""
    path = missing_default(settings)
    wanted = list(names)
    if path is None or not wanted:
        return
    raise NotFoundError(prefix + no_database_line(path, wanted[0]))


def no_database_line(path: Path, name: str | None) -> str:
    """``no batch NAME`` (or ``no batches``) where the default database does not exist, with the
    database found in a parent folder of the current one, if any."""
    what = f"no batch '{one_line(name)}'" if name is not None else "no batches"
    line = (
        f"{what}: no database here ({SHOWN} does not exist in {_shown(Path.cwd())}; "
        "without WANBATCH_DATABASE_URL the database is in the current folder)"
    )
    other = database_above_cwd()
    if other is None:
        return f"{line}: run from the folder you submitted from, or set WANBATCH_DATABASE_URL"
    return (
        f"{line}; there is one at {_shown(other)}: run from {_home_of(other)}, or set "
        f"WANBATCH_DATABASE_URL={_url(other)}"
    )
