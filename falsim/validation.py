"""The simulated model's input validation: the registry's schema, judged by pydantic as fal's apps do.

fal apps declare their input as pydantic models behind FastAPI, so an invalid input comes back
as FastAPI's 422 body: ``{"detail": [{"loc": ["body", field], "msg", "type", "input", "ctx"?,
"url"}]}``. Building a real pydantic model from the registry's :class:`FieldSpec` list gives
exactly those messages and types ("Field required", "Input should be less than or equal to
100", "Input should be '480p' or '720p'", …) instead of a hand-written imitation.

An optional field fal documents with a default is declared with its plain type, so an explicit
``null`` is a 422 (``"resolution": null``: "Input should be '720p' or '1080p'"); one documented
without a default ("If None, a random seed is chosen") is nullable, and ``null`` is the same as
leaving it out (``"seed": null``), as fal's ``Optional[…] = None`` fields take it.

Only what fal's input schema publishes is enforced: a range the registry marks
``wanbatch_only_range`` (the seed's 0..2**64-1, which only wanbatch's exports need) is not, nor
media limits marked ``assumed`` (fal publishes none for Wan 2.1's images), nor the stricter
figures of fal's overview kept as ``advised`` (Wan 2.6's 360-2000 pixels: its schema allows
240-7680, and that is what is refused here).

Every item of a 422 carries ``url``, which fal's error page (https://docs.fal.ai/errors) makes
required beside ``loc``, ``msg`` and ``type``: pydantic's own link for the schema's errors (and
the body that is no object), fal's error page at the type (``https://docs.fal.ai/errors/#image_too_large``)
for the media and download errors fal's apps raise themselves.

Media fields get the checks the model would do while downloading: a data URI must decode, and a
URL on the simulator's own host must name a stored file. A value's form and a data URI's syntax
are read as wanbatch's validation reads them (:func:`jobs.media.classify`,
:func:`jobs.media.parse_data_uri`: a scheme in any case, a media type of ``type/subtype``
tokens), so the two never disagree on what fal can decode. The bytes the simulator has (a data
URI's, a stored upload's) are then checked against the endpoint's published limits, as
:mod:`jobs.media` checks them: an image's format, pixels and alpha; an audio file's container
(WAV or MP3) and duration. A URL whose host fal's servers cannot reach (loopback, private,
link-local: :func:`jobs.media.unreachable_host`) fails to download, as on fal; other http(s)
URLs are accepted without fetching (there is no internet here).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.version import version_short

from jobs.endpoints import EndpointSpec, FieldSpec, FieldType, get_endpoint
from jobs.media import MediaKind, check_bytes, classify, parse_data_uri, unreachable_host


def _annotation(spec: FieldSpec) -> Any:
    if spec.enum is not None:
        return Literal[tuple(spec.enum)]
    return {
        FieldType.STRING: str,
        FieldType.INTEGER: int,
        FieldType.NUMBER: float,
        FieldType.BOOLEAN: bool,
        FieldType.IMAGE: str,
        FieldType.AUDIO: str,
    }[spec.type]


@lru_cache(maxsize=32)
def input_model(endpoint_id: str, extra: str = "ignore") -> type[BaseModel]:
    """A pydantic model of ``endpoint_id``'s input, as the fal app would declare it."""
    spec = get_endpoint(endpoint_id)
    definitions: dict[str, Any] = {}
    for fld in spec.fields:
        constraints: dict[str, Any] = {}
        if fld.minimum is not None and not fld.wanbatch_only_range:
            constraints["ge"] = fld.minimum
        if fld.maximum is not None and not fld.wanbatch_only_range:
            constraints["le"] = fld.maximum
        if fld.max_length is not None:
            constraints["max_length"] = fld.max_length
        annotation = _annotation(fld)
        if fld.required:
            definitions[fld.name] = (annotation, Field(..., **constraints))
        elif fld.default is None:
            # Documented without a default ("seed: … If None, a random seed is chosen"): the
            # app's ``Optional[int] = None``, so an explicit null is the same as leaving it out.
            definitions[fld.name] = (annotation | None, Field(None, **constraints))
        else:
            # Documented with one ("Default value: "1080p""): the plain type with that default,
            # so an explicit null is a 422 (pydantic refuses None for ``Literal[…] = "1080p"``;
            # https://docs.pydantic.dev/latest/concepts/models/#required-fields).
            definitions[fld.name] = (annotation, Field(fld.default, **constraints))
    config = ConfigDict(extra=cast(Literal["ignore", "forbid"], extra))
    name = "Input_" + re.sub(r"\W", "_", endpoint_id)
    return create_model(name, __config__=config, **definitions)


