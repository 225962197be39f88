"""Bad usage gets one clear line and exit 2, never a traceback — through the real entry point.

Each case runs the installed ``wanbatch`` console script in a subprocess (so ``cli.main``,
click's own error handling and process exit codes are what a user gets), and asserts: exit code
2, exactly one line on stderr, and no "Traceback" anywhere (issue #9).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.e2e_helpers import EXAMPLES, WANBATCH, Wb, assert_one_line, wanbatch

QUICKSTART = EXAMPLES / "quickstart.yaml"


@pytest.mark.parametrize(
    ("url", "phrase"),
    [
        ("postgresql://user:hunter2@127.0.0.1:1/x", "cannot open the database"),
        ("mysql://user@127.0.0.1/x", "unsupported database 'mysql'"),
        ("not a url", "not a database URL"),
    ],
    ids=["unreachable", "unsupported", "not-a-url"],
)
def test_unusable_database_url(url: str, phrase: str) -> None:
    done = wanbatch("status", env={"WANBATCH_DATABASE_URL": url})
    line = assert_one_line(done, "WANBATCH_DATABASE_URL", phrase)
    assert "hunter2" not in line


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_database_url(url: str) -> None:
    """Was an internal error (no such table: conductor_heartbeats), exit 70."""
    assert_one_line(
        wanbatch("status", env={"WANBATCH_DATABASE_URL": url}),
        "invalid configuration: WANBATCH_DATABASE_URL",
        "in-memory SQLite database is refused",
    )


@pytest.mark.parametrize(
    ("query", "phrase"),
    [("%ZZ", "invalid percent escape"), ("timeout=abc", "the SQLite option timeout=abc is not a number")],
)
def test_a_malformed_database_url_query(tmp_path: Path, query: str, phrase: str) -> None:
    """``?%ZZ`` was ignored without a word; ``?timeout=abc`` was an internal error, exit 70."""
    done = wanbatch("status", env={"WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}?{query}"})
    assert_one_line(done, "invalid configuration: WANBATCH_DATABASE_URL", phrase)
    assert not (tmp_path / "x.db").exists()


def test_a_read_only_sqlite_url_reads_and_refuses_writes_in_one_line(tmp_path: Path) -> None:
    """`?mode=ro` was ignored with a multi-line SQLAlchemy warning on every command (and the
    database written all the same); with `uri=true` it made a file named `x.db?mode=ro`."""
    db = tmp_path / "x.db"
    assert wanbatch("submit", QUICKSTART, env={"WANBATCH_DATABASE_URL": f"sqlite:///{db}"}).returncode == 0
    for query in ("mode=ro", "mode=ro&uri=true"):
        env = {"WANBATCH_DATABASE_URL": f"sqlite:///{db}?{query}"}
        status = wanbatch("status", "--json", env=env)
        assert (status.returncode, status.stderr) == (0, "")
        assert len(json.loads(status.stdout)["batches"]) == 1
        refused = wanbatch("cancel", "quickstart", env=env)
        assert_one_line(refused, "the database is read-only", "mode=ro", "nothing was changed")
        again = json.loads(wanbatch("status", "quickstart", "--json", env=env).stdout)
        assert (again["state"], again["counts"]["cancelled"]) == ("active", 0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("x.db")) == [
        "x.db",
        "x.db-shm",
        "x.db-wal",
    ]


def test_an_unsupported_sqlite_url_option_is_one_line(tmp_path: Path) -> None:
    done = wanbatch("status", env={"WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}?cache=shared"})
    assert_one_line(done, "WANBATCH_DATABASE_URL", "SQLite option(s) cache=shared are not supported")
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize(
    ("url", "phrase"),
    [
        ("sqlite:///.", "names a folder, not a file"),
        ("sqlite:////", "names a folder, not a file"),
        ("sqlite:///{tmp}/", "names a folder, not a file"),
        ("sqlite:///{tmp}", "names a folder, not a file"),
        ("sqlite+aiosqlite:///{tmp}/x.db", "cannot be used: No module named 'aiosqlite'"),
        ("sqlite+pysqlcipher:///{tmp}/x.db", "cannot be used: No module named 'pysqlcipher3'"),
    ],
    ids=["dot", "root", "trailing-slash", "a-folder", "aiosqlite", "pysqlcipher"],
)
def test_a_sqlite_url_that_names_no_usable_file(url: str, phrase: str, tmp_path: Path) -> None:
    """Each was an internal error, exit 70 ("PosixPath('.') has an empty name", "No module named
    'aiosqlite'"), the last two after creating x.db."""
    before = sorted(tmp_path.rglob("*"))
    done = wanbatch("status", env={"WANBATCH_DATABASE_URL": url.format(tmp=tmp_path)})
    assert_one_line(done, "WANBATCH_DATABASE_URL", phrase)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WANBATCH_FAL_QUEUE_URL", "abc"),
        ("WANBATCH_FAL_QUEUE_URL", "ftp://x"),
        ("WANBATCH_FAL_QUEUE_URL", ""),
        ("WANBATCH_FAL_REST_URL", "abc"),
        ("WANBATCH_WEBHOOK_URL", "abc"),
        ("WANBATCH_WEBHOOK_JWKS_URL", "ftp://keys"),
        ("WANBATCH_OUTPUT_DIR", ""),
        ("WANBATCH_CHAOS_CRASH_POINTS", "abc"),
        ("WANBATCH_CHAOS_STOP_POINTS", "after_post:abc"),
        ("WANBATCH_DOWNLOAD_ALLOWED_HOSTS", "https://media.example:8443/"),
    ],
)
def test_malformed_settings_stop_run_before_anything_is_stored(
    variable: str, value: str, tmp_path: Path
) -> None:
    """Each was accepted: every job then failed "unsupported URL", outputs went to the current
    folder, or a worker hit a traceback at the chaos point and ``run`` waited forever."""
    db = tmp_path / "wb.db"
    env = {variable: value, "WANBATCH_DATABASE_URL": f"sqlite:///{db}"}
    assert_one_line(wanbatch("run", "--simulate", QUICKSTART, env=env), f"invalid configuration: {variable}")
    assert not db.exists() or db.stat().st_size == 0


