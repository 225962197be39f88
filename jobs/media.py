"""Checks for image and audio inputs: local files, http(s) URLs and data URIs.

A bad image is the most common reason a paid request fails, and fal reports it only after the
request was queued. So local files and inline data URIs are checked here against the endpoint's
:class:`~jobs.endpoints.MediaConstraints` before anything is sent: format, dimensions, alpha,
size. Pillow's ``Image.open`` reads the header first, and only with the readers of formats an
endpoint accepts or validation names (:func:`opened_formats`): a file of another format (a DDS or
SPIDER file named ``photo.jpg``) never reaches Pillow's less-travelled parsers, and whatever
Pillow raises while reading is "not a readable image", never a crash. Decompression bombs are
refused rather than decoded (their pixels counted here, :func:`_refuse_bomb`, never left to a
warning filter). An image that passes is then decoded once (within the same pixel
limit), so a truncated or corrupt file (half a PNG, a JPEG cut short) is refused here rather than
by fal after it was sent and billed; the verdict is cached by the bytes' SHA-256. A local file
is read from disk once for all that (:class:`_ReadOnce`), hashed as it is read: the header, the
decode and the SHA-256 a job records (:func:`checked_file`) are of one content, so a file
rewritten after its check is refused when it is sent rather than sent unchecked. An animated
WebP/APNG and greyscale of more than 8 bits pass with a warning (:func:`_header_notes`). Pillow's own
warnings and log lines about a damaged file are kept off stderr (:func:`quiet_pillow`): the
verdict is the one line validation prints. Audio is probed with PyAV for a WAV or MP3
container (sniffed from its first bytes, then read by that demuxer alone: an untrusted file
never picks FFmpeg's demuxer, a playlist never opens other files; and by the MP3 or PCM
decoders alone, see :func:`read_audio_header`) and its duration, only within the endpoint's
byte limit. URLs are checked for form only (wanbatch makes
no network access while validating). The format read here is also the type a local file is
sent to fal as (:func:`media_type`), whatever its name says.

Limits the provider does not publish (``MediaConstraints.assumed``, e.g. Wan 2.1's image
limits) only warn: a problem of severity ``"warning"`` names them as wanbatch's assumption. So do
the stricter figures it publishes outside its input schema (``MediaConstraints.advised``: Wan
2.6's overview says 360-2000 pixels, its schema allows 240-7680): the schema's limit refuses, the
overview's only warns, naming both figures and where each is published. An unreadable file and a
decompression bomb stay errors everywhere: they protect the user.

Local paths are confined: :func:`resolve_local` resolves a path the way the operating system
will when the file is read (``~`` expanded, ``..`` and every symlink followed) and says whether
the result lies inside one of the allowed folders — the manifest's own, plus any the user named
with ``--allow-dir`` or ``WANBATCH_ALLOWED_INPUT_DIRS``. A shared manifest naming
``../victim/passport.jpg``, ``/etc/…``, ``~/…`` or a symlink out of its folder must not make
wanbatch read (and send to fal, and export) someone's private file.

Results are cached per file (path, size and modification time), because a 100,000-job batch
typically reuses a handful of images; the full decode is cached by content too (the simulator
checks each request's bytes, and one image often comes as a file and as a data URI).
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import importlib
import io
import ipaddress
import logging
import math
import mimetypes
import os
import re
import stat
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import urlsplit

from jobs import avcompat
from jobs.endpoints import FieldType, MediaConstraints, all_endpoints
from jobs.errors import WanbatchError
from jobs.fs import UNREPRESENTABLE, is_missing, os_reason, shown_path
from jobs.printable import clause, shortened

ALLOWED_FORMS = "a local file path (inside the manifest's folder), an http(s) URL or a base64 data URI"
#: What a local path outside the allowed folders could be instead.
OUTSIDE_ALLOWED = (
    "a file inside the manifest's folder (symlinks must point inside too), an http(s) URL or a "
    "data URI; allow another folder explicitly with --allow-dir DIR or WANBATCH_ALLOWED_INPUT_DIRS"
)
#: Why a value holding a NUL character is refused (PostgreSQL cannot store it, fal cannot use it).
NUL_MESSAGE = "contains a NUL character (\\x00), which cannot be stored or sent"
NUL_ALLOWED = "text without NUL characters"
#: Why a local path is refused whose name the file-system encoding cannot hold (``LC_ALL=C``:
#: ASCII only), where the OS could not even be asked for it.
UNREPRESENTABLE_MESSAGE = UNREPRESENTABLE
UNREPRESENTABLE_ALLOWED = (
    "a file name in the system's file-name encoding; for other characters run wanbatch under a "
    "UTF-8 locale (e.g. LANG=C.UTF-8)"
)


def representable(path: str) -> bool:
    """Whether the OS can be given ``path``: the file-system encoding (ASCII under ``LC_ALL=C``
    with UTF-8 mode off) holds every character of it. A path that is not raises
    UnicodeEncodeError from any call that would open or resolve it."""
    try:
        os.fsencode(path)
    except UnicodeError:
        return False
    return True


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
#: RFC 2045's ``token``: US-ASCII letters, digits and ``!#$%&'*+-.^_`{|}~`` (no blank, no
#: control character, none of its ``tspecials`` ``()<>@,;:\"/[]?=``).
_MIME_PART = r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+"
#: A media type as RFC 2397 takes it from RFC 2045: ``type/subtype``, each a token.
_MEDIA_TYPE = re.compile(rf"{_MIME_PART}/{_MIME_PART}")
#: What a data URI's media type may be, for a message.
MEDIA_TYPE_ALLOWED = (
    "a media type of two parts type/subtype, each ASCII letters, digits or !#$%&'*+-.^_`{|}~ with no blank"
)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
#: Pillow names some formats differently from what people (and fal's docs) call them.
_FORMAT_ALIASES = {"MPO": "JPEG"}  # camera JPEGs with an embedded preview open as MPO
#: What each audio container is sent to fal as.
_AUDIO_SENT_AS = {"wav": "audio/wav", "mp3": "audio/mpeg"}


class MediaKind(Enum):
    """How a media value refers to its bytes."""

    URL = "url"
    DATA_URI = "data-uri"
    PATH = "path"
    OTHER_SCHEME = "other-scheme"


def classify(value: str) -> MediaKind:
    """Which form a media value takes (a Windows drive letter is not a scheme).

    The one place that decides it, for validation, the worker (what it sends as it is, what it
    reads as a local file) and the simulator. A scheme is matched in any case (``HTTPS://``,
    ``Data:``): RFC 3986 section 3.1 makes schemes case-insensitive."""
    lowered = value[:8].lower()
    if lowered.startswith(("http://", "https://")):
        return MediaKind.URL
    if lowered.startswith("data:"):
        return MediaKind.DATA_URI
    if _SCHEME.match(value) and not re.match(r"^[A-Za-z]:[\\/]", value):
        return MediaKind.OTHER_SCHEME
    return MediaKind.PATH


def sent_form(value: str) -> str:
    """A URL or data URI as it is sent to fal: its scheme in lower case (``HTTPS://x/a.png`` →
    ``https://x/a.png``, ``Data:image/png;…`` → ``data:image/png;…``), everything after the
    colon exactly as written. RFC 3986 (section 6.2.2.1) makes the two the same URI, and the
    lower-case scheme is the only one fal's docs show, so a server of fal's that compares
    schemes case-sensitively (``startswith("data:")``) still reads it. Any other value is
    returned unchanged."""
    if classify(value) in (MediaKind.URL, MediaKind.DATA_URI):
        scheme, _, rest = value.partition(":")
        return f"{scheme.lower()}:{rest}"
    return value


@dataclass(frozen=True, slots=True)
class DataUri:
    """A data URI's parts (RFC 2397: ``data:[<mediatype>][;base64],<data>``), as written."""

    mime: str  # the media type before any parameter; '' when none is written
    params: tuple[str, ...]  # the parameters between it and ``;base64`` (``charset=…``)
    base64: bool  # it ends its header with ``;base64``
    data: str  # everything after the first comma

    @property
    def mime_ok(self) -> bool:
        """Its media type is absent (RFC 2397's default) or a proper ``type/subtype`` of RFC
        2045 tokens: ``image/png``, never ``image/webp `` (a blank), ``image/`` or ``png``."""
        return not self.mime or _MEDIA_TYPE.fullmatch(self.mime) is not None

    def decoded(self) -> bytes | None:
        """The payload's bytes when it is base64 that decodes strictly; None otherwise."""
        if not self.base64:
            return None
        try:
            return base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError):
            return None


