"""FAL_KEY never reaches a log record, an error message or a repr."""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from jobs.errors import ProviderError
from worker.fal.client import FalClient
from worker.fal.http import FalKeyAuth, RetryPolicy
from worker.fal.models import RequestHandle
from worker.fal.redact import (
    MASK,
    KeyRedactionFilter,
    install_redaction,
    redact_json,
    redact_text,
    redact_value,
    uninstall_redaction,
)

KEY = "7d3f9a10-aaaa-bbbb-cccc-ddddeeeeffff:5e1f2a3b4c5d6e7f8091a2b3c4d5e6f7"
SECRET_PART = KEY.split(":")[1]


#: A key whose base64 differs between the standard and url-safe alphabets ("~?>" encode to
#: ``+``/``/``): fal's own keys (hex and ``-``) never exercise the url-safe forms.
ODD_KEY = "odd~key?>~:s3cr3t~value?>>~x"


def _b64_pieces(payload: bytes) -> list[str]:
    """``payload`` base64-encoded after 0, 1 and 2 other bytes, in both alphabets, whole and cut."""
    pieces = []
    for before in (b"", b"{", b'{"'):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(before + payload + b"}").decode()
            pieces += [text, text[:12], text[2:30]]
    return pieces


#: Encoded forms of the keys (and cuts of them) for the pre-check's property tests.
ENCODED_PIECES = [
    *_b64_pieces(KEY.encode()),
    *_b64_pieces(f"Key {KEY}".encode()),  # masked as the key's own forms at another alignment
    f"Key {KEY}".encode().hex()[:24],
    *_b64_pieces(SECRET_PART.encode()),
    *_b64_pieces(ODD_KEY.encode()),
    KEY.encode().hex(),
    KEY.encode().hex().upper(),
    SECRET_PART.encode().hex()[:20],
]


#: A key of fal's shape that no test installs or passes: masked by its shape alone.
SHAPED_KEY = "3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0c:00FF11ee22dd33cc44bb55aa66998877"
SHAPED_PIECES = [
    SHAPED_KEY,
    SHAPED_KEY[:-1],  # 31 hex digits: not the shape
    SHAPED_KEY[:36],  # the id alone: a UUID, as request ids are
    ":" + SHAPED_KEY[37:],  # 32 hex digits after a colon, no id before it
    SHAPED_KEY[:37],
    "ab",
    "-",
]


