"""Delivery is not completion: work survives dead sockets and dead VMs; failures re-arm."""

from __future__ import annotations

import asyncio
import json
import os
import signal

from conftest import INSTRUCTOR, fresh_code, linux_command, query, until


def _status(lablink, hostname):
    rows = query(lablink.database_url, "SELECT status FROM vms WHERE hostname = %s", (hostname,))
    return rows[0][0] if rows else None


async def test_killed_vm_gets_its_work_after_restart(lablink, vm_factory):
    vm = vm_factory("lab-vm-1")
    listener = lablink.allocator.listener
    await until(lambda: _status(lablink, "lab-vm-1") == "available" and listener.waiter_count == 1)
    vm.kill()  # SIGKILL mid-poll
    await until(lambda: listener.waiter_count == 0, within=15)

    code = fresh_code()
    reply = await lablink.request_vm("alice", linux_command(code))
    assert reply.code == 200 and reply.body["hostname"] == "lab-vm-1"
    assert _status(lablink, "lab-vm-1") == "assigned"

    vm.start()
    await lablink.wait_for_status("alice", "active")
    (call,) = vm.calls()
    assert f"--code={code}" in call["argv"]
    await until(lambda: listener.waiter_count == 1, within=15)


async def test_work_written_into_a_dead_socket_is_delivered_again(lablink, vm_factory):
    token = await lablink.enroll("lab-vm-1")
    await lablink.poll("lab-vm-1", token, wait=0)
    code = fresh_code()
    assert (await lablink.request_vm("alice", linux_command(code))).code == 200

    # The VM's answer goes out, but the VM never reads it (its connection died).
    lost = await lablink.poll("lab-vm-1", token)
    assert lost.body["status"] == "assigned"
    assert _status(lablink, "lab-vm-1") == "configuring"
    assert (await lablink.my_vm("alice")).body["status"] == "configuring"

    again = await lablink.poll("lab-vm-1", token)
    assert again.body == lost.body  # same code, same PIN, same work_id
    actions = [a for (a,) in query(lablink.database_url, "SELECT action FROM events ORDER BY id")]
    assert actions[-2:] == ["delivered", "delivered again"]


async def test_failed_setup_then_fresh_code_rearms_the_same_vm(lablink, vm_factory):
    vm = vm_factory("lab-vm-1")
    await until(lambda: _status(lablink, "lab-vm-1") == "available")
    vm.crd_dir.joinpath("exit_code").write_text("1")
    vm.crd_dir.joinpath("stderr").write_text("OAuth error: invalid_grant\n")

    first_code = fresh_code()
    first = await lablink.request_vm("alice", linux_command(first_code))
    pin = first.body["pin"]
    failed = await lablink.wait_for_status("alice", "failed")
    assert "fresh command" in failed["error"]
    assert failed["pin"] == pin
    # The page says what went wrong, and no longer tells her to connect.
    page = await lablink.call("GET", "lablink/vm", user="alice")
    assert "fresh command" in page.body and '<p id="connect" hidden>' in page.body

    again = await lablink.request_vm("alice", linux_command(first_code))
    assert again.code == 409 and "only once" in again.error

    vm.crd_dir.joinpath("exit_code").unlink()
    second_code = fresh_code()
    rearmed = await lablink.request_vm("alice", linux_command(second_code))
    assert rearmed.code == 200, rearmed
    assert rearmed.body["hostname"] == "lab-vm-1" and rearmed.body["pin"] == pin
    assert rearmed.body["outcome"] == "rearmed"
    await lablink.wait_for_status("alice", "active")
    codes = [c["argv"][1] for c in vm.calls()]
    assert codes == [f"--code={first_code}", f"--code={second_code}"]


async def test_windows_command_is_accepted_with_a_note(lablink):
    token = await lablink.enroll("lab-vm-1")
    await lablink.poll("lab-vm-1", token, wait=0)
    code = fresh_code()
    command = (
        '"%PROGRAMFILES(X86)%\\Google\\Chrome Remote Desktop\\CurrentVersion\\remoting_start_host.exe"'
        f' --code="{code}" --redirect-url="https://remotedesktop.google.com/_/oauthredirect"'
        " --name=%COMPUTERNAME%"
    )
    reply = await lablink.request_vm("alice", command)
    assert reply.code == 200
    assert any("Windows" in note for note in reply.body["notes"])
    assert (await lablink.poll("lab-vm-1", token)).body["code"] == code


async def test_garbage_is_refused_and_nothing_is_assigned(lablink):
    token = await lablink.enroll("lab-vm-1")
    await lablink.poll("lab-vm-1", token, wait=0)
    for paste in ["", "hello", "https://remotedesktop.google.com/headless",
                  '--code="4/0abcdefghijklmnopqrstu; rm -rf ~"']:
        reply = await lablink.call("POST", "lablink/api/request_vm", user="alice",
                                   json_body={"crd_command": paste})
        assert reply.code == 400, (paste, reply)
        assert reply.error and reply.body["hint"]
    assert _status(lablink, "lab-vm-1") == "available"


