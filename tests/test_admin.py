"""Instructors run the fleet: roles, the fleet API, the CSV, the audit log, the admin page."""

from __future__ import annotations

import asyncio
import csv
import io

import pytest

from conftest import ENROLL_TOKEN, INSTRUCTOR, cookie_header, cookies_of, fresh_code, linux_command, query, until
from lablink_jupyter.roles import InstructorRule, is_instructor

# -- who is an instructor -----------------------------------------------------------------

#: Every instructor route: (method, path, JSON body).
ENDPOINTS = [
    ("GET", "lablink/api/vms", None),
    ("POST", "lablink/api/vms", {"hostnames": ["matrix-vm"]}),
    ("POST", "lablink/api/vms/matrix-vm/release", {}),
    ("DELETE", "lablink/api/vms/matrix-vm", None),
    ("GET", "lablink/api/vms.csv", None),
    ("GET", "lablink/api/events", None),
    ("GET", "lablink/api/enrollment_token", None),
    ("POST", "lablink/api/enrollment_token", {}),
    ("GET", "lablink/admin", None),
]

#: Who asks, and whether they may: a student, a Hub user in no instructor group, nobody
#: logged in, the configured instructor, a Hub admin, a member of the instructor group.
CALLERS = [
    ("alice", False),
    ("hubstudent", False),
    (None, False),
    (INSTRUCTOR, True),
    ("hubadmin", True),
    ("tina", True),
]


@pytest.mark.parametrize("caller, allowed", CALLERS)
@pytest.mark.parametrize("method, path, body", ENDPOINTS)
async def test_auth_matrix(lablink, method, path, body, caller, allowed):
    reply = await lablink.call(method, path, user=caller, json_body=body)
    if allowed:
        assert reply.code not in (401, 403), reply
        assert reply.code < 500, reply
        return
    if path == "lablink/admin":
        if caller is None:
            assert reply.code == 302 and "login" in reply.headers["Location"], reply
        else:
            assert reply.code == 403, reply
            assert "Instructors only" in reply.body
        return
    assert reply.code == 403, reply
    assert reply.body["error"] and reply.body["hint"]
    # A logged-in caller is told who the server took them for (a kernel then keeps the hint).
    assert reply.body.get("user") == caller
    # Nothing was written for a refused caller.
    assert query(lablink.database_url, "SELECT count(*) FROM vms") == [(0,)]
    assert query(lablink.database_url, "SELECT count(*) FROM events") == [(0,)]


class _PlainProvider:
    auth_enabled = True


def test_is_instructor_rules():
    from jupyter_server.auth import IdentityProvider, User

    rule = InstructorRule(instructors={"ada"}, instructor_group="teachers")
    hub = User("x")
    assert is_instructor(User("ada"), rule)
    assert not is_instructor(User("bob"), rule)
    assert not is_instructor(None, rule)
    for model, expected in [
        ({"name": "x", "admin": True, "groups": []}, True),
        ({"name": "x", "admin": False, "groups": ["teachers"]}, True),
        ({"name": "x", "admin": False, "groups": ["physics"]}, False),
        ({"name": "x"}, False),
    ]:
        hub.hub_user = model  # type: ignore[attr-defined]
        assert is_instructor(hub, rule) is expected, model
    hub.hub_user = {"name": "x", "admin": True, "groups": ["teachers"]}  # type: ignore[attr-defined]
    assert not is_instructor(hub, InstructorRule(hub_admins_are_instructors=False))
    # Without a Hub, whoever logs in to jupyter-server's own token login owns the server;
    # a custom identity provider (or a Hub) never makes its users owners.
    plain = IdentityProvider(token="secret")
    assert is_instructor(User("anonymous-1"), rule, plain)
    assert not is_instructor(User("anonymous-1"), InstructorRule(owner_is_instructor=False), plain)
    assert not is_instructor(User("anonymous-1"), rule, _PlainProvider())
    assert not is_instructor(hub, InstructorRule(hub_admins_are_instructors=False), plain)


