"""Deployed by a real JupyterHub: the allocator as its service, which students' kernels call.

One Hub for the module, started from examples/jupyterhub/jupyterhub_config.py:
JupyterHub with configurable-http-proxy, the `lablink` service (`jupyter lablink`),
single-user servers started as this system user (LabLink loaded, serving nothing),
and three real `lablink-subscribe` VMs long-polling `/services/lablink/`. Students
log in through the Hub's login form with a cookie-keeping HTTP client, as a
browser would, and run the panel's calls in kernels of their own servers.

It is slow next to the other tests, so .ci/run runs it in one of its two passes
(LABLINK_SKIP_HUB_TEST=1 skips it).
"""

from __future__ import annotations

import json
import os
import re
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
import pytest
import requests
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from conftest import ENROLL_TOKEN, VmProcess, fresh_code, linux_command, query
from lablink_jupyter import routes
from lablink_jupyter.app import LabLink

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = REPO / "examples" / "jupyterhub" / "jupyterhub_config.py"
#: Where `make proxy` installs configurable-http-proxy when the machine has none.
LOCAL_PROXY = REPO / ".cache" / "node" / "node_modules" / ".bin" / "configurable-http-proxy"

STUDENT_PASSWORD = "student-" + uuid.uuid4().hex[:12]
ADMIN_PASSWORD = "admin-" + uuid.uuid4().hex  # the Hub wants 32 characters or more
ADMIN = "teacher"  # the example's Hub admin
SERVICE = "/services/lablink/"
HUB_START_TIMEOUT = 120.0


def _proxy_command() -> str | None:
    found = shutil.which("configurable-http-proxy")
    if found:
        return found
    return str(LOCAL_PROXY) if LOCAL_PROXY.exists() else None


def _skip_reason() -> str | None:
    if os.environ.get("LABLINK_SKIP_HUB_TEST"):
        return "LABLINK_SKIP_HUB_TEST is set (.ci/run runs the JupyterHub test in its first pass only)"
    try:
        import jupyterhub  # noqa: F401
    except ImportError:
        return "jupyterhub is not installed: pip install -e '.[test]'"
    if _proxy_command() is None:
        return "configurable-http-proxy is not installed: `make proxy` installs it (needs npm)"
    return None


SKIP_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Hub:
    """The running Hub, its VMs and its database."""

    url: str
    database_url: str
    home: Path
    process: subprocess.Popen[bytes]
    vms: list[VmProcess] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        """Where the Hub, its proxy, its service and the users' servers write."""
        return self.home / "jupyterhub.log"

    def log(self) -> str:
        """Everything they wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def vm_of(self, user: str) -> VmProcess:
        """The VM process assigned to `user`, by the database."""
        (hostname,) = query(self.database_url, "SELECT hostname FROM vms WHERE assigned_user = %s",
                            (user,))[0]
        return next(vm for vm in self.vms if vm.hostname == hostname)


@pytest.fixture(scope="module")
def hub_database(postgres_server: str) -> Iterator[str]:
    """A database for this module's Hub alone."""
    name = f"lablink_hub_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield make_conninfo(postgres_server, dbname=name)
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def hub(hub_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """JupyterHub from the example config, with the LabLink service and three VMs waiting on it."""
    home = tmp_path_factory.mktemp("jupyterhub")
    public, hub_api, proxy_api, service = (_free_port() for _ in range(4))
    proxy = _proxy_command()
    assert proxy is not None
    # Nothing of an enclosing Hub or LabLink may leak in (the tests may run inside a Hub).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "JPY_", "LABLINK_"))}
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), str(Path(proxy).parent), env.get("PATH", "")]),
        LABLINK_DATABASE_URL=hub_database,
        LABLINK_ENROLL_TOKEN=ENROLL_TOKEN,
        LABLINK_SERVICE_PORT=str(service),
        LABLINK_EXAMPLE_PASSWORD=STUDENT_PASSWORD,
        LABLINK_EXAMPLE_ADMIN_PASSWORD=ADMIN_PASSWORD,
        LABLINK_EXAMPLE_HOMES=str(home / "homes"),
    )
    with (home / "jupyterhub.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(EXAMPLE_CONFIG), "--ip=127.0.0.1",
             f"--port={public}", f"--JupyterHub.hub_port={hub_api}",
             f"--ConfigurableHTTPProxy.api_url=http://127.0.0.1:{proxy_api}"],
            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    running = Hub(f"http://127.0.0.1:{public}", hub_database, home, process)
    try:
        _wait_for(running, lambda: _answers(running.url + SERVICE + routes.HEALTH), HUB_START_TIMEOUT,
                  "the Hub and its lablink service to answer")
        for number in (1, 2, 3):
            vm = VmProcess(f"hub-vm-{number}", home / f"hub-vm-{number}", running.url + SERVICE)
            vm.home.mkdir(parents=True)
            running.vms.append(vm.start())
        _wait_for(running, lambda: _available(hub_database) == 3, 60, "three VMs polling the service")
        yield running
    finally:
        for vm in running.vms:
            vm.stop()
        _stop(process)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _available(database_url: str) -> int:
    ((count,),) = query(database_url, "SELECT count(*) FROM vms WHERE status = 'available'")
    return int(count)


