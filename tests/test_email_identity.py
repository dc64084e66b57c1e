"""identity = "email": the seed's open form, where a student types an email instead of logging in."""

from __future__ import annotations

import asyncio
import re
from urllib.parse import urlencode

import pytest

from conftest import cookie_header, cookies_of, fresh_code, linux_command, query


@pytest.fixture
def lablink_config(lablink_config):
    return {**lablink_config, "identity": "email"}


async def test_open_form_gives_a_vm_to_an_email(lablink):
    token = await lablink.enroll("vm-a")
    await lablink.poll("vm-a", token, wait=0)

    form = await lablink.call("GET", "lablink/")
    assert form.code == 200 and 'type="email"' in form.body
    jar = cookies_of(form.headers)
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', form.body).group(1)
    browser = {"Cookie": cookie_header(jar), "Accept": "text/html",
               "Content-Type": "application/x-www-form-urlencoded"}

    bad = await lablink.call("POST", "lablink/api/request_vm", headers=browser, body=urlencode(
        {"email": "not an email", "crd_command": linux_command(fresh_code()), "_xsrf": xsrf}))
    assert bad.code == 400 and "email" in bad.body

    posted = await lablink.call("POST", "lablink/api/request_vm", headers=browser, body=urlencode(
        {"email": "Ada@Example.edu", "crd_command": linux_command(fresh_code()), "_xsrf": xsrf}))
    assert posted.code == 303, posted
    jar.update(cookies_of(posted.headers))
    assert query(lablink.database_url, "SELECT assigned_user FROM vms") == [("ada@example.edu",)]

    page = await lablink.call("GET", "lablink/vm", headers={"Cookie": cookie_header(jar)})
    ((pin,),) = query(lablink.database_url, "SELECT pin FROM vms")
    assert page.code == 200 and pin in page.body

    mine = await lablink.call("GET", "lablink/api/my_vm", headers={"Cookie": cookie_header(jar)})
    assert mine.body["hostname"] == "vm-a" and mine.body["pin"] == pin
    stranger = await lablink.call("GET", "lablink/api/my_vm")
    assert stranger.code == 400 and stranger.body.get("pin") is None

    # Back on the form, Ada is shown the VM she has; a newcomer's browser is not.
    again = await lablink.call("GET", "lablink/", headers={"Cookie": cookie_header(jar)})
    assert "You have <b>vm-a</b>" in again.body and pin not in again.body
    assert 'value="ada@example.edu"' in again.body  # no need to type it again
    newcomer = await lablink.call("GET", "lablink/")
    assert "You have" not in newcomer.body

    # With no VM free, the form's page says when to try again, as the JSON answer does.
    jar = cookies_of(newcomer.headers)
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', newcomer.body).group(1)
    full = await lablink.call("POST", "lablink/api/request_vm", headers={**browser, "Cookie": cookie_header(jar)},
                              body=urlencode({"email": "bob@example.edu", "crd_command": linux_command(fresh_code()),
                                              "_xsrf": xsrf}))
    assert full.code == 503 and "No VM is free" in full.body and full.headers["Retry-After"] == "60"



async def test_typing_a_classmates_email_does_not_take_their_vm(lablink):
    # Anyone can type anyone's email on the open form: only the browser that got the VM may
    # see its PIN or re-arm it.
    for hostname in ("vm-a", "vm-b"):
        await lablink.poll(hostname, await lablink.enroll(hostname), wait=0)
    json_form = {"X-XSRFToken": "x", "Cookie": "_xsrf=x"}
    ada = await lablink.call("POST", "lablink/api/request_vm", headers=json_form,
                             json_body={"email": "ada@example.edu", "crd_command": linux_command(fresh_code())})
    assert ada.code == 200, ada
    ada_browser = {**json_form, "Cookie": "_xsrf=x; " + cookie_header(cookies_of(ada.headers))}
    ((pin, work_id),) = query(lablink.database_url, "SELECT pin, work_id FROM vms WHERE hostname = %s",
                              (ada.body["hostname"],))

    for typed in ("ada@example.edu", " ADA@Example.EDU "):
        other = await lablink.call("POST", "lablink/api/request_vm", headers=json_form,
                                   json_body={"email": typed, "crd_command": linux_command(fresh_code())})
        assert other.code == 409 and "another browser" in other.body["error"], other
        assert pin not in str(other.body) and other.body.get("hostname") is None
        assert "lablink-student" not in other.headers.get("Set-Cookie", "")
    # Ada's VM kept her code and PIN; the other VM was not handed out either.
    assert query(lablink.database_url, "SELECT hostname, assigned_user, pin, work_id FROM vms"
                                       " WHERE assigned_user IS NOT NULL") == [
        (ada.body["hostname"], "ada@example.edu", pin, work_id)]

    # From her own browser, Ada re-arms her VM with a fresh code.
    again = await lablink.call("POST", "lablink/api/request_vm", headers=ada_browser,
                               json_body={"email": "ada@example.edu", "crd_command": linux_command(fresh_code())})
    assert again.code == 200 and again.body["outcome"] == "rearmed" and again.body["pin"] == pin
    # A new student on the browser that was turned away still gets a VM of their own.
    bob = await lablink.call("POST", "lablink/api/request_vm", headers=json_form,
                             json_body={"email": "bob@example.edu", "crd_command": linux_command(fresh_code())})
    assert bob.code == 200 and bob.body["hostname"] != ada.body["hostname"]


async def test_a_json_call_without_xsrf_is_told_what_it_lacks(lablink):
    reply = await lablink.call("POST", "lablink/api/request_vm",
                               json_body={"email": "ada@example.edu", "crd_command": linux_command(fresh_code())})
    assert reply.code == 403 and "XSRF" in reply.body["error"] and "X-XSRFToken" in reply.body["hint"]


async def test_a_double_click_before_the_browser_is_remembered_gets_the_same_vm(lablink):
    # Both requests leave the browser before the first answer sets its cookie; the same
    # Google code in both shows they are one student's.
    for hostname in ("vm-a", "vm-b"):
        await lablink.poll(hostname, await lablink.enroll(hostname), wait=0)
    json_form = {"X-XSRFToken": "x", "Cookie": "_xsrf=x"}
    body = {"email": "ada@example.edu", "crd_command": linux_command(fresh_code())}
    replies = await asyncio.gather(*(lablink.call("POST", "lablink/api/request_vm", headers=json_form,
                                                  json_body=body) for _ in range(5)))
    assert [reply.code for reply in replies] == [200] * 5, replies
    assert len({(reply.body["hostname"], reply.body["pin"]) for reply in replies}) == 1
    assert sorted(reply.body["outcome"] for reply in replies) == ["assigned"] + ["unchanged"] * 4
