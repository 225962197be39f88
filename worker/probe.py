"""Probe a downloaded video and check it against what was requested (issue #13).

A clip counts only when it is what was paid for. :func:`probe` reads the container and stream
headers (plus one decoded frame, to prove the stream decodes: a file that only *looks* like an
MP4 is never ``succeeded``); :func:`expected_media` turns an endpoint and its input into an
:class:`Expectation`; :func:`compare` says in words what differs, or None.

Tolerances — loose enough that a correct render is never flagged, tight enough to catch the
wrong resolution, orientation or length:

* **Size**: real renders are not exact 16:9 boxes (Wan's own size tables give 832×480 for 480p,
  1280×720 for 720p), so the *short side* is compared with the resolution's nominal height,
  within :data:`SIZE_TOLERANCE`. A fixed ``aspect_ratio`` (``16:9``, ``9:16``, ``1:1``) must hold
  within :data:`ASPECT_TOLERANCE` (832/480 is 2.5 % off 16:9). With ``aspect_ratio: auto`` (and
  image-to-video endpoints without the field: Wan 2.5/2.6) the model follows the input image
  within a pixel budget, so the aspect is not checked and the size passes when either the short
  side is within tolerance or the pixel count is within :data:`AREA_TOLERANCE` of the nominal
  16:9 budget (height × height·16/9).
* **Frames** (``num_frames`` endpoints): within :data:`FRAME_TOLERANCE` frames — Wan's VAE
  works in groups of 4 frames, so a count not of the form 4k+1 may be rounded. The fps
  (``frames_per_second``) within :data:`FPS_TOLERANCE`.
* **Duration** (``duration`` endpoints): within :data:`DURATION_TOLERANCE` seconds (121 frames
  at 24 fps is 5.04 s for "5").
"""

from __future__ import annotations

import errno
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av

from jobs import avcompat
from jobs.endpoints import EndpointSpec, get_endpoint
from jobs.errors import WanbatchError
from jobs.open_files import local_resource_errno, os_errno
from jobs.outputs import OutputWriteError
from worker.mp4 import file_truncation

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

#: Relative difference allowed between the short side and the nominal height.
SIZE_TOLERANCE = 0.10
#: Relative difference allowed between the width/height ratio and a fixed aspect ratio.
ASPECT_TOLERANCE = 0.05
#: With ``aspect_ratio: auto``: relative range of the pixel count around the nominal 16:9 budget.
AREA_TOLERANCE = (0.5, 1.15)
#: Frames a ``num_frames`` render may differ by.
FRAME_TOLERANCE = 4
#: Frames per second a render may differ by.
FPS_TOLERANCE = 0.5
#: Seconds a ``duration`` render may differ by.
DURATION_TOLERANCE = 0.5

_FIXED_RATIOS = {"16:9": 16 / 9, "9:16": 9 / 16, "1:1": 1.0, "4:3": 4 / 3, "3:4": 3 / 4}


class NotAVideoError(WanbatchError):
    """The file is not a decodable video (no video stream, unreadable headers, no frame)."""


class LocalProbeError(OutputWriteError):
    """The probe could not read the file for a reason of this machine's, not the file's: it ran
    short of a resource (file descriptors, memory: :func:`jobs.open_files.local_resource_errno`),
    or its disk could not be read (:data:`LOCAL_READ_ERRNOS`: an I/O error, a permission taken
    away, a network file system gone). The download step keeps the video and tries it again, as
    it does an output it cannot write (never ``not_a_video``, which deletes a paid video)."""


#: What reading a file of this machine's own disk fails with when the disk, its mount or the
#: file's permissions are at fault, whatever the file holds: an I/O error (``EIO``), a
#: permission (``EACCES``/``EPERM``), a device or a network file system gone (``ENXIO``,
#: ``ENODEV``, ``ESTALE``, ``ENOTCONN``); POSIX's meanings
#: (https://man7.org/linux/man-pages/man3/errno.3.html).
LOCAL_READ_ERRNOS = frozenset(
    {errno.EIO, errno.EACCES, errno.EPERM, errno.ENXIO, errno.ENODEV, errno.ESTALE, errno.ENOTCONN}
)


