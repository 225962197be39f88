"""``python -m worker.simulator [--port N] [--concurrency-limit 40] …``: serve the simulator.

Every scalar field of :class:`SimulatorOptions` becomes a ``--flag`` (underscores → dashes;
booleans take ``true``/``false``), faults are ``--faults '{"submit_429": {"probability": 0.1}}'``.
``wanbatch simulator`` offers the same through the project CLI; this entry point needs no
database or settings and is what the CLI tests start as a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from worker.simulator.faults import FaultPlan, FaultRule
from worker.simulator.options import SimulatorOptions
from worker.simulator.server import serve


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _scalar(annotation: Any) -> Any:
    """The argparse ``type`` for a field annotation; None for fields without a CLI form."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _scalar(args[0])
    if origin is typing.Literal:
        return str
    if origin is tuple:
        return "csv"
    return {bool: _bool, int: int, float: float, str: str}.get(annotation)


def build_parser() -> argparse.ArgumentParser:
    """Flags for host, port, TLS files, faults, and every scalar option."""
    parser = argparse.ArgumentParser(prog="python -m worker.simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--faults", type=json.loads, default={}, help="JSON object of fault rules")
    hints = typing.get_type_hints(SimulatorOptions)
    for fld in fields(SimulatorOptions):
        kind = _scalar(hints[fld.name])
        if kind is None:
            continue
        flag = "--" + fld.name.replace("_", "-")
        if kind == "csv":
            parser.add_argument(flag, type=lambda s: tuple(x for x in s.split(",") if x), default=None)
        else:
            parser.add_argument(flag, type=kind, default=None)
    return parser


def options_from_args(ns: argparse.Namespace) -> SimulatorOptions:
    """The options the parsed flags describe (unset flags keep the defaults)."""
    changes = {
        f.name: getattr(ns, f.name)
        for f in fields(SimulatorOptions)
        if f.name != "faults" and getattr(ns, f.name, None) is not None
    }
    opts = SimulatorOptions().updated(changes)
    if not isinstance(ns.faults, dict):
        raise ValueError("--faults must be a JSON object")
    FaultPlan(ns.faults)  # validates kinds and rules now, not on the first request
    opts.faults = {kind: FaultRule.parse(rule) for kind, rule in ns.faults.items()}
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and serve until interrupted."""
    ns = build_parser().parse_args(argv)
    try:
        opts = options_from_args(ns)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        serve(ns.host, ns.port, opts, certfile=ns.tls_cert, keyfile=ns.tls_key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
