"""A working process's own metrics on ``WANBATCH_METRICS_PORT``: an embedded ``run`` serves them
while it works (and frees the port when done), a port in use is one clear line, Celery's
prefork children are summed (multiprocess mode), and label values stay bounded.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from falsim import SimulatorOptions, running_simulator
from falsim.server import SimulatorHandle
from jobs import batches
from jobs.errors import ConfigError, ProviderError, RetryableProviderError
from jobs.settings import Settings
from tests.ports import unused_port
from worker import telemetry
from worker.running import process_batch

KEY = "b-process-key-1e5c9d3a:7f0b4a2e6c8d"


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``code`` run by a fresh interpreter in the project's folder, with ``args``."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )


def parse(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[SimulatorHandle]:
    """Requests that run long enough for a scrape to land while the run works."""
    with running_simulator(
        SimulatorOptions(latency_seconds=0.6, latency_jitter=0.0, concurrency_limit=4, rng_seed=3)
    ) as handle:
        yield handle


def test_an_embedded_run_serves_its_metrics_while_it_works(
    slow_sim: SimulatorHandle, sqlite_url: str, tmp_path: Path
) -> None:
    port = unused_port()
    settings = Settings(
        database_url=sqlite_url,
        FAL_KEY=SecretStr(KEY),
        fal_queue_url=slow_sim.url,
        fal_rest_url=slow_sim.url,
        output_dir=tmp_path / "outputs",
        poll_min_interval=0.05,
        tick_interval=0.05,
        submit_rate=100,
        metrics_port=port,
    )
    manifest = tmp_path / "served.yaml"
    items = "".join(f"  - prompt: served scene {i}\n" for i in range(6))
    manifest.write_text(f"name: served\nendpoint: fal-ai/wan-22\nitems:\n{items}", encoding="utf-8")
    submitted = batches.submit_manifest(manifest, settings)
    outcome: list[Any] = []
    runner = threading.Thread(
        target=lambda: outcome.append(process_batch(submitted.batch_id, settings, show_progress=False))
    )
    runner.start()
    seen: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 60
    while runner.is_alive() and time.monotonic() < deadline:
        try:
            seen = parse(httpx.get(url, timeout=2).text)
        except httpx.TransportError:
            time.sleep(0.05)  # not listening yet
            continue
        accepted = seen.get(
            ("wanbatch_worker_submits_total", (("endpoint", "fal-ai/wan-22"), ("outcome", "accepted"))), 0
        )
        if accepted >= 1:
            break
        time.sleep(0.05)
    runner.join(120)
    assert not runner.is_alive()
    assert outcome, "the run did not finish"
    report, _stats = outcome[0]
    assert report["counts"]["succeeded"] == 6
    assert seen, "the metrics port never answered while the run worked"
    assert (
        seen[("wanbatch_worker_submits_total", (("endpoint", "fal-ai/wan-22"), ("outcome", "accepted")))] >= 1
    )
    assert ("process_cpu_seconds_total", ()) in seen  # the process's CPU and memory come along
    assert KEY not in str(seen)
    with pytest.raises(httpx.TransportError):  # the run is over: the port is free again
        httpx.get(url, timeout=2)


NO_PORT_RUN = textwrap.dedent(
    """
    import sys
    from pydantic import SecretStr
    from falsim import SimulatorOptions, running_simulator
    from jobs import batches
    from jobs.settings import Settings
    from worker.running import process_batch

    with running_simulator(SimulatorOptions(latency_seconds=0.05, rng_seed=5)) as sim:
        settings = Settings(
            database_url=sys.argv[1], FAL_KEY=SecretStr("k-1:s"), fal_queue_url=sim.url,
            fal_rest_url=sim.url, output_dir=sys.argv[2], submit_rate=100, metrics_port=None,
        )
        batch = batches.submit_manifest(sys.argv[3], settings)
        report, _ = process_batch(batch.batch_id, settings, show_progress=False)
    print(report["counts"]["succeeded"], "prometheus_client" in sys.modules)
    """
)


def test_an_embedded_run_without_a_port_counts_nothing(tmp_path: Path) -> None:
    """Nobody can read the counts of a run that serves no port: it neither counts nor loads
    prometheus_client (75 ms of start-up)."""
    manifest = tmp_path / "quiet.yaml"
    manifest.write_text(
        "name: quiet\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: a quiet scene\n  - prompt: another\n",
        encoding="utf-8",
    )
    url = f"sqlite:///{tmp_path / 'q.db'}"
    argv = [NO_PORT_RUN, url, str(tmp_path / "out"), str(manifest)]
    done = _python(*argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "False"]


def test_counting_stops_and_comes_back() -> None:
    key = ("wanbatch_worker_submits_total", (("endpoint", "fal-ai/wan-i2v"), ("outcome", "refused")))

    def refused() -> float:
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in telemetry.registry().collect()
            for s in family.samples
        }
        return samples.get(key, 0.0)

    before = refused()
    restore = telemetry.count_nothing()
    try:
        telemetry.count_submit("fal-ai/wan-i2v", "refused")
        with telemetry.fal_request("status") as call:
            call.done(object())
        assert refused() == before
    finally:
        restore()
    telemetry.count_submit("fal-ai/wan-i2v", "refused")
    assert refused() == before + 1
    # Two runs in one process, ending in either order: counting is back once both have ended.
    first, second = telemetry.count_nothing(), telemetry.count_nothing()
    first()
    telemetry.count_submit("fal-ai/wan-i2v", "refused")  # the second run still counts nothing
    assert refused() == before + 1
    second()
    second()  # restoring twice changes nothing
    telemetry.count_submit("fal-ai/wan-i2v", "refused")
    assert refused() == before + 2


def test_a_port_in_use_is_one_clear_configuration_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as caught:
            telemetry.serve_configured(Settings(metrics_port=port))
    message = str(caught.value)
    assert f"WANBATCH_METRICS_PORT={port}" in message
    assert f"127.0.0.1:{port}" in message
    assert "\n" not in message


def test_no_port_serves_nothing() -> None:
    assert telemetry.serve_configured(Settings(metrics_port=None)) is None


def test_error_types_become_bounded_safe_labels() -> None:
    assert telemetry.error_kind(RetryableProviderError("x", status_code=429)) == "http_429"
    assert telemetry.error_kind(RetryableProviderError("x", status_code=502)) == "http_5xx"
    assert telemetry.error_kind(ProviderError("x")) == "provider_error"
    assert telemetry.error_kind(ProviderError("x", error_type="runner_disconnected")) == "runner_disconnected"
    weird = telemetry.error_kind(ProviderError("x", error_type='a "quoted"\nvalue{with}=braces' + "z" * 100))
    assert len(weird) <= telemetry.MAX_LABEL_LENGTH
    assert all(ch.isalnum() or ch in "_.:-" for ch in weird)
    kinds = {telemetry.error_kind(ProviderError("x", error_type=f"invented_{i}")) for i in range(200)}
    assert "other" in kinds
    assert len(kinds) <= telemetry.MAX_ERROR_TYPES + 1


def test_fal_call_status_labels() -> None:
    class Answer:
        status_code = 503

    with telemetry.fal_request("upload initiate") as call:
        assert call.done(Answer()).status_code == 503
    assert call.status == "5xx"
    with pytest.raises(OSError, match="reset"), telemetry.fal_request("status") as failed:
        raise OSError("reset")
    assert failed.status == "error"
    names = {
        dict(s.labels).get("operation")
        for family in telemetry.registry().collect()
        for s in family.samples
        if s.name == "wanbatch_fal_request_duration_seconds_count"
    }
    assert "upload_initiate" in names


MULTIPROCESS = textwrap.dedent(
    """
    import multiprocessing, sys, httpx
    from worker import telemetry
    from jobs.settings import Settings

    stop = telemetry.serve_configured(Settings(metrics_port=int(sys.argv[1])), child_processes=True)

    def child(n):
        for _ in range(n):
            telemetry.count_submit("fal-ai/wan-22", "accepted")

    telemetry.count_submit("fal-ai/wan-22", "accepted")  # the parent counts too (its tick)
    ctx = multiprocessing.get_context("fork")  # as Celery's prefork pool does
    procs = [ctx.Process(target=child, args=(n,)) for n in (3, 4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    print(httpx.get(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).text)
    stop()
    """
)


def test_prefork_children_are_summed_by_the_parent(tmp_path: Path) -> None:
    port = unused_port()
    done = _python(MULTIPROCESS, str(port))
    assert done.returncode == 0, done.stderr
    samples = parse(done.stdout)
    key = ("wanbatch_worker_submits_total", (("endpoint", "fal-ai/wan-22"), ("outcome", "accepted")))
    assert samples[key] == 1 + 3 + 4


def test_celery_events_are_on_with_a_broker_only() -> None:
    from worker.app import make_app

    distributed = make_app("redis://127.0.0.1:6379/0")
    embedded = make_app(None)
    try:
        assert distributed.conf.worker_send_task_events is True  # Flower sees the workers' tasks
        assert distributed.conf.task_send_sent_event is True
        assert embedded.conf.worker_send_task_events is False  # no broker to publish on
        assert embedded.conf.task_send_sent_event is False
    finally:
        distributed.close()
        embedded.close()
