"""Getting media to fal (inline data URIs or storage uploads) and outputs back (safe downloads).

Uploads use fal's storage *initiate* flow on the REST API (the one fal-js uses and the simulator
implements): ``POST {rest}/storage/upload/initiate?storage_type=fal-cdn-v3`` → ``{upload_url,
file_url}``, then ``PUT`` the bytes to ``upload_url``. The signed upload host never sees the key.

"Upload each distinct file once" needs memory across runs, which lives in the database; this
module only offers the seam (:class:`MediaPreparer` takes lookup/record callbacks keyed by
SHA-256) so it stays free of SQL.

Downloads are written so a crash can never leave a half file under the final name: stream to a
temp file beside the destination, hash while streaming, fsync, ``os.replace``. Only http(s) URLs
are fetched, redirects are followed by hand with every hop re-checked, and an optional host
allow-list (``*.fal.media``) narrows it further (SSRF, reliability-notes §5.3).

Size-mismatch policy: the output was already paid for, so a size that differs from fal's
``file_size`` (announced by ``Content-Length`` or counted while streaming) raises
:class:`~worker.fal.errors.DownloadIntegrityError`, which is *retryable* — a CDN object that is
still propagating or a cut response heals on a later try, and the caller's bounded download
attempts decide when to give up. Only going over ``max_bytes`` (or a refused URL) is final.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import mimetypes
import os
import re
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from jobs.errors import FinalProviderError, ProviderError, RetryableProviderError, UsageError
from worker.fal.client import FalClient
from worker.fal.errors import DownloadIntegrityError, classify_poll, translate_transport
from worker.fal.models import DownloadResult

STORAGE_TYPE = "fal-cdn-v3"
_CHUNK = 1024 * 1024
_URL_PREFIXES = ("http://", "https://", "data:")

#: Output extensions by content type; anything else is ``.bin``, never a provider-chosen suffix.
_EXTENSIONS = {
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "audio/mpeg": ".mp3",
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
}
_SAFE_PART = re.compile(r"[^A-Za-z0-9_-]+")


# ---------------------------------------------------------------------------------------- upload


class FalStorage:
    """fal's storage API through a :class:`FalClient` (same transport, timeouts and key)."""

    def __init__(self, client: FalClient) -> None:
        self._client = client

    def upload_file(self, data: bytes | Path, content_type: str, file_name: str | None = None) -> str:
        """Upload bytes (or a file's bytes) and return the public ``file_url`` fal serves them at.

        Both steps are safe to repeat (an upload is never billed as a job), so they get the
        client's bounded retry.
        """
        payload = data.read_bytes() if isinstance(data, Path) else data
        name = file_name or (data.name if isinstance(data, Path) else "upload.bin")
        initiate = self._client.send_idempotent(
            "POST",
            "upload initiate",
            f"{self._client.rest_url}/storage/upload/initiate",
            params={"storage_type": STORAGE_TYPE},
            json={"file_name": name, "content_type": content_type},
        )
        body = initiate.json()
        upload_url = body.get("upload_url") if isinstance(body, dict) else None
        file_url = body.get("file_url") if isinstance(body, dict) else None
        if not isinstance(upload_url, str) or not isinstance(file_url, str):
            raise RetryableProviderError(
                "fal upload initiate: the answer lacks upload_url/file_url", status_code=initiate.status_code
            )
        _check_url(upload_url)
        self._client.send_idempotent(
            "PUT", "upload", upload_url, content=payload, headers={"Content-Type": content_type}
        )
        return file_url


def to_data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,…``, which fal's models accept wherever they accept a URL."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def guess_mime(path: Path) -> str:
    """The MIME type from the file suffix (the validator already checked the real format)."""
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


Lookup = Callable[[str], str | None]
#: ``record(sha256, url, size_bytes, content_type)``: remember an upload.
Record = Callable[[str, str, int, str], None]
Uploader = Callable[[bytes, str, str], str]