def parse_data_uri(value: str) -> DataUri | None:
    """A data URI's parts; None when ``value`` is none (no ``data:`` scheme in any case, or no
    comma). The one reading of a data URI's syntax: validation (:func:`check_data_uri`) and
    the simulator (what fal decodes) both judge a data URI from it."""
    if classify(value) is not MediaKind.DATA_URI:
        return None
    header, comma, data = value[len("data:") :].partition(",")
    if not comma:
        return None
    mime, *params = header.split(";")
    is_base64 = bool(params) and params[-1] == "base64"
    if is_base64:
        params.pop()
    return DataUri(mime, tuple(params), is_base64, data)


@dataclass(frozen=True, slots=True)
class LocalPath:
    """Where a local media path really leads, and whether that is an allowed place."""

    path: str  # absolute, ``~`` expanded, ``..`` and symlinks resolved (as far as the file exists)
    inside: bool  # within one of the allowed folders
    #: Outside only: the value as written made absolute without touching the file system beyond
    #: its own (allowed) folder: ``~`` expanded, ``..`` collapsed, no symlink followed.
    written: str = ""
    #: Outside only: written inside an allowed folder, so a symbolic link in it leads out.
    via_link: bool = False


def allowed_roots(base_dir: Path, extra: tuple[Path, ...] | list[Path] = ()) -> tuple[str, ...]:
    """The folders local files may come from: ``base_dir`` and ``extra``, fully resolved."""
    roots: list[str] = []
    for folder in (base_dir, *extra):
        try:
            real = str(Path(folder).expanduser().resolve())
        except (OSError, RuntimeError, ValueError):  # a loop, no home, a NUL: allows nothing
            continue
        if real not in roots:
            roots.append(real)
    return tuple(roots)


def resolve_local(value: str, base_dir: str, roots: tuple[str, ...]) -> LocalPath:
    """Resolve ``value`` against ``base_dir`` and check it lands inside one of ``roots``.

    Symlinks are followed exactly as a later read would follow them (``Path.resolve(strict=True)``),
    so a link inside the folder that points out of it is outside. A path that does not exist is
    resolved as far as it does (then lexically), so ``../x`` is refused whether or not ``x``
    exists — the message must not tell a shared manifest's author which private files exist, nor
    where a link points (``jobs.manifest.checks.outside_message`` says it from ``written`` and
    ``via_link``, never from ``path``).
    ``roots`` must already be resolved (:func:`allowed_roots`). ``value`` must not contain NUL
    and must be :func:`representable` (joined to ``base_dir``).
    """
    try:
        given = Path(value).expanduser()
    except RuntimeError:  # "~user" with no such user, or no home folder: taken literally
        given = Path(value)
    candidate = Path(base_dir) / given
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, unreadable or a symlink loop
        try:
            real = candidate.resolve()
        except (OSError, RuntimeError):
            real = Path(os.path.normpath(candidate))
    if any(real.is_relative_to(root) for root in roots):
        return LocalPath(str(real), True)
    # Refused. What a message may say of it must not depend on anything outside the allowed
    # folders (where a link there points, whether a file exists): the value taken lexically from
    # the real place of its own folder (the manifest's, or an items_from file's, both allowed).
    written = Path(os.path.normpath(Path(os.path.realpath(base_dir)) / given))
    via_link = any(written.is_relative_to(root) for root in roots)
    return LocalPath(str(real), False, str(written), via_link)


@dataclass(frozen=True, slots=True)
class MediaProblem:
    """Why a media value is refused (or, of severity ``"warning"``, only worth a word), and what
    would be accepted. ``code`` names the kind of problem the way fal's 422 ``type`` does
    (``image_too_small``, ``audio_duration_too_long``…), for the simulator's answers."""

    message: str
    allowed: str
    severity: str = "error"
    code: str | None = None


