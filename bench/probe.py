"""Benchmark (issue #13): what checking every output costs — :func:`worker.probe.probe` plus
:func:`worker.probe.compare`, in milliseconds per output, over simulator-made clips.

The clips are the simulator's own (:mod:`falsim.media`), one per endpoint at its default and
its largest resolution with its default length (plus Wan 2.6's longest, 15 s at 1080p), written
to a temporary folder once; each is then probed ``--repeat`` times. Probing reads headers and
decodes one frame, so its cost should not grow with the clip's length: the table shows it.

Run from the repository root::

    python -m bench.probe               # 30 probes per clip
    python -m bench.probe --repeat 100

Exit status is 0 when every clip's median stays within the target (below), 1 otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from bench._common import Target, fmt, machine_summary, print_table
from falsim import media
from jobs.endpoints import EndpointSpec, all_endpoints
from worker import probe

#: Checking one output must stay cheap next to downloading it (a clip is megabytes).
MEDIAN_TARGET = Target("median probe", 50.0, "ms")


def _inputs(spec: EndpointSpec) -> list[dict[str, Any]]:
    """The endpoint's default render, its largest resolution, and its longest duration there."""
    fields = {f.name: f for f in spec.fields}
    resolution = fields["resolution"]
    out: list[dict[str, Any]] = [{}]
    largest = str(resolution.enum[-1]) if resolution.enum else None
    if largest and largest != resolution.default:
        out.append({"resolution": largest})
    duration = fields.get("duration")
    if duration is not None and duration.enum and len(duration.enum) > 2:
        out.append({"resolution": largest, "duration": duration.enum[-1]})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="probes per clip (default 30)")
    args = parser.parse_args()
    table = Table(title=f"probe + compare per output — {machine_summary()}", title_justify="left")
    for header in ("endpoint", "input", "clip", "MB", "median (ms)", "p95 (ms)", "flagged", "target"):
        table.add_column(header, justify="left" if header in ("endpoint", "input", "clip") else "right")
    ok = True
    with tempfile.TemporaryDirectory(prefix="wanbatch-probe-") as tmp:
        factory = media.VideoFactory()
        for spec in all_endpoints():
            for data in _inputs(spec):
                resolved = {f.name: f.default for f in spec.fields if f.default is not None} | data
                geo = media.geometry(spec, resolved, None)
                path = Path(tmp) / f"{len(list(Path(tmp).iterdir()))}.mp4"
                path.write_bytes(factory.render(geo, "0" * 64, 1))
                expectation = probe.expected_media(spec, data)
                times: list[float] = []
                mismatch: str | None = None
                for _ in range(max(1, args.repeat)):
                    started = time.perf_counter()
                    mismatch = probe.compare(probe.probe(path), expectation)
                    times.append((time.perf_counter() - started) * 1000)
                median = statistics.median(times)
                p95 = sorted(times)[max(0, round(len(times) * 0.95) - 1)]
                ok = ok and MEDIAN_TARGET.check(median) and mismatch is None
                table.add_row(
                    spec.id,
                    ", ".join(f"{k}={v}" for k, v in data.items()) or "defaults",
                    f"{geo.width}x{geo.height} {geo.num_frames}f@{geo.fps}",
                    fmt(path.stat().st_size / 1e6),
                    fmt(median),
                    fmt(p95),
                    "yes" if mismatch else "no",
                    MEDIAN_TARGET.describe(median),
                )
    print_table(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
