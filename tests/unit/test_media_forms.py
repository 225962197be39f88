"""What form a media value takes, decided in one place (:func:`jobs.media.classify`) for
validation, the worker and the simulator; and one reading of a data URI's syntax for both sides.

Audit: ``image_url: HTTPS://example.com/car.png`` passed ``validate`` (schemes are
case-insensitive, RFC 3986 3.1), then every such job failed at send with "media path must be
absolute after manifest loading": the worker tested ``value.startswith("https://")``. And
``data:image/webp ;base64,…`` (a blank in the media type) or ``data:image/;base64,…`` passed
``validate`` and came back from (simulated) fal as a billed 422 "Failed to decode the data URI".
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from PIL import Image

from falsim.engine import Engine
from falsim.storage import FileStore
from falsim.validation import decode_data_uri
from falsim.validation import validate_input as sim_validate
from jobs.endpoints import FieldType, get_endpoint
from jobs.media import check_data_uri, check_media, parse_data_uri, sent_form
from jobs.models import Job
from jobs.settings import get_settings
from tests.in_process import run_main
from worker.fal.storage import MediaPreparer, prepare_input
from worker.steps.failures import _uploaded_urls

W25 = get_endpoint("fal-ai/wan-25-preview/image-to-video")
_IMAGE = W25.field("image_url")
assert _IMAGE is not None
assert _IMAGE.media is not None
IMAGE_LIMITS = _IMAGE.media


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (400, 400), (10, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


PNG_B64 = base64.b64encode(_png()).decode()


# -- one reading of a data URI, the same verdict on both sides -------------------------------------

#: Data URI headers (before ``,<base64 of a good PNG>``) and whether fal can decode them.
HEADERS = [
    ("data:image/png;base64", True),
    ("Data:image/png;base64", True),
    ("DATA:image/png;base64", True),
    ("data:IMAGE/PNG;base64", True),
    ("data:image/png;charset=utf-8;base64", True),
    ("data:image/x-portable+png.v1;base64", True),
    ("data:image/webp ;base64", False),
    ("data:image/ webp;base64", False),
    ("data: image/png;base64", False),
    ("data:image/;base64", False),
    ("data:/png;base64", False),
    ("data:image;base64", False),
    ("data:image/png/x;base64", False),
    ("data:image/p(n)g;base64", False),
    ("data:image/pñg;base64", False),
    ("data:image/png", False),
]


@pytest.mark.parametrize(("header", "decodes"), HEADERS, ids=[h for h, _ in HEADERS])
def test_validation_and_the_simulator_agree_on_every_data_uri(header: str, decodes: bool) -> None:
    value = f"{header},{PNG_B64}"
    refused = check_data_uri(value, FieldType.IMAGE, IMAGE_LIMITS)
    resolved, errors = sim_validate(W25, {"prompt": "a cat", "image_url": value})
    assert (refused == []) is decodes, refused
    assert (errors == []) is decodes, errors
    assert (resolved is not None) is decodes
    assert (decode_data_uri(value) is not None) is decodes


def test_a_media_type_that_is_no_type_and_subtype_is_a_located_issue_naming_what_is_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m.yaml").write_text(
        "name: sp\nendpoint: fal-ai/wan-i2v\nitems:\n"
        f'  - {{prompt: a, image_url: "data:image/webp ;base64,{PNG_B64}"}}\n'
        f'  - {{prompt: b, image_url: "data:image/;base64,{PNG_B64}"}}\n'
        f'  - {{prompt: c, image_url: "Data:image/png;base64,{PNG_B64}"}}\n'
    )
    assert run_main(["validate", str(tmp_path / "m.yaml")], monkeypatch) == 2
    out = capsys.readouterr()
    errors = [line for line in (out.out + out.err).splitlines() if line.startswith("error")]
    assert len(errors) == 2, out
    assert "m.yaml:4: item 0: field 'image_url': the data URI's media type 'image/webp '" in errors[0]
    assert "m.yaml:5: item 1: field 'image_url': the data URI's media type 'image/'" in errors[1]
    for line in errors:
        assert "is not a valid type/subtype" in line
        assert "(allowed: a media type of two parts type/subtype, each ASCII letters, digits" in line


def test_a_data_uri_parses_to_its_parts_as_written() -> None:
    parts = parse_data_uri("Data:image/PNG;name=a.png;base64,QUJD")
    assert parts is not None
    assert (parts.mime, parts.params, parts.base64, parts.data) == (
        "image/PNG",
        ("name=a.png",),
        True,
        "QUJD",
    )
    assert parts.mime_ok
    assert parts.decoded() == b"ABC"
    assert parse_data_uri("data:image/png;base64") is None  # no comma, no data
    assert parse_data_uri("https://x/a.png") is None


# -- a scheme in any case ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        ("HTTPS://example.com/Car.PNG?X=1", "https://example.com/Car.PNG?X=1"),
        ("Http://example.com/a.png", "http://example.com/a.png"),
        ("https://example.com/a.png", "https://example.com/a.png"),
        ("Data:image/PNG;base64,QUJD", "data:image/PNG;base64,QUJD"),
        ("/abs/HTTPS:/x.png", "/abs/HTTPS:/x.png"),
    ],
)
def test_a_url_is_sent_as_written_but_for_its_scheme_in_lower_case(value: str, sent: str) -> None:
    assert sent_form(value) == sent
    preparer = MediaPreparer(uploader=lambda d, m, n: "unused", inline_max_bytes=10)
    if value.startswith("/"):
        return  # a local path: read, not passed on (another test's subject)
    assert preparer.prepare(value, kind=FieldType.IMAGE) == sent
    assert prepare_input({"image_url": value}, {"image_url": FieldType.IMAGE}, preparer=preparer) == {
        "image_url": sent
    }


def test_the_simulator_reads_a_scheme_in_any_case() -> None:
    for value in (
        "HTTPS://example.com/car.png",
        "Http://example.com/car.png",
        f"DATA:image/png;base64,{PNG_B64}",
    ):
        assert check_media(value, FieldType.IMAGE, IMAGE_LIMITS) == []
        resolved, errors = sim_validate(W25, {"prompt": "a cat", "image_url": value})
        assert errors == [], value
        assert resolved is not None
    assert decode_data_uri(f"Data:image/png;base64,{PNG_B64}") == base64.b64decode(PNG_B64)


def test_the_simulated_model_works_on_the_bytes_of_a_data_uri_whatever_the_case_of_its_scheme() -> None:
    """The same image inline gives the same video (the seed's content identity) and the
    video's aspect follows it, written ``Data:`` or ``data:``."""
    engine = Engine()
    spec = get_endpoint("fal-ai/wan-i2v")
    digest = "sha256:" + hashlib.sha256(_png()).hexdigest()
    for scheme in ("data", "Data", "DATA"):
        resolved = {"prompt": "a", "image_url": f"{scheme}:image/png;base64,{PNG_B64}"}
        assert engine._content_identity(spec, resolved)["image_url"] == digest
        assert engine._image_size(spec, resolved) == (400, 400)


def test_the_simulator_finds_its_own_upload_whatever_the_case_of_the_scheme() -> None:
    store = FileStore()
    store.base_url = "http://127.0.0.1:8787"
    stored = store.put(_png(), "a.png", "image/png")
    url = store.file_url(stored.key, stored.name)
    assert store.data_for_url(url) == _png()
    shouted = "HTTP" + url[len("http") :]
    assert store.lookup_url(shouted) is True
    assert store.data_for_url(shouted) == _png()


def test_a_users_url_in_capitals_is_never_taken_for_an_upload_of_the_attempt() -> None:
    """A 422 "Failed to download" forgets the uploads this attempt sent in place of local files;
    the user's own URL, stored ``HTTPS://…`` and sent ``https://…``, is none of them."""
    job = SimpleNamespace(
        endpoint="fal-ai/wan-i2v",
        input={"prompt": "a", "image_url": "HTTPS://example.com/car.png"},
        submitted_input={"prompt": "a", "image_url": "https://example.com/car.png"},
    )
    assert _uploaded_urls(cast(Job, job)) == []
    uploaded = SimpleNamespace(
        endpoint="fal-ai/wan-i2v",
        input={"prompt": "a", "image_url": "/m/images/car.png"},
        submitted_input={"prompt": "a", "image_url": "https://v3.fal.media/files/x/car.png"},
    )
    assert _uploaded_urls(cast(Job, uploaded)) == ["https://v3.fal.media/files/x/car.png"]


# -- the audit's run ----------------------------------------------------------------------------------


@pytest.fixture
def _sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'w.db'}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.delenv("FAL_KEY", raising=False)
    monkeypatch.delenv("WANBATCH_BROKER_URL", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.usefixtures("_sqlite")
def test_a_simulated_run_of_urls_with_a_scheme_in_capitals_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "up.yaml").write_text(
        "name: upper-url\nendpoint: fal-ai/wan-i2v\ndefaults: {resolution: 480p, seed: 1}\nitems:\n"
        '  - {prompt: a, image_url: "HTTPS://example.com/car.png"}\n'
        '  - {prompt: b, image_url: "Https://example.com/car2.png"}\n'
        f'  - {{prompt: c, image_url: "Data:image/png;base64,{PNG_B64}"}}\n'
    )
    code = run_main(["run", str(tmp_path / "up.yaml"), "--simulate", "--no-progress", "--json"], monkeypatch)
    out = capsys.readouterr()
    assert code == 0, out.err
    counts = json.loads(out.out)["counts"]
    assert counts["succeeded"] == 3, counts
    with sqlite3.connect(tmp_path / "w.db") as conn:
        sent = sorted(
            json.loads(row[0])["image_url"][:13] for row in conn.execute("SELECT submitted_input FROM jobs")
        )
    assert sent == ["data:image/pn", "https://examp", "https://examp"]
