"""A VM that dies after it was assigned: the student is told it did not respond; nobody else gets it.

Needs `c.LabLink.configure_timeout` (issue 4); skipped until the extension has it.
"""

from __future__ import annotations

from typing import Any

import pytest

from conftest import fresh_code, linux_command, query, until
from lablink_jupyter.app import LabLink

CONFIGURE_TIMEOUT = 2.0

pytestmark = pytest.mark.skipif(not LabLink.class_traits().get("configure_timeout"),
                                reason="needs c.LabLink.configure_timeout (issue 4)")


@pytest.fixture
def lablink_config(lablink_config: dict[str, Any]) -> dict[str, Any]:
    return {**lablink_config, "configure_timeout": CONFIGURE_TIMEOUT, "poll_timeout": 2.0}


@pytest.mark.parametrize("dies", ["before it takes the code", "while start-host runs"])
async def test_a_vm_that_dies_after_assignment_is_reported_and_kept(lablink, vm_factory, dies: str) -> None:
    vm = vm_factory("lab-vm-1")
    # Waiting, and marked available (the poll subscribes first, then marks the VM seen).
    await until(lambda: lablink.allocator.listener.waiter_count == 1 and query(
        lablink.database_url, "SELECT status FROM vms") == [("available",)], within=60)
    if dies == "before it takes the code":
        vm.kill()
        await until(lambda: lablink.allocator.listener.waiter_count == 0, within=30)
    else:
        vm.crd_dir.joinpath("delay").write_text(str(CONFIGURE_TIMEOUT * 5))
    reply = await lablink.request_vm("alice", linux_command(fresh_code()))
    assert reply.code == 200 and reply.body["hostname"] == "lab-vm-1", reply
    if dies == "while start-host runs":
        await until(lambda: vm.calls(), within=60)
        vm.kill()  # the VM program dies; the start-host it started finishes with nobody to report

    view = await lablink.wait_for_status("alice", "failed", within=60)
    assert "did not respond" in view["error"], view
    assert (view["hostname"], view["pin"]) == ("lab-vm-1", reply.body["pin"])

    # The student still holds the VM: it is never handed to anyone else meanwhile.
    for student in ("bob", "carol"):
        other = await lablink.request_vm(student, linux_command(fresh_code()))
        assert other.code == 503, other
    assert query(lablink.database_url, "SELECT assigned_user, status FROM vms") == [("alice", "failed")]
    assert (await lablink.my_vm("alice")).body["status"] == "failed"
