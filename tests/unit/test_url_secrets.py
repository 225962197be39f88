"""A URL's credentials never reach a message, a log line or ``doctor``'s report.

The doctor printed ``cannot reach http://u:SECRETPW@…`` for ``WANBATCH_FAL_QUEUE_URL``, and a
``?token=`` in any URL as written, while the database's and Redis' passwords were masked (each by
a helper of its own). :func:`jobs.url_secrets.masked_url` is now the one helper for all of them.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import quote

import httpx
import pytest

from jobs.db import safe_url
from jobs.key_forms import forget_keys, remember_key
from jobs.output_location import parse_s3_url
from jobs.url_secrets import (
    is_secret_name,
    mask_jwts,
    mask_params_in_text,
    mask_secret_pairs,
    mask_urls,
    masked_url,
)
from worker.fal.client import FalClient
from worker.fal.redact import KeyRedactionFilter


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://queue.fal.run", "https://queue.fal.run"),
        ("http://u:SECRET@127.0.0.1:1", "http://u:**@127.0.0.1:1"),
        ("https://proxy/q?token=SECRET&region=eu", "https://proxy/q?token=**&region=eu"),
        ("https://h/jwks.json?api_key=SECRET;sig=SECRET", "https://h/jwks.json?api_key=**;sig=**"),
        (
            "https://b.s3.example/o?X-Amz-Credential=SECRET&X-Amz-Signature=SECRET&X-Amz-Expires=60",
            "https://b.s3.example/o?X-Amz-Credential=**&X-Amz-Signature=**&X-Amz-Expires=60",
        ),
        ("https://h/cb#access_token=SECRET", "https://h/cb#access_token=**"),
        ("https://SECRET@hooks.example/webhooks/fal", "https://**@hooks.example/webhooks/fal"),
        ("redis://:pa/SECRET@h:6379/0", "redis://:**@h:6379/0"),  # a "/" in the password
        ("postgresql://postgres@127.0.0.1/test", "postgresql://postgres@127.0.0.1/test"),  # a user
        ("http://h:8080/users/@me?page=2", "http://h:8080/users/@me?page=2"),  # a port, no password
        ("http://[::1", "(not a URL)"),
        # path parameters (RFC 3986 §3.3): a proxy's token there was shown as written
        ("https://proxy.example/queue;token=SECRET", "https://proxy.example/queue;token=**"),
        ("https://p/a;v=1/q;x=2;api_key=SECRET?sig=SECRET", "https://p/a;v=1/q;x=2;api_key=**?sig=**"),
        ("https://p/x;y", "https://p/x;y"),
    ],
)
def test_a_url_is_shown_without_its_credentials(url: str, shown: str) -> None:
    assert masked_url(url) == shown
    assert masked_url(shown) == shown  # masking again changes nothing


def test_every_helper_that_shows_a_setting_s_url_masks_the_same() -> None:
    """The database's (SQLAlchemy's mask) and fal's client's repr; the broker's messages used
    kombu's sanitizer, which showed a ``?token=`` (``doctor``'s test covers them)."""
    assert (
        safe_url("postgresql://u:SECRET@h:5432/db?sslpassword=SECRET&sslmode=require")
        == "postgresql://u:***@h:5432/db?sslmode=require&sslpassword=***"  # SQLAlchemy's order
    )
    client = FalClient(
        queue_url="http://u:SECRET@q", rest_url="http://r/?token=SECRET", key="k", timeout=httpx.Timeout(1.0)
    )
    try:
        assert "SECRET" not in repr(client)
    finally:
        client.close()


def test_urls_inside_a_text_are_masked() -> None:
    text = 'HTTP Request: GET http://u:SECRET@q:1/x/status?token=SECRET "HTTP/1.1 200 OK"; at redis://:SECRET@r/0.'
    assert mask_urls(text) == (
        'HTTP Request: GET http://u:**@q:1/x/status?token=** "HTTP/1.1 200 OK"; at redis://:**@r/0.'
    )
    assert mask_urls("no URL: a:b@c?token=x") == "no URL: a:b@c?token=x"


def test_a_log_record_s_urls_are_masked() -> None:
    """httpx logs every request's URL at INFO (``wanbatch worker -l INFO``)."""
    record = logging.LogRecord(
        "httpx",
        logging.INFO,
        __file__,
        1,
        "HTTP Request: %s %s",
        ("GET", "http://u:SECRET@q/?key=SECRET"),
        None,
    )
    KeyRedactionFilter().filter(record)
    assert record.getMessage() == "HTTP Request: GET http://u:**@q/?key=**"


