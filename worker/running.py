"""Process a batch until every job is terminal, showing progress; the engine of ``run``.

Embedded (no broker): an in-process Celery worker consumes the tasks while this thread ticks.
Distributed (a broker is configured): the ``wanbatch worker`` processes do the work and this
only watches the database. Either way the same steps run and the same rows tell the truth.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from jobs import store
from jobs.batches import batch_report, open_engine
from jobs.settings import Settings
from jobs.states import JobState
from worker import steps, tasks
from worker.runtime import build_runtime

SIMULATOR_KEY = "simulator-key"


@dataclass
class RunStats:
    """What a run did, for the summary and the benchmark."""

    wall_seconds: float = 0.0
    ticks: int = 0
    status_calls: int = 0


@contextlib.contextmanager
def simulated(
    settings: Settings, *, latency: float | None = 0.3, concurrency: int = 40
) -> Iterator[Settings]:
    """Start the bundled fal simulator and return settings pointed at it (``--simulate``)."""
    from worker.simulator.options import SimulatorOptions
    from worker.simulator.server import running_simulator

    options = SimulatorOptions(concurrency_limit=concurrency, latency_seconds=latency)
    with running_simulator(options) as sim:
        yield settings.model_copy(
            update={
                "fal_queue_url": sim.url,
                "fal_rest_url": sim.url,
                "fal_key": settings.fal_key or _secret(SIMULATOR_KEY),
                "poll_min_interval": min(settings.poll_min_interval, 0.2),
                "tick_interval": min(settings.tick_interval, 0.1),
            }
        )


def _secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


def _describe_counts(counts: dict[str, int]) -> str:
    order = [s.value for s in JobState]
    return " ".join(f"{k}:{counts[k]}" for k in order if counts.get(k))


def process_batch(
    batch_id: str,
    settings: Settings,
    *,
    console: Console | None = None,
    show_progress: bool = True,
) -> tuple[dict[str, Any], RunStats]:
    """Drive ``batch_id`` to the end; returns its final status report and run statistics."""
    stats = RunStats()
    started = time.monotonic()
    if settings.broker_url:
        _watch(batch_id, settings, console, show_progress, stats, tick=None)
    else:
        from worker.app import app
        from worker.embedded import EmbeddedWorker

        rt = build_runtime(
            settings=settings,
            enqueue_submit=lambda job_id: tasks.submit_job.delay(job_id),
            enqueue_download=lambda job_id: tasks.download_job.delay(job_id),
            allow_missing_key=True,  # callers that send new work check the key first
        )
        tasks.set_runtime(rt)
        try:
            with EmbeddedWorker(app, settings.embedded_concurrency):
                _watch(batch_id, settings, console, show_progress, stats, tick=rt)
        finally:
            tasks.set_runtime(None)
            rt.client.close()
    stats.wall_seconds = time.monotonic() - started
    engine = open_engine(settings)
    with store.session_scope(engine) as session:
        report = batch_report(session, batch_id)
    return report, stats


def _watch(
    batch_id: str,
    settings: Settings,
    console: Console | None,
    show_progress: bool,
    stats: RunStats,
    tick: steps.Runtime | None,
) -> None:
    engine = open_engine(settings)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[money]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[counts]}"),
        console=console or Console(stderr=True),
        disable=not show_progress,
        transient=False,
    )
    with progress:
        task_id = progress.add_task("jobs", total=None, money="", counts="")
        while True:
            if tick is not None:
                report = steps.tick(tick)
                stats.ticks += 1
                stats.status_calls += report.status_calls
            with store.session_scope(engine) as session:
                current = batch_report(session, batch_id)
            done = current["finished"]
            progress.update(
                task_id,
                total=current["total"],
                completed=done,
                money=f"${current['spent_usd'] or 0:.2f}/${current['estimated_usd'] or 0:.2f}",
                counts=_describe_counts(current["counts"]),
            )
            if done >= current["total"]:
                break
            at_provider = sum(current["counts"].get(s.value, 0) for s in JobState if s.at_provider)
            if current["state"] == "paused" and at_provider == 0:
                progress.console.print(
                    f"[yellow]batch paused: {current.get('pause_reason') or 'see status'}; "
                    "fix it, then run the same command again to resume[/yellow]"
                )
                break
            time.sleep(settings.tick_interval)
