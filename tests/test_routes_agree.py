"""The standalone VM program and the server agree on paths and on what a code looks like."""

import lablink_subscribe

from lablink_jupyter import crd, routes


def test_vm_program_uses_the_server_routes():
    assert lablink_subscribe.ENROLL_PATH == routes.VM_ENROLL
    assert lablink_subscribe.STARTUP_PATH == routes.VM_STARTUP
    assert lablink_subscribe.STATUS_PATH == routes.VM_STATUS


def test_vm_program_checks_codes_like_the_server():
    assert lablink_subscribe.CODE_RE.pattern == crd.CODE_RE.pattern
    assert lablink_subscribe.REDIRECT_URL == crd.REDIRECT_URL