def test_doctor_reports_malformed_chaos_points() -> None:
    done = wanbatch("doctor", "--json", env={"WANBATCH_CHAOS_CRASH_POINTS": "after_post:abc"})
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "WANBATCH_CHAOS_CRASH_POINTS" in done.stdout


def _submitted_batch() -> str:
    done = wanbatch("submit", QUICKSTART)
    assert done.returncode == 0, done.stderr
    return "quickstart"


def test_export_to_a_folder(tmp_path: Path) -> None:
    batch = _submitted_batch()
    assert_one_line(wanbatch("export", batch, "--format", "csv", "-o", tmp_path), "is a folder")


def test_export_into_a_folder_that_cannot_be_created(tmp_path: Path) -> None:
    batch = _submitted_batch()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    done = wanbatch("export", batch, "-o", blocker / "sub" / "out.jsonl")
    assert_one_line(done, "cannot write the export")
    assert blocker.read_text() == "x"


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        # The range the check allows, 0 included (it said "between 1 and 65535 (0: …)").
        (["--port", "99999"], "--port must be between 0 and 65535 (0: any free port), got 99999"),
        (["--port", "-1"], "--port must be between 0 and 65535 (0: any free port), got -1"),
        (["--latency", "-5"], "--latency must be"),
        (["--latency", "nan"], "--latency must be"),
        (["--concurrency-limit", "0"], "--concurrency-limit must be"),
        (["--public-url", "not-a-url"], "--public-url: must be an http(s) URL"),
        # The clients it serves crashed on every URL it handed out (a host httpx refuses).
        (["--public-url", "http://a..b:8787"], "--public-url: its host has an empty label"),
        (["--host", "no.such.host.invalid", "--port", "0"], "cannot serve on no.such.host.invalid"),
    ],
    ids=[
        "port-high",
        "port-negative",
        "latency-negative",
        "latency-nan",
        "concurrency",
        "public-url",
        "public-url-host",
        "host",
    ],
)
def test_simulator_options(args: list[str], phrase: str) -> None:
    assert_one_line(wanbatch("simulator", *args, timeout=20), phrase)


