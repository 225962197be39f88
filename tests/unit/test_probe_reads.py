"""What :func:`worker.probe.probe` makes FFmpeg do to verify one output (issue #11, CPU per job).

Every ``av.open`` runs ``avformat_find_stream_info``, which opened a decoder per stream and
decoded the video's key frame; the probe then decoded that frame again with its own decoder, and
with a B-frame stream (x264's default, as Wan's outputs) fed it the two packets after it too,
since the decoder holds frames back for reordering. Counted here, not timed: which streams had a
decoder run on them while the file was opened (a decoder sets the stream's pixel or sample
format; the ``moov`` does not), and how many packets the probe took from the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from worker import probe

WIDTH, HEIGHT, FPS, FRAMES = 320, 192, 16, 17


def wan_like_clip(path: Path) -> Path:
    """A small H.264 MP4 made like a Wan 2.5 render: x264's default preset (B-frames, 2 held
    back for reordering), moving content, and an AAC sound track."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=Fraction(FPS))
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.options = {"threads": "1"}
        audio = out.add_stream("aac", rate=16000)
        for i in range(FRAMES):
            shade = 128 + 100 * np.sin(x / 17 + i / 3) * np.cos(y / 11 - i / 5)
            rgb = np.repeat(shade[..., None], 3, axis=2).astype(np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        tone = np.sin(np.arange(16000 * FRAMES // FPS) / 8).astype(np.float32)[None, :]
        for start in range(0, tone.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(tone[:, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in audio.encode(frame):
                out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)
    return path


class Recording:
    """PyAV's input container, recording what the probe reads through it."""

    def __init__(self, container: Any) -> None:
        self._container = container
        self.packets = 0
        #: Per stream type, the format each stream's codec context had once the file was open.
        self.formats_at_open = {
            "video": [s.codec_context.pix_fmt for s in container.streams.video],
            "audio": [s.codec_context.format for s in container.streams.audio],
        }

    def __enter__(self) -> Recording:
        self._container.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._container.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._container, name)

    def demux(self, *streams: Any) -> Iterator[Any]:
        for packet in self._container.demux(*streams):
            self.packets += packet.size > 0
            yield packet

    def decode(self, *streams: Any) -> Iterator[Any]:
        """PyAV's own ``decode``, over the recorded ``demux``."""
        for packet in self.demux(*streams):
            yield from packet.decode()


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[Recording]:
    """Every container ``av.open`` opens for reading, recorded."""
    opened: list[Recording] = []
    real_open = av.open

    def recording_open(*args: Any, **kwargs: Any) -> Any:
        if "w" in (*args[1:2], kwargs.get("mode")):  # the test's own clip being written
            return real_open(*args, **kwargs)
        opened.append(Recording(real_open(*args, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(av, "open", recording_open)
    return opened


needs_x264 = pytest.mark.skipif("libx264" not in av.codecs_available, reason="PyAV without libx264")


@needs_x264
def test_the_clip_holds_frames_back(tmp_path: Path) -> None:
    """The clip is what the other tests need: its decoder gives no frame before the third packet."""
    with av.open(str(wan_like_clip(tmp_path / "clip.mp4"))) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        sent = 0
        for packet in container.demux(stream):
            sent += 1
            if stream.codec_context.decode(packet):
                break
    assert sent == 3


@needs_x264
def test_no_decoder_runs_while_the_output_is_opened(tmp_path: Path, recorded: list[Recording]) -> None:
    """The stream-info pass decoded the key frame (and opened the AAC decoder) for nothing the
    probe reads: the only decoder that reads an output is the probe's own video decoder."""
    info = probe.probe(wan_like_clip(tmp_path / "clip.mp4"))
    assert (info.width, info.height, info.frames, info.fps) == (WIDTH, HEIGHT, FRAMES, FPS)
    assert [r.formats_at_open for r in recorded] == [{"video": [None], "audio": [None]}]


@needs_x264
def test_the_first_frame_is_decoded_from_the_key_frame_alone(
    tmp_path: Path, recorded: list[Recording]
) -> None:
    """Not the two packets after it that the decoder would wait for: it is drained instead."""
    probe.probe(wan_like_clip(tmp_path / "clip.mp4"))
    assert [r.packets for r in recorded] == [1]


def mjpeg_clip(path: Path) -> Path:
    """An MP4 whose video stream is Motion JPEG: a codec no video model's output holds."""
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("mjpeg", rate=Fraction(FPS))
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuvj420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8), format="rgb24")
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
    return path


def test_a_video_of_another_codec_reaches_no_decoder(tmp_path: Path, recorded: list[Recording]) -> None:
    """With no decoder at open, the probe's own decoder is the only one: one not on the list
    never gets a packet."""
    with pytest.raises(probe.NotAVideoError, match="mjpeg"):
        probe.probe(mjpeg_clip(tmp_path / "clip.mp4"))
    assert [(r.packets, r.formats_at_open) for r in recorded] == [(0, {"video": [None], "audio": []})]


def test_ffmpeg_itself_refuses_the_probe_a_decoder_off_the_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The list binds the decoder in FFmpeg too (its ``codec_whitelist``, given to the decoder
    the probe opens), not only in the name check: with the check passing MJPEG, FFmpeg still
    refuses to open its decoder."""
    monkeypatch.setattr(probe, "_VIDEO_DECODERS", probe._VIDEO_DECODERS | {"mjpeg"})
    with pytest.raises(probe.NotAVideoError, match="not a decodable video"):
        probe.probe(mjpeg_clip(tmp_path / "clip.mp4"))