def check_media(
    value: object,
    kind: FieldType,
    limits: MediaConstraints,
    *,
    shown: str | None = None,
    checked: dict[str, str] | None = None,
) -> list[MediaProblem]:
    """Every problem with one media value (an absolute path once the manifest resolved it).

    ``shown`` is how a message names a local file: the value as the user wrote it
    (``images/x.jpg``, relative to the file that wrote it), not the absolute path it resolved to;
    ``value`` itself when not given.

    ``checked`` (one validation pass's): a local file that passes is entered under ``value``
    with the SHA-256 of the very bytes the check read and decoded (:func:`checked_file`), which
    is what the job records and what the worker later sends or refuses. Read twice in one pass
    (two fields with different limits) with different bytes, it is an error: the file is being
    written, and which of the two would be sent is anyone's guess."""
    if not isinstance(value, str):
        # Named as the user wrote it: the loader's own classes (LList, LMap) mean nothing to them.
        got = (
            "a list"
            if isinstance(value, list)
            else "a mapping"
            if isinstance(value, dict)
            else "true/false (a boolean)"
            if isinstance(value, bool)
            else f"a number ({value!r})"
            if isinstance(value, int | float)
            else "nothing (null)"
            if value is None
            else "a value of another kind"
        )
        return [MediaProblem(f"expected text, got {got}", ALLOWED_FORMS)]
    if not value.strip():
        return [MediaProblem("is empty", ALLOWED_FORMS)]
    if "\0" in value:
        return [MediaProblem(NUL_MESSAGE, NUL_ALLOWED)]
    form = classify(value)
    if form is MediaKind.URL:
        return check_url(value) or _unreachable_url(value)
    if form is MediaKind.DATA_URI:
        return check_data_uri(value, kind, limits)
    if form is MediaKind.OTHER_SCHEME:
        scheme = value.split(":", 1)[0]
        return [MediaProblem(f"the URL scheme {scheme!r} is not supported", ALLOWED_FORMS)]
    if not representable(value):
        return [MediaProblem(UNREPRESENTABLE_MESSAGE, UNREPRESENTABLE_ALLOWED)]
    if (folder_only := _file_as_folder(value, value if shown is None else shown)) is not None:
        return [folder_only]
    problems, digest = checked_file(Path(value), kind, limits, shown=shown)
    if checked is not None and digest is not None and checked.setdefault(value, digest) != digest:
        problems.append(_changed_while_checked(shown_path(value if shown is None else shown)))
    return problems


def _changed_while_checked(name: str) -> MediaProblem:
    """A file whose bytes differed between two reads of one validation pass."""
    return MediaProblem(
        f"{name} changed while it was being checked (two reads of it differ)",
        "a file that is not being written: validate or submit again once it is complete",
        code="image_load_error",
    )


#: :attr:`MediaProblem.code` (and :attr:`jobs.errors.Issue.code`) of a URL fal's servers cannot
#: download: a loopback, private or link-local address, or ``localhost``. A warning, said once
#: per URL (:func:`jobs.manifest.report.validate_manifest`).
UNREACHABLE_URL = "unreachable_url"


def unreachable_host(url: str) -> str | None:
    """Why fal's servers cannot download ``url`` whatever it serves, from its host alone (no
    name is resolved): "a loopback address", "a private address", "a link-local address"; None
    for any other host. "The model's runner downloads the file from that URL during processing"
    (https://docs.fal.ai/documentation/model-apis/fal-cdn), on fal's machines: ``localhost``
    there is fal's own, and 10.0.0.0/8, 192.168.0.0/16 or the cloud metadata address
    169.254.169.254 are no place of the user's it can reach."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    if not host:
        return None
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always the loopback
        return "a loopback address (localhost)"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_private:
        return "a private address"
    return None


def _unreachable_url(value: str) -> list[MediaProblem]:
    """A warning for a URL fal's servers cannot download (:func:`unreachable_host`): valid in
    form, so not refused (a tunnel or proxy may make sense of it), but the job would fail with
    fal's ``file_download_error``."""
    why = unreachable_host(value)
    if why is None:
        return []
    return [
        MediaProblem(
            f"the URL's host is {why}: fal downloads input URLs from its own servers, which cannot "
            "reach it, so the job would fail (file_download_error)",
            "a public http(s) URL, or a local file path (wanbatch uploads it to fal)",
            severity="warning",
            code=UNREACHABLE_URL,
        )
    ]


def _file_as_folder(value: str, written: str | os.PathLike[str]) -> MediaProblem | None:
    """The problem of a path written with a trailing ``/`` (or ``/.``) that leads to a file:
    the system refuses to open ``landscape.jpg/`` ("Not a directory"), though ``Path`` drops the
    slash and would have read the file. None otherwise (a folder, or nothing there, is said by
    the file's own check)."""
    text = os.fspath(written)
    seps = {"/", os.sep}
    if not any(text.endswith((sep, sep + ".")) for sep in seps):
        return None
    try:
        # Not Path: it drops the trailing separator, which is the whole point here.
        os.stat(value.rstrip("".join(seps)) + os.sep)  # noqa: PTH116
    except OSError as exc:
        if exc.errno != errno.ENOTDIR:
            return None
        return MediaProblem(
            f"cannot read {shown_path(text)}: not a directory (a path ending in '/' names a folder, "
            "and this is a file)",
            "the file's path without the trailing '/'",
        )
    except ValueError:
        return None
    return None


def check_url(value: str) -> list[MediaProblem]:
    """Form only: http or https, a host, no whitespace. No request is made."""
    allowed = "an http(s) URL with a host and no spaces, e.g. https://example.com/image.png"
    if any(ch.isspace() for ch in value):
        return [MediaProblem("a URL must not contain spaces (encode them as %20)", allowed)]
    try:
        parts = urlsplit(value)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError as exc:
        return [MediaProblem(f"not a valid URL ({exc})", allowed)]
    if parts.scheme.lower() not in ("http", "https") or not host:
        return [MediaProblem("not a valid http(s) URL (no host)", allowed)]
    return []


def check_data_uri(value: str, kind: FieldType, limits: MediaConstraints) -> list[MediaProblem]:
    """Decode a ``data:<mime>;base64,…`` value and check its bytes exactly like a file's."""
    allowed = f"data:{'image/png' if kind is FieldType.IMAGE else 'audio/mpeg'};base64,<base64 data>"
    parts = parse_data_uri(value)
    if parts is None or not parts.base64:
        return [MediaProblem("not a base64 data URI", allowed)]
    if not parts.mime_ok:
        return [
            MediaProblem(
                f"the data URI's media type {parts.mime!r} is not a valid type/subtype (RFC 2397)",
                f"{MEDIA_TYPE_ALLOWED}, as in {allowed}",
            )
        ]
    mime = parts.mime.lower()
    family = "image/" if kind is FieldType.IMAGE else "audio/"
    if not mime.startswith(family):
        return [MediaProblem(f"a data URI of type {mime or 'unknown'!r} where {family}* is needed", allowed)]
    data = parts.decoded()
    if data is None:
        return [MediaProblem("the data URI's base64 payload is malformed", allowed)]
    if not data:
        return [MediaProblem("the data URI is empty", allowed)]
    if kind is FieldType.IMAGE:
        return list(_check_image(io.BytesIO(data), len(data), limits))
    return list(_check_audio(io.BytesIO(data), len(data), limits))


def check_bytes(data: bytes, kind: FieldType, limits: MediaConstraints) -> list[MediaProblem]:
    """The problems of a media file's bytes (the simulator's check of what the model downloads)."""
    if kind is FieldType.IMAGE:
        return list(_check_image(io.BytesIO(data), len(data), limits))
    return list(_check_audio(io.BytesIO(data), len(data), limits))


