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
from pathlib import Path

from .kernel_env import KERNEL_VARIABLES
from .stand_in import write_stand_in


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

    def start(self) -> None:
        """Start every demo VM."""
        for number in range(1, self.count + 1):
            hostname = f"demo-vm-{number}"
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
        self.log.info("LabLink started %d demo VMs (demo-vm-1 … demo-vm-%d)", self.count, self.count)

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