@pytest.mark.parametrize("command", ["simulator", "serve"])
def test_a_port_in_use(command: str, tmp_path: Path) -> None:
    """``serve`` once left this to uvicorn, which logged ``[Errno 98]`` on a line of its own
    among its start-up lines and exited 3."""
    import socket

    env = {"WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'wb.db'}"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        done = wanbatch(command, "--port", port, env=env, timeout=20)
    assert_one_line(done, f"cannot serve on 127.0.0.1:{port}", "in use")


def test_serve_on_an_unknown_host(tmp_path: Path) -> None:
    env = {"WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'wb.db'}"}
    done = wanbatch("serve", "--host", "no.such.host.invalid", "--port", "0", env=env, timeout=20)
    assert_one_line(done, "cannot serve on no.such.host.invalid:0")


@pytest.mark.parametrize("host", ["", "  ", "[]"], ids=["empty", "blank", "brackets"])
def test_serve_on_an_empty_host_is_refused(host: str, tmp_path: Path) -> None:
    """``--host ''`` listened on every interface without a word."""
    env = {"WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'wb.db'}"}
    done = wanbatch("serve", "--host", host, "--port", "0", env=env, timeout=20)
    assert_one_line(done, "--host is empty (it would listen on every interface)")


def test_serve_on_a_malformed_host_is_refused(tmp_path: Path) -> None:
    env = {"WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'wb.db'}"}
    done = wanbatch("serve", "--host", "a..b", "--port", "0", env=env, timeout=20)
    assert_one_line(done, "--host: ", "expected the address to listen on")


def test_serve_on_a_bracketed_ipv6_address(tmp_path: Path) -> None:
    """``--host '[::1]'`` (as a URL writes it) was looked up as a host name: a DNS error."""
    import re
    import signal
    import socket
    import time

    from tests.e2e.e2e_helpers import wanbatch_command

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    log = tmp_path / "serve.log"
    env = {**os.environ, "WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'wb.db'}"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*wanbatch_command(), "serve", "--host", "[::1]", "--port", "0"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 60  # only so that a serve that never starts fails the test
        while not (found := re.search(r"running on http://\[::1\]:(\d+)", said := log.read_text())):
            assert proc.poll() is None, said
            assert time.monotonic() < deadline, said
            time.sleep(0.05)
        import httpx

        answer = httpx.get(f"http://[::1]:{found.group(1)}/healthz", timeout=30)
        assert answer.status_code == 200, answer.text
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize(
    "value",
    ["{not json", '{"fal-ai/wan-22": 0.1}', '{"fal-ai/wan-22": {"usd_per_unit": "cheap"}}', "[1, 2]"],
    ids=["bad-json", "not-an-object", "not-a-number", "a-list"],
)
def test_malformed_pricing_overrides(value: str) -> None:
    done = wanbatch("estimate", QUICKSTART, env={"WANBATCH_PRICING_OVERRIDES": value})
    assert_one_line(done, "WANBATCH_PRICING_OVERRIDES")


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (
            '{"fal-ai/nope": {"usd_per_unit": 0.1}}',
            "fal-ai/nope: not an endpoint wanbatch knows (fal-ai/wan-22",
        ),
        (
            '{"fal-ai/wan-22": {"usd_per_unit_by": {"999p": 1}}}',
            "usd_per_unit_by names 999p, but its price depends on resolution (480p, 580p, 720p)",
        ),
        ('{"fal-ai/wan-22": {"usd_per_unit": 1e20}}', "usd_per_unit must be a number from 0 up to 1,000,000"),
    ],
    ids=["unknown-endpoint", "unknown-value", "too-large"],
)
def test_pricing_overrides_that_would_change_nothing_are_refused(value: str, said: str) -> None:
    """An override of an unknown endpoint or value was silently ignored (and dropped the estimate's
    "assumed price" mark all the same); a price of 1e20 was "not a non-negative number"."""
    done = wanbatch("estimate", QUICKSTART, env={"WANBATCH_PRICING_OVERRIDES": value})
    assert_one_line(done, "WANBATCH_PRICING_OVERRIDES", said)


