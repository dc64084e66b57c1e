"""The StudentPanel driven through its widgets, against a live server and real VM processes."""

from __future__ import annotations

import html
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import fresh_code, linux_command, query, until
from labextension_py import StudentPanel
from lablink_jupyter.crd import ACCESS_URL

WINDOWS_EXE = r"Google\Chrome Remote Desktop\CurrentVersion\remoting_start_host.exe"
OAUTH_REDIRECT = '--redirect-url="https://remotedesktop.google.com/_/oauthredirect"'


def windows_command(code: str) -> str:
    """What Google's headless page shows for Windows (Cmd)."""
    return f'"%PROGRAMFILES(X86)%\\{WINDOWS_EXE}" --code="{code}" {OAUTH_REDIRECT} --name=%COMPUTERNAME%'


@pytest.fixture
def open_panel(lablink: Any) -> Iterator[Any]:
    """Open StudentPanels as students of the test server; all are closed afterwards."""
    opened: list[StudentPanel] = []

    def open_as(user: str, **kwargs: Any) -> StudentPanel:
        kwargs.setdefault("url", lablink.url)
        kwargs.setdefault("token", f"tok-{user}")
        panel = StudentPanel(**kwargs)
        opened.append(panel)
        return panel

    yield open_as
    for panel in opened:
        panel.close()


async def loaded(panel: StudentPanel) -> StudentPanel:
    """Wait until the panel has shown what the server says about the student's VM."""
    await until(lambda: "Looking for your VM" not in panel.connection_note.value)
    return panel


async def available(lablink: Any, hostname: str) -> None:
    await until(lambda: _status(lablink, hostname) == "available")


def _status(lablink: Any, hostname: str) -> str | None:
    rows = query(lablink.database_url, "SELECT status FROM vms WHERE hostname = %s", (hostname,))
    return rows[0][0] if rows else None


def shows_vm(panel: StudentPanel) -> bool:
    return panel.vm_card in panel.children


def shows_paste_box(panel: StudentPanel) -> bool:
    return panel.paste_section in panel.children


async def request(panel: StudentPanel, pasted: str) -> None:
    """Paste and click Request, as a student does; wait until the server has answered."""
    panel.command.value = pasted
    panel.request_button.click()
    await until(lambda: not panel.request_button.disabled)


async def test_linux_command_shows_hostname_and_pin_then_ready(lablink, vm_factory, open_panel):
    vm = vm_factory("lab-vm-1")
    await available(lablink, "lab-vm-1")
    panel = await loaded(open_panel("alice"))
    assert not shows_vm(panel) and shows_paste_box(panel)
    assert 'href="https://remotedesktop.google.com/headless"' in panel.instructions.value
    assert 'target="_blank"' in panel.instructions.value

    code = fresh_code()
    panel.command.value = linux_command(code)
    panel.request_button.click()
    # The click itself only disables the button and says so; the request runs on the loop.
    assert panel.request_button.disabled
    assert "Requesting" in panel.feedback.value
    await until(lambda: not panel.request_button.disabled)

    server_view = (await lablink.my_vm("alice")).body
    assert server_view["hostname"] == "lab-vm-1"
    assert shows_vm(panel)
    assert "lab-vm-1" in panel.hostname_display.value
    assert f">{server_view['pin']}<" in panel.pin_display.value
    assert "user-select: all" in panel.pin_display.value  # one click selects it, to copy
    assert panel.command.value == ""  # the one-time code does not linger in the widget

    await until(lambda: "Ready" in panel.status_display.value)
    assert f'href="{ACCESS_URL}"' in panel.access_note.value
    assert "lab-vm-1" in panel.access_note.value
    (call,) = vm.calls()
    assert f"--code={code}" in call["argv"]