def check_file(
    path: Path, kind: FieldType, limits: MediaConstraints, *, shown: str | os.PathLike[str] | None = None
) -> list[MediaProblem]:
    """Check a local file (cached by path, size and modification time): its problems
    (:func:`checked_file` without the hash)."""
    return checked_file(path, kind, limits, shown=shown)[0]


def checked_file(
    path: Path, kind: FieldType, limits: MediaConstraints, *, shown: str | os.PathLike[str] | None = None
) -> tuple[list[MediaProblem], str | None]:
    """Check a local file (cached by path, size and modification time): its problems, and the
    SHA-256 hex of the bytes the check read — read once, every byte hashed as it came, and the
    header and the whole decode made from those same bytes (:class:`_ReadOnce`). None when it has
    an error (it is never stored, so never sent).

    That hash, not one of a later read, is what a job records (``source_files``, the key): a
    file rewritten after its check (a sync tool, an export still writing) then differs from the
    record, and the worker refuses to send it instead of sending unchecked bytes to be billed.

    A message names the file as ``shown`` (the value as written; ``path`` when not given), on
    one line (:func:`jobs.fs.shown_path`): a problem says where the user wrote it, and
    ``/home/…/m1/images/x.jpg`` is not what they wrote."""

    def name() -> str:  # only for a message: a file that is fine is never named
        return shown_path(path if shown is None else shown)

    try:
        info = path.stat()
    except ValueError:  # a NUL in the path
        return [MediaProblem(f"file not found: {name()}", "an existing file " + _formats(limits))], None
    except OSError as exc:  # missing, or there but not to be read (permissions, a symlink loop)
        if is_missing(exc):
            return [MediaProblem(f"file not found: {name()}", "an existing file " + _formats(limits))], None
        why = f"cannot read {name()}: {os_reason(exc)}"
        return [MediaProblem(why, "a readable file " + _formats(limits))], None
    if not stat.S_ISREG(info.st_mode):
        return [MediaProblem(f"not a regular file: {name()}", "a regular file " + _formats(limits))], None
    found = _check_file_cached(str(path), info.st_size, info.st_mtime_ns, kind, limits)
    if isinstance(found, str):  # it could not be opened: why
        return [MediaProblem(f"cannot read {name()}: {found}", "a readable file")], None
    problems, digest = found
    return list(problems), digest


@lru_cache(maxsize=4096)
def _check_file_cached(
    path: str, size: int, mtime_ns: int, kind: FieldType, limits: MediaConstraints
) -> tuple[tuple[MediaProblem, ...], str | None] | str:
    """The file's problems and the SHA-256 hex of the bytes checked (None when it has an
    error); or, when it cannot be opened or read, why (the caller names the file: the cache is
    shared by every spelling of its path)."""
    del mtime_ns  # part of the cache key only
    try:
        with Path(path).open("rb") as raw:
            once = _ReadOnce(raw)
            fh = cast(BinaryIO, once)
            if kind is FieldType.AUDIO:
                problems = _check_audio(fh, size, limits)
            else:
                problems = _check_image(fh, size, limits)
            refused = any(problem.severity == "error" for problem in problems)
            return problems, None if refused else once.sha256()
    except OSError as exc:
        return os_reason(exc)


class _ReadOnce(io.RawIOBase):
    """A file read once, for a check: each byte comes from the disk once, is hashed in file
    order as it comes, and is kept, so that every later read or seek (Pillow reads a header,
    seeks back, opens the image again to decode it; PyAV seeks about an audio file) is served
    from those same bytes. The header checked, the pixels decoded and :meth:`sha256` are then of
    one content, even while the file is rewritten on disk. Only what the readers asked for is
    kept (a file refused on its header is not read whole); :meth:`sha256` reads the rest, if
    any, hashing without keeping it."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self._kept = bytearray()
        self._hash = hashlib.sha256()
        self._pos = 0
        self._ended = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _fill(self, upto: int | None) -> None:
        """Read on from the disk until ``upto`` bytes are kept (None: to the end)."""
        while not self._ended and (upto is None or len(self._kept) < upto):
            want = 1 << 20 if upto is None else max(upto - len(self._kept), 1 << 16)
            chunk = self._raw.read(want)
            if not chunk:
                self._ended = True
                break
            self._hash.update(chunk)
            self._kept += chunk

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        self._fill(self._pos + len(view))
        got = self._kept[self._pos : self._pos + len(view)]
        view[: len(got)] = got
        self._pos += len(got)
        return len(got)

    def readall(self) -> bytes:
        self._fill(None)
        data = bytes(self._kept[self._pos :])
        self._pos = len(self._kept)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._pos
        elif whence == os.SEEK_END:
            self._fill(None)
            offset += len(self._kept)
        elif whence != os.SEEK_SET:
            raise ValueError(f"invalid whence ({whence})")
        if offset < 0:
            raise OSError(f"negative seek position {offset}")
        self._pos = offset
        return offset

    def tell(self) -> int:
        return self._pos

    def whole_sha256(self) -> str:
        """:meth:`sha256`, every byte kept (a full decode is about to read them all)."""
        self._fill(None)
        return self._hash.hexdigest()

    def sha256(self) -> str:
        """SHA-256 hex of the whole file as this reader read it: the rest is read on (hashed,
        not kept) first."""
        while not self._ended:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                self._ended = True
                break
            self._hash.update(chunk)
        return self._hash.hexdigest()


def _formats(limits: MediaConstraints) -> str:
    return "in " + "/".join(limits.formats)


#: Formats no endpoint accepts that Pillow still opens, so that validation names them ("image
#: format GIF is not accepted"; on Wan 2.1, whose limits are assumed, a warning and the image is
#: sent) rather than calling a common file unreadable.
_NAMED_FORMATS = ("GIF", "TIFF")
#: The Pillow plugin module (``PIL.<name>ImagePlugin``) that reads each of those formats.
_PLUGINS = {
    "BMP": "Bmp",
    "GIF": "Gif",
    "JPEG": "Jpeg",
    "PNG": "Png",
    "TIFF": "Tiff",
    "WEBP": "WebP",
}


@lru_cache(maxsize=1)
def opened_formats() -> tuple[str, ...]:
    """The Pillow formats an image is opened with: those any endpoint's image field accepts and
    :data:`_NAMED_FORMATS` (a camera JPEG the JPEG reader opens as ``MPO`` itself). Any other of
    Pillow's ~40 readers (DDS, SPIDER, …: rarely exercised parsers that crashed on crafted bytes)
    is never tried on an untrusted file."""
    from PIL import Image

    accepted = {
        fmt.upper()
        for spec in all_endpoints()
        for fld in spec.media_fields
        if fld.type is FieldType.IMAGE and fld.media is not None
        for fmt in fld.media.formats
    }
    wanted = accepted | set(_NAMED_FORMATS)
    # Only these readers are imported (Image.init() would import all of them: 40 ms more).
    for fmt in sorted(wanted):
        plugin = _PLUGINS.get(fmt)
        if plugin is not None and fmt not in Image.OPEN:
            importlib.import_module(f"PIL.{plugin}ImagePlugin")
    if not wanted <= Image.OPEN.keys():
        Image.init()  # a format of another reader: every reader registers, so OPEN knows it
    return tuple(sorted(fmt for fmt in wanted if fmt in Image.OPEN))


class UnreadableImage(WanbatchError, ValueError):
    """The bytes are no image Pillow reads in :func:`opened_formats`; the message says why.
    (A :class:`ValueError` too, as it was before it joined the tree.)"""


#: How many image reads the current thread is inside (:func:`quiet_pillow`); 0 or unset: none.
_reading = threading.local()
_quiet_lock = threading.Lock()
#: How many loggers existed when the ``PIL`` loggers were last given :data:`_PIL_FILTER`.
_loggers_seen = -1


def _in_image_read() -> bool:
    return bool(getattr(_reading, "depth", 0))


class _QuietPillowLog(logging.Filter):
    """Drops a ``PIL`` logger's record emitted by a thread inside :func:`quiet_pillow`; every
    other thread's records pass. A record is filtered in the thread that logs it, so the
    thread-local depth says whose it is: nothing global is switched on and off."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _in_image_read()