class Handler(BaseHTTPRequestHandler):
    """A real HTTP server, so httpx and httpcore run their full (DEBUG-logging) code paths."""

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def _answer(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/locked"):
            # A hostile or buggy server echoing the Authorization header back.
            echo = self.headers.get("Authorization", "")
            self._answer(403, f'{{"detail": "User is locked. You sent {echo}"}}'.encode())
        elif self.path.startswith("/reset"):
            self.close_connection = True
            self.connection.shutdown(2)
        elif self.path.startswith("/slow"):
            time.sleep(0.6)
            self._answer(200, b"{}")
        else:
            self._answer(502, b"<html><center>nginx</center></html>", {"Content-Type": "text/html"})

    def do_GET(self) -> None:
        self._answer(
            500,
            b'{"detail": "Key ' + KEY.encode() + b' rejected", "error_type": "internal_error"}',
            {"X-Fal-Error-Type": "internal_error", "x-fal-request-id": "r"},
        )

    def do_PUT(self) -> None:
        self._answer(418, b"teapot")


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def redaction() -> Iterator[None]:
    install_redaction(KEY)
    try:
        yield
    finally:
        uninstall_redaction()


def all_text(err: BaseException) -> str:
    """Every rendering of an exception and its chain a log or a user could ever see."""
    parts = ["".join(traceback.format_exception(err))]
    seen: BaseException | None = err
    while seen is not None:
        parts += [str(seen), repr(seen), repr(getattr(seen, "detail", None)), repr(seen.args)]
        request = getattr(seen, "_request", None)
        if request is not None:
            parts.append(repr(request))
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


@pytest.mark.usefixtures("redaction")
def test_no_key_in_logs_errors_or_reprs(server: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "worker", "hpack"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    client = FalClient(
        queue_url=server,
        rest_url=server,
        key=KEY,
        timeout=httpx.Timeout(0.3),
        retry=RetryPolicy(attempts=2, base_delay=0.0),
    )
    handle = RequestHandle.from_request_id(server, "fal-ai/wan-i2v", "rid")
    errors: list[ProviderError] = []
    with client:
        for endpoint in ("locked/x", "reset/x", "slow/x", "gateway/x"):
            with pytest.raises(ProviderError) as info:
                client.submit(endpoint, {"prompt": "p"})
            errors.append(info.value)
        for call in (client.status, client.result, client.cancel):
            with pytest.raises(ProviderError) as info:
                call(handle)
            errors.append(info.value)
        log = logging.getLogger("worker.fal.test")
        log.debug("the key is %s", KEY)
        log.info("headers: %r", {"Authorization": f"Key {KEY}"})
        try:
            raise RuntimeError(f"boom with {KEY}")
        except RuntimeError:
            log.exception("failed")
        logging.getLogger("httpx").debug("raw Authorization: Key %s", KEY)
        assert KEY not in repr(client)
        assert KEY not in repr(client.http.auth)

    captured = caplog.text + "\n".join(
        f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records
    )
    assert "httpx" in {r.name for r in caplog.records}  # the scenario really logged through httpx
    assert "the key is ***" in captured
    assert SECRET_PART not in captured
    assert KEY not in captured
    for err in errors:
        text = all_text(err)
        assert SECRET_PART not in text, text
    assert any("***" in str(e) for e in errors)  # the echoed key was scrubbed, not absent


def test_redact_text_shapes() -> None:
    assert redact_text(f"x {KEY} y", [KEY]) == "x *** y"
    assert redact_text("Authorization: Key abc.def") == "Authorization: Key ***"
    assert redact_text("{'authorization': 'Bearer tok123'}") == "{'authorization': 'Bearer ***'}"
    assert redact_text("(b'Authorization', b'Key zzz')") == "(b'Authorization', b'Key ***')"
    assert SECRET_PART not in redact_text(f"Key {KEY}")
    assert redact_text("Key collisions happen") == "Key collisions happen"  # prose is left alone


def test_filter_rewrites_records_even_without_the_factory() -> None:
    flt = KeyRedactionFilter(["only-this-secret-value"])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token=%s", ("only-this-secret-value",), None)
    assert flt.filter(record) is True
    assert record.getMessage() == "token=***"
    assert "only-this-secret-value" not in repr(flt)


def test_auth_repr_hides_key() -> None:
    auth = FalKeyAuth(KEY, ["https://queue.fal.run"])
    assert KEY not in repr(auth)
    assert SECRET_PART not in repr(auth)


def test_uninstall_restores_plain_records() -> None:
    before = logging.getLogRecordFactory()
    install_redaction("temporary-secret-value")
    assert logging.getLogRecordFactory() is not before
    uninstall_redaction()
    assert logging.getLogRecordFactory() is before
    record = logging.getLogger("x").makeRecord(
        "x", logging.INFO, __file__, 1, "v=%s", ("temporary-secret-value",), None
    )
    assert record.args == ("temporary-secret-value",)


def test_the_pre_check_never_skips_a_text_a_rule_would_change() -> None:
    """redact_text returns a text unchanged when no rule could match it; over texts built from
    the pieces every rule looks for (the key, cuts of it, an ellipsis, Authorization in odd
    cases and with a dotless ı, Key/Bearer shapes), it must agree with running every rule."""
    from worker.fal import redact

    short = "k3y"
    words = "…| |:|'|\"|=|\n|Authorization|AUTHORIZATION|authorızation|AuThOrIzAtIoN|Key |Bearer |key "
    words += "|abcdefgh:ijklmnop|xxxxxxxxx|status|IN_QUEUE|https://example.test/v.mp4"
    pieces = [KEY, KEY[:8], KEY[:7], KEY[:20], SECRET_PART, SECRET_PART[:12], short, *words.split("|")]
    pieces += [*ENCODED_PIECES, *SHAPED_PIECES]
    rng = random.Random(11)
    keys = (KEY, short, ODD_KEY)
    changed = 0
    for _ in range(8000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        expected = redact._apply_rules(text, {v for k in keys for v in redact.key_variants(k)})
        assert redact_text(text, keys) == expected, text
        changed += expected != text
    assert 800 < changed < 7200  # both kinds of text were tried


def _random_value(rng: random.Random, pieces: list[str], depth: int, *, tuples: bool) -> object:
    """A value of the redaction property tests: strings joined from ``pieces``, odd leaves, and
    dicts, lists and (``tuples``: not for values JSON must write) tuples of such, 4 levels deep."""
    kind = rng.randrange((6 if tuples else 5) if depth < 4 else 3)
    if kind == 0:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))
    if kind == 1:
        return rng.choice([7, 2.5, None, True, 2**70])
    if kind == 2:
        return rng.choice(["IN_PROGRESS", "https://v3.fal.media/files/x/y.mp4", ""])
    if kind == 3:
        return {
            "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4))): _random_value(
                rng, pieces, depth + 1, tuples=tuples
            )
            for _ in range(rng.randint(0, 3))
        }
    if kind == 4:
        return [_random_value(rng, pieces, depth + 1, tuples=tuples) for _ in range(rng.randint(0, 3))]
    return tuple(_random_value(rng, pieces, depth + 1, tuples=tuples) for _ in range(rng.randint(0, 2)))


