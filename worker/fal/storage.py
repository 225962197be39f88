"""Getting media to fal (inline data URIs or storage uploads) and outputs back (safe downloads).

Uploads use fal's storage *initiate* flow on the REST API (the one fal-js uses and the simulator
implements): ``POST {rest}/storage/upload/initiate?storage_type=fal-cdn-v3`` → ``{upload_url,
file_url}``, then ``PUT`` the bytes to ``upload_url``. The signed upload host never sees the key.

"Upload each distinct file once" needs memory across runs, which lives in the database; this
module only offers the seam (:class:`MediaPreparer` takes lookup/record callbacks keyed by
SHA-256) so it stays free of SQL.

Downloads are written so a crash can never leave a half file under the final name: stream to a
temp file of its own beside the destination (made with the user's usual file mode, as a plain
``open()`` gives: :func:`jobs.outputs.create_temporary`), hash while streaming, fsync, rename
(a hard link when the name must not be taken over a file). Only
http(s) URLs are fetched, redirects are followed by hand with every hop re-checked, and
:class:`DownloadPolicy` refuses internal addresses (loopback, private, link-local, …) at connect
time unless the URL is on a configured fal origin (scheme, host and port) or allow-listed
(SSRF). The body must be a video container sent without a ``Content-Encoding`` (what is
counted and capped is what is written), and one attempt may take at most ``total_timeout``
seconds.

Size-mismatch policy: the output was already paid for, so a size that differs from fal's
``file_size`` (announced by ``Content-Length`` or counted while streaming: a body is stopped
as soon as it passes that size) raises
:class:`~worker.fal.errors.DownloadIntegrityError`, which is *retryable* — a CDN object that is
still propagating or a cut response heals on a later try, and the caller's bounded download
attempts decide when to give up. Only going over ``max_bytes`` (or a refused URL) is final.
An MP4 cut short is refused the same way, from its top-level boxes (:mod:`worker.mp4`), whether
or not fal gave a size: without one, a body ended by the connection closing (or by a short
``Content-Length``) is otherwise indistinguishable from a whole one.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import ipaddress
import mimetypes
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import httpx

from jobs.endpoints import FieldType
from jobs.errors import (
    FinalProviderError,
    MissingInputError,
    ProviderError,
    RetryableProviderError,
    UsageError,
)
from jobs.fs import file_kind, is_missing, os_reason, shown_in_folder, shown_path
from jobs.http_environment import no_proxy_entries, no_proxy_pattern, proxy_variables
from jobs.key_forms import holds_known_key
from jobs.media import MediaKind, classify, media_type, sent_form
from jobs.outputs import PARTIAL_SUFFIX, OutputWriteError, create_temporary, fsync_dir
from jobs.settings import DOWNLOAD_PROXY_FROM_ENV, allowed_host_entry
from jobs.url_secrets import masked_url
from worker.fal.client import FalClient
from worker.fal.errors import (
    DownloadIntegrityError,
    DownloadRefusedError,
    DownloadUnreachedError,
    cannot_connect,
    classify_poll,
    map_transport_errors,
    parse_body,
)
from worker.fal.http import (
    ACCEPT_ENCODING,
    CookielessClient,
    DeadlineBackend,
    cut_off_at,
    direct_mounts,
    environment_checked,
    origin,
    resolve,
    shared_ssl_context,
    with_body,
)
from worker.fal.models import DownloadResult
from worker.mp4 import fd_truncation

STORAGE_TYPE = "fal-cdn-v3"


# ---------------------------------------------------------------------------------------- upload


class FalStorage:
    """fal's storage API through a :class:`FalClient` (same transport, timeouts and key).

    The bytes are PUT to the ``upload_url`` fal's answer names, a host of fal's storage
    provider: like a download's URL, it is checked against ``policy`` (the worker's
    :class:`DownloadPolicy`: fal's own origins, the allow-list, or public addresses only) and
    sent through a :func:`guarded_client` (no key, no proxy, the address checked when
    connecting), with redirects refused. Otherwise an initiate answer naming
    ``http://169.254.169.254/…`` or ``127.0.0.1:6379`` would make the worker PUT a user's image
    there. Without ``policy``, the client's own URLs are fal's origins and there is no allow-list.
    ``transport`` replaces the guarded transport of the PUT (tests only).
    """

    def __init__(
        self,
        client: FalClient,
        policy: DownloadPolicy | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._client = client
        self._policy = policy or DownloadPolicy.for_urls(
            [client.queue_url, client.rest_url], None, client.keys()
        )
        self._transport = transport

    def upload_file(self, data: bytes | Path, content_type: str, file_name: str | None = None) -> str:
        """Upload bytes (or a file's bytes) and return the public ``file_url`` fal serves them at.

        Both steps are safe to repeat (an upload is never billed as a job), so they get the
        client's bounded retry. Every error is scrubbed of the key by the client, whatever the
        storage API echoed (the job's error is stored and exported).
        """
        payload = data.read_bytes() if isinstance(data, Path) else data
        name = file_name or (data.name if isinstance(data, Path) else "upload.bin")
        with self._client.scrubbed():
            initiate = self._client.send_idempotent(
                "POST",
                "upload initiate",
                f"{self._client.rest_url}/storage/upload/initiate",
                params={"storage_type": STORAGE_TYPE},
                json={"file_name": name, "content_type": content_type},
            )
            body = parse_body(initiate)
            upload_url = body.get("upload_url") if isinstance(body, dict) else None
            file_url = body.get("file_url") if isinstance(body, dict) else None
            if not isinstance(upload_url, str) or not isinstance(file_url, str):
                raise RetryableProviderError(
                    "fal upload initiate: the answer lacks upload_url/file_url",
                    status_code=initiate.status_code,
                )
            # Either holding the key (the secret in a signed upload URL's query, a file_url that
            # would be stored with the job's input and sent to fal) is refused before either is used.
            if self._client.holds_key(upload_url) or self._client.holds_key(file_url):
                raise FinalProviderError(KEY_IN_URL)
            _check_url(upload_url, self._policy)
            _check_url(file_url)  # it goes into the job's input: fal must be able to fetch it
            with self._upload_client() as uploads:
                self._client.send_idempotent(
                    "PUT",
                    "upload",
                    upload_url,
                    classify=_upload_error,
                    via=uploads,
                    content=payload,
                    headers={"Content-Type": content_type},
                )
            return file_url

    def _upload_client(self) -> httpx.Client:
        """A client for one upload's PUT: guarded like a download's (uploads are few, and
        cached by content, so a client of its own costs little)."""
        timeout = self._client.timeout
        if self._transport is None:
            uploads = guarded_client(self._policy, timeout)
        else:
            uploads = CookielessClient(transport=self._transport, timeout=timeout, trust_env=False)
        # The codings its answer is read in (read_capped), not httpx's default, which grows
        # with the decoders installed.
        uploads.headers["Accept-Encoding"] = ACCEPT_ENCODING
        return uploads


def _upload_error(response: httpx.Response) -> ProviderError:
    """A redirect from the upload host is refused, not followed: its target was never checked
    (RFC 9110 §15.4.8: a 307 repeats the PUT, body and all, wherever it points). The download
    proxy's own 502/503/504 to a forwarded ``http://`` PUT (:func:`proxy_gateway_error`) is a
    PUT that never reached the host (:class:`DownloadUnreachedError`: the submit is held)."""
    if response.is_redirect:
        return FinalProviderError(
            f"fal upload: the upload URL answered a redirect (HTTP {response.status_code}); not followed",
            status_code=response.status_code,
        )
    if (own := proxy_gateway_error(response)) is not None:
        # The download proxy could not reach the upload host: nothing was stored, nothing sent.
        held = _proxy_failed(response.request.url, response, own)
        return DownloadUnreachedError(f"fal upload: {held}", host=held.host, proxy=held.proxy)
    return classify_poll("upload", response)


def to_data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,…``, which fal's models accept wherever they accept a URL."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def upload_suffix(mime: str) -> str:
    """The suffix of an upload's (content-derived) file name: its type's (``.jpg`` for
    ``image/jpeg``), never the user's file's, which may be wrong (``photo.heic`` holding a
    JPEG) or missing."""
    return mimetypes.guess_extension(mime) or ""


#: ``lookup(sha256, content_type) -> url | None``: an upload of this content under this type.
Lookup = Callable[[str, str], str | None]
#: ``record(sha256, url, size_bytes, content_type)``: remember an upload.
Record = Callable[[str, str, int, str], None]
Uploader = Callable[[bytes, str, str], str]


@dataclass
class MediaPreparer:
    """Turns local media paths into something fal can fetch, uploading each distinct file once.

    ``lookup(sha256, type) -> url | None`` and ``record(sha256, url, size, type)`` are the cache
    (the worker plugs in the ``Upload`` table); an upload remembered under another content type
    (an earlier version took the type from the file name) is not reused: the file is uploaded
    again, under the type of its content. ``root``, when given, confines local files to that
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

    def prepare(
        self,
        value: str,
        *,
        kind: FieldType | None = None,
        expected_sha256: str | None = None,
        folder: str | os.PathLike[str] | None = None,
    ) -> str:
        """A URL or data URI as written but for its scheme, sent in lower case
        (:func:`jobs.media.sent_form`: ``HTTPS://`` goes as ``https://``); a local absolute path
        as a data URI or an uploaded URL. Which form a value takes is decided by
        :func:`jobs.media.classify`, as validation decided it (schemes in any case).

        The type it is sent as (the data URI's, the upload's content type and file name suffix)
        is that of its content, as validation detected it (:func:`jobs.media.media_type`; an
        image's format, whatever its file name says); ``kind`` is the field's (``None``: tried
        as an image first).

        ``expected_sha256``: the hash of the file's bytes when the manifest was validated (the
        job's ``source_files``). Bytes that differ now are refused, not sent: what was validated
        (size, format, the job key, the estimate) is what is sent, and what the export says was
        sent. A file rewritten in place since then would go out unchecked — empty, or too small
        for fal — to be paid for, with the wrong hash in the dataset.

        ``folder``: the manifest's folder. A refusal (stored as the job's error, and exported)
        names the file relative to it (``images/car.png``), as the manifest wrote it, and on one
        line (:func:`jobs.fs.shown_in_folder`); absolute when outside it or not given.
        """
        if classify(value) in (MediaKind.URL, MediaKind.DATA_URI):
            return sent_form(value)
        path = Path(value)
        if not path.is_absolute():
            raise UsageError(f"media path must be absolute after manifest loading, got '{shown_path(value)}'")
        name = shown_in_folder(path, folder)
        resolved = path.resolve()
        if self.root is not None and not resolved.is_relative_to(self.root.resolve()):
            raise UsageError(f"media file '{name}' is outside the manifest folder '{shown_path(self.root)}'")
        if resolved != path:
            # The manifest stored this path fully resolved, after confining it to an allowed
            # folder (jobs.media.resolve_local). Leading elsewhere now means a symlink appeared
            # since then, and it could point anywhere: refuse rather than read it.
            raise UsageError(
                f"media file '{name}' now leads to '{shown_path(resolved)}' (a symlink appeared after "
                "validation); not sent"
            )
        found = file_kind(resolved)
        if isinstance(found, OSError):
            if is_missing(found):  # moved, deleted, or its disk not mounted: the batch waits
                raise MissingInputError(f"media file '{name}' does not exist", str(path))
            raise UsageError(f"media file '{name}' cannot be read: {os_reason(found)}")
        if found != "file":
            raise UsageError(f"media file '{name}' is not a regular file")
        try:
            data = resolved.read_bytes()
        except OSError as exc:  # removed or locked since it was looked at
            if is_missing(exc):
                raise MissingInputError(f"media file '{name}' does not exist", str(path)) from exc
            raise UsageError(f"media file '{name}' cannot be read: {os_reason(exc)}") from exc
        digest = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise UsageError(
                f"media file '{name}' changed since the manifest was validated (its bytes differ); "
                "not sent: put the original back, or submit the manifest again to validate the new one"
            )
        mime = media_type(data, resolved.name, kind)
        if len(data) <= self.inline_max_bytes:
            return to_data_uri(data, mime)
        with self._lock_for(digest):
            if self.lookup is not None:
                known = self.lookup(digest, mime)
                if known:
                    return known
            # The public CDN gets a content-derived name, never the user's local file name.
            url = self.uploader(data, mime, f"{digest[:16]}{upload_suffix(mime)}")
            if self.record is not None:
                self.record(digest, url, len(data), mime)
            return url


def prepare_input(
    input: Mapping[str, Any],
    media_fields: Iterable[str] | Mapping[str, FieldType],
    *,
    preparer: MediaPreparer,
    source_files: Mapping[str, Any] | None = None,
    folder: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """A copy of ``input`` whose media fields hold URLs or data URIs instead of local paths.

    ``media_fields``: the names, or each name with its field's type (image or audio: what
    :meth:`MediaPreparer.prepare` takes the type to send from).

    ``source_files`` (the job's, :mod:`jobs.manifest.sources`): each local file must still hold
    the bytes whose SHA-256 was recorded when the manifest was validated.

    ``folder``: the manifest's folder, which a refused file is named relative to
    (:meth:`MediaPreparer.prepare`).
    """
    out = dict(input)
    kinds: Mapping[str, FieldType] = media_fields if isinstance(media_fields, Mapping) else {}
    for name in media_fields:
        value = out.get(name)
        kind = kinds.get(name)
        if isinstance(value, str):
            recorded = (source_files or {}).get(name)
            expected = recorded.get("sha256") if isinstance(recorded, Mapping) else None
            digest = expected if isinstance(expected, str) else None
            out[name] = preparer.prepare(value, kind=kind, expected_sha256=digest, folder=folder)
        elif isinstance(value, list):
            out[name] = [
                preparer.prepare(v, kind=kind, folder=folder) if isinstance(v, str) else v for v in value
            ]
    return out


def upload_again(
    sent: Mapping[str, Any],
    stored: Mapping[str, Any],
    media_fields: Mapping[str, FieldType],
    *,
    preparer: MediaPreparer,
    source_files: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A copy of ``sent`` (an input as it went to a fal, :func:`prepare_input`'s result) whose
    uploads are made again through ``preparer``: each media field sent as a URL where the job's
    ``stored`` input holds a local file, with the SHA-256 its ``source_files`` recorded, gets
    the URL of the same bytes uploaded anew. For a ``run --simulate`` that gives an earlier,
    stopped run's requests back to its own simulator: that run's uploads went with its
    simulator, and the model must see the image the request was sent with, not a URL it cannot
    read. A file gone, unreadable, or whose bytes differ from the recorded ones now keeps the URL
    it was sent with (its bytes are not known any more); so does a field of any other kind."""
    out = dict(sent)
    for name, kind in media_fields.items():
        value, local = sent.get(name), stored.get(name)
        recorded = (source_files or {}).get(name)
        digest = recorded.get("sha256") if isinstance(recorded, Mapping) else None
        if not (
            isinstance(value, str)
            and classify(value) is MediaKind.URL
            and isinstance(local, str)
            and classify(local) is MediaKind.PATH
            and isinstance(digest, str)
        ):
            continue
        try:
            out[name] = preparer.prepare(local, kind=kind, expected_sha256=digest)
        except UsageError:
            continue
    return out


# -------------------------------------------------------------------------------------- download

#: What a video container starts with: an ISO-BMFF box (MP4/MOV: ``ftyp`` first, or a QuickTime
#: ``moov``/``mdat``/``wide``/``free`` box) at offset 4, or the EBML magic of WebM/Matroska.
_BMFF_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_SNIFF_BYTES = 16


def _norm_host(host: str) -> str:
    """A host as compared: lower case, no IPv6 brackets, no trailing dot."""
    return host.strip("[]").lower().rstrip(".")


def _host_allowed(host: str, port: int | None, allowed: Collection[str]) -> bool:
    host = _norm_host(host)
    for entry in allowed:
        pattern, only_port = allowed_host_entry(entry)
        if only_port is not None and only_port != port:
            continue
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    return False


#: The hosts fal serves its outputs from, allowed (at public addresses only) whatever
#: ``WANBATCH_DOWNLOAD_ALLOWED_HOSTS`` lists: the setting names hosts *beyond* fal's. Generated
#: and uploaded files live on fal's CDN, ``v3.fal.media`` / ``v3b.fal.media`` (older ones on
#: ``fal.media``): https://docs.fal.ai/faq, https://fal.ai/docs/model-apis/data-retention,
#: and the example outputs of its model pages (``https://v3b.fal.media/files/…``,
#: https://fal.ai/models/fal-ai/wan/v2.6/image-to-video/api). Some endpoints' outputs are on
#: Google Cloud Storage, ``https://storage.googleapis.com/falserverless/…``
#: (https://fal.ai/models/fal-ai/wan-i2v/api, https://fal.ai/models/fal-ai/wan-t2v/api).
FAL_MEDIA_HOSTS = ("*.fal.media", "fal.media", "storage.googleapis.com")


def allow_entry(host: str, port: int | None) -> str:
    """The ``WANBATCH_DOWNLOAD_ALLOWED_HOSTS`` entry that allows ``host`` on ``port`` and no more
    than needed: the host alone on the web's ports (80, 443), else ``host:port`` (``[v6]:port``)."""
    name = _norm_host(host)
    shown = f"[{name}]" if ":" in name else name
    return shown if port in (None, 80, 443) else f"{shown}:{port}"


def allow_setting(allowed: Iterable[str] | None, entry: str) -> str:
    """``WANBATCH_DOWNLOAD_ALLOWED_HOSTS=…`` as it would allow ``entry`` too: the entries set so
    far (``allowed``; None: unset), then it."""
    entries = [e.strip() for e in allowed or () if e.strip()]
    if entry not in entries:
        entries.append(entry)
    return "WANBATCH_DOWNLOAD_ALLOWED_HOSTS=" + ",".join(entries)


#: Why an address in a range some tools hand out is internal, beyond its kind: a fake-IP VPN
#: or proxy (Clash, Surge, sing-box…) answers every name with one of 198.18.0.0/15 (RFC 2544's
#: benchmarking range, which Python's ``ipaddress`` counts as private); 100.64.0.0/10 is
#: carrier-grade NAT's shared space (RFC 6598), also Tailscale's.
_RANGE_NOTES = (
    (ipaddress.ip_network("198.18.0.0/15"), "the range fake-IP VPN and proxy tools answer with"),
    (ipaddress.ip_network("100.64.0.0/10"), "carrier-grade NAT's shared range, which Tailscale uses too"),
)


def _range_note(address: str) -> str:
    """What else to say of ``address``'s range (:data:`_RANGE_NOTES`), or ""."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return ""
    for network, note in _RANGE_NOTES:
        if ip.version == network.version and ip in network:
            return f" ({note})"
    return ""


def _port(url: httpx.URL) -> int | None:
    """The URL's port, the scheme's default made explicit (as in :func:`origin`)."""
    return origin(url)[2]


def internal_address_kind(address: str) -> str | None:
    """Why ``address`` is not a public internet address (``"loopback"``, ``"private"``, …), or None.

    IPv4-mapped and 6to4 IPv6 addresses are judged by the IPv4 address they carry, so
    ``::ffff:127.0.0.1`` is loopback too.
    """
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            ip = embedded
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    )
    for kind, hit in checks:
        if hit:
            return kind
    return None if ip.is_global else "non-public"


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))
    except ValueError:
        return None


#: Suffixes of names that only ever lead inside a network (RFC 6761 ``localhost``, RFC 6762
#: ``local``, RFC 8375 ``home.arpa``, cloud metadata's ``metadata.google.internal``, and the
#: ``localdomain``/``internal`` conventions): refused through a download proxy, which would
#: resolve them to an address this process never sees.
_INTERNAL_SUFFIXES = (".localhost", ".local", ".localdomain", ".internal", ".home.arpa")


def internal_name(name: str) -> bool:
    """Whether the host name ``name`` (as compared: :func:`_norm_host`) names something inside
    a network rather than on the internet: ``localhost``, one of :data:`_INTERNAL_SUFFIXES`, or
    a single label (``metadata``, ``vm``, ``redis``), which a resolver completes with its
    search domains."""
    name = _norm_host(name)
    return name == "localhost" or "." not in name or name.endswith(_INTERNAL_SUFFIXES)


@dataclass(frozen=True)
class DownloadPolicy:
    """Where an output may be fetched from: the SSRF guard of every download (each redirect hop too).

    * ``trusted_origins`` (the ``(scheme, host, port)`` origins of the configured fal URLs) are
      always allowed, whatever address they resolve to: that is how a simulator or a proxy on
      127.0.0.1 keeps working. Only those origins, not their hosts: with fal on
      ``http://127.0.0.1:8000``, a result URL or redirect to ``127.0.0.1:6379`` is refused.
    * ``allowed_hosts`` (``WANBATCH_DOWNLOAD_ALLOWED_HOSTS``: ``host`` for any port,
      ``host:port`` for one, ``*.fal.media`` style wildcards): hosts beyond fal's, which may
      resolve to any address. When set, only these, the trusted origins and fal's media hosts
      (:data:`FAL_MEDIA_HOSTS`, which the setting adds to and never takes away) are fetched
      from. Anything not listed (fal's media hosts included) is fetched from only if *every*
      address its host resolves to is a public one: loopback, private, link-local, multicast,
      reserved and unspecified addresses are refused (a result URL such as
      ``http://169.254.169.254/…`` must not make a worker read cloud credentials into an
      ``.mp4``).

    A refusal is a :class:`~worker.fal.errors.DownloadRefusedError` naming the host, the
    address when that was the reason, and the allow-list entry that would allow it: a setting
    decides it, so a paid video refused so waits for it (:mod:`worker.steps.download`).

    The check runs when the connection is opened (:func:`guarded_client`), on the addresses the
    socket then connects to, so a name that resolves to a public address for the check and to an
    internal one for the connection (DNS rebinding) gains nothing. A connection knows its host
    and port, not its scheme: there, a trusted origin's host and port are trusted (the scheme
    changes nothing about which socket is reached); each URL is checked with its scheme too.
    * ``keys`` (FAL_KEY): a URL holding one, in any form, is refused wherever it points
      (:func:`_check_url`; the keys this process remembered too): it would be requested, and
      stored or shown, with the key in it. Never printed (``repr``).
    """

    trusted_origins: tuple[tuple[str, str, int | None], ...] = ()
    allowed_hosts: tuple[str, ...] | None = None
    keys: tuple[str, ...] = field(default=(), repr=False)
    #: ``WANBATCH_DOWNLOAD_PROXY``: None (direct), ``"env"`` (the environment's proxy
    #: variables) or a proxy URL, which may hold a password (never printed: ``repr``).
    proxy: str | None = field(default=None, repr=False)

    @classmethod
    def for_urls(
        cls,
        fal_urls: Iterable[str],
        allowed_hosts: Iterable[str] | None,
        keys: Iterable[str] = (),
        proxy: str | None = None,
    ) -> DownloadPolicy:
        """The policy of a worker: the fal URLs' origins trusted, plus the configured allow-list;
        URLs holding one of ``keys`` refused; downloads through ``proxy`` when given."""
        origins = []
        for url in fal_urls:
            with contextlib.suppress(ValueError):  # a URL that does not parse is no origin
                scheme, host, port = origin(url)
                if host:
                    origins.append((scheme, _norm_host(host), port))
        return cls(
            tuple(origins),
            None if allowed_hosts is None else tuple(allowed_hosts),
            tuple(k for k in keys if k),
            proxy or None,
        )

    def fal_urls(self) -> list[str]:
        """The trusted origins as URLs (``scheme://host:port``)."""
        return [
            f"{scheme}://{f'[{host}]' if ':' in host else host}" + (f":{port}" if port is not None else "")
            for scheme, host, port in self.trusted_origins
        ]

    def trusts(self, host: str, port: int | None, scheme: str | None = None) -> bool:
        """Whether ``host:port`` (with ``scheme``, when known) is one of fal's configured origins."""
        host = _norm_host(host)
        return any((h, p) == (host, port) and scheme in (None, s) for s, h, p in self.trusted_origins)

    def listed(self, host: str, port: int | None, scheme: str | None = None) -> bool:
        """Whether this is a fal origin or on the allow-list (then any address is fine)."""
        return self.trusts(host, port, scheme) or (
            self.allowed_hosts is not None and _host_allowed(host, port, self.allowed_hosts)
        )

    def check_host(self, host: str, port: int | None, scheme: str | None = None) -> None:
        """Refuse what the allow-list leaves out (never fal's media hosts: the list adds to
        them), or a literal internal address (no DNS needed)."""
        if self.listed(host, port, scheme):
            return
        if self.allowed_hosts is not None and not _host_allowed(host, port, FAL_MEDIA_HOSTS):
            raise self.refusal(
                host,
                port,
                f"refusing to fetch from host {host!r}: not in the allow-list "
                "(WANBATCH_DOWNLOAD_ALLOWED_HOSTS)",
            )
        literal = _ip_literal(host)
        if literal is not None:
            self._refuse_internal(host, port, [literal])

    def refusal(
        self, host: str, port: int | None, words: str, address: str | None = None
    ) -> DownloadRefusedError:
        """The error of a refused ``host:port``: ``words``, then the setting that would allow it."""
        entry = allow_entry(host, port)
        setting = allow_setting(self.allowed_hosts, entry)
        return DownloadRefusedError(
            words,
            host=entry,
            address=address,
            setting=setting,
        )

    def addresses(self, host: str, port: int, timeout: float | None = None) -> list[str]:
        """The addresses to connect to for ``host``, each checked; refuses if any is internal.

        Every address is checked, not just the first: a name with one public and one internal
        address would otherwise reach the internal one whenever the public one is down. The
        name is looked up within ``timeout`` and the thread's deadline
        (:func:`~worker.fal.http.resolve`): a resolver that does not answer is a connect
        timeout, never a wait past the download's total timeout.
        """
        self.check_host(host, port)
        try:
            found = resolve(host.strip("[]"), port, timeout)
        except httpcore.ConnectError as exc:
            if exc.__cause__ is None:  # says what it is already (no address)
                raise
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from exc
        if not self.listed(host, port):
            self._refuse_internal(host, port, found)
        return found

    def check_proxied(self, host: str, port: int, timeout: float | None = None) -> None:
        """What can still be judged of a host reached through the download proxy, which resolves
        the name and connects beyond the reach of this process: refuse what the allow-list
        leaves out, an internal address written as such (:meth:`check_host`), an internal name
        (:func:`internal_name`: ``localhost``, ``metadata.google.internal``, a name of one
        label) and a name that resolves *here* to an internal address. A name that does not
        resolve here (a corporate network that resolves only through its proxy) goes on: the
        proxy alone can reach it, and is trusted to connect where the name points. Listed hosts
        (fal's origins, the allow-list) are taken whatever they are."""
        self.check_host(host, port)
        if self.listed(host, port):
            return
        name = _norm_host(host)
        if _ip_literal(name) is None and internal_name(name):
            raise self.refusal(
                host,
                port,
                f"refusing to fetch from {host!r}: an internal name (through the download proxy, its "
                "address cannot be checked)",
            )
        try:
            found = resolve(name, port, timeout)
        except (httpcore.ConnectError, httpcore.ConnectTimeout):
            return  # not known here: the proxy resolves it
        self._refuse_internal(host, port, found)

    def _refuse_internal(self, host: str, port: int | None, addresses: list[str]) -> None:
        for address in addresses:
            kind = internal_address_kind(address)
            if kind is not None:
                shown = host if host == address else f"{host} ({address})"
                article = "an" if kind[:1] in "aeiou" else "a"
                raise self.refusal(
                    host,
                    port,
                    f"refusing to fetch from {shown}: {article} {kind} address{_range_note(address)}",
                    address,
                )


class _GuardedBackend(httpcore.NetworkBackend):
    """httpcore's socket backend, connecting only to addresses the policy checked (no rebinding),
    its every connect and wait also ending at the exchange's deadline (each address tried gets
    only the time left: :class:`~worker.fal.http.DeadlineBackend`)."""

    def __init__(self, policy: DownloadPolicy) -> None:
        self._policy = policy
        self._inner = DeadlineBackend(httpcore.SyncBackend())

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        last: Exception | None = None
        for address in self._policy.addresses(host, port, timeout):
            try:
                # TLS still verifies the certificate against ``host`` (httpcore passes the
                # origin's host name as SNI / server_hostname), only the socket uses the address.
                return self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise FinalProviderError("refusing to download over a unix socket")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


#: Connection pool of a download client: no cap on connections (the worker's threads bound the
#: concurrent downloads; a cap would make the surplus wait and time out), a few idle ones kept
#: for a while so the next download to the same CDN skips the TCP and TLS handshakes.
DOWNLOAD_POOL_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=20, keepalive_expiry=30.0)


class _GuardedTransport(httpx.HTTPTransport):
    """httpx's transport over :class:`_GuardedBackend` (the pool is rebuilt with that backend;
    httpx has no public parameter for it).

    Its TLS context honours ``SSL_CERT_FILE``/``SSL_CERT_DIR`` (a CDN behind a TLS-inspecting
    proxy's CA), although the client ignores proxies: one httpx cannot use is a one-line
    :class:`~jobs.errors.ConfigError` (:func:`~worker.fal.http.environment_checked`)."""

    def __init__(self, policy: DownloadPolicy, limits: httpx.Limits = DOWNLOAD_POOL_LIMITS) -> None:
        with environment_checked():
            context = shared_ssl_context()  # httpx's transport would build one more, then dropped
            super().__init__(verify=context)
            self._pool = httpcore.ConnectionPool(
                ssl_context=context,
                network_backend=_GuardedBackend(policy),
                max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry,
            )


#: Reached directly whatever the download proxy: this machine's loopback, which a proxy
#: elsewhere cannot reach (as :func:`~worker.fal.http.direct_mounts` does for fal's API).
_LOOPBACK_MOUNTS = ("all://localhost", "all://127.0.0.0/8", "all://[::1]")


def proxy_routes(proxy: str | None, environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The httpx mounts of a download client for ``WANBATCH_DOWNLOAD_PROXY`` (``proxy``): each
    URL pattern with the proxy URL it goes through, or None for directly. Empty: every download
    goes directly.

    ``env``: the proxies the environment's ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` name, and
    ``NO_PROXY``'s entries direct, exactly as httpx mounts them for a ``trust_env`` client
    (:mod:`jobs.http_environment` reads them by its rules); none set: direct. A URL: every
    download through it. Loopback always directly (:data:`_LOOPBACK_MOUNTS`)."""
    if proxy is None:
        return {}
    routes: dict[str, str | None]
    if proxy == DOWNLOAD_PROXY_FROM_ENV:
        env = os.environ if environ is None else environ
        routes = {
            f"{kind}://": value if "://" in value else f"http://{value}"
            for kind, (_name, value) in proxy_variables(env).items()
        }
        if not routes:
            return {}
        for entry in no_proxy_entries(env):
            routes[no_proxy_pattern(entry)] = None
    else:
        routes = {"all://": proxy}
    for pattern in _LOOPBACK_MOUNTS:
        routes[pattern] = None
    return routes


#: The attribute a transport error raised through the download proxy carries: the proxy's URL,
#: its credentials masked (:class:`_ProxiedTransport`).
_VIA = "wanbatch_download_proxy"


def proxy_of(exc: BaseException) -> str | None:
    """The download proxy (credentials masked) a transport error happened through, or None."""
    via = getattr(exc, _VIA, None)
    return via if isinstance(via, str) else None


class _ProxiedTransport(httpx.BaseTransport):
    """httpx's transport through the download proxy ``proxy``, each request's host first judged
    by :meth:`DownloadPolicy.check_proxied` (the proxy resolves and connects: only names can be
    judged). Its connects and waits end at the exchange's deadline as the direct ones do
    (:class:`~worker.fal.http.DeadlineBackend`; the proxy's own name is looked up within it).
    A transport error raised through it says so (:func:`proxy_of`), its text cleared of the
    proxy's password."""

    def __init__(
        self, policy: DownloadPolicy, proxy: str, limits: httpx.Limits = DOWNLOAD_POOL_LIMITS
    ) -> None:
        self._policy = policy
        self.shown = masked_url(proxy)
        parsed = httpx.URL(proxy)
        # What of the proxy's credentials its errors could quote: the URL, the userinfo, a
        # password long enough not to be found in every word (a 2-letter one protects nothing).
        userinfo = f"{parsed.username}:{parsed.password}" if parsed.password else ""
        password = parsed.password if len(parsed.password or "") >= 4 else ""
        self._secrets = [s for s in (proxy, userinfo, password) if s]
        with environment_checked():
            self._inner = httpx.HTTPTransport(verify=shared_ssl_context(), proxy=proxy, limits=limits)
        pool = self._inner._pool
        if not isinstance(pool._network_backend, DeadlineBackend):
            pool._network_backend = DeadlineBackend(pool._network_backend)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        timeouts = request.extensions.get("timeout") or {}
        self._policy.check_proxied(url.host, _port(url) or 0, timeouts.get("connect"))
        try:
            response = self._inner.handle_request(request)
            response.extensions[_VIA] = self.shown  # a forward-proxied http:// answer may be the proxy's
            return response
        except httpx.TransportError as exc:
            text = str(exc)
            for secret in sorted(self._secrets, key=len, reverse=True):
                text = text.replace(secret, "**")
            said = type(exc)(text)
            setattr(said, _VIA, self.shown)
            raise said from None

    def close(self) -> None:
        self._inner.close()


def guarded_client(
    policy: DownloadPolicy,
    timeout: httpx.Timeout,
    event_hooks: Mapping[str, list[Callable[..., Any]]] | None = None,
) -> httpx.Client:
    """A client for downloads (and uploads' PUTs) that connects only where ``policy`` allows.

    Directly by default: the proxy variables are ignored (``trust_env=False``), since through a
    proxy the name would be resolved, and the address reached, by the proxy, beyond the reach
    of the address check. Through the proxy ``policy.proxy`` names when set
    (``WANBATCH_DOWNLOAD_PROXY``, :func:`proxy_routes`), where what can be judged of the host
    still is (:meth:`DownloadPolicy.check_proxied`); loopback and ``NO_PROXY`` hosts go
    directly, fully guarded. Never ``.netrc`` nor any other credential from the environment.
    Cookies are refused, so a client shared by many downloads carries nothing from one to the
    next. Its exchanges obey :func:`~worker.fal.http.cut_off_at` (a download's total timeout, an
    upload's answer deadline), headers included.
    """
    routes = proxy_routes(policy.proxy)
    for pattern in direct_mounts(policy.fal_urls()) if routes else ():
        routes[pattern] = None  # a fal origin on loopback (a simulator): never through a proxy
    proxied: dict[str, _ProxiedTransport] = {}
    mounts: dict[str, httpx.BaseTransport | None] = {}
    for pattern, proxy in routes.items():
        if proxy is None:
            mounts[pattern] = None
        else:
            if proxy not in proxied:
                proxied[proxy] = _ProxiedTransport(policy, proxy)
            mounts[pattern] = proxied[proxy]
    return CookielessClient(
        transport=_GuardedTransport(policy),
        mounts=mounts,
        timeout=timeout,
        trust_env=False,
        event_hooks=dict(event_hooks or {}),
    )


class SharedDownloadClient:
    """One :func:`guarded_client` for every download of a runtime, made on first use.

    Each download used to build (and close) a client of its own, so every video paid a new TCP
    connection and TLS handshake to the CDN. Sharing one keeps those connections in a pool.

    Reuse keeps the address guard whole. :class:`_GuardedBackend` judges the addresses a *new*
    connection connects to; httpcore hands an idle connection only to a request for the very
    origin (scheme, host, port) it was opened for, so a reused connection leads to an address
    that was checked for that host under this same policy (which never changes for a client).
    Every URL and redirect hop is still checked by :func:`download` before its request, proxies
    stay off and cookies are refused. Nothing about one download lives on the client: the total
    timeout, progress (lease renewal) and the response callback are arguments of
    :func:`download`, so threads share it safely (httpcore's pool is thread-safe).
    """

    def __init__(self, policy: DownloadPolicy, timeout: httpx.Timeout) -> None:
        self.policy = policy
        self.timeout = timeout
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._closed = False

    def get(self) -> httpx.Client:
        """The shared client (created now if needed); :class:`RuntimeError` once closed."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the download client is closed")
            if self._client is None:
                self._client = guarded_client(self.policy, self.timeout)
            return self._client

    def close(self) -> None:
        """Close the pooled connections; later downloads are refused. Safe to call twice."""
        with self._lock:
            client, self._client, self._closed = self._client, None, True
        if client is not None:
            client.close()


#: What a URL fal hands back (an upload's ``upload_url`` or ``file_url``, a result's URL, a
#: download's redirect) that holds FAL_KEY is refused with: final, never quoting the URL.
KEY_IN_URL = "fal's answer holds FAL_KEY: refused"


def _check_url(url: str, policy: DownloadPolicy | None = None) -> httpx.URL:
    """Refuse a URL holding FAL_KEY (any key this process knows, in any form:
    :func:`jobs.key_forms.contains_key`; it would be requested, stored and shown with the key in
    it), then anything but plain http(s) URLs (no ``file:``, no credentials), then apply ``policy``."""
    if holds_known_key(url, () if policy is None else policy.keys):
        raise FinalProviderError(KEY_IN_URL)
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise FinalProviderError(f"refusing malformed URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise FinalProviderError(f"refusing to fetch a {parsed.scheme or 'scheme-less'} URL")
    if parsed.userinfo:
        raise FinalProviderError("refusing a URL with embedded credentials")
    if policy is not None:
        policy.check_host(parsed.host, _port(parsed), parsed.scheme)
    return parsed


def is_video_container(head: bytes) -> bool:
    """Whether the first bytes of a file are those of an MP4/MOV or WebM/Matroska container."""
    return head[4:8] in _BMFF_BOXES or head.startswith(_EBML_MAGIC)


def _check_video(head: bytes) -> None:
    if not is_video_container(head):
        shown = head[:_SNIFF_BYTES].decode("latin-1").encode("unicode_escape").decode("ascii")
        # Escaped once: shown in quotes as it is (repr would double every backslash).
        raise FinalProviderError(f"the output is not a video (it starts with '{shown}')")


def _check_whole(fd: int) -> bool:
    """Refuse an MP4 cut short (:func:`worker.mp4.truncation`: its last box runs past its end,
    or it has no ``moov``/``mdat``). When fal gave no ``file_size``, a body ended by the
    connection closing, or by a ``Content-Length`` shorter than the file, is otherwise taken
    whole, and FFmpeg reads the header of a faststart file cut after a third as the full clip.
    Retryable, as any size mismatch: it is a download's fault, so the next attempt downloads
    again (never a new submission), and the temporary file never takes the output's name.
    True when the MP4's boxes were walked and tile it (``DownloadResult.whole``)."""
    if os.pread(fd, len(_EBML_MAGIC), 0) == _EBML_MAGIC:
        return False  # WebM/Matroska: the probe's MP4 reader refuses it anyway
    cut = fd_truncation(fd)
    if cut is not None:
        raise DownloadIntegrityError(f"download truncated: the MP4 is {cut}")
    return True


def _download_error(response: httpx.Response) -> ProviderError:
    error = classify_poll("download", response)
    if response.status_code in (401, 403, 404, 410):
        # A CDN that no longer serves the file: the media URL expired; fetching again cannot help.
        return FinalProviderError(
            f"output no longer downloadable (HTTP {response.status_code})", status_code=response.status_code
        )
    return error


@contextlib.contextmanager
def _writing(what: str, path: Path) -> Iterator[None]:
    """Turn a local OSError into :class:`OutputWriteError` naming the file and the reason."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputWriteError(f"could not {what} {path}: {reason}") from exc


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` unbuffered: every chunk reaches the file (and its mtime) at once."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def download(
    url: str,
    dest: Path,
    *,
    expected_size: int | None = None,
    max_bytes: int,
    client: httpx.Client | None = None,
    timeout: httpx.Timeout | None = None,
    allowed_hosts: Collection[str] | None = None,
    policy: DownloadPolicy | None = None,
    max_redirects: int = 3,
    total_timeout: float | None = None,
    progress: Callable[[int], None] | None = None,
    on_response: Callable[[httpx.Response], None] | None = None,
    expect_video: bool = False,
    temp_tag: str | None = None,
    sync_dir: bool = True,
    occupied: Callable[[Path], Path] | None = None,
    placing: Callable[[int], None] | None = None,
) -> DownloadResult:
    """Fetch ``url`` into ``dest`` atomically and return its size and SHA-256.

    ``policy`` (or just ``allowed_hosts``, an allow-list beyond fal's media hosts) decides where
    the URL and each redirect may lead. Without ``client``, a :func:`guarded_client` for that
    policy is used and closed; a caller's own ``client`` gets the URL-level checks only (allow-list, literal
    addresses), so pass a guarded one. ``total_timeout`` bounds the whole attempt in seconds:
    every connect, redirect hop, header and body read of it ends by then, however slowly the
    bytes trickle in (:func:`~worker.fal.http.cut_off_at`; a caller's own client obeys it only
    through a :class:`~worker.fal.http.DeadlineBackend`, as a guarded one does); ``timeout``
    applies to this call's requests, also on a caller's ``client`` (else the client's own);
    ``progress(bytes_so_far)`` is called as the body streams and may raise to abort (e.g. when
    the caller lost its lease); ``on_response(response)`` is called once the headers of each
    response (each hop) are in. These are per call, never client state, so one client can
    serve concurrent downloads (:class:`SharedDownloadClient`). ``expect_video`` refuses a body
    that is not a video container. ``sync_dir=False`` leaves the rename's durability to the
    caller, who renames more into the same folder and syncs it once (a job's sidecar).

    Each call writes its own uniquely named ``.{dest.name}.[{temp_tag}-]*.part`` file beside
    ``dest`` and removes it on any failure. A local write failure is :class:`OutputWriteError`.

    ``occupied``: ``dest`` is never replaced as it stands: the finished file takes the name only
    when nothing is there (a hard link, which fails rather than replace: of two processes
    storing under one name at once, exactly one gets it), else ``occupied(dest)`` says where it
    goes instead (``dest`` itself to replace it after all); the result's ``path`` is where it
    went. Without it, ``dest`` is replaced (``os.replace``).

    ``placing(fd)`` is called with the finished temporary file's descriptor before it takes its
    name: the name is a link to the same inode, so a lock taken through it (``flock`` on a
    ``dup``) holds the file from the moment it appears under ``dest`` — no other process sees it
    there unheld.
    """
    if policy is None:
        policy = DownloadPolicy(allowed_hosts=None if allowed_hosts is None else tuple(allowed_hosts))
    current = _check_url(url, policy)
    dest = Path(dest)
    prefix = f".{dest.name}.{temp_tag}-" if temp_tag else f".{dest.name}."
    # The user's usual mode, not mkstemp's 0600 (the output is theirs to share: an hf export
    # hard-links it into a dataset), given as the file is made; the folder made only when missing.
    try:
        with _writing("create a temporary file in", dest.parent):
            fd, tmp = create_temporary(dest.parent, prefix, PARTIAL_SUFFIX)
    except OutputWriteError as exc:
        if not isinstance(exc.__cause__, FileNotFoundError):
            raise
        with _writing("create the folder", dest.parent):
            dest.parent.mkdir(parents=True, exist_ok=True)
        with _writing("create a temporary file in", dest.parent):
            fd, tmp = create_temporary(dest.parent, prefix, PARTIAL_SUFFIX)
    own = client is None
    http = client or guarded_client(policy, timeout or httpx.Timeout(60.0, connect=10.0))
    deadline = None if total_timeout is None else time.monotonic() + total_timeout

    def write(chunk: bytes) -> None:
        with _writing("write", tmp):
            _write_all(fd, chunk)

    try:
        try:
            digest, size = _stream_into(
                http,
                current,
                write,
                _Limits(expected_size, max_bytes, max_redirects, deadline, total_timeout, expect_video),
                policy,
                progress,
                _PerRequest(timeout, on_response),
            )
            whole = False
            if expect_video and (expected_size is None or size == expected_size):
                with _writing("read back", tmp):
                    whole = _check_whole(fd)
            with _writing("write", tmp):
                os.fsync(fd)
            if placing is not None:
                placing(fd)
        finally:
            with _writing("close", tmp):
                os.close(fd)
        if expected_size is not None and size != expected_size:
            raise DownloadIntegrityError(
                f"download truncated or padded: got {size} bytes, expected {expected_size}"
            )
        try:
            with _writing("rename the download to", dest):
                dest = _place(tmp, dest, occupied)
        except OutputWriteError as exc:
            swept = isinstance(exc.__cause__, FileNotFoundError) and not os.path.lexists(tmp)
            if swept and dest.parent.is_dir():
                # Swept by another process's download under the same name (a copy of this
                # database, whose versions of the job are its own), or this attempt's lease was
                # lost: the bytes are not here to keep — try again, not a folder to fix.
                raise DownloadIntegrityError(
                    f"the download's temporary file beside {dest} was removed by another process "
                    "storing under the same name (another copy of this database?)"
                ) from None
            raise
        if sync_dir:
            fsync_dir(dest.parent)
        return DownloadResult(path=dest, sha256=digest, size=size, whole=whole)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        if own:
            http.close()


#: ``link`` failing with these means the file system has no hard links (FAT, some network
#: shares) or refuses one here: the name is then looked at, and the file renamed.
_NO_LINKS = frozenset(
    {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV, errno.ENOSYS, errno.EACCES}
)


def _place(tmp: Path, dest: Path, occupied: Callable[[Path], Path] | None) -> Path:
    """Give the finished ``tmp`` its name (:func:`download`'s ``occupied``); where it went."""
    if occupied is None:
        tmp.replace(dest)
        return dest
    try:
        os.link(tmp, dest)
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if not os.path.lexists(dest):
            tmp.replace(dest)
            return dest
    else:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return dest
    final = occupied(dest)
    tmp.replace(final)
    return final


@dataclass(frozen=True)
class _PerRequest:
    """What one download sets on each of its requests (never on the client, which may be shared)."""

    timeout: httpx.Timeout | None
    on_response: Callable[[httpx.Response], None] | None


@dataclass(frozen=True)
class _Limits:
    expected_size: int | None
    max_bytes: int
    max_redirects: int
    deadline: float | None
    total_timeout: float | None
    expect_video: bool

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise self.too_long()

    def too_long(self) -> RetryableProviderError:
        return RetryableProviderError(
            f"download took longer than {self.total_timeout:g} s (WANBATCH_DOWNLOAD_TIMEOUT)"
        )


def _stream_into(
    http: httpx.Client,
    url: httpx.URL,
    write: Callable[[bytes], None],
    limits: _Limits,
    policy: DownloadPolicy,
    progress: Callable[[int], None] | None,
    per_request: _PerRequest,
) -> tuple[str, int]:
    """The attempt, every network wait of it bounded by its deadline (:func:`cut_off_at`).

    Checking the clock between chunks (as :meth:`_Limits.check_time` does) cannot stop a wait
    for bytes that trickle in under the read timeout: a server that drip-fed the *headers*, a
    byte every 0.5 s, held a download with a total timeout of 1 s for 104 s (httpcore reads up
    to 100 KiB of them), and a worker slot and the job (whose lease is renewed only as body
    bytes arrive) for weeks at the defaults. A wait the deadline cut short is the same error
    as the clock's between chunks."""
    reason = "" if limits.deadline is None else str(limits.too_long())
    with cut_off_at(limits.deadline, reason) as cut:
        try:
            return _hops(http, url, write, limits, policy, progress, per_request)
        except RetryableProviderError as exc:
            if cut is not None and cut.hit:
                raise limits.too_long() from exc
            raise


def _hops(
    http: httpx.Client,
    url: httpx.URL,
    write: Callable[[bytes], None],
    limits: _Limits,
    policy: DownloadPolicy,
    progress: Callable[[int], None] | None,
    per_request: _PerRequest,
) -> tuple[str, int]:
    for _hop in range(limits.max_redirects + 1):
        limits.check_time()
        try:
            # identity: the size fal announces and the cap apply to the bytes on the wire too
            with (
                map_transport_errors("download"),
                http.stream(
                    "GET",
                    url,
                    follow_redirects=False,
                    headers={"Accept-Encoding": "identity"},
                    timeout=httpx.USE_CLIENT_DEFAULT if per_request.timeout is None else per_request.timeout,
                ) as response,
            ):
                if per_request.on_response is not None:
                    per_request.on_response(response)
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    url = _check_url(str(url.join(location)), policy)
                    continue
                if response.status_code == 407:
                    # Only a proxy asks for its credentials (RFC 9110 §15.5.8): the host was never reached.
                    raise _proxy_refused(url, response)
                if (own := proxy_gateway_error(response)) is not None:
                    # The download proxy could not reach the host: no answer from it either.
                    raise _proxy_failed(url, response, own)
                if not response.is_success:
                    raise _download_error(_error_prefix(response, limits))
                _refuse_encoding(response)
                mismatch = _check_announced(response, limits)
                return _consume(response, write, limits, progress, mismatch)
        except httpx.HTTPError as exc:  # decoding and stream errors: the bytes were not right
            raise RetryableProviderError(f"download failed ({type(exc).__name__})") from exc
        except RetryableProviderError as exc:
            cause = exc.__cause__
            if isinstance(cause, httpx.TransportError) and cannot_connect(cause):
                raise _unreached(url, cause) from cause
            raise
    raise FinalProviderError(f"download refused: more than {limits.max_redirects} redirects")


def _unreached(url: httpx.URL, cause: httpx.TransportError) -> DownloadUnreachedError:
    """The error of a download that could not connect to ``url``'s host at all
    (:func:`~worker.fal.errors.cannot_connect`): where, how (directly, or through which proxy)
    and httpx's words, on one line."""
    port = _port(url)
    host = _norm_host(url.host)
    shown = (f"[{host}]" if ":" in host else host) + (f":{port}" if port not in (None, 80, 443) else "")
    proxy = proxy_of(cause)
    via = f" through the download proxy {proxy}" if proxy else ""
    text = " ".join(str(cause).split())[:200] or "no detail"
    return DownloadUnreachedError(
        f"could not connect to {shown}{via} ({type(cause).__name__}: {text})", host=shown, proxy=proxy
    )


def _proxy_refused(url: httpx.URL, response: httpx.Response) -> DownloadUnreachedError:
    """A 407 to a download: a proxy (the download proxy forwarding an ``http://`` URL, or one
    on the way) wants credentials; the media host was never asked."""
    via = response.extensions.get(_VIA)
    proxy = via if isinstance(via, str) else None
    _scheme, host, port = origin(url)
    host = _norm_host(host)
    shown = (f"[{host}]" if ":" in host else host) + (f":{port}" if port not in (None, 80, 443) else "")
    which = f"the download proxy {proxy}" if proxy else "a proxy on the way"
    return DownloadUnreachedError(
        f"could not connect to {shown}: {which} refused it (HTTP 407 Proxy Authentication Required)",
        host=shown,
        proxy=proxy,
    )


def answered_through(response: httpx.Response) -> str | None:
    """The download proxy (credentials masked) ``response`` came through, or None (directly)."""
    via = response.extensions.get(_VIA)
    return via if isinstance(via, str) else None


def _proxy_failed(url: httpx.URL, response: httpx.Response, evidence: str) -> DownloadUnreachedError:
    """The download proxy's own 502/503/504 to a forwarded ``http://`` download
    (:func:`proxy_gateway_error`): it could not reach the host, which was never asked."""
    proxy = answered_through(response)
    _scheme, host, port = origin(url)
    host = _norm_host(host)
    shown = (f"[{host}]" if ":" in host else host) + (f":{port}" if port not in (None, 80, 443) else "")
    answered = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
    return DownloadUnreachedError(
        f"could not connect to {shown}: the download proxy {proxy} answered {answered} ({evidence}): "
        f"it could not reach {shown}",
        host=shown,
        proxy=proxy,
    )


#: A proxy's answers that say it could not get an answer from the next hop (RFC 9110 §15.6.3,
#: §15.6.4, §15.6.5): made by the proxy itself, or passed on from a gateway beyond it.
PROXY_GATEWAY_STATUSES = frozenset({502, 503, 504})


def _list_members(value: str) -> list[str]:
    """The members of a structured-field list (RFC 8941 §3.1), split on the commas outside
    quoted strings; each as written (its parameters after ``;``)."""
    members: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            members.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    members.append("".join(current).strip())
    return [m for m in members if m]


def _parameters(member: str) -> dict[str, str]:
    """A list member's parameters (``corp; error=dns_timeout; details="…"``), keys in lower case."""
    found: dict[str, str] = {}
    for part in member.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key:
            found[key.strip().lower()] = value.strip().strip('"')
    return found


def proxy_gateway_error(response: httpx.Response) -> str | None:
    """Whether ``response`` (to a download or an upload's PUT) is the download proxy's own
    502/503/504 — it could not connect to the host, or got no answer from it — rather than the
    host's answer passed on; what says so, or None.

    httpx cannot tell: a forwarded ``http://`` request (an absolute URI to the proxy, no tunnel)
    gets whatever the proxy writes back, its own error page or the host's, as one response. So
    it is read from the answer, for a forwarded one only (through a ``CONNECT`` tunnel the proxy
    cannot write into the host's answer: its refusal there is a :class:`httpx.ProxyError`):

    * ``Proxy-Status`` (RFC 9209), its last member (the intermediary nearest this process): an
      ``error`` (``connection_refused``, ``dns_timeout``…) without ``fwd-status`` is the proxy's
      own; a ``fwd-status`` says it passed the next hop's answer on (the host's, then);
    * ``X-Squid-Error`` (``ERR_CONNECT_FAIL 111``, ``ERR_DNS_FAIL``): Squid's own error pages;
    * no ``Via`` at all: a proxy adds ``Via`` to every answer it passes on (RFC 9110 §7.6.3:
      MUST), so an answer without one is its own (the answer of a proxy that cannot connect, as
      httpx hears it). A proxy that passes answers on without ``Via`` (Squid's ``via off``)
      makes the host's own 502/503/504 look like the proxy's: held rather than counted, until
      the host answers otherwise — said each time with the proxy's and the host's names.

    Anything else (a ``Via``, no sign of the proxy's own) is the host's, a counted try as ever."""
    if answered_through(response) is None or response.status_code not in PROXY_GATEWAY_STATUSES:
        return None
    if response.request.url.scheme != "http":
        return None
    members = _list_members(response.headers.get("proxy-status", ""))
    if members:
        last = _parameters(members[-1])
        if "fwd-status" in last:
            return None
        if "error" in last:
            words = " ".join(members[-1].split())[:120]
            return f"Proxy-Status: {words}"
    squid = response.headers.get("x-squid-error")
    if squid:
        return f"X-Squid-Error: {' '.join(squid.split())[:80]}"
    if "via" not in response.headers:
        return "its own answer: no Via"
    return None


#: How much of a download's error body is read (for the error message): a CDN's error page
#: or JSON fits; an endless or huge one is cut here instead of filling the worker's memory.
ERROR_BODY_BYTES = 4096


#: Headers an error body's prefix no longer matches: it is not the length announced, nor framed
#: or encoded as sent.
_PREFIX_DROPS = ("content-encoding", "content-length", "transfer-encoding")


def _error_prefix(response: httpx.Response, limits: _Limits) -> httpx.Response:
    """A copy of the error ``response`` holding at most :data:`ERROR_BODY_BYTES` of its body.

    ``Response.read()`` would read the body whole, with neither the size cap nor the total time
    (both apply to 2xx bodies only) bounding it. The bytes are read as they arrive
    (https://www.python-httpx.org/quickstart/#streaming-responses), the deadline checked between
    chunks; the caller's ``with`` then closes the response with the rest unread. Only a body
    without ``Content-Encoding`` is read (its chunks are then the bytes as sent): decoding one
    could inflate it, so an encoded error body is left out of the error.
    """
    prefix = bytearray()
    if _encoding(response) is None:
        for chunk in response.iter_bytes():
            prefix += chunk[: ERROR_BODY_BYTES - len(prefix)]
            if len(prefix) >= ERROR_BODY_BYTES:
                break
            limits.check_time()
    return with_body(response, bytes(prefix), drop=_PREFIX_DROPS)


def _encoding(response: httpx.Response) -> str | None:
    """The body's ``Content-Encoding`` (RFC 9110 §8.4), or None when absent or ``identity``."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    return None if encoding in ("", "identity") else encoding


def _refuse_encoding(response: httpx.Response) -> None:
    """Refuse a body sent with a ``Content-Encoding`` although the request accepted only
    ``identity`` (RFC 9110 §12.5.3): httpx would decode it as it streams
    (https://www.python-httpx.org/quickstart/#binary-response-content), so a few hundred KB of
    gzip on the wire would be written as hundreds of MB, every size check applying to the
    inflated bytes. Final: the server answers the same way when asked again."""
    encoding = _encoding(response)
    if encoding is not None:
        raise FinalProviderError(
            f"download refused: the server sent a {encoding!r}-encoded body (Content-Encoding), "
            "though only unencoded bytes were asked for"
        )


def _check_announced(response: httpx.Response, limits: _Limits) -> DownloadIntegrityError | None:
    """Refuse an announced size over the cap at once; return (not raise) a size fal did not
    describe, so that a body that is not a video at all is reported as that first."""
    announced = _content_length(response)
    if announced is None:
        return None
    if announced > limits.max_bytes:
        raise FinalProviderError(f"download refused: {announced} bytes is over the {limits.max_bytes} cap")
    if limits.expected_size is not None and announced != limits.expected_size:
        return DownloadIntegrityError(
            f"download size mismatch: the server has {announced} bytes, fal described {limits.expected_size}"
        )
    return None


def _consume(
    response: httpx.Response,
    write: Callable[[bytes], None],
    limits: _Limits,
    progress: Callable[[int], None] | None,
    mismatch: DownloadIntegrityError | None,
) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    head = b""
    if mismatch is not None and not limits.expect_video:
        raise mismatch
    for chunk in response.iter_bytes():  # as it arrives: the clock and the lease are checked often
        size += len(chunk)
        if size > limits.max_bytes:
            raise FinalProviderError(f"download aborted: more than the {limits.max_bytes}-byte cap")
        if limits.expect_video and len(head) < _SNIFF_BYTES:
            head += chunk[: _SNIFF_BYTES - len(head)]
            if len(head) >= _SNIFF_BYTES:
                _check_video(head)  # an HTML error page is refused before it is all read
                if mismatch is not None:
                    raise mismatch
        _check_not_padded(size, limits)
        hasher.update(chunk)
        write(chunk)
        limits.check_time()
        if progress is not None:
            progress(size)
    if limits.expect_video and len(head) < _SNIFF_BYTES:
        _check_video(head)
        if mismatch is not None:
            raise mismatch
    return hasher.hexdigest(), size


def _check_not_padded(size: int, limits: _Limits) -> None:
    """Stop a body the moment it passes the size fal described (its ``file_size``): a server
    that sends no ``Content-Length`` and never ends would otherwise be read and written up to
    the ``max_bytes`` cap (2 GiB by default) on every attempt before the size is compared.
    Retryable, as any size mismatch: the next attempt asks again."""
    if limits.expected_size is not None and size > limits.expected_size:
        raise DownloadIntegrityError(
            f"download padded: more than the {limits.expected_size} bytes fal described; stopped"
        )


def _content_length(response: httpx.Response) -> int | None:
    """The announced length; the body is unencoded here (:func:`_refuse_encoding`), so it is
    the file's."""
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None