_PIL_FILTER = _QuietPillowLog()


class _ShowUnlessReading:
    """Python's ``warnings._showwarnmsg`` wrapped: a warning issued by a thread inside
    :func:`quiet_pillow` (Pillow's, about the file it reads) is not shown; any other goes on to
    the function it wraps, and so to ``showwarning`` (``logging.captureWarnings``'s, a
    ``catch_warnings(record=True)`` list, stderr) exactly as before. It only ever decides about
    the calling thread. ``_showwarnmsg`` is the one function every shown warning passes through
    (the C ``warn`` looks it up on the ``warnings`` module each time), and unlike the public
    ``showwarning`` no ``catch_warnings`` saves and restores it: another thread's
    ``catch_warnings`` (``os.get_exec_path``, ``subprocess``) would put back a ``showwarning``
    from before the wrapper while this thread reads. Should a Python ever stop calling it,
    Pillow's warnings would only reach stderr again: nothing else depends on it."""

    def __init__(self, shown: Callable[[warnings.WarningMessage], object]) -> None:
        self.shown = shown

    def __call__(self, msg: warnings.WarningMessage) -> None:
        if _in_image_read():
            return
        self.shown(msg)


def _install_quiet() -> None:
    """The filter on each ``PIL`` logger, and the wrapper around ``warnings._showwarnmsg``:
    installed once, and again only when missing (a Pillow module imported since, with a logger
    of its own; a ``_showwarnmsg`` replaced since)."""
    global _loggers_seen
    loggers = logging.Logger.manager.loggerDict
    current = getattr(warnings, "_showwarnmsg", None)
    if isinstance(current, _ShowUnlessReading) and len(loggers) == _loggers_seen:
        return
    with _quiet_lock:
        current = getattr(warnings, "_showwarnmsg", None)
        if callable(current) and not isinstance(current, _ShowUnlessReading):
            setattr(warnings, "_showwarnmsg", _ShowUnlessReading(current))  # noqa: B010 (not in typeshed)
        if len(loggers) != _loggers_seen:
            _loggers_seen = len(loggers)
            # Pillow's modules log to their own loggers (PIL.TiffImagePlugin…), made as they
            # are imported: a new one adds to the dict. (addFilter adds a filter once.)
            for name, logger in list(loggers.items()):
                if (name == "PIL" or name.startswith("PIL.")) and isinstance(logger, logging.Logger):
                    logger.addFilter(_PIL_FILTER)


@contextmanager
def quiet_pillow() -> Iterator[None]:
    """Pillow's warnings and log records kept off stderr while this thread reads an untrusted
    image.

    A damaged TIFF makes Pillow warn ("Corrupt EXIF data") and log errors ("More samples per
    pixel than can be decoded") before it fails; printed, they came before validation's one
    located line about the file. Python's warning filters and the loggers' levels are left
    alone (they are process-wide: switching them for one thread's read silenced, or un-refused,
    other threads' warnings): a filter on the ``PIL`` loggers and a wrapper around
    ``warnings._showwarnmsg`` drop what the current thread issues inside, and nothing else.
    This is not the decompression-bomb guard, which never rests on a warning: see
    :func:`_refuse_bomb`."""
    opened_formats()  # imports the readers first: each one's logger gets the filter from the start
    _install_quiet()
    _reading.depth = getattr(_reading, "depth", 0) + 1
    try:
        yield
    finally:
        _reading.depth -= 1


def _refuse_bomb(size: tuple[int, int]) -> None:
    """Pillow's decompression-bomb guard, applied here rather than trusted to a warning filter:
    more pixels than ``Image.MAX_IMAGE_PIXELS`` raises ``DecompressionBombWarning`` (as an
    exception), more than twice as many ``DecompressionBombError``, counted and worded as Pillow
    does. Called on an opened image before anything decodes its pixels. Pillow's own check in
    ``Image.open`` only warns below twice the limit, and whether that warning is an error
    depends on the process's warning filters, which another thread may change at any moment."""
    from PIL import Image

    most = Image.MAX_IMAGE_PIXELS
    if most is None:
        return
    pixels = max(1, size[0]) * max(1, size[1])
    if pixels > 2 * most:
        raise Image.DecompressionBombError(
            f"Image size ({pixels} pixels) exceeds limit of {2 * most} pixels, "
            "could be decompression bomb DOS attack."
        )
    if pixels > most:
        raise Image.DecompressionBombWarning(
            f"Image size ({pixels} pixels) exceeds limit of {most} pixels, "
            "could be decompression bomb DOS attack."
        )


