"""A URL fal hands back that holds FAL_KEY is refused, never requested, stored or shown.

Found by a secret-leak audit: a storage ``initiate`` answer whose ``upload_url`` carried the
key's secret in its query made wanbatch PUT the image there, and its ``file_url`` (the key in
its query) was stored in the uploads table, ``jobs.input`` and the sidecar; a result file
answering ``302 Location: …?k=<key>`` was followed with the key in the query. Each is refused,
final, with a line that never holds the key: ``fal's answer holds FAL_KEY: refused``.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, inspect, text

from jobs.settings import get_settings
from tests.e2e.e2e_helpers import FAST_ENV, MakeManifest, Wb, export_jsonl
from tests.hostile import HostileProvider, json_reply, raw_reply, redirect
from tests.hostile_fal import FakeFal

KEY = "5f0c1d9a-7e2b-4c3d-8a9b-0c1d2e3f4a5b:4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b"
SECRET = KEY.partition(":")[2]
REFUSED = "fal's answer holds FAL_KEY: refused"

ONE_IMAGE = """\
name: urls
endpoint: fal-ai/wan-i2v
items:
  - prompt: a calm lake
    image_url: images/landscape.jpg
    resolution: 480p
"""
ONE_JOB = """\
name: urls
endpoint: fal-ai/wan-22
items:
  - prompt: a paper boat
    resolution: 480p
"""


@pytest.fixture
def fal_env(hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch) -> HostileProvider:
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", hostile.url)
    monkeypatch.setenv("WANBATCH_FAL_REST_URL", hostile.url)
    monkeypatch.setenv("FAL_KEY", KEY)
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    return hostile


def _everything_stored(tmp_path: Path) -> str:
    """Every row of every table, and every file under the outputs, as one text."""
    engine = create_engine(f"sqlite:///{tmp_path / 'wanbatch.db'}")
    try:
        with engine.connect() as conn:
            rows = [
                repr(tuple(row))
                for table in inspect(conn).get_table_names()
                for row in conn.execute(text(f'SELECT * FROM "{table}"'))
            ]
    finally:
        engine.dispose()
    outputs = tmp_path / "outputs"
    files = (
        [p.read_bytes().decode("latin-1") for p in outputs.rglob("*") if p.is_file()]
        if outputs.exists()
        else []
    )
    return "\n".join(rows + files)


def _assert_nowhere(tmp_path: Path, *shown: str) -> None:
    for where in (_everything_stored(tmp_path), *shown):
        for form in (KEY, SECRET, quote(KEY, safe="")):
            assert form not in where


@pytest.mark.parametrize("which", ["upload_url", "file_url"])
def test_an_upload_answer_naming_the_key_is_refused_before_the_put(
    wb: Wb,
    fal_env: HostileProvider,
    manifest: MakeManifest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    which: str,
) -> None:
    monkeypatch.setenv("WANBATCH_INLINE_MAX_BYTES", "100")  # the image is bigger: uploaded
    fal = FakeFal(fal_env, endpoint="fal-ai/wan-i2v")
    urls = {"upload_url": f"{fal_env.url}/up/x?sig=plain", "file_url": f"{fal_env.url}/files/img.jpg"}
    urls[which] = f"{fal_env.url}/up/x?sig={SECRET}" if which == "upload_url" else f"{urls[which]}?k={KEY}"
    fal_env.route("POST", r"/storage/upload/initiate", json_reply(urls))
    fal_env.route("PUT", r"/up/.*", raw_reply(b""))

    run = wb("run", manifest("urls", ONE_IMAGE), "--json", "--no-progress")
    assert run.code == 1, run.stdout + run.stderr
    assert fal_env.count("PUT", r"/up/.*") == 0  # nothing sent to the URL holding the key
    assert fal.posts() == 0  # nor a submit naming the file_url
    (record,) = export_jsonl(wb, run.json()["batch"])
    assert record["status"] == "failed"
    assert REFUSED in str(record["error"])
    status = wb("status", "urls", "--json")
    _assert_nowhere(tmp_path, run.stdout, run.stderr, status.stdout)


@pytest.mark.parametrize(
    "location",
    [
        f"/files/v.mp4?k={KEY}&s={SECRET}",
        f"/files/v.mp4?s={SECRET}",  # the secret half alone
        f"/files/v.mp4?k={quote(KEY, safe='')}",  # percent-encoded
    ],
)
def test_a_redirect_naming_the_key_is_not_followed(
    wb: Wb, fal_env: HostileProvider, manifest: MakeManifest, tmp_path: Path, location: str
) -> None:
    fal = FakeFal(fal_env)
    fal.on_file("r1.mp4", redirect(f"{fal_env.url}{location}"))  # fal's own origin: only the key refuses it

    run = wb("run", manifest("urls", ONE_JOB), "--json", "--no-progress")
    assert run.code == 1, run.stdout + run.stderr
    assert fal.file_gets("r1.mp4") == 1
    assert fal.file_gets("v.mp4") == 0  # the redirect was not followed
    (record,) = export_jsonl(wb, run.json()["batch"])
    assert record["status"] == "failed"
    assert REFUSED in str(record["error"])
    assert fal.posts() == 1  # final: not generated again
    _assert_nowhere(tmp_path, run.stdout, run.stderr)


def test_a_result_url_naming_the_key_never_sends_it(
    wb: Wb, fal_env: HostileProvider, manifest: MakeManifest, tmp_path: Path
) -> None:
    """A result body is scrubbed as the client reads it (every answer of fal is): its URL is
    fetched with the key masked, and the key is sent nowhere and stored nowhere."""
    fal = FakeFal(fal_env)
    fal.on_result("r1", json_reply(fal.result_for("r1", url=f"{fal_env.url}/files/r1.mp4?token={SECRET}")))
    run = wb("run", manifest("urls", ONE_JOB), "--json", "--no-progress")
    assert run.code == 0, run.stdout + run.stderr
    for request in fal_env.requests:
        assert SECRET not in request.path + request.query
    _assert_nowhere(tmp_path, run.stdout, run.stderr)
