"""A plain Jupyter server (no Hub) belongs to one person: every call with its token is that person."""

from __future__ import annotations

import getpass

import pytest

from conftest import fresh_code, linux_command


@pytest.fixture
def jp_server_config(lablink_config):
    return {"ServerApp": {"jpserver_extensions": {"lablink_jupyter": True}}, "LabLink": lablink_config}


async def test_token_calls_without_cookies_are_one_student(lablink):
    token = await lablink.enroll("vm-a")
    await lablink.poll("vm-a", token, wait=0)
    owner = {"Authorization": f"token {lablink.app.identity_provider.token}"}
    asked = await lablink.call("POST", "lablink/api/request_vm", headers=owner,
                               json_body={"crd_command": linux_command(fresh_code())})
    assert asked.code == 200, asked
    # A later call (a restarted kernel, another browser) carries no session cookie.
    mine = await lablink.call("GET", "lablink/api/my_vm", headers=owner)
    assert mine.body["hostname"] == "vm-a" and mine.body["pin"] == asked.body["pin"]
    held = await lablink.allocator.db.vm_of_user(getpass.getuser())
    assert held is not None and held["hostname"] == "vm-a"  # the student is the server's owner
    released = await lablink.call("POST", "lablink/api/release", headers=owner)
    assert released.code == 200
    assert (await lablink.allocator.db.vm_of_user(getpass.getuser())) is None
