"""Typed specs for endpoint data files, and the loader that reads them once.

The YAML files are the data; these models are the schema of that data, so a typo in a new
endpoint file fails loudly at load time instead of silently mis-validating user manifests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from decimal import Decimal
from enum import StrEnum
from functools import cached_property, lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.errors import UsageError

_DATA_DIR = Path(__file__).parent


class FieldType(StrEnum):
    """The JSON types an endpoint input can take; ``image``/``audio`` are URL-or-file fields."""

    STRING = "string"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    IMAGE = "image"
    AUDIO = "audio"


class AdvisedLimits(BaseModel):
    """Stricter figures the provider publishes outside its input schema (fal's overview, the
    "About" text of a model page) where the schema itself allows more: the keys of
    :class:`MediaConstraints` that carry a number, each within the schema's own limit.

    They never refuse an input: outside one (and inside the schema's) is a warning that names
    both published figures and where each is published, and the job is sent. The simulator,
    which stages fal's schema, does not enforce them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_width: int | None = None
    min_height: int | None = None
    max_width: int | None = None
    max_height: int | None = None
    max_bytes: int | None = None
    min_duration_s: float | None = None
    max_duration_s: float | None = None
    #: Where the provider publishes these figures, as a warning names it.
    published_in: str = "fal's overview"


#: The keys an ``advised:`` block may lower (a ``max_``) or raise (a ``min_``).
ADVISED_KEYS = (
    "min_width",
    "min_height",
    "max_width",
    "max_height",
    "max_bytes",
    "min_duration_s",
    "max_duration_s",
)


class MediaConstraints(BaseModel):
    """What a provider accepts for one image or audio input; ``None`` means unconstrained.

    The limits are the hard ones: outside one, an input is refused (and the simulator answers
    fal's 422). Where the provider publishes them in its input schema, they are the schema's.
    ``advised`` holds the stricter figures it publishes elsewhere (:class:`AdvisedLimits`:
    fal's overview says 360-2000 pixels where its schema allows 240-7680): outside one but
    inside the hard limit is a warning, and the input is sent.

    ``assumed`` marks limits the provider does not publish: we chose them and say so. Assumed
    limits never refuse an input: going past one is a warning that names it as wanbatch's
    assumption, and the simulator does not enforce them (fal would not). Only the checks that
    protect the user stay errors whatever the flag: the file must be a readable image or audio
    file, and an image of more pixels than Pillow's decompression-bomb guard allows is refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    formats: tuple[str, ...]  # Pillow format names (JPEG, PNG, WEBP, BMP) or audio extensions
    min_width: int | None = None
    min_height: int | None = None
    max_width: int | None = None
    max_height: int | None = None
    alpha_allowed: bool = True
    #: In bytes. fal's pages say "MB" ("Max size: 25MB", "Up to 15 MB") and the registry reads it
    #: as decimal megabytes (25,000,000 bytes), the stricter of the two readings: fal's own toolkit
    #: once counted a "megabyte" as 1024**2 (``filesize_limit`` in
    #: https://github.com/fal-ai/fal/blob/main/projects/fal/src/fal/toolkit/utils/download_utils.py),
    #: so what the model enforces is not published; a file within 25,000,000 bytes fits either.
    max_bytes: int | None = None
    #: Audio only: the length in seconds fal accepts, read from the file's container (PyAV).
    min_duration_s: float | None = None
    max_duration_s: float | None = None
    assumed: bool = False
    advised: AdvisedLimits | None = None
    source: str

    @model_validator(mode="after")
    def _advised_within(self) -> MediaConstraints:
        advised = self.advised
        if advised is None:
            return self
        if self.assumed:
            raise ValueError("'advised' limits go with published limits, not 'assumed' ones")
        given = [key for key in ADVISED_KEYS if getattr(advised, key) is not None]
        if not given:
            raise ValueError("'advised' names no limit")
        for key in given:
            hard, soft = getattr(self, key), getattr(advised, key)
            inside = hard is None or (soft >= hard if key.startswith("min_") else soft <= hard)
            if not inside or soft == hard:
                raise ValueError(f"advised {key} {soft} is not stricter than the hard limit {hard}")
        return self

    def with_advised(self) -> MediaConstraints:
        """These limits with the advised figures in place of the hard ones (no ``advised``)."""
        if self.advised is None:
            return self
        update: dict[str, Any] = {key: getattr(self.advised, key) for key in ADVISED_KEYS}
        update = {key: value for key, value in update.items() if value is not None}
        return self.model_copy(update={**update, "advised": None})


class FieldSpec(BaseModel):
    """One input field of an endpoint, exactly as the provider's schema describes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    type: FieldType
    required: bool = False
    description: str
    default: Any = None
    #: Integers stay integers (``int | float``): a seed's 2**64 - 1 is not a float.
    minimum: int | float | None = None
    maximum: int | float | None = None
    enum: tuple[str | int, ...] | None = None
    max_length: int | None = None
    media: MediaConstraints | None = None
    #: ``minimum``/``maximum`` are wanbatch's own rule, not fal's (a seed's 0..2**64-1, which
    #: only exports need): wanbatch refuses values outside them, the simulator — which must
    #: answer as fal does — does not.
    wanbatch_only_range: bool = False

    @model_validator(mode="after")
    def _media_only_on_media(self) -> FieldSpec:
        if (self.media is not None) != (self.type in (FieldType.IMAGE, FieldType.AUDIO)):
            raise ValueError(f"field {self.name}: 'media' goes with image/audio fields and only them")
        return self

    def allowed(self) -> str:
        """A human description of the allowed values, for error messages."""
        if self.enum is not None:
            return ", ".join(str(v) for v in self.enum)
        kind = {
            FieldType.STRING: "a string",
            FieldType.INTEGER: "an integer",
            FieldType.NUMBER: "a number",
            FieldType.BOOLEAN: "true or false",
            FieldType.IMAGE: "an image: a local path, an http(s) URL or a data URI",
            FieldType.AUDIO: "an audio file: a local path, an http(s) URL or a data URI",
        }[self.type]
        if self.minimum is not None and self.maximum is not None:
            kind += f" from {_num(self.minimum)} to {_num(self.maximum)}"
        elif self.minimum is not None:
            kind += f" ≥ {_num(self.minimum)}"
        elif self.maximum is not None:
            kind += f" ≤ {_num(self.maximum)}"
        if self.max_length is not None:
            kind += f" of at most {self.max_length} characters"
        return kind


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return str(int(value)) if value.is_integer() else str(value)


class UnitFactor(BaseModel):
    """One factor of an endpoint's billing units; units are the product of all factors.

    - ``table``: the value of ``field`` looked up in ``table`` (e.g. resolution → 0.5 / 1).
    - ``value``: the numeric value of ``field`` divided by ``divide_by`` (e.g. duration seconds).
    - ``threshold``: ``factor`` when the value of ``field`` is above ``above``, else 1.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["table", "value", "threshold"]
    field: str
    table: dict[str, Decimal] | None = None
    divide_by: Decimal = Decimal(1)
    above: Decimal | None = None
    factor: Decimal | None = None
    source: str

    @model_validator(mode="after")
    def _complete(self) -> UnitFactor:
        if self.kind == "table" and not self.table:
            raise ValueError("a 'table' factor needs a table")
        if self.kind == "threshold" and (self.above is None or self.factor is None):
            raise ValueError("a 'threshold' factor needs 'above' and 'factor'")
        return self


class Pricing(BaseModel):
    """How one job of this endpoint is billed, as data with the source of every number.

    ``usd_per_unit`` is either one price, or a price per value of ``usd_per_unit_field`` (e.g. a
    per-second price that depends on the resolution). ``assumption`` is true when the provider
    does not publish the price: estimates then say so and settings may override it.

    ``unit_symbol`` is the short name totals use (``s``, ``unit``): billing units are added up
    only among endpoints with the same symbol — seconds of video and videos do not add up.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: str
    unit_symbol: str = Field(pattern=r"^[a-z][a-z ]{0,15}$")
    factors: tuple[UnitFactor, ...]
    usd_per_unit: Decimal | None = None
    usd_per_unit_field: str | None = None
    usd_per_unit_by: dict[str, Decimal] | None = None
    assumption: bool = False
    source: str

    @model_validator(mode="after")
    def _one_price_form(self) -> Pricing:
        flat = self.usd_per_unit is not None
        by = self.usd_per_unit_by is not None and self.usd_per_unit_field is not None
        if flat == by:
            raise ValueError("give either usd_per_unit, or usd_per_unit_field with usd_per_unit_by")
        return self


class EndpointSpec(BaseModel):
    """One fal endpoint: its id, its input schema, its output, and its price."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    title: str
    kind: Literal["text-to-video", "image-to-video", "first-last-frame-to-video"]
    docs: str
    fields: tuple[FieldSpec, ...]
    pricing: Pricing
    #: Output keys the model returns besides ``video`` and ``seed`` (e.g. ``actual_prompt``).
    extra_outputs: tuple[str, ...] = ()
    #: Typical model time in seconds, for ETAs and the simulator's latency (not a promise).
    typical_seconds: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> EndpointSpec:
        names = [f.name for f in self.fields]
        if len(names) != len(set(names)):
            raise ValueError(f"{self.id}: duplicate field names")
        refs = [f.field for f in self.pricing.factors]
        if self.pricing.usd_per_unit_field:
            refs.append(self.pricing.usd_per_unit_field)
        for ref in refs:
            if ref not in names:
                raise ValueError(f"{self.id}: pricing refers to unknown field {ref!r}")
        return self

    @property
    def app_base(self) -> str:
        """The owner/alias part that status, result and cancel URLs use (sub-path dropped).

        Mirrors fal_client's ``AppId.from_endpoint_id``: ``fal-ai/wan-25-preview/image-to-video``
        → ``fal-ai/wan-25-preview``; ``wan/v2.6/image-to-video`` → ``wan/v2.6``. The namespaces
        ``workflows`` and ``comfy`` keep one more segment.
        """
        return app_base(self.id)

    def field(self, name: str) -> FieldSpec | None:
        """The field called ``name``, or None."""
        return self.fields_by_name.get(name)

    @cached_property
    def fields_by_name(self) -> Mapping[str, FieldSpec]:
        """The fields by name, in schema order; built once per spec (validation asks per value)."""
        return MappingProxyType({f.name: f for f in self.fields})

    @property
    def media_fields(self) -> tuple[FieldSpec, ...]:
        """Fields whose values are images or audio (paths, URLs or data URIs)."""
        return tuple(f for f in self.fields if f.media is not None)

    def defaults(self) -> dict[str, Any]:
        """Documented defaults, for pricing fields the user left out (the provider applies them)."""
        return {f.name: f.default for f in self.fields if f.default is not None}


_NAMESPACES = ("workflows", "comfy")


def app_base(endpoint_id: str) -> str:
    """``owner/alias`` of a full endpoint id (with the namespace kept), as fal's clients derive it."""
    parts = endpoint_id.strip("/").split("/")
    keep = 3 if parts[0] in _NAMESPACES else 2
    if len(parts) < keep:
        raise ValueError(f"not a fal endpoint id: {endpoint_id!r}")
    return "/".join(parts[:keep])


#: libyaml's safe loader when PyYAML was built with it (every wheel is): the same documents as
#: ``yaml.safe_load``, parsed in C — the registry is read at every command's start.
_SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@lru_cache(maxsize=1)
def _load() -> dict[str, EndpointSpec]:
    specs: dict[str, EndpointSpec] = {}
    for path in sorted(_DATA_DIR.glob("*.yaml")):
        data = path.read_bytes()
        spec = EndpointSpec.model_validate(yaml.load(data, Loader=_SAFE_LOADER))  # noqa: S506 (a safe loader)
        if spec.id in specs:
            raise ValueError(f"{path.name}: endpoint {spec.id} is defined twice")
        specs[spec.id] = spec
        _DIGESTS[spec.id] = hashlib.sha256(data).hexdigest()
    return specs


#: SHA-256 of each endpoint's YAML file as loaded, filled by :func:`_load`.
_DIGESTS: dict[str, str] = {}


def registry_sha256(endpoint_id: str) -> str:
    """SHA-256 hex of the registry file ``endpoint_id`` was loaded from (the bytes this process uses).

    Stored per job as provenance: a corrected limit or price changes the file, so two runs of
    "the same" job can tell whether wanbatch validated and priced them against the same entry.
    """
    get_endpoint(endpoint_id)  # loads the registry; UsageError for an unknown id
    return _DIGESTS[endpoint_id]


def all_endpoints() -> tuple[EndpointSpec, ...]:
    """Every registered endpoint, in a stable order."""
    return tuple(_load().values())


def known_endpoint_ids() -> tuple[str, ...]:
    """The ids a manifest may name."""
    return tuple(_load())


def get_endpoint(endpoint_id: str) -> EndpointSpec:
    """The spec for ``endpoint_id``; a :class:`UsageError` naming the known ids otherwise."""
    try:
        return _load()[endpoint_id]
    except KeyError:
        raise UsageError(
            f"unknown endpoint {endpoint_id!r} (known: {', '.join(known_endpoint_ids())})"
        ) from None
