"""Job keys: what makes two jobs the same job.

A job's key is the sha256 of its endpoint and the canonical JSON of its resolved input, in which
images and audio stand in by ``sha256:<content hash>`` of their bytes, whatever form they were
given in: a local file (moving it keeps the key; changing its bytes changes it) or a base64 data
URI (decoded: its media type's spelling, ``image/jpg`` or ``image/jpeg``, says nothing about the
bytes). So a replay that sends inline the image the original run read from a file (an exported
record's ``input``) is the same job: ``reuse_outputs`` takes its output and ``diff`` pairs it.
A data URI that does not decode (such a job is invalid, never stored) is keyed by its text. The
key is how ``submit`` stays idempotent and how a manifest's identical jobs collapse to one, so
the same input must always give the same key. (Before schema 0022 data URIs were keyed by their
text; that migration rewrote the stored keys.)

Numbers are keyed by their value, not their spelling (:func:`canonical_json`): ``5``, ``5.0``,
``5.00`` and ``5e0`` are one value to fal (JSON has one number type; its inputs are read as the
field's type, a float field's ``5`` being ``5.0``), so they are one job, and one default. The
value sent stays as written. (Before schema 0034 a whole-number float was keyed by its float
text, ``5.0``; that migration rewrote the stored keys.)

Line breaks in text are keyed as ``\\n`` (:func:`lf`): ``two\\r\\nlines`` and ``two\\nlines`` are
one prompt written two ways (a file saved on Windows, by Excel, or checked out with git's
``autocrlf``), one job. A CSV cell's are read as ``\\n`` already (:mod:`jobs.manifest.items_from`);
this keeps a job stored with ``\\r\\n`` before, or written so in JSON or a quoted YAML escape, the
same job. (Before schema 0042 they were keyed as written; that migration rewrote the stored keys.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from jobs.digits import WholeTooLong
from jobs.endpoints import EndpointSpec, FieldType, get_endpoint, known_endpoint_ids
from jobs.media import MediaKind, classify, data_uri_sha256, file_sha256


@lru_cache(maxsize=64)
def resolvable_fields(endpoint_id: str) -> frozenset[str]:
    """Fields whose written value is not yet the sent value: media (paths) and text enums."""
    spec = get_endpoint(endpoint_id)
    return frozenset(
        f.name
        for f in spec.fields
        if f.media is not None or (f.type is FieldType.STRING and f.enum is not None)
    )


@lru_cache(maxsize=64)
def _documented_defaults(endpoint_id: str) -> tuple[tuple[str, Any, str], ...]:
    """Each documented default of an endpoint: its field, value and canonical JSON (none for an
    endpoint the registry no longer has)."""
    if endpoint_id not in known_endpoint_ids():
        return ()
    return tuple(
        (name, value, canonical_json(value)) for name, value in get_endpoint(endpoint_id).defaults().items()
    )


def endpoint_defaults(endpoint_id: str) -> dict[str, Any]:
    """The endpoint's documented defaults: what fal applies to a field left out. Never part of
    the job key or of what is sent (fal applies its own, which it may change)."""
    return {name: value for name, value, _ in _documented_defaults(endpoint_id)}


def with_defaults(endpoint_id: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with the endpoint's documented defaults filled in where left out: what fal is
    asked (``num_frames: 81`` left out asks what ``num_frames: 81`` given asks)."""
    return {**endpoint_defaults(endpoint_id), **values}


def written_defaults(endpoint_id: str, values: Mapping[str, Any]) -> list[str]:
    """The fields of ``values`` that write out the endpoint's default (its canonical JSON: a
    number by its value, ``shift: 5.0`` writes out ``5``), in the endpoint's order: leaving them
    out changes the job key, not :func:`with_defaults`."""
    return [
        name
        for name, _, text in _documented_defaults(endpoint_id)
        if name in values and _value_json(values[name]) == text
    ]


#: Exact types whose canonical JSON depends on the value alone (equal values of one of these
#: types give one text; ``True == 1`` are of two types): safe to remember by ``(type, value)``.
_SCALARS = (str, int, bool)


