"""Uploads (fal's initiate flow), input preparation, and atomic, checked downloads."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from jobs.endpoints import FieldType
from jobs.errors import AccountLockedError, FinalProviderError, RetryableProviderError, UsageError
from jobs.manifest.report import validate_manifest
from worker.fal.client import FalClient
from worker.fal.errors import DownloadIntegrityError
from worker.fal.http import RetryPolicy
from worker.fal.origin import url_origin_text
from worker.fal.storage import (
    ERROR_BODY_BYTES,
    FalStorage,
    MediaPreparer,
    download,
    prepare_input,
    to_data_uri,
)

QUEUE = "https://queue.test"
REST = "https://rest.test"
KEY = "0b5c2d4e-1111-2222-3333-444455556666:abcdef0123456789abcdef0123456789"
UPLOAD_URL = "https://upload.storage.test/signed/abc?X-Goog-Signature=sig"
FILE_URL = "https://v3.fal.media/files/rabbit/abc.png"


class FakeStorage:
    """fal's REST storage initiate flow plus the signed-URL host, recording what it saw."""

    def __init__(self, initiate_failures: list[httpx.Response] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.stored: dict[str, bytes] = {}
        self.failures = list(initiate_failures or [])

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/storage/upload/initiate":
            if self.failures:
                return self.failures.pop(0)
            return httpx.Response(200, json={"upload_url": UPLOAD_URL, "file_url": FILE_URL})
        if str(request.url) == UPLOAD_URL and request.method == "PUT":
            self.stored[FILE_URL] = request.content
            return httpx.Response(200)
        return httpx.Response(404)


def make_storage(fake: FakeStorage) -> FalStorage:
    client = FalClient(
        queue_url=QUEUE,
        rest_url=REST,
        key=KEY,
        timeout=httpx.Timeout(5.0),
        transport=httpx.MockTransport(fake),
        retry=RetryPolicy(attempts=3, base_delay=0.0),
        sleep=lambda _s: None,
    )
    return FalStorage(client, transport=httpx.MockTransport(fake))


# ------------------------------------------------------------------------------------ upload


def test_upload_initiate_flow() -> None:
    fake = FakeStorage()
    url = make_storage(fake).upload_file(b"\x89PNG data", "image/png", "frame.png")
    assert url == FILE_URL
    assert fake.stored[FILE_URL] == b"\x89PNG data"
    initiate, put = fake.requests
    assert initiate.method == "POST"
    assert str(initiate.url) == f"{REST}/storage/upload/initiate?storage_type=fal-cdn-v3"
    assert json.loads(initiate.content) == {"file_name": "frame.png", "content_type": "image/png"}
    assert initiate.headers["authorization"] == f"Key {KEY}"
    assert put.headers["content-type"] == "image/png"
    assert "authorization" not in put.headers  # the signed upload host never sees the key


def test_upload_from_path(tmp_path: Path) -> None:
    src = tmp_path / "in.jpg"
    src.write_bytes(b"jpeg bytes")
    fake = FakeStorage()
    make_storage(fake).upload_file(src, "image/jpeg")
    assert fake.stored[FILE_URL] == b"jpeg bytes"
    assert json.loads(fake.requests[0].content)["file_name"] == "in.jpg"


def test_upload_retries_transient_initiate_errors() -> None:
    fake = FakeStorage([httpx.Response(503, text="<center>nginx</center>")])
    assert make_storage(fake).upload_file(b"x", "image/png", "a.png") == FILE_URL
    assert [r.url.path for r in fake.requests].count("/storage/upload/initiate") == 2


def test_upload_locked_account() -> None:
    fake = FakeStorage([httpx.Response(403, json={"detail": "User is locked."})])
    with pytest.raises(AccountLockedError):
        make_storage(fake).upload_file(b"x", "image/png", "a.png")


def test_upload_initiate_answer_without_urls_is_an_error() -> None:
    fake = FakeStorage([httpx.Response(200, json={"file_url": FILE_URL})])
    with pytest.raises(RetryableProviderError, match="upload_url"):
        make_storage(fake).upload_file(b"x", "image/png", "a.png")


# ------------------------------------------------------------------------------- preparation


def test_to_data_uri() -> None:
    uri = to_data_uri(b"\x00\x01abc", "image/png")
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == b"\x00\x01abc"


def test_prepare_input_inlines_small_uploads_large_once_and_keeps_urls(tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    small.write_bytes(b"s" * 10)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"b" * 100)
    cache: dict[str, str] = {}
    uploads: list[tuple[bytes, str, str]] = []

    def uploader(data: bytes, mime: str, name: str) -> str:
        uploads.append((data, mime, name))
        return f"https://v3.fal.media/files/{len(uploads)}.jpg"

    preparer = MediaPreparer(
        uploader=uploader,
        inline_max_bytes=50,
        lookup=lambda sha, _mime: cache.get(sha),
        record=lambda sha, url, size, mime: cache.__setitem__(sha, url),
        root=tmp_path,
    )
    data_uri = "data:image/png;base64,AAAA"
    source = {
        "prompt": str(big),  # not a media field: untouched
        "image_url": str(small),
        "end_image_url": str(big),
        "start_image_url": "https://example.com/a.png",
        "mask": data_uri,
    }
    fields = ["image_url", "end_image_url", "start_image_url", "mask", "absent"]
    first = prepare_input(source, fields, preparer=preparer)
    second = prepare_input({"image_url": str(big)}, ["image_url"], preparer=preparer)

    assert source["image_url"] == str(small)  # the input itself is not mutated
    assert first["prompt"] == str(big)
    assert first["image_url"] == to_data_uri(b"s" * 10, "image/png")
    assert first["end_image_url"] == "https://v3.fal.media/files/1.jpg"
    assert first["start_image_url"] == "https://example.com/a.png"
    assert first["mask"] == data_uri
    assert "absent" not in first
    assert second["image_url"] == "https://v3.fal.media/files/1.jpg"
    assert len(uploads) == 1  # once per content hash
    digest = hashlib.sha256(b"b" * 100).hexdigest()
    assert cache == {digest: "https://v3.fal.media/files/1.jpg"}
    data, mime, name = uploads[0]
    assert (data, mime) == (b"b" * 100, "image/jpeg")
    assert name == f"{digest[:16]}.jpg"  # never the user's file name


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (480, 400), (200, 120, 40)).save(out, "JPEG")
    return out.getvalue()


