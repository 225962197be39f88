"""Job keys: what makes two jobs the same job.

A job's key is the sha256 of its endpoint and the canonical JSON of its resolved input, in which
local files stand in by ``sha256:<content hash>`` (moving a file keeps the key; changing its
bytes changes it). The key is how ``submit`` stays idempotent and how a manifest's identical jobs
collapse to one, so the same input must always give the same key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from jobs.digits import WholeTooLong
from jobs.endpoints import EndpointSpec, FieldType, get_endpoint
from jobs.media import MediaKind, classify, file_sha256


@lru_cache(maxsize=64)
def resolvable_fields(endpoint_id: str) -> frozenset[str]:
    """Fields whose written value is not yet the sent value: media (paths) and text enums."""
    spec = get_endpoint(endpoint_id)
    return frozenset(
        f.name
        for f in spec.fields
        if f.media is not None or (f.type is FieldType.STRING and f.enum is not None)
    )


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 kept: the same input always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_refused)


def _refused(value: object) -> str:
    """A number too long (already an error: such a job is never stored) keyed by its length, so
    the rest of its manifest can still be expanded and checked; anything else is no JSON."""
    if isinstance(value, WholeTooLong):
        return f"refused:{value.digits} digits"
    raise TypeError(f"{type(value).__name__} is not JSON")


def job_key(
    spec: EndpointSpec,
    resolved: Mapping[str, Any],
    digests: dict[str, str | None] | None = None,
    *,
    refused: Mapping[str, str] | frozenset[str] = frozenset(),
) -> str:
    """sha256 hex of the endpoint and the input, local files standing in by their content hash.

    ``digests`` caches file hashes by path for one pass (a batch reuses a few images many times).
    Fields in ``refused`` (paths outside the allowed folders) are keyed by their path and never
    read; such a job is invalid and never stored.
    """
    keyed = dict(resolved)
    for name in resolvable_fields(spec.id):
        value = keyed.get(name)
        if isinstance(value, str) and (name in refused or "\0" in value):
            keyed[name] = f"unread:{value}"
        elif isinstance(value, str) and (fld := spec.field(name)) is not None and fld.media is None:
            # A text enum ("720p") names no file: keyed as it always was when no such file
            # exists, without looking at the disk, so the key never depends on the folder
            # wanbatch runs in.
            if classify(value) is MediaKind.PATH:
                keyed[name] = f"missing:{value}"
        elif isinstance(value, str) and classify(value) is MediaKind.PATH:
            if digests is None or value not in digests:
                digest = file_sha256(Path(value))
                if digests is not None:
                    digests[value] = digest
            else:
                digest = digests[value]
            keyed[name] = f"sha256:{digest}" if digest else f"missing:{value}"
    text = spec.id + "\n" + canonical_json(keyed)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
