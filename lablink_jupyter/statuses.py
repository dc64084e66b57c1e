"""The life of a VM, in one enum mirrored by the CHECK constraint in sql/."""

from __future__ import annotations

import enum


class VmStatus(str, enum.Enum):
    """Where a VM is in its life; the values are what the database stores."""

    PROVISIONING = "provisioning"  # registered, has never polled
    AVAILABLE = "available"  # polling, free to hand out
    ASSIGNED = "assigned"  # a student holds it; code and PIN stored, not yet delivered
    CONFIGURING = "configuring"  # the VM received the code and is setting up CRD
    ACTIVE = "active"  # the VM reported CRD up
    FAILED = "failed"  # the VM reported an error; a fresh code re-arms it
    RELEASED = "released"  # let go; the VM tears down on its next poll
    RETIRED = "retired"  # removed by an instructor

    def __str__(self) -> str:
        return self.value


#: Statuses in which a student holds the VM.
HELD = frozenset(
    {VmStatus.ASSIGNED, VmStatus.CONFIGURING, VmStatus.ACTIVE, VmStatus.FAILED}
)
#: Statuses in which the VM has work to collect on its next poll.
WORK_PENDING = frozenset({VmStatus.ASSIGNED, VmStatus.CONFIGURING})
