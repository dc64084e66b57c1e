"""Fixtures: a real PostgreSQL, a real Jupyter server with LabLink, real VM processes.

The database is the embedded PostgreSQL unless LABLINK_TEST_DATABASE_URL names
another server; either way each test session gets a database of its own, and
each test starts from empty tables.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from jupyter_server.auth import User
from jupyter_server.auth.identity import PasswordIdentityProvider
from psycopg import sql
from psycopg.conninfo import make_conninfo
from tornado.httpclient import HTTPResponse

from lablink_jupyter.demo import subscribe_command
from lablink_jupyter.embedded import start_embedded_postgres
from lablink_jupyter.stand_in import read_calls, write_stand_in

pytest_plugins = ["pytest_jupyter.jupyter_server"]

ENROLL_TOKEN = "test-enrollment-token-" + uuid.uuid4().hex
#: Per-student Jupyter tokens, as JupyterHub gives each user their own.
STUDENT_TOKENS = {f"tok-{name}": name for name in ["alice", "bob", "carol", "dave", "erin"]}
STUDENT_TOKENS.update({f"tok-student{n}": f"student{n}" for n in range(100)})
#: The instructor named in c.LabLink.instructors by the test configuration.
INSTRUCTOR = "ingrid"
STUDENT_TOKENS[f"tok-{INSTRUCTOR}"] = INSTRUCTOR
#: The group whose members are instructors under JupyterHub, in the test configuration.
INSTRUCTOR_GROUP = "teachers"
#: Users as JupyterHub's single-user extension sees them: the Hub's user model of each.
HUB_USERS = {
    "tok-hubadmin": {"kind": "user", "name": "hubadmin", "admin": True, "groups": []},
    "tok-tina": {"kind": "user", "name": "tina", "admin": False, "groups": ["physics", INSTRUCTOR_GROUP]},
    "tok-hubstudent": {"kind": "user", "name": "hubstudent", "admin": False, "groups": ["physics"]},
}


class HubUser(User):
    """A user carrying the Hub's user model, as jupyterhub.singleuser's JupyterHubUser does."""

    hub_user: dict[str, Any]

    def __init__(self, hub_user: dict[str, Any]) -> None:
        self.hub_user = hub_user
        super().__init__(username=hub_user["name"])


class StudentsIdentityProvider(PasswordIdentityProvider):
    """Knows one token per student (and a few Hub users), so a test server has many users."""

    async def get_user(self, handler: Any) -> User | None:  # type: ignore[override]
        token = self.get_token(handler)
        if token in STUDENT_TOKENS:
            handler._token_authenticated = True
            return User(STUDENT_TOKENS[token])
        if token in HUB_USERS:
            handler._token_authenticated = True
            return HubUser(HUB_USERS[token])
        return await super().get_user(handler)  # type: ignore[misc,no-any-return]


ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
_ARTIFACTS_WRITTEN = pytest.StashKey[list[Path]]()


@pytest.fixture
def test_artifact(request: pytest.FixtureRequest) -> Any:
    """A path under test-artifacts/ (gitignored) for a file a person may want to look at."""

    def path_for(name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        request.config.stash.setdefault(_ARTIFACTS_WRITTEN, []).append(path)
        return path

    return path_for


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """List the artifacts this run wrote, so their paths are in the test output."""
    written = [path for path in config.stash.get(_ARTIFACTS_WRITTEN, []) if path.exists()]
    if written:
        terminalreporter.section("test artifacts")
        for path in written:
            terminalreporter.line(str(path))


@pytest.fixture(autouse=True)
def kernel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start each test without LABLINK_URL/LABLINK_TOKEN, and take away what a test server exports."""
    # setenv first so that undo removes what the server's start-up puts there.
    for name in ("LABLINK_URL", "LABLINK_TOKEN"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


# -- the database -----------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server: LABLINK_TEST_DATABASE_URL, or the embedded one."""
    url = os.environ.get("LABLINK_TEST_DATABASE_URL")
    if url:
        yield url
        return
    # Outside pytest's own temp tree: other pytest sessions of the same user may reset its
    # permissions, which the embedded server's system user needs to traverse.
    data_dir = Path(tempfile.mkdtemp(prefix="lablink-test-postgres-"))
    embedded = start_embedded_postgres(data_dir)
    yield embedded.url
    embedded.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(postgres_server: str) -> Iterator[str]:
    """A database of this test session's own on that server."""
    name = f"lablink_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield make_conninfo(postgres_server, dbname=name)
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def empty_database(database_url: str) -> str:
    """The session database with every LabLink table emptied."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('vms') IS NOT NULL").fetchone()
        if exists and exists[0]:
            conn.execute("TRUNCATE vms, events, fleet_settings RESTART IDENTITY CASCADE")
    return database_url


def query(database_url: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on its own connection and return its rows."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        cur = conn.execute(statement, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


# -- the server ----------------------------------------------------------------------


@pytest.fixture
def lablink_config(empty_database: str) -> dict[str, Any]:
    """The LabLink settings of the test server; tests override what they need."""
    return {
        "database_url": empty_database,
        "poll_timeout": 5.0,
        "stale_after": 30.0,
        "enrollment_token": ENROLL_TOKEN,
        "instructors": [INSTRUCTOR],
        "instructor_group": INSTRUCTOR_GROUP,
    }


@pytest.fixture
def jp_server_config(lablink_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "ServerApp": {
            "jpserver_extensions": {"lablink_jupyter": True},
            "identity_provider_class": StudentsIdentityProvider,
        },
        "LabLink": lablink_config,
    }


@dataclass
class Reply:
    """An HTTP answer: status, parsed JSON body and headers."""

    code: int
    body: Any
    headers: Any

    @property
    def error(self) -> str | None:
        """The `error` of a JSON error body."""
        return self.body.get("error") if isinstance(self.body, dict) else None


def request_parts(
    method: str,
    *,
    user: str | None = None,
    token: str | None = None,
    json_body: Any = None,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[dict[str, str], bytes | str | None]:
    """Headers and body of a test request: `user` sends that student's token, `token` a bearer token."""
    all_headers = dict(headers or {})
    if user is not None:
        all_headers["Authorization"] = f"token tok-{user}"
    elif token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    if json_body is not None:
        body = json.dumps(json_body)
        all_headers.setdefault("Content-Type", "application/json")
    if method in ("POST", "PUT", "PATCH") and body is None:
        body = b""
    return all_headers, body


def reply_of(response: HTTPResponse) -> Reply:
    """A tornado response as a Reply, its body parsed as JSON when it is JSON."""
    text = response.body.decode("utf-8", "replace") if response.body else ""
    try:
        parsed: Any = json.loads(text) if text else None
    except ValueError:
        parsed = text
    return Reply(response.code, parsed, response.headers)


@dataclass
class LabLinkServer:
    """The running test server, and ways to talk to it as students and VMs."""

    app: Any
    fetch: Any
    base_url: str
    port: int
    database_url: str

    @property
    def url(self) -> str:
        """The server's URL with its base_url, as a VM or a kernel would use it."""
        return f"http://127.0.0.1:{self.port}{self.base_url}"

    @property
    def allocator(self) -> Any:
        """The allocator object inside the server."""
        return self.app.web_app.settings["lablink_allocator"]

    async def call(
        self,
        method: str,
        path: str,
        *,
        user: str | None = None,
        token: str | None = None,
        json_body: Any = None,
        body: bytes | str | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> Reply:
        """One request; `user` sends that student's token, `token` a bearer token."""
        all_headers, body = request_parts(method, user=user, token=token, json_body=json_body,
                                          body=body, headers=headers)
        all_headers.setdefault("Authorization", "")  # not jp_fetch's default server token
        response: HTTPResponse = await self.fetch(
            path, method=method, body=body, headers=all_headers, params=params,
            raise_error=False, request_timeout=timeout, follow_redirects=False,
        )
        return reply_of(response)

    async def request_vm(self, user: str, command: str) -> Reply:
        """The student `user` pastes `command`."""
        return await self.call("POST", "lablink/api/request_vm", user=user,
                               json_body={"crd_command": command})

    async def my_vm(self, user: str, **params: Any) -> Reply:
        """The student's view of their VM."""
        return await self.call("GET", "lablink/api/my_vm", user=user, params=params or None)

    async def wait_for_status(self, user: str, wanted: str, within: float = 60) -> dict[str, Any]:
        """Follow my_vm's long-poll until the student's VM reaches `wanted` (bounded by `within`)."""
        deadline = time.monotonic() + within
        view = (await self.my_vm(user)).body
        while view["status"] != wanted:
            if time.monotonic() > deadline:
                raise AssertionError(f"{user}'s VM stayed {view['status']!r}, never {wanted!r}: {view}")
            view = (await self.my_vm(user, wait=5, known=view["status"])).body
        return view  # type: ignore[no-any-return]

    async def health(self) -> dict[str, Any]:
        """GET lablink/api/health."""
        return (await self.call("GET", "lablink/api/health")).body  # type: ignore[no-any-return]

    async def enroll(self, hostname: str) -> str:
        """Enroll `hostname` with the fleet token; its VM token."""
        reply = await self.call("POST", "lablink/api/vms/enroll", token=ENROLL_TOKEN,
                                json_body={"hostname": hostname})
        assert reply.code == 201, reply
        return str(reply.body["token"])

    async def poll(self, hostname: str, token: str, **fields: Any) -> Reply:
        """One VM long-poll, as lablink-subscribe makes it."""
        return await self.call("POST", "lablink/vm_startup", token=token,
                               json_body={"hostname": hostname, **fields}, timeout=120)


@pytest.fixture
def lablink(jp_serverapp: Any, jp_fetch: Any, jp_base_url: str, jp_http_port: int,
            jp_asyncio_loop: Any, empty_database: str) -> LabLinkServer:
    """A started Jupyter server with LabLink, listening on a real port."""
    # pytest-jupyter does not run extension start hooks by itself.
    jp_asyncio_loop.run_until_complete(jp_serverapp._post_start())
    server = LabLinkServer(jp_serverapp, jp_fetch, jp_base_url, jp_http_port, empty_database)
    assert server.allocator.started
    return server


# -- VMs ----------------------------------------------------------------------------


@dataclass
class VmProcess:
    """A real lablink-subscribe subprocess with a stand-in start-host."""

    hostname: str
    home: Path
    server_url: str
    process: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def crd_dir(self) -> Path:
        return self.home / "crd"

    @property
    def log_path(self) -> Path:
        return self.home / "subscribe.log"

    def start(self) -> VmProcess:
        """Start (or restart) the subscribe program."""
        start_host = write_stand_in(self.crd_dir)
        env = dict(os.environ, LABLINK_ENROLL_TOKEN=ENROLL_TOKEN, DISPLAY=":99")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*subscribe_command(), "--allocator", self.server_url, "--hostname", self.hostname,
             "--start-host", str(start_host), "--host-config-dir", str(self.crd_dir / "config"),
             "--state-dir", str(self.home / "state"), "--read-timeout", "30", *self.extra_args],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        return self

    def calls(self, program: str = "start-host") -> list[dict[str, Any]]:
        """What the stand-in start-host (or chrome-remote-desktop) was run with."""
        return [c for c in read_calls(self.crd_dir) if c["program"] == program]

    def host_configs(self) -> list[Path]:
        """The CRD host config files on the 'VM'."""
        return sorted((self.crd_dir / "config").glob("host#*.json"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL, as a VM that dies."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def vm_factory(lablink: LabLinkServer, tmp_path: Path) -> Iterator[Any]:
    """Start real VM processes against the test server."""
    started: list[VmProcess] = []

    def start(hostname: str, *extra_args: str) -> VmProcess:
        vm = VmProcess(hostname, tmp_path / hostname, lablink.url, extra_args=list(extra_args))
        vm.home.mkdir(parents=True, exist_ok=True)
        started.append(vm.start())
        return vm

    yield start
    for vm in started:
        vm.stop()


async def until(predicate: Any, within: float = 30, every: float = 0.05) -> Any:
    """Wait until `predicate()` is truthy (bounded), returning its value."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(every)


def linux_command(code: str) -> str:
    """What Google's headless page shows for Debian Linux."""
    return (
        f'DISPLAY= /opt/google/chrome-remote-desktop/start-host --code="{code}" '
        '--redirect-url="https://remotedesktop.google.com/_/oauthredirect" --name=$(hostname)'
    )


def fresh_code() -> str:
    """A new code in Google's shape."""
    return "4/0AVG7fiQ" + uuid.uuid4().hex + uuid.uuid4().hex[:20]


def cookies_of(headers: Any) -> dict[str, str]:
    """The cookies a response sets."""
    jar = {}
    for header in headers.get_list("Set-Cookie"):
        name, _, rest = header.partition("=")
        jar[name] = rest.split(";")[0]
    return jar


def cookie_header(jar: dict[str, str]) -> str:
    """A Cookie header sending `jar` back, as a browser would."""
    return "; ".join(f"{k}={v}" for k, v in jar.items())