async def test_setup_shows_progress_with_elapsed_seconds(lablink, vm_factory, open_panel):
    vm = vm_factory("lab-vm-1")
    await available(lablink, "lab-vm-1")
    (vm.crd_dir / "delay").write_text("3")  # start-host takes a while, as the real one does
    panel = await loaded(open_panel("alice"))
    await request(panel, linux_command(fresh_code()))

    await until(lambda: "Setting up" in panel.status_display.value)
    await until(lambda: " s)" in panel.status_display.value)
    assert "setting up Chrome Remote Desktop" in panel.status_display.value
    await until(lambda: "Ready" in panel.status_display.value)


async def test_windows_command_works_and_says_so(lablink, vm_factory, open_panel):
    vm = vm_factory("lab-vm-1")
    await available(lablink, "lab-vm-1")
    panel = await loaded(open_panel("bob"))
    code = fresh_code()
    await request(panel, windows_command(code))

    pin = (await lablink.my_vm("bob")).body["pin"]
    assert f">{pin}<" in panel.pin_display.value
    assert "Windows version" in panel.notes.value
    await until(lambda: "Ready" in panel.status_display.value)
    assert f"--code={code}" in vm.calls()[0]["argv"]


async def test_garbage_shows_the_servers_error_and_assigns_nothing(lablink, vm_factory, open_panel):
    vm_factory("lab-vm-1")
    await available(lablink, "lab-vm-1")
    panel = await loaded(open_panel("carol"))
    pasted = "sudo apt install chrome-remote-desktop"
    # What the server itself answers to that paste (asked as another student).
    verdict = await lablink.request_vm("dave", pasted)
    assert verdict.code == 400

    await request(panel, pasted)
    assert html.escape(verdict.body["error"]) in panel.feedback.value
    assert html.escape(verdict.body["hint"]) in panel.feedback.value
    assert not shows_vm(panel) and shows_paste_box(panel)
    assert panel.command.value == pasted  # left there to fix
    assert (await lablink.my_vm("carol")).body["status"] == "none"
    assert query(lablink.database_url, "SELECT count(*) FROM vms WHERE assigned_user IS NOT NULL") == [(0,)]


async def test_no_free_vm_says_so_and_when_to_try_again(lablink, vm_factory, open_panel):
    vm_factory("lab-vm-1")
    await available(lablink, "lab-vm-1")
    taken = await lablink.request_vm("bob", linux_command(fresh_code()))
    assert taken.code == 200
    panel = await loaded(open_panel("alice"))

    await request(panel, linux_command(fresh_code()))
    assert "No VM is free right now." in panel.feedback.value
    assert "Try again in a minute" in panel.feedback.value
    assert not shows_vm(panel)
    assert not panel.request_button.disabled  # free to try again


async def test_failed_vm_shows_its_message_and_a_fresh_code_rearms_it(lablink, vm_factory, open_panel):
    vm = vm_factory("lab-vm-1")
    await available(lablink, "lab-vm-1")
    (vm.crd_dir / "exit_code").write_text("1")
    (vm.crd_dir / "stderr").write_text("OAuth error: invalid_grant\n")
    panel = await loaded(open_panel("erin"))
    await request(panel, linux_command(fresh_code()))

    await until(lambda: "Failed" in panel.status_display.value)
    failed = (await lablink.my_vm("erin")).body
    assert html.escape(failed["error"]) in panel.status_display.value  # the VM's own message
    assert "Google rejected the code" in panel.status_display.value
    assert shows_vm(panel) and shows_paste_box(panel)  # the prompt for a fresh code
    assert "fresh" in panel.instructions.value
    assert panel.request_button.description == "Send the fresh code"

    (vm.crd_dir / "exit_code").unlink()
    fresh = fresh_code()
    await request(panel, linux_command(fresh))
    await until(lambda: "Ready" in panel.status_display.value)
    active = (await lablink.my_vm("erin")).body
    assert active["hostname"] == failed["hostname"] == "lab-vm-1"
    assert f">{active['pin']}<" in panel.pin_display.value
    assert "keeps its PIN" in panel.notes.value
    assert not shows_paste_box(panel)
    assert [f"--code={fresh}" in call["argv"] for call in vm.calls()] == [False, True]


