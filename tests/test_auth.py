"""Who may do what: VM tokens, student identity, XSRF on the web form."""

from __future__ import annotations

import json
import re
from urllib.parse import urlencode

import pytest

from conftest import cookie_header, cookies_of, ENROLL_TOKEN, fresh_code, linux_command, query


async def test_vm_token_works_only_for_its_own_hostname(lablink):
    token_a = await lablink.enroll("vm-a")
    await lablink.enroll("vm-b")
    assert (await lablink.poll("vm-a", token_a, wait=0)).code == 200
    stolen = await lablink.poll("vm-b", token_a, wait=0)
    assert stolen.code == 401 and stolen.body["hint"]
    report = await lablink.call("POST", "lablink/api/vm_status", token=token_a,
                                json_body={"hostname": "vm-b", "status": "failed"})
    assert report.code == 401
    # vm-b never polled, so it is still provisioning: the stolen poll did not mark it seen.
    assert query(lablink.database_url, "SELECT status FROM vms WHERE hostname = 'vm-b'") == [
        ("provisioning",)]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer "}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer not-a-token"}])
async def test_vm_routes_refuse_missing_or_wrong_tokens(lablink, headers):
    await lablink.enroll("vm-a")
    for path in ("lablink/vm_startup", "lablink/api/vm_status"):
        reply = await lablink.call("POST", path, json_body={"hostname": "vm-a", "status": "active"},
                                   headers=headers)
        assert reply.code == 401, (path, reply)
        assert reply.error


async def test_enrolling_needs_the_fleet_token_and_rotates_the_vm_token(lablink):
    wrong = await lablink.call("POST", "lablink/api/vms/enroll", token="guess",
                               json_body={"hostname": "vm-a"})
    assert wrong.code == 401
    first = await lablink.enroll("vm-a")
    second = await lablink.enroll("vm-a")
    assert first != second
    assert (await lablink.poll("vm-a", first, wait=0)).code == 401
    assert (await lablink.poll("vm-a", second, wait=0)).code == 200
    (stored,) = query(lablink.database_url, "SELECT token_hash FROM vms")
    assert second not in stored[0] and len(stored[0]) == 64  # only a digest is kept


async def test_enrolled_hostnames_are_normalised_and_checked(lablink):
    reply = await lablink.call("POST", "lablink/api/vms/enroll", token=ENROLL_TOKEN,
                               json_body={"hostname": "Lab-VM-7"})
    assert reply.code == 201 and reply.body["hostname"] == "lab-vm-7"
    for bad in ["", "-lead", "a b", "lab_vm", "ｌａｂ", "../etc", "x" * 300, 7, None, "enroll", "Enroll"]:
        reply = await lablink.call("POST", "lablink/api/vms/enroll", token=ENROLL_TOKEN,
                                   json_body={"hostname": bad})
        assert reply.code == 400, (bad, reply)


async def test_students_see_only_their_own_vm(lablink):
    token = await lablink.enroll("vm-a")
    await lablink.poll("vm-a", token, wait=0)
    assert (await lablink.request_vm("alice", linux_command(fresh_code()))).code == 200
    bob = await lablink.my_vm("bob")
    assert bob.code == 200 and bob.body == {"status": "none", "hostname": None, "pin": None}
    assert (await lablink.call("POST", "lablink/api/release", user="bob")).code == 404
    assert (await lablink.my_vm("alice")).body["hostname"] == "vm-a"


@pytest.mark.parametrize("method,path", [("GET", "lablink/api/my_vm"), ("POST", "lablink/api/request_vm"),
                                         ("POST", "lablink/api/release")])
async def test_student_routes_need_a_jupyter_login(lablink, method, path):
    reply = await lablink.call(method, path, json_body={"crd_command": linux_command(fresh_code())}
                               if method == "POST" else None)
    assert reply.code == 403, reply