# -- the fleet API ------------------------------------------------------------------------


async def _available(lablink, *hostnames):
    """Enroll VMs and poll once each, so they are available; their tokens."""
    tokens = {h: await lablink.enroll(h) for h in hostnames}
    for hostname, token in tokens.items():
        assert (await lablink.poll(hostname, token, wait=0)).body == {"status": "waiting"}
    return tokens


async def _vms(lablink):
    reply = await lablink.call("GET", "lablink/api/vms", user=INSTRUCTOR)
    assert reply.code == 200, reply
    return reply.body


async def test_register_hands_out_one_token_each_and_nothing_half_written(lablink):
    reply = await lablink.call("POST", "lablink/api/vms", user=INSTRUCTOR,
                               json_body={"hostnames": ["Lab-A", "lab-b", "lab-a"]})
    assert reply.code == 201, reply
    registered = reply.body["vms"]
    assert [vm["hostname"] for vm in registered] == ["lab-a", "lab-b"]
    assert all(vm["status"] == "provisioning" and len(vm["token"]) > 30 for vm in registered)
    assert len({vm["token"] for vm in registered}) == 2
    # Only the hash is kept.
    for vm in registered:
        assert query(lablink.database_url, "SELECT count(*) FROM vms WHERE token_hash = %s",
                     (vm["token"],)) == [(0,)]

    overview = await _vms(lablink)
    assert [(vm["hostname"], vm["status"], vm["stale"]) for vm in overview["vms"]] == [
        ("lab-a", "provisioning", False), ("lab-b", "provisioning", False)]
    assert overview["counts"]["provisioning"] == 2 and overview["counts"]["total"] == 2

    # The token works for that VM: its first poll makes it available.
    token = registered[0]["token"]
    assert (await lablink.poll("lab-a", token, wait=0)).body == {"status": "waiting"}
    assert (await lablink.poll("lab-b", token, wait=0)).code == 401

    events_before = query(lablink.database_url, "SELECT count(*) FROM events")
    again = await lablink.call("POST", "lablink/api/vms", user=INSTRUCTOR,
                               json_body={"hostnames": ["lab-c", "lab-a"]})
    assert again.code == 409 and "lab-a" in again.body["error"] and again.body["hint"]
    bad = await lablink.call("POST", "lablink/api/vms", user=INSTRUCTOR,
                             json_body={"hostnames": ["lab-d", "not a host!", "lab_e", ""]})
    assert bad.code == 400 and bad.body["hint"]
    assert all(f"'{name}'" in bad.body["error"] for name in ("not a host!", "lab_e", "")), bad
    # A VM called "enroll" could never be retired: DELETE lablink/api/vms/enroll is another route.
    reserved = await lablink.call("POST", "lablink/api/vms", user=INSTRUCTOR,
                                  json_body={"hostnames": ["enroll"]})
    assert reserved.code == 400 and "another name" in reserved.body["error"], reserved
    for body in ({}, {"hostnames": []}, {"hostnames": 7}, {"hostnames": [None]}):
        reply = await lablink.call("POST", "lablink/api/vms", user=INSTRUCTOR, json_body=body)
        assert reply.code == 400, (body, reply)
    assert query(lablink.database_url, "SELECT hostname FROM vms ORDER BY hostname") == [
        ("lab-a",), ("lab-b",)]
    assert query(lablink.database_url, "SELECT count(*) FROM events") == events_before


