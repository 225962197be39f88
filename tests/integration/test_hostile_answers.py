"""What a hostile or broken fal answers cannot store the key, stall a job, or plant a seed that
no export can hold (found by playing fal from a loopback server)."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, text

from jobs import db, store
from jobs.outputs import sidecar_path
from tests.hostile import Behaviour, HostileProvider, Recorded, drip, json_reply, raw_reply
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, completion_heard, job_ids, make_runtime, settings_for
from worker.fal.redact import redact_text
from worker.steps import Runtime, dispatch, download, submit
from worker.steps.poll import apply_seen

KEY = "0f6b5e0e-2c1d-4c8e-9a51-1d2f3a4b5c6d:8c1f0a9e7d6b5a4c3e2f1a0b9c8d7e6f"
SECRET = KEY.split(":", 1)[1]


def _one_job(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, **settings: Any
) -> tuple[str, Runtime]:
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "out", **settings))
    batch_id = add_batch(engine, "hostile", [("fal-ai/wan-22", {"prompt": "a fox", "resolution": "480p"})])
    (job_id,) = job_ids(engine, batch_id)
    assert dispatch(rt) == [job_id]
    return job_id, rt


def _everything_stored(engine: Engine) -> str:
    """Every row of every table, as text: what the database holds."""
    with engine.connect() as conn:
        tables = inspect(conn).get_table_names()
        return "\n".join(str(list(conn.execute(text(f'SELECT * FROM "{t}"')))) for t in tables)


def test_a_request_id_that_echoes_the_key_is_never_stored(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    FakeFal(hostile)

    def echo(req: Recorded, sock: socket.socket) -> None:  # the caller's own key, handed back as the id
        key = req.headers["authorization"].split(" ", 1)[1]
        json_reply({"request_id": key, "status": "IN_QUEUE"}, headers={"x-fal-request-id": key})(req, sock)

    hostile.route("POST", re.escape("/fal-ai/wan-22"), echo)
    job_id, rt = _one_job(engine, hostile, tmp_path)

    # fal said yes to something: maybe queued, maybe billed (the policy settles it, or it waits)
    assert submit(rt, job_id) in ("ambiguous", "failed")

    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
        assert job.request_id is None
        assert job.state.value in ("submit_unknown", "failed")  # the ambiguous-submit policy decides
    stored = _everything_stored(engine)
    assert SECRET not in stored
    assert KEY.split(":", 1)[0] not in stored


def _key_of(req: Recorded) -> str:
    """The caller's own key, as a provider echoing the Authorization header has it."""
    return req.headers["authorization"].split(" ", 1)[1]


@pytest.mark.parametrize("where", ["body", "header"])
def test_an_error_type_that_echoes_the_key_is_never_stored(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, where: str
) -> None:
    FakeFal(hostile)

    def refuse(req: Recorded, sock: socket.socket) -> None:
        if where == "body":
            json_reply({"detail": "invalid input", "error_type": _key_of(req)}, status=422)(req, sock)
        else:
            headers = {"x-fal-error-type": _key_of(req), "x-fal-request-id": _key_of(req)}
            json_reply({"detail": "invalid input"}, status=422, headers=headers)(req, sock)

    hostile.route("POST", re.escape("/fal-ai/wan-22"), refuse)
    job_id, rt = _one_job(engine, hostile, tmp_path)

    assert submit(rt, job_id) == "failed"

    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
    # fal's echoed "error type" is dropped: the job is typed by the failure's kind instead
    assert (job.error, job.error_type) == ("HTTP 422: invalid input", "http_422")
    stored = _everything_stored(engine)
    assert SECRET not in stored
    assert SECRET[:16] not in stored
    assert KEY.split(":", 1)[0] not in stored


