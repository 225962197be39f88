"""A faithful local stand-in for fal's queue API (no internet needed, no money spent).

It speaks fal's queue protocol (https://docs.fal.ai/model-endpoints/queue) — submit, status
(poll and SSE), result, cancel, storage uploads, signed webhooks — validates inputs against the
same endpoint registry wanbatch uses, produces real (tiny, deterministic) MP4s, and keeps a
ledger of what a real account would have been billed. Faults can be injected to test every
failure path. Entry points: :func:`serve` (``wanbatch simulator``) and
:func:`running_simulator` (tests, ``--simulate``).

A test double beside the product, not part of it: it imports the endpoint registry and the
price list of :mod:`jobs` (to judge inputs and bill as fal would) and nothing of :mod:`worker`.
"""

from falsim.faults import FAULT_KINDS, FaultRule
from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator, serve

__all__ = ["FAULT_KINDS", "FaultRule", "SimulatorHandle", "SimulatorOptions", "running_simulator", "serve"]