#: Where fal documents an error type of its own (``image_too_large``, ``file_download_error``):
#: its error page's example link, the type appended.
FAL_ERRORS_URL = "https://docs.fal.ai/errors/#"


def pydantic_error_url(type_: str) -> str:
    """The link pydantic gives an error of ``type_`` (``https://errors.pydantic.dev/2.13/v/missing``)."""
    return f"https://errors.pydantic.dev/{version_short()}/v/{type_}"


def _error(loc: list[str | int], msg: str, type_: str, value: Any) -> dict[str, Any]:
    """One 422 item of a type fal's app raises itself (a media or download error)."""
    return {"loc": ["body", *loc], "msg": msg, "type": type_, "input": value, "url": FAL_ERRORS_URL + type_}


def validate_input(
    spec: EndpointSpec,
    payload: Any,
    *,
    extra: str = "ignore",
    local_file_exists: Callable[[str], bool | None] | None = None,
    local_file_data: Callable[[str], bytes | None] | None = None,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """``(resolved input with defaults, [])`` when valid, else ``(None, FastAPI detail list)``.

    ``local_file_exists(url)`` answers True/False for a URL the simulator itself serves and None
    for any other URL (accepted unfetched); pass no callable to skip the check.
    ``local_file_data(url)`` gives the bytes of such a URL (None for any other), checked like a
    data URI's against the endpoint's published media limits.
    """
    if not isinstance(payload, dict):
        return None, [
            {
                "loc": ["body"],
                "msg": "Input should be a valid dictionary or object to extract fields from",
                "type": "model_attributes_type",
                "input": payload,
                "url": pydantic_error_url("model_attributes_type"),
            }
        ]
    model = input_model(spec.id, extra)
    try:
        resolved = model.model_validate(payload).model_dump()
    except ValidationError as exc:
        detail = []
        for err in exc.errors(include_url=True):
            item: dict[str, Any] = {
                "loc": ["body", *err["loc"]],
                "msg": err["msg"],
                "type": err["type"],
                "input": err.get("input"),
            }
            if "ctx" in err:
                item["ctx"] = {k: _jsonable(v) for k, v in err["ctx"].items()}
            item["url"] = err.get("url") or pydantic_error_url(err["type"])
            detail.append(item)
        return None, detail
    media_errors = []
    for fld in spec.media_fields:
        value = resolved.get(fld.name)
        if value is None:
            continue
        problem = _media_problem(str(value), local_file_exists)
        if problem is not None:
            media_errors.append(_error([fld.name], problem[0], problem[1], value))
            continue
        form = classify(str(value))
        data = decode_data_uri(str(value)) if form is MediaKind.DATA_URI else None
        if data is None and local_file_data is not None and form is MediaKind.URL:
            data = local_file_data(str(value))
        if data is not None and fld.media is not None:
            for found in check_bytes(data, fld.type, fld.media):
                if found.severity == "error":  # an assumed or advised limit is not the schema's: it warns
                    msg = found.message + (f" (allowed: {found.allowed})" if found.allowed else "")
                    media_errors.append(_error([fld.name], msg, found.code or "value_error", value))
    if media_errors:
        return None, media_errors
    return resolved, []


def _media_problem(
    url: str, local_file_exists: Callable[[str], bool | None] | None
) -> tuple[str, str] | None:
    form = classify(url)
    if form is MediaKind.DATA_URI:
        parts = parse_data_uri(url)
        if parts is None or not parts.base64 or not parts.mime_ok:
            return "Failed to decode the data URI: expected data:<mime>;base64,<data>", "file_download_error"
        if parts.decoded() is None:
            return "Failed to decode the data URI: invalid base64", "file_download_error"
        return None
    if form is MediaKind.URL:
        if local_file_exists is None:
            return None
        ours = local_file_exists(url)
        if ours is False:
            return f"Failed to download the file from {url}: 404 Not Found", "file_download_error"
        if ours is None and (why := unreachable_host(url)) is not None:
            # fal's runner downloads the URL from fal's machines, where a loopback, private or
            # link-local address is none of the user's: the download fails there, and so here
            # (the simulator's own uploads, on its loopback host, are answered above).
            return f"Failed to download the file from {url}: its host is {why}", "file_download_error"
        return None
    return f"Failed to download the file from {url!r}: not an http(s) URL or data URI", "file_download_error"


def decode_data_uri(url: str) -> bytes | None:
    """The bytes of a base64 data URI (its scheme in any case), or None when ``url`` is not one
    that fal decodes (:func:`jobs.media.parse_data_uri`)."""
    parts = parse_data_uri(url)
    if parts is None or not parts.mime_ok:
        return None
    return parts.decoded()


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool | type(None)):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)
