"""``export --json``: one JSON object on stdout about the export, as every reporting command has
(CONTRACT: "Every command that reports something accepts ``--json``"; audit s25, finding 9).

The records need stdout unless ``-o`` names a file or folder, so ``--json`` without ``-o`` is a
usage error (exit 2), said as JSON like any other error under ``--json`` — never records and an
object mixed on one stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import TWO_JOBS, MakeManifest, Wb, export_jsonl

WANBATCH = str(Path(sys.executable).with_name("wanbatch"))


def _ran(wb: Wb, manifest: MakeManifest, name: str) -> dict[str, Any]:
    run = wb("run", manifest(name, TWO_JOBS.format(name=name)), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    report: dict[str, Any] = run.json()
    return report


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_export_to_a_file_reports_one_json_object(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path, fmt: str
) -> None:
    report = _ran(wb, manifest, f"json-{fmt}")
    target = tmp_path / f"ds.{fmt}"
    done = wb("export", report["name"], "--format", fmt, "-o", target, "--json")
    assert done.code == 0, done.stderr
    assert done.json() == {
        "ok": True,
        "batch": report["batch"],
        "name": f"json-{fmt}",
        "simulated": False,
        "format": fmt,
        "path": str(target),
        "records": 2,
        "bytes": target.stat().st_size,
        "warnings": [],
    }
    assert done.stderr == ""  # the object says it all; no "exported …" line beside it


def test_hf_export_reports_the_videos_and_the_exact_cost(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    report = _ran(wb, manifest, "json-hf")
    folder = tmp_path / "hf"
    done = wb("export", report["batch"], "--format", "hf", "-o", folder, "--json")
    assert done.code == 0, done.stderr
    summary = done.json()
    cost = wb("cost", report["batch"], "--json").json()["total"]
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert summary["ok"] is True
    assert summary["batch"] == report["batch"]
    assert (summary["format"], summary["path"], summary["include_failed"]) == ("hf", str(folder), False)
    assert (summary["records"], summary["videos"]) == (2, 2)
    assert summary["hard_linked"] + summary["copied"] == 2
    assert summary["by_status"] == {"succeeded": 2}
    assert summary["cost_usd"] == cost["actual_usd"]
    assert summary["billing_units_by_unit"] == cost["actual_units_by_unit"]
    assert summary["manifest"] == "manifest.yaml"
    assert summary["bytes"] == sum(p.stat().st_size for p in files)
    assert len(export_jsonl(wb, report["batch"])) == 2


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_json_without_an_output_is_a_usage_error_in_json(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, fmt: str
) -> None:
    report = _ran(wb, manifest, f"json-stdout-{fmt}")
    done = wb("export", report["batch"], "--format", fmt, "--json")
    assert done.code == 2
    assert done.json() == {
        "ok": False,
        "error": "--json needs -o FILE: without it the records themselves go to standard output",
    }


def test_an_unknown_batch_under_json_is_a_json_error_and_no_file(wb: Wb, tmp_path: Path) -> None:
    target = tmp_path / "ds.jsonl"
    done = wb("export", "no-such-batch", "-o", target, "--json")
    assert done.code == 2
    error = done.json()
    assert error["ok"] is False
    assert error["error"].startswith("no batch 'no-such-batch'")
    assert not target.exists()


def test_json_refuses_an_output_that_is_standard_output(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """``-o /dev/stdout --json`` would print the object into the records (or these into it)."""
    report = _ran(wb, manifest, "json-dev-stdout")
    done = subprocess.run(
        [WANBATCH, "export", report["batch"], "-o", "/dev/stdout", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=dict(os.environ),
    )
    assert done.returncode == 2, done.stderr
    assert json.loads(done.stdout) == {
        "ok": False,
        "error": "--json prints to standard output: -o '/dev/stdout' must be another file",
    }


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_records_on_standard_output_are_utf8_whatever_the_locale(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, fmt: str
) -> None:
    """With ``-o`` an export is UTF-8; on standard output it was the locale's encoding, and an
    ASCII locale made a non-ASCII prompt an internal error (exit 70), the records half written
    (audit s31)."""
    name = "stdout-utf8"
    text = TWO_JOBS.format(name=name).replace("Night falls over the hills", "Nuit d'été, 夜")
    run = wb("run", manifest(name, text), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    done = subprocess.run(
        [WANBATCH, "export", name, "--format", fmt],
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONIOENCODING": "ascii", "LC_ALL": "C"},
    )
    assert done.returncode == 0, done.stderr.decode()
    assert "Nuit d'été, 夜" in done.stdout.decode("utf-8")