def test_the_whole_value_pre_check_never_skips_a_value_the_walk_would_change() -> None:
    """redact_value returns a value unchanged when its JSON text holds nothing any rule looks
    for; over nested values (dict keys too) built from the same pieces, strings JSON writes
    escaped (quotes, backslashes, control characters) and odd leaves, it must agree with
    walking every string."""
    from worker.fal import redact

    words = "…| |:|=|'|\"|\\|\n|\x01|Authorization|authorızation=key |Key |key |Bearer |status|é|ß"
    pieces = [KEY, KEY[:8], KEY[:20], SECRET_PART, SECRET_PART[:12], *words.split("|"), *ENCODED_PIECES]
    pieces += SHAPED_PIECES
    rng = random.Random(7)
    known = redact._Known(frozenset({KEY, ODD_KEY}))

    changed = 0
    for _ in range(4000):
        v = _random_value(rng, pieces, 0, tuples=True)
        expected = redact._redact_walk(v, known, 0)
        assert redact_value(v, [KEY, ODD_KEY]) == expected, v
        changed += expected != v
    assert 400 < changed < 3600  # both kinds of value were tried


def test_a_parsed_value_checked_by_its_text_is_masked_as_walking_it_would() -> None:
    """redact_json looks at the JSON text a value was read from (when it escapes nothing)
    rather than at the value rendered again; over values of the same pieces, written with and
    without ASCII escapes and spaces, it must agree with walking every string of the value."""
    from worker.fal import redact
    from worker.fal.errors import load_json

    words = "…| |:|=|'|\"|\\|\n|Authorization|authorızation=key |Key |key |Bearer |status|é"
    pieces = [KEY, KEY[:8], KEY[:20], SECRET_PART, SECRET_PART[:12], *words.split("|"), *ENCODED_PIECES]
    pieces += SHAPED_PIECES
    rng = random.Random(5)
    known = redact._Known(frozenset({KEY, ODD_KEY}))

    changed = by_text = 0
    for _ in range(4000):
        value = _random_value(rng, pieces, 0, tuples=False)
        written = json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]))
        parsed = load_json(written, "event")
        expected = redact._redact_walk(parsed, known, 0)
        assert redact_json(parsed, written, [KEY, ODD_KEY]) == expected, written
        changed += expected != parsed
        by_text += written.isascii() and "\\" not in written
    assert 400 < changed < 3600  # both kinds of value were tried
    assert 400 < by_text < 3600  # and both kinds of text


def test_a_value_that_is_not_json_is_still_walked() -> None:
    from worker.fal.redact import MASK

    assert redact_value({b"raw": [f"Key {KEY}"]}, [KEY]) == {b"raw": [f"Key {MASK}"]}
    assert redact_value({1: {f"x{KEY}"}}, [KEY]) == {1: {f"x{KEY}"}}  # sets are not walked, as before


def test_a_key_json_would_escape_is_found_all_the_same() -> None:
    from worker.fal.redact import MASK

    odd = 'k"ey\\quoted-secret'  # JSON writes it escaped: not looked for in the text
    assert redact_value({"detail": [f"echo {odd}"]}, [odd]) == {"detail": [f"echo {MASK}"]}


def test_a_value_is_checked_as_its_strings_read_not_as_ascii_escapes() -> None:
    from worker.fal.redact import MASK

    # Only the dotless ı's "authorization" rule matches here, and only in the unescaped text.
    leaked = {"headers": ["authorızation=key abc123"]}
    assert redact_value(leaked, [KEY]) == {"headers": [f"authorızation=key {MASK}"]}


def _windows_of_b64(secret: bytes, width: int = 12) -> set[str]:
    """Every ``width``-character run of ``secret``'s base64 at each byte alignment, in both
    alphabets, away from its uncertain edges: any of them left in a text gives the secret away."""
    runs = set()
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            middle = encode(bytes(shift) + secret).decode()[4:-4]
            runs |= {middle[i : i + width] for i in range(len(middle) - width + 1)}
    return runs