async def test_full_cycle_csv_and_events(lablink, vm_factory):
    vm_factory("lab-vm-1")
    await until(lambda: query(lablink.database_url, "SELECT status FROM vms") == [("available",)])
    code = fresh_code()
    reply = await lablink.request_vm("alice", linux_command(code))
    assert reply.code == 200, reply
    pin = reply.body["pin"]
    await lablink.wait_for_status("alice", "active")

    overview = await _vms(lablink)
    (vm,) = overview["vms"]
    assert vm["status"] == "active" and vm["user"] == "alice" and not vm["stale"]
    assert vm["assigned_at"] and vm["active_at"] and vm["seconds_since_seen"] is not None
    assert overview["counts"]["active"] == 1 and overview["counts"]["available"] == 0
    assert "pin" not in vm and pin not in str(overview) and code not in str(overview)

    released = await lablink.call("POST", "lablink/api/vms/lab-vm-1/release", user=INSTRUCTOR, json_body={})
    assert released.code == 200, released
    assert released.body == {"hostname": "lab-vm-1", "status": "released", "released_from": "alice"}
    await until(lambda: query(lablink.database_url, "SELECT status FROM vms") == [("available",)])
    assert (await lablink.my_vm("alice")).body["status"] == "none"
    again = await lablink.call("POST", "lablink/api/vms/lab-vm-1/release", user=INSTRUCTOR, json_body={})
    assert again.code == 409 and again.body["hint"]
    missing = await lablink.call("POST", "lablink/api/vms/nowhere/release", user=INSTRUCTOR, json_body={})
    assert missing.code == 404

    # The CSV: one row for the VM, one for the assignment, with its times.
    export = await lablink.call("GET", "lablink/api/vms.csv", user=INSTRUCTOR)
    assert export.code == 200
    assert export.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in export.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(export.body)))
    vm_rows = [r for r in rows if r["record"] == "vm"]
    history = [r for r in rows if r["record"] == "assignment"]
    assert [(r["hostname"], r["status"], r["user"]) for r in vm_rows] == [("lab-vm-1", "available", "")]
    (assignment,) = history
    assert assignment["hostname"] == "lab-vm-1" and assignment["user"] == "alice"
    assert assignment["status"] == "ended" and assignment["ended_as"] == "released"
    assert assignment["from"] < assignment["to"]
    assert float(assignment["seconds_to_active"]) >= 0
    assert assignment["codes"] == "1" and assignment["failures"] == "0"
    assert code not in export.body and pin not in export.body

    # The audit log: every transition, newest first, by whom, never a code or a PIN.
    page = await lablink.call("GET", "lablink/api/events", user=INSTRUCTOR)
    assert page.code == 200
    events = page.body["events"]
    assert [(e["actor"], e["action"]) for e in reversed(events)] == [
        ("vm:lab-vm-1", "enrolled"), ("vm:lab-vm-1", "online"), ("alice", "assigned"),
        ("vm:lab-vm-1", "delivered"), ("vm:lab-vm-1", "active"), (INSTRUCTOR, "released"),
        ("vm:lab-vm-1", "torn down")]
    assert events[1]["detail"] == "held by alice"
    assert all(e["hostname"] == "lab-vm-1" and e["at"] for e in events)
    assert page.body["latest_id"] == events[0]["id"] and page.body["next_before"] is None
    for row in query(lablink.database_url, "SELECT * FROM events"):
        text = repr(row)
        assert code not in text and pin not in text and code[:12] not in text


