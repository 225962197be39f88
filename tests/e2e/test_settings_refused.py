"""Bad settings, as a user meets them: ``wanbatch`` run as a process refuses them when they load,
with one line naming the variable and what is allowed, exit 2, no traceback, nothing sent.

Before: a fal queue URL with ``?q=1`` (or ``#x``, or a path ending ``/%``) passed, then every job
failed "Application '' not found" while ``doctor`` said the provider "accepted the key";
``WANBATCH_METRICS_HOST=a..b`` ended ``run`` in an internal error (exit 70);
``WANBATCH_OUTPUT_STAGING_DIR=s3://bkt/x`` made a local folder ``./s3:/bkt/x``; a FIFO as the
output folder was "File exists", and a file given to ``export --format hf -o`` was "not an
empty folder".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import FAL_KEY, MakeManifest, assert_one_line, wanbatch
from tests.ports import unused_port

SMALL = """name: refused-settings
endpoint: fal-ai/wan-22
items:
  - prompt: one
  - prompt: two
"""


@pytest.mark.parametrize("variable", ["WANBATCH_FAL_QUEUE_URL", "WANBATCH_FAL_REST_URL"])
@pytest.mark.parametrize(
    ("tail", "phrase"),
    [("?q=1", "has a query"), ("#x", "has a fragment"), ("/%", "invalid percent escape")],
)
def test_a_fal_url_that_would_lose_every_path_sends_nothing(
    variable: str, tail: str, phrase: str, sim: SimulatorHandle, manifest: MakeManifest, e2e_env: Path
) -> None:
    path = manifest("refused-settings", SMALL)
    done = wanbatch("run", path, "--no-progress", env={variable: sim.url + tail})
    assert_one_line(done, f"invalid configuration: {variable}: ", phrase)
    assert sim.ledger()["accepted"] == 0
    assert not (e2e_env.parent / "wanbatch.db").exists()  # nothing stored either


def test_a_fal_url_on_port_0_is_refused_not_waited_on(manifest: MakeManifest) -> None:
    path = manifest("refused-settings", SMALL)
    done = wanbatch(
        "run", path, "--no-progress", env={"WANBATCH_FAL_QUEUE_URL": "http://127.0.0.1:0", "FAL_KEY": FAL_KEY}
    )
    assert_one_line(done, "WANBATCH_FAL_QUEUE_URL: has port 0", "1 to 65535")


def test_doctor_says_when_the_queue_url_names_no_application(sim: SimulatorHandle) -> None:
    """A path before the app's: the stand-in (as fal) answers "Application '…' not found", which
    is no "request not found" — the key was not shown to be accepted."""
    done = wanbatch("doctor", "--json", env={"WANBATCH_FAL_QUEUE_URL": f"{sim.url}/proxy/v1"})
    assert done.returncode == 1, done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    provider = checks["provider"]
    assert provider["status"] == "fail", provider
    assert "application it was asked about is not found" in provider["detail"]
    assert "accepted the key" not in provider["detail"]
    assert "WANBATCH_FAL_QUEUE_URL" in provider["fix"]
    assert FAL_KEY not in done.stdout + done.stderr

    right = wanbatch("doctor", "--json")  # the simulator's own URL: a made-up request is not found
    provider = {c["name"]: c for c in json.loads(right.stdout)["checks"]}["provider"]
    assert provider["status"] == "ok", provider


@pytest.mark.parametrize(("host", "phrase"), [("a..b", "empty label"), ("a" * 64 + ".example", "over 63")])
def test_a_metrics_host_the_resolver_refuses_is_a_setting_error(
    host: str, phrase: str, manifest: MakeManifest
) -> None:
    path = manifest("refused-settings", SMALL)
    env = {"WANBATCH_METRICS_HOST": host, "WANBATCH_METRICS_PORT": str(unused_port())}
    done = wanbatch("run", path, "--simulate", "--no-progress", env=env)
    assert_one_line(done, "invalid configuration: WANBATCH_METRICS_HOST: ", phrase, "0.0.0.0")
    assert "internal error" not in done.stderr

    doctor = wanbatch("doctor", "--simulate", "--json", env=env)
    assert doctor.returncode == 1
    configuration = json.loads(doctor.stdout)["checks"][0]
    assert configuration["status"] == "fail"
    assert "WANBATCH_METRICS_HOST" in configuration["detail"]


def test_a_metrics_host_that_does_not_resolve_is_named(manifest: MakeManifest) -> None:
    """Not "WANBATCH_METRICS_PORT=…: choose another port": the port was never the trouble."""
    path = manifest("refused-settings", SMALL)
    env = {"WANBATCH_METRICS_HOST": "no-such-host.invalid", "WANBATCH_METRICS_PORT": str(unused_port())}
    done = wanbatch("run", path, "--simulate", "--no-progress", env=env)
    line = assert_one_line(done, "WANBATCH_METRICS_HOST=no-such-host.invalid", "does not resolve")
    assert "WANBATCH_METRICS_PORT" not in line


@pytest.mark.parametrize(
    ("staging", "phrase"), [("s3://bkt/x", "is a URL"), (" ", "is blank")], ids=["s3", "blank"]
)
def test_the_staging_folder_is_refused_under_its_own_name(
    staging: str, phrase: str, manifest: MakeManifest, e2e_env: Path
) -> None:
    path = manifest("refused-settings", SMALL)
    env = {"WANBATCH_OUTPUT_DIR": "s3://bkt/p", "WANBATCH_OUTPUT_STAGING_DIR": staging}
    done = wanbatch("run", path, "--simulate", "--no-progress", env=env)
    assert_one_line(done, "invalid configuration: WANBATCH_OUTPUT_STAGING_DIR: ", phrase)
    assert not (e2e_env / "s3:").exists()


@pytest.mark.parametrize("variable", ["WANBATCH_OUTPUT_DIR", "WANBATCH_OUTPUT_STAGING_DIR"])
def test_a_named_pipe_as_the_output_folder_is_called_one(
    variable: str, manifest: MakeManifest, e2e_env: Path
) -> None:
    path = manifest("refused-settings", SMALL)
    fifo = e2e_env / "pipe"
    os.mkfifo(fifo)
    env = {variable: str(fifo)}
    if variable == "WANBATCH_OUTPUT_STAGING_DIR":  # staging is where S3 outputs wait: no S3 is reached
        env["WANBATCH_OUTPUT_DIR"] = "s3://bkt/p"
        doctor = wanbatch("doctor", "--simulate", "--json", env=env)
        storage = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}["output storage"]
        assert "it is a named pipe (FIFO), not a folder" in storage["detail"], storage
        return
    done = wanbatch("run", path, "--simulate", "--no-progress", env=env)
    assert_one_line(done, variable, "it is a named pipe (FIFO), not a folder")
    assert "File exists" not in done.stderr


def test_an_hf_export_onto_a_file_says_it_is_a_file(manifest: MakeManifest, e2e_env: Path) -> None:
    path = manifest("refused-settings", SMALL)
    assert wanbatch("run", path, "--simulate", "--no-progress").returncode == 0
    taken = e2e_env / "dataset"
    taken.write_text("mine\n")
    done = wanbatch("export", "refused-settings", "--format", "hf", "-o", taken)
    line = assert_one_line(done, "is a file, not a folder")
    assert "not an empty folder" not in line
    assert taken.read_text() == "mine\n"
