"""Every export format carries the provider's metadata the sidecar keeps: ``provider_metrics``
(fal's ``metrics``, ``inference_time``) and ``provider_output`` (fal's result JSON).

The README promises each output is stored "with its seed, the exact submitted input and the
provider's metadata"; the database and the sidecar had both fields, but no export format did, so
a shared dataset lost fal's timings and raw result. An export is made to be shared: the secrets a
URL in fal's answer may carry (a signed URL's signature, a ``?token=``), FAL_KEY and anything of
a fal key's shape are masked in it, and a hostile answer's nesting and size are bounded.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.export import (
    JSON_IN_TEXT_MAX_CHARS,
    NESTED_TOO_DEEP,
    PROVIDER_JSON_MAX_CHARS,
    PROVIDER_JSON_MAX_DEPTH,
    export_provider_json,
)
from jobs.key_forms import forget_keys, remember_key
from jobs.models import Job
from jobs.settings import get_settings
from jobs.states import JobState
from tests.in_process import run_main
from tests.step_runtime import add_batch

KEY = "0b5c2d4e-1111-2222-3333-444455556666:abcdef0123456789abcdef0123456789"
#: Another key's shape (an old key, one this process never knew): masked by its shape.
OTHER_KEY = "9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff:0123456789abcdef0123456789abcdef"
SIGNATURE = "5ac7f00dbeefcafe5ac7f00dbeefcafe"
TOKEN = "tok-0c4f1e2d3b"
#: Secrets inside strings, outside any URL: a JSON body fal relayed as text, a log line.
RAW_TOKEN = "rawtok-7d1e9a"
BEARER = "brr-5e6f7a8b9c"
SIGNED_URL = (
    "https://bucket.s3.amazonaws.com/out/v.mp4?X-Amz-Expires=3600"
    f"&X-Amz-Signature={SIGNATURE}&X-Amz-Credential=AKIAEXAMPLE%2F20260101"
)
METRICS = {"inference_time": 41.25}
OUTPUT = {
    "video": {
        "url": SIGNED_URL,
        "content_type": "video/mp4",
        "file_size": 12,
        "preview": f"https://cdn.example/p.webp?token={TOKEN}",
    },
    "seed": 2**64 - 7,
    "actual_prompt": "a paper boat",
    "debug": {
        "echo": f"Authorization: Key {KEY}",
        "old": f"x{OTHER_KEY}y",
        "body": json.dumps({"access_token": RAW_TOKEN, "author": "Jane Doe"}),
        "log": f"POST /token access_token={RAW_TOKEN}&x=1; Authorization: Bearer {BEARER}",
    },
    "author": "Jane Doe",  # harmless names that hold a secret word's letters: kept
    "keyframes": "0,12,24",
}
SECRETS = (KEY, KEY.partition(":")[2], OTHER_KEY, SIGNATURE, TOKEN, "AKIAEXAMPLE", RAW_TOKEN, BEARER)


@pytest.fixture
def known_key() -> Iterator[str]:
    remember_key(KEY)  # what the CLI does with FAL_KEY at start-up (cli.install_key_redaction)
    yield KEY
    forget_keys()


def _succeeded(engine: Engine, outputs: Path) -> str:
    batch = add_batch(engine, "provider-meta", [("fal-ai/wan-22", {"prompt": "a paper boat"})])
    data = b"video"
    path = outputs / "v.mp4"
    path.write_bytes(data)
    with db.session_scope(engine) as session:
        (job,) = store.jobs_of_batch(session, batch)
        assert store.transition(
            session,
            job.id,
            JobState.PENDING,
            JobState.SUCCEEDED,
            expected_version=job.version,
            output_path=str(path),
            output_sha256=hashlib.sha256(data).hexdigest(),
            output_bytes=len(data),
            seed=OUTPUT["seed"],
        )
        stored = session.get(Job, job.id)
        assert stored is not None
        stored.provider_metrics = METRICS  # JSON columns, set through the ORM
        stored.provider_output = OUTPUT
    return batch


def _export(engine: Engine, argv: list[str], outputs: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    for name in ("WANBATCH_DATABASE_URL", "WANBATCH_OUTPUT_DIR", "FAL_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(outputs))
    get_settings.cache_clear()
    db.close_engines()
    try:
        return run_main(["export", *argv], monkeypatch)
    finally:
        get_settings.cache_clear()
        db.close_engines()


def _records(fmt: str, target: Path) -> list[dict[str, Any]]:
    """The records as the format holds them, nested fields decoded from their JSON text."""
    if fmt == "jsonl":
        return [json.loads(line) for line in target.read_text().splitlines()]
    if fmt == "csv":
        rows: list[dict[str, Any]] = list(csv.DictReader(io.StringIO(target.read_text())))
    elif fmt == "parquet":
        table = pq.read_table(target)
        assert str(table.schema.field("provider_output").type) == "string"  # JSON text, as `input`
        assert str(table.schema.field("provider_metrics").type) == "string"
        rows = table.to_pylist()
    else:
        rows = [json.loads(line) for line in (target / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        for name in ("provider_metrics", "provider_output"):
            row[name] = json.loads(row[name]) if row[name] else None
    return rows


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "hf"])
def test_every_format_carries_fals_metrics_and_result_without_its_secrets(
    engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    known_key: str,
    fmt: str,
) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    batch = _succeeded(engine, outputs)
    target = tmp_path / ("hf" if fmt == "hf" else f"export.{fmt}")
    code = _export(engine, [batch, "--format", fmt, "-o", str(target)], outputs, monkeypatch)
    assert code == 0, capsys.readouterr().err

    (row,) = _records(fmt, target)
    assert row["provider_metrics"] == METRICS
    output = row["provider_output"]
    assert output["seed"] == OUTPUT["seed"]  # fal's result as received (an exact uint64 seed)
    assert output["actual_prompt"] == "a paper boat"
    assert output["video"]["content_type"] == "video/mp4"
    url = output["video"]["url"]
    assert url.startswith("https://bucket.s3.amazonaws.com/out/v.mp4?X-Amz-Expires=3600&")
    assert "X-Amz-Signature=**" in url
    assert "X-Amz-Credential=**" in url
    assert output["video"]["preview"] == "https://cdn.example/p.webp?token=**"
    assert (output["author"], output["keyframes"]) == ("Jane Doe", "0,12,24")
    assert json.loads(output["debug"]["body"]) == {"access_token": "**", "author": "Jane Doe"}
    assert output["debug"]["log"] == "POST /token access_token=**&x=1; Authorization: Bearer **"
    written = b"".join(p.read_bytes() for p in ([target] if target.is_file() else target.rglob("*.jsonl")))
    for secret in SECRETS:  # nowhere in the file, however encoded
        assert secret.encode() not in written, secret


def test_a_job_without_a_result_exports_null_provider_fields(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = add_batch(engine, "unsent", [("fal-ai/wan-22", {"prompt": "p"})])
    target = tmp_path / "export.csv"
    code = _export(engine, [batch, "--format", "csv", "-o", str(target)], tmp_path / "outputs", monkeypatch)
    assert code == 0, capsys.readouterr().err
    (row,) = _records("csv", target)
    assert (row["provider_metrics"], row["provider_output"]) == (None, None)


def _nested(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):  # built without recursion: deeper than Python would recurse
        value = {"a": [value]}
    return value


def test_a_hostile_answer_is_bounded_in_depth_and_size() -> None:
    deep = export_provider_json(_nested(5000))
    text = json.dumps(deep)  # as stored, json.dumps would recurse past Python's limit
    assert NESTED_TOO_DEEP in text
    containers = text.replace(NESTED_TOO_DEEP, "")
    assert containers.count("[") + containers.count("{") == PROVIDER_JSON_MAX_DEPTH
    assert export_provider_json(_nested(10)) == _nested(10)  # an ordinary answer as it is

    assert export_provider_json({"blob": "x" * PROVIDER_JSON_MAX_CHARS}) is None
    assert export_provider_json({"many": list(range(PROVIDER_JSON_MAX_CHARS // 4))}) is None
    assert export_provider_json({"inference_time": float("nan"), "n": 1}) == {"inference_time": None, "n": 1}


def _dumped(value: Any) -> str:
    return json.dumps(export_provider_json(value))


def test_a_signed_url_hidden_in_another_parameter_or_escaped_json_is_masked() -> None:
    """fal-style redirect or proxy URLs carry the signed storage URL percent-encoded in a
    parameter; a raw webhook body stored as text escapes its slashes (``https:\\/\\/``)."""
    redirect = f"https://v3.fal.media/files/x.mp4?redirect={quote(SIGNED_URL, safe='')}"
    escaped = json.dumps({"url": SIGNED_URL}).replace("/", "\\/")
    text = _dumped({"video": {"url": redirect}, "raw": escaped})
    assert SIGNATURE not in text
    assert "AKIAEXAMPLE" not in text
    assert export_provider_json({"url": redirect}) == {"url": "https://v3.fal.media/files/x.mp4?redirect=**"}


def test_a_secret_outside_a_url_is_masked() -> None:
    out = {
        "video": {
            "url": "https://bucket.s3.amazonaws.com/v.mp4",
            "query": f"X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature={SIGNATURE}",
            "access_token": TOKEN,
            "keyframes": [{"index": 1}],  # a secret-sounding name over a container: walked, not masked
        }
    }
    assert export_provider_json(out) == {
        "video": {
            "url": "https://bucket.s3.amazonaws.com/v.mp4",
            "query": "X-Amz-Credential=**&X-Amz-Signature=**",
            "access_token": "**",
            "keyframes": [{"index": 1}],
        }
    }


def test_a_known_key_encoded_past_its_known_forms_masks_the_whole_string() -> None:
    key = "myteam-key-0001:" + "s3cr3t" * 6  # not of a fal key's shape: only known, not recognised
    encoded = "".join(f"%{b:02X}" for b in key.encode())
    remember_key(key)
    try:
        assert export_provider_json({"echo": f"the key was {encoded}"}) == {"echo": "**"}
        assert export_provider_json({"echo": f"https://x.example/cb?state={encoded}"}) == {"echo": "**"}
    finally:
        forget_keys()
    # an unknown key of a fal key's shape, percent-encoded: masked by its shape
    assert export_provider_json({"echo": quote(OTHER_KEY, safe="")}) == {"echo": "**"}


def test_fields_whose_names_mask_alike_are_all_kept() -> None:
    out = {"https://a.example/?token=A": 1, "https://a.example/?token=B": 2, "https://a.example/?token=C": 3}
    assert export_provider_json(out) == {
        "https://a.example/?token=**": 1,
        "https://a.example/?token=**~2": 2,
        "https://a.example/?token=**~3": 3,
    }
    # a suffixed name another field already has is skipped, not overwritten
    out = {"https://u:A@h/x~2": 1, "https://u:B@h/x": 2, "https://u:C@h/x": 3}
    assert export_provider_json(out) == {
        "https://u:**@h/x~2": 1,
        "https://u:**@h/x": 2,
        "https://u:**@h/x~3": 3,
    }


def test_a_field_is_masked_by_the_words_of_its_name_not_its_letters() -> None:
    """``author``, ``design``, ``keyframes``, ``passes``, ``monkey`` were masked for holding
    ``auth``, ``sig``, ``key``, ``pass``: a dataset lost harmless fields."""
    kept = {
        "author": "Jane Doe",
        "design": "minimal",
        "keyframes": "0,12,24",
        "passes": "2",
        "monkey": "capuchin",
        "signature_style": "cursive",
        "token_type": "Bearer",
        "X-Amz-SignedHeaders": "host",
    }
    masked = {
        "signature": "s1",
        "sig": "s2",
        "access_token": "t1",
        "X-Amz-Signature": "s3",
        "apiKey": "k1",
        "client_secret": "c1",
        "Authorization": "Key a:b",
        "sessionToken": "t2",
        "password": "p1",
        "fal_key": "k2",
    }
    out = export_provider_json({**kept, **masked, "nested": {"author": "A", "Password": "p2"}})
    assert out == {**kept, **dict.fromkeys(masked, "**"), "nested": {"author": "A", "Password": "**"}}


def test_a_secret_inside_a_string_is_masked() -> None:
    """Only URLs and query strings were scrubbed inside a string: ``{"access_token": …}`` as JSON
    text, ``access_token=…`` in a line of text and ``Authorization: Bearer …`` were exported as is."""
    body = json.dumps({"access_token": "abc123", "n": 1, "inner": json.dumps({"password": "pw"})})
    out = export_provider_json(
        {
            "debug": body,
            "spaced": '{"access_token": "abc123"}',
            "compact": '[{"apiKey":"abc123"}]',
            "query": "access_token=abc123&x=1",
            "header": "Authorization: Bearer abc",
            "json_escaped": 'sent {\\"client_secret\\": \\"abc123\\"} to fal',
            "harmless": '{"author": "Jane", "keyframes": [1, 2]}',  # as written, byte for byte
            "not_json": "{ a golden key: the one }",
        }
    )
    assert out is not None
    assert json.loads(out["debug"]) == {"access_token": "**", "n": 1, "inner": json.dumps({"password": "**"})}
    assert out["spaced"] == '{"access_token": "**"}'
    assert json.loads(out["compact"]) == [{"apiKey": "**"}]
    assert out["query"] == "access_token=**&x=1"
    assert out["header"] == "Authorization: Bearer **"
    assert out["json_escaped"] == 'sent {\\"client_secret\\": \\"**\\"} to fal'
    assert out["harmless"] == '{"author": "Jane", "keyframes": [1, 2]}'
    assert out["not_json"] == "{ a golden key: the one }"
    assert "abc" not in json.dumps(out)


def test_json_inside_a_string_is_bounded() -> None:
    """A string of JSON is parsed only up to JSON_IN_TEXT_MAX_CHARS and within the depth limit;
    past either it is scrubbed as text, its ``"name": "value"`` pairs masked all the same."""
    big = json.dumps({"access_token": "abc123", "pad": "x" * JSON_IN_TEXT_MAX_CHARS})
    out = export_provider_json({"raw": big})
    assert out is not None
    assert out["raw"].startswith('{"access_token": "**", "pad": "xxx')
    deep = "[" * 100_000 + '{"password": "pw"}' + "]" * 100_000  # past the decoder's recursion
    out = export_provider_json({"raw": deep})
    assert out is not None
    assert out["raw"] == "[" * 100_000 + '{"password": "**"}' + "]" * 100_000
    nested: Any = {"password": "pw"}
    for _ in range(6):  # each level JSON text inside a string of the one above
        nested = {"s": json.dumps(nested)}
    out = export_provider_json(nested)
    for _ in range(6):
        out = json.loads(out["s"])
    assert out == {"password": "**"}


def test_json_text_with_a_repeated_field_is_masked() -> None:
    """A dict keeps a repeated field's last value: ``{"url": "…?token=…", "url": "x"}`` parsed
    as ``{"url": "x"}``, nothing was masked in it and the text was exported as written."""
    out = export_provider_json(
        {
            "signed": '{"url": "https://cdn.example/v.mp4?token=SECRETTOKEN1", "url": "x"}',
            "body": '{"n": 1, "inner": {"password": "hunter2hunter2", "password": "**"}}',
        }
    )
    assert out == {
        "signed": '{"url": "https://cdn.example/v.mp4?token=**", "url": "x"}',
        "body": '{"n": 1, "inner": {"password": "**", "password": "**"}}',
    }


def test_an_acronym_named_field_is_masked() -> None:
    """``APIkey`` was read as ``AP`` + ``Ikey`` and ``privkey`` as no secret word: both shown."""
    out = export_provider_json(
        {"APIkey": "SECRET-VALUE-1", "privkey": "SECRET-VALUE-2", "body": '{"AWSkey": "SECRET-VALUE-3"}'}
    )
    assert out == {"APIkey": "**", "privkey": "**", "body": '{"AWSkey": "**"}'}


def test_json_text_without_a_secret_is_exported_as_written() -> None:
    """JSON text was parsed and, when nothing in it was secret, compared with what it encodes:
    ``NaN`` (never equal to itself), ``1e999`` and nesting past the depth limit differed, so a
    string without a secret came out as ``null`` and ``"[nested too deep]"``."""
    texts = ["[" * 70 + "]" * 70, '{"loss": NaN}', "[1e999]", '{"a": Infinity}', '{"a" :1,"b":[ 2 ]}']
    out = export_provider_json({f"t{i}": text for i, text in enumerate(texts)})
    assert out == {f"t{i}": text for i, text in enumerate(texts)}
    # with a secret it is written back as JSON, scrubbed (a non-finite number as null)
    out = export_provider_json({"raw": '{"loss": NaN, "password": "pw"}'})
    assert out == {"raw": '{"loss": null, "password": "**"}'}


def test_prose_with_bearer_is_exported_as_written() -> None:
    text = "A Standard Bearer carrying a flag across the battlefield"
    out = export_provider_json({"prompt": text, "echo": "Authorization: Bearer carrying"})
    assert out == {"prompt": text, "echo": "Authorization: Bearer **"}


def test_json_text_that_fits_as_text_is_not_dropped_for_what_it_encodes() -> None:
    """Each container JSON text encodes is counted against the size limit as more than its two
    characters: five strings of ``[[],[],…]`` (1.3 MB of text) made the whole field null."""
    text = "[" + ",".join(["[]"] * (JSON_IN_TEXT_MAX_CHARS // 3 - 1)) + "]"
    value = {f"r{i}": text for i in range(5)}
    assert 5 * len(text) < PROVIDER_JSON_MAX_CHARS
    assert export_provider_json(value) == value


#: Review C's OAuth credentials: a signed client assertion (a JWT), a PKCE verifier, an
#: authorization code.
CLIENT_JWT = (
    "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJpc3MiOiJjbGllbnQtMTIzIiwic3ViIjoiY2xpZW50LTEyMyJ9"
    ".c2lnbmVkLWJ5LXRoZS1wcml2YXRlLWtleQ"
)
VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
AUTH_CODE = "SplxlOBeZQQYbYS6WxSbIA"


def test_oauth_client_assertion_code_verifier_and_code_are_masked() -> None:
    """A client assertion, a PKCE code_verifier and an authorization code are credentials, as
    field names (``code`` beside an OAuth request's other fields), in a URL, in a form body; a
    JWT is masked by its shape wherever it stands. An error's ``code`` field is kept."""
    out = export_provider_json(
        {
            "request": {"client_assertion": CLIENT_JWT, "code_verifier": VERIFIER, "code": AUTH_CODE},
            "url": f"https://login.example/oauth2/token?client_id=c&client_assertion={CLIENT_JWT}",
            "callback": f"https://app.example/cb?code={AUTH_CODE}&state=xyz",
            "body": f"grant_type=authorization_code&code={AUTH_CODE}&code_verifier={VERIFIER}",
            "log": f"exchanged {CLIENT_JWT} at the token endpoint",
            "saml": {"SAMLResponse": "PHNhbWxwOlJlc3BvbnNl", "csrf_token": "c1", "xsrf": "c2"},
            "error": {"code": "E1042", "message": "retry later"},
        }
    )
    text = json.dumps(out)
    for secret in (CLIENT_JWT, VERIFIER, AUTH_CODE, "PHNhbWxwOlJlc3BvbnNl", '"c1"', '"c2"'):
        assert secret not in text
    assert out["error"] == {"code": "E1042", "message": "retry later"}
    assert out["log"] == "exchanged ** at the token endpoint"


def test_token_counts_and_key_frames_are_kept() -> None:
    """Counts a dataset user wants (ML and video metadata, fal's log lines) are no credentials."""
    line = "prompt_tokens=226 num_tokens=512 key_frame_interval=24 tokens_per_second=31.5"
    kept = {
        "logs": [{"message": line}],
        "keyFrames": "0,48,96",  # camelCase of "keyframes", which is kept
        "num_tokens": "512",
        "usage": {"prompt_tokens": 226, "completion_tokens": 12, "max_tokens": 1024},
        "keyFrameInterval": 24,
        "key_points": [[1, 2], [3, 4]],
        "pass_rate": "0.93",
        "text_tokens": "40",
    }
    assert export_provider_json(kept) == kept
    # names of credentials stay masked beside them
    assert export_provider_json({"refresh_token": "r1", "id_token": "i1", "tokens": "t1"}) == {
        "refresh_token": "**",
        "id_token": "**",
        "tokens": "**",
    }


def test_a_secret_named_field_holding_a_list_an_object_or_a_number_is_masked() -> None:
    """Multi-valued headers are JSON lists (Go's http.Header, many proxies' debug echoes):
    ``{"Authorization": ["Basic …"]}``; a credentials object holds its secret under a plain name;
    a PIN or numeric secret is a number. Only a *string* value of a secret-named field was
    masked, so these were exported as is. Now the whole value is the mask, whatever its type."""
    out = export_provider_json(
        {
            "headers": {
                "X-Api-Key": ["k_live_51HxYzAbCdEf"],
                "Authorization": ["Basic dXNlcjpodW50ZXIy"],
            },
            "credentials": {"user": "svc", "value": "hunter2-prod"},
            "secret": 12345678,
            "debug": json.dumps(
                {"headers": {"X-Api-Key": ["k_live_51HxYzAbCdEf"]}, "pin": 1, "password": 4242}
            ),
            "token": None,  # nothing to hide: kept
            "session": {},
            "keyframes": [{"index": 1}],  # a harmless name over a container: walked
        }
    )
    text = json.dumps(out)
    for secret in ("k_live_51HxYzAbCdEf", "dXNlcjpodW50ZXIy", "hunter2-prod", "12345678", "4242"):
        assert secret not in text
    assert out["headers"] == {"X-Api-Key": "**", "Authorization": "**"}
    assert out["credentials"] == "**"
    assert out["secret"] == "**"
    assert json.loads(out["debug"]) == {"headers": {"X-Api-Key": "**"}, "pin": 1, "password": "**"}
    assert out["token"] is None
    assert out["session"] == {}
    assert out["keyframes"] == [{"index": 1}]


def test_a_secret_named_container_in_json_text_scrubbed_as_text_is_masked() -> None:
    """JSON text scrubbed as text (a field twice in an object, so not parsed): a secret-named
    field's list or object is masked to its closing bracket, nested brackets and quoted ones too."""
    raw = (
        '{"headers": {"X-Api-Key": ["k_live_1", "k_live_2"], "Accept": ["*/*"]},'
        ' "credentials": {"user": "svc", "inner": {"a": "]}"}, "value": "hunter2-prod"}, "n": 1, "n": 2}'
    )
    out = export_provider_json({"raw": raw})
    assert out == {
        "raw": '{"headers": {"X-Api-Key": [**], "Accept": ["*/*"]}, "credentials": {**}, "n": 1, "n": 2}'
    }
