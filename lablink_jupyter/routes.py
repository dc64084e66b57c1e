"""Every URL path LabLink serves, relative to the Jupyter server's base_url.

The server registers these and the notebook panels call them; the VM program in
client/ keeps its own copy (it must stay one standalone file) and a test checks
that the two agree.
"""

# VM-facing: bearer token of the VM (or of the fleet, to enroll).
VM_ENROLL = "lablink/api/vms/enroll"
VM_STARTUP = "lablink/vm_startup"
VM_STATUS = "lablink/api/vm_status"

# Student-facing: the Jupyter identity.
REQUEST_VM = "lablink/api/request_vm"
MY_VM = "lablink/api/my_vm"
RELEASE = "lablink/api/release"
FORM_PAGE = "lablink/"
VM_PAGE = "lablink/vm"

# Instructor-facing.
VMS = "lablink/api/vms"
VMS_CSV = "lablink/api/vms.csv"
VM_ONE = "lablink/api/vms/{hostname}"
VM_RELEASE = "lablink/api/vms/{hostname}/release"
EVENTS = "lablink/api/events"
ENROLLMENT_TOKEN = "lablink/api/enrollment_token"
ADMIN_PAGE = "lablink/admin"

# Anyone.
HEALTH = "lablink/api/health"
SUBSCRIBE_PROGRAM = "lablink/lablink_subscribe.py"  # the VM program, for VM images to download
