"""identity = "email": the seed's open form, where a student types an email instead of logging in."""

from __future__ import annotations

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

