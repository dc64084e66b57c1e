"""Real processes for fault tests: allocator subprocesses, a database of a test's own, a cutting proxy.

`jupyter lablink` runs in a subprocess wherever a test needs to SIGKILL the
allocator or to run two of them; `IdleCuttingProxy` stands between a VM and
the allocator the way a load balancer with an idle timeout does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from conftest import Reply, reply_of, request_parts

TESTS_DIR = Path(__file__).resolve().parent


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def own_database(server_url: str, prefix: str = "lablink_own") -> Iterator[str]:
    """A fresh database on `server_url` for one test or module, dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclass
class AllocatorProcess:
    """`jupyter lablink` in a subprocess, on a fixed port so that it can be killed and started again."""

    database_url: str
    home: Path
    settings: dict[str, Any] = field(default_factory=dict)
    server_settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's base URL, as a VM or a student uses it."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def log_path(self) -> Path:
        """Where everything the server prints goes (every start appends)."""
        return self.home / "server.log"

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> AllocatorProcess:
        """Start (or start again) the server; returns once it is spawned, not once it is ready."""
        config_dir = self.home / "config"
        config_dir.mkdir(parents=True, exist_ok=True)
        lablink = {"database_url": self.database_url, **self.settings} if self.database_url else self.settings
        # Settings (tokens among them) go in a config file, not argv: ps shows argv. The
        # students' identity provider is the in-process servers' own, from conftest.
        (config_dir / "jupyter_server_config.json").write_text(json.dumps({
            "ServerApp": {"identity_provider_class": "conftest.StudentsIdentityProvider",
                          "port_retries": 0, **self.server_settings},
            "IdentityProvider": {"token": uuid.uuid4().hex},
            "LabLink": lablink,
        }))
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
            JUPYTER_CONFIG_DIR=str(config_dir),
            JUPYTER_DATA_DIR=str(self.home / "data"),
            JUPYTER_RUNTIME_DIR=str(self.home / "runtime"),
            **self.environment,
        )
        program = shutil.which("jupyter-lablink", path=os.path.dirname(sys.executable)) or "jupyter-lablink"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [program, f"--port={self.port}", "--ip=127.0.0.1", "--no-browser", "--allow-root",
             f"--ServerApp.root_dir={self.home}", *self.extra_args()],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    def extra_args(self) -> list[str]:
        """Further command-line arguments (none by default)."""
        return []

    async def ready(self, within: float = 90) -> AllocatorProcess:
        """Wait (bounded) until the server answers its health check with a working database."""
        deadline = time.monotonic() + within
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"the allocator exited ({self.process.returncode}):\n{self.log()[-3000:]}")
            with contextlib.suppress(Exception):
                health = await self.call("GET", "lablink/api/health", timeout=5)
                if health.code == 200 and health.body.get("listener") == "listening":
                    return self
            if time.monotonic() > deadline:
                raise AssertionError(f"the allocator never became ready:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.2)

    def ready_blocking(self, within: float = 90) -> AllocatorProcess:
        """ready(), for fixtures outside the test's event loop."""
        import requests

        deadline = time.monotonic() + within
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"the allocator exited ({self.process.returncode}):\n{self.log()[-3000:]}")
            with contextlib.suppress(requests.RequestException, ValueError):
                health = requests.get(self.url + "lablink/api/health", timeout=5)
                if health.status_code == 200 and health.json().get("listener") == "listening":
                    return self
            if time.monotonic() > deadline:
                raise AssertionError(f"the allocator never became ready:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: the process dies without any clean-up."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """Stop the server politely, then not."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()

    async def call(
        self,
        method: str,
        path: str,
        *,
        user: str | None = None,
        token: str | None = None,
        json_body: Any = None,
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> Reply:
        """One request; `user` sends that student's Jupyter token, `token` a bearer token."""
        all_headers, body = request_parts(method, user=user, token=token, json_body=json_body,
                                          body=body, headers=headers)
        client = AsyncHTTPClient(force_instance=True, max_clients=64)
        try:
            response = await client.fetch(
                HTTPRequest(self.url + path, method=method, body=body, headers=all_headers,
                            request_timeout=timeout, connect_timeout=timeout, follow_redirects=False),
                raise_error=False,
            )
        finally:
            client.close()
        if response.code == 599 and response.error is not None:
            raise response.error
        return reply_of(response)


    async def wait_for_status(self, user: str, wanted: str, within: float = 60) -> dict[str, Any]:
        """Follow my_vm's long-poll until the student's VM reaches `wanted` (bounded by `within`)."""
        deadline = time.monotonic() + within
        view: dict[str, Any] = {"status": "unknown"}
        while view["status"] != wanted:
            if time.monotonic() > deadline:
                raise AssertionError(f"{user}'s VM stayed {view['status']!r}, never {wanted!r}: {view}")
            try:
                reply = await self.call("GET", f"lablink/api/my_vm?wait=5&known={view['status']}", user=user)
            except (OSError, HTTPClientError):
                reply = None
            if reply is not None and reply.code == 200:
                view = reply.body
            else:
                await asyncio.sleep(0.5)  # the server is down or restarting: ask again
        return view


class IdleCuttingProxy:
    """A loopback TCP proxy that cuts every connection idle for `idle_cut` seconds, like a load balancer."""

    def __init__(self, target_port: int, idle_cut: float) -> None:
        self.target_port = target_port
        self.idle_cut = idle_cut
        self.cuts = 0
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> IdleCuttingProxy:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        """Close the listening socket and every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connection(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            self._tasks.discard(task)
            return
        last_activity = [time.monotonic()]

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upward: bool) -> None:
            while data := await reader.read(65536):
                last_activity[0] = time.monotonic()
                if upward:
                    self.requests += data.count(b"HTTP/1.1\r\n")
                writer.write(data)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.write_eof()

        pumps = [asyncio.ensure_future(pump(client_reader, upstream_writer, True)),
                 asyncio.ensure_future(pump(upstream_reader, client_writer, False))]
        try:
            while not all(p.done() for p in pumps):
                idle = time.monotonic() - last_activity[0]
                if idle >= self.idle_cut:
                    self.cuts += 1
                    break
                await asyncio.wait(pumps, timeout=min(0.1, self.idle_cut - idle),
                                   return_when=asyncio.ALL_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (client_writer, upstream_writer):
                writer.transport.abort()  # a cut, not a polite close: like a proxy dropping the flow
            self._tasks.discard(task)
