"""Field checks against the registry, and media checks (files, URLs, data URIs)."""

from __future__ import annotations

import base64
import io
import wave
from pathlib import Path

import pytest
from PIL import Image

from jobs.endpoints import FieldType, get_endpoint
from jobs.errors import did_you_mean
from jobs.media import MediaKind, check_data_uri, check_file, check_media, check_url, classify, file_sha256
from jobs.validation import check_input, check_value

I2V = get_endpoint("fal-ai/wan-i2v")
W25 = get_endpoint("fal-ai/wan-25-preview/image-to-video")
W22 = get_endpoint("fal-ai/wan-22")
W25_IMAGE = W25.field("image_url")
W25_AUDIO = W25.field("audio_url")
assert W25_IMAGE is not None
assert W25_IMAGE.media is not None
assert W25_AUDIO is not None
assert W25_AUDIO.media is not None
IMAGE_LIMITS = W25_IMAGE.media
AUDIO_LIMITS = W25_AUDIO.media


def png_bytes(size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, fmt, **kw)
    return buf.getvalue()


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\0\0" * int(rate * seconds))
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def messages(spec_field: str, value: object, spec=W22) -> list[str]:  # type: ignore[no-untyped-def]
    fld = spec.field(spec_field)
    assert fld is not None
    return [p.message for p in check_value(fld, value)]


# -- scalar fields ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "phrase"),
    [
        ("num_frames", True, "expected an integer"),
        ("num_frames", 81.0, "expected an integer"),
        ("num_frames", "81", "expected an integer"),
        ("num_frames", 80, "out of range"),
        ("num_frames", 122, "out of range"),
        ("shift", False, "expected a number"),
        ("shift", float("nan"), "not a finite number"),
        ("shift", 0.5, "out of range"),
        ("enable_safety_checker", "yes", "expected true or false"),
        ("enable_safety_checker", 1, "expected true or false"),
        ("prompt", 5, "expected text"),
        ("prompt", ["a"], "expected text, got a list"),
        ("seed", [1, 2, 3], "a list makes one job per value only under `matrix:`"),
        ("resolution", "1080p", "not one of the allowed values"),
        ("seed", None, "must not be null"),
    ],
)
def test_bad_values_are_refused(field: str, value: object, phrase: str) -> None:
    found = messages(field, value)
    assert found
    assert phrase in found[0]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_frames", 81),
        ("num_frames", 121),
        ("shift", 1),
        ("shift", 10.0),
        ("guidance_scale", -3),  # no range published: any number
        ("enable_safety_checker", False),
        ("resolution", "580p"),
        ("seed", 0),
        ("seed", 2**40),
    ],
)
def test_good_values_pass(field: str, value: object) -> None:
    assert messages(field, value) == []


def test_only_a_list_gets_the_matrix_hint() -> None:
    """A mapping or a text in the wrong place is no sweep: no word of ``matrix`` then."""
    assert all("matrix" not in m for m in messages("seed", {"a": 1}) + messages("seed", "7"))


def test_max_length_counts_characters() -> None:
    assert check_value(W25.field("prompt"), "é" * 800) == []  # type: ignore[arg-type]
    (problem,) = check_value(W25.field("prompt"), "é" * 801)  # type: ignore[arg-type]
    assert "801 characters" in problem.message
    assert problem.allowed
    assert "800" in problem.allowed


def test_unknown_field_suggests_and_required_missing_is_reported() -> None:
    problems = check_input(I2V, {"promt": "x", "image_url": "https://example.com/a.png"})
    by_field = {p.field: p for p in problems}
    assert "did you mean 'prompt'" in by_field["promt"].message
    assert "required" in by_field["prompt"].message


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("resolution", "1080p", None),  # another resolution, not a typo of 580p
        ("resolution", "72Op", None),
        ("resolution", "720P", "720p"),
        ("resolution", 720, "720p"),  # a YAML number: the unit is missing
        ("resolution", "480", "480p"),
        ("resolution", " 580p", "580p"),
        ("aspect_ratio", "1:1 ", "1:1"),
        ("aspect_ratio", "16:10", None),
        ("aspect_ratio", "9:61", None),
    ],
)
def test_an_allowed_value_is_suggested_only_when_plainly_meant(
    field: str, value: object, hint: str | None
) -> None:
    (message,) = messages(field, value)
    assert "not one of the allowed values" in message
    if hint is None:
        assert "did you mean" not in message
    else:
        assert f"(did you mean {hint!r}?)" in message


def test_did_you_mean() -> None:
    assert did_you_mean("resolutoin", ("resolution", "seed")) == " (did you mean 'resolution'?)"
    assert did_you_mean("zzz", ("resolution", "seed")) == ""


# -- media: forms --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("https://x.io/a.png", MediaKind.URL),
        ("HTTP://x.io/a.png", MediaKind.URL),
        ("data:image/png;base64,AA==", MediaKind.DATA_URI),
        ("images/a.png", MediaKind.PATH),
        ("/abs/a.png", MediaKind.PATH),
        ("C:\\pics\\a.png", MediaKind.PATH),
        ("s3://bucket/a.png", MediaKind.OTHER_SCHEME),
    ],
)
def test_classify(value: str, kind: MediaKind) -> None:
    assert classify(value) is kind


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://example.com/a.png", True),
        ("http://127.0.0.1:8080/a.png?x=1", True),
        ("https://example.com/a b.png", False),
        ("https:///a.png", False),
        ("https://example.com:99999/a.png", False),
    ],
)
def test_url_form(url: str, ok: bool) -> None:
    assert (check_url(url) == []) is ok