def _why(exc: BaseException) -> str:
    """Pillow's reason, on one short line (``image file is truncated (0 bytes not processed)``)."""
    text = clause(str(exc).strip()) or type(exc).__name__
    return shortened(text, 120)


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What validation reads in an image's header: its format as fal's docs name it
    (``JPEG``, ``PNG``, ``WEBP``…), its size in pixels, and whether it has an alpha channel."""

    format: str
    width: int
    height: int
    alpha: bool
    #: Frames of an animated WebP or PNG (APNG), as its header announces them; 1 otherwise.
    frames: int = 1
    #: Pillow's mode (``RGB``, ``L``, ``I;16``…): how many bits a sample has, and of what kind.
    mode: str = ""

    @property
    def mime(self) -> str:
        """The MIME type of the format (``image/jpeg``): what the image is sent as."""
        from PIL import Image

        return Image.MIME.get(self.format) or f"image/{self.format.lower()}"


def _read_header(fh: BinaryIO) -> ImageHeader:
    """The image's header, read by Pillow from its bytes (never from a file name) with the
    readers of :func:`opened_formats` only, without decoding the pixels. Raises Pillow's
    ``DecompressionBombError``/``DecompressionBombWarning`` for a decompression bomb and
    :class:`UnreadableImage` for anything else that goes wrong: bytes that are no image, or a
    reader's own bug on crafted bytes (any exception, never a crash)."""
    # Here, not at the top: a manifest without images never needs Pillow (14 ms of start-up).
    from PIL import Image

    bomb = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    try:
        with quiet_pillow(), Image.open(fh, formats=opened_formats()) as image:  # the header only
            _refuse_bomb(image.size)
            fmt = _FORMAT_ALIASES.get(image.format or "", image.format or "unknown")
            width, height = image.size
            alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
            # Only where the header says it: a GIF's or TIFF's count walks the whole file.
            frames = int(getattr(image, "n_frames", 1)) if fmt in _ANIMATED_FORMATS else 1
            mode = image.mode
    except bomb:
        raise
    except Exception as exc:  # any failure of a reader: an unreadable file
        raise UnreadableImage(_why(exc)) from exc
    return ImageHeader(fmt, width, height, alpha, frames, mode)


#: Accepted formats whose header announces how many frames an animation has (APNG's ``acTL``,
#: WebP's ``ANIM``): such an image passes, and fal's model reads its first frame.
_ANIMATED_FORMATS = frozenset({"PNG", "WEBP"})
#: Pillow's modes of more than 8 bits a sample, greyscale (16-bit PNGs and TIFFs, 32-bit integer
#: or float ones), as each is said in a warning. A plain conversion to RGB clips rather than
#: scales them: a mid-grey 16-bit image (32768) comes out white.
_WIDE_GREY_MODES = {
    "I;16": "16-bit greyscale",
    "I;16L": "16-bit greyscale",
    "I;16B": "16-bit greyscale",
    "I;16N": "16-bit greyscale",
    "I": "32-bit integer greyscale",
    "F": "32-bit floating-point greyscale",
}


def _header_notes(header: ImageHeader) -> list[MediaProblem]:
    """Warnings about an image that passes but that fal's model may not see as the user does:
    an animation (its first frame is what the model takes) and greyscale of more than 8 bits (a
    plain RGB conversion changes its tones). Never a refusal: fal may accept both."""
    notes: list[MediaProblem] = []
    if header.frames > 1:
        notes.append(
            MediaProblem(
                f"the image is animated ({header.frames} frames): the model takes its first frame; "
                "sent as is",
                "",
                "warning",
            )
        )
    wide = _WIDE_GREY_MODES.get(header.mode)
    if wide is not None:
        notes.append(
            MediaProblem(
                f"the image is {wide} (Pillow mode {header.mode}): the model's conversion to RGB may "
                "change its tones (a mid-grey can come out almost white); save it as 8-bit to be sure; "
                "sent as is",
                "",
                "warning",
            )
        )
    return notes


#: Full-decode verdicts by the bytes' SHA-256 (None: it decodes), most recent last.
_decoded: OrderedDict[bytes, str | None] = OrderedDict()
_decoded_lock = threading.Lock()
_DECODED_KEPT = 4096


def _decode_problem(fh: BinaryIO) -> str | None:
    """Why the whole image in ``fh`` cannot be decoded (truncated, corrupt), or None when it can.

    Called only for an image whose header passed (a readable format, no decompression bomb), so
    the pixels decoded are within Pillow's limit. Once per distinct content: the verdict is cached
    by SHA-256, so a batch that sends one image a thousand times, as a file or as a data URI,
    decodes it once."""
    source: BinaryIO
    if isinstance(fh, _ReadOnce):  # a file: decoded from the very bytes its header was read from
        digest = bytes.fromhex(fh.whole_sha256())
        source = fh
    else:
        fh.seek(0)
        data = fh.read()
        digest = hashlib.sha256(data).digest()
        source = io.BytesIO(data)
    source.seek(0)
    with _decoded_lock:
        if digest in _decoded:
            _decoded.move_to_end(digest)
            return _decoded[digest]
    from PIL import Image

    why: str | None = None
    try:
        with quiet_pillow(), Image.open(source, formats=opened_formats()) as image:
            _refuse_bomb(image.size)  # the header check refused it already: never decoded anyway
            image.load()  # the first frame, as fal's model reads it
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return _why(exc)  # not cached: the verdict of a limit, which can change, not of the bytes
    except Exception as exc:  # whatever stops this decode stops fal's
        why = _why(exc)
    with _decoded_lock:
        _decoded[digest] = why
        while len(_decoded) > _DECODED_KEPT:
            _decoded.popitem(last=False)
    return why


def media_type(data: bytes, name: str, kind: FieldType | None = None) -> str:
    """The MIME type ``data`` is sent to fal as (a data URI's type, an upload's content type).

    An image's is the format validation detects in its bytes (:func:`_read_header`), never its
    file name's: a JPEG saved as ``photo.heic`` or with no extension at all passes validation as
    the JPEG it is, and goes as ``image/jpeg``. A ``kind`` of ``None`` is tried as an image first.
    Audio's is the container its first bytes show (WAV ``audio/wav``, MP3 ``audio/mpeg``, as
    :func:`_check_audio` found it). Anything else takes its type from ``name`` (validation
    refuses such a file); ``application/octet-stream`` when the name says nothing either.
    """
    if kind is FieldType.AUDIO:
        container = audio_container(data[:16])
        if container is not None:
            return _AUDIO_SENT_AS[container]
    else:
        from PIL import Image

        bomb = (Image.DecompressionBombError, Image.DecompressionBombWarning)
        try:
            return _read_header(io.BytesIO(data)).mime
        except (*bomb, UnreadableImage):
            pass
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


#: Ends the warning for a limit the provider does not publish (``MediaConstraints.assumed``).
ASSUMED_NOTE = "fal publishes no such limit for this endpoint, so it is sent as is"


def _limit(limits: MediaConstraints, found: str, verdict: str, allowed: str, code: str) -> MediaProblem:
    """``found`` + ``verdict`` (``the image is 6000x4000 pixels`` ``, too large``) as an error;
    or, for a limit we assumed, a warning saying so — one line: what was found, what wanbatch
    assumes, and that fal publishes no such limit."""
    if limits.assumed:
        message = f"{found}: outside wanbatch's own assumed limits ({allowed}); {ASSUMED_NOTE}"
        return MediaProblem(message, "", "warning", code)
    return MediaProblem(found + verdict, allowed, "error", code)


