"""Hard limits are fal's input schema's; its overview's stricter figures are only advised.

Found by an audit: where fal's docs contradict themselves, the registry took the stricter
"About" blurb as the hard limit, so wanbatch refused images fal's input schema allows, and the
simulator answered them with a 422 as if fal had refused them:

* Wan 2.6: the schema says "Image dimensions must be between 240 and 7680", the About "360-2000
  pixels". A 3840x2160 JPEG (a 4K photo) was ``validate`` exit 2 "too large (allowed: from
  360x360 to 2000x2000 pixels)", a 300x300 one "too small"; the simulator answered 422.
* Wan 2.5: the schema says "Max file size: 25.0MB", the About "Max size: 10MB": a 12 MB PNG
  was refused.
* The simulator's media and download 422 items had no ``url``, which fal's error page
  (docs.fal.ai/errors) makes required beside ``loc``, ``msg`` and ``type``.

Now the schema's limit refuses (and is the simulator's 422); outside the overview's but inside
the schema's is one warning line naming both figures and where each is published, and the job
is stored.
"""

from __future__ import annotations

import base64
import io
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from falsim.validation import validate_input as sim_validate
from jobs.endpoints import FieldType, MediaConstraints, get_endpoint
from jobs.media import check_bytes
from jobs.settings import get_settings
from tests.in_process import run_main

W25 = "fal-ai/wan-25-preview/image-to-video"
W26 = "wan/v2.6/image-to-video"
PIXELS_ADVISED = (
    "fal's overview says from 360x360 to 2000x2000 pixels, its input schema allows from 240x240 "
    "to 7680x7680 pixels; sent as is"
)
BYTES_ADVISED = (
    "fal's overview says at most 10 MB (10,000,000 bytes), its input schema allows at most "
    "25 MB (25,000,000 bytes); sent as is"
)


@pytest.fixture(autouse=True)
def _settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'w.db'}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.delenv("FAL_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _jpeg(path: Path, size: tuple[int, int]) -> None:
    Image.new("RGB", size, (90, 120, 150)).save(path, "JPEG", quality=60)


def _padded_png(path: Path, total: int) -> None:
    """A readable PNG of ``total`` bytes (400x400, then bytes after its end, which readers skip)."""
    buf = io.BytesIO()
    Image.new("RGB", (400, 400), (10, 20, 30)).save(buf, "PNG")
    data = buf.getvalue()
    path.write_bytes(data + b"\0" * (total - len(data)))


def _manifest(tmp_path: Path, name: str, endpoint: str, image: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nendpoint: {endpoint}\nitems:\n  - prompt: a slow pan\n    image_url: {image}\n"
    )
    return path


def _jobs_stored(tmp_path: Path) -> int:
    if not (tmp_path / "w.db").exists():
        return 0
    with sqlite3.connect(tmp_path / "w.db") as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return int(conn.execute("SELECT count(*) FROM jobs").fetchone()[0]) if "jobs" in tables else 0


def _warnings(said: pytest.CaptureFixture[str]) -> list[str]:
    out = said.readouterr()
    return [line for line in (out.out + out.err).splitlines() if line.startswith("warning")]


@pytest.mark.parametrize(
    ("size", "found"),
    [((3840, 2160), "the image is 3840x2160 pixels"), ((300, 300), "the image is 300x300 pixels")],
    ids=["4k-photo", "300px"],
)
def test_wan26_an_image_inside_the_schema_but_outside_the_overview_warns_and_is_submitted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    size: tuple[int, int],
    found: str,
) -> None:
    _jpeg(tmp_path / "photo.jpg", size)
    manifest = _manifest(tmp_path, "photos", W26, "photo.jpg")
    for command in ("validate", "submit"):
        assert run_main([command, str(manifest)], monkeypatch) == 0, command
        (line,) = _warnings(capsys)
        assert line == f"warning {manifest}:5: item 0: field 'image_url': {found}: {PIXELS_ADVISED}", line
    assert _jobs_stored(tmp_path) == 1