async def test_one_code_goes_to_one_vm(lablink):
    for host in ("vm-a", "vm-b"):
        await lablink.poll(host, await lablink.enroll(host), wait=0)
    command = linux_command(fresh_code())
    assert (await lablink.request_vm("alice", command)).code == 200
    assert (await lablink.request_vm("bob", command)).code == 409
    assert query(lablink.database_url, "SELECT count(*) FROM vms WHERE status = 'assigned'") == [(1,)]


async def test_old_code_is_flagged_as_likely_expired(lablink, lablink_config):
    token = await lablink.enroll("lab-vm-1")
    await lablink.poll("lab-vm-1", token, wait=0)
    assert (await lablink.request_vm("alice", linux_command(fresh_code()))).code == 200
    assert "warning" not in (await lablink.my_vm("alice")).body
    query(lablink.database_url, "UPDATE vms SET code_received_at = now() - interval '10 minutes'")
    view = (await lablink.my_vm("alice")).body
    assert "expire" in view["warning"]


async def test_report_for_replaced_work_is_refused(lablink):
    token = await lablink.enroll("lab-vm-1")
    await lablink.poll("lab-vm-1", token, wait=0)
    await lablink.request_vm("alice", linux_command(fresh_code()))
    old = (await lablink.poll("lab-vm-1", token)).body
    await lablink.request_vm("alice", linux_command(fresh_code()))  # a new code re-arms
    late = await lablink.call("POST", "lablink/api/vm_status", token=token, json_body={
        "hostname": "lab-vm-1", "status": "active", "work_id": old["work_id"]})
    assert late.code == 409
    new = (await lablink.poll("lab-vm-1", token)).body
    assert new["work_id"] == old["work_id"] + 1 and new["code"] != old["code"]


async def test_release_while_configuring_makes_the_vm_tear_down(lablink):
    token = await lablink.enroll("lab-vm-1")
    await lablink.poll("lab-vm-1", token, wait=0)
    await lablink.request_vm("alice", linux_command(fresh_code()))
    work = (await lablink.poll("lab-vm-1", token)).body
    assert (await lablink.call("POST", "lablink/api/release", user="alice")).code == 200
    late = await lablink.call("POST", "lablink/api/vm_status", token=token, json_body={
        "hostname": "lab-vm-1", "status": "active", "work_id": work["work_id"]})
    assert late.code == 409
    assert (await lablink.poll("lab-vm-1", token)).body == {"status": "released"}
    assert (await lablink.request_vm("bob", linux_command(fresh_code()))).code == 503  # not yet free
    await lablink.call("POST", "lablink/api/vm_status", token=token,
                       json_body={"hostname": "lab-vm-1", "status": "available"})
    assert (await lablink.request_vm("bob", linux_command(fresh_code()))).code == 200


async def test_release_before_delivery_frees_the_vm_at_once(lablink):
    token = await lablink.enroll("lab-vm-1")
    await lablink.poll("lab-vm-1", token, wait=0)
    await lablink.request_vm("alice", linux_command(fresh_code()))
    assert (await lablink.call("POST", "lablink/api/release", user="alice")).body["status"] == "available"
    poll = asyncio.ensure_future(lablink.poll("lab-vm-1", token, wait=0.5))
    assert (await poll).body == {"status": "waiting"}


async def test_a_code_used_once_is_refused_after_release_too(lablink):
    for host in ("vm-a", "vm-b"):
        await lablink.poll(host, await lablink.enroll(host), wait=0)
    command = linux_command(fresh_code())
    assert (await lablink.request_vm("alice", command)).code == 200
    assert (await lablink.call("POST", "lablink/api/release", user="alice")).code == 200
    for student in ("alice", "bob"):
        again = await lablink.request_vm(student, command)
        assert again.code == 409 and "only once" in again.error, (student, again)
    assert query(lablink.database_url, "SELECT count(*) FROM vms WHERE assigned_user IS NOT NULL") == [(0,)]


async def test_refused_request_does_not_use_up_the_code(lablink):
    command = linux_command(fresh_code())
    assert (await lablink.request_vm("alice", command)).code == 503  # no VM yet
    await lablink.poll("vm-a", await lablink.enroll("vm-a"), wait=0)
    assert (await lablink.request_vm("alice", command)).code == 200  # the same code still works