def test_a_gateway_request_id_that_echoes_the_key_is_never_stored(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    FakeFal(hostile)

    def accept(req: Recorded, sock: socket.socket) -> None:
        body = {"request_id": "r1", "gateway_request_id": _key_of(req), "status": "IN_QUEUE"}
        json_reply(body)(req, sock)

    hostile.route("POST", re.escape("/fal-ai/wan-22"), accept)
    job_id, rt = _one_job(engine, hostile, tmp_path)

    assert submit(rt, job_id) == "submitted"  # fal queued it: only the echo is not kept

    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert (job.request_id, job.gateway_request_id) == ("r1", None)
    assert SECRET not in _everything_stored(engine)


def test_a_result_that_is_not_an_object_fails_after_the_download_attempts(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    fal = FakeFal(hostile)
    job_id, rt = _one_job(engine, hostile, tmp_path, download_attempts=2, retry_base_delay=0)
    assert submit(rt, job_id) == "submitted"
    with db.read_scope(engine) as session:
        request_id = store.get_job(session, job_id).request_id
    assert request_id is not None
    fal.on_result(request_id, json_reply(None))  # `null`: no result fal makes
    assert apply_seen(rt, [completion_heard(engine, rt, job_id)]) == 1

    outcomes = [download(rt, job_id) for _ in range(2)]

    assert outcomes == ["result-retry", "failed"]  # not retried for the hour fal keeps results
    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.error_type == "provider_protocol_error"
    assert "not a JSON object (a NoneType)" in (job.error or "")


@pytest.mark.parametrize("seed", [2**70, -5, "42", True, 1.5])
def test_a_seed_no_export_can_hold_is_recorded_as_unknown(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, seed: object
) -> None:
    fal = FakeFal(hostile)
    job_id, rt = _one_job(engine, hostile, tmp_path)
    assert submit(rt, job_id) == "submitted"
    with db.read_scope(engine) as session:
        request_id = store.get_job(session, job_id).request_id
    assert request_id is not None
    fal.on_result(request_id, json_reply(fal.result_for(request_id, seed=seed)))
    assert apply_seen(rt, [completion_heard(engine, rt, job_id)]) == 1

    assert download(rt, job_id) == "succeeded"  # the video is fine: only its seed is not one
    with db.read_scope(engine) as session:
        assert store.get_job(session, job_id).seed is None


def test_the_key_is_masked_percent_encoded_and_by_its_secret_half() -> None:
    from urllib.parse import quote, quote_plus

    body = json.dumps({"url": f"https://x/?k={quote(KEY, safe='')}", "plus": quote_plus(KEY), "tail": SECRET})
    masked = redact_text(body, [KEY])
    assert SECRET not in masked
    assert quote(SECRET, safe="") not in masked
    assert masked.count("***") == 3
    assert redact_text("8c1f0a9", [KEY]) == "8c1f0a9"  # seven characters of it are ordinary text


# Text PostgreSQL refuses, in a string: ``\u0000`` (in ``jsonb``, and in a text column as a NUL
# byte) and a lone surrogate (no UTF-8 at all: SQLite's driver refuses it in a text column too).
# Python's json reads both, and ``NaN``, without complaint.
NUL, LONE = "\u0000", "\ud800"
SHOWN = "\ufffd"  # what each of them is stored as (jobs.storable)


def _submitted(engine: Engine, hostile: HostileProvider, tmp_path: Path) -> tuple[FakeFal, str, str, Runtime]:
    """A job fal (``FakeFal``) accepted: the fake, the job, its request id and the runtime."""
    fal = FakeFal(hostile)
    job_id, rt = _one_job(engine, hostile, tmp_path, retry_base_delay=0)
    assert submit(rt, job_id) == "submitted"
    with db.read_scope(engine) as session:
        request_id = store.get_job(session, job_id).request_id
    assert request_id is not None
    return fal, job_id, request_id, rt


def test_a_result_with_text_no_database_holds_succeeds_with_the_text_made_storable(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    fal, job_id, request_id, rt = _submitted(engine, hostile, tmp_path)
    prompt = f"a fox{NUL} at {LONE}dusk"
    body = fal.result_for(request_id, actual_prompt=prompt, timings={"inference": float("nan")})
    body[f"note{NUL}"] = [f"x{NUL}", float("inf")]
    fal.on_result(request_id, json_reply(body))
    assert apply_seen(rt, [completion_heard(engine, rt, job_id)]) == 1

    assert download(rt, job_id) == "succeeded"

    cleaned = f"a fox{SHOWN} at {SHOWN}dusk"
    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert (job.state.value, job.actual_prompt, job.seed) == ("succeeded", cleaned, 42)
    assert job.provider_output is not None
    assert job.provider_output["actual_prompt"] == cleaned
    assert job.provider_output["timings"] == {"inference": None}
    assert job.provider_output[f"note{SHOWN}"] == [f"x{SHOWN}", None]
    assert job.output_path is not None
    sidecar = json.loads(sidecar_path(Path(job.output_path)).read_text(encoding="utf-8"))
    assert sidecar["actual_prompt"] == cleaned


def test_a_failed_status_and_error_with_text_no_database_holds_fail_the_job_for_its_reason(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    fal, job_id, request_id, rt = _submitted(engine, hostile, tmp_path)
    status = {
        "status": "COMPLETED",
        "logs": [{"message": f"a{NUL}b{LONE}", "level": "INFO"}],
        "metrics": {"inference_time": float("nan"), f"k{NUL}": 1},
        "error": f"it failed{NUL} at fal",
        "error_type": "content_policy_violation",
    }
    fal.on_status(request_id, json_reply(status))
    refused = {"detail": f"the prompt{NUL} was{LONE} refused", "error_type": "content_policy_violation"}
    fal.on_result(request_id, json_reply(refused, status=422))
    assert apply_seen(rt, [completion_heard(engine, rt, job_id)]) == 1

    assert download(rt, job_id) == "failed"

    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
        details = [e.details for e in store.job_events(session, job_id) if e.details]
    assert (job.state.value, job.error_type) == ("failed", "content_policy_violation")
    assert job.error is not None
    assert f"the prompt{SHOWN} was{SHOWN} refused" in job.error
    assert job.provider_metrics == {"inference_time": None, f"k{SHOWN}": 1}
    assert {"error": f"it failed{SHOWN} at fal", "error_type": "content_policy_violation"} in details


@pytest.mark.parametrize(
    "answer",
    [
        json_reply({"detail": f"invalid{NUL} input{LONE}"}, status=422),
        raw_reply(b"invalid\x00 input\xed\xa0\x80", status=422, headers={"Content-Type": "text/plain"}),
    ],
    ids=["json", "text"],
)
def test_a_refused_submit_whose_reason_no_database_holds_fails_the_job_with_it_made_storable(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, answer: Behaviour
) -> None:
    FakeFal(hostile)
    hostile.route("POST", re.escape("/fal-ai/wan-22"), answer)
    job_id, rt = _one_job(engine, hostile, tmp_path)

    assert submit(rt, job_id) == "failed"

    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.state.value == "failed"
    assert job.error is not None
    assert job.error.startswith(f"HTTP 422: invalid{SHOWN} input")
    assert NUL not in job.error


def _completed(engine: Engine, rt: Runtime, job_id: str) -> str:
    """Submit the job and hear fal complete it; its request id."""
    assert submit(rt, job_id) == "submitted"
    with db.read_scope(engine) as session:
        request_id = store.get_job(session, job_id).request_id
    assert request_id is not None
    assert apply_seen(rt, [completion_heard(engine, rt, job_id)]) == 1
    return request_id


@pytest.mark.timeout(120)  # before the fix the answer took 5 min to drip in
def test_a_result_answer_dripped_in_is_given_up_on_and_asked_again_later(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """One byte every 0.1 s, read timeout 0.5 s: no read ever timed out and the job stayed
    ``downloading`` for as long as the answer lasted. Now the read timeout is also the whole
    answer's budget: each try fails, is retried, and the result is asked for again later."""
    fal = FakeFal(hostile)
    job_id, rt = _one_job(engine, hostile, tmp_path, read_timeout=0.5)
    request_id = _completed(engine, rt, job_id)
    answer = json.dumps(fal.result_for(request_id)).encode() + b" " * 3000
    fal.on_result(request_id, drip(answer, every=0.1, headers={"Content-Type": "application/json"}))

    assert download(rt, job_id) == "result-retry"

    assert fal.result_calls(request_id) == 3  # the client's bounded retry of a failed call
    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.state.value == "downloading"
    assert job.download_attempts == 1
    assert fal.posts() == 1


def test_a_padded_download_is_stopped_just_past_the_size_fal_described(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """The result says ``file_size`` N; the file has no Content-Length and never ends. Before,
    each attempt read and wrote up to WANBATCH_DOWNLOAD_MAX_BYTES before failing."""
    fal = FakeFal(hostile)
    job_id, rt = _one_job(engine, hostile, tmp_path, download_attempts=2, download_max_bytes=64 * 1024 * 1024)
    request_id = _completed(engine, rt, job_id)
    sent: list[int] = []

    def padded(req: Recorded, sock: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: video/mp4\r\n\r\n"  # no length
        sock.sendall(head + fal.video)
        block = b"\0" * 65536
        total = 0
        try:
            while not req.stop.is_set() and total < 256 * 1024 * 1024:
                sock.sendall(block)
                total += len(block)
        finally:
            sent.append(total)

    fal.on_file(f"{request_id}.mp4", padded)

    assert [download(rt, job_id) for _ in range(2)] == ["download-retry", "failed"]

    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.error_type == "download_failed"
    assert f"padded: more than the {len(fal.video)} bytes fal described" in (job.error or "")
    assert len(sent) == 2
    assert max(sent) < 16 * 1024 * 1024  # what the sockets' buffers hold, far below the cap
    assert not list((tmp_path / "out").rglob("*.part"))


def json_text(text: str, status: int = 200) -> Behaviour:
    """Answer with ``text`` as it is: JSON that ``json.dumps`` never writes (``1e999``, an
    integer of thousands of digits)."""
    return raw_reply(text.encode(), status, {"Content-Type": "application/json"})


def _with(body: dict[str, Any], **numbers: str) -> str:
    """``body`` as JSON text, each of ``numbers`` (a field) set to the literal number given."""
    text = json.dumps({**body, **{name: f"@{name}@" for name in numbers}})
    for name, literal in numbers.items():
        text = text.replace(f'"@{name}@"', literal)
    return text


#: JSON numbers Python's json reads as ±infinity (valid JSON: no ``Infinity`` in the text), and an
#: integer longer than Python converts (4,300 digits): what a hostile fal may answer with.
INFINITE = ["1e999", "-1e400"]
HUGE = "9" * 5000


def _strict(path: Path) -> Any:
    """A sidecar as a strict JSON reader has it (``NaN``/``Infinity`` are no JSON)."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"{path} holds {name}, which is no JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.mark.parametrize("number", [*INFINITE, HUGE], ids=["1e999", "-1e400", "5000-digits"])
def test_a_number_no_database_holds_in_a_status_and_result_is_read_as_null(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, number: str
) -> None:
    """Before, ``1e999`` became ``inf``, which PostgreSQL refused (the download failed on every
    try, the job stuck ``downloading``) and SQLite stored as ``Infinity`` (the sidecar no JSON);
    an integer of 5,000 digits made the answer "not JSON": the status broke the protocol, the
    paid video was never fetched."""
    fal, job_id, request_id, rt = _submitted(engine, hostile, tmp_path)
    status = _with({"status": "COMPLETED", "logs": None}, metrics=f'{{"inference_time": {number}}}')
    fal.on_status(request_id, json_text(status))
    fal.on_result(request_id, json_text(_with(fal.result_for(request_id), seed=number, timing=number)))
    assert apply_seen(rt, [completion_heard(engine, rt, job_id)]) == 1

    assert download(rt, job_id) == "succeeded"

    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert (job.state.value, job.seed) == ("succeeded", None)
    assert job.provider_metrics == {"inference_time": None}
    assert job.provider_output is not None
    assert (job.provider_output["seed"], job.provider_output["timing"]) == (None, None)
    assert job.output_path is not None
    sidecar = _strict(sidecar_path(Path(job.output_path)))
    assert sidecar["seed"] is None


def test_a_queue_position_of_thousands_of_digits_is_no_broken_answer(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """Before, the submit answer was "not JSON" (``submit_unknown``: maybe queued, maybe billed)
    and an IN_QUEUE status "not a JSON object", which failed the job after 5 of them."""
    fal = FakeFal(hostile)
    accepted = {"request_id": "r1", "status": "IN_QUEUE"}
    hostile.route("POST", re.escape("/fal-ai/wan-22"), json_text(_with(accepted, queue_position=HUGE)))
    job_id, rt = _one_job(engine, hostile, tmp_path)

    assert submit(rt, job_id) == "submitted"

    with db.read_scope(engine) as session:
        assert store.get_job(session, job_id).request_id == "r1"
    fal.on_status("r1", json_text(_with({"status": "IN_QUEUE"}, queue_position=HUGE)))
    status = rt.client.status(rt.client.handle("fal-ai/wan-22", "r1"))
    assert (status.state, status.queue_position) == ("IN_QUEUE", None)  # before: ProviderProtocolError
