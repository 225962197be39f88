"""Real, tiny, deterministic MP4s standing in for Wan's output videos.

A clip has the geometry the real model would produce (resolution × aspect ratio, fps, frame
count) so wanbatch's probing and checks see true numbers, but its picture is a flat colour
with a moving bar, so H.264 encodes it in a fraction of a second.

Determinism: the bytes are a pure function of (endpoint, resolved input, seed), where a media
file the simulator can read (its own upload storage, a data URI) counts by its content, not by
its URL — as for the real model (see ``Engine._content_identity``). The picture
depends on a hash of those through one of ``variants`` colours, and the encoded stream is
cached per (geometry, colour) — a 200-job test encodes a handful of clips, not 200. Each
output then gets its own tag: a top-level ISO-BMFF ``uuid`` box appended after the movie
(players and demuxers skip unknown top-level boxes), holding the tag and seed. So two
different seeds never share bytes, and the same input + seed always yields the same sha256.
Encoding is single-threaded and writes no timestamps, so nothing else varies between runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, ClassVar, cast

import av
from av.video.stream import VideoStream

from jobs.endpoints import EndpointSpec

#: The fps of duration-based endpoints (Wan 2.5/2.6 produce 24 fps video).
DURATION_FPS = 24
_UUID = bytes.fromhex("7761 6e62 6174 6368 2d73 696d 2d76 3031".replace(" ", ""))  # "wanbatch-sim-v01"
_HEIGHTS = {"480p": 480, "580p": 580, "720p": 720, "1080p": 1080}
# (Y, U, V) colours, far enough apart to tell clips apart at a glance.
_PALETTE = [
    (81, 90, 240),
    (145, 54, 34),
    (41, 240, 110),
    (170, 166, 16),
    (106, 202, 222),
    (210, 16, 146),
    (60, 160, 160),
    (120, 100, 180),
    (200, 120, 60),
    (90, 200, 100),
    (150, 80, 80),
    (30, 140, 120),
]


@dataclass(frozen=True, slots=True)
class Geometry:
    """What a clip looks like from the outside."""

    width: int
    height: int
    fps: int
    num_frames: int

    @property
    def duration(self) -> float:
        """Seconds of video."""
        return self.num_frames / self.fps


def _even(value: float) -> int:
    return max(2, round(value / 2) * 2)


def geometry(spec: EndpointSpec, resolved: dict[str, Any], image_size: tuple[int, int] | None) -> Geometry:
    """The clip the model would make for ``resolved`` input.

    ``aspect_ratio`` "auto" (and endpoints without the field) follows the input image when its
    size is known, else 16:9.
    """
    height = _HEIGHTS.get(str(resolved.get("resolution") or "720p"), 720)
    ratio = str(resolved.get("aspect_ratio") or "auto")
    if ratio == "auto":
        if image_size and image_size[0] > 0 and image_size[1] > 0:
            w, h = image_size
            ratio = "1:1" if 0.8 <= w / h <= 1.25 else ("16:9" if w > h else "9:16")
        else:
            ratio = "16:9"
    long_side = _even(height * 16 / 9)
    width, height = {"16:9": (long_side, height), "9:16": (height, long_side), "1:1": (height, height)}[ratio]
    if "duration" in resolved:
        fps = DURATION_FPS
        frames = int(str(resolved.get("duration") or "5")) * fps
    else:
        fps = int(resolved.get("frames_per_second") or 16)
        frames = int(resolved.get("num_frames") or 81)
    return Geometry(width=width, height=height, fps=fps, num_frames=frames)


def bad_geometry(geo: Geometry, params: dict[str, Any]) -> Geometry:
    """``geo`` broken as the ``bad_render`` fault says: ``size: [w, h]`` and/or ``frames: n``
    (neither: half the width and height), so a wrong render can be tested end to end."""
    size, frames = params.get("size"), params.get("frames")
    width, height = (_even(int(size[0])), _even(int(size[1]))) if size else (geo.width, geo.height)
    if size is None and frames is None:
        width, height = _even(geo.width / 2), _even(geo.height / 2)
    return replace(geo, width=width, height=height, num_frames=max(1, int(frames or geo.num_frames)))


def output_tag(endpoint_id: str, resolved: dict[str, Any], seed: int) -> str:
    """The hex digest that identifies one (endpoint, input, seed) — and so one output file.

    ``resolved`` is the input as the model sees it: media files by content where known.
    """
    canon = json.dumps(
        {"endpoint": endpoint_id, "input": {**resolved, "seed": seed}},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canon.encode()).hexdigest()


def _encode(geo: Geometry, colour: tuple[int, int, int]) -> bytes:
    """An H.264 MP4 (mpeg4 when libx264 is missing): flat colour, a white bar sliding down."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = cast(VideoStream, container.add_stream(codec, rate=Fraction(geo.fps)))
        stream.width, stream.height, stream.pix_fmt = geo.width, geo.height, "yuv420p"
        stream.thread_count = 1
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "35", "threads": "1"}
        y, u, v = colour
        probe = av.VideoFrame(geo.width, geo.height, "yuv420p")
        y_stride, c_stride = probe.planes[0].line_size, probe.planes[1].line_size
        chroma_h = geo.height // 2
        bg_row, bar_row = bytes([y]) * y_stride, bytes([235]) * y_stride
        u_plane, v_plane = bytes([u]) * c_stride * chroma_h, bytes([v]) * c_stride * chroma_h
        bar = max(2, geo.height // 24)
        for i in range(geo.num_frames):
            top = (i * max(1, geo.height // 60)) % (geo.height - bar)
            frame = av.VideoFrame(geo.width, geo.height, "yuv420p")
            frame.planes[0].update(bg_row * top + bar_row * bar + bg_row * (geo.height - top - bar))
            frame.planes[1].update(u_plane)
            frame.planes[2].update(v_plane)
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _tag_box(tag: str, seed: int) -> bytes:
    payload = _UUID + json.dumps({"tag": tag, "seed": seed}, sort_keys=True).encode()
    return struct.pack(">I", 8 + len(payload)) + b"uuid" + payload


class VideoFactory:
    """Makes output clips. Encoded streams are cached per (geometry, colour) *per process*:
    they are deterministic, so every simulator in a test session shares them. Thread-safe.
    """

    _cache: ClassVar[OrderedDict[tuple[Geometry, int], bytes]] = OrderedDict()
    _cache_size: ClassVar[int] = 64
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _key_locks: ClassVar[dict[tuple[Geometry, int], threading.Lock]] = {}

    def __init__(self, variants: int = 8) -> None:
        self._variants = max(1, min(variants, len(_PALETTE)))
        #: Seconds spent in each real encode by this factory (a cache hit costs nothing).
        self.encode_seconds: list[float] = []

    def render(self, geo: Geometry, tag: str, seed: int) -> bytes:
        """The MP4 for one output: the cached stream for its look, plus its own tag box."""
        variant = int(tag[:8], 16) % self._variants
        key = (geo, variant)
        cls = type(self)
        with cls._lock:
            key_lock = cls._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # concurrent jobs with the same look encode it once
            with cls._lock:
                body = cls._cache.get(key)
                if body is not None:
                    cls._cache.move_to_end(key)
            if body is None:
                started = time.perf_counter()
                body = _encode(geo, _PALETTE[variant])
                with cls._lock:
                    self.encode_seconds.append(time.perf_counter() - started)
                    cls._cache[key] = body
                    while len(cls._cache) > cls._cache_size:
                        cls._cache.popitem(last=False)
        return body + _tag_box(tag, seed)
