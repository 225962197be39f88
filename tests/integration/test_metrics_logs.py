"""``wanbatch run`` with ``WANBATCH_LOG_FORMAT=json``, as a user runs it: a real process against
the simulator, whose faults make the run log warnings. stderr is JSON lines only (each with an
``event``, the job's ids where a line is about a job), stdout the one ``--json`` object, and
the key appears in neither.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from falsim import SimulatorOptions, running_simulator

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"
KEY = "b-runlog-key-3d9e5b1f:8c2a7f4e0b6d"


def test_run_writes_json_lines_with_job_ids_and_never_the_key(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "images", tmp_path / "images")
    items = "".join(f"  - prompt: logged scene {i}\n" for i in range(4))
    manifest = tmp_path / "logged.yaml"
    manifest.write_text(
        f"name: logged\nendpoint: fal-ai/wan-22\ndefaults:\n  resolution: 480p\nitems:\n{items}",
        encoding="utf-8",
    )
    options = SimulatorOptions(latency_seconds=0.05, latency_jitter=0.0, concurrency_limit=10, rng_seed=5)
    with running_simulator(options) as sim:
        sim.set_faults(bad_render={"next": 2})  # two videos that do not match: warnings
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_") and k != "FAL_KEY"}
        env.update(
            FAL_KEY=KEY,
            WANBATCH_LOG_FORMAT="json",
            WANBATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'wanbatch.db'}",
            WANBATCH_OUTPUT_DIR=str(tmp_path / "outputs"),
            WANBATCH_FAL_QUEUE_URL=sim.url,
            WANBATCH_FAL_REST_URL=sim.url,
            WANBATCH_POLL_MIN_INTERVAL="0.05",
            WANBATCH_TICK_INTERVAL="0.05",
        )
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "from cli import main; main()",
                "run",
                str(manifest),
                "--json",
                "--no-progress",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # stdout: exactly the one --json object
    assert report["counts"]["succeeded"] == 4
    records = [json.loads(line) for line in done.stderr.splitlines()]  # stderr: JSON lines only
    assert records, "the faults should have made the run log something"
    for record in records:
        assert isinstance(record, dict)
        assert record["event"]
        assert record["level"] in ("warning", "error", "critical")
    mismatches = [r for r in records if r["event"] == "download.media_mismatch"]
    assert len(mismatches) == 2
    for record in mismatches:
        assert record["batch_id"] == report["batch"]
        assert record["job_id"]
        assert record["request_id"]
    assert KEY not in done.stdout + done.stderr
    assert KEY.split(":")[1] not in done.stdout + done.stderr