def _cannot_check(path: Path | str, exc: BaseException, *, own_read: bool) -> LocalProbeError | None:
    """The :class:`LocalProbeError` for ``exc`` when it is this machine's doing; else None.

    A local resource error always is. So is a :data:`LOCAL_READ_ERRNOS` error of ``own_read``
    (our own read of the file); FFmpeg's, only when reading the file plainly fails too
    (:func:`_unreadable`): FFmpeg may report what it made of a damaged file with an errno as well,
    and a damaged file taken for the disk's fault would be checked again for ever."""
    if local_resource_errno(exc) is None:
        if os_errno(exc) not in LOCAL_READ_ERRNOS:
            return None
        if not own_read:
            plain = _unreadable(path)
            if plain is None:  # the file reads: what FFmpeg said is about what it holds
                return None
            exc = plain
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    failed = LocalProbeError(f"the saved video {Path(path).name} could not be checked ({why})")
    failed.__cause__ = exc  # its errno tells the fix (jobs.open_files.out_of_files, download._write_fix)
    return failed


def _unreadable(path: Path | str) -> OSError | None:
    """What reading the whole file plainly fails with; None when it reads to its end."""
    try:
        with Path(path).open("rb", buffering=0) as file:
            while file.read(1 << 20):
                pass
    except OSError as exc:
        return exc
    return None


@dataclass(frozen=True, slots=True)
class MediaInfo:
    """What the downloaded file is, from its headers."""

    width: int
    height: int
    #: Frames in the stream (None when the container does not say).
    frames: int | None
    fps: float | None
    duration_s: float | None
    codec: str

    def as_json(self) -> dict[str, Any]:
        """The ``media`` column and export field: ``dataclasses.asdict`` of it, written out
        (asdict deep-copies field by field, about a hundred Python calls for six plain values,
        once per downloaded job)."""
        return {
            "width": self.width,
            "height": self.height,
            "frames": self.frames,
            "fps": self.fps,
            "duration_s": self.duration_s,
            "codec": self.codec,
        }


@dataclass(frozen=True, slots=True)
class Expectation:
    """What the request asked for; None means "not checked"."""

    #: Nominal height of the resolution (480 for 480p): the expected short side.
    height: int | None
    #: Width / height of a fixed aspect ratio; None for ``auto`` (follows the input image).
    aspect: float | None
    frames: int | None
    fps: float | None
    duration_s: float | None
    #: Human label of the resolution and ratio, for messages ("720p 16:9").
    label: str = ""


#: The one demuxer a downloaded output is read with: FFmpeg's MP4 (``mov``) reader. fal's Wan
#: endpoints return ``video/mp4``; left to guess, FFmpeg picks a demuxer from the file's bytes,
#: and a provider's "video" that is an HLS playlist or a concat script had it open and read
#: other files of this machine (or wait on a device such as ``/dev/zero``).
_CONTAINER = "mp4"
#: The decoders that may read the video stream: the video codecs an MP4 of a video model holds.
#: The probe opens the one decoder it decodes with itself, after checking its name here.
_VIDEO_DECODERS = frozenset({"h264", "hevc", "mpeg4", "av1", "libdav1d", "vp9", "libvpx-vp9"})
#: The same list as FFmpeg's own ``codec_whitelist`` of the probe's decoder: ``avcodec_open2``
#: refuses to open a decoder not on it (https://ffmpeg.org/ffmpeg-codecs.html#Codec-Options), so
#: the list binds the one decoder that reads the file's bytes in FFmpeg too, not only in the
#: name check before it.
_DECODER_WHITELIST = ",".join(sorted(_VIDEO_DECODERS))
#: ``av.open``'s options. Every ``av.open`` runs FFmpeg's ``avformat_find_stream_info``, which
#: opens a decoder per stream and decodes packets until it knows each stream's pixel format and
#: B-frame delay: on a Wan-like 832×480 H.264 output it decoded the key frame in full, that the
#: probe then decodes again with its own decoder (PyAV's ``stream.codec_context`` is a separate
#: one). Nothing it learns is used: the size is the decoded frame's, the frame count, rate and
#: duration are the ``moov``'s. So it is given no decoder at all: an empty ``codec_whitelist``
#: (FFmpeg refuses to open any decoder not on the list; the pass logs it and goes on), and
#: ``probesize`` at its minimum (32 bytes) so that, left without the parameters a decoder would
#: give, it stops after one packet instead of reading 5 s of them. The file's bytes then reach
#: one decoder only: the video decoder the probe opens, one of :data:`_VIDEO_DECODERS` (the audio
#: decoders of Wan 2.5/2.6 outputs no longer run on them at all). That decoder's buffers (a
#: frame pool of ~0.6 MB at 480p, 3 MB at 1080p) are then the largest a probe allocates: what
#: keeps glibc from handing them back to the kernel at every close (and faulting them in again
#: at the next probe) is :func:`cli.startup.steady_malloc_thresholds`.
_OPEN_OPTIONS = {"codec_whitelist": "", "probesize": "32"}