def _value_json(value: Any) -> str:
    """:func:`canonical_json` of one field's value, remembered for the few scalars a sweep
    repeats (a manifest writes ``num_frames: 81`` once and a million jobs carry it): this ran
    for every default-valued field of every job. Other values are encoded each time."""
    kind = type(value)
    if kind in _SCALARS and (kind is not str or len(value) <= 256):
        return _scalar_json(kind.__name__, value)
    return canonical_json(value)


@lru_cache(maxsize=4096)
def _scalar_json(kind: str, value: Any) -> str:
    """The canonical JSON of a scalar; ``kind`` (its type's name) keeps ``1`` and ``True``
    apart in the cache."""
    return canonical_json(value)


def canonical_json(value: Any, *, numbers_as_written: bool = False, breaks_as_written: bool = False) -> str:
    """Sorted keys, no whitespace, UTF-8 kept, numbers by value, line breaks as ``\\n``: the same
    input always gives the same text.

    A float that is a whole number is written as that int (:func:`numbers_by_value`), so ``5``
    and ``5.0`` (or ``1e2`` and ``100``) give one text; a text's ``\\r\\n`` and lone ``\\r`` are
    ``\\n`` (:func:`lf`). The migrations that rewrite keys stored under an earlier rule use the
    flags to recognise them: ``breaks_as_written`` keeps the rule before schema 0042 (line
    breaks as written), ``numbers_as_written`` the one before schema 0034 (a float as its float
    text, and line breaks as written too).
    """
    plain = value if numbers_as_written else numbers_by_value(value, breaks=not breaks_as_written)
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_refused)


def lf(text: str) -> str:
    """``text`` with each ``\\r\\n`` and lone ``\\r`` as ``\\n``: one line break, however it was
    saved (YAML reads a manifest's own line breaks so)."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def numbers_by_value(value: Any, *, breaks: bool = True) -> Any:
    """``value`` with every float that is a whole number, at any depth, replaced by the int of
    the same value (``5.0`` → ``5``, ``-0.0`` → ``0``, ``1e2`` → ``100``, ``1e300`` → its exact
    301-digit int); with ``breaks``, every text's line breaks as ``\\n`` (:func:`lf`); any other
    value as it is (``true`` is no number; an infinite float or NaN, already refused by the
    schema check, stays a float).

    Every JSON number, not just those of the fields the schema calls a number: JSON has one
    number type, and fal reads each one as its field's type (a float field's ``5`` is ``5.0``,
    an integer field's ``5.0`` is ``5``), so no field tells the two apart, a nested value
    (a list of numbers) or an endpoint the registry no longer has included. The int is exact
    (``int()`` of a float loses nothing), so two numbers give one text exactly when they are
    equal, at any size; a float that is not whole keeps its shortest round-trip text.
    """
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, str):
        return lf(value) if breaks else value
    if isinstance(value, dict):
        if all(
            type(item) in _UNCHANGED and not (breaks and type(item) is str and "\r" in item)
            for item in value.values()
        ):
            return value  # the common input: flat text, whole numbers, booleans; nothing to replace
        return {key: numbers_by_value(item, breaks=breaks) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [numbers_by_value(item, breaks=breaks) for item in value]
    return value


#: Exact types :func:`numbers_by_value` returns as they are (no float inside).
_UNCHANGED = frozenset({str, int, bool, type(None)})


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
    """sha256 hex of the endpoint and the input, media standing in by their content hash.

    ``digests`` caches hashes by path (and by data URI) for one pass (a batch reuses a few
    images many times). Fields in ``refused`` (paths outside the allowed folders) are keyed by
    their path and never read; such a job is invalid and never stored.
    """
    return key_of(spec.id, keyed_input(spec, resolved, digests, refused=refused))


def key_of(
    endpoint_id: str,
    keyed: Mapping[str, Any],
    *,
    numbers_as_written: bool = False,
    breaks_as_written: bool = False,
) -> str:
    """sha256 hex of the endpoint and an input already in its keyed form (:func:`keyed_input`).
    ``numbers_as_written``: the key before schema 0034; ``breaks_as_written``: before schema
    0042 (see :func:`canonical_json`)."""
    keyed_text = canonical_json(
        keyed, numbers_as_written=numbers_as_written, breaks_as_written=breaks_as_written
    )
    text = endpoint_id + "\n" + keyed_text
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def keyed_input(
    spec: EndpointSpec,
    resolved: Mapping[str, Any],
    digests: dict[str, str | None] | None = None,
    *,
    refused: Mapping[str, str] | frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The input as its key sees it: each file or data URI replaced by ``sha256:<content hash>``
    (see :func:`job_key`)."""
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
        elif isinstance(value, str) and (form := classify(value)) in (MediaKind.PATH, MediaKind.DATA_URI):
            if digests is not None and value in digests:
                digest = digests[value]
            else:
                digest = file_sha256(Path(value)) if form is MediaKind.PATH else data_uri_sha256(value)
                if digests is not None:
                    digests[value] = digest
            if digest:
                keyed[name] = f"sha256:{digest}"
            elif form is MediaKind.PATH:
                keyed[name] = f"missing:{value}"
            # else: a data URI that does not decode stays its text (the job is invalid)
    return keyed


