"""A server with jupyter_server's own identity provider (one token) belongs to one student.

That provider invents a new user for every HTTP session holding the token, so
without this a kernel, a re-run cell and the browser would each be someone else.
"""

from __future__ import annotations

import getpass
from typing import Any

import pytest

from conftest import fresh_code, linux_command, query, until
from labextension_py import StudentPanel


@pytest.fixture
def jp_server_config(lablink_config: dict[str, Any]) -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"lablink_jupyter": True}}, "LabLink": lablink_config}


async def test_every_holder_of_the_token_is_the_same_student(lablink, vm_factory):
    vm_factory("lab-vm-1")
    await until(lambda: query(lablink.database_url, "SELECT 1 FROM vms WHERE status = 'available'"))
    token = {"Authorization": f"token {lablink.app.identity_provider.token}"}

    asked = await lablink.call("POST", "lablink/api/request_vm", headers=token,
                               json_body={"crd_command": linux_command(fresh_code())})
    assert asked.code == 200, asked
    # Another HTTP session (no cookies shared): still the same student, holding the same VM.
    again = await lablink.call("GET", "lablink/api/my_vm", headers=token)
    assert (again.body["hostname"], again.body["pin"]) == ("lab-vm-1", asked.body["pin"])
    assert query(lablink.database_url, "SELECT assigned_user FROM vms") == [(getpass.getuser(),)]

    panel = StudentPanel(url=lablink.url, token=lablink.app.identity_provider.token)
    try:
        await until(lambda: panel.vm_card in panel.children)
        assert f">{asked.body['pin']}<" in panel.pin_display.value
    finally:
        panel.close()
