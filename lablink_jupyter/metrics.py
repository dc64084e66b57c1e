"""LabLink's figures on the Prometheus endpoint jupyter-server already serves (`/metrics`).

The metrics live in prometheus_client's default registry, which jupyter-server
exports, so they are defined once per process, here.

Across allocator processes: `lablink_vms` and `lablink_vms_stale` are read
from the database, so every process reports the same fleet-wide figures
(aggregate them with `max`, not `sum`); the other metrics count what this
process did (aggregate them with `sum`).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from .statuses import VmStatus

VMS = Gauge(
    "lablink_vms",
    "VMs in each status, fleet-wide (read from the database).",
    ["status"],
)

VMS_STALE = Gauge(
    "lablink_vms_stale",
    "VMs expected to poll but not seen for stale_after seconds, fleet-wide; never handed out.",
)

VM_POLLS_WAITING = Gauge(
    "lablink_vm_polls_waiting",
    "VM long-polls this process holds open, waiting for work.",
)

ASSIGNMENT_REQUESTS = Counter(
    "lablink_assignment_requests",
    "Students' requests for a VM answered by this process, by outcome.",
    ["outcome"],
)

#: Every outcome a request can have, so each series exists from the start.
REQUEST_OUTCOMES = (
    "assigned",  # a new VM
    "rearmed",  # a new code for the VM the student holds
    "unchanged",  # the same code again
    "moved",  # the student's VM stopped responding: a live one instead
    "held_by_another",  # the open form: the email holds a VM asked for from another browser
    "no_vm_free",
    "code_already_used",
    "bad_command",
    "database_unavailable",
)

WAKEUP_LATENCY = Histogram(
    "lablink_wakeup_latency_seconds",
    "From a student's request committed to the VM's answer written, for work delivered by this process.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)

CONFIGURE_TIMEOUTS = Counter(
    "lablink_configure_timeouts",
    "VMs this process marked failed because they did not report within configure_timeout.",
)

for _status in VmStatus:
    VMS.labels(status=_status.value)
for _outcome in REQUEST_OUTCOMES:
    ASSIGNMENT_REQUESTS.labels(outcome=_outcome)


def set_fleet_counts(counts: dict[str, tuple[int, int]]) -> None:
    """Publish the VMs by status (and the stale ones) read from the database."""
    for status in VmStatus:
        VMS.labels(status=status.value).set(counts.get(status.value, (0, 0))[0])
    VMS_STALE.set(sum(stale for _, stale in counts.values()))