def test_empty_and_non_text_media_are_refused() -> None:
    assert "empty" in check_media("  ", FieldType.IMAGE, IMAGE_LIMITS)[0].message
    assert "expected text" in check_media(5, FieldType.IMAGE, IMAGE_LIMITS)[0].message


# -- media: images -------------------------------------------------------------------------------


def test_good_data_uri_passes() -> None:
    assert check_data_uri(data_uri(png_bytes((400, 400))), FieldType.IMAGE, IMAGE_LIMITS) == []


@pytest.mark.parametrize(
    ("data", "phrase"),
    [
        (png_bytes((400, 400), "RGBA"), "alpha"),
        (png_bytes((400, 400), "LA"), "alpha"),
        (png_bytes((400, 300)), "too small"),
        (png_bytes((2001, 400)), "too large"),
        (png_bytes((400, 400), fmt="GIF"), "format GIF is not accepted"),
        (b"\x89PNG\r\n\x1a\n garbage", "not a readable image"),
    ],
)
def test_image_problems_in_data_uris(data: bytes, phrase: str) -> None:
    problems = check_data_uri(data_uri(data), FieldType.IMAGE, IMAGE_LIMITS)
    assert any(phrase in p.message for p in problems), problems


def test_palette_transparency_counts_as_alpha(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    Image.new("P", (400, 400)).save(path, transparency=0)
    assert any("alpha" in p.message for p in check_file(path, FieldType.IMAGE, IMAGE_LIMITS))


def test_alpha_is_fine_where_allowed(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (400, 400)).save(path)
    limits = I2V.field("image_url").media  # type: ignore[union-attr]
    assert limits is not None
    assert limits.alpha_allowed
    assert check_file(path, FieldType.IMAGE, limits) == []


def test_file_checks_read_only_the_header(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    Image.new("RGB", (640, 360)).save(path)
    with path.open("ab") as fh:
        fh.write(b"\0" * 1000)  # trailing junk a decoder would choke on, the header is fine
    assert check_file(path, FieldType.IMAGE, IMAGE_LIMITS) == []


def test_too_many_bytes(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (640, 360)).save(path)
    with path.open("ab") as fh:
        fh.truncate(IMAGE_LIMITS.max_bytes + 1)  # type: ignore[operator]
    (problem,) = check_file(path, FieldType.IMAGE, IMAGE_LIMITS)
    assert "larger than the endpoint accepts" in problem.message
    assert "25 MB (25,000,000 bytes)" in problem.allowed  # the schema's (its overview's 10 MB only warns)


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.png"
    Image.new("1", (1000, 1000)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    limits = I2V.field("image_url").media  # type: ignore[union-attr]
    assert limits is not None
    problems = check_file(path, FieldType.IMAGE, limits)
    assert any("decompression bomb" in p.message for p in problems)


def test_changed_file_is_checked_again(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (400, 400)).save(path)
    assert check_file(path, FieldType.IMAGE, IMAGE_LIMITS) == []
    Image.new("RGBA", (400, 401)).save(path)
    assert check_file(path, FieldType.IMAGE, IMAGE_LIMITS) != []


def test_missing_and_non_regular_files(tmp_path: Path) -> None:
    assert "not found" in check_file(tmp_path / "nope.png", FieldType.IMAGE, IMAGE_LIMITS)[0].message
    assert "not a regular file" in check_file(tmp_path, FieldType.IMAGE, IMAGE_LIMITS)[0].message
    assert "not a regular file" in check_file(Path("/dev/null"), FieldType.IMAGE, IMAGE_LIMITS)[0].message


# -- media: audio ----------------------------------------------------------------------------------


def test_audio_is_judged_by_its_bytes_and_size(tmp_path: Path) -> None:
    good = tmp_path / "music.ogg"  # a WAV whatever its name says
    good.write_bytes(wav_bytes(5))
    assert check_file(good, FieldType.AUDIO, AUDIO_LIMITS) == []
    ogg = tmp_path / "music.wav"
    ogg.write_bytes(b"OggS" + b"\0" * 100)
    assert "neither WAV nor MP3" in check_file(ogg, FieldType.AUDIO, AUDIO_LIMITS)[0].message
    assert check_data_uri(data_uri(wav_bytes(5), "audio/wav"), FieldType.AUDIO, AUDIO_LIMITS) == []
    assert check_data_uri(data_uri(wav_bytes(5), "image/png"), FieldType.AUDIO, AUDIO_LIMITS) != []
    big = tmp_path / "big.wav"
    big.write_bytes(wav_bytes(5))
    with big.open("ab") as fh:
        fh.truncate(AUDIO_LIMITS.max_bytes + 1)  # type: ignore[operator]
    (problem,) = check_file(big, FieldType.AUDIO, AUDIO_LIMITS)
    assert "too large" in problem.message


def test_file_sha256_is_the_content_hash(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "x.bin"
    path.write_bytes(b"hello")
    assert file_sha256(path) == hashlib.sha256(b"hello").hexdigest()
    assert file_sha256(tmp_path / "missing") is None
