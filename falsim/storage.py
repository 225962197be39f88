"""The simulator's file store: uploads (both of fal's flows) and generated videos, in memory.

fal serves files from public CDN URLs; here every file lives under ``{base}/files/{key}/{name}``
on the simulator itself, so a URL the simulator handed out can be checked ("does this upload
exist?") without any network. Files may carry an expiry (``X-Fal-Object-Lifecycle-Preference``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from jobs.media import sent_form


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One file's bytes (or how to make them again) and how to serve them.

    Generated videos are stored as a ``source`` callable rather than bytes: the bytes are a
    pure function of the output's tag, so a long simulator session keeps a tag per video
    instead of megabytes.
    """

    key: str
    name: str
    content_type: str
    source: bytes | Callable[[], bytes]
    size: int
    expires_at: float | None = None  # time.time() seconds; None never expires

    def read(self) -> bytes:
        """The file's bytes (may render them: call off the event loop for big files)."""
        return self.source if isinstance(self.source, bytes) else self.source()

    def expired(self, now: float | None = None) -> bool:
        """Whether the file's lifecycle has ended."""
        return self.expires_at is not None and (now or time.time()) >= self.expires_at


class FileStore:
    """Files by key, plus pending upload slots from ``/storage/upload/initiate``. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, StoredFile] = {}
        self._pending: dict[str, tuple[str, str]] = {}  # upload key -> (file name, content type)
        self.base_url = ""

    def file_url(self, key: str, name: str) -> str:
        """The public URL of a stored file."""
        return f"{self.base_url}/files/{key}/{quote(name, safe='')}"

    def put(
        self,
        data: bytes | Callable[[], bytes],
        name: str,
        content_type: str,
        *,
        size: int | None = None,
        expires_in: float | None = None,
        key: str | None = None,
    ) -> StoredFile:
        """Store ``data`` (bytes, or a callable with the file's ``size``); a fresh key unless given."""
        if size is None:
            if not isinstance(data, bytes):
                raise ValueError("a lazily made file needs its size")
            size = len(data)
        stored = StoredFile(
            key=key or uuid.uuid4().hex,
            name=name,
            content_type=content_type,
            source=data,
            size=size,
            expires_at=None if expires_in is None else time.time() + expires_in,
        )
        with self._lock:
            self._files[stored.key] = stored
        return stored

    def get(self, key: str) -> StoredFile | None:
        """The file under ``key`` unless it is unknown or expired."""
        with self._lock:
            stored = self._files.get(key)
        return None if stored is None or stored.expired() else stored

    def reserve(self, name: str, content_type: str) -> str:
        """A key for a later ``PUT`` of the bytes (fal's two-step "initiate" upload)."""
        key = uuid.uuid4().hex
        with self._lock:
            self._pending[key] = (name, content_type)
        return key

    def complete(self, key: str, data: bytes, content_type: str | None) -> StoredFile | None:
        """Store the bytes for a reserved key; None when the key was never reserved."""
        with self._lock:
            pending = self._pending.pop(key, None)
        if pending is None:
            return None
        name, reserved_type = pending
        return self.put(data, name, content_type or reserved_type, key=key)

    def lookup_url(self, url: str) -> bool | None:
        """True/False for a URL of this store (file present or not); None for any other URL.
        Its scheme counts in any case (``HTTP://``), as a download reads it."""
        url = sent_form(url)
        if not self.base_url or not url.startswith(self.base_url + "/files/"):
            return None
        parts = urlsplit(url).path.split("/")
        return len(parts) >= 3 and self.get(unquote(parts[2])) is not None

    def data_for_url(self, url: str) -> bytes | None:
        """The bytes behind a URL of this store, or None."""
        if self.lookup_url(url) is not True:
            return None
        stored = self.get(unquote(urlsplit(url).path.split("/")[2]))
        return None if stored is None else stored.read()

    def clear(self) -> None:
        """Forget every file and pending upload."""
        with self._lock:
            self._files.clear()
            self._pending.clear()
