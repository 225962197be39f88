"""The proxy and certificate variables httpx reads (``HTTP(S)_PROXY``, ``ALL_PROXY``,
``SSL_CERT_FILE``, ``SSL_CERT_DIR``), as a user meets them: ``wanbatch`` run as a process.

Before: a value httpx cannot use (an ``ftp://`` proxy, a SOCKS proxy without ``socksio``, a
certificate file that is missing or holds no certificate) ended every ``run`` in "internal error
… please report it" (exit 70; "the fal simulator did not start" with ``--simulate``), and
``doctor`` said "the check itself failed: ImportError…". And ``run --simulate`` sent its
requests to its own simulator on 127.0.0.1 through ``HTTP_PROXY``: behind a proxy (and no
``NO_PROXY``) every simulated job failed ``http_502``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import FAL_KEY, WANBATCH, MakeManifest, assert_one_line
from tests.loopback_proxy import BAD_GATEWAY, loopback_proxy
from tests.ports import unused_port

SMALL = """name: proxy-env
endpoint: fal-ai/wan-22
items:
  - prompt: one
  - prompt: two
"""

#: Every variable httpx reads for proxies and certificates, in both cases.
_HTTPX_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssl_cert_file", "ssl_cert_dir")


def run_with(
    *args: str | Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``wanbatch ARGS`` with the test's environment, none of the machine's own proxy and
    certificate variables (any case), and ``env`` on top."""
    base = {k: v for k, v in os.environ.items() if k.lower() not in _HTTPX_VARIABLES}
    return subprocess.run(
        [WANBATCH, *map(str, args)],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _not_a_certificate(folder: Path) -> str:
    path = folder / "not-a-cert.pem"
    path.write_text("just some text\n")
    return str(path)


#: (variables, the variable named, a phrase of what is allowed): proxy variables httpx refuses.
PROXIES = [
    pytest.param({"HTTPS_PROXY": "ftp://x:1"}, "HTTPS_PROXY", "http://proxy.example:3128", id="ftp-proxy"),
    pytest.param({"all_proxy": "socks4://x:1"}, "all_proxy", "socks5://", id="socks4-proxy"),
    pytest.param(
        {"HTTP_PROXY": "http://user:pw-s3cret@proxy:31z8"},
        "HTTP_PROXY",
        "its port is not a number",
        id="bad-port",
    ),
    pytest.param(
        {"NO_PROXY": "localhost,127.0.0.1,10.96.0.0/12,fd00::/8"},
        "NO_PROXY",
        "its entry 'fd00::/8' is not a host httpx can read",
        id="no-proxy-ipv6-network",
    ),
]
#: Certificate files httpx cannot load: every client's construction fails.
CERT_FILES = [
    pytest.param({"SSL_CERT_FILE": "/nonexistent.pem"}, "SSL_CERT_FILE", "does not exist", id="no-cert-file"),
    pytest.param(
        {"SSL_CERT_FILE": "NOT-A-CERT"}, "SSL_CERT_FILE", "holds no PEM certificate", id="not-a-cert"
    ),
]
#: A certificate folder OpenSSL verifies no HTTPS server with (httpx builds its clients with it).
CERT_DIR = pytest.param(
    {"SSL_CERT_DIR": "/nonexistent-certs"}, "SSL_CERT_DIR", "is no folder", id="no-cert-dir"
)
#: fal beyond loopback, over HTTPS: what the proxy variables and SSL_CERT_DIR are refused for.
#: Never reached: the variables are refused before anything is sent.
REAL_FAL = {"WANBATCH_FAL_QUEUE_URL": "https://queue.fal.run", "WANBATCH_FAL_REST_URL": "https://rest.fal.ai"}


@pytest.mark.parametrize(("variables", "named", "allowed"), CERT_FILES)
def test_a_simulated_run_refuses_a_certificate_file_httpx_cannot_load(
    variables: dict[str, str], named: str, allowed: str, manifest: MakeManifest, e2e_env: Path
) -> None:
    path = manifest("proxy-env", SMALL)
    env = {k: _not_a_certificate(e2e_env) if v == "NOT-A-CERT" else v for k, v in variables.items()}
    done = run_with("run", path, "--simulate", "--no-progress", env=env)
    line = assert_one_line(done, f"invalid configuration: {named}: ", allowed)
    assert "internal error" not in line
    assert not (e2e_env.parent / "wanbatch.db").exists()  # nothing stored
    assert not (e2e_env.parent / "outputs").exists()


@pytest.mark.parametrize(("variables", "named", "allowed"), [*PROXIES, CERT_DIR])
def test_a_simulated_run_reaches_no_proxy_and_no_https_so_is_never_refused_over_them(
    variables: dict[str, str], named: str, allowed: str, manifest: MakeManifest
) -> None:
    """Its simulator is on loopback, over plain HTTP: no proxy carries a request there (its
    clients read no proxy variable), and no certificate is verified. An ``SSL_CERT_DIR`` in
    which OpenSSL finds no certificate (httpx builds its clients with it all the same) is a
    warning line; a proxy variable, nothing. Both made it exit 2."""
    path = manifest("proxy-env", SMALL)
    done = run_with("run", path, "--simulate", "--no-progress", env=variables)
    assert done.returncode == 0, done.stderr
    assert "invalid configuration" not in done.stderr
    assert "pw-s3cret" not in done.stdout + done.stderr
    warned = [line for line in done.stderr.splitlines() if line.startswith(f"warning: {named}: ")]
    if named == "SSL_CERT_DIR":
        assert len(warned) == 1, done.stderr
        assert allowed in warned[0]
        assert "verifies no HTTPS server" in warned[0]
    else:
        assert warned == [], done.stderr
    doctor = run_with("doctor", "--simulate", "--json", env=variables)  # judges as run --simulate
    configuration = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}["configuration"]
    assert configuration["status"] == "ok", configuration
    assert ("warning: SSL_CERT_DIR" in configuration["detail"]) is (named == "SSL_CERT_DIR")