@dataclass
class MediaPreparer:
    """Turns local media paths into something fal can fetch, uploading each distinct file once.

    ``lookup(sha256) -> url | None`` and ``record(sha256, url, size, type)`` are the cache (the
    worker plugs in the ``Upload`` table). ``root``, when given, confines local files to that
    folder so a manifest cannot publish ``~/.ssh/id_rsa`` to a public CDN.

    Concurrent submits of jobs sharing an image (threads of one worker) wait for one upload
    per content hash instead of racing to upload it twice. Across hosts two workers may still
    both upload the same new file at the same instant: uploads are free, and the later record
    simply wins, so that case is tolerated rather than locked against.
    """

    uploader: Uploader
    inline_max_bytes: int
    lookup: Lookup | None = None
    record: Record | None = None
    root: Path | None = None
    _locks: dict[str, threading.Lock] = field(default_factory=dict, init=False, repr=False)
    _locks_guard: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def _lock_for(self, digest: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(digest, threading.Lock())

    @classmethod
    def for_storage(
        cls,
        storage: FalStorage,
        *,
        inline_max_bytes: int,
        lookup: Lookup | None = None,
        record: Record | None = None,
        root: Path | None = None,
    ) -> MediaPreparer:
        return cls(storage.upload_file, inline_max_bytes, lookup, record, root)

    def prepare(self, value: str) -> str:
        """A URL or data URI unchanged; a local absolute path as a data URI or an uploaded URL."""
        if value.startswith(_URL_PREFIXES):
            return value
        path = Path(value)
        if not path.is_absolute():
            raise UsageError(f"media path must be absolute after manifest loading, got {value!r}")
        resolved = path.resolve()
        if self.root is not None and not resolved.is_relative_to(self.root.resolve()):
            raise UsageError(f"media file {value!r} is outside the manifest folder {str(self.root)!r}")
        if not resolved.is_file():
            raise UsageError(f"media file {value!r} does not exist")
        data = resolved.read_bytes()
        mime = guess_mime(resolved)
        if len(data) <= self.inline_max_bytes:
            return to_data_uri(data, mime)
        digest = hashlib.sha256(data).hexdigest()
        with self._lock_for(digest):
            if self.lookup is not None:
                known = self.lookup(digest)
                if known:
                    return known
            # The public CDN gets a content-derived name, never the user's local file name.
            url = self.uploader(data, mime, f"{digest[:16]}{resolved.suffix.lower()}")
            if self.record is not None:
                self.record(digest, url, len(data), mime)
            return url


def prepare_input(
    input: Mapping[str, Any], media_fields: Iterable[str], *, preparer: MediaPreparer
) -> dict[str, Any]:
    """A copy of ``input`` whose media fields hold URLs or data URIs instead of local paths."""
    out = dict(input)
    for name in media_fields:
        value = out.get(name)
        if isinstance(value, str):
            out[name] = preparer.prepare(value)
        elif isinstance(value, list):
            out[name] = [preparer.prepare(v) if isinstance(v, str) else v for v in value]
    return out


# -------------------------------------------------------------------------------------- download


def _host_allowed(host: str, allowed: Collection[str]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    return False


def _check_url(url: str, allowed_hosts: Collection[str] | None = None) -> httpx.URL:
    """Refuse anything but plain http(s) URLs (no ``file:``, no credentials), optionally allow-listed."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise FinalProviderError(f"refusing malformed URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise FinalProviderError(f"refusing to fetch a {parsed.scheme or 'scheme-less'} URL")
    if parsed.userinfo:
        raise FinalProviderError("refusing a URL with embedded credentials")
    if allowed_hosts is not None and not _host_allowed(parsed.host, allowed_hosts):
        raise FinalProviderError(f"refusing to fetch from host {parsed.host!r} (not in the allow-list)")
    return parsed


def _download_error(response: httpx.Response) -> ProviderError:
    error = classify_poll("download", response)
    if response.status_code in (401, 403, 404, 410):
        # A CDN that no longer serves the file: the media URL expired; fetching again cannot help.
        return FinalProviderError(
            f"output no longer downloadable (HTTP {response.status_code})", status_code=response.status_code
        )
    return error


def download(
    url: str,
    dest: Path,
    *,
    expected_size: int | None = None,
    max_bytes: int,
    client: httpx.Client | None = None,
    timeout: httpx.Timeout | None = None,
    allowed_hosts: Collection[str] | None = None,
    max_redirects: int = 3,
) -> DownloadResult:
    """Fetch ``url`` into ``dest`` atomically and return its size and SHA-256.

    ``client`` should not carry the fal key (CDN hosts never need it); by default a plain client
    with ``timeout`` (or 10 s connect / 60 s read) is used and closed.
    """
    current = _check_url(url, allowed_hosts)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    own = client is None
    http = client or httpx.Client(timeout=timeout or httpx.Timeout(60.0, connect=10.0))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            digest, size = _stream_into(
                http, current, fh, expected_size, max_bytes, allowed_hosts, max_redirects
            )
            fh.flush()
            os.fsync(fh.fileno())
        if expected_size is not None and size != expected_size:
            raise DownloadIntegrityError(
                f"download truncated or padded: got {size} bytes, expected {expected_size}"
            )
        tmp.replace(dest)
        _fsync_dir(dest.parent)
        return DownloadResult(path=dest, sha256=digest, size=size)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        if own:
            http.close()


def _stream_into(
    http: httpx.Client,
    url: httpx.URL,
    fh: IO[bytes],
    expected_size: int | None,
    max_bytes: int,
    allowed_hosts: Collection[str] | None,
    max_redirects: int,
) -> tuple[str, int]:
    for _hop in range(max_redirects + 1):
        try:
            with http.stream("GET", url, follow_redirects=False) as response:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    url = _check_url(str(url.join(location)), allowed_hosts)
                    continue
                if not response.is_success:
                    response.read()
                    raise _download_error(response)
                announced = _content_length(response)
                if announced is not None:
                    if announced > max_bytes:
                        raise FinalProviderError(
                            f"download refused: {announced} bytes is over the {max_bytes} cap"
                        )
                    if expected_size is not None and announced != expected_size:
                        raise DownloadIntegrityError(
                            f"download size mismatch: the server has {announced} bytes, "
                            f"fal described {expected_size}"
                        )
                hasher = hashlib.sha256()
                size = 0
                for chunk in response.iter_bytes(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FinalProviderError(f"download aborted: more than the {max_bytes}-byte cap")
                    hasher.update(chunk)
                    fh.write(chunk)
                return hasher.hexdigest(), size
        except httpx.TransportError as exc:
            raise translate_transport("download", exc) from exc
        except httpx.HTTPError as exc:  # decoding and stream errors: the bytes were not right
            raise RetryableProviderError(f"download failed ({type(exc).__name__})") from exc
    raise FinalProviderError(f"download refused: more than {max_redirects} redirects")


def _content_length(response: httpx.Response) -> int | None:
    if response.headers.get("content-encoding", "identity") != "identity":
        return None  # the length is of the encoded body, not of the file
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); harmless where directories cannot be opened."""
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


# --------------------------------------------------------------------------------------- naming


def safe_output_name(
    batch_id: object, job_id: object, attempt: int | None = None, *, content_type: str | None = None
) -> str:
    """A file name built only from our own ids (never fal's ``file_name``: path traversal).

    ``content_type`` picks the extension from a fixed table; unknown types get ``.bin``.
    """
    parts = [_SAFE_PART.sub("_", str(batch_id))[:64], _SAFE_PART.sub("_", str(job_id))[:64]]
    if attempt is not None:
        parts.append(f"a{int(attempt)}")
    stem = "-".join(p.strip("_") or "x" for p in parts)
    mime = (content_type or "").split(";")[0].strip().lower()
    return stem + _EXTENSIONS.get(mime, ".bin")


def confined_path(root: Path, name: str) -> Path:
    """``root/name``, refusing any name that would land outside ``root``."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UsageError(f"unsafe output file name {name!r}")
    base = root.resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base) or path.parent != base:
        raise UsageError(f"output file name {name!r} escapes {str(root)!r}")
    return path
