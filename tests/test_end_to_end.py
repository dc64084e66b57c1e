"""The whole flow with real processes: a VM waits, a student asks, the VM gets its code."""

from __future__ import annotations

import time

from tornado.httpclient import AsyncHTTPClient

from conftest import fresh_code, linux_command, query, until


async def test_student_request_reaches_waiting_vm_and_release_tears_down(lablink, vm_factory):
    vm = vm_factory("lab-vm-1")
    await until(lambda: _is_available(lablink, "lab-vm-1"))

    code = fresh_code()
    asked = time.monotonic()
    reply = await lablink.request_vm("alice", linux_command(code))
    assert reply.code == 200, reply
    assert reply.body["hostname"] == "lab-vm-1"
    pin = reply.body["pin"]
    assert pin.isdigit() and len(pin) >= 6

    view = await lablink.wait_for_status("alice", "active")
    seconds_to_active = time.monotonic() - asked
    assert view["pin"] == pin
    print(f"request -> active: {seconds_to_active:.2f} s")

    (call,) = vm.calls()
    argv = call["argv"]
    assert argv[1:] == [
        f"--code={code}",
        "--redirect-url=https://remotedesktop.google.com/_/oauthredirect",
        "--name=lab-vm-1",
    ]
    assert call["stdin"] == f"{pin}\n{pin}\n"
    assert call["display"] is None  # Google's command runs start-host with DISPLAY unset
    assert len(vm.host_configs()) == 1

    released = await lablink.call("POST", "lablink/api/release", user="alice")
    assert released.code == 200, released
    assert released.body["status"] == "released"
    await until(lambda: _status(lablink, "lab-vm-1") == "available")
    assert vm.calls("chrome-remote-desktop"), "the VM did not stop its CRD host"
    assert vm.host_configs() == []
    assert (await lablink.my_vm("alice")).body["status"] == "none"

    # Nothing secret stayed behind, and the audit log holds the whole story.
    (row,) = query(lablink.database_url, "SELECT crd_code, pin, assigned_user FROM vms")
    assert row == (None, None, None)
    actions = [a for (a,) in query(lablink.database_url, "SELECT action FROM events ORDER BY id")]
    assert actions == ["enrolled", "online", "assigned", "delivered", "active", "released", "torn down"]
    assert code not in vm.log() and pin not in vm.log()


async def test_base_url_is_not_root(lablink, jp_base_url):
    # pytest-jupyter serves under /a%40b/; every LabLink route must live under it.
    assert jp_base_url != "/"
    health = await lablink.call("GET", "lablink/api/health")
    assert health.code == 200 and health.body["database"] == "ok"
    outside = await AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{lablink.port}/lablink/api/health", raise_error=False
    )
    assert outside.code == 404


def _status(lablink, hostname):
    rows = query(lablink.database_url, "SELECT status FROM vms WHERE hostname = %s", (hostname,))
    return rows[0][0] if rows else None


def _is_available(lablink, hostname):
    return _status(lablink, hostname) == "available"