async def test_retire_asks_for_confirmation_when_held(lablink):
    tokens = await _available(lablink, "lab-r1", "lab-r2")
    reply = await lablink.request_vm("alice", linux_command(fresh_code()))
    held = reply.body["hostname"]
    free = ({"lab-r1", "lab-r2"} - {held}).pop()

    refused = await lablink.call("DELETE", f"lablink/api/vms/{held}", user=INSTRUCTOR)
    assert refused.code == 409 and "alice" in refused.body["error"] and "force=1" in refused.body["hint"]
    bad_flag = await lablink.call("DELETE", f"lablink/api/vms/{held}", user=INSTRUCTOR,
                                  params={"force": "maybe"})
    assert bad_flag.code == 400
    assert query(lablink.database_url, "SELECT status FROM vms WHERE hostname = %s", (held,)) == [("assigned",)]

    forced = await lablink.call("DELETE", f"lablink/api/vms/{held}", user=INSTRUCTOR, params={"force": "1"})
    assert forced.code == 200 and forced.body == {"hostname": held, "status": "retired", "released_from": "alice"}
    assert (await lablink.my_vm("alice")).body["status"] == "none"
    assert (await lablink.poll(held, tokens[held], wait=0)).code == 410

    plain = await lablink.call("DELETE", f"lablink/api/vms/{free}", user=INSTRUCTOR)
    assert plain.code == 200 and plain.body["status"] == "retired" and plain.body["released_from"] is None
    events = query(lablink.database_url, "SELECT count(*) FROM events")
    twice = await lablink.call("DELETE", f"lablink/api/vms/{free}", user=INSTRUCTOR)
    assert twice.code == 200 and query(lablink.database_url, "SELECT count(*) FROM events") == events
    assert (await lablink.call("DELETE", "lablink/api/vms/nowhere", user=INSTRUCTOR)).code == 404
    assert (await lablink.call("DELETE", "lablink/api/vms/Bad_Host!", user=INSTRUCTOR)).code == 400

    # No retired VM is handed out; registering it again brings it back with a new token.
    assert (await lablink.request_vm("bob", linux_command(fresh_code()))).code == 503
    again = await lablink.call("POST", "lablink/api/vms", user=INSTRUCTOR, json_body={"hostnames": [free]})
    assert again.code == 201 and again.body["vms"][0]["registered_again"] is True
    assert (await lablink.poll(free, again.body["vms"][0]["token"], wait=0)).body == {"status": "waiting"}
    assert (await lablink.request_vm("bob", linux_command(fresh_code()))).body["hostname"] == free

    actions = [a for (a,) in query(lablink.database_url,
                                   "SELECT action FROM events WHERE actor = %s ORDER BY id", (INSTRUCTOR,))]
    assert actions == ["retired", "retired", "registered again"]
    (detail,) = query(lablink.database_url,
                      "SELECT detail FROM events WHERE actor = %s AND hostname = %s", (INSTRUCTOR, held))
    assert detail == ("held by alice",)
    history = query(lablink.database_url, "SELECT username, ended_as FROM assignments WHERE hostname = %s",
                    (held,))
    assert history == [("alice", "retired")]


