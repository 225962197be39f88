"""The chaos harness: private Redis and PostgreSQL, the fal simulator, supervised workers.

Everything a scenario kills or restarts is started here, on free ports, in temporary folders,
so the shared services on 5432/6379 are never touched:

* :class:`RedisServer` — ``redis-server`` without persistence by default, so a restart loses
  every queued and unacknowledged Celery message.
* :class:`PostgresServer` — ``initdb`` + ``pg_ctl`` into a temporary folder; :meth:`crash` is
  ``pg_ctl stop -m immediate`` (no checkpoint, every connection dropped mid-transaction).
  ``initdb`` refuses to run as root, so as root it runs as the ``postgres`` user via
  ``runuser`` in a folder that user owns (CI runs as root).
* :class:`WorkerFleet` — N ``wanbatch worker`` processes, each in its own process group, and a
  supervisor thread that restarts any that die (like ``restart: unless-stopped``) and resumes
  any that stopped themselves at a chaos stop point once their lease has run out.

The simulator runs in the test process (``running_simulator``): its ledger is the outside
record of what fal accepted and billed, against which :mod:`chaos_invariants` checks.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

from tests.ports import unused_port

REPO = Path(__file__).resolve().parents[2]


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


# --------------------------------------------------------------------------- redis


class RedisServer:
    """A private ``redis-server``; ``appendonly`` keeps data across restarts, the default does not.
    ``args``: more of its settings (``--maxmemory 2mb``, ``--rename-command CONFIG ""``)."""

    def __init__(self, workdir: Path, *, appendonly: bool = False, args: tuple[str, ...] = ()) -> None:
        self.port = unused_port()
        self.dir = workdir
        self.appendonly = appendonly
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", "", "--appendonly", "yes" if self.appendonly else "no"]
        args += ["--maxmemory-policy", "noeviction", *self.args]
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        _wait(up, 15, f"redis on port {self.port}")
        client.close()

    def kill(self) -> None:
        """SIGKILL: no save, no goodbye to the clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, down_seconds: float = 1.0) -> None:
        self.kill()
        time.sleep(down_seconds)
        self.start()
        self.restarts += 1


# --------------------------------------------------------------------------- postgres


class PostgresServer:
    """A private PostgreSQL cluster in a temporary folder, crashable with ``-m immediate``."""

    def __init__(self) -> None:
        self.port = unused_port()
        # Not under pytest's tmp_path: that is private to the test user (0700) and, as root,
        # the server runs as ``postgres``, which must be able to enter the folder.
        self.root = Path(tempfile.mkdtemp(prefix="wanbatch-chaos-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.crashes = 0
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("running as root needs runuser to start PostgreSQL as user postgres")
            shutil.chown(self.root, "postgres", "postgres")
            self._as_postgres = [runuser, "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self._as_postgres, *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stdout}\n{done.stderr}")

    def init(self) -> None:
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N", "-E", "UTF8", "--locale=C"
        )

    def start(self) -> None:
        # fsync=off: a crash of the server process (what we inject) loses nothing with it, only
        # an OS crash would; it keeps 2-core CI runners from waiting on the disk.
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200 -c synchronous_commit=on"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "start"
        )
        _wait(self._accepts, 30, f"postgres on port {self.port}")

    def _accepts(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=1) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def crash(self) -> None:
        """``-m immediate``: the postmaster SIGQUITs every backend; recovery runs on next start."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def restart(self, down_seconds: float = 1.0) -> None:
        self.crash()
        time.sleep(down_seconds)
        self.start()
        self.crashes += 1

    def _processes(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, …), from ``postmaster.pid``
        and /proc; none when the server is not running."""
        try:
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        children = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    children.append(int(entry.name))
        return [postmaster, *children]

    def freeze(self) -> None:
        """SIGSTOP the whole server: its kernel still accepts connections and acknowledges
        every packet, but nothing ever answers (a hung host, a VM paused mid-query).

        The postmaster first, so that it forks no backend meanwhile, then its children, listed
        again until a listing finds none left running: a backend forked while /proc was being
        read (a client connecting at that moment, as a worker just started does) was never
        stopped, and went on answering its client — a database half frozen, which a stop
        watch rightly takes for one that answers, while the stop waits on the frozen rest
        (CI, loaded: "never: the first worker ends")."""
        found = self._processes()
        if not found:
            return
        stopped: set[int] = set()
        while found:
            for pid in found:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                stopped.add(pid)
            found = [pid for pid in self._processes() if pid not in stopped]

    def thaw(self) -> None:
        """SIGCONT what :meth:`freeze` stopped (harmless when nothing was)."""
        for pid in self._processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def destroy(self) -> None:
        self.thaw()  # a frozen server would never stop
        with contextlib.suppress(RuntimeError):
            self.crash()
        shutil.rmtree(self.root, ignore_errors=True)

    def leader_backend_port(self) -> int | None:
        """The client port of the connection holding the tick leader's advisory lock, if any."""
        with psycopg.connect(self.url, connect_timeout=2) as conn:
            row = conn.execute(
                "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted LIMIT 1"
            ).fetchone()
        return int(row[0]) if row and row[0] is not None else None


@contextlib.contextmanager
def migrated_postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL migrated to this version's schema; thawed and stopped whatever happens
    (the fixture of the tests that freeze or slow their own server, never the shared one)."""
    from jobs.db import make_engine, migrate

    server = PostgresServer()
    try:
        server.init()
        server.start()
        engine = make_engine(server.url)
        try:
            migrate(engine, from_models=False)
        finally:
            engine.dispose()
        yield server
    finally:
        server.destroy()  # thaws first


# --------------------------------------------------------------------------- workers


def _process_state(pid: int) -> str | None:
    """The one-letter state from /proc (``T`` = stopped), or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[0]


