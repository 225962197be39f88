"""What a local image check reads is what it hashes, and what it says of an image is said once.

Audit findings: (1) a file rewritten during ``submit`` was checked once and hashed from a later
read, so the job recorded bytes nobody checked (the whole submit path is in
``tests/integration/test_checked_bytes_recorded.py``; here, the check's own reads); (2) animated
WebP/APNG and 16-bit or float greyscale images passed without a word, though the model takes only
the first frame and a plain RGB conversion turns a mid-grey 16-bit image almost white; (3) the
decompression-bomb line quoted two different limits.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from PIL import Image

from jobs import media
from jobs.endpoints import FieldType, MediaConstraints, get_endpoint
from jobs.manifest import validate_manifest
from jobs.media import check_bytes, check_file, checked_file

I2V = get_endpoint("fal-ai/wan-i2v")
W25 = get_endpoint("fal-ai/wan-25-preview/image-to-video")
_I2V_IMAGE = I2V.fields_by_name["image_url"].media
_W25_IMAGE = W25.fields_by_name["image_url"].media
assert _I2V_IMAGE is not None
assert _W25_IMAGE is not None
I2V_IMAGE: MediaConstraints = _I2V_IMAGE
W25_IMAGE: MediaConstraints = _W25_IMAGE


def _saved(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _noise(size: tuple[int, int] = (640, 480)) -> Image.Image:
    return Image.effect_noise(size, 60).convert("RGB")


@pytest.fixture
def fresh_caches() -> Iterator[None]:
    media._check_file_cached.cache_clear()
    media._decoded.clear()
    yield
    media._check_file_cached.cache_clear()
    media._decoded.clear()


# ------------------------------------------------------------------ 1. one read, hashed as checked


def test_the_check_hashes_the_bytes_it_read_not_the_file_found_at_its_path_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_caches: None
) -> None:
    """The file replaced (a new file renamed over it, as editors and sync tools do) once its
    header was read: the check goes on with the file it opened, and its hash is of those bytes."""
    path = tmp_path / "a.png"
    whole = _saved(_noise(), "PNG")
    path.write_bytes(whole)
    real = media._read_header

    def header_then_replace(fh: BinaryIO) -> media.ImageHeader:
        header = real(fh)
        (tmp_path / "new.png").write_bytes(whole[: len(whole) // 2])
        (tmp_path / "new.png").replace(path)
        return header

    monkeypatch.setattr(media, "_read_header", header_then_replace)
    assert checked_file(path, FieldType.IMAGE, W25_IMAGE) == ([], hashlib.sha256(whole).hexdigest())


def test_a_file_cut_in_place_during_its_check_is_refused_as_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_caches: None
) -> None:
    """Cut on disk (same file) after its header was read: what the check read on is the cut
    file, and it says so — nothing passes that was not decoded."""
    path = tmp_path / "a.png"
    whole = _saved(_noise(), "PNG")
    path.write_bytes(whole)
    real = media._read_header

    def header_then_cut(fh: BinaryIO) -> media.ImageHeader:
        header = real(fh)
        path.write_bytes(whole[: len(whole) // 2])
        return header

    monkeypatch.setattr(media, "_read_header", header_then_cut)
    problems, digest = checked_file(path, FieldType.IMAGE, W25_IMAGE)
    assert [p.message.split(":")[0] for p in problems] == ["the image is truncated or corrupt"]
    assert digest is None


def test_the_hash_is_of_the_whole_file_and_none_for_a_refused_one(tmp_path: Path, fresh_caches: None) -> None:
    path = tmp_path / "a.png"
    data = _saved(_noise(), "PNG") + b"trailing bytes no reader asks for"
    path.write_bytes(data)
    assert checked_file(path, FieldType.IMAGE, W25_IMAGE) == ([], hashlib.sha256(data).hexdigest())
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[:4000])
    problems, digest = checked_file(cut, FieldType.IMAGE, W25_IMAGE)
    assert [p.severity for p in problems] == ["error"]
    assert digest is None


def test_a_file_whose_two_checks_in_one_pass_read_different_bytes_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_caches: None
) -> None:
    """One image for two endpoints (two limits, two checks), rewritten between them: which of the
    two contents would be sent is unknown, so neither is."""
    (tmp_path / "images").mkdir()
    image = tmp_path / "images" / "a.png"
    image.write_bytes(_saved(_noise(), "PNG"))
    other = _saved(_noise((600, 480)), "PNG")
    path = tmp_path / "m.yaml"
    path.write_text(
        "name: m\nitems:\n"
        "  - {endpoint: fal-ai/wan-i2v, prompt: p, seed: 1, image_url: images/a.png}\n"
        "  - {endpoint: fal-ai/wan-25-preview/image-to-video, prompt: p, seed: 1, image_url: images/a.png}\n",
        encoding="utf-8",
    )
    real = media._check_image
    swapped: list[int] = []

    def check_then_swap(fh: BinaryIO, size: int, limits: MediaConstraints) -> Any:
        found = real(fh, size, limits)
        if not swapped:
            swapped.append(1)
            image.write_bytes(other)
        return found

    monkeypatch.setattr(media, "_check_image", check_then_swap)
    report = validate_manifest(path)
    (error,) = report.errors
    assert (error.line, error.field) == (4, "image_url")
    assert error.message == "images/a.png changed while it was being checked (two reads of it differ)"


# ------------------------------------------------------------------ 2. warned, never refused


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_an_animated_webp_or_apng_passes_with_one_warning(fmt: str) -> None:
    frames = [Image.new("RGB", (480, 480), (60 * i, 90, 120)) for i in range(3)]
    data = _saved(frames[0], fmt, save_all=True, append_images=frames[1:])
    (note,) = check_bytes(data, FieldType.IMAGE, W25_IMAGE)
    assert note.severity == "warning"
    assert note.message == "the image is animated (3 frames): the model takes its first frame; sent as is"
    assert check_bytes(_saved(frames[0], fmt), FieldType.IMAGE, W25_IMAGE) == []  # a still one: nothing


def test_a_16_bit_greyscale_png_passes_with_one_warning() -> None:
    grey = Image.new("I;16", (480, 480), 32768)  # mid-grey: a plain RGB conversion makes it white
    (note,) = check_bytes(_saved(grey, "PNG"), FieldType.IMAGE, W25_IMAGE)
    assert note.severity == "warning"
    assert note.message.startswith("the image is 16-bit greyscale (Pillow mode I;16): the model's conversion")
    assert check_bytes(_saved(Image.new("L", (480, 480), 128), "PNG"), FieldType.IMAGE, W25_IMAGE) == []


def test_a_float_greyscale_tiff_on_wan_21_warns_of_its_format_and_of_its_samples() -> None:
    data = _saved(Image.new("F", (480, 480), 0.5), "TIFF")
    messages = [(p.severity, p.message.split(":")[0]) for p in check_bytes(data, FieldType.IMAGE, I2V_IMAGE)]
    assert messages == [
        ("warning", "image format TIFF"),
        ("warning", "the image is 32-bit floating-point greyscale (Pillow mode F)"),
    ]


def test_the_warnings_reach_validate_as_located_lines(tmp_path: Path, fresh_caches: None) -> None:
    (tmp_path / "images").mkdir()
    frames = [Image.new("RGB", (480, 480), (60 * i, 90, 120)) for i in range(2)]
    frames[0].save(tmp_path / "images" / "a.webp", save_all=True, append_images=frames[1:])
    path = tmp_path / "m.yaml"
    path.write_text(
        "name: m\nendpoint: fal-ai/wan-25-preview/image-to-video\n"
        "items:\n  - {prompt: p, seed: 1, image_url: images/a.webp}\n",
        encoding="utf-8",
    )
    report = validate_manifest(path)
    assert report.ok
    (warning,) = [i for i in report.warnings if i.field == "image_url"]
    assert (warning.line, warning.severity) == (4, "warning")
    assert warning.message == "the image is animated (2 frames): the model takes its first frame; sent as is"


# ------------------------------------------------------------------ 3. one limit quoted


@pytest.mark.parametrize("side", [40, 60])  # over the limit; over twice it (Pillow's own check)
def test_a_decompression_bomb_is_told_one_limit(
    side: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_caches: None
) -> None:
    path = tmp_path / "bomb.png"
    Image.new("RGB", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    (problem,) = check_file(path, FieldType.IMAGE, W25_IMAGE)
    assert problem.severity == "error"
    assert problem.message == f"refused as a decompression bomb: the image has {side * side:,} pixels"
    assert problem.allowed == "an image of at most 1,000 pixels (Pillow's decompression-bomb guard)"
    assert "2000" not in problem.message + problem.allowed