def test_an_s3_url_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(ValueError, match="AWS_ACCESS_KEY_ID") as refused:
        parse_s3_url("s3://AKIAEXAMPLE:hunter2@bucket/prefix")
    assert "hunter2" not in str(refused.value)
    assert "AKIAEXAMPLE" not in str(refused.value)


SIGNED = "https://b.s3.amazonaws.com/v.mp4?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=SECRET"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # a signed URL percent-encoded in another parameter (a redirect, a proxy's target)
        (
            f"https://v3.fal.media/x.mp4?redirect={quote(SIGNED, safe='')}&w=1",
            "https://v3.fal.media/x.mp4?redirect=**&w=1",
        ),
        (f"https://h/?next={quote(quote(SIGNED, safe=''), safe='')}", "https://h/?next=**"),  # encoded twice
        ("https://h/?next=https://u:SECRET@i/x", "https://h/?next=**"),  # written as is
        (f"https://h/?next={quote('https://u:SECRET@i/x', safe='')}", "https://h/?next=**"),
        # more layers of encoding than any service nests
        ("https://h/?state=%" + "25" * 12 + "41", "https://h/?state=**"),
        # a URL inside a parameter without a secret is shown as it is
        (
            f"https://h/?next={quote('https://i/x?a=1', safe='')}",
            f"https://h/?next={quote('https://i/x?a=1', safe='')}",
        ),
    ],
)
def test_a_secret_hidden_in_a_parameter_s_value_is_masked(url: str, shown: str) -> None:
    assert masked_url(url) == shown
    assert masked_url(shown) == shown


def test_a_json_escaped_url_is_masked_and_stays_escaped() -> None:
    text = json.dumps({"url": SIGNED, "n": 1}).replace("/", "\\/")
    masked = mask_urls(text)
    assert "SECRET" not in masked
    assert "AKIAEXAMPLE" not in masked
    assert json.loads(masked) == {
        "url": "https://b.s3.amazonaws.com/v.mp4?X-Amz-Credential=**&X-Amz-Signature=**",
        "n": 1,
    }


def test_a_log_record_s_redirect_to_a_signed_url_is_masked() -> None:
    record = logging.LogRecord(
        "httpx",
        logging.INFO,
        __file__,
        1,
        "HTTP Request: GET %s",
        (f"https://cdn/x?to={quote(SIGNED, safe='')}",),
        None,
    )
    KeyRedactionFilter().filter(record)
    assert record.getMessage() == "HTTP Request: GET https://cdn/x?to=**"


def test_a_query_string_outside_a_url_is_masked() -> None:
    assert mask_params_in_text("X-Amz-Credential=AKIA&X-Amz-Expires=60&X-Amz-Signature=SECRET") == (
        "X-Amz-Credential=**&X-Amz-Expires=60&X-Amz-Signature=**"
    )
    assert (
        mask_params_in_text("body: grant_type=code&client_secret=SECRET.")
        == "body: grant_type=code&client_secret=**"
    )
    assert mask_params_in_text("a = b, x=1") == "a = b, x=1"


def test_a_known_key_percent_encoded_whole_in_a_parameter_is_masked() -> None:
    """hide_keys knows the key as written and with its ``:`` encoded, not every byte encoded."""
    key = "myteam-key-0001:" + "s3cr3t" * 6
    remember_key(key)
    try:
        encoded = "".join(f"%{b:02X}" for b in key.encode())
        assert masked_url(f"https://x.example/cb?state={encoded}&n=1") == "https://x.example/cb?state=**&n=1"
    finally:
        forget_keys()


