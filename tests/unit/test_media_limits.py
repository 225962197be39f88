"""Media limits as fal's docs give them: assumed limits only warn, audio is probed for container
and duration, and the simulator enforces what fal publishes — never wanbatch's own limits."""

from __future__ import annotations

import base64
import io
import random
import struct
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from falsim.validation import validate_input as sim_validate
from jobs.endpoints import EndpointSpec, FieldType, MediaConstraints, all_endpoints, get_endpoint
from jobs.media import check_bytes, check_file, media_type
from jobs.validation import check_value
from tests.in_process import run_main

I2V = get_endpoint("fal-ai/wan-i2v")
W25 = get_endpoint("fal-ai/wan-25-preview/image-to-video")
W26 = get_endpoint("wan/v2.6/image-to-video")
_I2V_IMAGE = I2V.fields_by_name["image_url"].media
_W25_AUDIO = W25.fields_by_name["audio_url"].media
assert _I2V_IMAGE is not None
assert _W25_AUDIO is not None
I2V_IMAGE: MediaConstraints = _I2V_IMAGE
W25_AUDIO: MediaConstraints = _W25_AUDIO


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\0\0" * int(rate * seconds))
    return buf.getvalue()


def mp3_bytes(seconds: float, rate: int = 22050) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=rate)
        stream.layout = "mono"
        samples = np.zeros((1, int(rate * seconds)), dtype=np.int16)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def image_bytes(size: tuple[int, int], fmt: str = "PNG", mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, fmt)
    return buf.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# -- 1. Wan 2.1's image limits are our assumption: warnings, never refusals ------------------------


def test_a_camera_photo_and_a_gif_pass_wan21_validation_with_one_warning_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    Image.new("RGB", (6000, 4000), (10, 20, 30)).save(tmp_path / "camera.jpg", quality=40)
    Image.new("RGB", (640, 480)).save(tmp_path / "anim.gif")
    (tmp_path / "m.yaml").write_text(
        "name: photos\nendpoint: fal-ai/wan-i2v\ndefaults:\n  prompt: a cat\n"
        "items:\n  - image_url: camera.jpg\n  - image_url: anim.gif\n"
    )
    assert run_main(["validate", str(tmp_path / "m.yaml")], monkeypatch) == 0
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.startswith("warning")]
    assert len(lines) == 2, out
    photo, gif = lines
    assert "m.yaml:6: item 0: field 'image_url': the image is 6000x4000 pixels" in photo
    assert "m.yaml:7: item 1: field 'image_url': image format GIF" in gif
    for line in lines:
        assert "wanbatch's own assumed limits" in line
        assert "fal publishes no such limit" in line


def test_assumed_limits_warn_but_unreadable_files_and_bombs_stay_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (big,) = check_bytes(image_bytes((5000, 100)), FieldType.IMAGE, I2V_IMAGE)
    assert big.severity == "warning"
    (junk,) = check_bytes(b"\x89PNG\r\n\x1a\n garbage", FieldType.IMAGE, I2V_IMAGE)
    assert (junk.severity, junk.message) == ("error", "not a readable image")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (1000, 1000)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    (problem,) = check_file(bomb, FieldType.IMAGE, I2V_IMAGE)
    assert problem.severity == "error"
    assert "decompression bomb" in problem.message


def test_published_limits_still_refuse() -> None:
    limits = W25.fields_by_name["image_url"].media
    assert limits is not None
    assert not limits.assumed
    (problem,) = check_bytes(image_bytes((2400, 400)), FieldType.IMAGE, limits)
    assert problem.severity == "error"
    assert "too large" in problem.message


# -- 2. audio: a WAV or MP3 container, 3 to 30 s ----------------------------------------------------


@pytest.mark.parametrize(
    ("data", "phrase"),
    [
        (wav_bytes(1), "the audio is 1 s long, too short"),
        (wav_bytes(60), "the audio is 60 s long, too long"),
        (mp3_bytes(1), "too short"),
        (b"this is text, not audio\n", "neither WAV nor MP3"),
        (b"ID3 but nothing else" * 8, "not a readable WAV or MP3"),
        (b"RIFF\0\0\0\0WAVEjunk", "not a readable WAV or MP3"),
    ],
    ids=["wav-1s", "wav-60s", "mp3-1s", "text", "id3-junk", "riff-junk"],
)
def test_bad_audio_is_refused(data: bytes, phrase: str) -> None:
    (problem,) = check_bytes(data, FieldType.AUDIO, W25_AUDIO)
    assert problem.severity == "error"
    assert phrase in problem.message
    assert "3 to 30 s" in problem.allowed


