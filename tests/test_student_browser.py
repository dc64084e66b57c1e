"""A student in a real browser: JupyterLab runs student.ipynb, the panel gets a VM and shows its PIN.

Headless Debian Chromium driven by Playwright; JupyterLab is a separate server
process with LabLink, started the way a course would start it, so its kernel
finds LabLink only through what the server exported at start-up.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from conftest import ENROLL_TOKEN, VmProcess, fresh_code, linux_command, query

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
REPO = Path(__file__).resolve().parent.parent
BASE_URL = "/a%40b/"  # not root, and needing quoting, like pytest-jupyter's
SECONDS = 1000  # Playwright counts milliseconds

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no Chromium at {CHROMIUM}: apt-get install chromium chromium-driver (.ci/run does)",
)


@dataclass
class LabServer:
    """A JupyterLab server process with LabLink."""

    url: str
    token: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def lab_server(empty_database: str, tmp_path: Path) -> Iterator[LabServer]:
    """`jupyter lab` with LabLink on the test database, serving a copy of notebooks/."""
    token = secrets.token_hex(16)
    port = _free_port()
    root = tmp_path / "course"
    shutil.copytree(REPO / "notebooks", root)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    # Settings in a config file rather than argv, where `ps` would show the token.
    (config_dir / "jupyter_server_config.json").write_text(json.dumps({
        "ServerApp": {"ip": "127.0.0.1", "port": port, "port_retries": 0, "base_url": BASE_URL,
                      "root_dir": str(root), "open_browser": False, "allow_root": True},
        "IdentityProvider": {"token": token},
        "LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"},
        "LabLink": {"database_url": empty_database, "poll_timeout": 5.0, "stale_after": 30.0,
                    "enrollment_token": ENROLL_TOKEN},
    }))
    # A fresh browser profile: no news prompt, and the notebook's own kernel without asking.
    lab_settings = tmp_path / "lab-settings"
    for plugin, settings in [
        ("apputils-extension/notification", {"fetchNews": "false", "checkForUpdates": False}),
        ("notebook-extension/tracker", {"autoStartDefaultKernel": True}),
    ]:
        path = lab_settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABLINK_", "JUPYTERHUB_", "JPY_", "JUPYTER_"))}
    env.update(
        HOME=str(tmp_path / "home"), JUPYTER_CONFIG_DIR=str(config_dir),
        JUPYTER_DATA_DIR=str(tmp_path / "data"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(lab_settings),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
    )
    log_path = tmp_path / "jupyterlab.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "jupyterlab"], env=env, cwd=root,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = LabServer(f"http://127.0.0.1:{port}{BASE_URL}", token, process, log_path)
    try:
        _wait_until_healthy(server)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_healthy(server: LabServer, within: float = 90) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"JupyterLab exited:\n{server.log()[-3000:]}")
        try:
            if requests.get(server.url + "lablink/api/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"JupyterLab did not become healthy:\n{server.log()[-3000:]}")


@pytest.fixture
def browser_vm(lab_server: LabServer, empty_database: str, tmp_path: Path) -> Iterator[VmProcess]:
    """One real lablink-subscribe VM polling the JupyterLab server, available to hand out."""
    vm = VmProcess("lab-vm-browser", tmp_path / "vm", lab_server.url)
    vm.home.mkdir(parents=True)
    vm.start()
    try:
        deadline = time.monotonic() + 30
        while query(empty_database, "SELECT status FROM vms") != [("available",)]:
            assert time.monotonic() < deadline, f"the VM never became available:\n{vm.log()}"
            time.sleep(0.1)
        yield vm
    finally:
        vm.stop()


def test_student_gets_a_pin_in_jupyterlab(lab_server, browser_vm, empty_database, test_artifact):
    from playwright.sync_api import sync_playwright

    screenshot = test_artifact("student-panel.png")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            page.goto(f"{lab_server.url}lab/tree/student.ipynb?token={lab_server.token}")
            page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=90 * SECONDS)
            page.locator(".jp-Notebook .jp-CodeCell").first.click()
            page.locator("#jp-MainMenu").get_by_text("Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            panel = page.locator(".lablink-panel")
            panel.wait_for(timeout=60 * SECONDS)
            page.locator(".lablink-connection").filter(has_not_text="Looking").wait_for(
                state="attached", timeout=30 * SECONDS)
            page.locator(".lablink-command textarea").fill(linux_command(fresh_code()))
            page.locator(".lablink-request").click()

            pin = page.locator(".lablink-pin-value")
            pin.wait_for(timeout=60 * SECONDS)
            page.locator(".lablink-status").filter(has_text="Ready").wait_for(timeout=60 * SECONDS)
            ((hostname, server_pin),) = query(
                empty_database, "SELECT hostname, pin FROM vms WHERE assigned_user IS NOT NULL")
            assert pin.inner_text() == server_pin
            assert page.locator(".lablink-hostname-value").inner_text() == hostname
            assert page.get_by_text("Error displaying widget").count() == 0
            panel.scroll_into_view_if_needed()
            page.screenshot(path=screenshot)
        except Exception:
            page.screenshot(path=test_artifact("student-panel-failure.png"))
            print(lab_server.log()[-4000:])
            raise
        finally:
            browser.close()
    print(f"screenshot: {screenshot}")

    # The kernel and any other holder of the server's token are one student: the same VM.
    mine = requests.get(lab_server.url + "lablink/api/my_vm", timeout=10,
                        headers={"Authorization": f"token {lab_server.token}"}).json()
    assert (mine["hostname"], mine["status"]) == (hostname, "active")
