"""One VM to one student, no lost wake-up, nothing waits forever."""

from __future__ import annotations

import asyncio
import socket

import pytest

from conftest import fresh_code, linux_command, query, until


async def _fleet(lablink, count, prefix="vm"):
    """Enroll `count` VMs and make each poll once, so they are available."""
    tokens = {}
    for n in range(count):
        hostname = f"{prefix}-{n}"
        tokens[hostname] = await lablink.enroll(hostname)
    replies = await asyncio.gather(*(lablink.poll(h, t, wait=0) for h, t in tokens.items()))
    assert all(r.body == {"status": "waiting"} for r in replies), replies
    return tokens


async def test_fifty_students_twenty_vms(lablink):
    await _fleet(lablink, 20)
    students = [f"student{n}" for n in range(50)]
    replies = await asyncio.gather(
        *(lablink.request_vm(s, linux_command(fresh_code())) for s in students)
    )
    codes = sorted(r.code for r in replies)
    assert codes.count(200) == 20 and codes.count(503) == 30, codes
    granted = {s: r.body["hostname"] for s, r in zip(students, replies) if r.code == 200}
    assert len(set(granted.values())) == 20, "a VM went to two students"
    rows = query(lablink.database_url,
                 "SELECT assigned_user, hostname FROM vms WHERE assigned_user IS NOT NULL")
    assert dict(rows) == granted
    refused = [r for r in replies if r.code == 503]
    assert all(r.error == "No VM is free right now." and r.body["hint"] for r in refused)


async def test_same_student_asking_many_times_at_once_gets_one_vm(lablink):
    await _fleet(lablink, 5)
    replies = await asyncio.gather(
        *(lablink.request_vm("alice", linux_command(fresh_code())) for _ in range(8))
    )
    assert {r.code for r in replies} == {200}
    assert len({r.body["hostname"] for r in replies}) == 1
    assert query(lablink.database_url,
                 "SELECT count(*) FROM vms WHERE assigned_user = 'alice'") == [(1,)]


async def test_stale_vm_is_never_handed_out(lablink):
    await _fleet(lablink, 1)
    query(lablink.database_url, "UPDATE vms SET last_seen_at = now() - interval '1 hour'")
    reply = await lablink.request_vm("alice", linux_command(fresh_code()))
    assert reply.code == 503


# -- no lost wake-up ------------------------------------------------------------------
#
# A student's request can commit at any moment relative to the VM's poll. Each case
# below forces one moment by running the request from inside the poll, and repeats
# it; a lost wake-up shows as the poll answering "waiting" instead of the work.

MOMENTS = ["before LISTEN", "while LISTEN runs", "after LISTEN before the read",
           "after the read before the wait"]


@pytest.mark.parametrize("moment", MOMENTS)
async def test_request_at_any_moment_of_the_poll_reaches_the_vm(lablink, monkeypatch, moment):
    allocator = lablink.allocator
    listener = allocator.listener
    tokens = await _fleet(lablink, 1)
    (hostname, token), = tokens.items()
    # Let every channel be UNLISTENed between rounds, so each round really LISTENs again.
    monkeypatch.setattr(listener, "unlisten_delay", 0.0)
    real_subscribe = listener.subscribe
    real_poll_vm = allocator.db.poll_vm
    plan = {"armed": False, "request": None}

    async def student_asks():
        reply = await lablink.request_vm("alice", linux_command(fresh_code()))
        assert reply.code == 200, reply

    async def subscribe(channel, timeout=5.0):
        if plan["armed"] and moment == "before LISTEN":
            plan["armed"] = False
            await student_asks()
        if plan["armed"] and moment == "while LISTEN runs":
            plan["armed"] = False
            request = asyncio.ensure_future(student_asks())
            subscription = await real_subscribe(channel, timeout)
            await request
            return subscription
        subscription = await real_subscribe(channel, timeout)
        if plan["armed"] and moment == "after LISTEN before the read":
            plan["armed"] = False
            await student_asks()
        return subscription

    async def poll_vm(vm_id, **kwargs):
        row = await real_poll_vm(vm_id, **kwargs)
        if plan["armed"] and moment == "after the read before the wait":
            plan["armed"] = False
            await student_asks()
        return row

    monkeypatch.setattr(listener, "subscribe", subscribe)
    monkeypatch.setattr(allocator.db, "poll_vm", poll_vm)

    for _round in range(10):
        await until(lambda: listener.channel_count == 0, within=10)
        plan["armed"] = True
        answer = await lablink.poll(hostname, token)
        assert not plan["armed"]
        assert answer.body["status"] == "assigned", f"lost wake-up {moment}: {answer.body}"
        report = await lablink.call("POST", "lablink/api/vm_status", token=token, json_body={
            "hostname": hostname, "status": "active", "work_id": answer.body["work_id"]})
        assert report.code == 200, report
        assert (await lablink.call("POST", "lablink/api/release", user="alice")).code == 200
        assert (await lablink.poll(hostname, token)).body == {"status": "released"}
        done = await lablink.call("POST", "lablink/api/vm_status", token=token,
                                  json_body={"hostname": hostname, "status": "available"})
        assert done.code == 200, done