@pytest.mark.parametrize("name", ["noext", "photo.heic", "photo.png"])
def test_a_local_image_is_sent_as_the_format_in_its_bytes_not_its_name(tmp_path: Path, name: str) -> None:
    """JPEG bytes pass validation whatever the file is called (Pillow reads them): they are sent
    as the JPEG they are, never as ``application/octet-stream`` or ``image/heic``."""
    jpeg = _jpeg()
    (tmp_path / name).write_bytes(jpeg)
    preparer = MediaPreparer(uploader=lambda d, m, n: "u", inline_max_bytes=len(jpeg))
    sent = prepare_input(
        {"image_url": str(tmp_path / name)}, {"image_url": FieldType.IMAGE}, preparer=preparer
    )
    assert sent["image_url"] == to_data_uri(jpeg, "image/jpeg")
    assert preparer.prepare(str(tmp_path / name)) == to_data_uri(jpeg, "image/jpeg")  # kind unknown


@pytest.mark.parametrize("name", ["noext", "photo.heic"])
def test_an_uploaded_image_gets_the_content_type_and_suffix_of_its_bytes(tmp_path: Path, name: str) -> None:
    jpeg = _jpeg()
    (tmp_path / name).write_bytes(jpeg)
    fake = FakeStorage()
    recorded: list[tuple[str, str]] = []
    preparer = MediaPreparer.for_storage(
        make_storage(fake),
        inline_max_bytes=100,
        record=lambda sha, url, size, mime: recorded.append((url, mime)),
    )
    assert preparer.prepare(str(tmp_path / name)) == FILE_URL
    initiate, put = fake.requests
    digest = hashlib.sha256(jpeg).hexdigest()
    assert json.loads(initiate.content) == {"file_name": f"{digest[:16]}.jpg", "content_type": "image/jpeg"}
    assert put.headers["content-type"] == "image/jpeg"
    assert recorded == [(FILE_URL, "image/jpeg")]


