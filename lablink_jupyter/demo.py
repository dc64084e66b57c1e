"""Simulated VMs on loopback: the real lablink-subscribe, with a stand-in for start-host.

With `c.LabLink.demo_vms = N` (or `jupyter lablink --demo-vms=N`) the whole system
runs on one machine: paste a command in Google's Linux format into the form and
watch a VM take it, "set up" CRD and turn active.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .kernel_env import KERNEL_VARIABLES
from .stand_in import write_stand_in

#: Shortest time between two starts of one demo VM.
RESTART_INTERVAL = 5.0


def subscribe_command() -> list[str]:
    """How to run lablink-subscribe with this Python (works from a checkout and from a wheel)."""
    return [sys.executable, "-m", "lablink_subscribe"]


class DemoFleet:
    """N lablink-subscribe processes that enroll with the fleet token and poll this server."""

    def __init__(
        self,
        count: int,
        allocator_url: str,
        enrollment_token: str,
        state_root: Path,
        log: logging.Logger | None = None,
    ) -> None:
        self.count = count
        self.allocator_url = allocator_url
        self.enrollment_token = enrollment_token
        self.state_root = state_root
        self.log = log or logging.getLogger(__name__)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._started_at: dict[str, float] = {}

    def start(self) -> None:
        """Start every demo VM."""
        for number in range(1, self.count + 1):
            self._start_one(f"demo-vm-{number}")
        self.log.info("LabLink started %d demo VMs (demo-vm-1 … demo-vm-%d)", self.count, self.count)

    def restart_exited(self) -> list[str]:
        """Start again each demo VM whose process ended (killed, crashed); their hostnames.

        One that ended within RESTART_INTERVAL of its start waits that long, so a VM that
        cannot run does not spin.
        """
        restarted = []
        now = time.monotonic()
        for hostname, process in list(self.processes.items()):
            returncode = process.poll()
            if returncode is None or now - self._started_at[hostname] < RESTART_INTERVAL:
                continue
            self.log.warning("LabLink demo VM %s exited (status %s); starting it again", hostname, returncode)
            self._start_one(hostname)
            restarted.append(hostname)
        return restarted

    def _start_one(self, hostname: str) -> None:
        home = self.state_root / hostname
        start_host = write_stand_in(home / "crd")
        # The token in the environment, not argv (ps shows argv); what kernels get stays with them.
        env = {k: v for k, v in os.environ.items() if k not in KERNEL_VARIABLES}
        env["LABLINK_ENROLL_TOKEN"] = self.enrollment_token
        self.processes[hostname] = subprocess.Popen(
            [
                *subscribe_command(),
                "--allocator", self.allocator_url,
                "--hostname", hostname,
                "--start-host", str(start_host),
                "--host-config-dir", str(start_host.parent / "config"),
                "--state-dir", str(home / "state"),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        self._started_at[hostname] = time.monotonic()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every demo VM, politely and then not."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