def probe(path: Path | str, *, walked: bool = False) -> MediaInfo:
    """Width, height, frame count, fps, duration and codec of the video at ``path``.

    Headers only (``stream.frames``, ``average_rate``, ``duration × time_base``, falling back to
    the container's duration), plus the first frame decoded, by FFmpeg's MP4 reader and a video
    codec's decoder alone (:data:`_CONTAINER`, :data:`_VIDEO_DECODERS`). :class:`NotAVideoError`
    when the file has no decodable video stream, or is cut short: its top-level boxes are
    walked first (:func:`worker.mp4.truncation`, a few header reads), since FFmpeg takes the
    frame count of a faststart MP4 from its ``moov`` and decodes its first frame however little
    of the rest arrived. A fresh download was refused as truncated already (and downloaded
    again: ``worker.fal.storage``); this catches a file that came another way (one an earlier
    try left, a staged one a rerun takes). ``walked``: the caller has just walked this very
    file's boxes (a fresh download: ``DownloadResult.whole``), so they are not read again.
    :class:`LocalProbeError` (no verdict on the file) when this machine could not read it: it
    ran short of file descriptors or memory, or its disk failed the read.
    """
    if not walked:
        try:
            cut = file_truncation(path)
        except OSError as exc:
            if (local := _cannot_check(path, exc, own_read=True)) is not None:
                raise local from exc
            raise NotAVideoError(f"{Path(path).name}: cannot be read ({exc.strerror or exc})") from exc
        if cut is not None:
            raise NotAVideoError(f"{Path(path).name}: the MP4 is {cut}")
    try:
        with av.open(
            str(path),
            format=_CONTAINER,
            options=_OPEN_OPTIONS,
            # Its tags are never read: a title that is not UTF-8 must not fail the probe.
            **avcompat.tolerant_metadata(),
        ) as container:
            if not container.streams.video:
                raise NotAVideoError(f"{Path(path).name}: no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            if ctx.name not in _VIDEO_DECODERS:
                raise NotAVideoError(f"{Path(path).name}: a {ctx.name} stream, not a video fal renders")
            # One frame is decoded: a decoder thread pool (FFmpeg's default, one per core) would
            # cost more to start than the frame itself.
            ctx.thread_count = 1
            ctx.options = {"codec_whitelist": _DECODER_WHITELIST}
            codec = str(ctx.name or "")
            frames = int(stream.frames) if stream.frames else None
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else None
            duration: float | None = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * Fraction(stream.time_base))
            elif container.duration is not None:
                duration = container.duration / av.time_base
            first = _first_frame(container, stream)
            if first is None:
                raise NotAVideoError(f"{Path(path).name}: the video stream has no decodable frame")
            # The decoded picture's size (the bitstream's, cropped), not the ``moov``'s claim.
            width, height = int(first.width), int(first.height)
    except NotAVideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, StopIteration) as exc:
        if (local := _cannot_check(path, exc, own_read=False)) is not None:
            raise local from exc
        raise NotAVideoError(f"{Path(path).name}: not a decodable video ({exc})") from exc
    return MediaInfo(
        width=width,
        height=height,
        frames=frames,
        fps=round(fps, 3) if fps is not None else None,
        duration_s=round(duration, 3) if duration is not None else None,
        codec=codec,
    )


def _first_frame(container: InputContainer, stream: VideoStream) -> VideoFrame | None:
    """The first frame of ``stream``, decoded from as few packets as it takes.

    A decoder holds frames back as deep as the stream's B-frame reordering (x264's default: 2
    frames), so decoding "until a frame comes out" also decoded the next two packets, a P frame
    often larger than the key frame among them: half the probe's CPU on a Wan-like output, for
    frames never looked at. Once a key frame has gone in, the decoder is drained instead
    (``decode(None)``, FFmpeg's end of stream), which hands out what it holds: the same first
    frame. Should that give nothing, the decoder is reset (``flush_buffers``) and decoding goes on
    with the next packet, as before; the stream's end drains it too (PyAV's empty last packet).
    """
    ctx = stream.codec_context
    for packet in container.demux(stream):
        decoded = ctx.decode(packet)
        if not decoded and packet.is_keyframe and packet.size:
            decoded = ctx.decode(None)
            if not decoded:
                ctx.flush_buffers()
        if decoded:
            return decoded[0]
    return None