def test_a_partial_price_override_keeps_the_assumed_mark_and_dollars_are_rounded() -> None:
    # Only 720p is overridden: a 480p job's price is still the registry's assumption. A price of
    # 1e-30 a unit is shown rounded to the micro-dollar, as every --json amount is.
    env = {"WANBATCH_PRICING_OVERRIDES": '{"fal-ai/wan-22": {"usd_per_unit_by": {"720p": 1e-30}}}'}
    partial = wanbatch("estimate", QUICKSTART, "--json", env=env)
    assert partial.returncode == 0, partial.stderr
    assert "fal-ai/wan-22" in json.loads(partial.stdout)["price_assumptions"]
    tiny = '{"fal-ai/wan-22": {"usd_per_unit_by": {"480p": 1e-30, "580p": 1e-30, "720p": 1e-30}}}'
    done = wanbatch("estimate", QUICKSTART, "--json", env={"WANBATCH_PRICING_OVERRIDES": tiny})
    report = json.loads(done.stdout)
    assert report["by_endpoint"]["fal-ai/wan-22"]["usd"] == 0
    assert "fal-ai/wan-22" not in report["price_assumptions"]


@pytest.mark.parametrize(
    ("variable", "value"), [("WANBATCH_SUBMIT_RATE", "inf"), ("WANBATCH_LEASE_SECONDS", "1e300")]
)
def test_absurd_numbers_in_settings(variable: str, value: str, tmp_path: Path) -> None:
    """Both once ran into an internal error (an overflow deep in the limiter or a lease date)."""
    env = {variable: value, "WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'wb.db'}"}
    done = wanbatch("run", "--simulate", QUICKSTART, env=env)
    assert_one_line(done, f"invalid configuration: {variable}")


@pytest.mark.parametrize("amount", ["abc", "0", "-5", "nan", "inf", "2,50", "1,0000", "1_0", "\u0663"])
def test_rerun_max_usd_must_be_a_positive_amount(amount: str) -> None:
    """``2,50`` was $250 (every comma dropped), ``1_0`` $10 and ``٣`` $3 (``Decimal()`` reads them)."""
    line = assert_one_line(wanbatch("rerun", "whatever", "--max-usd", amount), "--max-usd", repr(amount))
    assert "ASCII digits" in line
    assert "groups of three digits" in line


@pytest.mark.parametrize("amount", ["99999999999999999999", "1e9", "1000000000.00"])
def test_rerun_max_usd_too_large_says_so(amount: str) -> None:
    """Not "takes a positive amount" for a positive amount: what is wrong, and the maximum."""
    assert_one_line(
        wanbatch("rerun", "whatever", "--max-usd", amount),
        f"--max-usd {amount} is too large: a cap must be less than $1,000,000,000.00",
    )


def test_daily_budget_too_large_is_a_configuration_error() -> None:
    done = wanbatch("estimate", QUICKSTART, env={"WANBATCH_DAILY_BUDGET_USD": "1e13"})
    assert_one_line(done, "invalid configuration: WANBATCH_DAILY_BUDGET_USD")


def test_click_usage_mistakes_are_one_line_too() -> None:
    assert_one_line(wanbatch("run", "--no-such-option", "x"), "No such option", "wanbatch run --help")
    assert_one_line(wanbatch("validate"), "Missing argument")


def test_help_and_version_still_work() -> None:
    assert wanbatch("--version").returncode == 0
    helped = wanbatch("rerun", "--help")
    assert helped.returncode == 0
    assert "--max-usd" in helped.stdout
    assert "--allow-dir" in wanbatch("validate", "--help").stdout