def test_wan26_an_image_past_the_schema_is_refused_and_nothing_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _jpeg(tmp_path / "wide.jpg", (8000, 400))
    manifest = _manifest(tmp_path, "wide", W26, "wide.jpg")
    for command in ("validate", "submit"):
        assert run_main([command, str(manifest)], monkeypatch) == 2, command
        err = capsys.readouterr().err
        assert (
            f"{manifest}:5: item 0: field 'image_url': the image is 8000x400 pixels, too large "
            "(allowed: from 240x240 to 7680x7680 pixels)"
        ) in err
        assert "overview" not in err  # refused: no advice beside it
    assert _jobs_stored(tmp_path) == 0


def test_wan25_a_12_mb_png_warns_and_is_submitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _padded_png(tmp_path / "big.png", 12 * 1000 * 1000)
    manifest = _manifest(tmp_path, "big", W25, "big.png")
    for command in ("validate", "submit"):
        assert run_main([command, str(manifest)], monkeypatch) == 0, command
        (line,) = _warnings(capsys)
        assert line == (
            f"warning {manifest}:5: item 0: field 'image_url': the image is 12 MB (12,000,000 bytes): "
            + BYTES_ADVISED
        ), line
    assert _jobs_stored(tmp_path) == 1


def test_wan25_a_png_over_25_mb_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _padded_png(tmp_path / "huge.png", 25_000_001)
    manifest = _manifest(tmp_path, "huge", W25, "huge.png")
    for command in ("validate", "submit"):
        assert run_main([command, str(manifest)], monkeypatch) == 2, command
        err = capsys.readouterr().err
        assert (
            "field 'image_url': the image is 25 MB (25,000,001 bytes), larger than the endpoint accepts "
            "(allowed: at most 25 MB (25,000,000 bytes))"
        ) in err
    assert _jobs_stored(tmp_path) == 0


# -- the simulator stages fal's schema: it refuses the hard limits only, every item with a url ------


def _data_uri(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 150)).save(buf, "JPEG", quality=60)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def test_the_simulator_accepts_a_4k_photo_on_wan26_and_refuses_8000_pixels_with_a_url() -> None:
    spec = get_endpoint(W26)
    resolved, errors = sim_validate(spec, {"prompt": "a slow pan", "image_url": _data_uri((3840, 2160))})
    assert errors == []
    assert resolved is not None
    resolved, errors = sim_validate(spec, {"prompt": "a slow pan", "image_url": _data_uri((8000, 400))})
    assert resolved is None
    (error,) = errors
    assert error["loc"] == ["body", "image_url"]
    assert error["type"] == "image_too_large"
    assert error["url"] == "https://docs.fal.ai/errors/#image_too_large"
    assert error["msg"] == (
        "the image is 8000x400 pixels, too large (allowed: from 240x240 to 7680x7680 pixels)"
    )


@pytest.mark.parametrize(
    ("value", "exists"),
    [
        ("data:image/png;base64,@@not base64@@", None),
        ("http://127.0.0.1:1/files/gone.png", False),
        ("ftp://example.com/x.png", None),
    ],
    ids=["bad-data-uri", "gone-upload", "not-a-url"],
)
def test_a_download_422_item_carries_a_url(value: str, exists: bool | None) -> None:
    spec = get_endpoint(W26)
    resolved, errors = sim_validate(
        spec, {"prompt": "a slow pan", "image_url": value}, local_file_exists=lambda _url: exists
    )
    assert resolved is None
    (error,) = errors
    assert error["type"] == "file_download_error"
    assert error["url"] == "https://docs.fal.ai/errors/#file_download_error"


def test_every_simulator_422_item_has_loc_msg_type_and_url() -> None:
    spec = get_endpoint(W26)
    _, errors = sim_validate(spec, {"resolution": "480p", "duration": "7"})
    _, not_an_object = sim_validate(spec, ["a list"])
    assert errors
    assert not_an_object
    for item in [*errors, *not_an_object]:
        assert {"loc", "msg", "type", "url"} <= item.keys(), item
        assert item["url"].startswith("https://errors.pydantic.dev/"), item


# -- the registry: advised limits are stricter than the hard ones, and only beside published ones ----


