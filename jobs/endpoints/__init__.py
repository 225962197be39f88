"""The endpoint registry: one YAML data file per fal endpoint, loaded into typed specs.

Adding an endpoint is adding one ``*.yaml`` file beside this module — its input fields (type,
default, range or enum, required-ness, description), its image/audio constraints, its pricing
with the source of every number, and nothing else. No code changes.

Everything that needs to know about an endpoint (validation, pricing, the fal client's URL
building, the simulator) reads it from here, so there is one place to correct a limit or a price.
"""

from jobs.endpoints.registry import (
    AdvisedLimits,
    EndpointSpec,
    FieldSpec,
    FieldType,
    MediaConstraints,
    Pricing,
    UnitFactor,
    all_endpoints,
    get_endpoint,
    known_endpoint_ids,
    registry_sha256,
)

__all__ = [
    "AdvisedLimits",
    "EndpointSpec",
    "FieldSpec",
    "FieldType",
    "MediaConstraints",
    "Pricing",
    "UnitFactor",
    "all_endpoints",
    "get_endpoint",
    "known_endpoint_ids",
    "registry_sha256",
]