def stored_keyed_input(
    spec: EndpointSpec, stored: Mapping[str, Any], sources: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A stored job's input as its key sees it (:func:`keyed_input`), from the store alone.

    Each media field stands in by the SHA-256 its ``source_files`` recorded (``sources``: a
    local file's bytes as read at submission, a data URI's decoded bytes), so a file and a data
    URI of the same image are the same value, as in the job key. The disk is never read again
    (the file may have changed since): a local file with no recorded SHA-256 (a job stored
    before they were, or unreadable then) is ``missing:<path>``; a data URI with none is
    decoded.
    """
    recorded = sources if isinstance(sources, Mapping) else {}
    digests: dict[str, str | None] = {}
    for fld in spec.media_fields:
        value = stored.get(fld.name)
        if not isinstance(value, str):
            continue
        source = recorded.get(fld.name)
        digest = source.get("sha256") if isinstance(source, Mapping) else None
        if isinstance(digest, str):
            digests[value] = digest
        elif classify(value) is MediaKind.PATH:
            digests[value] = None
    return keyed_input(spec, stored, digests)


def stored_content_key(endpoint_id: str, stored: Mapping[str, Any], sources: Mapping[str, Any] | None) -> str:
    """The key a stored job's input gives now, from the store alone (:func:`stored_keyed_input`):
    two stored jobs asking the same (a file and a data URI of one image, or two spellings of one
    data URI) have the same one. An endpoint no longer known keys its input as it is."""
    if endpoint_id not in known_endpoint_ids():
        return key_of(endpoint_id, stored)
    return key_of(endpoint_id, stored_keyed_input(get_endpoint(endpoint_id), stored, sources))


def defaults_free_key(
    endpoint_id: str, stored: Mapping[str, Any], sources: Mapping[str, Any] | None, key: str
) -> str | None:
    """The key of a stored job's input with the fields that write out a documented default left
    out (:func:`written_defaults`), from the store alone (:func:`stored_keyed_input`): two jobs
    have the same one exactly when they ask fal the same once the defaults are filled in
    (:func:`with_defaults` adds the same values to both), though their keys differ. A job that
    writes out no default is its own ``key`` (no second hash: a sweep's jobs mostly write none).

    None for a job that is no twin of any other: one that leaves out the seed of an endpoint that
    has one (fal draws a new seed for each such request, so two of them are two videos), or of an
    endpoint the registry no longer has (its defaults are unknown). The rule of
    :class:`jobs.manifest.checks.DefaultedDuplicates`, which warns of such jobs in one manifest."""
    if endpoint_id not in known_endpoint_ids():
        return None
    spec = get_endpoint(endpoint_id)
    if spec.field("seed") is not None and "seed" not in stored:
        return None
    written = written_defaults(endpoint_id, stored)
    if not written:
        return key
    kept = {name: value for name, value in stored.items() if name not in written}
    return key_of(endpoint_id, stored_keyed_input(spec, kept, sources))
