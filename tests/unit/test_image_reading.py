"""Local images are read only as the formats an endpoint could take, and decoded whole once.

Audit: a DDS file named ``photo.jpg`` or a SPIDER file named ``sp.png``, mangled, crashed
``validate``/``estimate``/``submit``/``run`` with exit 70 (Pillow's readers raised
NotImplementedError, AttributeError); a damaged TIFF's Pillow warnings and log lines came out on
stderr before its issue line; and a truncated JPEG or half a PNG passed validation (only the
header was read) and was sent and billed. The bytes here are generated, like the audit's.

A review then found that keeping Pillow quiet by switching Python's process-wide warning filters
around each read could not hold with threads: another thread's ``catch_warnings`` (stdlib
``os.get_exec_path``, ``subprocess``, botocore's imports) put back filters from the wrong moment,
so decompression bombs passed the header check and were decoded, or every later warning of the
process was silenced (section 5).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from falsim.validation import validate_input as sim_validate
from jobs import media
from jobs.endpoints import FieldType, MediaConstraints, get_endpoint
from jobs.media import check_bytes, media_type
from jobs.settings import get_settings
from tests.in_process import run_main

I2V = get_endpoint("fal-ai/wan-i2v")
W25 = get_endpoint("fal-ai/wan-25-preview/image-to-video")
_I2V_IMAGE = I2V.fields_by_name["image_url"].media
_W25_IMAGE = W25.fields_by_name["image_url"].media
assert _I2V_IMAGE is not None
assert _W25_IMAGE is not None
I2V_IMAGE: MediaConstraints = _I2V_IMAGE
W25_IMAGE: MediaConstraints = _W25_IMAGE
WANBATCH = str(Path(sys.executable).with_name("wanbatch"))


def _saved(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def mangled_dds() -> bytes:
    """A DDS file whose pixel-format flags are 0: Pillow's DDS reader raised NotImplementedError."""
    data = bytearray(_saved(Image.new("RGB", (64, 64), (200, 100, 50)), "DDS"))
    data[80:84] = b"\0\0\0\0"  # DDS_PIXELFORMAT.dwFlags
    return bytes(data)


def mangled_spider() -> bytes:
    """A SPIDER file with a stack header of nonsense: its reader raised AttributeError."""
    data = bytearray(_saved(Image.new("L", (64, 64)), "SPIDER"))
    data[104:112] = bytes.fromhex("0000007fffffff00")  # header words 27 and 28 (istack, maxim)
    return bytes(data)


def noisy_tiff() -> bytes:
    """A TIFF whose IFD is damaged so that Pillow warns ("Corrupt EXIF data") and logs an error
    ("More samples per pixel than can be decoded: 29") before it gives up."""
    data = bytearray(_saved(Image.new("RGB", (80, 80), (10, 20, 30)), "TIFF"))
    for offset, value in ((9, 214), (90, 29), (131, 11), (183, 206)):
        data[offset] = value
    return bytes(data)