async def test_notification_while_busy_is_not_lost(lablink):
    # The listener marks a waiter woken even when it is not waiting at that instant.
    listener = lablink.allocator.listener
    subscription = await listener.subscribe("vm_updates_424242")
    assert subscription.listening
    query(lablink.database_url, "SELECT pg_notify('vm_updates_424242', 'x')")
    await until(lambda: subscription._woken, within=10)
    assert await subscription.wait(30) is True  # returns at once: the wake-up was kept
    subscription.close()


# -- nothing waits forever ------------------------------------------------------------------


async def test_poll_window_ends_with_waiting(lablink):
    (hostname, token), = (await _fleet(lablink, 1)).items()
    answer = await lablink.poll(hostname, token, wait=0.5)
    assert answer.code == 200 and answer.body == {"status": "waiting"}
    health = await lablink.health()
    assert health["waiters"] == 0 and health["vm_polls"] == 0


async def test_client_disconnecting_mid_poll_leaves_no_waiter_and_no_listen(lablink, monkeypatch):
    (hostname, token), = (await _fleet(lablink, 1)).items()
    monkeypatch.setattr(lablink.allocator.listener, "unlisten_delay", 0.2)
    body = f'{{"hostname": "{hostname}"}}'.encode()
    request = (
        f"POST {lablink.base_url}lablink/vm_startup HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    reader, writer = await asyncio.open_connection("127.0.0.1", lablink.port)
    writer.write(request)
    await writer.drain()
    await until(lambda: lablink.allocator.listener.waiter_count == 1)
    assert lablink.allocator.listener.channel_count == 1
    writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                         b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.close()
    await until(lambda: lablink.allocator.listener.waiter_count == 0, within=10)
    await until(lambda: lablink.allocator.listener.channel_count == 0, within=10)
    health = await lablink.health()
    assert health["waiters"] == 0 and health["channels"] == 0 and health["vm_polls"] == 0


async def test_second_poll_for_same_vm_replaces_the_first(lablink):
    (hostname, token), = (await _fleet(lablink, 1)).items()
    first = asyncio.ensure_future(lablink.poll(hostname, token))
    await until(lambda: lablink.allocator.listener.waiter_count == 1)
    second = asyncio.ensure_future(lablink.poll(hostname, token))
    assert (await first).body == {"status": "waiting"}
    assert lablink.allocator.listener.waiter_count == 1
    await lablink.request_vm("alice", linux_command(fresh_code()))
    assert (await second).body["status"] == "assigned"


async def test_listener_connection_killed_waiters_reread_and_relisten(lablink):
    # Kill the listener's backend: waiters must not hang, and must get work after it returns.
    (hostname, token), = (await _fleet(lablink, 1)).items()
    listener = lablink.allocator.listener
    reconnects = listener.reconnects
    poll = asyncio.ensure_future(lablink.poll(hostname, token, wait=30))
    await until(lambda: listener.waiter_count == 1 and listener.channel_count == 1)
    killed = query(lablink.database_url,
                   "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                   " WHERE application_name = 'lablink-listener' AND datname = current_database()")
    assert killed == [(True,)]
    await until(lambda: listener.reconnects > reconnects, within=20)
    await until(lambda: listener.connected and listener.channel_count == 1, within=20)
    reply = await lablink.request_vm("alice", linux_command(fresh_code()))
    assert reply.code == 200
    assert (await poll).body["status"] == "assigned"


async def test_double_click_on_the_last_free_vm_is_not_refused(lablink):
    # Both requests of one student must succeed: the second finds the VM the first got.
    for _round in range(5):
        query(lablink.database_url, "TRUNCATE vms, events RESTART IDENTITY CASCADE")
        await _fleet(lablink, 1)
        command = linux_command(fresh_code())
        replies = await asyncio.gather(*(lablink.request_vm("alice", command) for _ in range(2)))
        assert [r.code for r in replies] == [200, 200], [r.body for r in replies]
        assert {r.body["hostname"] for r in replies} == {"vm-0"}