def test_an_upload_remembered_under_another_type_is_not_reused(tmp_path: Path) -> None:
    """Earlier versions uploaded a JPEG named ``photo.heic`` as ``image/heic`` and remembered it:
    that upload is not sent again; the file goes up anew under its content's type."""
    jpeg = _jpeg()
    (tmp_path / "photo.heic").write_bytes(jpeg)
    digest = hashlib.sha256(jpeg).hexdigest()
    cache = {(digest, "image/heic"): "https://v3.fal.media/files/old.heic"}
    uploads: list[str] = []

    def uploader(data: bytes, mime: str, name: str) -> str:
        uploads.append(mime)
        return "https://v3.fal.media/files/new.jpg"

    preparer = MediaPreparer(
        uploader=uploader,
        inline_max_bytes=100,
        lookup=lambda sha, mime: cache.get((sha, mime)),
        record=lambda sha, url, size, mime: cache.__setitem__((sha, mime), url),
    )
    assert preparer.prepare(str(tmp_path / "photo.heic")) == "https://v3.fal.media/files/new.jpg"
    assert preparer.prepare(str(tmp_path / "photo.heic")) == "https://v3.fal.media/files/new.jpg"
    assert uploads == ["image/jpeg"]  # once, under its content's type


def test_audio_is_sent_as_its_container(tmp_path: Path) -> None:
    """Audio is sent as the container its bytes show (MP3 here), never sniffed as an image."""
    (tmp_path / "music.mp3").write_bytes(b"ID3" + b"\0" * 40)
    preparer = MediaPreparer(uploader=lambda d, m, n: "u", inline_max_bytes=1000)
    sent = preparer.prepare(str(tmp_path / "music.mp3"), kind=FieldType.AUDIO)
    assert sent.startswith("data:audio/mpeg;base64,")


def test_the_sent_input_replays_through_validation(tmp_path: Path) -> None:
    """The export's ``input`` is the exact input sent: fed back as ``items_from`` rows it must
    validate (a data URI of type application/octet-stream or image/heic is refused there)."""
    jpeg = _jpeg()
    rows = []
    for name in ("noext", "photo.heic"):
        (tmp_path / name).write_bytes(jpeg)
        preparer = MediaPreparer(uploader=lambda d, m, n: "u", inline_max_bytes=len(jpeg))
        sent = prepare_input(
            {"prompt": name, "image_url": str(tmp_path / name)},
            {"image_url": FieldType.IMAGE},
            preparer=preparer,
        )
        rows.append(json.dumps(sent))
    (tmp_path / "replay.jsonl").write_text("\n".join(rows) + "\n")
    manifest = tmp_path / "replay.yaml"
    manifest.write_text("name: replay\nendpoint: fal-ai/wan-i2v\nitems_from: replay.jsonl\n")
    report = validate_manifest(manifest)
    assert report.ok, [str(issue) for issue in report.issues]


def test_prepare_refuses_files_outside_root_and_relative_paths(tmp_path: Path) -> None:
    inside = tmp_path / "m"
    inside.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    preparer = MediaPreparer(uploader=lambda d, m, n: "u", inline_max_bytes=10, root=inside)
    with pytest.raises(UsageError, match="outside"):
        preparer.prepare(str(outside))
    with pytest.raises(UsageError, match="outside"):
        preparer.prepare(str(inside / ".." / "secret.png"))
    with pytest.raises(UsageError, match="absolute"):
        preparer.prepare("relative.png")
    with pytest.raises(UsageError, match="does not exist"):
        preparer.prepare(str(inside / "missing.png"))