@pytest.mark.parametrize(
    "data", [wav_bytes(3), wav_bytes(30), mp3_bytes(5)], ids=["wav-3s", "wav-30s", "mp3-5s"]
)
def test_good_audio_passes(data: bytes) -> None:
    assert check_bytes(data, FieldType.AUDIO, W25_AUDIO) == []


def _wav_tagged(format_tag: int, seconds: float = 5, rate: int = 8000) -> bytes:
    """A WAV whose ``fmt`` chunk names ``format_tag``'s codec over bytes of noise."""
    data = bytes(random.Random(7).getrandbits(8) for _ in range(int(rate * seconds) * 2))
    fmt = struct.pack("<HHIIHH", format_tag, 1, rate, rate * 2, 2, 16)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    body = b"WAVE" + chunks
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _id3_picture(mime: bytes, picture: bytes) -> bytes:
    """An ID3v2.3 tag holding one APIC frame (an attached picture of type ``mime``)."""
    frame_body = b"\0" + mime + b"\0" + b"\x03" + b"\0" + picture
    frame = b"APIC" + struct.pack(">I", len(frame_body)) + b"\0\0" + frame_body
    size = len(frame)
    synchsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    return b"ID3\x03\0\0" + synchsafe + frame


def test_a_wav_of_another_codec_than_pcm_is_refused() -> None:
    """The format tag of a WAV names any codec of FFmpeg's table (0x0160: WMA): its decoder ran
    on the file's bytes while probing, and noise tagged WMA passed as audio."""
    (problem,) = check_bytes(_wav_tagged(0x0160), FieldType.AUDIO, W25_AUDIO)
    assert problem.severity == "error"
    assert "not a readable WAV or MP3" in problem.message
    assert check_bytes(_wav_tagged(0x0001), FieldType.AUDIO, W25_AUDIO) == []  # PCM


def test_an_mp3s_picture_never_reaches_an_image_decoder() -> None:
    """An ID3 picture frame becomes a stream whose decoder the frame's type picks (TIFF, with its
    EXIF parser, here); probing the audio opens none but the MP3 decoder's."""
    tiff = b"II*\0" + struct.pack("<I", 8) + bytes(random.Random(3).getrandbits(8) for _ in range(200))
    data = _id3_picture(b"image/tiff", tiff) + mp3_bytes(4)
    with av.logging.Capture(local=False) as logs:
        previous = av.logging.get_level()
        av.logging.set_level(av.logging.DEBUG)
        try:
            problems = check_bytes(data, FieldType.AUDIO, W25_AUDIO)
        finally:
            av.logging.set_level(previous)
    assert problems == []  # a picture in the tag is allowed: the audio is what counts
    # FFmpeg's TIFF decoder logs under its name; all it may say is that it was not let in.
    tiff_said = [message for _level, name, message in logs if name == "tiff"]
    assert all("not on whitelist" in message for message in tiff_said), tiff_said


def test_audio_is_sent_as_what_its_bytes_are() -> None:
    assert media_type(wav_bytes(5), "music.mp3", FieldType.AUDIO) == "audio/wav"
    assert media_type(mp3_bytes(5), "music.bin", FieldType.AUDIO) == "audio/mpeg"


def test_a_manifest_with_bad_audio_names_each_file_line_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "short.wav").write_bytes(wav_bytes(1))
    (tmp_path / "long.wav").write_bytes(wav_bytes(60))
    (tmp_path / "notaudio.mp3").write_text("not audio\n")
    (tmp_path / "ok.mp3").write_bytes(mp3_bytes(5))
    short_uri = data_uri(wav_bytes(2), "audio/wav")
    (tmp_path / "m.yaml").write_text(
        "name: music\nendpoint: fal-ai/wan-25-preview/image-to-video\n"
        f"defaults:\n  prompt: a cat\n  image_url: {data_uri(image_bytes((400, 400)), 'image/png')}\n"
        "items:\n  - audio_url: short.wav\n  - audio_url: long.wav\n  - audio_url: notaudio.mp3\n"
        f"  - audio_url: ok.mp3\n  - audio_url: {short_uri}\n"
    )
    assert run_main(["validate", str(tmp_path / "m.yaml")], monkeypatch) == 2
    out = capsys.readouterr()
    errors = [line for line in (out.out + out.err).splitlines() if line.startswith("error")]
    assert len(errors) == 4, out
    assert "m.yaml:7: item 0: field 'audio_url': the audio is 1 s long, too short" in errors[0]
    assert "m.yaml:8: item 1: field 'audio_url': the audio is 60 s long, too long" in errors[1]
    assert "m.yaml:9: item 2: field 'audio_url': not a readable WAV or MP3 audio file" in errors[2]
    assert "m.yaml:11: item 4: field 'audio_url': the audio is 2 s long, too short" in errors[3]
    assert all("(allowed: WAV or MP3, 3 to 30 s long" in line for line in errors)