async def test_fresh_code_on_a_dead_vm_moves_the_student_to_a_live_one(lablink):
    dead_token = await lablink.enroll("vm-dead")
    await lablink.poll("vm-dead", dead_token, wait=0)
    first = await lablink.request_vm("alice", linux_command(fresh_code()))
    assert first.body["hostname"] == "vm-dead"
    assert (await lablink.poll("vm-dead", dead_token)).body["status"] == "assigned"
    # vm-dead dies while setting up; vm-live comes up.
    query(lablink.database_url,
          "UPDATE vms SET last_seen_at = now() - interval '1 hour' WHERE hostname = 'vm-dead'")
    view = (await lablink.my_vm("alice")).body
    assert "has not checked in" in view["warning"]
    live_token = await lablink.enroll("vm-live")
    await lablink.poll("vm-live", live_token, wait=0)

    moved = await lablink.request_vm("alice", linux_command(fresh_code()))
    assert moved.code == 200 and moved.body["hostname"] == "vm-live"
    assert moved.body["outcome"] == "moved"
    assert any("vm-dead stopped responding" in note for note in moved.body["notes"])
    assert (await lablink.poll("vm-live", live_token)).body["status"] == "assigned"
    # The dead VM tears down if it ever comes back.
    assert (await lablink.poll("vm-dead", dead_token)).body == {"status": "released"}


async def test_retiring_a_held_vm_tears_its_crd_host_down(lablink, vm_factory):
    vm = vm_factory("lab-vm-1")
    await until(lambda: _status(lablink, "lab-vm-1") == "available")
    await lablink.request_vm("alice", linux_command(fresh_code()))
    await lablink.wait_for_status("alice", "active")
    assert len(vm.host_configs()) == 1
    retired = await lablink.call("DELETE", "lablink/api/vms/lab-vm-1", user=INSTRUCTOR,
                                 params={"force": "1"})
    assert retired.code == 200, retired
    await until(lambda: vm.host_configs() == [], within=30)
    assert vm.calls("chrome-remote-desktop")


async def test_a_vm_that_dropped_its_poll_is_handed_out_last(lablink, vm_factory):
    listener = lablink.allocator.listener
    dying = vm_factory("lab-vm-1")
    await until(lambda: _status(lablink, "lab-vm-1") == "available" and listener.waiter_count == 1)
    vm_factory("lab-vm-2")
    await until(lambda: _status(lablink, "lab-vm-2") == "available" and listener.waiter_count == 2)
    dying.kill()  # lab-vm-1 dies mid-poll: its connection closes unanswered
    await until(lambda: query(lablink.database_url, "SELECT disconnected_at IS NOT NULL FROM vms"
                                                    " WHERE hostname = 'lab-vm-1'") == [(True,)], within=15)
    # lab-vm-1 was seen last (ordering alone would pick it), yet the live VM goes first.
    query(lablink.database_url, "UPDATE vms SET last_seen_at = now() - interval '5 seconds'"
                                " WHERE hostname = 'lab-vm-2'")
    first = await lablink.request_vm("alice", linux_command(fresh_code()))
    assert first.code == 200 and first.body["hostname"] == "lab-vm-2"
    # With no other VM free, the dropped one is still handed out: it may be restarting.
    second = await lablink.request_vm("bob", linux_command(fresh_code()))
    assert second.code == 200 and second.body["hostname"] == "lab-vm-1"
    dying.start()
    await lablink.wait_for_status("bob", "active")


async def _restart_while_setting_up(lablink, vm):
    """Alice's code reaches the VM; its program dies while start-host runs and comes back."""
    await until(lambda: _status(lablink, "lab-vm-1") == "available")
    hold = vm.crd_dir / "hold"
    hold.write_text("")  # the stand-in start-host waits while this file exists
    assert (await lablink.request_vm("alice", linux_command(fresh_code()))).code == 200
    await until(lambda: len(vm.calls()) == 1)
    vm.kill()  # start-host leads its own session: it goes on without the program
    vm.start()
    await until(lambda: "was being set up when this program stopped" in vm.log(), within=30)
    started = json.loads((vm.home / "state" / "last_work.json").read_text())
    return hold, started["start_host_pid"]


async def test_a_vm_restarted_during_setup_waits_for_start_host_instead_of_rerunning_it(lablink, vm_factory):
    vm = vm_factory("lab-vm-1")
    hold, _pid = await _restart_while_setting_up(lablink, vm)
    hold.unlink()  # the first start-host finishes and registers the host
    await lablink.wait_for_status("alice", "active")
    assert len(vm.calls()) == 1  # Google's one-time code went to start-host once


async def test_a_setup_cut_short_by_a_restart_asks_for_a_fresh_code(lablink, vm_factory):
    vm = vm_factory("lab-vm-1")
    hold, pid = await _restart_while_setting_up(lablink, vm)
    os.kill(pid, signal.SIGKILL)  # start-host died with the program: no host was registered
    failed = await lablink.wait_for_status("alice", "failed")
    assert "interrupted" in failed["error"] and "fresh command" in failed["error"]
    assert len(vm.calls()) == 1
    hold.unlink()
    rearmed = await lablink.request_vm("alice", linux_command(fresh_code()))
    assert rearmed.code == 200 and rearmed.body["outcome"] == "rearmed"
    await lablink.wait_for_status("alice", "active")
    assert len(vm.calls()) == 2
