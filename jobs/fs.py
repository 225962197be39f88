"""Why a local path cannot be used, in the operating system's own words — never a guess.

``Path.exists()`` and ``Path.is_file()`` raise for some errors (a name longer than the file
system allows, a folder the user may not search) and answer False for others (missing, a
symlink loop). A caller that asks them either crashes with a traceback, or calls a file that is
there but unreadable, or a link that leads back to itself, "not found". :func:`file_kind`
looks once and keeps the error; :func:`os_reason` says what it means; :func:`path_error` is the
one line for an OSError about a path that nothing else explained.

:func:`file_mode` and :func:`folder_mode` are the permissions a plain ``open()`` or ``mkdir()``
would give (0666 or 0777 less the umask): what a file wanbatch makes through ``mkstemp`` (always
0600) or ``mkdtemp`` (0700) must be given before it is renamed into place.
"""

from __future__ import annotations

import codecs
import errno
import os
import re
import stat
import sys
from pathlib import Path

from jobs.printable import one_line

#: Errors that mean "there is nothing at this path" (a missing file, or a part of the path that
#: is a file where a folder should be).
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR})
_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ELOOP: "a symlink loop (a link that leads back to itself)",
    errno.ENAMETOOLONG: "the name is too long for the file system",
}
#: Where Linux (4.7 and later) shows a process's umask without changing it.
_PROC_STATUS = Path("/proc/self/status")
#: Where Linux shows how the user ids of a process's user namespace map to the host's: the
#: host's own namespace maps every id to itself (``0 0 4294967295``).
_UID_MAP = Path("/proc/self/uid_map")
#: The share of a disk (1 in 50, at most 4096 blocks) ext4 keeps for itself, root's writes
#: included (its ``reserved_clusters``), yet counts in ``statvfs``'s ``f_bfree``.
_EXT4_KEPT_SHARE, _EXT4_KEPT_MAX = 50, 4096

#: Why a path is refused that the file-system encoding cannot hold at all (``LC_ALL=C`` with
#: Python's UTF-8 mode off: ASCII only). ``validate`` says it of a local media file.
UNREPRESENTABLE = "file name cannot be represented in this system's file-name encoding (check LANG/LC_ALL)"
#: What to do about a path a session whose file-name encoding is not UTF-8 cannot use.
UTF8_ADVICE = "run wanbatch under a UTF-8 locale (LANG=C.UTF-8) or with PYTHONUTF8=1"
#: A byte of a file name the file-system encoding could not decode, as Python holds it
#: (``surrogateescape``: U+DC80 to U+DCFF).
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")

#: Longest path shown in a message; a longer one keeps its start and its end around ``…``.
SHOWN_PATH_CHARS = 120


def is_missing(exc: OSError) -> bool:
    """Whether ``exc`` says there is nothing at the path (not: it is there, but unusable)."""
    return exc.errno in _MISSING


def os_reason(exc: OSError) -> str:
    """What ``exc`` means: "not found", "permission denied", "a symlink loop …", "the name is
    too long …", else the system's own words (``strerror``, "No space left on device")."""
    if is_missing(exc):
        return "not found"
    if exc.errno in _REASONS:
        return _REASONS[exc.errno]
    return exc.strerror or str(exc) or type(exc).__name__


def file_kind(path: str | os.PathLike[str]) -> str | OSError:
    """``"file"``, ``"folder"`` or ``"other"`` (a named pipe, a device, a socket) for what
    ``path`` leads to (symlinks followed); the OSError when it cannot be looked at, which says
    why (:func:`os_reason`). A NUL in the path is an OSError too (EINVAL), not a ValueError."""
    try:
        mode = Path(path).stat().st_mode
    except OSError as exc:
        return exc
    except ValueError:
        return OSError(errno.EINVAL, "the path contains a NUL character", os.fspath(path))
    if stat.S_ISREG(mode):
        return "file"
    return "folder" if stat.S_ISDIR(mode) else "other"