#: Ends the warning for a value outside an advised limit (``MediaConstraints.advised``).
ADVISED_NOTE = "sent as is"


def _advise(
    limits: MediaConstraints, found: str, describe: Callable[[MediaConstraints], str], code: str
) -> MediaProblem:
    """A warning for ``found`` (``the image is 3840x2160 pixels``), inside the hard limits but
    outside the advised ones: both published figures (``describe`` of each), where each is
    published, and that it is sent as is — one line."""
    advised = limits.advised
    assert advised is not None  # only called for limits that have some
    message = (
        f"{found}: {advised.published_in} says {describe(limits.with_advised())}, "
        f"its input schema allows {describe(limits)}; {ADVISED_NOTE}"
    )
    return MediaProblem(message, "", "warning", code)


def _too_small(limits: MediaConstraints, width: int, height: int) -> bool:
    return (limits.min_width is not None and width < limits.min_width) or (
        limits.min_height is not None and height < limits.min_height
    )


def _too_large(limits: MediaConstraints, width: int, height: int) -> bool:
    return (limits.max_width is not None and width > limits.max_width) or (
        limits.max_height is not None and height > limits.max_height
    )


def _over_bytes(limits: MediaConstraints, size: int) -> bool:
    return limits.max_bytes is not None and size > limits.max_bytes


def _at_most(limits: MediaConstraints) -> str:
    return f"at most {_mb(limits.max_bytes or 0)}"


