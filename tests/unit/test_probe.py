"""worker.probe on real simulator clips: a correct render is never flagged, a broken one always.

The clips are the simulator's own (``falsim.media``: the geometry it gives each endpoint's input,
encoded for real), for every endpoint, resolution and aspect ratio it renders (image-to-video
``auto`` with square, landscape and portrait images, and without a known image), and every
length option (``num_frames`` at its range's ends, each ``duration``) at the endpoint's lowest
resolution (lengths at every resolution would only repeat the encode for minutes).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from falsim import media
from jobs.endpoints import EndpointSpec, all_endpoints
from worker import probe

#: Input image sizes for ``aspect_ratio: auto`` (None: the simulator does not know the image).
IMAGES: tuple[tuple[int, int] | None, ...] = ((512, 512), (1200, 800), (600, 1000), None)


def _field(spec: EndpointSpec, name: str) -> Any:
    return next((f for f in spec.fields if f.name == name), None)


def cases(spec: EndpointSpec) -> Iterator[tuple[dict[str, Any], tuple[int, int] | None]]:
    """(input, image size) pairs covering the endpoint's renders."""
    resolutions = list(_field(spec, "resolution").enum)
    ratio = _field(spec, "aspect_ratio")
    ratios: list[str | None] = list(ratio.enum) if ratio is not None else [None]
    image = spec.kind != "text-to-video"
    for resolution in resolutions:
        for ar in ratios:
            images = IMAGES if image and ar in (None, "auto") else (None,)
            for size in images:
                data: dict[str, Any] = {"resolution": resolution}
                if ar is not None:
                    data["aspect_ratio"] = ar
                yield data, size
    lowest = {"resolution": resolutions[0]}
    frames = _field(spec, "num_frames")
    if frames is not None:
        for n in {frames.minimum, frames.maximum}:
            yield {**lowest, "num_frames": int(n)}, None
        fps = _field(spec, "frames_per_second")
        yield {**lowest, "frames_per_second": int(fps.maximum)}, None
    duration = _field(spec, "duration")
    if duration is not None:
        for d in duration.enum:
            yield {**lowest, "duration": d}, None