async def test_release_asks_first_then_gives_the_vm_back(lablink, vm_factory, open_panel):
    vm = vm_factory("lab-vm-1")
    await available(lablink, "lab-vm-1")
    panel = await loaded(open_panel("alice"))
    await request(panel, linux_command(fresh_code()))
    await until(lambda: "Ready" in panel.status_display.value)

    panel.release_button.click()
    assert panel.confirm_release_button in panel.release_row.children
    assert "Give lab-vm-1 back?" in panel.release_question.value
    panel.keep_button.click()
    assert panel.release_row.children == (panel.release_button,)
    assert (await lablink.my_vm("alice")).body["status"] == "active"  # nothing was released

    panel.release_button.click()
    panel.confirm_release_button.click()
    await until(lambda: not shows_vm(panel))
    assert "You gave <b>lab-vm-1</b> back" in panel.feedback.value
    assert shows_paste_box(panel) and panel.request_button.description == "Request a VM"
    assert (await lablink.my_vm("alice")).body["status"] == "none"
    await until(lambda: _status(lablink, "lab-vm-1") == "available")  # the VM tore down
    assert vm.host_configs() == []


async def test_a_release_elsewhere_shows_up_in_the_panel(lablink, vm_factory, open_panel):
    vm_factory("lab-vm-1")
    await available(lablink, "lab-vm-1")
    panel = await loaded(open_panel("bob"))
    await request(panel, linux_command(fresh_code()))
    await until(lambda: "Ready" in panel.status_display.value)

    released = await lablink.call("POST", "lablink/api/release", user="bob")  # e.g. from the web form
    assert released.code == 200
    await until(lambda: not shows_vm(panel))
    assert "You no longer have <b>lab-vm-1</b>" in panel.feedback.value


async def test_running_the_cell_again_shows_the_current_vm_at_once(lablink, vm_factory, open_panel):
    vm_factory("lab-vm-1")
    await available(lablink, "lab-vm-1")
    first = await loaded(open_panel("carol"))
    await request(first, linux_command(fresh_code()))
    pin = (await lablink.my_vm("carol")).body["pin"]

    again = await loaded(open_panel("carol"))
    assert shows_vm(again)
    assert "lab-vm-1" in again.hostname_display.value
    assert f">{pin}<" in again.pin_display.value
    # The older panel stops its background work and says why.
    assert not first.following and again.following
    assert first.request_button.disabled and first.release_button.disabled
    assert "newer LabLink panel" in first.connection_note.value


async def test_closing_the_panel_stops_its_background_work(lablink, open_panel):
    panel = await loaded(open_panel("dave"))
    assert panel.following
    panel.close()
    assert not panel.following


async def test_an_unreachable_server_is_reported_in_the_panel(open_panel):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    panel = open_panel("alice", url=f"http://127.0.0.1:{port}/")
    await until(lambda: "Cannot reach the LabLink server" in panel.connection_note.value)
    assert "Trying again in" in panel.connection_note.value

    await request(panel, linux_command(fresh_code()))
    assert "Cannot reach the LabLink server" in panel.feedback.value


async def test_a_token_the_server_refuses_says_what_to_set(lablink, open_panel):
    panel = open_panel("nobody")
    await until(lambda: "did not recognise this notebook" in panel.connection_note.value)
    assert "LABLINK_TOKEN" in panel.connection_note.value


async def test_with_no_server_to_find_one_sentence_says_what_to_set(monkeypatch):
    for name in ("JUPYTERHUB_SERVICE_URL", "JUPYTERHUB_API_TOKEN", "JPY_PARENT_PID"):
        monkeypatch.delenv(name, raising=False)
    panel = StudentPanel()
    try:
        assert "set LABLINK_URL" in panel.connection_note.value
        assert not panel.following
        await request(panel, linux_command(fresh_code()))
        assert "set LABLINK_URL" in panel.feedback.value
    finally:
        panel.close()
