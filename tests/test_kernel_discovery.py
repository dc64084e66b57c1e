"""How a kernel finds the allocator: what the server exports, LABLINK_*, JupyterHub, the parent server."""

from __future__ import annotations

import logging
import os

import pytest

from conftest import fresh_code, linux_command, query, until
from labextension_py import StudentPanel
from labextension_py.client import discover
from lablink_jupyter.kernel_env import export_for_kernels

LOG = logging.getLogger("test")
HUB_VARIABLES = ("JUPYTERHUB_SERVICE_URL", "JUPYTERHUB_API_TOKEN")


@pytest.fixture
def outside_any_hub(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No JupyterHub variables and no parent server: only what a test sets."""
    for name in (*HUB_VARIABLES, "JPY_PARENT_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def forget_export(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LABLINK_URL", "LABLINK_TOKEN"):
        monkeypatch.delenv(name, raising=False)


async def panel_ready(panel: StudentPanel) -> StudentPanel:
    await until(lambda: "Looking for your VM" not in panel.connection_note.value)
    assert panel.connection_note.value == "", panel.connection_note.value
    return panel


async def test_the_server_exports_its_url_and_token_for_kernels(lablink, outside_any_hub):
    assert os.environ["LABLINK_URL"] == lablink.url  # base_url included, %40 and all
    assert os.environ["LABLINK_TOKEN"] == lablink.app.identity_provider.token

    panel = StudentPanel()
    try:
        assert panel.server_url == lablink.url
        await panel_ready(panel)
    finally:
        panel.close()


async def test_an_operators_lablink_url_is_left_alone(lablink, outside_any_hub):
    forget_export(outside_any_hub)
    outside_any_hub.setenv("LABLINK_URL", "https://lab.example.edu/")
    export_for_kernels(lablink.app, LOG)
    assert os.environ["LABLINK_URL"] == "https://lab.example.edu/"
    assert "LABLINK_TOKEN" not in os.environ


async def test_under_jupyterhub_kernels_reach_their_server_with_the_users_own_token(
        lablink, vm_factory, outside_any_hub):
    forget_export(outside_any_hub)
    # JupyterHub hands a user's server the URL to bind (host often empty) and the user's
    # token; the test server's identity provider plays the Hub and knows that token.
    outside_any_hub.setenv("JUPYTERHUB_SERVICE_URL", f"http://:{lablink.port}{lablink.base_url}")
    outside_any_hub.setenv("JUPYTERHUB_API_TOKEN", "tok-erin")
    export_for_kernels(lablink.app, LOG)
    assert "LABLINK_URL" not in os.environ and "LABLINK_TOKEN" not in os.environ
    address = discover()
    assert (address.url, address.token, address.source) == (lablink.url, "tok-erin", "JupyterHub")

    vm_factory("lab-vm-1")
    panel = await panel_ready(StudentPanel())
    try:
        await until(lambda: _has_available_vm(lablink))
        panel.command.value = linux_command(fresh_code())
        panel.request_button.click()
        await until(lambda: panel.vm_card in panel.children)
        assert (await lablink.my_vm("erin")).body["hostname"] == "lab-vm-1"
    finally:
        panel.close()


async def test_an_operators_lablink_url_takes_the_hub_token(lablink, outside_any_hub):
    forget_export(outside_any_hub)
    outside_any_hub.setenv("LABLINK_URL", lablink.url)  # e.g. in c.Spawner.environment
    outside_any_hub.setenv("JUPYTERHUB_API_TOKEN", "tok-dave")
    address = discover()
    assert (address.url, address.token, address.source) == (lablink.url, "tok-dave", "LABLINK_URL")
    panel = StudentPanel()
    try:
        await panel_ready(panel)
    finally:
        panel.close()


async def test_a_kernel_without_variables_finds_the_server_that_started_it(lablink, outside_any_hub):
    forget_export(outside_any_hub)
    outside_any_hub.setenv("JPY_PARENT_PID", str(os.getpid()))  # jupyter_client sets it in kernels
    address = discover()
    assert address.source == "parent server"
    assert address.token == lablink.app.identity_provider.token
    panel = StudentPanel()
    try:
        await panel_ready(panel)
    finally:
        panel.close()


def test_explicit_arguments_come_first(outside_any_hub):
    outside_any_hub.setenv("LABLINK_URL", "http://127.0.0.1:1/env/")
    outside_any_hub.setenv("LABLINK_TOKEN", "from-env")
    given = discover("http://lab.example.edu/course", "given")
    assert (given.url, given.token, given.source) == ("http://lab.example.edu/course/", "given", "arguments")
    only_token = discover(token="given")
    assert (only_token.url, only_token.token) == ("http://127.0.0.1:1/env/", "given")
    assert "given" not in repr(given)  # a token never shows in a printed address


def _has_available_vm(lablink) -> bool:
    return bool(query(lablink.database_url, "SELECT 1 FROM vms WHERE status = 'available'"))