def _value(spec: EndpointSpec, data: dict[str, Any], name: str) -> Any:
    """The input's value of ``name``, else the endpoint's default, else None."""
    if data.get(name) is not None:
        return data[name]
    fld = next((f for f in spec.fields if f.name == name), None)
    return fld.default if fld is not None else None


def _has(spec: EndpointSpec, name: str) -> bool:
    return any(f.name == name for f in spec.fields)


def expected_media(endpoint: EndpointSpec | str, submitted_input: dict[str, Any]) -> Expectation:
    """What a correct render of ``submitted_input`` on ``endpoint`` looks like (defaults applied)."""
    spec = get_endpoint(endpoint) if isinstance(endpoint, str) else endpoint
    resolution = _value(spec, submitted_input, "resolution")
    match = re.fullmatch(r"(\d+)p", str(resolution or ""))
    height = int(match.group(1)) if match else None
    ratio = str(_value(spec, submitted_input, "aspect_ratio") or "auto")
    aspect = _FIXED_RATIOS.get(ratio)
    frames = fps = duration = None
    if _has(spec, "duration"):
        raw = _value(spec, submitted_input, "duration")
        with_duration = re.fullmatch(r"\d+(\.\d+)?", str(raw or "").strip().rstrip("s"))
        duration = float(with_duration.group(0)) if with_duration else None
    if _has(spec, "num_frames"):
        raw_frames = _value(spec, submitted_input, "num_frames")
        frames = int(raw_frames) if raw_frames is not None else None
    if _has(spec, "frames_per_second"):
        raw_fps = _value(spec, submitted_input, "frames_per_second")
        fps = float(raw_fps) if raw_fps is not None else None
    label = " ".join(x for x in (str(resolution or ""), ratio) if x)
    return Expectation(height=height, aspect=aspect, frames=frames, fps=fps, duration_s=duration, label=label)


def _size_problem(info: MediaInfo, exp: Expectation) -> str | None:
    size = f"{info.width}x{info.height}"
    if exp.height is not None:
        short = min(info.width, info.height)
        short_ok = abs(short - exp.height) <= exp.height * SIZE_TOLERANCE
        if exp.aspect is None:
            budget = exp.height * exp.height * 16 / 9
            low, high = AREA_TOLERANCE
            if not short_ok and not low <= info.width * info.height / budget <= high:
                return f"size {size} does not fit {exp.label} (short side {short}, expected ~{exp.height})"
        elif not short_ok:
            return f"size {size}: short side {short}, expected {exp.height} ({exp.label})"
    if exp.aspect is not None and info.height > 0:
        actual = info.width / info.height
        if abs(actual - exp.aspect) > exp.aspect * ASPECT_TOLERANCE:
            return f"size {size}: aspect {actual:.3f}, expected {exp.aspect:.3f} ({exp.label})"
    return None


def compare(info: MediaInfo, expectation: Expectation) -> str | None:
    """What differs between the probed video and the request, in words; None when it matches."""
    problems: list[str] = []
    size = _size_problem(info, expectation)
    if size:
        problems.append(size)
    frames, fps = expectation.frames, expectation.fps
    if frames is not None and info.frames is not None and abs(info.frames - frames) > FRAME_TOLERANCE:
        problems.append(f"{info.frames} frames, expected {expectation.frames}")
    if fps is not None and info.fps is not None and abs(info.fps - fps) > FPS_TOLERANCE:
        problems.append(f"{info.fps:g} fps, expected {expectation.fps:g}")
    if expectation.duration_s is not None:
        actual = info.duration_s
        if actual is None and info.frames and info.fps:
            actual = info.frames / info.fps
        if actual is None or not math.isfinite(actual):
            problems.append(f"duration unknown, expected {expectation.duration_s:g} s")
        elif abs(actual - expectation.duration_s) > DURATION_TOLERANCE:
            problems.append(f"{actual:.2f} s long, expected {expectation.duration_s:g} s")
    return "; ".join(problems) or None
