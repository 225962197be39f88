"""``wanbatch simulator --tls``: fal's own client and wanbatch, each set up by the lines it prints.

Before: the standalone simulator served plain http only, and ``fal_client`` speaks only
``https://`` to the host it reads from ``FAL_QUEUE_RUN_HOST`` at import, so fal's documented
route against ``wanbatch simulator`` failed with ``ConnectError [SSL: WRONG_VERSION_NUMBER]``;
only the in-process ``running_simulator(tls=True)`` of the conformance tests (which patch
fal_client's module constants) served it.

Here the simulator is a real process (``wanbatch simulator --tls --port 0``); the test reads
the ``export`` lines it prints and runs, with exactly those settings, fal_client in a fresh
interpreter (it reads its host at import) and ``wanbatch run``. The certificate's folder is
gone once the simulator has stopped, by Ctrl-C, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.e2e.e2e_helpers import (
    Background,
    assert_one_line,
    subprocess_env,
    wait_for,
    wanbatch,
    wanbatch_command,
)
from tests.loopback_proxy import BAD_GATEWAY, loopback_proxy
from tests.sample_inputs import INPUTS

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

#: The variables that decide where fal_client and httpx go and what they trust: none may come
#: from the test's own environment, only from the simulator's printed lines.
_ROUTING = ("FAL_", "SSL_CERT_", "WANBATCH_", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_ROUTING)} | {"PYTHONUNBUFFERED": "1"}


def _exported(line: str) -> dict[str, str]:
    """The variables of one printed ``  export A=1 B=2`` line, as a POSIX shell reads them."""
    words = shlex.split(line)
    assert words[0] == "export", line
    return dict(word.split("=", 1) for word in words[1:])


class _Simulator:
    """``wanbatch simulator --tls`` on a free port, and what its start-up lines say."""

    def __init__(self, cwd: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        env = _clean_env() | {"WANBATCH_DATABASE_URL": f"sqlite:///{cwd / 'unused.db'}"} | (env or {})
        argv = ["simulator", "--tls", "--port", "0", "--latency", "0.05", "--concurrency-limit", "10", *extra]
        self.proc = Background(argv, env, cwd, "simulator")
        wait_for("the wanbatch settings line", lambda: "export WANBATCH_" in self.proc.stdout(), self.proc)
        lines = self.proc.stdout().splitlines()
        assert lines[0].startswith("fal simulator listening on https://"), lines
        self.url = lines[0].removeprefix("fal simulator listening on ")
        exports = [line for line in lines if line.lstrip().startswith("export ")]
        assert len(exports) == 2, lines
        self.fal_client_env, self.wanbatch_env = map(_exported, exports)
        self.ca_file = Path(self.fal_client_env["SSL_CERT_FILE"])
        # Serving, so uvicorn's signal handlers are in place: the lines above are printed just
        # before it starts, and a signal in between ends the process by its default action,
        # leaving the certificate folder (seen once in CI).
        # (A --public-url names another host: nothing to ask there.)
        if self.url.startswith(("https://127.0.0.1:", "https://localhost:")):
            wait_for("the simulator answering", self._answers, self.proc)

    def _answers(self) -> bool:
        try:
            httpx.get(f"{self.url}/_sim/ledger", verify=str(self.ca_file), timeout=2)
        except httpx.HTTPError:
            return False
        return True

    def stop(self, sig: signal.Signals) -> int:
        self.proc.popen.send_signal(sig)
        return self.proc.wait(30)


#: Submits, waits and fetches the result with fal's own client, configured by the environment
#: only, then downloads the video with httpx (which trusts the CA through SSL_CERT_FILE too).
_FAL_CLIENT = """
import json, sys, fal_client, httpx
endpoint, payload = sys.argv[1], json.loads(sys.argv[2])
handle = fal_client.submit(endpoint, payload)
result = handle.get()
video = httpx.get(result["video"]["url"]).raise_for_status().content
print(json.dumps({"status_url": handle.status_url, "rid": handle.request_id,
                  "video": result["video"], "downloaded": len(video)}))