def _local_tcp_ports(pid: int) -> set[int]:
    """Local ports of the TCP sockets process ``pid`` holds (from /proc, no psutil needed)."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[9] in inodes:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


@dataclass
class WorkerSlot:
    """One supervised worker position; its process is replaced whenever it dies."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    stopped_since: float | None = None
    starts: int = 0


@dataclass
class FleetStats:
    """What happened to the workers during a scenario."""

    exits: Counter[int] = field(default_factory=Counter)
    external_kills: int = 0
    external_stops: int = 0
    self_stops: int = 0
    resumes: int = 0
    restarts: int = 0


class WorkerFleet:
    """``n`` ``wanbatch worker`` processes kept alive by a supervisor thread."""

    def __init__(
        self,
        n: int,
        env: dict[str, str],
        log_dir: Path,
        *,
        concurrency: int = 3,
        resume_after: float = 5.0,
    ) -> None:
        self.env = env
        self.log_dir = log_dir
        self.concurrency = concurrency
        self.resume_after = resume_after
        self.slots = [WorkerSlot(i) for i in range(n)]
        self.stats = FleetStats()
        self.extra_env: dict[int, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._running = False
        self._thread: threading.Thread | None = None
        self._externally_stopped: set[int] = set()

    def _spawn(self, slot: WorkerSlot) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"worker-{slot.index}.log").open("ab")
        args = [sys.executable, "-c", "from cli import main; main()", "worker"]
        args += ["--pool", "threads", "--concurrency", str(self.concurrency), "--loglevel", "WARNING"]
        env = {**self.env, **self.extra_env.get(slot.index, {})}
        slot.proc = subprocess.Popen(
            args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        slot.starts += 1
        slot.stopped_since = None

    def start(self) -> None:
        with self._lock:
            for slot in self.slots:
                self._spawn(slot)
            self._running = True
        self._thread = threading.Thread(target=self._supervise, name="chaos-supervisor", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        while self._running:
            with self._lock:
                for slot in self.slots:
                    self._check(slot)
            time.sleep(0.1)

    def _check(self, slot: WorkerSlot) -> None:
        proc = slot.proc
        if proc is None or not self._running:
            return
        code = proc.poll()
        if code is not None:
            self.stats.exits[code] += 1
            self.stats.restarts += 1
            self._spawn(slot)
            return
        if _process_state(proc.pid) == "T":
            now = time.monotonic()
            if slot.stopped_since is None:
                slot.stopped_since = now
                if proc.pid not in self._externally_stopped:
                    self.stats.self_stops += 1
            elif now - slot.stopped_since >= self.resume_after:
                os.killpg(proc.pid, signal.SIGCONT)
                self._externally_stopped.discard(proc.pid)
                slot.stopped_since = None
                self.stats.resumes += 1

    def pids(self) -> list[int]:
        with self._lock:
            return [s.proc.pid for s in self.slots if s.proc is not None and s.proc.poll() is None]

    def leader_pid(self, postgres: PostgresServer) -> int | None:
        """Which worker leads the tick (holds the advisory lock's connection), if known."""
        try:
            port = postgres.leader_backend_port()
        except psycopg.Error:
            return None
        if port is None:
            return None
        for pid in self.pids():
            if port in _local_tcp_ports(pid):
                return pid
        return None

    def kill_one(self, rng: random.Random, *, exclude: set[int] | None = None) -> int | None:
        """SIGKILL one running worker's whole process group (like a container kill)."""
        candidates = [p for p in self.pids() if p not in (exclude or set())]
        if not candidates:
            return None
        pid = rng.choice(candidates)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
            self.stats.external_kills += 1
        return pid

    def stop_one(self, pid: int) -> None:
        """SIGSTOP a worker from outside; the supervisor resumes it after ``resume_after``."""
        with self._lock:
            self._externally_stopped.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGSTOP)
                self.stats.external_stops += 1

    def settle_stops(self, grace: float = 2.0) -> None:
        """Wait until the supervisor has resumed every stopped worker, then ``grace`` seconds more.

        A fast run can end while a worker is still frozen; killing it then would never test what
        the scenario is about: the zombie's late writes after SIGCONT, which must be fenced.
        """
        deadline = time.monotonic() + self.resume_after + 10.0
        while time.monotonic() < deadline:
            with self._lock:
                frozen = [
                    s
                    for s in self.slots
                    if s.proc is not None and s.proc.poll() is None and _process_state(s.proc.pid) == "T"
                ]
            if not frozen:
                break
            time.sleep(0.1)
        time.sleep(grace)

    def shutdown(self) -> None:
        """Kill every worker (the scenario is over; nothing of theirs is needed any more)."""
        self._running = False
        if self._thread is not None:
            self._thread.join(5)
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(slot.proc.pid, signal.SIGCONT)
                    os.killpg(slot.proc.pid, signal.SIGKILL)
                slot.proc.wait(10)

    def log_count(self, needle: str) -> int:
        """How many worker log lines (over every incarnation) contain ``needle``."""
        return sum(
            path.read_text(errors="replace").count(needle) for path in self.log_dir.glob("worker-*.log")
        )

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in sorted(self.log_dir.glob("worker-*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)


@contextlib.contextmanager
def fleet(n: int, env: dict[str, str], log_dir: Path, **kwargs: object) -> Iterator[WorkerFleet]:
    workers = WorkerFleet(n, env, log_dir, **kwargs)  # type: ignore[arg-type]
    workers.start()
    try:
        yield workers
    finally:
        workers.shutdown()