def _check_image(fh: BinaryIO, size: int, limits: MediaConstraints) -> tuple[MediaProblem, ...]:
    problems: list[MediaProblem] = []
    # Warnings of an advised limit, said only when no hard limit refuses the image.
    advice: list[MediaProblem] = []
    advised = limits.with_advised() if limits.advised is not None else None
    if _over_bytes(limits, size):
        problems.append(
            _limit(
                limits,
                f"the image is {_mb(size)}",
                ", larger than the endpoint accepts",
                _at_most(limits),
                "file_too_large",
            )
        )
    elif advised is not None and _over_bytes(advised, size):
        advice.append(_advise(limits, f"the image is {_mb(size)}", _at_most, "file_too_large"))
    from PIL import Image  # here, not at the top: see _read_header

    try:
        header = _read_header(fh)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Always an error, assumed limits or not: it protects this machine (and the user's bill).
        problems.append(MediaProblem(_bomb_found(exc), _bomb_allowed(), code="image_load_error"))
        return tuple(problems)
    except UnreadableImage:
        problems.append(
            MediaProblem("not a readable image", "an image " + _formats(limits), code="image_load_error")
        )
        return tuple(problems)
    fmt, width, height, alpha = header.format, header.width, header.height, header.alpha
    if fmt not in limits.formats:
        problems.append(
            _limit(
                limits,
                f"image format {fmt}",
                " is not accepted",
                _formats(limits),
                "unsupported_image_format",
            )
        )
    pixels = f"the image is {width}x{height} pixels"
    if _too_small(limits, width, height):
        problems.append(_limit(limits, pixels, ", too small", _dims(limits), "image_too_small"))
    elif advised is not None and _too_small(advised, width, height):
        advice.append(_advise(limits, pixels, _dims, "image_too_small"))
    if _too_large(limits, width, height):
        problems.append(_limit(limits, pixels, ", too large", _dims(limits), "image_too_large"))
    elif advised is not None and _too_large(advised, width, height):
        advice.append(_advise(limits, pixels, _dims, "image_too_large"))
    if alpha and not limits.alpha_allowed:
        problems.append(
            _limit(
                limits,
                "the image has an alpha channel (transparency)",
                ", which this endpoint refuses",
                "an image without alpha (flatten it, or save as JPEG)",
                "image_has_alpha",
            )
        )
    # Decoded only when nothing refuses it yet: a file over the byte limit is not even read whole.
    if not any(problem.severity == "error" for problem in problems):
        why = _decode_problem(fh)
        if why is not None:
            problems.append(
                MediaProblem(
                    f"the image is truncated or corrupt: {why}",
                    "a complete image " + _formats(limits) + ": save or export it again",
                    code="image_load_error",
                )
            )
    if not any(problem.severity == "error" for problem in problems):
        problems += advice + _header_notes(header)
    return tuple(problems)


def _bomb_found(exc: BaseException) -> str:
    """What a decompression bomb is told: its pixel count, never the limit (the ``allowed``
    part says that one, :func:`_bomb_allowed`). Pillow's text quotes twice the limit when its own
    check in ``Image.open`` raised, the limit itself when :func:`_refuse_bomb` did: quoted as it
    is, the line named two different limits."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    if found is None:
        return "refused as a decompression bomb"
    return f"refused as a decompression bomb: the image has {int(found[1]):,} pixels"


def _bomb_allowed() -> str:
    from PIL import Image

    most = Image.MAX_IMAGE_PIXELS
    return f"an image of at most {most or 0:,} pixels (Pillow's decompression-bomb guard)"


def audio_container(head: bytes) -> str | None:
    """``wav`` or ``mp3`` when the first bytes of a file are those of that container, else None.

    WAV: ``RIFF…WAVE``. MP3: an ID3v2 tag, or an MPEG audio layer III frame sync (``FF Ex``/``FF Fx``
    with layer bits ``01``; AAC's ADTS, layer ``00``, is not MP3)."""
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and (head[1] >> 1) & 0x03 == 0x01:
        return "mp3"
    return None


@dataclass(frozen=True, slots=True)
class AudioHeader:
    """What validation reads of an audio file: its container (``wav``/``mp3``) and length."""

    format: str
    duration_s: float


class UnreadableAudio(WanbatchError, ValueError):
    """The bytes are no WAV or MP3 audio this check can read; the message says why.
    (A :class:`ValueError` too, as it was before it joined the tree.)"""


#: The decoders FFmpeg may open while probing audio of each container: the MP3 decoder, or
#: WAV's PCM sample formats. Any other (an ID3 picture's PNG or TIFF, a WAV tagged WMA) is
#: refused before it reads a byte.
_AUDIO_DECODERS: dict[str, frozenset[str]] = {
    "mp3": frozenset({"mp3", "mp3float"}),
    "wav": frozenset(
        {
            *("pcm_u8", "pcm_s16le", "pcm_s24le", "pcm_s32le", "pcm_s64le"),
            *("pcm_f32le", "pcm_f64le", "pcm_alaw", "pcm_mulaw"),
        }
    ),
}


def read_audio_header(fh: BinaryIO) -> AudioHeader:
    """The container and duration of the audio in ``fh``, from its headers (nothing decoded).

    The container is sniffed from the first bytes (:func:`audio_container`) and the file is
    opened with that demuxer only: an untrusted file never chooses FFmpeg's demuxer (no playlist
    that opens other files, no exotic parser). Nor its decoders: opening a file probes its
    streams, which opens a decoder for each, and the file names them (an MP3's ID3 picture
    frame picks PNG, TIFF, …; a WAV's format tag any codec of FFmpeg's table). Only the MP3 or
    PCM decoders may be opened (FFmpeg's ``codec_whitelist``), and a WAV whose audio is not PCM
    is refused. :class:`UnreadableAudio` otherwise."""
    head = fh.read(16)
    fh.seek(0)
    container_format = audio_container(head)
    if container_format is None:
        raise UnreadableAudio("its bytes are neither WAV nor MP3, whatever its name says")
    import av  # here, not at the top: a manifest without audio never needs FFmpeg

    decoders = _AUDIO_DECODERS[container_format]
    try:
        with av.open(
            fh,
            mode="r",
            format=container_format,
            options={"codec_whitelist": ",".join(sorted(decoders))},
            # Its tags are never read: a title that is not UTF-8 must not refuse the audio.
            **avcompat.tolerant_metadata(),
        ) as container:
            if not container.streams.audio:
                raise UnreadableAudio(f"the {container_format.upper()} file has no audio stream")
            stream = container.streams.audio[0]
            if stream.codec_context.name not in decoders:
                raise UnreadableAudio(
                    f"its {container_format.upper()} audio is {stream.codec_context.name}, "
                    f"not {'MP3' if container_format == 'mp3' else 'PCM'}"
                )
            duration: float | None = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
    except UnreadableAudio:
        raise
    except (av.FFmpegError, OSError, ValueError, ZeroDivisionError, OverflowError) as exc:
        raise UnreadableAudio(f"its {container_format.upper()} data cannot be read") from exc
    if duration is None or not math.isfinite(duration) or duration <= 0:
        raise UnreadableAudio(f"its {container_format.upper()} duration cannot be read")
    return AudioHeader(container_format, duration)


def _check_audio(fh: BinaryIO, size: int, limits: MediaConstraints) -> tuple[MediaProblem, ...]:
    if _over_bytes(limits, size):
        # Not probed: the probe is bounded by the endpoint's own limit on bytes.
        return (
            _limit(
                limits,
                f"the audio is {_mb(size)}",
                ", too large",
                _at_most(limits),
                "file_too_large",
            ),
        )
    problems: list[MediaProblem] = []
    # Warnings of an advised limit, said only when no hard limit refuses the audio.
    advice: list[MediaProblem] = []
    advised = limits.with_advised() if limits.advised is not None else None
    if advised is not None and _over_bytes(advised, size):
        advice.append(_advise(limits, f"the audio is {_mb(size)}", _at_most, "file_too_large"))
    try:
        header = read_audio_header(fh)
    except UnreadableAudio as exc:
        return (
            MediaProblem(
                f"not a readable WAV or MP3 audio file ({exc})",
                _audio_allowed(limits),
                code="unsupported_audio_format",
            ),
        )
    if header.format not in {f.lower() for f in limits.formats}:
        problems.append(
            _limit(
                limits,
                f"audio format {header.format.upper()}",
                " is not accepted",
                _audio_allowed(limits),
                "unsupported_audio_format",
            )
        )
    seconds = header.duration_s
    length = f"the audio is {_seconds(seconds)} long"
    if _too_short(limits, seconds):
        problems.append(
            _limit(limits, length, ", too short", _audio_allowed(limits), "audio_duration_too_short")
        )
    elif advised is not None and _too_short(advised, seconds):
        advice.append(_advise(limits, length, _audio_allowed, "audio_duration_too_short"))
    if _too_long(limits, seconds):
        problems.append(
            _limit(limits, length, ", too long", _audio_allowed(limits), "audio_duration_too_long")
        )
    elif advised is not None and _too_long(advised, seconds):
        advice.append(_advise(limits, length, _audio_allowed, "audio_duration_too_long"))
    if not any(problem.severity == "error" for problem in problems):
        problems += advice
    return tuple(problems)


def _too_short(limits: MediaConstraints, seconds: float) -> bool:
    return limits.min_duration_s is not None and seconds < limits.min_duration_s


def _too_long(limits: MediaConstraints, seconds: float) -> bool:
    return limits.max_duration_s is not None and seconds > limits.max_duration_s


def _audio_allowed(limits: MediaConstraints) -> str:
    """``WAV or MP3, 3 to 30 s, up to 15 MB (15,000,000 bytes)``: what the endpoint accepts."""
    text = " or ".join(f.upper() for f in limits.formats)
    lo, hi = limits.min_duration_s, limits.max_duration_s
    if lo is not None and hi is not None:
        text += f", {_num(lo)} to {_num(hi)} s long"
    elif lo is not None:
        text += f", at least {_num(lo)} s long"
    elif hi is not None:
        text += f", at most {_num(hi)} s long"
    if limits.max_bytes is not None:
        text += f", up to {_mb(limits.max_bytes)}"
    return text


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _seconds(value: float) -> str:
    """``1 s``, ``2.96 s``: a duration to the hundredth, never rounded into the allowed range."""
    return f"{value:.2f}".rstrip("0").rstrip(".") + " s"


def _dims(limits: MediaConstraints) -> str:
    lo = f"{limits.min_width or 1}x{limits.min_height or 1}"
    hi = f"{limits.max_width}x{limits.max_height}" if limits.max_width else "any size"
    return f"from {lo} to {hi} pixels"


def _mb(size: int) -> str:
    """``25 MB (25,000,000 bytes)``, ``25.5 MB (25,500,000 bytes)``: a size in decimal megabytes,
    as fal's pages write their limits ("Max size: 25MB", "Up to 15 MB"), so a refusal quotes the
    limit in the page's own figure; the exact bytes beside it settle any rounding."""
    megabytes = f"{size / 1_000_000:.1f}".removesuffix(".0")
    return f"{megabytes} MB ({size:,} bytes)"


def data_uri_sha256(value: str) -> str | None:
    """SHA-256 hex of a base64 data URI's decoded bytes (the same image as a file has the same
    hash, whatever the URI's media type says); None when it is not one that decodes."""
    header, sep, payload = value.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        return None
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str | None:
    """Hex sha256 of a file's bytes, cached by path, size and mtime; None when unreadable."""
    try:
        info = path.stat()
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return _sha256_cached(str(path), info.st_size, info.st_mtime_ns)


@lru_cache(maxsize=65536)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str | None:
    del size, mtime_ns  # part of the cache key only
    try:
        with Path(path).open("rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None