@pytest.mark.parametrize("payload", [KEY, SECRET_PART, f"Key {KEY}", f"Authorization: Key {KEY}"])
@pytest.mark.parametrize("before", [b"", b"x", b"xy", b'{"headers": {"authorization": "'], ids=len)
@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode], ids=["std", "urlsafe"])
def test_a_base64_encoded_key_is_masked_at_any_byte_alignment(
    payload: str, before: bytes, encode: Callable[[bytes], bytes]
) -> None:
    from worker.fal.redact import MASK

    text = "echo " + encode(before + payload.encode() + b'", "more": 1}').decode() + " end"
    masked = redact_text(text, [KEY])
    assert MASK in masked
    assert not {run for run in _windows_of_b64(SECRET_PART.encode()) if run in masked}, masked
    assert redact_value({"echo": [text]}, [KEY]) == {"echo": [masked]}  # the pre-check lets it through


@pytest.mark.parametrize("payload", [KEY, SECRET_PART, f"Key {KEY}"])
@pytest.mark.parametrize("case", [str.lower, str.upper], ids=["lower", "upper"])
def test_a_hex_encoded_key_is_masked(payload: str, case: Callable[[str], str]) -> None:
    from worker.fal.redact import MASK

    text = "dump " + case(("prefix " + payload + " suffix").encode().hex())
    masked = redact_text(text, [KEY])
    assert MASK in masked
    assert case(SECRET_PART.encode().hex()[:16]) not in masked
    assert redact_value([{"dump": text}], [KEY]) == [{"dump": masked}]


def test_ordinary_base64_and_hex_are_left_alone() -> None:
    other = "1e2d3c4b-0000-4000-8000-000000000000:00112233445566778899aabbccddeeff"
    for text in (
        base64.b64encode(other.encode()).decode(),
        other.encode().hex(),
        base64.b64encode(b"a video frame, not a key" * 3).decode(),
    ):
        assert redact_text(text, [KEY]) == text
        assert redact_value({"v": text}, [KEY]) == {"v": text}


@pytest.mark.parametrize("keys", [[], [""], [KEY]], ids=["no key", "empty key", "another key"])
def test_a_bare_key_of_fal_s_shape_is_masked_without_knowing_it(keys: list[str]) -> None:
    from worker.fal.redact import MASK

    assert redact_text(f"bad key {SHAPED_KEY}, try again", keys) == f"bad key {MASK}, try again"
    assert redact_text(f"glued:x{SHAPED_KEY}y", keys) == f"glued:x{MASK}y"
    assert redact_text(f"{SHAPED_KEY}ab", keys) == MASK  # more hex digits: more of the secret
    lower = SHAPED_KEY.lower()
    body = {"error": f"refused {lower}", "payload": {"detail": [{"msg": SHAPED_KEY, "loc": ["body"]}]}}
    assert redact_value(body, keys) == {
        "error": f"refused {MASK}",
        "payload": {"detail": [{"msg": MASK, "loc": ["body"]}]},
    }


def test_what_only_resembles_a_key_is_left_alone() -> None:
    request_id = SHAPED_KEY[:36]  # a UUID: fal's request ids
    for text in (
        request_id,
        f"{request_id}:{SHAPED_KEY[37:-1]}",  # 31 hex digits
        f"job {SHAPED_KEY[37:]}:{request_id}",
        "12:00:00 0123456789abcdef0123456789abcdef",
    ):
        assert redact_text(text) == text
        assert redact_value({"v": [text]}) == {"v": [text]}


@pytest.mark.parametrize("key", ["fal", "a:b", "ing", "k-1:s", "real-key-123"])
def test_a_short_key_is_masked_only_where_it_stands_alone(key: str) -> None:
    """`FAL_KEY=a:b` (or `fal`) garbled every log line: each occurrence inside ordinary words —
    `data:base64`, the logger `worker.fal.client`, `starting` — became `***`."""
    prose = "worker.fal.client: starting fal-ai/wan-i2v data:base64 xk-1:sx real-key-123.txt polling"
    assert redact_text(prose, [key]) == prose
    for alone in (f"key={key}", f'{{"key": "{key}"}}', f"Key {key}", f"({key})", f"{key}\n", f"/x?k={key}&"):
        masked = redact_text(alone, [key])
        assert key not in masked, masked
        assert MASK in masked
    assert redact_text(f"{KEY}x", [KEY]) == f"{MASK}x"  # a key of fal's length: glued or not


def test_a_short_key_does_not_garble_json_log_lines() -> None:
    from worker.logs import JsonFormatter

    install_redaction("fal")
    try:
        record = logging.getLogger("worker.fal.client").makeRecord(
            "worker.fal.client",
            logging.WARNING,
            __file__,
            1,
            "status of %s, key fal",
            ("fal-ai/wan-i2v",),
            None,
        )
        line = json.loads(JsonFormatter().format(record))
    finally:
        uninstall_redaction()
    assert line["logger"] == line["event"] == "worker.fal.client"
    assert line["message"] == f"status of fal-ai/wan-i2v, key {MASK}"