#: Whether a field or parameter name is a credential's: by its words (snake_case, camelCase,
#: kebab-case, dots), not its letters. ``author``, ``keyframes``… were masked as containing
#: ``auth``, ``key``…, which damaged exported datasets.
SECRET_NAMES = {
    # masked
    "access_token": True,
    "X-Amz-Signature": True,
    "X-Amz-Credential": True,
    "X-Amz-Security-Token": True,
    "apiKey": True,
    "APIKey": True,
    "api_keys": True,
    "x-api-key": True,
    "client_secret": True,
    "Authorization": True,
    "headers.Authorization": True,
    "sessionToken": True,
    "session_id": True,
    "password": True,
    "sslpassword": True,
    "passwd": True,
    "pwd": True,
    "pass": True,
    "fal_key": True,
    "FAL_KEY": True,
    "key": True,
    "Key-Pair-Id": True,
    "privateKey": True,
    "secretkey": True,
    "signature": True,
    "sig": True,
    "oauth_signature": True,
    "jwt": True,
    "cookie": True,
    "Set-Cookie": True,
    "JSESSIONID": True,
    "refreshtoken": True,
    "bearer": True,
    "credentials": True,
    "auth": True,
    "paſsword": True,  # what re.IGNORECASE took for "password" still is
    # kept
    "author": False,
    "authority": False,
    "design": False,
    "keyframes": False,
    "keyword": False,
    "passes": False,
    "bypass": False,
    "monkey": False,
    "hockey": False,
    "credit": False,
    "signal": False,
    "assigned_to": False,
    "X-Amz-SignedHeaders": False,
    "X-Amz-Algorithm": False,
    "SignatureVersion": False,
    "signature_style": False,
    "token_type": False,
    "tokenizer": False,
    "session_name": False,
    "seed": False,
    "url": False,
}


def test_a_name_is_secret_by_its_words_not_its_letters() -> None:
    assert {name: is_secret_name(name) for name in SECRET_NAMES} == SECRET_NAMES


def test_url_parameters_and_log_records_mask_by_the_same_words() -> None:
    """A harmless parameter (``author``, ``keyframes``) is shown; every secret one still masked."""
    url = "https://h/x?author=jane&keyframes=3&monkey=1&token=SECRET&X-Amz-Signature=SECRET&apiKey=SECRET"
    shown = "https://h/x?author=jane&keyframes=3&monkey=1&token=**&X-Amz-Signature=**&apiKey=**"
    assert masked_url(url) == shown
    record = logging.LogRecord("httpx", logging.INFO, __file__, 1, "HTTP Request: GET %s", (url,), None)
    KeyRedactionFilter().filter(record)
    assert record.getMessage() == f"HTTP Request: GET {shown}"


def test_a_parameter_holding_json_with_a_secret_field_is_masked() -> None:
    """A percent-encoded ``{"access_token": …}`` (an OAuth ``state``) had no ``name=value`` to find."""
    state = quote(json.dumps({"access_token": "SECRET", "n": 1}), safe="")
    assert masked_url(f"https://h/cb?state={state}&n=1") == "https://h/cb?state=**&n=1"
    harmless = quote(json.dumps({"author": "jane"}), safe="")
    assert masked_url(f"https://h/cb?state={harmless}") == f"https://h/cb?state={harmless}"


