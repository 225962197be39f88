"""wanbatch's processes fix glibc's mmap and trim thresholds (:func:`cli.startup.steady_malloc_thresholds`).

Left to glibc's dynamic thresholds, a block above 128 KiB was mapped on its own and a heap's free
top above 128 KiB went back to the kernel, so the buffers of the decoder each probe opens and
closes were faulted in again at every probe. Each check runs a wanbatch command in a fresh
interpreter, then asks glibc itself: whether a 2 MiB block came from its own mapping (the
``IS_MMAPPED`` bit of the chunk's size field, glibc's malloc.c), and how many page faults a
probe of an 832×480 H.264 clip took. No time is measured, and no memory figure is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

_COMMAND = r"""
import ctypes, json, resource, sys, threading
clip, how = sys.argv[1:3]
if how == "command":
    sys.argv = ["wanbatch", "--version"]
    from cli import main
    try:
        main()
    except SystemExit:
        pass
elif how == "function":  # the policy alone: a command's start-up may raise glibc's thresholds
    from cli import startup
    startup.steady_malloc_thresholds()
faults = None
if clip:
    from worker.probe import probe
    def probes():  # in a thread of its own, as a run's download step probes
        global faults
        probe(clip, walked=True)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            probe(clip, walked=True)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
    thread = threading.Thread(target=probes)
    thread.start()
    thread.join()
# After the probes: freeing a mapped block raises glibc's dynamic thresholds.
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
block = libc.malloc(2 * 1024 * 1024)
mapped = bool(ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value & 2)
libc.free(block)
print("MALLOC " + json.dumps({"mapped": mapped, "faults": faults}), file=sys.stderr)
"""

_SETTINGS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
    "GLIBC_TUNABLES",
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")


def _malloc(
    clip: Path | None = None, how: str = "command", env: dict[str, str] | None = None
) -> dict[str, object]:
    """glibc's answers in a fresh interpreter that ran a wanbatch command (``how``: or only
    :func:`cli.startup.steady_malloc_thresholds`, or nothing) and probed ``clip`` 21 times."""
    base = {k: v for k, v in os.environ.items() if k not in _SETTINGS}
    done = subprocess.run(
        [sys.executable, "-c", _COMMAND, str(clip or ""), how],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
        check=False,
    )
    line = next((x for x in done.stderr.splitlines() if x.startswith("MALLOC ")), None)
    assert line is not None, done.stderr
    result: dict[str, object] = json.loads(line.removeprefix("MALLOC "))
    return result


def _clip(path: Path) -> Path:
    """Three frames of an 832×480 H.264 MP4, Wan 2.2's 480p size."""
    y, x = np.mgrid[0:480, 0:832].astype(np.float32)
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("libx264" if "libx264" in av.codecs_available else "h264", rate=Fraction(16))
        video.width, video.height, video.pix_fmt = 832, 480, "yuv420p"
        for i in range(3):
            shade = (128 + 100 * np.sin(x / 17 + i) * np.cos(y / 11)).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(np.repeat(shade[..., None], 3, axis=2), format="rgb24")
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
    return path


def test_a_probe_faults_in_no_decoder_buffers_again(tmp_path: Path) -> None:
    """About 250 page faults a probe with glibc's dynamic thresholds as a fresh interpreter has
    them (the control: what this test would not see otherwise), about one with these. (A
    ``wanbatch --version`` happens to raise the dynamic ones on its own; a ``run`` did not.)"""
    clip = _clip(tmp_path / "clip.mp4")
    kept, dynamic = (_malloc(clip, how)["faults"] for how in ("function", "none"))
    assert isinstance(kept, float)
    assert isinstance(dynamic, float)
    assert (kept < 50, dynamic > 100) == (True, True), (kept, dynamic)


def test_a_wanbatch_process_keeps_a_2_mib_block_in_its_heap() -> None:
    assert _malloc()["mapped"] is False


@pytest.mark.parametrize(
    "setting",
    [
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"},
        # The user's trim threshold leaves the mmap threshold to glibc too: fixed at 128 KiB.
        {"MALLOC_TRIM_THRESHOLD_": "67108864"},
        {"GLIBC_TUNABLES": "glibc.malloc.top_pad=1048576"},
    ],
    ids=["mmap-variable", "mmap-tunable", "trim-variable", "top-pad-tunable"],
)
def test_the_users_own_thresholds_decide_instead(setting: dict[str, str]) -> None:
    assert _malloc(env=setting)["mapped"] is True
