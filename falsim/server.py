"""Running the simulator: blocking (``wanbatch simulator``) or in a background thread (tests, ``--simulate``).

- :func:`serve` blocks until interrupted; ``wanbatch simulator`` maps its flags onto
  :class:`SimulatorOptions`. With ``tls=True`` (``--tls``) it serves HTTPS with a throw-away
  self-signed certificate in a temporary folder, prints the CA file and the settings that point
  fal_client and wanbatch at it (:func:`falsim.tls.client_settings`), and deletes the folder
  as it stops, before a SIGTERM that stopped it ends the process.
- :func:`running_simulator` starts it on a free loopback port in a daemon thread and yields a
  :class:`SimulatorHandle` (``.url``, ``.ledger()``, ``.set_faults(...)``, ``.reset()``,
  ``.update_options(...)``, ``.stop()``). Point ``WANBATCH_FAL_QUEUE_URL`` and
  ``WANBATCH_FAL_REST_URL`` at ``handle.url``: one server plays both.

The socket is bound before uvicorn starts, so the URL (and the URLs the simulator writes into
its answers) is known up front even for port 0. With ``tls=True`` a throw-away self-signed
certificate is made; ``handle.ca_file`` is what a client must trust (fal's own client only
speaks https).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from falsim.app import SimulatorApp
from falsim.engine import Engine
from falsim.ledger import LedgerReport
from falsim.options import SimulatorOptions
from falsim.tls import client_settings, make_self_signed
from jobs.asgi_shutdown import EndsCleanly, ForcedExitEndsShutdown
from jobs.endpoints import get_endpoint
from jobs.errors import ConfigError

T = TypeVar("T")


def _bind(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets whose proto says TCP, and
    # without it Nagle + delayed ACK add ~40 ms to every loopback request.
    sock = socket.socket(
        socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections made before uvicorn takes over wait in the backlog
    sock.set_inheritable(True)
    return sock


def _base_url(sock: socket.socket, host: str, tls: bool) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 - we only display it
    if ":" in shown:
        shown = f"[{shown}]"
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def build_app(engine: Engine, base_url: str) -> ASGIApp:
    """The ASGI app, whose lifespan binds ``engine`` to the serving loop and URL."""
    sim = SimulatorApp(engine)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        engine.start(base_url)
        try:
            yield
        finally:
            await engine.stop()

    sim.starlette.router.lifespan_context = lifespan

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await sim(scope, receive, send)

    # Outermost: a request still running when the server stops (a slow client's download, a
    # second Ctrl-C) is answered 503, not logged with a traceback.
    return EndsCleanly(app)


class _Server(ForcedExitEndsShutdown, uvicorn.Server):
    """uvicorn's server, which ends the simulator's open status streams as it begins to shut down.

    uvicorn waits ``timeout_graceful_shutdown`` for open responses, then cancels them and logs
    an error and a traceback for each: an SSE stream only ends when its request does, so every
    stop with requests still running (Ctrl-C of ``run --simulate``) printed them. Ended first,
    the streams complete as responses do, and an error uvicorn logs is a real one.

    ``on_stopped`` runs once it has stopped, before uvicorn raises again the signal that stopped
    it: a SIGTERM then ends the process at once (its default action), and what ``serve`` holds
    (``--tls``'s certificate folder) would never be cleaned up after it.
    """

    def __init__(
        self, config: uvicorn.Config, engine: Engine, on_stopped: Callable[[], None] | None = None
    ) -> None:
        super().__init__(config)
        self._engine = engine
        self._on_stopped = on_stopped

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._engine.close_streams()
        await super().shutdown(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Inside uvicorn's own, whose exit raises the captured signals again.
        with super().capture_signals():
            try:
                yield
            finally:
                if self._on_stopped is not None:
                    self._on_stopped()


def _server(
    engine: Engine,
    sock: socket.socket,
    base_url: str,
    certfile: Path | None,
    keyfile: Path | None,
    on_stopped: Callable[[], None] | None = None,
    server_class: Callable[[type[uvicorn.Server]], type[uvicorn.Server]] | None = None,
) -> uvicorn.Server:
    from jobs.open_files import quiet_accept_errors

    quiet_accept_errors()  # out of file descriptors: one line now and then, not a traceback per try
    config = uvicorn.Config(
        build_app(engine, base_url),
        log_level="warning",
        access_log=False,
        lifespan="on",
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
        timeout_graceful_shutdown=1,
    )
    cls: Any = _Server if server_class is None else server_class(_Server)
    server: uvicorn.Server = cls(config, engine, on_stopped)
    return server


def serve(
    host: str = "127.0.0.1",
    port: int = 8787,
    options: SimulatorOptions | None = None,
    *,
    tls: bool = False,
    server_class: Callable[[type[uvicorn.Server]], type[uvicorn.Server]] | None = None,
) -> None:
    """Serve the simulator until interrupted (Ctrl-C); what ``wanbatch simulator`` runs.

    ``tls``: HTTPS, with a certificate made now for the host (and a ``public_url``'s), in a
    temporary folder deleted as it stops; the lines that follow the URL say how to trust it.
    ``server_class``: makes the uvicorn server class it is given into the one served with (the
    command's :func:`cli.service_commands.stopping_on_hangup`, so that a SIGHUP stops it as
    SIGTERM does, the folder deleted: uvicorn handles SIGINT and SIGTERM only).
    """
    sock = _bind(host, port)
    base_url = _base_url(sock, host, tls)
    engine = Engine(options)
    public_url = (engine.options.public_url or base_url).rstrip("/")  # as the engine writes it
    try:
        folder = _tls_folder() if tls else None
    except ConfigError:
        sock.close()
        raise
    try:
        certfile = keyfile = None
        if folder is not None:
            shown = urlsplit(base_url).hostname or host
            certfile, keyfile = make_self_signed(
                Path(folder.name), shown, also=[urlsplit(public_url).hostname or ""]
            )
        server = _server(
            engine,
            sock,
            base_url,
            certfile,
            keyfile,
            folder.cleanup if folder is not None else None,
            server_class,
        )
        print(f"fal simulator listening on {public_url}", flush=True)
        if certfile is not None:
            print("\n".join(client_settings(public_url, certfile)), flush=True)
        server.run(sockets=[sock])
    finally:
        if folder is not None:
            folder.cleanup()  # also when it never started (a second call does nothing)


class SimulatorHandle:
    """A simulator running in this process; every method is safe to call from any thread."""

    def __init__(self, engine: Engine, server: uvicorn.Server, thread: threading.Thread, url: str) -> None:
        self.engine = engine
        self.url = url
        self.ca_file: Path | None = None
        self._server = server
        self._thread = thread

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.engine.loop).result(timeout)

    def ledger(self) -> LedgerReport:
        """The ledger snapshot (same JSON as ``GET /_sim/ledger``)."""

        async def snap() -> LedgerReport:
            return self.engine.ledger_report()

        return self._call(snap())

    def set_faults(
        self, faults: dict[str, Any] | None = None, *, replace: bool = False, **kinds: Any
    ) -> None:
        """Add fault rules: ``set_faults(submit_429={"next": 2})`` or ``set_faults({...})``."""
        self.engine.faults.set({**(faults or {}), **kinds}, replace=replace)

    def update_options(self, **changes: Any) -> None:
        """Change options at runtime, e.g. ``update_options(concurrency_limit=5)``."""

        async def apply() -> None:
            self.engine.update_options(changes)

        self._call(apply())

    def resume(
        self,
        requests: Iterable[tuple[Any, ...]],
        finished: Iterable[tuple[str, str, Any, int | None]] = (),
    ) -> None:
        """Take back ``(endpoint id, request id, input[, start timeout])`` requests an earlier
        simulator accepted, and ``finished``: ``(endpoint id, request id, input, seed)`` requests
        it finished whose result or video was not downloaded yet.

        fal keeps a request whatever becomes of the client that sent it, so a batch stopped with
        Ctrl-C finds its requests still there when it is run again. A simulator that lived in
        the stopped process (``--simulate``) took them with it; given them back here, it runs
        them again under their own ids, as if they had been in its queue all along, and their
        results are there once they finish. A request it already knows is left as it is.

        ``start timeout``: the seconds left of the ``X-Fal-Request-Start-Timeout`` the request
        was sent with (None: it had none, or it had started). At 0 (its start deadline passed
        meanwhile) it is timed out in the queue at once, never started and not billed, as fal
        does with a request whose start timeout expires.

        A finished request is not run again, nor billed again: fal keeps its result and video.
        Its video is made again here only to be served (with ``seed``, the one its result
        carried, when known), and its result, with that video's URL on this simulator, is there
        once it is (:meth:`falsim.engine.Engine.take_back_finished`).
        """

        async def take() -> None:
            for endpoint_id, request_id, payload, seed in finished:
                self.engine.take_back_finished(
                    get_endpoint(endpoint_id), payload, request_id=request_id, seed=seed
                )
            for endpoint_id, request_id, payload, *rest in requests:
                start_timeout = rest[0] if rest else None
                self.engine.submit(
                    get_endpoint(endpoint_id),
                    payload,
                    request_id=request_id,
                    start_timeout=None if start_timeout is None else max(float(start_timeout), 0.0),
                )

        self._call(take())

    def upload(self, data: bytes, content_type: str, file_name: str) -> str:
        """Store ``data`` as a file uploaded to this simulator (as its storage upload endpoints
        do) and return the URL fal's flows would answer with."""
        stored = self.engine.store.put(data, file_name, content_type)
        return self.engine.store.file_url(stored.key, file_name)

    def reset(self) -> None:
        """Forget all requests, files, deliveries and faults; start a fresh ledger."""
        self._call(self.engine.reset())

    def jwks(self) -> dict[str, Any]:
        """The webhook-signing JWKS."""
        return self.engine.signer.jwks()

    def stop(self) -> None:
        """Shut the server down and wait for its thread."""
        self._server.should_exit = True
        self._thread.join(timeout=10)


def _tls_folder() -> tempfile.TemporaryDirectory[str]:
    """The temporary folder of the simulator's TLS certificate and key. No temporary folder is
    writable (a read-only ``/tmp``, as in ``docker --read-only``): one clear line, not the
    ``FileNotFoundError`` of :func:`tempfile.gettempdir` ("No usable temporary directory found",
    https://docs.python.org/3/library/tempfile.html#tempfile.gettempdir). Only TLS needs it."""
    try:
        return tempfile.TemporaryDirectory(prefix="wanbatch-sim-tls-")
    except OSError as exc:
        raise ConfigError(
            "the simulator's TLS certificate needs a writable temporary folder and none is usable "
            f"({exc.strerror or exc}): point TMPDIR at a writable folder, or run the simulator without TLS"
        ) from exc


@contextlib.contextmanager
def running_simulator(
    options: SimulatorOptions | None = None,
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    tls: bool = False,
) -> Iterator[SimulatorHandle]:
    """Run the simulator in a background thread for the duration of the ``with`` block.

    A temporary folder is made for ``tls`` only (its certificate): without TLS the simulator
    writes no file, and runs where no temporary folder is writable (a read-only ``/tmp``)."""
    with contextlib.ExitStack() as stack:
        certfile = keyfile = None
        if tls:
            tmp = stack.enter_context(_tls_folder())
            certfile, keyfile = make_self_signed(Path(tmp), host)
        sock = _bind(host, port)
        url = _base_url(sock, host, tls)
        engine = Engine(options)
        server = _server(engine, sock, url, certfile, keyfile)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fal-simulator", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError("the fal simulator did not start")
            time.sleep(0.01)
        handle = SimulatorHandle(engine, server, thread, engine.options.public_url or url)
        handle.ca_file = certfile
        try:
            yield handle
        finally:
            handle.stop()
            sock.close()