#: Acronyms before a lower-case word and words written as one: ``APIkey`` was read as ``AP`` +
#: ``Ikey``, ``privkey`` and ``tokenid`` matched no rule, so all were shown (the substring rule
#: before had masked them). A word starting or ending with a secret word is one now, but for a
#: short list of ordinary words (kept below, and in the list above).
GLUED_NAMES = {
    # masked
    "APIkey": True,
    "AWSkey": True,
    "SSHkey": True,
    "privkey": True,
    "xapikey": True,
    "tokenid": True,
    "DBpass": True,
    "userAPIkey": True,
    "HMACsecret": True,
    "pubkey": True,
    "clientsecretvalue": True,
    "passwordHash": True,
    "sign": True,  # a signature in many APIs' query strings
    "oauth": True,
    # kept: ordinary words, and acronyms before a harmless word
    "HTTPServer": False,
    "URLs": False,
    "APIKeyType": False,
    "keyframe": False,
    "keywords": False,
    "keyboard": False,
    "donkey": False,
    "turkey": False,
    "passage": False,
    "passed": False,
    "compass": False,
    "sigma": False,
    "sigmas": False,
    "signed_url": False,
    "authors": False,
    "credits": False,
    "tokenizer": False,
}


def test_acronym_and_glued_secret_names_are_secret() -> None:
    assert {name: is_secret_name(name) for name in GLUED_NAMES} == GLUED_NAMES


def test_an_acronym_named_parameter_in_a_url_or_a_log_line_is_masked() -> None:
    assert (
        masked_url("https://api.example/v1?APIkey=SECRET123&privkey=PRIVSECRET&HTTPServer=a")
        == "https://api.example/v1?APIkey=**&privkey=**&HTTPServer=a"
    )
    line = "GET https://api.example/v1?AWSkey=AWSSECRET1 200"
    assert mask_urls(line) == "GET https://api.example/v1?AWSkey=** 200"
    text = "retry with DBpass=hunter2 and tokenid=t1"
    assert mask_secret_pairs(text) == "retry with DBpass=** and tokenid=**"


#: ``Bearer`` outside a header: masked only before what looks like a token.
BEARER_PROSE = [
    ("A Standard Bearer carrying a flag across the battlefield", None),
    ("he met the Bearer family.", None),
    ("sent Bearer abc123 to it", "sent Bearer ** to it"),
    ("sent Bearer eyJhbGciOi.eyJzdWIi.c2ln", "sent Bearer **"),
    ("sent Bearer abc-def", "sent Bearer **"),
    ("sent Bearer " + "a" * 20, "sent Bearer **"),
    ("Authorization: Bearer carrying", "Authorization: Bearer **"),  # a header's value, whatever it is
]


def test_bearer_in_prose_is_kept() -> None:
    """``Bearer`` before any word of 8 letters or more was masked: a prompt's "a Standard Bearer
    carrying a flag" was exported as "a Standard Bearer ** a flag"."""
    assert [(text, mask_secret_pairs(text)) for text, _ in BEARER_PROSE] == [
        (text, text if shown is None else shown) for text, shown in BEARER_PROSE
    ]


#: Text → the text with each secret-named pair's value masked, both directions.
SECRET_PAIRS = [
    ("access_token=abc123&x=1", "access_token=**&x=1"),
    ("retry with password=hunter2, then", "retry with password=**, then"),
    ('{"access_token": "abc123", "n": 1}', '{"access_token": "**", "n": 1}'),
    ('{"client_secret":"a \\"quoted\\" b","n":1}', '{"client_secret":"**","n":1}'),
    ("{'password': 'a b c'}", "{'password': '**'}"),
    ('{\\"access_token\\": \\"abc123\\"}', '{\\"access_token\\": \\"**\\"}'),  # JSON in JSON text
    ("Authorization: Bearer abc", "Authorization: Bearer **"),
    ("authorization: Digest username=a, response=b\nnext", "authorization: Digest **\nnext"),
    ("Cookie: a=1; sid=xyz", "Cookie: **"),
    ("X-Api-Key: abc123 sent", "X-Api-Key: ** sent"),
    ("sent Bearer eyJhbGciOi.x.y to it", "sent Bearer ** to it"),
    ('"token": "abc', '"token": "**'),  # cut short: masked to the end
    # kept: no secret name, prose, JSON scalars, masked already
    ("author=jane&keyframes=3&monkey=1", "author=jane&keyframes=3&monkey=1"),
    ("a golden key: the one that opens it", "a golden key: the one that opens it"),
    ("the Bearer of bad news", "the Bearer of bad news"),
    ('{"token": null, "token_type": "Bearer", "n": 1}', '{"token": null, "token_type": "Bearer", "n": 1}'),
    ("token=**&x=1", "token=**&x=1"),
]


