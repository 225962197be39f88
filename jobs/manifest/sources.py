"""Where each media input of a job came from: the reference the manifest wrote, and its SHA-256.

A stored job's input holds an absolute path, and the exported ``input`` holds what was sent (often
an inline data URI of several MB), neither of which tells a dataset user which of *their* files a
row was made from. ``source_files`` keeps, per media field, the value as the manifest named it
(``images/car.png``, a URL, or the data URI itself) with the SHA-256 of its bytes, so a row stays
traceable and a changed file is visible. A local path is relative to the manifest's folder: an
``items_from`` row's path found only beside its file is recorded as spelled from the manifest's
folder (``data/images/car.png``, :mod:`jobs.manifest.row_paths`), never as the row wrote it.

The hash is computed while the manifest expands, where the file is read for validation anyway:

- a local file: the SHA-256 of the bytes its validation read and decoded
  (:attr:`jobs.manifest.expand.Manifest.checked`, handed to the pass that stores the jobs in
  ``digests``), so a file rewritten after its check is recorded as checked and the worker refuses
  to send the rewrite; a file the pass did not check (an ``expand`` alone) is hashed by
  :func:`jobs.media.file_sha256` of the resolved path, shared with the job key's ``digests``
  cache (one read per distinct file per pass); ``None`` when unreadable;
- a data URI: the SHA-256 of the decoded bytes (cached by value: a default image is one string
  shared by every job); ``None`` when it does not decode;
- an http(s) URL (or anything else): ``None`` — wanbatch never fetches while validating.

A path refused for lying outside the allowed folders is never read (its job is never stored).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobs.endpoints import EndpointSpec
from jobs.media import MediaKind, classify, data_uri_sha256, file_sha256

#: ``{field: {"source": as written, "sha256": hex or None}}``, as stored in ``jobs.source_files``.
SourceFiles = dict[str, dict[str, str | None]]

__all__ = ["SourceFiles", "data_uri_sha256", "source_files"]


def source_files(
    spec: EndpointSpec,
    written: Mapping[str, Any],
    resolved: Mapping[str, Any],
    digests: dict[str, str | None],
    *,
    refused: Mapping[str, str] | frozenset[str] = frozenset(),
) -> SourceFiles | None:
    """Each media field of the job: its value as ``written`` and the SHA-256 of its bytes.

    ``written`` is the input before resolution (relative paths as the manifest has them),
    ``resolved`` after it. ``digests`` caches hashes by resolved path and by data URI for one
    pass (the job key fills the same cache). None when the job has no media field.
    """
    out: SourceFiles = {}
    for fld in spec.media_fields:
        value = resolved.get(fld.name)
        if not isinstance(value, str):
            continue
        shown = written.get(fld.name, value)
        out[fld.name] = {
            "source": shown if isinstance(shown, str) else value,
            "sha256": None if fld.name in refused or "\0" in value else _sha256(value, digests),
        }
    return out or None


def _sha256(value: str, digests: dict[str, str | None]) -> str | None:
    kind = classify(value)
    if kind is MediaKind.URL or kind is MediaKind.OTHER_SCHEME:
        return None
    if value in digests:
        return digests[value]
    digest = data_uri_sha256(value) if kind is MediaKind.DATA_URI else file_sha256(Path(value))
    digests[value] = digest
    return digest
