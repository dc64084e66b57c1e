"""Without JupyterHub, whoever logs in with jupyter-server's own token owns the server: an instructor."""

from __future__ import annotations

import getpass
from typing import Any

import pytest


@pytest.fixture
def lablink_config(lablink_config: dict[str, Any], request: Any) -> dict[str, Any]:
    return {**lablink_config, **getattr(request, "param", {})}


@pytest.fixture
def jp_server_config(lablink_config: dict[str, Any]) -> dict[str, Any]:
    # jupyter-server's own login (one token), not the test server's many students.
    return {"ServerApp": {"jpserver_extensions": {"lablink_jupyter": True}}, "LabLink": lablink_config}


async def test_server_owner_is_an_instructor(lablink, jp_auth_header):
    reply = await lablink.call("GET", "lablink/api/vms", headers=jp_auth_header)
    assert reply.code == 200, reply
    page = await lablink.call("GET", "lablink/admin", headers=jp_auth_header)
    assert page.code == 200 and "LabLink fleet" in page.body
    anonymous = await lablink.call("GET", "lablink/api/vms")
    assert anonymous.code == 403 and anonymous.body["hint"]


@pytest.mark.parametrize("lablink_config", [{"owner_is_instructor": False}], indirect=True)
async def test_server_owner_rule_can_be_turned_off(lablink, jp_auth_header):
    reply = await lablink.call("GET", "lablink/api/vms", headers=jp_auth_header)
    assert reply.code == 403 and "c.LabLink.instructors" in reply.body["hint"]


async def test_the_owner_is_named_alike_in_the_audit_log_and_on_every_page(lablink, jp_auth_header):
    # Jupyter gives each token request a new anonymous name; LabLink names the owner instead.
    owner = getpass.getuser()
    for hostname in ("lab-a", "lab-b"):
        reply = await lablink.call("POST", "lablink/api/vms", headers=jp_auth_header,
                                   json_body={"hostnames": [hostname]})
        assert reply.code == 201, reply
    events = await lablink.call("GET", "lablink/api/events", headers=jp_auth_header)
    assert [event["actor"] for event in events.body["events"]] == [owner, owner]
    for page in ("lablink/", "lablink/admin", "lablink/admin"):
        reply = await lablink.call("GET", page, headers=jp_auth_header)
        assert f"Signed in as {owner}." in reply.body