def test_media_preparer_for_storage_uploads_through_fal(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(b"p" * 64)
    fake = FakeStorage()
    preparer = MediaPreparer.for_storage(make_storage(fake), inline_max_bytes=8)
    assert preparer.prepare(str(big)) == FILE_URL
    assert fake.stored[FILE_URL] == b"p" * 64


# ---------------------------------------------------------------------------------- download

VIDEO = bytes(range(256)) * 40  # 10240 bytes


def cdn(handler_body: bytes = VIDEO, **headers: str) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/redirect":
            return httpx.Response(302, headers={"location": "/files/out.mp4"})
        if request.url.path == "/evil-redirect":
            return httpx.Response(302, headers={"location": "file:///etc/passwd"})
        if request.url.path == "/gone":
            return httpx.Response(404)
        if request.url.path == "/busy":
            return httpx.Response(503)
        return httpx.Response(200, content=handler_body, headers=headers)

    return httpx.Client(transport=httpx.MockTransport(handler))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_download_writes_atomically_with_sha256(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "b1-j1-a1.mp4"
    result = download(
        "https://v3.fal.media/files/out.mp4",
        dest,
        expected_size=len(VIDEO),
        max_bytes=1 << 20,
        client=cdn(),
        allowed_hosts=["*.fal.media"],
    )
    assert result.path == dest
    assert result.size == len(VIDEO)
    assert result.sha256 == hashlib.sha256(VIDEO).hexdigest()
    assert dest.read_bytes() == VIDEO
    assert leftovers(dest.parent) == ["b1-j1-a1.mp4"]  # no temp file left behind


def test_download_follows_checked_redirects(tmp_path: Path) -> None:
    result = download("https://v3.fal.media/redirect", tmp_path / "o.mp4", max_bytes=1 << 20, client=cdn())
    assert result.size == len(VIDEO)


def test_download_content_length_mismatch_is_retryable_and_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "o.mp4"
    with pytest.raises(DownloadIntegrityError, match="size mismatch"):
        download("https://cdn.test/f.mp4", dest, expected_size=999, max_bytes=1 << 20, client=cdn())
    assert leftovers(tmp_path) == []


def test_download_short_body_without_length_is_retryable(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter([VIDEO[:100]]))  # streamed: no Content-Length

    client = httpx.Client(transport=httpx.MockTransport(handler))
    with pytest.raises(DownloadIntegrityError, match="truncated"):
        download(
            "https://cdn.test/f.mp4",
            tmp_path / "o.mp4",
            expected_size=len(VIDEO),
            max_bytes=1 << 20,
            client=client,
        )
    assert leftovers(tmp_path) == []


def test_download_cut_connection_is_retryable_and_cleans_up(tmp_path: Path) -> None:
    def body() -> Iterator[bytes]:
        yield VIDEO[:4096]
        raise httpx.ReadError("connection reset by peer")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body())

    client = httpx.Client(transport=httpx.MockTransport(handler))
    dest = tmp_path / "o.mp4"
    with pytest.raises(RetryableProviderError):
        download("https://cdn.test/f.mp4", dest, max_bytes=1 << 20, client=client)
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_download_over_cap_is_final(tmp_path: Path) -> None:
    with pytest.raises(FinalProviderError, match="cap"):
        download("https://cdn.test/f.mp4", tmp_path / "o.mp4", max_bytes=100, client=cdn())
    assert leftovers(tmp_path) == []

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter([VIDEO, VIDEO]))

    client = httpx.Client(transport=httpx.MockTransport(handler))
    with pytest.raises(FinalProviderError, match="cap"):
        download("https://cdn.test/f.mp4", tmp_path / "o.mp4", max_bytes=len(VIDEO), client=client)
    assert leftovers(tmp_path) == []


def test_download_keeps_an_existing_final_file_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "o.mp4"
    dest.write_bytes(b"previous good copy")
    with pytest.raises(DownloadIntegrityError):
        download("https://cdn.test/f.mp4", dest, expected_size=1, max_bytes=1 << 20, client=cdn())
    assert dest.read_bytes() == b"previous good copy"
    assert leftovers(tmp_path) == ["o.mp4"]


@pytest.mark.parametrize(
    ("path", "error"), [("/gone", FinalProviderError), ("/busy", RetryableProviderError)]
)
def test_download_http_errors(tmp_path: Path, path: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        download(f"https://cdn.test{path}", tmp_path / "o.mp4", max_bytes=1 << 20, client=cdn())
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://cdn.test/x",
        "gopher://x",
        "https://user:pw@cdn.test/x",
        "https://evil.test/x",
    ],
)
def test_download_ssrf_guard(tmp_path: Path, url: str) -> None:
    with pytest.raises(FinalProviderError, match="refusing"):
        download(
            url,
            tmp_path / "o.mp4",
            max_bytes=1 << 20,
            client=cdn(),
            allowed_hosts=["*.fal.media", "cdn.test"],
        )
    assert leftovers(tmp_path) == []