def test_the_registry_keeps_the_schema_hard_and_the_overview_advised() -> None:
    w26 = get_endpoint(W26).fields_by_name["image_url"].media
    w25 = get_endpoint(W25).fields_by_name["image_url"].media
    assert w26 is not None
    assert w25 is not None
    assert (w26.min_width, w26.max_width, w26.min_height, w26.max_height) == (240, 7680, 240, 7680)
    assert w26.advised is not None
    assert (w26.advised.min_width, w26.advised.max_width) == (360, 2000)
    assert w25.max_bytes == 25_000_000
    assert w25.advised is not None
    assert w25.advised.max_bytes == 10_000_000
    # Inside the overview's figures: nothing said.
    full_hd = base64.b64decode(_data_uri((1920, 1080)).partition(",")[2])
    assert check_bytes(full_hd, FieldType.IMAGE, w26) == []


@pytest.mark.parametrize(
    "extra",
    [
        {"advised": {"max_width": 9000}},  # looser than the hard limit
        {"advised": {"min_width": 100}},
        {"advised": {"max_width": 7680}},  # the same: nothing advised
        {"advised": {}},
        {"assumed": True, "advised": {"max_width": 2000}},  # assumed limits are no published ones
        {"advised": {"formats": ["PNG"]}},  # not a key an advised block takes
    ],
)
def test_an_advised_block_must_be_stricter_than_published_limits(extra: dict[str, object]) -> None:
    base: dict[str, object] = {"formats": ["JPEG"], "min_width": 240, "max_width": 7680, "source": "x"}
    with pytest.raises(ValidationError):
        MediaConstraints.model_validate({**base, **extra})


# -- "25MB" is decimal: 25,000,000 bytes, and the lines quote the limit as fal's page does ----------


def test_wan26_a_25_5_mb_png_is_refused_quoting_fals_25_mb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """fal's Wan 2.6 page says "Max size: 25MB". It was read as 25 MiB (26,214,400 bytes), so a
    25,500,000-byte image passed validation and was sent; the refusal quoted "25.0 MiB"."""
    _padded_png(tmp_path / "big.png", 25_500_000)
    manifest = _manifest(tmp_path, "big", W26, "big.png")
    for command in ("validate", "submit"):
        assert run_main([command, str(manifest)], monkeypatch) == 2, command
        err = capsys.readouterr().err
        assert (
            f"{manifest}:5: item 0: field 'image_url': the image is 25.5 MB (25,500,000 bytes), larger than "
            "the endpoint accepts (allowed: at most 25 MB (25,000,000 bytes))"
        ) in err, err
    assert _jobs_stored(tmp_path) == 0
    # The simulator, staging fal, refuses it with the same words (and 25,000,000 bytes pass).
    spec = get_endpoint(W26)
    big = (tmp_path / "big.png").read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(big).decode()
    resolved, errors = sim_validate(spec, {"prompt": "a slow pan", "image_url": uri})
    assert resolved is None
    (error,) = errors
    assert error["msg"].endswith("(allowed: at most 25 MB (25,000,000 bytes))"), error
    at_limit = "data:image/png;base64," + base64.b64encode(big[:25_000_000]).decode()
    assert sim_validate(spec, {"prompt": "a slow pan", "image_url": at_limit})[1] == []


@pytest.mark.parametrize(
    ("endpoint", "field", "published"),
    [
        (W26, "image_url", 25_000_000),  # About: "Max size: 25MB"
        (W26, "audio_url", 15_000_000),  # schema: "File size: Up to 15 MB."
        (W25, "image_url", 25_000_000),  # schema: "Max file size: 25.0MB"
        (W25, "audio_url", 15_000_000),
        ("fal-ai/wan-i2v", "image_url", 25_000_000),  # wanbatch's own assumption, said in MB too
        ("fal-ai/wan-flf2v", "start_image_url", 25_000_000),
        ("fal-ai/wan-flf2v", "end_image_url", 25_000_000),
    ],
)
def test_every_size_limit_is_the_published_figure_in_decimal_megabytes(
    endpoint: str, field: str, published: int
) -> None:
    media = get_endpoint(endpoint).fields_by_name[field].media
    assert media is not None
    assert media.max_bytes == published


def test_wan25_the_overviews_10_mb_is_10_000_000_bytes() -> None:
    media = get_endpoint(W25).fields_by_name["image_url"].media
    assert media is not None
    assert media.advised is not None
    assert media.advised.max_bytes == 10_000_000