def test_an_unexpected_error_is_one_line_with_the_details_in_a_file() -> None:
    """The safety net in main(): a bug is reported in one line (exit 70) and the trace is kept."""
    code = (
        "import sys, jobs.batches, cli\n"
        "def boom(*a, **k):\n    raise KeyError('no such thing')\n"
        "jobs.batches.status = boom\n"
        "sys.argv = ['wanbatch', 'status']\n"
        "cli.main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        check=False,
    )
    line = assert_one_line(done, "internal error: KeyError", "please report it", code=70)
    report = Path(line.split("details in ", 1)[1].rstrip(")"))
    try:
        assert "Traceback" in report.read_text()
        assert "boom" in report.read_text()
        assert stat_mode(report) == 0o600
    finally:
        report.unlink()


def stat_mode(path: Path) -> int:
    import stat

    return stat.S_IMODE(path.stat().st_mode)


def test_run_of_neither_a_file_nor_a_batch_says_both_first(tmp_path: Path) -> None:
    """`run TYPO` said "FAL_KEY is not set" (or, with a key, only "manifest file not found")."""
    env = {"FAL_KEY": "", "WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'wb.db'}"}
    done = wanbatch("run", "no-such-batch-or-file", env=env)
    assert_one_line(done, "no manifest file 'no-such-batch-or-file', and no batch 'no-such-batch-or-file'")
    # A path or a manifest's name is the manifest's business, as before: the key is asked first.
    assert_one_line(wanbatch("run", "no-such.yaml", env=env), "FAL_KEY is not set")


def test_export_to_a_full_standard_output_is_one_line() -> None:
    batch = _submitted_batch()
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [WANBATCH, "export", batch],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "error: cannot write the export to standard output: No space left on device"


