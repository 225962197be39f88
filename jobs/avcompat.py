"""What ``av.open`` needs so that a file's tags never fail it, on every PyAV wanbatch supports.

FFmpeg keeps a container's tags (title, encoder, …) as bytes of no declared encoding, and files
in the wild carry tags in Latin-1, Shift JIS or plain garbage. wanbatch never reads the tags: a
download (:func:`worker.probe.probe`) or an audio input (:func:`jobs.media.read_audio_header`)
must be judged by its streams, not fail because its title is not UTF-8.

- PyAV 14–18 decode the tags when the file is opened, strictly by default (a
  ``UnicodeDecodeError`` out of ``av.open``), unless given ``metadata_errors="ignore"``.
- PyAV 19 dropped ``metadata_encoding`` and ``metadata_errors`` (``av.open`` refuses them with a
  ``TypeError``): tags are always decoded as UTF-8 with ``surrogateescape``, which never fails.

The two differ in the container class: up to 18 it has ``metadata_errors`` (a read-only
attribute), from 19 it has not. That is checked once, on first use (``av`` is imported then, not
when this module is: a manifest without audio never needs FFmpeg).
"""

from __future__ import annotations

from functools import cache
from typing import Any


def tolerant_metadata_for(container_class: type) -> dict[str, Any]:
    """``av.open`` keywords that keep undecodable tags from failing it, for a PyAV whose
    container class is ``container_class``."""
    if hasattr(container_class, "metadata_errors"):
        return {"metadata_errors": "ignore"}
    return {}


@cache
def tolerant_metadata() -> dict[str, Any]:
    """``av.open`` keywords that keep undecodable tags from failing it, for the installed PyAV
    (the same dict at every call: callers only unpack it). Typed ``Any``: unpacked into a call
    that PyAV's stubs type without the keyword from 19 on."""
    import av.container

    return tolerant_metadata_for(av.container.Container)