def what_is(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` leads to (symlinks followed), in words for a message that says it is not a
    folder: "a file", "a named pipe (FIFO)", "a socket", "a device"; None when it is a folder,
    or cannot be looked at (:func:`file_kind` says why)."""
    try:
        mode = Path(path).stat().st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISDIR(mode):
        return None
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a folder"


def utf8_file_names() -> bool:
    """Whether this process names files in UTF-8 (a UTF-8 locale, or Python's UTF-8 mode)."""
    return codecs.lookup(sys.getfilesystemencoding()).name == "utf-8"


def name_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be a name wanbatch records, or reads back from its records, in this
    session; None when it can. The one rule for every path that goes into the database (the
    output folder, a batch's folder and videos, a manifest's place) and for every recorded path
    that is opened again (``export``, ``rerun``, the dashboard).

    A recorded path is text, and the same folder must be the same text in every session: its
    bytes on disk must be its UTF-8. So a path is refused when the file-system encoding

    * cannot hold it at all (``ñ`` under ``LC_ALL=C`` with UTF-8 mode off:
      :data:`UNREPRESENTABLE`, as ``validate`` says of a media file);
    * could not decode its bytes (a folder named in UTF-8 read under ``LC_ALL=C``, or a byte
      ``\\xff`` that is no UTF-8 at all): Python holds those bytes as lone surrogates, which
      no database stores;
    * would write it as other bytes than UTF-8 (``Crème`` under a latin-1 locale is
      ``Cr\\xe8me``): a UTF-8 session would look for another folder, and not find its videos.

    Never asks the file system: ASCII is always fine, and a UTF-8 session accepts every name
    that is text. Always encoding names as UTF-8 instead, whatever the locale, would have every
    file call (Pillow, ffprobe, the exports, the dashboard) translate them; a session whose
    encoding is not UTF-8 is told to run in UTF-8 (:data:`UTF8_ADVICE`), one setting away."""
    text = os.fspath(path)
    if text.isascii():
        return None
    encoding = sys.getfilesystemencoding()
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:
        return f"{UNREPRESENTABLE}: {UTF8_ADVICE}"
    try:
        utf8 = text.encode("utf-8")
    except UnicodeEncodeError:  # bytes the file-system encoding could not decode
        if utf8_file_names():
            return "its name is not UTF-8 text, which wanbatch cannot record: rename it"
        return f"its name holds bytes that are not {encoding} text (check LANG/LC_ALL): {UTF8_ADVICE}"
    if raw != utf8:
        return (
            f"its name would be written in this system's file-name encoding ({encoding}), not in "
            f"UTF-8 as other sessions read it (check LANG/LC_ALL): {UTF8_ADVICE}"
        )
    return None


def resolved_name_problem(path: str | os.PathLike[str]) -> str | None:
    """:func:`name_problem` of ``path`` as given, then of where it leads (a relative path under
    a working folder, or a symbolic link, may lead to a name that cannot be recorded: then it
    says where, ``it is '/srv/d\\xc3\\xa9/m.yaml': …``). A path that cannot be resolved is left
    to the caller's own checks."""
    problem = name_problem(path)
    if problem is not None:
        return problem
    try:
        real = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    problem = name_problem(real)
    return None if problem is None else f"it is '{shown_path(real)}': {problem}"


def has_escaped_bytes(text: str) -> bool:
    """Whether ``text`` holds a byte the file-system encoding could not decode (:func:`shown_bytes`)."""
    return _ESCAPED_BYTE.search(text) is not None


def shown_bytes(text: str, backslash: str = "\\") -> str:
    """``text`` with each byte the file-system encoding could not decode (a lone surrogate
    U+DC80–U+DCFF, as ``surrogateescape`` keeps it) shown as ``\\xNN``: ``r\\xc3\\xa9el``, the
    bytes the name has, never ``\\udcc3`` (which no strict JSON parser takes). ``backslash``:
    what the backslash is written as (``\\\\`` inside a JSON string)."""
    if _ESCAPED_BYTE.search(text) is None:
        return text
    return _ESCAPED_BYTE.sub(lambda m: f"{backslash}x{ord(m.group()) - 0xDC00:02x}", text)


def shown_path(path: str | os.PathLike[str] | bytes, limit: int = SHOWN_PATH_CHARS) -> str:
    """``path`` as text for a message, cut in the middle (``/tmp/bbbb…bbbb.yaml``) when longer
    than ``limit``: its start says where, its end which file.

    On one line, inert (:func:`jobs.printable.one_line`): a file name may hold any character but
    ``/`` and NUL, line breaks too, and a name such as ``x\\n✓ all valid\\ny.jpg`` printed raw made
    one error three lines, the middle one forged. Cut first, then escaped, so that no escape is
    cut in half. Already escaped: a message quotes it as ``'…'``, never with ``!r``, which
    would double each escape's backslash."""
    text = os.fsdecode(path)
    if len(text) <= limit:
        return shown_bytes(one_line(text))
    tail = limit // 3
    return shown_bytes(one_line(text[: limit - tail - 1]) + "…" + one_line(text[-tail:]))


def shown_in_folder(path: str | os.PathLike[str], folder: str | os.PathLike[str] | None) -> str:
    """A stored (absolute, resolved) input path as a message names it: relative to ``folder``
    (the manifest's, where the user wrote ``images/car.png``) when it lies inside it, else
    absolute (a file from an ``--allow-dir`` folder, or no folder known); on one line, as
    :func:`shown_path`. Only ``folder`` is resolved (it may be reached through a symlink).

    Absolute too when ``folder`` is no longer there (the user moved the project): named relative
    to it, a missing ``images/car.png`` would read as the file the user sees in the new folder."""
    if folder is not None:
        try:
            base = Path(folder).resolve()
        except (OSError, RuntimeError, ValueError):
            base = None
        if base is not None and Path(path).is_relative_to(base) and _is_dir(base):
            return shown_path(Path(path).relative_to(base))
    return shown_path(path)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def path_error(exc: OSError) -> str | None:
    """``<path>: <reason>`` for an OSError that names a path (a file that could not be opened,
    a folder that could not be made), or None when it names none: that is not the user's input
    but a fault of the program or the machine."""
    name = exc.filename
    if name is None or not isinstance(name, str | bytes | os.PathLike):
        return None
    return f"{shown_path(name)}: {os_reason(exc)}"


#: Why a relative path (the default database ``.wanbatch/wanbatch.db``, the default ``outputs``)
#: cannot be used from a folder deleted under the shell (``mkdir g && cd g && rmdir ../g``).
CURRENT_FOLDER_GONE = "the current folder no longer exists (deleted?)"


def current_folder_gone_fix(setting: str) -> str:
    """What to do about :data:`CURRENT_FOLDER_GONE`, for the path ``setting`` names."""
    return f"cd to a folder that exists, or set {setting} to an absolute path"


def lost_with_current_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is relative to the current folder (``~`` expanded) and that folder is
    gone: making it absolute (``Path.absolute``, ``os.path.abspath``) raises
    ``FileNotFoundError``. An absolute path needs no current folder."""
    if Path(path).expanduser().is_absolute():
        return False
    try:
        Path.cwd()
    except FileNotFoundError:
        return True
    return False


def creatable(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """Whether this user could create ``path`` (not there yet) and the folders missing above it,
    by looking only: nothing is created, not even a probe.

    Returns the nearest ancestor of ``path`` that is there, and ``None`` when it is a folder this
    user may write into and search, else why not, naming it (``/srv/x is a file, not a folder``,
    ``/srv: permission denied``, ``/srv: a read-only file system``). Permissions are asked of the
    system (``access(2)`` with the effective ids), so root is answered as root: any folder on a
    writable file system will do.
    """
    folder = Path(path).absolute().parent
    while True:
        kind = file_kind(folder)
        if not isinstance(kind, OSError):
            break
        if not is_missing(kind) or folder == folder.parent:
            return folder, f"{shown_path(folder)}: {os_reason(kind)}"
        folder = folder.parent
    if kind != "folder":
        return folder, f"{shown_path(folder)} is {'a file, ' if kind == 'file' else ''}not a folder"
    effective = os.access in os.supports_effective_ids
    if os.access(folder, os.W_OK | os.X_OK, effective_ids=effective):
        return folder, None
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return folder, f"{shown_path(folder)}: {'a read-only file system' if read_only else 'permission denied'}"


def _proc_umask() -> int | None:
    """The umask from ``/proc/self/status`` (its ``Umask:`` line), None where there is none."""
    try:
        with _PROC_STATUS.open(encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _startup_umask() -> int:
    """The umask when this module is imported (at start-up, before any thread writes files).

    Only where ``/proc`` cannot say: ``os.umask`` can only be read by setting it, and between
    the two calls a file another thread makes would get mode 0666."""
    found = _proc_umask()
    if found is not None:
        return found
    mask = os.umask(0o077)  # the strictest while it is changed, should a thread write meanwhile
    os.umask(mask)
    return mask


_STARTUP_UMASK = _startup_umask()


def umask() -> int:
    """The process's umask, read without changing it: safe from any thread (``os.umask`` is
    process-wide, so reading it by setting it races every thread that creates a file). On Linux
    it is read anew each time; elsewhere it is the one the process started with."""
    found = _proc_umask()
    return _STARTUP_UMASK if found is None else found


def file_mode() -> int:
    """The mode a plain ``open()`` gives a new file: 0666 less the umask (0644 under 022)."""
    return 0o666 & ~umask()


def folder_mode() -> int:
    """The mode a plain ``mkdir()`` gives a new folder: 0777 less the umask (0755 under 022)."""
    return 0o777 & ~umask()


def sync_folder(folder: Path) -> None:
    """``fsync(2)`` on ``folder``, making the names created or renamed in it durable (POSIX: a
    directory entry is on disk only once the directory itself is synced); nothing where folders
    cannot be opened or synced (not every system or file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def free_bytes_in(folder: Path) -> int | None:
    """The bytes this user may still write on the file system that holds ``folder``, there or
    still to be created (its nearest folder that exists is asked): what a write meets
    (:func:`_writable_blocks`). None when that cannot be told."""
    while True:
        try:
            info = os.statvfs(folder)
        except FileNotFoundError:
            if folder.parent == folder:
                return None
            folder = folder.parent
            continue
        except (OSError, ValueError):
            return None
        return _writable_blocks(info) * info.f_frsize


def _writable_blocks(info: os.statvfs_result) -> int:
    """The blocks of ``info`` (``statvfs``) this process may write: ``f_bavail`` for a user, and
    for the host's root (:func:`writes_as_root`) the blocks kept for root too (ext4's 5 % by
    default, ``tune2fs -m``), which root's writes take: ``f_bavail`` alone made the doctor, run
    as root, call a disk with 5 % left full ("every command that writes refuses to start"),
    while its commands wrote there. ``f_bfree`` also counts the blocks ext4 keeps from root too
    (:data:`_EXT4_KEPT_SHARE`), taken off where the disk keeps any (``f_bfree`` above
    ``f_bavail``; tmpfs and XFS keep none): a disk root filled is full for root. Never less than
    ``f_bavail``."""
    if not writes_as_root() or info.f_bfree <= info.f_bavail:
        return int(info.f_bavail)
    kept = min(info.f_blocks // _EXT4_KEPT_SHARE, _EXT4_KEPT_MAX)
    return int(max(info.f_bavail, info.f_bfree - kept))


def writes_as_root() -> bool:
    """Whether this process writes as the host's root, for whom a file system keeps blocks
    (ext4 lets its reserved blocks to uid 0): effective uid 0 in the host's user namespace
    (:data:`_UID_MAP`). The root of a user namespace of its own (a rootless container) is
    another user to the file system, and meets ``f_bavail`` as any user does. Where there is no
    such map to read (not Linux, no ``/proc``), uid 0 is root."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    try:
        with _UID_MAP.open(encoding="ascii") as fh:
            first = fh.readline().split()
    except (OSError, ValueError):
        return True
    return first[:3] == ["0", "0", "4294967295"]
