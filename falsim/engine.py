"""The simulated fal account: a queue, a concurrency limit, runners, results, webhooks.

Everything here runs on the server's event loop (HTTP handlers call in; nothing blocks except
video encoding, which goes to a small thread pool). The life of a request is fal's:

``IN_QUEUE`` (while the account already runs ``concurrency_limit`` requests; normal priority
before low) → ``IN_PROGRESS`` (the "runner": validate, make the video, wait out the drawn
latency) → ``COMPLETED``, successful or not — fal has no FAILED state. The result endpoint
then replays the model's answer until the result expires.

Choices made where fal's queue documentation (https://docs.fal.ai/model-endpoints/queue) is
silent or vague:

- Cancel while queued removes the request; it shows COMPLETED with ``error_type``
  ``client_cancelled`` and its result is 499 ``{"detail", "error_type"}``; it is not billed.
  Cancel while running is best effort: with ``cancel_stops_running`` the runner stops and the
  request ends the same way, but billed (GPU time was spent); otherwise it runs to the end.
- An invalid input (422) is COMPLETED *without* ``error`` in the status (live fal was observed
  to surface validation errors only at the result), while model/infra errors carry
  ``error``/``error_type`` in the status too.
- A model error (an ``error_type``) below HTTP 500 is billed when the status reports inference
  time, as fal's FAQ says of client-side errors ("may still be charged if a runner spent GPU
  time"); at 500 and above it never is ("Server errors (HTTP 500+) are never charged").
- An expired result answers 404 ``{"detail": "Result of request … has expired"}``.
- A start timeout (``X-Fal-Request-Start-Timeout``) that passes while queued completes the
  request with 504, ``error_type`` ``request_timeout`` and ``X-Fal-Request-Timeout-Type: user``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import ssl
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx

from falsim import media
from falsim.faults import FaultPlan
from falsim.ledger import Ledger, LedgerEntry, LedgerReport
from falsim.options import ERROR_STATUS, SimulatorOptions
from falsim.storage import FileStore
from falsim.validation import decode_data_uri, validate_input
from falsim.webhooks import Delivery, WebhookSigner, deliver, webhook_body
from jobs.endpoints import EndpointSpec
from jobs.errors import WanbatchError
from jobs.http_environment import is_loopback_host
from jobs.media import MediaKind, classify
from jobs.pricing import estimate_job

IN_QUEUE, IN_PROGRESS, COMPLETED = "IN_QUEUE", "IN_PROGRESS", "COMPLETED"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def canonical_sha256(payload: Any) -> str:
    """The hash the ledger uses to spot the same input submitted twice."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Outcome:
    """What the runner answered: replayed by the result endpoint and the webhook."""

    kind: str  # ok | error | invalid | cancelled | timeout
    status_code: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None
    billed: bool = False
    units: Decimal = Decimal(0)
    usd: Decimal = Decimal(0)
    seed: int | None = None
    output_sha256: str | None = None
    encode_seconds: float | None = None


@dataclass
class SimRequest:
    """One request in the simulated queue."""

    request_id: str
    endpoint: EndpointSpec
    payload: Any
    priority: str
    webhook_url: str | None
    store_io: bool
    file_ttl: float | None
    generation: int
    gateway_request_id: str = ""
    state: str = IN_QUEUE
    started: float | None = None  # loop time
    start_deadline: float | None = None  # loop time: timed out if still queued then (start timeout)
    completed: float | None = None
    result_expires_at: float | None = None  # wall time
    logs: list[dict[str, Any]] = field(default_factory=list)
    outcome: Outcome | None = None
    task: asyncio.Task[None] | None = None
    #: Taken back finished (:meth:`Engine.take_back_finished`): made again only to serve its video.
    finished_before: bool = False

    def log(self, message: str, level: str = "INFO") -> None:
        """Append a log line in fal's shape."""
        self.logs.append({"message": message, "level": level, "source": "USER", "timestamp": _now_iso()})


