"""The chaos suite's crash and stop points, and how a ``point:probability,…`` setting is read.

Here rather than in :mod:`worker.chaos` (which acts on them) so that the settings can check
``WANBATCH_CHAOS_CRASH_POINTS`` / ``WANBATCH_CHAOS_STOP_POINTS`` when they are loaded: a
malformed value is then the usual one-line configuration error, not a traceback in a worker's
log the first time a job reaches a point (which left ``run`` waiting and a never-sent job
``submit_unknown``).
"""

from __future__ import annotations

#: Every point the steps call; a spec naming another point is a mistake, refused loudly.
POINTS: frozenset[str] = frozenset(
    {"before_post", "after_post", "after_commit", "mid_download", "after_download"}
)


def parse_points(spec: str | None) -> dict[str, float]:
    """``"a:0.1,b:1"`` → ``{"a": 0.1, "b": 1.0}``; unknown points and bad numbers raise ValueError."""
    plan: dict[str, float] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, value = (p.strip() for p in part.strip().partition(":"))
        if name not in POINTS:
            raise ValueError(
                f"unknown chaos point {name!r} (known: {', '.join(sorted(POINTS))}; "
                "write point:probability, e.g. after_post:0.2)"
            )
        try:
            probability = float(value) if sep else 1.0
        except ValueError:
            probability = float("nan")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"chaos point {name!r}: probability {value!r} is not a number from 0 to 1")
        plan[name] = probability
    return plan