async def test_form_page_redirects_to_login_without_a_session(lablink):
    reply = await lablink.call("GET", "lablink/")
    assert reply.code == 302 and "/login" in reply.headers["Location"]


async def test_web_form_post_needs_xsrf_and_works_with_it(lablink):
    token = await lablink.enroll("vm-a")
    await lablink.poll("vm-a", token, wait=0)
    # A browser session: log in through Jupyter's own login page, keep the cookies.
    page = await lablink.call("GET", "login")
    cookies = cookies_of(page.headers)
    login = await lablink.call(
        "POST", "login", headers={"Cookie": cookie_header(cookies), "Content-Type":
                                  "application/x-www-form-urlencoded"},
        body=urlencode({"password": lablink.app.identity_provider.token,
                        "_xsrf": cookies["_xsrf"]}))
    assert login.code == 302, login
    cookies.update(cookies_of(login.headers))
    browser = {"Cookie": cookie_header(cookies), "Accept": "text/html",
               "Content-Type": "application/x-www-form-urlencoded"}

    form = await lablink.call("GET", "lablink/", headers={"Cookie": cookie_header(cookies)})
    assert form.code == 200 and 'name="_xsrf"' in form.body
    command = linux_command(fresh_code())

    forged = await lablink.call("POST", "lablink/api/request_vm", headers=browser,
                                body=urlencode({"crd_command": command}))
    assert forged.code == 403
    assert query(lablink.database_url, "SELECT count(*) FROM vms WHERE assigned_user IS NOT NULL") == [(0,)]

    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', form.body).group(1)
    posted = await lablink.call("POST", "lablink/api/request_vm", headers=browser,
                                body=urlencode({"crd_command": command, "_xsrf": xsrf}))
    assert posted.code == 303 and posted.headers["Location"].endswith("lablink/vm")
    success = await lablink.call("GET", "lablink/vm", headers={"Cookie": cookie_header(cookies)})
    (pin,) = query(lablink.database_url, "SELECT pin FROM vms")[0]
    assert success.code == 200 and pin in success.body and "vm-a" in success.body

    bad = await lablink.call("POST", "lablink/api/request_vm", headers=browser,
                             body=urlencode({"crd_command": "hello", "_xsrf": xsrf}))
    assert bad.code == 400 and "not a Chrome Remote Desktop command" in bad.body

    # What the answer notes (here: re-armed, and what of the paste was left out) reaches the
    # page the form is sent on to, once.
    rearmed = await lablink.call("POST", "lablink/api/request_vm", headers=browser, body=urlencode(
        {"crd_command": linux_command(fresh_code()) + "; rm -rf ~", "_xsrf": xsrf}))
    assert rearmed.code == 303, rearmed
    with_notes = {"Cookie": cookie_header({**cookies, **cookies_of(rearmed.headers)})}
    page = await lablink.call("GET", "lablink/vm", headers=with_notes)
    assert "keeps its PIN" in page.body and "left out" in page.body and "rm -rf" not in page.body
    assert "keeps its PIN" not in (await lablink.call("GET", "lablink/vm", headers={
        "Cookie": cookie_header({**cookies, **cookies_of(page.headers)})})).body



async def test_a_vm_token_cannot_touch_another_vm_that_has_work(lablink):
    token_a = await lablink.enroll("vm-a")
    token_b = await lablink.enroll("vm-b")
    await lablink.poll("vm-b", token_b, wait=0)
    assert (await lablink.request_vm("alice", linux_command(fresh_code()))).code == 200
    work = (await lablink.poll("vm-b", token_b)).body
    assert work["status"] == "assigned"
    for hostname in ("vm-b", "VM-B", " vm-b "):
        for path, fields in (("lablink/vm_startup", {}),
                             ("lablink/api/vm_status", {"status": "failed", "message": "x",
                                                        "work_id": work["work_id"]}),
                             ("lablink/api/vm_status", {"status": "active", "work_id": work["work_id"]})):
            reply = await lablink.call("POST", path, token=token_a, json_body={"hostname": hostname, **fields})
            assert reply.code == 401, (hostname, path, reply)
    # Nor can it rotate vm-b's token: only the fleet token enrolls.
    rotate = await lablink.call("POST", "lablink/api/vms/enroll", token=token_a, json_body={"hostname": "vm-b"})
    assert rotate.code == 401
    assert query(lablink.database_url, "SELECT status, work_id FROM vms WHERE hostname = 'vm-b'") == [
        ("configuring", work["work_id"])]
    assert (await lablink.poll("vm-b", token_b)).body == work  # vm-b's own token still works