async def test_events_are_paged_and_long_polled(lablink):
    await _available(lablink, "lab-e1", "lab-e2", "lab-e3")  # six events: enrolled + online each
    first = await lablink.call("GET", "lablink/api/events", user=INSTRUCTOR, params={"limit": 4})
    assert [e["action"] for e in first.body["events"]] == ["online", "online", "online", "enrolled"]
    assert first.body["next_before"] == first.body["events"][-1]["id"]
    rest = await lablink.call("GET", "lablink/api/events", user=INSTRUCTOR,
                              params={"limit": 4, "before": first.body["next_before"]})
    assert len(rest.body["events"]) == 2 and rest.body["next_before"] is None
    ids = [e["id"] for e in first.body["events"] + rest.body["events"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 6
    one_host = await lablink.call("GET", "lablink/api/events", user=INSTRUCTOR, params={"hostname": "lab-e2"})
    assert {e["hostname"] for e in one_host.body["events"]} == {"lab-e2"}
    for params in ({"limit": 0}, {"limit": "x"}, {"wait": "-1"}, {"before": "0"}, {"hostname": "no way"}):
        assert (await lablink.call("GET", "lablink/api/events", user=INSTRUCTOR, params=params)).code == 400

    latest = first.body["latest_id"]
    # Nothing new: the window ends with no events.
    quiet = await lablink.call("GET", "lablink/api/events", user=INSTRUCTOR, params={"after": latest, "wait": 0.5})
    assert quiet.code == 200 and quiet.body["events"] == [] and quiet.body["latest_id"] == latest
    # A change while the instructor waits ends the wait with its event.
    waiting = asyncio.ensure_future(lablink.call(
        "GET", "lablink/api/events", user=INSTRUCTOR, params={"after": latest, "wait": 20}))
    await until(lambda: lablink.allocator.listener.waiter_count == 1)
    assert (await lablink.request_vm("alice", linux_command(fresh_code()))).code == 200
    woke = await asyncio.wait_for(waiting, 15)
    assert [(e["actor"], e["action"]) for e in woke.body["events"]] == [("alice", "assigned")]
    assert woke.body["latest_id"] > latest


async def test_enrollment_token_from_config_is_shown_not_rotated(lablink):
    shown = await lablink.call("GET", "lablink/api/enrollment_token", user=INSTRUCTOR)
    assert shown.body == {"token": ENROLL_TOKEN, "source": "config", "rotatable": False}
    rotate = await lablink.call("POST", "lablink/api/enrollment_token", user=INSTRUCTOR, json_body={})
    assert rotate.code == 409 and rotate.body["hint"]


async def test_admin_page_shows_the_fleet_and_runs_its_forms(lablink):
    await _available(lablink, "lab-p1", "lab-p2")
    assert (await lablink.request_vm("alice", linux_command(fresh_code()))).code == 200
    page = await lablink.call("GET", "lablink/admin", user=INSTRUCTOR)
    assert page.code == 200 and page.headers["Content-Type"].startswith("text/html")
    for text in ("lab-p1", "lab-p2", "alice", 'id="count-assigned">1<', 'id="count-available">1<',
                 "lablink/api/vms.csv", "Register VMs", "Recent events"):
        assert text in page.body, text
    held = query(lablink.database_url, "SELECT hostname FROM vms WHERE assigned_user = 'alice'")[0][0]

    form = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "text/html"}
    released = await lablink.call("POST", "lablink/admin", user=INSTRUCTOR, headers=form,
                                  body=f"action=release&hostname={held}")
    # Sent back to the page by GET, so that reloading it releases nothing again.
    assert released.code == 303 and released.headers["Location"].endswith("lablink/admin"), released
    after = await lablink.call("GET", "lablink/admin", user=INSTRUCTOR,
                               headers={"Cookie": cookie_header(cookies_of(released.headers))})
    assert f"Released {held} from alice." in after.body and 'id="count-assigned">0<' in after.body
    assert "lablink-admin-notice=;" in after.headers.get("Set-Cookie", "").replace('""', "")
    registered = await lablink.call("POST", "lablink/admin", user=INSTRUCTOR, headers=form,
                                    body="action=register&hostnames=lab-p3%0Alab-p4")
    assert registered.code == 200 and "not shown again" in registered.body
    assert query(lablink.database_url, "SELECT count(*) FROM vms WHERE status = 'provisioning'") == [(2,)]
    duplicate = await lablink.call("POST", "lablink/admin", user=INSTRUCTOR, headers=form,
                                   body="action=register&hostnames=lab-p3")
    assert duplicate.code == 409 and "Already registered: lab-p3." in duplicate.body
    token = await lablink.call("POST", "lablink/admin", user=INSTRUCTOR, headers=form, body="action=show_token")
    assert ENROLL_TOKEN in token.body
    unknown = await lablink.call("POST", "lablink/admin", user=INSTRUCTOR, headers=form, body="action=drop")
    assert unknown.code == 400
    student = await lablink.call("POST", "lablink/admin", user="alice", headers=form,
                                 body="action=register&hostnames=lab-p9")
    assert student.code == 403
    assert query(lablink.database_url, "SELECT count(*) FROM vms WHERE hostname = 'lab-p9'") == [(0,)]


async def test_admin_page_escapes_what_students_typed(lablink):
    # With the open form, students type their own names: the page shows them as text, never runs them.
    hostile = "x');alert(1);//<script>alert(2)</script>@example.edu"
    query(lablink.database_url, "INSERT INTO events (actor, action) VALUES (%s, 'assigned')", (hostile,))
    page = await lablink.call("GET", "lablink/admin", user=INSTRUCTOR)
    assert page.code == 200
    assert "<script>alert(2)" not in page.body and "x&#39;);alert(1)" in page.body


async def test_every_transition_writes_an_event_without_secrets(lablink):
    """Walk a VM through every transition; each one adds its event, and none holds a code or PIN."""
    secrets: list[str] = []

    def newest():
        return query(lablink.database_url,
                     "SELECT actor, action, hostname, detail FROM events ORDER BY id DESC LIMIT 1")[0]

    async def assign(user):
        code = fresh_code()
        reply = await lablink.request_vm(user, linux_command(code))
        assert reply.code == 200, reply
        secrets.extend([code, reply.body["pin"]])
        return reply.body

    token = await lablink.enroll("lab-t")
    assert newest() == ("vm:lab-t", "enrolled", "lab-t", None)
    await lablink.poll("lab-t", token, wait=0)
    assert newest()[:2] == ("vm:lab-t", "online")
    await assign("alice")
    assert newest()[:2] == ("alice", "assigned")
    work = (await lablink.poll("lab-t", token, wait=0)).body
    assert newest()[:2] == ("vm:lab-t", "delivered")
    assert (await lablink.poll("lab-t", token, wait=0)).body["work_id"] == work["work_id"]
    assert newest()[:2] == ("vm:lab-t", "delivered again")
    message = "Google rejected the code; get a fresh command and paste it again."
    assert (await lablink.call("POST", "lablink/api/vm_status", token=token, json_body={
        "hostname": "lab-t", "status": "failed", "message": message, "work_id": work["work_id"]})).code == 200
    assert newest() == ("vm:lab-t", "failed", "lab-t", message)
    await assign("alice")
    assert newest()[:2] == ("alice", "re-armed with a new code")
    work = (await lablink.poll("lab-t", token, wait=0)).body
    assert (await lablink.call("POST", "lablink/api/vm_status", token=token, json_body={
        "hostname": "lab-t", "status": "active", "work_id": work["work_id"]})).code == 200
    assert newest()[:2] == ("vm:lab-t", "active")
    assert (await lablink.call("POST", "lablink/api/release", user="alice")).code == 200
    assert newest()[:2] == ("alice", "released")
    assert (await lablink.call("POST", "lablink/api/vm_status", token=token, json_body={
        "hostname": "lab-t", "status": "available"})).code == 200
    assert newest()[:2] == ("vm:lab-t", "torn down")
    await assign("bob")
    assert (await lablink.call("POST", "lablink/api/vms/lab-t/release", user=INSTRUCTOR, json_body={})).code == 200
    assert newest() == (INSTRUCTOR, "released", "lab-t", "held by bob")
    assert (await lablink.call("DELETE", "lablink/api/vms/lab-t", user=INSTRUCTOR)).code == 200
    assert newest() == (INSTRUCTOR, "retired", "lab-t", None)
    registered = await lablink.call("POST", "lablink/api/vms", user=INSTRUCTOR, json_body={"hostnames": ["lab-t"]})
    assert newest() == (INSTRUCTOR, "registered again", "lab-t", None)
    secrets.append(registered.body["vms"][0]["token"])
    secrets.append(token)

    # Every status the VM went through, as the history shows, has its events; the raw rows
    # (and the assignment history) never hold a code, a PIN or a token.
    assert query(lablink.database_url, "SELECT username, codes, failures, ended_as FROM assignments "
                 "ORDER BY id") == [("alice", 2, 1, "released"), ("bob", 1, 0, "available")]
    raw = repr(query(lablink.database_url, "SELECT * FROM events")) + repr(
        query(lablink.database_url, "SELECT * FROM assignments"))
    for secret in secrets:
        assert secret not in raw
