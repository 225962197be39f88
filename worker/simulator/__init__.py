"""A faithful local stand-in for fal's queue API (no internet needed, no money spent).

It speaks fal's protocol as documented in shared/reference/fal-queue-protocol.md — submit,
status (poll and SSE), result, cancel, storage uploads, signed webhooks — validates inputs
against the same endpoint registry wanbatch uses, produces real (tiny, deterministic) MP4s,
and keeps a ledger of what a real account would have been billed. Faults can be injected to
test every failure path. Entry points: :func:`serve` and :func:`running_simulator`.
"""

from worker.simulator.faults import FAULT_KINDS, FaultRule
from worker.simulator.options import SimulatorOptions
from worker.simulator.server import SimulatorHandle, running_simulator, serve

__all__ = ["FAULT_KINDS", "FaultRule", "SimulatorHandle", "SimulatorOptions", "running_simulator", "serve"]