def test_export_into_a_pipe_closed_early_ends_quietly() -> None:
    batch = _submitted_batch()
    export = subprocess.Popen([WANBATCH, "export", batch], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert export.stdout is not None
    assert export.stderr is not None
    export.stdout.close()  # `| head -c0`: gone before the first record is written
    stderr = export.stderr.read().decode()
    assert export.wait(timeout=120) == 141  # 128 + SIGPIPE, as a shell reports; 1 says jobs failed
    assert stderr == ""  # no "internal error", no "Exception ignored"


@pytest.mark.parametrize("command", ["status", "export", "cancel"])
def test_a_batch_reference_longer_than_any_id_is_no_batch(wb: Wb, command: str) -> None:
    """Audit A8: a 100,000-character reference became an id-prefix LIKE that SQLite refuses
    ("LIKE or GLOB pattern too complex"): an internal error instead of "no batch"."""
    done = wb(command, "x" * 100_000)
    assert done.code == 2
    assert "no batch 'xxxx" in done.stderr
    assert "…'" in done.stderr
    assert len(done.stderr) < 400


@pytest.mark.parametrize(
    ("env", "args", "said"),
    [
        # Was "internal error: InvalidURL: Invalid non-printable ASCII character in URL", exit 70.
        ({"WANBATCH_FAL_QUEUE_URL": "http://h\x01x", "FAL_KEY": "k"}, ("run",), "WANBATCH_FAL_QUEUE_URL"),
        ({"WANBATCH_FAL_REST_URL": "http://h\x01x", "FAL_KEY": "k"}, ("run",), "WANBATCH_FAL_REST_URL"),
        # Was "internal error: ValueError: Port out of range", exit 70.
        (
            {"WANBATCH_OUTPUT_DIR": "s3://bucket", "AWS_ENDPOINT_URL": "http://u:hunter2@127.0.0.1:99999"},
            ("run", "--simulate", "--json"),
            "AWS_ENDPOINT_URL",
        ),
        # Was "…cannot take the outputs: EndpointResolutionError: Custom endpoint
        # `http://u:hunter2@127.0.0.1:57009 ` was not a valid URI", password and all.
        (
            {
                "WANBATCH_OUTPUT_DIR": "s3://renders/tokyo",
                "AWS_ENDPOINT_URL": "http://u:hunter2@127.0.0.1:57009 ",
            },
            ("run", "--simulate"),
            "AWS_ENDPOINT_URL",
        ),
        # Was a traceback (OverflowError in a worker) and a run that never ended.
        ({"WANBATCH_SUBMIT_RATE": "1e-320"}, ("run", "--simulate"), "WANBATCH_SUBMIT_RATE"),
        # Was a run stuck with its downloads timing out.
        ({"WANBATCH_DOWNLOAD_TIMEOUT": "1e-320"}, ("run", "--simulate"), "WANBATCH_DOWNLOAD_TIMEOUT"),
        # Was "InvalidURL: Invalid IDNA hostname" at every submit, and a run that never ended.
        (
            {"WANBATCH_WEBHOOK_URL": "https://\N{SNOWMAN}.example/webhooks/fal", "FAL_KEY": "k"},
            ("run",),
            "WANBATCH_WEBHOOK_URL",
        ),
        # Was "internal error: InvalidURL: Invalid IDNA hostname", exit 70, the batch stored.
        (
            {"WANBATCH_FAL_QUEUE_URL": "https://\N{SNOWMAN}.example", "FAL_KEY": "k"},
            ("run",),
            "WANBATCH_FAL_QUEUE_URL",
        ),
        # Was "label empty or too long" at every submit, the jobs given back for ever.
        ({"WANBATCH_FAL_QUEUE_URL": "https://a..b/", "FAL_KEY": "k"}, ("run",), "WANBATCH_FAL_QUEUE_URL"),
        (
            {"WANBATCH_FAL_REST_URL": f"https://{'a' * 64}.com", "FAL_KEY": "k"},
            ("run",),
            "WANBATCH_FAL_REST_URL",
        ),
        # Was "internal error: UnicodeError: encoding with 'idna' codec failed", exit 70.
        ({"WANBATCH_DATABASE_URL": "postgresql://u:hunter2@a..b/x"}, ("status",), "WANBATCH_DATABASE_URL"),
        # Was "cannot take the outputs: ValueError: Invalid endpoint: http://u:hunter2@minio_1:9000".
        (
            {
                "WANBATCH_OUTPUT_DIR": "s3://renders/tokyo",
                "AWS_ENDPOINT_URL": "http://u:hunter2@minio_1:9000",
            },
            ("run", "--simulate"),
            "AWS_ENDPOINT_URL",
        ),
        # Was "cannot reach the broker at garbage" (and a worker retrying for ever).
        ({"WANBATCH_BROKER_URL": "garbage", "FAL_KEY": "k"}, ("run",), "WANBATCH_BROKER_URL"),
        ({"WANBATCH_BROKER_URL": "foo://u:hunter2@x", "FAL_KEY": "k"}, ("worker",), "WANBATCH_BROKER_URL"),
    ],
    ids=[
        "queue-url",
        "rest-url",
        "s3-endpoint",
        "s3-endpoint-space",
        "tiny-rate",
        "tiny-timeout",
        "webhook-idna",
        "queue-url-idna",
        "queue-url-empty-label",
        "rest-url-long-label",
        "postgresql-host",
        "s3-endpoint-host",
        "broker-run",
        "broker-worker",
    ],
)
def test_settings_that_crashed_later_stop_every_command_at_start_up(
    env: dict[str, str], args: tuple[str, ...], said: str, tmp_path: Path
) -> None:
    env = {"WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'wb.db'}", **env}
    target = () if args in (("worker",), ("status",)) else (QUICKSTART,)
    done = wanbatch(*args, *target, env=env, timeout=30)
    if "--json" in args:
        assert done.returncode == 2, done.stderr
        assert f"invalid configuration: {said}" in done.stdout
        assert "hunter2" not in done.stdout
        assert "Traceback" not in done.stderr
    else:
        line = assert_one_line(done, f"invalid configuration: {said}")
        assert "hunter2" not in line
    assert not (tmp_path / "wb.db").exists()