def resolved(spec: EndpointSpec, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the endpoint's defaults, as the simulator resolves it."""
    out = {f.name: f.default for f in spec.fields if f.default is not None}
    return {**out, **data}


def clip(tmp_path: Path, geo: media.Geometry) -> Path:
    path = tmp_path / f"{geo.width}x{geo.height}-{geo.fps}-{geo.num_frames}.mp4"
    if not path.exists():
        path.write_bytes(media.VideoFactory().render(geo, "0" * 64, 7))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("spec", all_endpoints(), ids=lambda s: s.id)
def test_every_correct_simulator_render_passes(spec: EndpointSpec, tmp_path: Path) -> None:
    checked = 0
    for data, image in cases(spec):
        full = resolved(spec, data)
        geo = media.geometry(spec, full, image)
        info = probe.probe(clip(tmp_path, geo))
        assert (info.width, info.height, info.frames) == (geo.width, geo.height, geo.num_frames)
        assert info.fps == geo.fps
        assert info.duration_s == pytest.approx(geo.duration, abs=0.1)
        # what the job stores: the input as sent (defaults not filled in) — probe applies them
        assert probe.compare(info, probe.expected_media(spec, data)) is None, (data, image, info)
        checked += 1
    assert checked >= 6


def test_wans_own_sizes_are_not_flagged() -> None:
    """Wan's size tables (832×480, 1280×720, 1920×1080) and rounding of frame counts pass."""
    t2v = probe.expected_media("fal-ai/wan-22", {"resolution": "480p", "num_frames": 100})
    assert probe.compare(probe.MediaInfo(832, 480, 97, 16.0, 6.06, "h264"), t2v) is None
    tall = probe.expected_media("fal-ai/wan-22", {"resolution": "720p", "aspect_ratio": "9:16"})
    assert probe.compare(probe.MediaInfo(720, 1280, 81, 16.0, 5.06, "h264"), tall) is None
    i2v = probe.expected_media("fal-ai/wan-25-preview/image-to-video", {"duration": "5"})
    assert probe.compare(probe.MediaInfo(1920, 1080, 121, 24.0, 5.04, "h264"), i2v) is None
    auto = probe.expected_media("fal-ai/wan-i2v", {"resolution": "720p", "aspect_ratio": "auto"})
    assert probe.compare(probe.MediaInfo(960, 960, 81, 16.0, 5.06, "h264"), auto) is None  # pixel budget


@pytest.mark.parametrize(
    ("endpoint", "data", "info", "words"),
    [
        ("fal-ai/wan-22", {"resolution": "720p"}, (854, 480, 81, 16.0, 5.06), "short side 480, expected 720"),
        ("fal-ai/wan-22", {"aspect_ratio": "9:16"}, (1280, 720, 81, 16.0, 5.06), "aspect"),
        ("fal-ai/wan-22", {}, (1280, 720, 41, 16.0, 2.56), "41 frames, expected 81"),
        ("fal-ai/wan-i2v", {"frames_per_second": 24}, (1280, 720, 81, 16.0, 5.06), "16 fps, expected 24"),
        ("wan/v2.6/image-to-video", {"duration": "10"}, (1920, 1080, 120, 24.0, 5.0), "expected 10 s"),
        ("wan/v2.6/image-to-video", {"resolution": "1080p"}, (640, 360, 120, 24.0, 5.0), "does not fit"),
    ],
)
def test_wrong_renders_are_flagged(
    endpoint: str, data: dict[str, Any], info: tuple[int, int, int, float, float], words: str
) -> None:
    mismatch = probe.compare(probe.MediaInfo(*info, codec="h264"), probe.expected_media(endpoint, data))
    assert mismatch is not None
    assert words in mismatch


def test_a_bad_render_of_the_simulator_is_flagged(tmp_path: Path) -> None:
    spec = next(s for s in all_endpoints() if s.id == "fal-ai/wan-22")
    data = {"resolution": "480p"}
    good = media.geometry(spec, resolved(spec, data), None)
    for params, words in (({"size": [320, 240]}, "short side 240"), ({"frames": 33}, "33 frames")):
        info = probe.probe(clip(tmp_path, media.bad_geometry(good, params)))
        mismatch = probe.compare(info, probe.expected_media(spec, data))
        assert mismatch is not None
        assert words in mismatch


@pytest.mark.parametrize(
    "body",
    [b"", b"not a video at all" * 100, b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 500],
    ids=["empty", "text", "ftyp-only"],
)
def test_a_file_that_is_not_a_video_raises(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "out.mp4"
    path.write_bytes(body)
    with pytest.raises(probe.NotAVideoError):
        probe.probe(path)


def test_a_script_posing_as_the_video_is_not_one(tmp_path: Path) -> None:
    """FFmpeg chose the demuxer from the file's bytes: a concat script sent as the output, naming
    a video beside it (another job's, in the batch's folder), had the probe report *that* video,
    and the text was stored as a succeeded job's. Only the MP4 reader reads an output now."""
    spec = next(s for s in all_endpoints() if s.id == "fal-ai/wan-22")
    real = clip(tmp_path, media.geometry(spec, resolved(spec, {"resolution": "480p"}), None))
    assert probe.probe(real).width  # the video the script names is one
    script = tmp_path / "000001-0123456789ab.mp4"
    script.write_text(f"ffconcat version 1.0\nfile '{real.name}'\n")
    playlist = tmp_path / "000002-0123456789ab.mp4"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:5.0,\n{real.name}\n#EXT-X-ENDLIST\n")
    for posing in (script, playlist):
        with pytest.raises(probe.NotAVideoError):
            probe.probe(posing)
