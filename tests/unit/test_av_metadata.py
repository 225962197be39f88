"""A file whose metadata is not UTF-8 is probed like any other, on whichever PyAV is installed.

PyAV up to 18 decodes a container's tags strictly unless ``av.open`` is given
``metadata_errors="ignore"``; PyAV 19 dropped that keyword (and ``metadata_encoding``) and always
decodes tags as UTF-8 with ``surrogateescape``, so passing it is a ``TypeError``. Both
:func:`worker.probe.probe` and :func:`jobs.media.read_audio_header` open files with
:func:`jobs.avcompat.tolerant_metadata`'s keywords, decided once from the installed PyAV.
"""

from __future__ import annotations

import io
import struct
import wave
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from jobs import avcompat
from jobs.media import read_audio_header
from worker.probe import probe

_MARK = "WANBATCH-TITLE-MARK"
#: Not UTF-8: a lone 0xff, a BOM-like 0xfe, and a lead byte (0xc3) followed by an ASCII byte.
_NOT_UTF8 = b"\xff\xfe\xc3("


def _av_major() -> int:
    return int(av.__version__.split(".")[0])


def mp4_with_non_utf8_title() -> bytes:
    """A 4-frame 64×64 MPEG-4 video whose ``title`` tag holds bytes that are not UTF-8.

    Muxed with an ASCII title that is then overwritten in place with as many bytes (no box
    changes size, so the file stays a well-formed MP4)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        out.metadata["title"] = _MARK
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(4):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    data = buf.getvalue()
    assert data.count(_MARK.encode()) == 1
    return data.replace(_MARK.encode(), _NOT_UTF8 + b"x" * (len(_MARK) - len(_NOT_UTF8)))


def wav_with_non_utf8_title(seconds: int = 4, rate: int = 8000) -> bytes:
    """A PCM WAV with a ``LIST/INFO`` chunk whose ``INAM`` (title) is not UTF-8."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\0\0" * rate * seconds)
    data = buf.getvalue()
    title = _NOT_UTF8 + b"bad\0"
    inam = b"INAM" + struct.pack("<I", len(title)) + title
    info = b"LIST" + struct.pack("<I", 4 + len(inam)) + b"INFO" + inam
    return data[:4] + struct.pack("<I", len(data) - 8 + len(info)) + data[8:] + info


def test_the_fixtures_carry_tags_a_strict_decoding_refuses() -> None:
    for data, fmt in ((mp4_with_non_utf8_title(), "mp4"), (wav_with_non_utf8_title(), "wav")):
        assert _NOT_UTF8 in data
        if _av_major() < 19:  # strict by default: the open itself fails on the tag
            with pytest.raises(UnicodeDecodeError):
                av.open(io.BytesIO(data), format=fmt)
        else:  # decoded with surrogateescape: the tag's bytes come back as they were
            with av.open(io.BytesIO(data), format=fmt) as container:
                title = container.metadata["title"]
            assert title.encode("utf-8", "surrogateescape").startswith(_NOT_UTF8)


def test_a_video_with_non_utf8_metadata_is_probed(tmp_path: Path) -> None:
    path = tmp_path / "tagged.mp4"
    path.write_bytes(mp4_with_non_utf8_title())
    info = probe(path)
    assert (info.width, info.height, info.frames, info.codec) == (64, 64, 4, "mpeg4")


def test_an_audio_file_with_non_utf8_metadata_is_read() -> None:
    header = read_audio_header(io.BytesIO(wav_with_non_utf8_title(seconds=4)))
    assert header.format == "wav"
    assert header.duration_s == pytest.approx(4.0)


def test_the_installed_pyav_gets_the_keywords_it_takes() -> None:
    # Up to 18: metadata_errors="ignore" (else a non-UTF-8 tag fails the open); from 19: none
    # (the keyword is gone: tags are decoded with surrogateescape and never fail).
    expected = {"metadata_errors": "ignore"} if _av_major() < 19 else {}
    assert avcompat.tolerant_metadata() == expected


class _Pyav18Container:
    metadata_encoding = "utf-8"
    metadata_errors = "strict"


class _Pyav19Container:
    pass


@pytest.mark.parametrize(
    ("container_class", "expected"),
    [(_Pyav18Container, {"metadata_errors": "ignore"}), (_Pyav19Container, {})],
    ids=["pyav-14-to-18", "pyav-19"],
)
def test_the_keywords_follow_what_the_container_class_has(
    container_class: type, expected: dict[str, Any]
) -> None:
    assert avcompat.tolerant_metadata_for(container_class) == expected


def test_both_openers_pass_the_decided_keywords(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Whatever is decided reaches both calls of av.open (plus a marker the spy takes out again).
    seen: list[dict[str, Any]] = []
    real_open = av.open

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(dict(kwargs))
        kwargs.pop("wanbatch_marker", None)
        return real_open(*args, **kwargs)

    path = tmp_path / "tagged.mp4"
    path.write_bytes(mp4_with_non_utf8_title())
    wav = wav_with_non_utf8_title()
    decided = {**avcompat.tolerant_metadata(), "wanbatch_marker": "yes"}
    monkeypatch.setattr(avcompat, "tolerant_metadata", lambda: decided)
    monkeypatch.setattr(av, "open", spy)
    probe(path)
    read_audio_header(io.BytesIO(wav))
    assert [{k: kw.get(k) for k in decided} for kw in seen] == [decided, decided]