def test_download_refuses_redirect_to_another_scheme(tmp_path: Path) -> None:
    with pytest.raises(FinalProviderError, match="refusing"):
        download("https://cdn.test/evil-redirect", tmp_path / "o.mp4", max_bytes=1 << 20, client=cdn())
    assert leftovers(tmp_path) == []


class HugeBody:
    """An error page of ``total`` bytes in 64 KiB chunks that counts how much of it was taken."""

    CHUNK = 64 * 1024

    def __init__(self, total: int) -> None:
        self.total = total
        self.taken = 0

    def __iter__(self) -> Iterator[bytes]:
        while self.taken < self.total:
            self.taken += self.CHUNK
            yield b"<html>" + b"e" * (self.CHUNK - 6)


@pytest.mark.parametrize(("code", "error"), [(500, RetryableProviderError), (404, FinalProviderError)])
def test_a_download_error_body_is_read_no_further_than_its_start(
    tmp_path: Path, code: int, error: type[Exception]
) -> None:
    """Before, an error body was read whole, past the size cap (an endless one until the
    worker ran out of memory). Now only its first bytes are read, for the message."""
    bodies: list[HugeBody] = []

    def handler(_request: httpx.Request) -> httpx.Response:
        bodies.append(HugeBody(64 << 20))
        return httpx.Response(code, content=bodies[-1])

    client = httpx.Client(transport=httpx.MockTransport(handler))
    with pytest.raises(error, match=f"HTTP {code}"):
        download("https://cdn.test/f.mp4", tmp_path / "o.mp4", max_bytes=1 << 20, client=client)
    (body,) = bodies
    assert body.taken == HugeBody.CHUNK  # one chunk, of which ERROR_BODY_BYTES were kept
    assert leftovers(tmp_path) == []


def test_a_download_error_keeps_the_start_of_its_body_in_the_message(tmp_path: Path) -> None:
    def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, content=b"<center>nginx: upstream busy</center>")

    client = httpx.Client(transport=httpx.MockTransport(handler))
    with pytest.raises(RetryableProviderError, match="HTTP 503: <center>nginx: upstream busy</center>"):
        download("https://cdn.test/f.mp4", tmp_path / "o.mp4", max_bytes=1 << 20, client=client)
    assert ERROR_BODY_BYTES <= 8192


def test_a_body_longer_than_fal_described_is_stopped_as_soon_as_it_passes_the_size(tmp_path: Path) -> None:
    """Before, a body with no Content-Length that never ended was read and written up to the
    ``max_bytes`` cap (2 GiB by default), then compared with fal's ``file_size``. Now the
    attempt stops at the first chunk past the size fal described."""
    taken: list[int] = []

    def padded() -> Iterator[bytes]:
        yield VIDEO
        while len(taken) < 100:  # long enough to tell; ended, so that the old code fails, not hangs
            taken.append(64 * 1024)
            yield b"\0" * (64 * 1024)

    def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=padded())  # streamed: no Content-Length

    client = httpx.Client(transport=httpx.MockTransport(handler))
    with pytest.raises(
        DownloadIntegrityError, match=f"padded: more than the {len(VIDEO)} bytes fal described"
    ):
        download(
            "https://cdn.test/f.mp4",
            tmp_path / "o.mp4",
            expected_size=len(VIDEO),
            max_bytes=1 << 40,
            client=client,
        )
    assert len(taken) == 1  # one chunk past the size, not the cap
    assert leftovers(tmp_path) == []


def test_the_upload_cache_key_is_the_rest_origin_without_credentials() -> None:
    """Uploads are remembered per fal: its REST URL's scheme, host and port, nothing else."""
    assert url_origin_text("https://user:s3cret@REST.fal.ai/v1/?key=x") == "https://rest.fal.ai:443"
    assert url_origin_text("http://127.0.0.1:8787") == "http://127.0.0.1:8787"
    assert url_origin_text("http://[::1]/") == "http://[::1]:80"