def test_a_secret_named_pair_inside_text_is_masked() -> None:
    """Only URLs and query strings were masked in text: a JSON body's ``"access_token": "…"``,
    ``password=…`` in a sentence, a header's ``Authorization: Bearer …`` were shown."""
    assert [(text, mask_secret_pairs(text)) for text, _ in SECRET_PAIRS] == SECRET_PAIRS
    assert [(shown, mask_secret_pairs(shown)) for _, shown in SECRET_PAIRS] == [
        (s, s) for _, s in SECRET_PAIRS
    ]


def test_hostile_texts_are_masked_in_one_pass() -> None:
    """Large adversarial texts for every pattern of :func:`mask_secret_pairs`: each is read a
    bounded number of times per character (no nested quantifier; a value found is not read
    again for heads), so a 40 KB string costs what any other does. Asserted on the output."""
    n = 10_000
    assert mask_secret_pairs('"token": "' + '\\"' * n) == '"token": "**'  # never closed
    assert mask_secret_pairs('"token": "' + "\\" * (2 * n)) == '"token": "**'
    assert mask_secret_pairs("token=" * n) == "token=**"  # one value swallows every later head
    assert mask_secret_pairs("a_token: " * n) == "a_token: ** " * (n // 2)  # each value the next name
    assert mask_secret_pairs('"token":' * n) == '"token":"**":' * (n // 2)
    assert mask_secret_pairs('"token": 1, ' * n) == '"token": 1, ' * n  # a JSON non-string value: kept
    assert mask_secret_pairs("'pwd'='" * n) == "'pwd'='" * n  # empty values: nothing to mask
    escaped = '{\\"password\\": \\"'  # each value the "{" up to the next escaped quote
    assert mask_secret_pairs(escaped * n) == escaped + '**\\"password\\": \\"' * (n - 1)
    long_names = ("k" * 61 + "_key" + '"' + " " * 8 + ": " + '"x" ') * (n // 10)
    assert mask_secret_pairs(long_names) == long_names  # a name over 64 characters is no head
    assert mask_secret_pairs("Bearer " * n) == "Bearer " * n
    assert mask_secret_pairs("Authorization: " + "x " * n) == "Authorization: ** "
    assert mask_secret_pairs(("aB" * 30 + "Key=1 ") * n) == ("aB" * 30 + "Key=** ") * n  # camelCase words
    assert mask_secret_pairs("aB" * n + "Key=1") == "aB" * n + "Key=1"  # a name over 64 characters
    assert mask_secret_pairs("x" * 40_000 + " token=" + "y" * 40_000) == "x" * 40_000 + " token=**"


#: OAuth and SAML credentials that were no secret names (review C): a signed client assertion,
#: a PKCE verifier, a SAML response, a CSRF token; a name of a count or a measure (ML and video
#: metadata, fal's log lines) that was masked for holding ``token`` or ``key``.
OAUTH_AND_MEASURE_NAMES = {
    # masked
    "client_assertion": True,
    "assertion": True,
    "code_verifier": True,
    "codeVerifier": True,
    "oauth_verifier": True,
    "SAMLResponse": True,
    "saml_response": True,
    "csrf": True,
    "csrfmiddlewaretoken": True,
    "xsrf": True,
    "_xsrf": True,
    # still masked: a credential's name, whatever counts near it
    "tokens": True,  # a field of that name alone may hold tokens
    "access_tokens": True,
    "refresh_token": True,
    "id_token": True,
    "api_key": True,
    "per_request_token": True,  # a measure word before the secret word qualifies nothing
    "second_key": True,
    "job_key": True,
    "cache_key": True,
    # kept: counts and measures
    "client_assertion_type": False,
    "prompt_tokens": False,
    "num_tokens": False,
    "max_tokens": False,
    "text_tokens": False,
    "completion_tokens": False,
    "total_tokens": False,
    "tokens_per_second": False,
    "keyFrames": False,
    "key_frames": False,
    "keyFrameInterval": False,
    "key_frame_interval": False,
    "key_points": False,
    "pass_rate": False,
    "token_refresh_interval": False,
    "max-keys": False,  # S3's ListObjects page size
    "code": False,  # a field's name: an error code, mostly (a URL's or a form's ?code= is masked)
}


def test_oauth_credentials_are_secret_and_counts_are_not() -> None:
    assert {name: is_secret_name(name) for name in OAUTH_AND_MEASURE_NAMES} == OAUTH_AND_MEASURE_NAMES


AUTH_CODE = "SplxlOBeZQQYbYS6WxSbIA"


def test_an_authorization_code_parameter_is_masked_but_not_an_error_code() -> None:
    """``?code=`` in a URL or a form body is an OAuth authorization code; ``code=500`` alone in a
    line of text is an error or exit code and kept."""
    assert (
        masked_url(f"https://app.example/cb?code={AUTH_CODE}&state=xyz")
        == "https://app.example/cb?code=**&state=xyz"
    )
    assert masked_url(f"https://app.example/cb#code={AUTH_CODE}") == "https://app.example/cb#code=**"
    body = f"grant_type=authorization_code&code={AUTH_CODE}&redirect_uri=x"
    assert mask_params_in_text(body) == "grant_type=authorization_code&code=**&redirect_uri=x"
    assert mask_params_in_text(f"GET /cb?code={AUTH_CODE} 302") == "GET /cb?code=** 302"
    redirect = quote(f"https://app.example/cb?code={AUTH_CODE}", safe="")
    assert masked_url(f"https://login.example/x?next={redirect}") == "https://login.example/x?next=**"
    assert mask_params_in_text("exit code=1 after 3 s") == "exit code=1 after 3 s"
    assert mask_secret_pairs('{"code": "E42", "message": "bad"}') == '{"code": "E42", "message": "bad"}'


JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjbGllbnQtMTIzIn0.c2lnbmVkLWJ5LWtleQ"


def test_a_jwt_is_masked_wherever_it_stands() -> None:
    assert mask_jwts(f"assertion {JWT} sent") == "assertion ** sent"
    assert mask_jwts(f"[{JWT}]") == "[**]"
    assert mask_jwts("eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.") == "**"  # unsigned: no third part
    kept = ["eyJhbGciOiJSUzI1NiJ9", "a.eyJb.c", "xeyJa.b.c", "keyJam.b.c", "see eyJ docs. ok"]
    assert [mask_jwts(t) for t in kept] == kept
    n = 21_000
    assert mask_jwts("eyJ" * n) == "eyJ" * n  # one run, read once
    assert mask_jwts("eyJa." * n) == "**." * (n // 3)  # each three parts one token
    assert mask_jwts("eyJa.b " * n) == "eyJa.b " * n


def test_a_secret_named_list_or_object_in_text_is_masked_to_its_closing_bracket() -> None:
    """``"X-Api-Key": ["k_live_…"]`` in text (JSON text not parsed) was passed over: only a
    quoted or bare value was masked. Brackets inside quotes close nothing; hostile input is
    read once (a value found is not read again for heads)."""
    text = '{"X-Api-Key": ["k1", "]"], "credentials": {"a": {"b": "}"}, "c": "x"}, "n": [1]}'
    assert mask_secret_pairs(text) == '{"X-Api-Key": [**], "credentials": {**}, "n": [1]}'
    assert mask_secret_pairs('{\\"token\\": [\\"t1\\"]}') == '{\\"token\\": [**]}'  # JSON in JSON text
    assert mask_secret_pairs('{"token": [], "key": {}}') == '{"token": [], "key": {}}'  # nothing in them
    assert mask_secret_pairs('"token": [1, 2') == '"token": [**'  # never closed: to the end
    n = 10_000
    assert mask_secret_pairs('"token": [' * n) == '"token": [**'
    assert mask_secret_pairs('"token": ["a"], ' * n) == '"token": [**], ' * n
