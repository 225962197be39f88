"""FAL_KEY pasted into another setting is refused in one line, and never printed or stored.

The key belongs in FAL_KEY only: wanbatch sends it as an ``Authorization`` header. Written into
a URL (the queue's query, path, fragment or password, a gateway's path, the webhook receiver's
path, the limiter's Redis URL) or a folder, it was printed by ``doctor`` ("… accepted the key"),
by ``run``'s one-line errors (masked only by a parameter's name, never by the key's value), and
stored in the database with every request's status, result and cancel URLs. Now every command
refuses such a setting before it does anything, naming the variable and never its value.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from falsim.server import SimulatorHandle
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import FAST_ENV, MakeManifest, Wb, assert_one_line, subprocess_env, wanbatch
from tests.e2e.test_hostile_submit import _all_text_in_database
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.ports import unused_port

KEY_ID = "5f0c1d9a-7e2b-4c3d-8a9b-0c1d2e3f4a5b"
SECRET = "4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b"
KEY = f"{KEY_ID}:{SECRET}"
#: The words the refusal says, whatever the setting.
REFUSAL = "contains FAL_KEY: the key belongs in FAL_KEY only"

ONE_JOB = """\
name: k
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
items:
  - prompt: a key in the wrong place
    image_url: https://images.example/cat.png
"""


def _variants(port: int) -> list[tuple[str, str]]:
    """(variable, value holding the key or its secret half) as the audit found them, and more."""
    base = f"http://127.0.0.1:{port}"
    return [
        ("WANBATCH_FAL_QUEUE_URL", f"{base}/?k={KEY}"),
        ("WANBATCH_FAL_QUEUE_URL", f"{base}/{KEY}"),
        ("WANBATCH_FAL_QUEUE_URL", f"{base}/#{KEY}"),
        ("WANBATCH_FAL_QUEUE_URL", f"http://user:{KEY}@127.0.0.1:{port}"),
        ("WANBATCH_FAL_QUEUE_URL", f"{base}/gw/{quote(KEY, safe='')}"),  # percent-encoded
        ("WANBATCH_FAL_QUEUE_URL", f"{base}/gw/{KEY_ID}%3a{SECRET}"),  # encoded, lower case
        ("WANBATCH_FAL_QUEUE_URL", f"{base}/?k={SECRET}"),  # the secret half is the secret
        ("WANBATCH_FAL_REST_URL", f"{base}/?token={KEY}"),
        ("WANBATCH_WEBHOOK_URL", f"{base}/webhooks/fal/{KEY}"),
        ("WANBATCH_LIMITS_URL", f"redis://127.0.0.1:1/0?x={KEY}"),
        ("WANBATCH_OUTPUT_DIR", f"outputs/{KEY}"),  # relative: under the test's own folder
    ]


VARIANTS = _variants(1)


def _no_key_in(said: str) -> None:
    assert KEY not in said, said
    assert SECRET not in said, said
    assert quote(KEY, safe="") not in said, said


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FAL_KEY", KEY)
    get_settings.cache_clear()
    return KEY


@pytest.mark.parametrize(("setting", "value"), VARIANTS, ids=[f"{s}={v}" for s, v in VARIANTS])
def test_doctor_fails_the_configuration_check_and_prints_no_key(
    setting: str, value: str, key: str, wb: Wb, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(setting, value)
    for args in (["doctor", "--json"], ["doctor"]):
        run = wb(*args)
        _no_key_in(run.stdout + run.stderr)
        assert run.code == 1, run.stdout + run.stderr
        assert "Traceback" not in run.stdout + run.stderr
    checks = {c["name"]: c for c in wb("doctor", "--json").json()["checks"]}
    assert checks["configuration"]["status"] == "fail"
    assert f"{setting} {REFUSAL}" in checks["configuration"]["detail"]
    assert {c["status"] for name, c in checks.items() if name != "configuration"} == {"skip"}


@pytest.mark.parametrize(("setting", "value"), VARIANTS, ids=[f"{s}={v}" for s, v in VARIANTS])
def test_every_command_refuses_it_in_one_line(
    setting: str, value: str, key: str, wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(setting, value)
    path = manifest("k", ONE_JOB)
    for args in (["run", str(path), "--no-progress"], ["validate", str(path)], ["status"]):
        run = wb(*args)
        _no_key_in(run.stdout + run.stderr)
        assert run.code == 2, run.stdout + run.stderr
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, run.stderr
        assert f"{setting} {REFUSAL}" in lines[0]


def test_the_limiter_s_url_is_no_longer_printed_with_the_key(
    sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    """The audit's line, from the console script: ``error: cannot reach the submit-rate
    limiter's Redis at redis://127.0.0.1:1/0?x=<the key>``."""
    env = subprocess_env(sim.url, LIMITS_URL=f"redis://127.0.0.1:1/0?x={KEY}")
    env["FAL_KEY"] = KEY
    done = wanbatch("run", manifest("k", ONE_JOB), "--no-progress", env=env)
    _no_key_in(done.stdout + done.stderr)
    line = assert_one_line(done, f"WANBATCH_LIMITS_URL {REFUSAL}", code=2)
    assert line.startswith("error: ")


@pytest.mark.parametrize("where", ["userinfo", "gateway path"])
def test_the_database_never_holds_the_key(
    where: str, key: str, wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A queue URL with the key as its password or in a gateway's path was stored in every
    job's status, response and cancel URLs (derived from the queue URL: fal's answer named none)."""
    with HostileProvider() as provider:
        fal = FakeFal(provider, endpoint="fal-ai/wan-i2v")
        provider.route("POST", r"/gw/[^/]+/fal-ai/wan-i2v", fal._submit)  # the gateway passes it on
        host = provider.url.split("://", 1)[1]
        queue = f"http://user:{KEY}@{host}" if where == "userinfo" else f"{provider.url}/gw/{KEY}"
        monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", queue)
        monkeypatch.setenv("WANBATCH_FAL_REST_URL", provider.url)
        for name, value in FAST_ENV.items():
            monkeypatch.setenv(name, value)
        run = wb("run", manifest("k", ONE_JOB), "--json", "--no-progress")
        stored = _all_text_in_database(f"sqlite:///{tmp_path / 'wanbatch.db'}")
        assert KEY not in stored
        assert SECRET not in stored
        _no_key_in(run.stdout + run.stderr)
        assert run.code == 2, run.stdout + run.stderr
        assert provider.requests == []  # refused before anything was sent


@pytest.mark.parametrize("short", ["k3y", "a:b", "1234567"])
def test_a_short_key_is_not_found_in_every_setting(
    short: str, wb: Wb, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A key under 8 characters is too short to tell apart from ordinary text: a folder named
    ``k3y-outputs`` or a port ``1234567…`` does not "contain the key"."""
    monkeypatch.setenv("FAL_KEY", short)
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / f"{short.replace(':', '-')}-outputs"))
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", f"http://127.0.0.1:{unused_port()}/{short}")
    run = wb("status")
    assert run.code == 0, run.stdout + run.stderr


def test_a_key_elsewhere_in_the_environment_is_not_a_setting(
    key: str, wb: Wb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only wanbatch's own settings are checked: FAL_KEY itself, or a variable wanbatch does not
    read, holding the key is fine."""
    monkeypatch.setenv("SOME_OTHER_TOOL_KEY", KEY)
    run = wb("status")
    assert run.code == 0, run.stdout + run.stderr
