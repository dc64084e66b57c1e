"""Allocator processes die and multiply: SIGKILL and restart, two processes on one database."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from conftest import ENROLL_TOKEN, VmProcess, fresh_code, linux_command, query, until
from processes import AllocatorProcess

pytestmark = pytest.mark.slow


def vm_processes(names: list[str], root: Path, server_url: str) -> dict[str, VmProcess]:
    """Real lablink-subscribe processes polling `server_url`."""
    vms = {}
    for name in names:
        vm = VmProcess(name, root / name, server_url)
        vm.home.mkdir(parents=True)
        vms[name] = vm.start()
    return vms


def available(database_url: str) -> int:
    """How many VMs are marked available (a poll subscribes first, then marks its VM seen)."""
    return int(query(database_url, "SELECT count(*) FROM vms WHERE status = 'available'")[0][0])


def health_says(server: Any, **expected: Any) -> Any:
    """A check that the server's health answer holds `expected`."""
    async def check() -> bool:
        try:
            reply = await server.call("GET", "lablink/api/health")
        except Exception:  # noqa: BLE001  (the server may be down or starting)
            return False
        return reply.code == 200 and all(reply.body.get(k) == v for k, v in expected.items())
    return check


async def test_allocator_killed_and_restarted_loses_and_duplicates_nothing(empty_database: str, tmp_path: Path) -> None:
    server = AllocatorProcess(empty_database, tmp_path / "allocator", {"poll_timeout": 2.0, "stale_after": 60.0},
                              environment={"LABLINK_ENROLL_TOKEN": ENROLL_TOKEN})
    vms: dict[str, VmProcess] = {}
    try:
        await server.start().ready()
        vms = vm_processes(["vm-1", "vm-2", "vm-3"], tmp_path, server.url)
        await until(health_says(server, vm_polls=3), within=90)
        await until(lambda: available(empty_database) == 3, within=60)
        alice = await server.call("POST", "lablink/api/request_vm", user="alice",
                                  json_body={"crd_command": linux_command(fresh_code())})
        assert alice.code == 200, alice
        await server.wait_for_status("alice", "active")

        # Bob's VM is in the middle of start-host when the allocator dies: its report must survive.
        for vm in vms.values():
            vm.crd_dir.joinpath("hold").touch()
        bob = await server.call("POST", "lablink/api/request_vm", user="bob",
                                json_body={"crd_command": linux_command(fresh_code())})
        assert bob.code == 200, bob
        bobs_vm = vms[bob.body["hostname"]]
        await until(lambda: bobs_vm.calls(), within=60)
        server.kill()
        for vm in vms.values():
            vm.crd_dir.joinpath("hold").unlink()
        await until(lambda: "retrying the report" in bobs_vm.log(), within=60)  # it found nobody there

        await server.start().ready()
        await server.wait_for_status("bob", "active", within=120)
        # The VM programs reconnected by themselves: every VM polls the new process.
        await until(health_says(server, vm_polls=3), within=120)
        for student, before in (("alice", alice), ("bob", bob)):
            view = (await server.call("GET", "lablink/api/my_vm", user=student)).body
            assert (view["hostname"], view["pin"], view["status"]) == (
                before.body["hostname"], before.body["pin"], "active"), student
        carol = await server.call("POST", "lablink/api/request_vm", user="carol",
                                  json_body={"crd_command": linux_command(fresh_code())})
        assert carol.code == 200, carol
        await server.wait_for_status("carol", "active", within=60)
    finally:
        for vm in vms.values():
            vm.stop()
        server.stop()

    hostnames = {alice.body["hostname"], bob.body["hostname"], carol.body["hostname"]}
    assert hostnames == set(vms)
    for name, vm in vms.items():
        assert len(vm.calls()) == 1, (name, vm.calls())  # nothing lost, nothing set up twice
        assert "Traceback" not in vm.log()
        assert "unreachable" in vm.log()  # each saw the allocator go away, and came back by itself
    assert sorted(query(empty_database, "SELECT assigned_user FROM vms")) == [("alice",), ("bob",), ("carol",)]
    assert query(empty_database, "SELECT count(*) FROM events WHERE action = 'assigned'") == [(3,)]


async def test_two_allocators_on_one_database_work_as_one(lablink, tmp_path: Path) -> None:
    other = AllocatorProcess(lablink.database_url, tmp_path / "second-allocator",
                             {"poll_timeout": 5.0, "stale_after": 30.0},
                             environment={"LABLINK_ENROLL_TOKEN": ENROLL_TOKEN})
    vm: VmProcess | None = None
    try:
        await other.start().ready()
        # A VM waits on the second process; the student asks the first and follows it there.
        vm = VmProcess("lab-vm-1", tmp_path / "lab-vm-1", other.url)
        vm.home.mkdir(parents=True)
        vm.start()
        await until(health_says(other, vm_polls=1), within=60)
        await until(lambda: available(lablink.database_url) == 1, within=60)
        reply = await lablink.request_vm("alice", linux_command(fresh_code()))
        assert reply.code == 200 and reply.body["hostname"] == "lab-vm-1", reply
        view = await lablink.wait_for_status("alice", "active", within=60)
        assert view["pin"] == reply.body["pin"]
        assert len(vm.calls()) == 1

        # Students hammering both processes at once still get one VM each.
        tokens = {}
        for n in range(12):
            tokens[f"pool-{n}"] = await lablink.enroll(f"pool-{n}")
        polls = [(lablink if n % 2 else other).call("POST", "lablink/vm_startup", token=token,
                                                    json_body={"hostname": host, "wait": 0})
                 for n, (host, token) in enumerate(tokens.items())]
        assert all(r.body == {"status": "waiting"} for r in await asyncio.gather(*polls))
        asks = []
        for n in range(30):
            server = lablink if n % 2 else other
            asks.append((f"student{n}", server.call("POST", "lablink/api/request_vm", user=f"student{n}",
                                                    json_body={"crd_command": linux_command(fresh_code())})))
        for n in range(8):  # one student on both processes at once, with different codes
            server = lablink if n % 2 else other
            asks.append(("dave", server.call("POST", "lablink/api/request_vm", user="dave",
                                             json_body={"crd_command": linux_command(fresh_code())})))
        replies = await asyncio.gather(*(call for _, call in asks))
    finally:
        if vm is not None:
            vm.stop()
        other.stop()

    granted: dict[str, set[str]] = {}
    for (student, _), answer in zip(asks, replies):
        assert answer.code in (200, 503), answer
        if answer.code == 200:
            granted.setdefault(student, set()).add(answer.body["hostname"])
    assert all(len(hosts) == 1 for hosts in granted.values()), granted  # dave got one VM, however often he asked
    holders = [h for hosts in granted.values() for h in hosts]
    assert len(holders) == len(set(holders)) == 12, granted  # every pool VM handed out, each to one student
    rows = dict(query(lablink.database_url, "SELECT hostname, assigned_user FROM vms WHERE hostname LIKE 'pool-%'"))
    assert rows == {host: student for student, hosts in granted.items() for host in hosts}