def _photo(size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(7).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def truncated_jpeg() -> bytes:
    return _saved(_photo((640, 480)), "JPEG", quality=90)[:2000]


def half_a_png() -> bytes:
    data = _saved(_photo((800, 600)), "PNG")
    return data[: len(data) // 2]


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def fresh_caches() -> Iterator[None]:
    """Verdicts are cached by path and by content; each test starts without them."""
    media._check_file_cached.cache_clear()
    media._decoded.clear()
    yield
    media._check_file_cached.cache_clear()
    media._decoded.clear()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder for a manifest and its images, with a database of its own for ``submit``/``run``."""
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'wanbatch.db'}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("FAL_KEY", "k-image-reading")
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def _manifest(folder: Path, endpoint: str, images: dict[str, bytes]) -> Path:
    for name, data in images.items():
        (folder / name).write_bytes(data)
    rows = "".join(f"  - prompt: p{i}\n    image_url: {name}\n" for i, name in enumerate(images))
    path = folder / "m.yaml"
    path.write_text(f"name: imgs\nendpoint: {endpoint}\nitems:\n{rows}", encoding="utf-8")
    return path


def _issue_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(("error", "warning"))]


# -- 1. a file of a format no endpoint takes is "not a readable image", never a crash ----------------


@pytest.mark.parametrize(
    ("name", "make"), [("photo.jpg", mangled_dds), ("sp.png", mangled_spider)], ids=["dds", "spider"]
)
@pytest.mark.parametrize("command", ["validate", "estimate", "submit", "run"])
def test_a_mangled_file_of_another_format_is_one_located_issue_and_exit_2(
    name: str,
    make: Callable[[], bytes],
    command: str,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fresh_caches: None,
) -> None:
    path = _manifest(workdir, "fal-ai/wan-i2v", {name: make()})
    args = [command, str(path)] + (["--simulate"] if command == "run" else [])
    assert run_main(args, monkeypatch) == 2
    out = capsys.readouterr()
    both = out.out + out.err
    assert "internal error" not in both, both
    assert "Traceback" not in both, both
    (line,) = _issue_lines(out.err)
    assert line.startswith("error ")
    assert "m.yaml:5: item 0: field 'image_url': not a readable image" in line, line


def test_check_bytes_media_type_and_the_simulator_survive_mangled_files() -> None:
    """DDS and SPIDER are not opened at all; GIF and TIFF, which no endpoint takes either, still
    are, so that validation names their format (a warning on Wan 2.1, an error on Wan 2.5)."""
    for fmt in ("GIF", "TIFF"):
        data = _saved(Image.new("RGB", (400, 400)), fmt)
        (warned,) = check_bytes(data, FieldType.IMAGE, I2V_IMAGE)
        assert warned.severity == "warning"
        assert f"image format {fmt}" in warned.message
        (refused,) = check_bytes(data, FieldType.IMAGE, W25_IMAGE)
        assert refused.message == f"image format {fmt} is not accepted"
    for data in (mangled_dds(), mangled_spider()):
        (problem,) = check_bytes(data, FieldType.IMAGE, I2V_IMAGE)
        assert (problem.severity, problem.message) == ("error", "not a readable image")
        assert media_type(data, "photo.jpg") == "image/jpeg"  # the name's: validation refused it
        payload = {"prompt": "a cat", "image_url": _data_uri(data, "image/jpeg")}
        resolved, errors = sim_validate(I2V, payload)
        assert resolved is None
        assert [e["type"] for e in errors] == ["image_load_error"]


def test_whatever_an_accepted_format_s_reader_raises_is_an_unreadable_image(
    monkeypatch: pytest.MonkeyPatch, fresh_caches: None
) -> None:
    """A reader's own bug on crafted bytes (any exception, not only OSError/ValueError/
    SyntaxError: DDS raised NotImplementedError) is the file's problem, not wanbatch's."""
    data = _saved(Image.new("RGB", (100, 100)), "PNG")

    def broken(self: PngImagePlugin.PngImageFile) -> None:
        raise NotImplementedError("a reader bug")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "_open", broken)
    (problem,) = check_bytes(data, FieldType.IMAGE, I2V_IMAGE)
    assert (problem.severity, problem.message) == ("error", "not a readable image")
    assert media_type(data, "x.bin") == "application/octet-stream"


# -- 2. Pillow's warnings and log lines stay off stderr ----------------------------------------------


def test_a_corrupt_tiff_prints_its_issue_line_and_nothing_of_pillow_s(tmp_path: Path) -> None:
    """In a real process: the CLI's logging sends warnings and log records to stderr."""
    path = _manifest(tmp_path, "fal-ai/wan-i2v", {"scan.tif": noisy_tiff()})
    env = {**os.environ, "WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}"}
    done = subprocess.run(
        [WANBATCH, "validate", str(path)], capture_output=True, text=True, timeout=120, check=False, env=env
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 2, lines  # the issue and the summary
    assert "m.yaml:5: item 0: field 'image_url': not a readable image" in lines[0]
    assert "nothing was submitted" in lines[1]


def test_the_quiet_window_leaves_warnings_and_logging_as_they_were(
    caplog: pytest.LogCaptureFixture, fresh_caches: None
) -> None:
    data = noisy_tiff()  # saving it logs too: before the capture
    caplog.set_level(logging.DEBUG)
    level = logging.getLogger("PIL").level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        (problem,) = check_bytes(data, FieldType.IMAGE, I2V_IMAGE)
        assert problem.message == "not a readable image"
        assert warnings.filters == filters
        warnings.warn("after the check", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["after the check"]
    assert not [r for r in caplog.records if r.name.startswith("PIL") or r.name == "py.warnings"]
    assert logging.getLogger("PIL").level == level


# -- 3. truncated or corrupt images are refused before they are sent -----------------------------------


@pytest.mark.parametrize("endpoint", [W25.id, I2V.id])
def test_a_truncated_jpeg_and_half_a_png_are_located_errors(
    endpoint: str,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fresh_caches: None,
) -> None:
    """On Wan 2.1 too: its limits are assumed, but an image fal cannot decode fails there as well."""
    path = _manifest(workdir, endpoint, {"trunc.png": half_a_png(), "trunc.jpg": truncated_jpeg()})
    assert run_main(["validate", str(path)], monkeypatch) == 2
    errors = [line for line in _issue_lines(capsys.readouterr().err) if line.startswith("error")]
    assert len(errors) == 2, errors
    for line, where in zip(errors, ("m.yaml:5: item 0", "m.yaml:7: item 1"), strict=True):
        said = "the image is truncated or corrupt: image file is truncated"
        assert f"{where}: field 'image_url': {said}" in line
        assert "(allowed: a complete image in JPEG/" in line


def test_the_simulator_refuses_a_truncated_image_as_fal_would() -> None:
    whole = _saved(_photo((640, 480)), "JPEG", quality=90)
    payload = {"prompt": "a cat", "image_url": _data_uri(whole, "image/jpeg"), "resolution": "480p"}
    assert sim_validate(W25, payload)[1] == []
    for data, mime in ((truncated_jpeg(), "image/jpeg"), (half_a_png(), "image/png")):
        payload = {"prompt": "a cat", "image_url": _data_uri(data, mime), "resolution": "480p"}
        resolved, errors = sim_validate(W25, payload)
        assert resolved is None
        (error,) = errors
        assert error["type"] == "image_load_error"
        assert "truncated" in error["msg"]


# -- 4. the cost: each distinct image is decoded once ------------------------------------------------


def test_an_image_shared_by_a_thousand_jobs_is_decoded_once(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fresh_caches: None
) -> None:
    (workdir / "photo.jpg").write_bytes(_saved(_photo((1920, 1080)), "JPEG", quality=85))
    inline = _data_uri(_saved(_photo((96, 64)), "PNG"), "image/png")
    rows = "".join(f"  - {{prompt: p{i}, image_url: photo.jpg}}\n" for i in range(1000))
    rows += "".join(f"  - {{prompt: q{i}, image_url: '{inline}'}}\n" for i in range(100))
    path = workdir / "m.yaml"
    path.write_text(
        f"name: shared\nendpoint: fal-ai/wan-i2v\nbudget: {{max_usd: 1000}}\nitems:\n{rows}", encoding="utf-8"
    )
    loads: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def counted(self: ImageFile.ImageFile) -> object:
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    assert run_main(["validate", str(path)], monkeypatch) == 0, capsys.readouterr().err
    assert sorted(loads) == [(96, 64), (1920, 1080)]
    # The simulator checks each request's bytes: the same bytes are decoded once there too.
    data = (workdir / "photo.jpg").read_bytes()
    for _ in range(50):
        assert check_bytes(data, FieldType.IMAGE, I2V_IMAGE) == []
    assert sorted(loads) == [(96, 64), (1920, 1080)]


# -- 5. threads: the bomb guard rests on no warning filter, and no other thread's output is touched --


class _PausedRead(io.BytesIO):
    """Image bytes whose first read waits for ``resume``: the thread reading them is then inside
    the image check, and the test decides what other threads do meanwhile."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reading = threading.Event()
        self.resume = threading.Event()

    def read(self, size: int | None = -1, /) -> bytes:
        if not self.reading.is_set():
            self.reading.set()
            assert self.resume.wait(10)
        return super().read(size)


def _started(target: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def _joined(thread: threading.Thread) -> None:
    thread.join(10)
    assert not thread.is_alive()


class _CatchWarningsUser:
    """Another thread inside ``warnings.catch_warnings()`` until ``leave``, as the standard
    library's ``os.get_exec_path`` is (and ``subprocess``, which calls it, and botocore's
    imports): it saves the warning filters as it enters and puts them back as it leaves."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.leave = threading.Event()
        self.thread = _started(self._run)
        assert self.entered.wait(10)

    def _run(self) -> None:
        with warnings.catch_warnings():
            self.entered.set()
            self.leave.wait(10)

    def done(self) -> None:
        self.leave.set()
        _joined(self.thread)


def _64px_bomb(monkeypatch: pytest.MonkeyPatch) -> bytes:
    """A 64x64 PNG under a limit of 4,000 pixels: over the limit, under twice it (where Pillow's
    own check in ``Image.open`` only warns)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    return _saved(Image.new("RGB", (64, 64), "red"), "PNG")


def test_a_bomb_is_refused_undecoded_while_another_thread_leaves_catch_warnings(
    monkeypatch: pytest.MonkeyPatch, fresh_caches: None
) -> None:
    """The other thread's ``catch_warnings`` began before the check and ends while it reads the
    header: it puts back filters without the check's "error on DecompressionBombWarning"."""
    data = _64px_bomb(monkeypatch)
    loads: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def counted(self: ImageFile.ImageFile) -> object:
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    other = _CatchWarningsUser()
    fh = _PausedRead(data)
    found: list[media.MediaProblem] = []
    checker = _started(lambda: found.extend(media._check_image(fh, len(data), I2V_IMAGE)))
    assert fh.reading.wait(10)
    other.done()
    fh.resume.set()
    _joined(checker)
    (problem,) = found
    assert problem.severity == "error"
    assert problem.message == "refused as a decompression bomb: the image has 4,096 pixels"
    assert loads == []  # never decoded


def test_reading_an_image_leaves_other_threads_warnings_logs_and_the_filters_alone(
    caplog: pytest.LogCaptureFixture, fresh_caches: None
) -> None:
    """While one thread reads an image, another enters ``catch_warnings`` (saving the filters of
    that moment) and a third warns and logs through Pillow's logger: the third's warning and
    record are shown, and once everyone is done the filters are the ones from before."""
    caplog.set_level(logging.WARNING)
    data = _saved(Image.new("RGB", (64, 64), "red"), "PNG")

    def warn_and_log(when: str) -> None:
        warnings.warn(f"another thread's notice {when}", UserWarning, stacklevel=1)
        logging.getLogger("PIL.PngImagePlugin").warning("another thread's Pillow record %s", when)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        fh = _PausedRead(data)
        found: list[media.MediaProblem] = []
        checker = _started(lambda: found.extend(media._check_image(fh, len(data), I2V_IMAGE)))
        assert fh.reading.wait(10)
        other = _CatchWarningsUser()
        _joined(_started(lambda: warn_and_log("during")))
        fh.resume.set()
        _joined(checker)
        other.done()
        assert warnings.filters == before
        _joined(_started(lambda: warn_and_log("after")))
    assert found == []
    assert [str(w.message) for w in caught] == [
        "another thread's notice during",
        "another thread's notice after",
    ]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("PIL")] == [
        "another thread's Pillow record during",
        "another thread's Pillow record after",
    ]


def test_two_checking_threads_and_a_catch_warnings_user_let_no_bomb_through(
    monkeypatch: pytest.MonkeyPatch, fresh_caches: None
) -> None:
    """The review's scripts: two threads read headers (a bomb, a small image, in turn) while a
    third calls ``os.get_exec_path`` (a ``catch_warnings`` user) over and over. Every bomb is
    refused, and afterwards the filters are as they were and another thread's warning shows."""
    bomb = _64px_bomb(monkeypatch)
    small = _saved(Image.new("RGB", (32, 32), "red"), "PNG")
    stop = threading.Event()
    let_through: list[int] = []
    small_refused: list[int] = []

    def other() -> None:
        while not stop.is_set():
            os.get_exec_path()

    def validator() -> None:
        for _ in range(3000):
            try:
                media._read_header(io.BytesIO(bomb))
                let_through.append(1)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                pass
            try:
                media._read_header(io.BytesIO(small))
            except Exception:
                small_refused.append(1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        getter = _started(other)
        validators = [_started(validator) for _ in range(2)]
        for thread in validators:
            thread.join(120)
            assert not thread.is_alive()
        stop.set()
        _joined(getter)
        assert (len(let_through), len(small_refused)) == (0, 0)
        assert warnings.filters == before
        _joined(_started(lambda: warnings.warn("a library's notice", UserWarning, stacklevel=1)))
    assert "a library's notice" in [str(w.message) for w in caught]