"""


def test_fal_client_and_wanbatch_run_against_it_with_the_printed_settings(
    e2e_env: Path, examples_copy: Path
) -> None:
    sim = _Simulator(e2e_env)
    try:
        assert sim.ca_file.is_file()
        host = sim.url.removeprefix("https://")
        assert sim.fal_client_env["FAL_QUEUE_RUN_HOST"] == host
        assert sim.wanbatch_env["WANBATCH_FAL_QUEUE_URL"] == sim.url
        assert sim.wanbatch_env["WANBATCH_FAL_REST_URL"] == sim.url
        assert sim.wanbatch_env["SSL_CERT_FILE"] == str(sim.ca_file)

        endpoint = "fal-ai/wan-22"
        done = subprocess.run(
            [sys.executable, "-c", _FAL_CLIENT, endpoint, json.dumps(INPUTS[endpoint])],
            env=_clean_env() | sim.fal_client_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["status_url"] == f"{sim.url}/fal-ai/wan-22/requests/{out['rid']}/status"
        assert out["video"]["content_type"] == "video/mp4"
        assert out["video"]["url"].startswith(f"{sim.url}/files/")
        assert out["downloaded"] == out["video"]["file_size"] > 0

        # wanbatch, with the printed line over a test's usual settings; local images are uploaded
        # (not inlined) so the storage PUT goes over TLS too.
        env = subprocess_env(sim.url, INLINE_MAX_BYTES="0") | sim.wanbatch_env
        env = {k: v for k, v in env.items() if k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")}
        manifest = examples_copy / "quickstart.yaml"
        run = subprocess.run(
            [*wanbatch_command(), "run", str(manifest), "--json", "--no-progress"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        assert (report["total"], report["counts"]["succeeded"]) == (3, 3), report
        assert len(list(Path(os.environ["WANBATCH_OUTPUT_DIR"]).rglob("*.mp4"))) == 3

        ca = ssl.create_default_context(cafile=str(sim.ca_file))
        with httpx.Client(verify=ca) as client:
            ledger = client.get(f"{sim.url}/_sim/ledger").raise_for_status().json()
        assert ledger["accepted"] == 4  # fal_client's one and wanbatch's three
        exported = subprocess.run(
            [*wanbatch_command(), "export", report["batch"], "--format", "jsonl"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert exported.returncode == 0, exported.stderr
        records = [json.loads(line) for line in exported.stdout.splitlines() if line.strip()]
        uploaded = [r["input"]["image_url"] for r in records if "image_url" in r["input"]]
        assert uploaded
        assert all(url.startswith(f"{sim.url}/files/") for url in uploaded), uploaded

        assert sim.stop(signal.SIGINT) == 130
    finally:
        sim.proc.kill()
    assert "Traceback" not in sim.proc.stdout() + sim.proc.stderr()
    assert not sim.ca_file.parent.exists()


@pytest.mark.parametrize(
    ("sig", "status"),
    [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM), (signal.SIGHUP, -signal.SIGHUP)],
    ids=["sigint", "sigterm", "sighup"],  # SIGHUP: the terminal closed (uvicorn handles INT and TERM only)
)
def test_the_certificate_folder_is_deleted_when_it_stops(
    e2e_env: Path, sig: signal.Signals, status: int
) -> None:
    sim = _Simulator(e2e_env)
    try:
        assert sorted(p.name for p in sim.ca_file.parent.iterdir()) == ["cert.pem", "key.pem"]
        assert sim.stop(sig) == status
    finally:
        sim.proc.kill()
    assert not sim.ca_file.parent.exists()
    assert "Traceback" not in sim.proc.stderr()


def test_it_starts_again_in_the_shell_that_holds_its_previous_lines(e2e_env: Path) -> None:
    """The lines of a stopped ``--tls`` simulator still exported: its ``SSL_CERT_FILE`` names a
    certificate deleted with it. The simulator reads it only for webhooks: a warning naming it,
    not a refusal (exit 2) to start."""
    first = _Simulator(e2e_env)
    try:
        assert first.stop(signal.SIGTERM) == -signal.SIGTERM
    finally:
        first.proc.kill()
    assert not first.ca_file.exists()
    second = _Simulator(e2e_env, env=first.fal_client_env | first.wanbatch_env)
    try:
        assert second.ca_file != first.ca_file
        stderr = second.proc.stderr()
        assert f"warning: SSL_CERT_FILE: '{first.ca_file}' does not exist" in stderr, stderr
        assert second.stop(signal.SIGINT) == 130
    finally:
        second.proc.kill()


def test_a_public_url_names_the_host_of_the_settings_and_of_the_certificate(e2e_env: Path) -> None:
    sim = _Simulator(e2e_env, "--public-url", "https://sim.example:8443")
    try:
        assert sim.url == "https://sim.example:8443"
        assert sim.fal_client_env["FAL_QUEUE_RUN_HOST"] == "sim.example:8443"
        assert sim.wanbatch_env["WANBATCH_FAL_QUEUE_URL"] == "https://sim.example:8443"
        cert = x509.load_pem_x509_certificate(sim.ca_file.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "sim.example" in names.get_values_for_type(x509.DNSName)
        assert sim.stop(signal.SIGINT) == 130
    finally:
        sim.proc.kill()


def test_an_http_public_url_is_refused_with_tls() -> None:
    done = wanbatch("simulator", "--tls", "--port", "0", "--public-url", "http://simulator:8787")
    assert_one_line(done, "--public-url must be an https:// URL with --tls")


def test_help_names_tls() -> None:
    done = wanbatch("simulator", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "--tls" in text
    assert "self-signed certificate (deleted when it stops)" in text
    assert "Serve HTTPS" in text


def test_the_printed_settings_quote_what_a_shell_would_split(tmp_path: Path) -> None:
    from falsim.tls import client_settings

    ca = tmp_path / "a folder" / "cert.pem"
    lines = client_settings("https://[::1]:8443", ca)
    exports = [_exported(line) for line in lines if line.lstrip().startswith("export ")]
    assert exports == [
        {
            "FAL_QUEUE_RUN_HOST": "[::1]:8443",
            "SSL_CERT_FILE": str(ca),
            "FAL_KEY": "any-key",
            "NO_PROXY": "::1",  # httpx refuses to build a client for "[::1]"
            "no_proxy": "::1",
        },
        {
            "WANBATCH_FAL_QUEUE_URL": "https://[::1]:8443",
            "WANBATCH_FAL_REST_URL": "https://[::1]:8443",
            "SSL_CERT_FILE": str(ca),
            "FAL_KEY": "any-key",
        },
    ]


def test_fal_client_under_https_proxy_reaches_the_simulator_with_the_printed_line(e2e_env: Path) -> None:
    """The printed line names the simulator's host in ``NO_PROXY`` (and ``no_proxy``, which
    wins when set): behind a corporate ``HTTPS_PROXY``, fal_client (httpx) sent its loopback
    requests to the proxy, which cannot reach this machine's simulator (502), while wanbatch
    went directly. A lower-case ``no_proxy`` of the shell's own is overridden too."""
    sim = _Simulator(e2e_env)
    try:
        assert sim.fal_client_env["NO_PROXY"] == sim.fal_client_env["no_proxy"] == "127.0.0.1"
        endpoint = "fal-ai/wan-22"
        with loopback_proxy(BAD_GATEWAY) as proxy:
            env = _clean_env() | {"HTTPS_PROXY": proxy.url, "no_proxy": "corp.example"}
            done = subprocess.run(
                [sys.executable, "-c", _FAL_CLIENT, endpoint, json.dumps(INPUTS[endpoint])],
                env=env | sim.fal_client_env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        assert done.returncode == 0, done.stderr
        assert proxy.requests == []
        assert json.loads(done.stdout)["downloaded"] > 0
        assert sim.stop(signal.SIGINT) == 130
    finally:
        sim.proc.kill()