def _wait_for(hub: Hub, predicate: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if hub.process.poll() is not None:
            raise AssertionError(f"JupyterHub exited ({hub.process.returncode}):\n{hub.log()[-6000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {within} s for {what}:\n{hub.log()[-6000:]}")
        time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    # SIGTERM lets the Hub stop the user servers, the service and the proxy it started.
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(45)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class Browser:
    """A person at a browser: a cookie-keeping HTTP client on the Hub's public URL."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.session = requests.Session()

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        return self.session.get(self.hub.url + path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        headers = {"X-XSRFToken": self.xsrf_for(path), **kwargs.pop("headers", {})}
        return self.session.post(self.hub.url + path, headers=headers, **kwargs)

    def xsrf_for(self, path: str) -> str:
        """The _xsrf cookie a page under `path` set, as a page's script would send it back."""
        matching = [c for c in self.session.cookies if c.name == "_xsrf" and path.startswith(c.path or "/")]
        matching.sort(key=lambda c: len(c.path or ""))
        return matching[-1].value if matching else ""

    def log_in(self, username: str, password: str = STUDENT_PASSWORD) -> Browser:
        """Log in through the Hub's login form."""
        page = self.get("/hub/login")
        assert page.status_code == 200, page.text
        form_xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
        assert form_xsrf, "the Hub's login form has no _xsrf field"
        answer = self.session.post(
            self.hub.url + "/hub/login", allow_redirects=False, timeout=60,
            data={"username": username, "password": password, "_xsrf": form_xsrf.group(1)},
        )
        assert answer.status_code == 302, f"login as {username} failed: {answer.status_code}"
        return self

    def start_server(self) -> None:
        """Ask the Hub to start this user's server (the Hub's spawn page)."""
        answer = self.get("/hub/spawn", allow_redirects=False)
        assert answer.status_code == 302, answer.text

    def open_server(self, username: str, within: float = 120) -> None:
        """Wait for the user's server, then open it, which logs in to it with Hub OAuth."""
        deadline = time.monotonic() + within
        while True:
            pending = self.get(f"/hub/spawn-pending/{username}", allow_redirects=False)
            if pending.status_code == 302:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{username}'s server did not start:\n{self.hub.log()[-6000:]}")
            time.sleep(0.3)
        landing = self.get(f"/user/{username}/")
        assert landing.status_code == 200, (landing.status_code, landing.url)
        # Without JupyterLab the landing page asks for no login: an authenticated page of
        # Jupyter's own starts the Hub's OAuth to the server, as the UI would.
        self.get(f"/user/{username}/files/")
        assert self.get(f"/user/{username}/api/status").status_code == 200

    def start_kernel(self, username: str) -> Kernel:
        """A Python kernel in the user's own server."""
        answer = self.post(f"/user/{username}/api/kernels", json={"name": "python3"})
        assert answer.status_code == 201, answer.text
        return Kernel(self, username, answer.json()["id"])


class Kernel:
    """A kernel in a student's server, driven over the Jupyter kernel websocket as a notebook would."""

    def __init__(self, browser: Browser, username: str, kernel_id: str) -> None:
        import websocket

        path = f"/user/{username}/api/kernels/{kernel_id}/channels"
        cookies = "; ".join(f"{c.name}={c.value}" for c in browser.session.cookies
                            if path.startswith(c.path or "/"))
        self.session_id = uuid.uuid4().hex
        self.socket = websocket.create_connection(
            browser.hub.url.replace("http", "ws", 1) + path + f"?session_id={self.session_id}",
            cookie=cookies, timeout=120,
        )

    def run(self, code: str) -> str:
        """Execute `code`; its standard output, or AssertionError with the traceback."""
        msg_id = uuid.uuid4().hex
        self.socket.send(json.dumps({
            "header": {"msg_id": msg_id, "username": "test", "session": self.session_id,
                       "msg_type": "execute_request", "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True},
        }))
        output: list[str] = []
        while True:
            message = json.loads(self.socket.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                output.append(content["text"])
            elif kind == "error":
                raise AssertionError("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(output)

    def run_json(self, code: str) -> Any:
        """Execute `code`, whose last line of output is JSON."""
        return json.loads(self.run(code).strip().splitlines()[-1])

    def close(self) -> None:
        self.socket.close()


# What a student's notebook runs: the panel's request path, finding the service by itself.
REQUEST_FROM_KERNEL = """
import json, os
from labextension_py.client import LabLinkClient
client = LabLinkClient()
answer = client.request_vm({command!r})
print(json.dumps({{"source": client.address.source, "url": client.address.url,
                  "hub_token": client.address.token == os.environ["JUPYTERHUB_API_TOKEN"], **answer}}))
"""

MY_VM_FROM_KERNEL = """
import json
from labextension_py.client import LabLinkClient
print(json.dumps(LabLinkClient().my_vm()))
"""

# Names only: the values hold the server's token.
ENVIRONMENT_FROM_KERNEL = """
import json, os
marks = ("postgresql://", "postgres://", "dbname=", "password=", {database_name!r})
print(json.dumps({{
    "lablink_url": os.environ.get("LABLINK_URL"),
    "lablink_token": "LABLINK_TOKEN" in os.environ,
    "database_variables": sorted(name for name, value in os.environ.items()
                                 if name == "LABLINK_DATABASE_URL" or any(m in value for m in marks)),
}}))
"""

# The kernel's token, as any code in the notebook may use it.
TOKEN_FROM_KERNEL = """
import json, os, requests
from labextension_py.client import LabLinkClient, LabLinkError
token = {{"Authorization": "token " + os.environ["JUPYTERHUB_API_TOKEN"]}}
scopes = requests.get(os.environ["JUPYTERHUB_API_URL"] + "/user", headers=token, timeout=30).json()["scopes"]
others_server = requests.get({hub_url!r} + "/user/{other}/api/status", headers=token, timeout=30,
                             allow_redirects=False).status_code
try:
    LabLinkClient().call("GET", {fleet!r})
    fleet = 200
except LabLinkError as refused:
    fleet = refused.status
with open({log_path!r}, errors="replace") as log:
    logged = token["Authorization"][len("token "):] in log.read()
print(json.dumps({{"scopes": scopes, "others_server": others_server, "fleet": fleet, "logged": logged}}))
"""

STUDENTS = ("alice", "bob")


@dataclass
class Student:
    """A student logged in to the Hub, with their server started and a kernel open in it."""

    name: str
    browser: Browser
    kernel: Kernel


@pytest.fixture(scope="module")
def students(hub: Hub) -> Iterator[dict[str, Student]]:
    """alice and bob, each with a server of their own and a kernel in it."""
    browsers = {name: Browser(hub).log_in(name) for name in STUDENTS}
    for browser in browsers.values():
        browser.start_server()
    logged_in: dict[str, Student] = {}
    try:
        for name, browser in browsers.items():
            browser.open_server(name)
            logged_in[name] = Student(name, browser, browser.start_kernel(name))
        yield logged_in
    finally:
        for student in logged_in.values():
            student.kernel.close()


def test_students_servers_hold_no_database_url_and_run_no_allocator(hub: Hub,
                                                                    students: dict[str, Student]) -> None:
    database_name = conninfo_to_dict(hub.database_url)["dbname"]
    for name, student in students.items():
        seen = student.kernel.run_json(ENVIRONMENT_FROM_KERNEL.format(database_name=database_name))
        assert seen["database_variables"] == [], f"{name}'s kernel can read the database URL"
        assert seen["lablink_url"].endswith(SERVICE) and not seen["lablink_token"]
        assert student.browser.get(f"/user/{name}/" + routes.HEALTH).status_code == 404
        assert student.browser.get(f"/user/{name}/" + routes.MY_VM).status_code == 404
        # Nor did it start an embedded PostgreSQL of its own.
        assert not (hub.home / "homes" / name / ".local" / "share" / "jupyter" / "lablink").exists()
    log = hub.log()
    assert log.count("LabLink serves nothing in this JupyterHub user's server") == len(students)
    ready = re.findall(r"allocator ready at (\S+)", log)
    assert ready and all(SERVICE in url for url in ready)  # the service's alone


def test_two_students_kernels_get_their_own_vms_from_the_service(hub: Hub, students: dict[str, Student]) -> None:
    codes = {name: fresh_code() for name in students}
    answers = {name: student.kernel.run_json(REQUEST_FROM_KERNEL.format(command=linux_command(codes[name])))
               for name, student in students.items()}

    for name, answer in answers.items():
        # The panel asked the Hub's service, with the Hub's token for the student's server.
        assert answer["source"] == "LABLINK_URL" and answer["url"].endswith(SERVICE)
        assert answer["hub_token"] is True
        assert answer["pin"].isdigit() and len(answer["pin"]) >= 6
        assert f"POST {SERVICE}{routes.REQUEST_VM} ({name}@" in hub.log()
    assert answers["alice"]["hostname"] != answers["bob"]["hostname"]
    assert answers["alice"]["pin"] != answers["bob"]["pin"]
    assert {name for (name,) in query(hub.database_url, "SELECT assigned_user FROM vms "
                                      "WHERE assigned_user IS NOT NULL")} == set(STUDENTS)

    for name in students:
        vm = hub.vm_of(name)
        assert vm.hostname == answers[name]["hostname"]
        _wait_for(hub, lambda: vm.calls(), 30, f"{vm.hostname} to run start-host")
        (call,) = vm.calls()
        assert f"--code={codes[name]}" in call["argv"]
        assert call["stdin"] == f"{answers[name]['pin']}\n{answers[name]['pin']}\n"

    for name, student in students.items():
        _wait_for(hub, lambda: _status_of(hub, name) == "active", 30, f"{name}'s VM to be active")
        mine = student.kernel.run_json(MY_VM_FROM_KERNEL)
        (other,) = set(students) - {name}
        assert mine["hostname"] == answers[name]["hostname"] != answers[other]["hostname"]
        assert mine["status"] == "active" and mine["pin"] == answers[name]["pin"]
        assert answers[other]["pin"] not in json.dumps(mine)
    _assert_not_logged(hub, *codes.values(), *(answer["pin"] for answer in answers.values()))


def test_a_students_token_acts_only_as_that_student(hub: Hub, students: dict[str, Student]) -> None:
    alice = students["alice"]
    seen = alice.kernel.run_json(TOKEN_FROM_KERNEL.format(hub_url=hub.url, other="bob", fleet=routes.VMS,
                                                          log_path=str(hub.log_path)))
    # JupyterHub's server scopes (and what they imply) and the service: nothing of anyone else.
    assert {"users:activity!user=alice", "access:servers!server=alice/",
            "access:services!service=lablink"} <= set(seen["scopes"])
    assert all(scope.endswith(("!user=alice", "!server=alice/")) for scope in seen["scopes"]
               if scope != "access:services!service=lablink"), seen["scopes"]
    assert seen["others_server"] == 403
    assert seen["fleet"] == (403 if _has_instructor_api() else 404)
    assert seen["logged"] is False  # nor did any of its calls put the token in a log

    # The service admits a Hub token only with its access scope, and none that the Hub does not know.
    made = alice.browser.post("/hub/api/users/alice/tokens", json={"scopes": ["read:users:name!user"]})
    assert made.status_code == 201, made.text
    for token in (made.json()["token"], "not-a-hub-token"):
        asked = requests.get(hub.url + SERVICE + routes.MY_VM, headers={"Authorization": f"token {token}"},
                             timeout=30, allow_redirects=False)
        assert asked.status_code == 403
    _assert_not_logged(hub, made.json()["token"])


def test_the_service_form_logs_a_student_in_through_the_hub(hub: Hub) -> None:
    carol = Browser(hub).log_in("carol")
    form = carol.get(SERVICE + routes.FORM_PAGE)
    assert form.status_code == 200 and form.url == hub.url + SERVICE + routes.FORM_PAGE
    assert any("/hub/api/oauth2/authorize" in step.headers.get("Location", "") for step in form.history)
    assert 'name="crd_command"' in form.text and 'name="email"' not in form.text
    form_xsrf = re.search(r'name="_xsrf" value="([^"]+)"', form.text)
    assert form_xsrf

    code = fresh_code()
    sent = carol.session.post(
        hub.url + SERVICE + routes.REQUEST_VM, allow_redirects=False, timeout=60,
        data={"crd_command": linux_command(code), "_xsrf": form_xsrf.group(1)},
        headers={"Accept": "text/html"},
    )
    assert sent.status_code == 303, sent.text
    assert sent.headers["Location"] == SERVICE + routes.VM_PAGE
    page = carol.get(SERVICE + routes.VM_PAGE)
    assert page.status_code == 200
    ((hostname, pin),) = query(hub.database_url,
                               "SELECT hostname, pin FROM vms WHERE assigned_user = 'carol'")
    assert hostname in page.text and pin in page.text
    vm = hub.vm_of("carol")
    _wait_for(hub, lambda: vm.calls(), 30, f"{vm.hostname} to run start-host")
    assert f"--code={code}" in vm.calls()[0]["argv"]
    _assert_not_logged(hub, code, pin)


def test_the_service_sends_a_browser_without_a_hub_login_to_log_in(hub: Hub) -> None:
    stranger = Browser(hub)
    assigned_before = _assignments(hub)
    first = stranger.get(SERVICE + routes.FORM_PAGE, allow_redirects=False)
    assert first.status_code == 302
    assert first.headers["Location"].startswith("/hub/api/oauth2/authorize?")
    assert first.headers["Location"].count("?") == 1
    followed = stranger.get(SERVICE + routes.FORM_PAGE)
    assert followed.url.startswith(hub.url + "/hub/login")
    assert 'name="crd_command"' not in followed.text

    asked = stranger.post(SERVICE + routes.REQUEST_VM, json={"crd_command": linux_command(fresh_code())})
    assert asked.status_code == 403
    assert stranger.get(SERVICE + routes.MY_VM).status_code == 403
    assert _assignments(hub) == assigned_before

    # VM routes keep their own bearer tokens: no Hub login, and no redirect to one.
    polled = requests.post(hub.url + SERVICE + routes.VM_STARTUP, json={"hostname": "hub-vm-1"},
                           headers={"Authorization": "Bearer not-a-vm-token"}, timeout=30,
                           allow_redirects=False)
    assert polled.status_code == 401 and polled.json()["error"]


def test_the_service_serves_no_kernels_terminals_or_files_to_hub_users(hub: Hub) -> None:
    # Every Hub user may open the service's form: none may run code where the database password is.
    dave = Browser(hub).log_in("dave")
    assert dave.get(SERVICE + routes.FORM_PAGE).status_code == 200
    assert dave.post(SERVICE + "api/kernels", json={"name": "python3"}).status_code == 403
    assert dave.get(SERVICE + "api/kernels").status_code == 403
    assert dave.get(SERVICE + "api/contents").status_code == 403
    assert dave.post(SERVICE + "api/terminals").status_code in (403, 404)
    assert dave.get(SERVICE + "lab").status_code == 404  # no JupyterLab shell either
    assert dave.get(SERVICE + routes.HEALTH).status_code == 200
    assert "LabLink runs as the JupyterHub service 'lablink'" in hub.log()


def _has_instructor_api() -> bool:
    app = LabLink()
    app.initialize_handlers()
    return any(re.fullmatch(path, routes.VMS) for path, *_ in app.handlers)


@pytest.mark.skipif(not _has_instructor_api(), reason="the instructor API (lablink/api/vms) is not built yet")
def test_a_hub_admin_sees_the_instructor_api_and_a_student_does_not(hub: Hub) -> None:
    teacher = Browser(hub).log_in(ADMIN, ADMIN_PASSWORD)
    # The admin page opened first, as an instructor would from a bookmark: Hub OAuth, then the page.
    page = teacher.get(SERVICE + routes.ADMIN_PAGE)
    assert page.status_code == 200 and page.url == hub.url + SERVICE + routes.ADMIN_PAGE, page.url
    assert "LabLink fleet" in page.text
    fleet = teacher.get(SERVICE + routes.VMS)
    assert fleet.status_code == 200, fleet.text
    assert {"hub-vm-1", "hub-vm-2", "hub-vm-3"} <= {vm["hostname"] for vm in _vm_list(fleet.json())}

    erin = Browser(hub).log_in("erin")
    assert erin.get(SERVICE + routes.FORM_PAGE).status_code == 200
    refused = erin.get(SERVICE + routes.VMS)
    assert refused.status_code == 403 and "Hub admin" in refused.json()["hint"], refused.text


# What the instructor's notebook runs: the panel, finding the service by itself.
INSTRUCTOR_PANEL_FROM_KERNEL = """
import json
from labextension_py import InstructorPanel
panel = InstructorPanel(wait=2)
shown = await panel.ready()
print(json.dumps({"shown": shown, "source": panel.client.address.source, "counts": panel.counts,
                  "hostnames": sorted(vm["hostname"] for vm in panel.vms), "error": panel.error_html.value}))
panel.close()
"""


@pytest.mark.skipif(not _has_instructor_api(), reason="the instructor API (lablink/api/vms) is not built yet")
def test_a_hub_admins_kernel_runs_the_instructor_panel_against_the_service(hub: Hub) -> None:
    teacher = Browser(hub).log_in(ADMIN, ADMIN_PASSWORD)
    teacher.start_server()
    teacher.open_server(ADMIN)
    kernel = teacher.start_kernel(ADMIN)
    try:
        # The server's token identifies the teacher to the service, which knows them as a Hub admin.
        seen = kernel.run_json(INSTRUCTOR_PANEL_FROM_KERNEL)
    finally:
        kernel.close()
    assert seen["shown"] is True, seen["error"]
    assert seen["source"] == "LABLINK_URL"
    assert {"hub-vm-1", "hub-vm-2", "hub-vm-3"} <= set(seen["hostnames"])
    assert seen["counts"]["total"] == len(seen["hostnames"])


def _vm_list(body: Any) -> list[dict[str, Any]]:
    return body["vms"] if isinstance(body, dict) else body  # type: ignore[no-any-return]


def _assert_not_logged(hub: Hub, *secrets: str) -> None:
    # Whole words only: a 6-digit PIN can occur inside a hex id by chance.
    log = "\n".join([hub.log(), *(vm.log() for vm in hub.vms)])
    for secret in secrets:
        assert not re.search(rf"(?<![0-9A-Za-z]){re.escape(secret)}(?![0-9A-Za-z])", log)


def _assignments(hub: Hub) -> list[tuple[Any, ...]]:
    return query(hub.database_url, "SELECT hostname, assigned_user FROM vms ORDER BY hostname")


def _status_of(hub: Hub, user: str) -> str | None:
    rows = query(hub.database_url, "SELECT status FROM vms WHERE assigned_user = %s", (user,))
    return rows[0][0] if rows else None