def _loopback_ssl_context() -> ssl.SSLContext:
    """The TLS trust of webhook deliveries to loopback: ``SSL_CERT_FILE``/``SSL_CERT_DIR`` as
    httpx reads them (:func:`httpx.create_ssl_context` does even for a client that turns the
    proxy variables off with ``trust_env=False``), else certifi's. A receiver on this machine
    behind a local TLS proxy is trusted the documented way; before, these deliveries trusted
    certifi's bundle only and every one failed its TLS handshake. A certificate variable httpx
    cannot use (the deleted CA file of an earlier ``simulator --tls``) falls back to certifi's:
    the simulator still starts, and only an HTTPS receiver that needed it fails."""
    try:
        return httpx.create_ssl_context()
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return httpx.create_ssl_context(trust_env=False)


class Engine:
    """The simulated account. Create it anywhere; :meth:`start` binds it to the serving loop."""

    def __init__(self, options: SimulatorOptions | None = None) -> None:
        self.options = options or SimulatorOptions()
        seed = self.options.rng_seed
        self.rng = random.Random(seed)
        self.faults = FaultPlan(self.options.faults, rng=random.Random(None if seed is None else seed + 1))
        self.ledger = Ledger()
        self.store = FileStore()
        self.videos = media.VideoFactory(self.options.video_variants)
        self.signer = WebhookSigner()
        self.deliveries: list[Delivery] = []
        self.base_url = ""
        #: The URL the server was started on (its bound host, or 127.0.0.1 for every interface),
        #: whatever ``public_url`` says: a ``Host`` the control API answers (:mod:`falsim.app`).
        self.served_url = ""
        self._requests: dict[str, SimRequest] = {}
        self._queue: list[SimRequest] = []
        self._running = 0
        self._generation = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(
            max(1, self.options.encode_workers), thread_name_prefix="sim-encode"
        )
        #: Webhook deliveries to this machine's loopback (the receiver of a test, of a ``run
        #: --simulate``): direct, whatever ``HTTP_PROXY`` says (a proxy elsewhere cannot reach it),
        #: trusting ``SSL_CERT_FILE``/``SSL_CERT_DIR`` all the same: made on first use.
        self._http: httpx.AsyncClient | None = None
        #: Deliveries elsewhere, through the proxy the environment names: made on first use.
        self._proxied: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.changed = asyncio.Event()
        #: The server is shutting down: open status streams end (see :meth:`close_streams`).
        self.closing = False
        #: :meth:`stop` is under way: a runner it stops is not a client's cancel (nothing billed).
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, base_url: str) -> None:
        """Bind to the running loop; ``base_url`` goes into every URL the simulator hands out."""
        self._loop = asyncio.get_running_loop()
        self.served_url = base_url.rstrip("/")
        self.base_url = (self.options.public_url or base_url).rstrip("/")
        self.store.base_url = self.base_url
        self._http = None
        self._proxied = None
        self.changed = asyncio.Event()
        self.closing = False
        self._stopping = False

    async def stop(self) -> None:
        """Cancel runners and deliveries, close the webhook client.

        A request still queued or running is left as it is in the ledger: accepted, not
        completed, not billed. The simulator's process ends (a stopped ``run --simulate``), not
        the request: fal would run it to the end and bill it once, and the next run's simulator,
        given it back (:meth:`falsim.server.SimulatorHandle.resume`), does — billed there, once.
        """
        self._stopping = True
        await self._cancel_tasks()
        for client in (self._http, self._proxied):
            if client is not None:
                await client.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def close_streams(self) -> None:
        """The server is shutting down: every open status stream ends now, as if its client had
        read to the end, and every answer a ``submit_slow`` or ``status_slow`` fault holds is
        sent now. Called in the serving loop before uvicorn waits for open responses; one left
        open would be cut off once ``timeout_graceful_shutdown`` passed (answered 503 by
        :class:`jobs.asgi_shutdown.EndsCleanly`)."""
        self.closing = True
        self._notify()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The serving loop (for thread-safe calls from tests)."""
        assert self._loop is not None, "engine not started"
        return self._loop

    async def reset(self) -> None:
        """Forget every request, file, delivery and fault; fresh ledger. Options are kept."""
        self._generation += 1
        await self._cancel_tasks()
        self._requests.clear()
        self._queue.clear()
        self._running = 0
        self.ledger = Ledger()
        self.store.clear()
        self.deliveries.clear()
        self.faults.reset()  # and the counts of faults fired: a fresh ledger's
        self._notify()

    def ledger_report(self) -> LedgerReport:
        """The whole ledger: its snapshot, the webhook deliveries, the faults and render times."""
        return LedgerReport(
            **self.ledger.snapshot(),
            webhooks=[d.as_dict() for d in self.deliveries],
            faults=self.faults.snapshot(),
            encode_seconds=list(self.videos.encode_seconds),
        )

    def update_options(self, changes: dict[str, Any]) -> None:
        """Change options at runtime (e.g. the concurrency limit); queued requests may start."""
        self.options = self.options.updated(changes)
        self._dispatch()

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _notify(self) -> None:
        """Wake SSE streams: they hold the old event, which is set; new waiters get a new one."""
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    # -- queue -----------------------------------------------------------------------------

    def submit(
        self,
        endpoint: EndpointSpec,
        payload: Any,
        *,
        priority: str = "normal",
        webhook_url: str | None = None,
        start_timeout: float | None = None,
        store_io: bool | None = None,
        file_ttl: float | None = None,
        fallbacks_disabled: bool = False,
        request_id: str | None = None,
    ) -> SimRequest:
        """Queue a request; it is dispatched on the next loop turn so the submit answer says IN_QUEUE.

        ``request_id``: take back a request an earlier simulator process accepted (see
        :meth:`falsim.server.SimulatorHandle.resume`) under its own id; one already known is
        returned as it is.
        """
        if request_id is not None and request_id in self._requests:
            return self._requests[request_id]
        rid = request_id or str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        req = SimRequest(
            request_id=rid,
            gateway_request_id=rid,
            endpoint=endpoint,
            payload=payload,
            priority="low" if priority == "low" else "normal",
            webhook_url=webhook_url,
            store_io=self.options.store_io_default if store_io is None else store_io,
            file_ttl=file_ttl,
            generation=self._generation,
        )
        self._requests[rid] = req
        if req.priority == "normal":
            index = next((i for i, q in enumerate(self._queue) if q.priority == "low"), len(self._queue))
            self._queue.insert(index, req)
        else:
            self._queue.append(req)
        self.ledger.accept(
            LedgerEntry(
                request_id=rid,
                endpoint=endpoint.id,
                input_sha256=canonical_sha256(payload),
                accepted_at=time.time(),
                priority=req.priority,
                start_timeout=start_timeout,
                fallbacks_disabled=fallbacks_disabled,
                webhook_url=webhook_url,
            )
        )
        loop = asyncio.get_running_loop()
        if start_timeout is not None:
            req.start_deadline = loop.time() + start_timeout
            loop.call_later(start_timeout, self._start_deadline, req)
        loop.call_soon(self._dispatch)
        self._notify()
        return req

    def take_back_finished(
        self, endpoint: EndpointSpec, payload: Any, *, request_id: str, seed: int | None = None
    ) -> SimRequest:
        """Take back a request an earlier simulator process finished, whose result or video its
        client has not downloaded yet (see :meth:`falsim.server.SimulatorHandle.resume`).

        fal keeps a finished request's result and video: it never runs it again, nor bills it
        twice. So the request is made again here only to serve its video (from ``seed``,
        the seed its result carried, when known): under its own id, on no runner, no
        fault fired, and unbilled — the earlier simulator billed it. Its result is there as soon
        as the video is made again (until then the result call answers "still in progress"). One
        already known is returned as it is.
        """
        if request_id in self._requests:
            return self._requests[request_id]
        req = SimRequest(
            request_id=request_id,
            gateway_request_id=request_id,
            endpoint=endpoint,
            payload=payload,
            priority="normal",
            webhook_url=None,
            store_io=self.options.store_io_default,
            file_ttl=None,
            generation=self._generation,
            state=IN_PROGRESS,
            finished_before=True,
        )
        self._requests[request_id] = req
        self.ledger.accept(
            LedgerEntry(
                request_id=request_id,
                endpoint=endpoint.id,
                input_sha256=canonical_sha256(payload),
                accepted_at=time.time(),
            )
        )
        req.started = self.loop.time()
        req.task = self._spawn(self._remake(req, seed))
        self._notify()
        return req

    async def _remake(self, req: SimRequest, seed: int | None) -> None:
        """Make a taken-back finished request's video again (:meth:`take_back_finished`)."""
        outcome = await self._run_model(req, seed=seed, faults=False)
        outcome = replace(outcome, billed=False, units=Decimal(0), usd=Decimal(0))
        if req.generation == self._generation:
            self._finish(req, outcome, was_running=False)

    def get(self, request_id: str, app_base: str | None = None) -> SimRequest | None:
        """The request, if it exists (and belongs to ``app_base`` when given)."""
        req = self._requests.get(request_id)
        if req is None or (app_base is not None and req.endpoint.app_base != app_base):
            return None
        return req

    def queue_position(self, req: SimRequest) -> int:
        """0-based: how many requests are ahead of ``req``."""
        try:
            return self._queue.index(req)
        except ValueError:
            return 0

    def _dispatch(self) -> None:
        overdue: list[SimRequest] = []
        while self._queue and self._running < self.options.concurrency_limit:
            req = self._queue.pop(0)
            if req.start_deadline is not None and self.loop.time() >= req.start_deadline:
                # Its start timeout has passed, though the timer has not fired yet (the loop was
                # busy): fal never starts such a request; it times out, as the timer would.
                overdue.append(req)
                continue
            req.state = IN_PROGRESS
            req.started = self.loop.time()
            self._running += 1
            self.ledger.started(req.request_id)
            req.log("Runner acquired; starting inference")
            req.task = self._spawn(self._process(req))
        for req in overdue:  # after the loop: finishing one dispatches again
            self._time_out(req)
        self._notify()

    def _start_deadline(self, req: SimRequest) -> None:
        if req.state != IN_QUEUE or req.generation != self._generation:
            return
        self._queue.remove(req)
        self._time_out(req)

    def _time_out(self, req: SimRequest) -> None:
        """End a queued request (already out of the queue) whose start timeout passed: 504
        ``request_timeout``, never started, not billed."""
        detail = "Request timed out before it started"
        self._finish(
            req,
            Outcome(
                kind="timeout",
                status_code=504,
                body={"detail": detail, "error_type": "request_timeout"},
                headers={"X-Fal-Error-Type": "request_timeout", "X-Fal-Request-Timeout-Type": "user"},
                error=detail,
                error_type="request_timeout",
            ),
            was_running=False,
        )

    # -- runner ----------------------------------------------------------------------------

    def _latency(self, spec: EndpointSpec) -> float:
        opts = self.options
        base = (
            opts.latency_seconds
            if opts.latency_seconds is not None
            else spec.typical_seconds * opts.latency_factor
        )
        return max(0.0, base * (1 + self.rng.uniform(-opts.latency_jitter, opts.latency_jitter)))

    async def _process(self, req: SimRequest) -> None:
        loop = asyncio.get_running_loop()
        latency = self._latency(req.endpoint)
        try:
            outcome = await self._run_model(req)
            wait = latency if outcome.kind in ("ok", "error") else latency * 0.1
            assert req.started is not None
            await asyncio.sleep(max(0.0, req.started + wait - loop.time()))
        except asyncio.CancelledError:
            if req.generation != self._generation or self._stopping:
                raise  # reset, or the simulator stops: no client cancelled it (:meth:`stop`)
            outcome = self._cancelled(req, billed=True)
        if req.generation == self._generation:
            self._finish(req, outcome, was_running=True)

    def _cancelled(self, req: SimRequest, *, billed: bool) -> Outcome:
        detail = "Request cancelled by client"
        units, usd = self._price(req.endpoint, req.payload if isinstance(req.payload, dict) else {})
        return Outcome(
            kind="cancelled",
            status_code=499,
            body={"detail": detail, "error_type": "client_cancelled"},
            headers={"X-Fal-Error-Type": "client_cancelled"},
            error=detail,
            error_type="client_cancelled",
            billed=billed,
            units=units if billed else Decimal(0),
            usd=usd if billed else Decimal(0),
        )

    def _price(self, spec: EndpointSpec, resolved: dict[str, Any]) -> tuple[Decimal, Decimal]:
        try:
            est = estimate_job(spec.id, resolved)
        except (ValueError, ArithmeticError, WanbatchError):
            return Decimal(0), Decimal(0)
        return est.billing_units, est.usd

    async def _run_model(self, req: SimRequest, *, seed: int | None = None, faults: bool = True) -> Outcome:
        """Validate the input and make the video. ``seed``: the one to make it with when the
        input has none (a taken-back request's, :meth:`take_back_finished`); ``faults``: whether
        the model's faults may fire (not for a request made again only to serve its video)."""
        spec = req.endpoint
        fault = self.faults.fire("model_error") if faults else None
        if fault is not None:
            error_type = str(fault.get("error_type", "runner_disconnected"))
            status = int(fault.get("status", ERROR_STATUS.get(error_type, 500)))
            detail = str(fault.get("detail", f"Simulated model error: {error_type}"))
            req.log(detail, "ERROR")
            return Outcome(
                kind="error",
                status_code=status,
                body={"detail": detail, "error_type": error_type},
                headers={"X-Fal-Error-Type": error_type},
                error=detail,
                error_type=error_type,
            )
        resolved, errors = validate_input(
            spec,
            req.payload,
            extra=self.options.extra_fields,
            local_file_exists=self.store.lookup_url,
            local_file_data=self.store.data_for_url,
        )
        if resolved is None:
            req.log("Input validation failed", "ERROR")
            billed = self.options.bill_validation_errors
            units, usd = self._price(spec, req.payload) if billed else (Decimal(0), Decimal(0))
            return Outcome(
                kind="invalid", status_code=422, body={"detail": errors}, billed=billed, units=units, usd=usd
            )
        if resolved.get("seed") is not None:
            seed = resolved["seed"]
        elif seed is None:
            seed = self.rng.getrandbits(32)
        geo = media.geometry(spec, resolved, self._image_size(spec, resolved))
        bad_render = self.faults.fire("bad_render") if faults else None
        if bad_render is not None:
            geo = media.bad_geometry(geo, bad_render)
        tag = media.output_tag(spec.id, self._content_identity(spec, resolved), seed)
        req.log(
            f"Generating {geo.num_frames} frames at {geo.width}x{geo.height}, {geo.fps} fps (seed {seed})"
        )
        began = time.perf_counter()
        data = await asyncio.get_running_loop().run_in_executor(
            self._executor, self.videos.render, geo, tag, seed
        )
        render_seconds = time.perf_counter() - began
        bad_name = self.faults.fire("bad_file_name") if faults else None
        name = (
            str(bad_name.get("name", "../../escape.mp4")) if bad_name is not None else f"wan_{tag[:16]}.mp4"
        )
        videos = self.videos
        stored = self.store.put(
            lambda: videos.render(geo, tag, seed), name, "video/mp4", size=len(data), expires_in=req.file_ttl
        )
        video: dict[str, Any] = {
            "url": self.store.file_url(stored.key, name),
            "content_type": "video/mp4",
            "file_name": name,
            "file_size": len(data),
        }
        if "duration" in resolved:  # Wan 2.5 / 2.6 describe the video fully
            video.update(
                width=geo.width,
                height=geo.height,
                fps=float(geo.fps),
                duration=geo.duration,
                num_frames=geo.num_frames,
            )
        output: dict[str, Any] = {"video": video, "seed": seed}
        if "actual_prompt" in spec.extra_outputs and resolved.get("enable_prompt_expansion"):
            output["actual_prompt"] = (
                f"{resolved.get('prompt', '')} The camera moves slowly; soft natural light "
                f"(expansion {tag[:6]})."
            ).strip()
        req.log("Inference finished")
        units, usd = self._price(spec, resolved)
        return Outcome(
            kind="ok",
            status_code=200,
            body=output,
            billed=True,
            units=units,
            usd=usd,
            seed=seed,
            output_sha256=hashlib.sha256(data).hexdigest(),
            encode_seconds=render_seconds,
        )

    def _media_bytes(self, url: str) -> bytes | None:
        """The bytes the model would download for a media value: a data URI's, or a file this
        simulator stores (its uploads); None for any other URL (there is no internet here)."""
        return decode_data_uri(url) if classify(url) is MediaKind.DATA_URI else self.store.data_for_url(url)

    def _content_identity(self, spec: EndpointSpec, resolved: dict[str, Any]) -> dict[str, Any]:
        """``resolved`` as the model sees it: each media value it can read stands for its bytes.

        The real model downloads a file and works on its content; the URL it came from plays no
        part. Each upload gets a fresh storage URL (a new ``--simulate`` run uploads the same image
        again under another key), and the same bytes may arrive inline as a data URI instead, so
        hashing the URL would give the same image and seed a different video. Those values count
        as ``sha256:<hex of the bytes>``; an external URL, never fetched, counts as itself.
        """
        identity = dict(resolved)
        for fld in spec.media_fields:
            value = resolved.get(fld.name)
            if not isinstance(value, str):
                continue
            data = self._media_bytes(value)
            if data is not None:
                identity[fld.name] = "sha256:" + hashlib.sha256(data).hexdigest()
        return identity

    def _image_size(self, spec: EndpointSpec, resolved: dict[str, Any]) -> tuple[int, int] | None:
        for fld in spec.media_fields:
            if fld.type.value != "image" or not resolved.get(fld.name):
                continue
            data = self._media_bytes(str(resolved[fld.name]))
            if data is None:
                return None
            try:
                from PIL import Image

                with Image.open(io.BytesIO(data)) as img:
                    return img.size
            except Exception:  # an unreadable image simply means "size unknown"
                return None
        return None

    def _inference_time(self, req: SimRequest) -> float | None:
        """The ``metrics.inference_time`` the status reports: seconds a runner had it, or None."""
        if req.started is None or req.completed is None:
            return None
        return round(req.completed - req.started, 6)

    def _bill_model_error(self, req: SimRequest, outcome: Outcome) -> Outcome:
        """``outcome`` as billed: a model error below 500 that a runner spent time on (the
        status reports inference time) is charged at the request's price, as fal's FAQ says of
        client-side errors; a 5xx, or one that never ran, is not."""
        if outcome.kind != "error" or outcome.status_code >= 500 or outcome.billed:
            return outcome
        if not self._inference_time(req):
            return outcome
        units, usd = self._price(req.endpoint, req.payload if isinstance(req.payload, dict) else {})
        return replace(outcome, billed=True, units=units, usd=usd)

    def _finish(self, req: SimRequest, outcome: Outcome, *, was_running: bool) -> None:
        req.state = COMPLETED
        req.completed = self.loop.time()
        outcome = self._bill_model_error(req, outcome)
        req.outcome = outcome
        if was_running:
            self._running -= 1
        if outcome.kind == "ok":
            req.log("Request completed")
        now = time.time()
        if self.faults.fire("result_expired") is not None:
            req.result_expires_at = now
        elif req.store_io:
            req.result_expires_at = now + self.options.stored_result_ttl_seconds
        else:
            size = len(json.dumps(outcome.body).encode())
            large = size >= self.options.large_result_bytes
            ttl = self.options.large_result_ttl_seconds if large else self.options.result_ttl_seconds
            req.result_expires_at = now + ttl
        self.ledger.completed(
            req.request_id,
            was_running,
            outcome=outcome.kind,
            status_code=outcome.status_code,
            error_type=outcome.error_type,
            seed=outcome.seed,
            billed=outcome.billed,
            billing_units=outcome.units,
            usd=outcome.usd,
            output_sha256=outcome.output_sha256,
            encode_seconds=outcome.encode_seconds,
        )
        if req.webhook_url:
            self._spawn(self._send_webhook(req, outcome))
        self._dispatch()

    # -- client operations -----------------------------------------------------------------

    def cancel(self, req: SimRequest) -> tuple[int, dict[str, Any]]:
        """fal's cancel: 202 CANCELLATION_REQUESTED, or 400 ALREADY_COMPLETED."""
        if req.state == COMPLETED or req.finished_before:
            return 400, {"status": "ALREADY_COMPLETED"}
        if req.state == IN_QUEUE:
            self._queue.remove(req)
            self._finish(req, self._cancelled(req, billed=False), was_running=False)
        else:
            req.log("Cancellation requested", "WARN")
            if self.options.cancel_stops_running and req.task is not None:
                req.task.cancel()
        return 202, {"status": "CANCELLATION_REQUESTED"}

    def urls(self, req: SimRequest) -> dict[str, str]:
        """response/status/cancel URLs: owner/alias only, the endpoint sub-path dropped (as fal)."""
        base = f"{self.base_url}/{req.endpoint.app_base}/requests/{req.request_id}"
        return {"response_url": base, "status_url": base + "/status", "cancel_url": base + "/cancel"}

    def status_body(self, req: SimRequest, with_logs: bool, logs_from: int = 0) -> dict[str, Any]:
        """The status object of fal's status endpoint (and of each SSE event)."""
        body: dict[str, Any] = {"status": req.state, "request_id": req.request_id, **self.urls(req)}
        if req.state == IN_QUEUE:
            body["queue_position"] = self.queue_position(req)
            return body
        body["logs"] = list(req.logs[logs_from:]) if with_logs else None
        if req.state == COMPLETED:
            assert req.outcome is not None
            body["metrics"] = {"inference_time": self._inference_time(req)}
            if req.outcome.kind != "ok" and req.outcome.kind != "invalid":
                body["error"] = req.outcome.error
                body["error_type"] = req.outcome.error_type
        return body

    def result(self, req: SimRequest) -> tuple[int, Any, dict[str, str]]:
        """What ``GET response_url`` answers: status, JSON body, headers."""
        headers = {"x-fal-request-id": req.request_id}
        if req.state != COMPLETED or req.outcome is None:
            return 400, {"detail": "Request is still in progress"}, headers
        if req.result_expires_at is not None and time.time() >= req.result_expires_at:
            return 404, {"detail": f"Result of request {req.request_id} has expired"}, headers
        return req.outcome.status_code, req.outcome.body, {**headers, **req.outcome.headers}

    # -- webhooks --------------------------------------------------------------------------

    def _webhook_client(self, url: str) -> httpx.AsyncClient:
        """The client a delivery to ``url`` goes out on: the direct one for this machine's
        loopback, else the one that honours the proxy variables (made now, the first time:
        httpx raises for a variable it cannot use, which fails that delivery only)."""
        try:
            host = httpx.URL(url).host
        except httpx.InvalidURL:
            host = ""
        if is_loopback_host(host):
            if self._http is None:
                self._http = httpx.AsyncClient(trust_env=False, verify=_loopback_ssl_context())
            return self._http
        if self._proxied is None:
            self._proxied = httpx.AsyncClient()
        return self._proxied

    async def _send_webhook(self, req: SimRequest, outcome: Outcome) -> None:
        assert req.webhook_url is not None
        record = Delivery(request_id=req.request_id, url=req.webhook_url)
        self.deliveries.append(record)
        if self.faults.fire("webhook_drop") is not None:
            record.dropped = True
            return
        try:
            client = self._webhook_client(req.webhook_url)
        except (ImportError, ValueError, OSError, httpx.InvalidURL) as exc:  # a proxy variable httpx refuses
            record.attempts.append({"at": time.time(), "error": type(exc).__name__})
            return
        ok = outcome.kind == "ok"
        body = webhook_body(
            req.request_id,
            req.gateway_request_id,
            ok,
            outcome.body,
            None if ok else f"Invalid status code: {outcome.status_code}",
        )
        opts = self.options
        times = 2 if self.faults.fire("webhook_duplicate") is not None else 1
        for _ in range(times):
            await deliver(
                client,
                record,
                body,
                lambda: self.signer.headers(
                    req.request_id, opts.user_id, body, skew=opts.webhook_clock_skew_seconds
                ),
                attempts=opts.webhook_attempts,
                base_delay=opts.webhook_retry_base_seconds,
                max_delay=opts.webhook_retry_max_seconds,
                timeout=opts.webhook_timeout_seconds,
            )
