"""Whether an MP4 file is whole, from its top-level boxes alone (ISO/IEC 14496-12 §4.2).

An MP4 is a sequence of boxes, each starting with its size (4 bytes, big-endian) and type (4
bytes): ``ftyp``, ``moov`` (the index: frame count, sample table), ``mdat`` (the frames),
``free``/``skip``/``wide``/``uuid`` … A size of 1 means a 64-bit ``largesize`` follows the type;
a size of 0 means the box runs to the end of the file. A download cut short (a body ended by the
connection closing, a ``Content-Length`` shorter than the file) leaves its last box declaring
more bytes than the file holds, or no ``moov`` or ``mdat`` at all. FFmpeg reads the header of
such a file without complaint — a faststart file (``moov`` first) cut after a third still says
81 frames, and its first frame decodes — so :func:`truncation` is checked first.

Only the box headers are read: a handful of 8- or 16-byte reads however large the file (a few
microseconds; the probe runs on every job's path).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

#: Boxes without which an MP4 holds no playable video.
_REQUIRED = (b"moov", b"mdat")
#: Top-level boxes read before giving up on the walk (a real MP4 has a handful): a file of
#: millions of empty ``free`` boxes is not walked to its end.
MAX_BOXES = 4096

_HEADER = struct.Struct(">I4s")
_LARGE = struct.Struct(">Q")


def truncation(read_at: Callable[[int, int], bytes], size: int) -> str | None:
    """Why the MP4 of ``size`` bytes that ``read_at(offset, count)`` reads is cut short, in
    words; None when its top-level boxes tile the file and include ``moov`` and ``mdat``.

    Only what proves a cut is reported: a box running past the end of the file, a header cut in
    the middle, or ``moov``/``mdat`` missing. Anything else odd (a box smaller than its header,
    a type that is not four printable characters: bytes that are no MP4 at all) is left to the
    demuxer, which says so in its own words."""
    offset = 0
    seen: set[bytes] = set()
    for _ in range(MAX_BOXES):
        if offset == size:
            break
        head = read_at(offset, 16)
        if len(head) < 8:
            return f"cut inside a box header at byte {offset} of {size}"
        box_size, kind = _HEADER.unpack_from(head)
        if not kind.isalnum() and not all(32 <= b < 127 for b in kind):
            return None  # not a box type: not an MP4 at all here, the demuxer's to refuse
        seen.add(kind)
        if box_size == 1:
            if len(head) < 16:
                return f"cut inside the header of its {_name(kind)} box at byte {offset} of {size}"
            box_size = _LARGE.unpack_from(head, 8)[0]
        elif box_size == 0:  # to the end of the file
            break
        if box_size < 8:
            return None  # malformed, not cut: the demuxer's to refuse
        if offset + box_size > size:
            return (
                f"cut short: its {_name(kind)} box at byte {offset} declares {box_size} bytes, "
                f"but the file ends {offset + box_size - size} bytes before that ({size} bytes)"
            )
        offset += box_size
    else:
        return None  # too many boxes to walk: the demuxer decides
    missing = [_name(k) for k in _REQUIRED if k not in seen]
    if missing:
        return f"cut short: no {' and no '.join(missing)} box in its {size} bytes"
    return None


def file_truncation(path: str | os.PathLike[str]) -> str | None:
    """:func:`truncation` of the file at ``path`` (:class:`OSError` when it cannot be read)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return fd_truncation(fd)
    finally:
        os.close(fd)


def fd_truncation(fd: int) -> str | None:
    """:func:`truncation` of the file open as ``fd`` (read with ``pread``: its offset is kept)."""
    return truncation(lambda offset, count: os.pread(fd, count, offset), os.fstat(fd).st_size)


def _name(kind: bytes) -> str:
    """A box type as shown: ``moov``, or its bytes escaped when not printable."""
    shown = kind.decode("latin-1")
    return f"'{shown}'" if shown.isprintable() and shown.isascii() else repr(kind)