# -- 3. the simulator enforces fal's published limits, not wanbatch's own -------------------------


@pytest.mark.parametrize("endpoint_id", [s.id for s in all_endpoints() if "seed" in s.fields_by_name])
def test_the_simulator_accepts_a_seed_fal_does_not_limit(endpoint_id: str) -> None:
    from tests.sample_inputs import INPUTS

    endpoint = get_endpoint(endpoint_id)
    resolved, errors = sim_validate(endpoint, {**INPUTS[endpoint_id], "seed": -1})
    assert errors == []
    assert resolved is not None
    assert resolved["seed"] == -1
    # wanbatch itself still refuses it (exports store seeds as uint64)
    assert check_value(endpoint.fields_by_name["seed"], -1) != []


@pytest.mark.parametrize(
    ("field", "value", "error_type"),
    [
        ("audio_url", data_uri(wav_bytes(1), "audio/wav"), "audio_duration_too_short"),
        ("audio_url", data_uri(wav_bytes(31), "audio/wav"), "audio_duration_too_long"),
        ("audio_url", data_uri(b"not audio", "audio/mpeg"), "unsupported_audio_format"),
        ("image_url", data_uri(image_bytes((400, 400), mode="RGBA"), "image/png"), "image_has_alpha"),
    ],
    ids=lambda v: v if isinstance(v, str) and not v.startswith("data:") else "data",
)
def test_the_simulator_refuses_what_fal_publishes(field: str, value: str, error_type: str) -> None:
    for spec in (W25, W26):
        _refused_by_the_simulator(spec, field, value, error_type)


@pytest.mark.parametrize(
    ("endpoint_id", "size", "error_type"),
    [
        # Wan 2.5's schema: 360 to 2000 pixels a side.
        ("fal-ai/wan-25-preview/image-to-video", (300, 400), "image_too_small"),
        ("fal-ai/wan-25-preview/image-to-video", (2400, 400), "image_too_large"),
        # Wan 2.6's schema: 240 to 7680 (its overview's 360-2000 is only advised).
        ("wan/v2.6/image-to-video", (200, 400), "image_too_small"),
        ("wan/v2.6/image-to-video", (8000, 400), "image_too_large"),
    ],
)
def test_the_simulator_refuses_pixels_outside_the_input_schema(
    endpoint_id: str, size: tuple[int, int], error_type: str
) -> None:
    value = data_uri(image_bytes(size), "image/png")
    _refused_by_the_simulator(get_endpoint(endpoint_id), "image_url", value, error_type)


def _refused_by_the_simulator(spec: EndpointSpec, field: str, value: str, error_type: str) -> None:
    image = data_uri(image_bytes((400, 400)), "image/png")
    payload = {"prompt": "a cat", "image_url": image, field: value}
    resolved, errors = sim_validate(spec, payload)
    assert resolved is None
    (error,) = errors
    assert error["loc"] == ["body", field]
    assert error["type"] == error_type
    # fal's error item: loc, msg, type and url required (docs.fal.ai/errors)
    assert error["url"] == f"https://docs.fal.ai/errors/#{error_type}"


def test_the_simulator_accepts_what_only_wanbatch_assumes() -> None:
    payload = {"prompt": "a cat", "image_url": data_uri(image_bytes((5000, 100), "GIF"), "image/gif")}
    resolved, errors = sim_validate(I2V, payload)
    assert errors == []
    assert resolved is not None
    ok = {"prompt": "a cat", "image_url": data_uri(image_bytes((400, 400)), "image/png")}
    resolved, errors = sim_validate(W25, {**ok, "audio_url": data_uri(mp3_bytes(5), "audio/mpeg")})
    assert errors == []
    assert resolved is not None