def test_a_run_against_a_simulator_on_loopback_is_never_refused_over_a_proxy_variable(
    sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """``WANBATCH_FAL_QUEUE_URL=http://127.0.0.1:…`` (``wanbatch simulator``): no proxy carries a
    request there."""
    path = manifest("proxy-env", SMALL)
    env = {"HTTPS_PROXY": "ftp://x:1", "HTTP_PROXY": "ftp://x:1", "ALL_PROXY": "socks4://x:1"}
    done = run_with("run", path, "--no-progress", env=env)
    assert done.returncode == 0, done.stderr
    assert sim.ledger()["accepted"] == 2
    doctor = run_with("doctor", "--json", env=env)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["configuration"]["status"] == "ok", checks["configuration"]
    assert "the check itself failed" not in doctor.stdout
    assert "invalid configuration" not in doctor.stdout


def test_a_run_of_a_batch_with_nothing_left_for_fal_is_never_refused_over_a_proxy_variable(
    sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """``run NAME`` of a batch whose jobs have all ended sends fal nothing: it reports the batch,
    whatever the proxy variables say (it was refused, exit 2)."""
    path = manifest("proxy-env", SMALL)
    first = run_with("run", path, "--no-progress", env={})
    assert first.returncode == 0, first.stderr
    done = run_with("run", "proxy-env", "--no-progress", env={**REAL_FAL, "HTTPS_PROXY": "ftp://x:1"})
    assert done.returncode == 0, done.stderr
    assert "invalid configuration" not in done.stderr
    assert sim.ledger()["accepted"] == 2  # nothing more


@pytest.mark.parametrize(
    ("variables", "named", "allowed", "remote"),
    [
        *[pytest.param(*p.values, True, id=p.id) for p in PROXIES[:1]],
        *[pytest.param(*p.values, False, id=p.id) for p in CERT_FILES],
        pytest.param(*CERT_DIR.values, True, id=CERT_DIR.id),
    ],
)
def test_a_run_sends_nothing_to_fal_and_doctor_names_the_variable(
    variables: dict[str, str],
    named: str,
    allowed: str,
    remote: bool,
    sim: SimulatorHandle,
    manifest: MakeManifest,
    e2e_env: Path,
) -> None:
    """A proxy variable, and an ``SSL_CERT_DIR`` OpenSSL verifies nothing with, are refused for
    fal beyond loopback over HTTPS (``remote``); a certificate file httpx cannot load, for any."""
    path = manifest("proxy-env", SMALL)
    env = {k: _not_a_certificate(e2e_env) if v == "NOT-A-CERT" else v for k, v in variables.items()}
    env |= REAL_FAL if remote else {}
    done = run_with("run", path, "--no-progress", env=env)
    assert_one_line(done, f"invalid configuration: {named}: ", allowed)
    assert sim.ledger()["accepted"] == 0

    doctor = run_with("doctor", "--json", env=env)
    assert doctor.returncode == 1, doctor.stderr
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["configuration"]["status"] == "fail"
    assert named in checks["configuration"]["detail"]
    assert "the check itself failed" not in doctor.stdout

    if not named.startswith("SSL_CERT"):  # the simulator only warns of those (test_simulator_tls)
        simulator = run_with("simulator", "--port", str(unused_port()), env=env, timeout=60)
        assert_one_line(simulator, f"invalid configuration: {named}: ")


def test_a_simulated_run_never_goes_through_the_http_proxy(manifest: MakeManifest, e2e_env: Path) -> None:
    """Its simulator is on this machine's loopback, which a proxy elsewhere cannot reach."""
    path = manifest("proxy-env", SMALL)
    with loopback_proxy(BAD_GATEWAY) as proxy:
        env = {"HTTP_PROXY": proxy.url, "http_proxy": proxy.url, "ALL_PROXY": proxy.url}
        done = run_with("run", path, "--simulate", "--no-progress", env=env)
    assert done.returncode == 0, done.stderr
    assert proxy.requests == []


def test_a_loopback_fal_url_is_reached_directly_and_its_key_never_reaches_the_proxy(
    sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    path = manifest("proxy-env", SMALL)
    with loopback_proxy(BAD_GATEWAY) as proxy:
        done = run_with("run", path, "--no-progress", env={"HTTP_PROXY": proxy.url})
    assert done.returncode == 0, done.stderr
    assert sim.ledger()["accepted"] == 2
    assert proxy.requests == []
    assert FAL_KEY not in proxy.text()


def test_a_socks_proxy_is_taken(manifest: MakeManifest) -> None:
    """``httpx[socks]`` is a dependency: ``ALL_PROXY=socks5://…`` is a proxy fal's API goes
    through (the simulator on loopback, directly), not an ImportError."""
    path = manifest("proxy-env", SMALL)
    env = {"ALL_PROXY": f"socks5://127.0.0.1:{unused_port()}"}
    done = run_with("run", path, "--simulate", "--no-progress", env=env)
    assert done.returncode == 0, done.stderr


def test_a_certificate_file_openssl_refuses_is_named_where_the_client_is_built(
    manifest: MakeManifest, e2e_env: Path
) -> None:
    """A certificate-looking block that is no certificate passes the settings' look at the file
    (parsing the system bundle at every start would cost 0.15 s): httpx's ``ssl.SSLError`` when
    the first client is built is still one line naming the variable, exit 2, nothing sent."""
    path = manifest("proxy-env", SMALL)
    pem = e2e_env / "broken.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    done = run_with("run", path, "--simulate", "--no-progress", env={"SSL_CERT_FILE": str(pem)})
    assert_one_line(done, "invalid configuration: SSL_CERT_FILE: OpenSSL cannot load", str(pem))


@pytest.mark.parametrize(
    "variables",
    [
        pytest.param({"all_proxy": "socks://127.0.0.1:1080/"}, id="gnome-socks"),  # GNOME's own
        pytest.param(
            {"HTTPS_PROXY": "ftp://x:1", "ALL_PROXY": "socks4://x:1", "NO_PROXY": "*"}, id="no-proxy-star"
        ),
    ],
)
def test_commands_that_send_nothing_never_look_at_the_proxy_variables(
    variables: dict[str, str], manifest: MakeManifest
) -> None:
    """``status``, ``validate`` and ``estimate`` build no HTTP client: a proxy variable meant
    for other programs is none of their business (it made them exit 2). Nor is it
    ``run --simulate``'s (its simulator is on loopback). Under ``NO_PROXY=*`` httpx uses no proxy
    at all; without it, a ``run`` to fal refuses GNOME's ``socks://``, which httpx cannot use."""
    path = manifest("proxy-env", SMALL)
    for args in (("status",), ("validate", path), ("estimate", path)):
        done = run_with(*args, env=variables)
        assert done.returncode == 0, (args, done.stderr)
    run = run_with("run", path, "--simulate", "--no-progress", env=variables)
    assert run.returncode == 0, run.stderr
    if "NO_PROXY" not in variables:  # (with it, a run would call fal: not from a test)
        to_fal = run_with("run", path, "--no-progress", env={**variables, **REAL_FAL, "FAL_KEY": FAL_KEY})
        assert_one_line(to_fal, "invalid configuration: all_proxy: its scheme 'socks'")