async def test_a_vm_token_is_not_a_student_login(lablink):
    token = await lablink.enroll("vm-a")
    await lablink.poll("vm-a", token, wait=0)
    for method, path in (("POST", "lablink/api/request_vm"), ("GET", "lablink/api/my_vm"),
                         ("POST", "lablink/api/release")):
        reply = await lablink.call(method, path, token=token, json_body={"crd_command": linux_command(fresh_code())}
                                   if method == "POST" else None)
        assert reply.code == 403, (path, reply)
    assert query(lablink.database_url, "SELECT status FROM vms") == [("available",)]


async def _browser_session(lablink):
    """Log in through Jupyter's login page; the cookies and the form's XSRF value."""
    page = await lablink.call("GET", "login")
    cookies = cookies_of(page.headers)
    login = await lablink.call(
        "POST", "login", headers={"Cookie": cookie_header(cookies), "Content-Type":
                                  "application/x-www-form-urlencoded"},
        body=urlencode({"password": lablink.app.identity_provider.token, "_xsrf": cookies["_xsrf"]}))
    assert login.code == 302, login
    cookies.update(cookies_of(login.headers))
    form = await lablink.call("GET", "lablink/", headers={"Cookie": cookie_header(cookies)})
    return cookies, re.search(r'name="_xsrf" value="([^"]+)"', form.body).group(1)


@pytest.mark.parametrize("content_type,encode", [
    ("application/json", json.dumps),
    ("text/plain", json.dumps),  # what a cross-site page can send without a preflight
    ("application/x-www-form-urlencoded", urlencode),
])
async def test_cookie_logins_need_xsrf_for_every_post_and_body_type(lablink, content_type, encode):
    token = await lablink.enroll("vm-a")
    await lablink.poll("vm-a", token, wait=0)
    cookies, xsrf = await _browser_session(lablink)
    browser = {"Cookie": cookie_header(cookies), "Content-Type": content_type}
    command = linux_command(fresh_code())
    forged = await lablink.call("POST", "lablink/api/request_vm", headers=browser,
                                body=encode({"crd_command": command}))
    assert forged.code == 403
    assert query(lablink.database_url, "SELECT status FROM vms") == [("available",)]

    # With the token in the header (what the form's JavaScript and the panel send), it works.
    asked = await lablink.call("POST", "lablink/api/request_vm", headers={**browser, "X-XSRFToken": xsrf},
                               body=encode({"crd_command": command}))
    assert asked.code in (200, 303), asked
    forged_release = await lablink.call("POST", "lablink/api/release", headers=browser, body=encode({}))
    assert forged_release.code == 403
    assert query(lablink.database_url, "SELECT status FROM vms") == [("assigned",)]
    released = await lablink.call("POST", "lablink/api/release", headers={**browser, "X-XSRFToken": xsrf},
                                  body=encode({}))
    assert released.code in (200, 303), released


async def test_token_authenticated_form_posts_need_no_xsrf(lablink):
    token = await lablink.enroll("vm-a")
    await lablink.poll("vm-a", token, wait=0)
    reply = await lablink.call("POST", "lablink/api/request_vm", user="alice",
                               headers={"Content-Type": "application/x-www-form-urlencoded"},
                               body=urlencode({"crd_command": linux_command(fresh_code())}))
    assert reply.code == 200 and reply.body["hostname"] == "vm-a", reply
