"""docker-compose.yml's `serve` service (issue #14): the web app, wired and really serving.

The schema checks of tests/unit/test_compose.py cover the file as a whole (and `serve` runs the
one image, as every wanbatch role does); this checks what a schema cannot see: the command parses,
the port is published on the host's loopback only, the app gets the database but no fal key,
and the service's own command answers its own healthcheck. And the image has the code it runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.ports import unused_port
from tests.test_architecture import product_packages
from tests.unit.test_compose import COMPOSE_FILE, DOCKERFILE, _command, _env, _services, interpolate


def _compose() -> dict[str, Any]:
    doc = interpolate(yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8")), {})
    assert isinstance(doc, dict)
    return doc


def test_serve_runs_the_web_app_on_all_interfaces_of_its_container() -> None:
    from cli import cli

    services = _services(_compose())
    serve = services["serve"]
    args = _command(serve)
    assert args[:2] == ["wanbatch", "serve"]
    command = cli.get_command(cli.make_context("wanbatch", args[1:], resilient_parsing=True), args[1])
    assert command is not None
    params = command.make_context(args[1], list(args[2:])).params
    assert (params["host"], params["port"]) == ("0.0.0.0", 8788)
    (published,) = serve["ports"]
    assert published == "127.0.0.1:8788:8788"  # the host's loopback only, by default
    assert serve["restart"] == "unless-stopped"
    assert serve["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    env = _env(serve)
    assert env["WANBATCH_DATABASE_URL"] == _env(services["worker"])["WANBATCH_DATABASE_URL"]
    assert env["WANBATCH_OUTPUT_DIR"] == "/outputs"
    assert "FAL_KEY" not in env  # the receiver needs no key
    assert env["WANBATCH_SERVE_TOKEN"] == ""  # only from the host's environment or .env
    assert "WANBATCH_SERVE_FORWARDED_ALLOW_IPS" in env  # its proxy is never 127.0.0.1 here
    assert env["WANBATCH_SERVE_FORWARDED_ALLOW_IPS"] is None  # only from the host's environment
    assert any(str(v).endswith(":/outputs") for v in serve["volumes"])  # previews play the videos


def test_serve_published_address_is_a_compose_knob() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    serve = _services(interpolate(raw, {"HOST_SERVE_ADDRESS": "0.0.0.0:9000"}))["serve"]
    assert serve["ports"] == ["0.0.0.0:9000:8788"]


def test_serve_command_answers_its_healthcheck(tmp_path: Path) -> None:
    serve = _services(_compose())["serve"]
    port = unused_port()
    args = [str(port) if a == "8788" else ("127.0.0.1" if a == "0.0.0.0" else a) for a in _command(serve)[2:]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_") and k != "FAL_KEY"}
    env.update(WANBATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'serve.db'}", WANBATCH_OUTPUT_DIR=str(tmp_path))
    launcher = "from cli import main; import sys; sys.argv[0] = 'wanbatch'; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, "serve", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    health = serve["healthcheck"]["test"]
    assert health[:2] == ["CMD", "python"]
    probe = [sys.executable, *(part.replace("127.0.0.1:8788", f"127.0.0.1:{port}") for part in health[2:])]
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "serve did not answer its healthcheck"
            time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_image_has_every_product_package() -> None:
    copied = DOCKERFILE.read_text(encoding="utf-8")
    for package in product_packages():
        assert re.search(rf"^COPY {package} /tmp/src/{package}$", copied, re.MULTILINE), package
