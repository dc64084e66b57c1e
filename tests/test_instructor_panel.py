"""The InstructorPanel, driven through its widgets against a live server; the instructor notebook."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from conftest import INSTRUCTOR, fresh_code, linux_command, query, until
from labextension_py import InstructorPanel

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "instructor.ipynb"


async def _available(lablink, *hostnames):
    tokens = {h: await lablink.enroll(h) for h in hostnames}
    for hostname, token in tokens.items():
        assert (await lablink.poll(hostname, token, wait=0)).code == 200
    return tokens


def _counts(panel):
    return {name: int(label.value) for name, label in panel.count_labels.items()}


def _shows(panel, **expected):
    def check():
        counts = _counts(panel)
        return all(counts[name] == value for name, value in expected.items())
    return check


async def test_panel_follows_assignments_and_releases(lablink):
    await _available(lablink, "pv-1", "pv-2", "pv-3")
    panel = InstructorPanel(url=lablink.url, token=f"tok-{INSTRUCTOR}", wait=5)
    try:
        assert await panel.ready()
        await until(_shows(panel, available=3, assigned=0, active=0))
        assert panel.error_html.value == ""

        # Changes made elsewhere reach the panel through the events long-poll.
        for student in ("alice", "bob"):
            assert (await lablink.request_vm(student, linux_command(fresh_code()))).code == 200
        await until(_shows(panel, available=1, assigned=2))
        held = query(lablink.database_url, "SELECT hostname FROM vms WHERE assigned_user = 'alice'")[0][0]
        row = panel._rows[held]
        assert row.user.value == "alice" and not row.release_button.disabled

        # Release asks first; Cancel leaves the VM alone.
        row.release_button.click()
        await until(lambda: panel.confirm_bar.layout.display == "flex")
        assert "alice" in panel.confirm_text.value
        panel.confirm_no.click()
        await until(lambda: panel.confirm_bar.layout.display == "none")
        assert query(lablink.database_url, "SELECT assigned_user FROM vms WHERE hostname = %s",
                     (held,)) == [("alice",)]
        row.release_button.click()
        await until(lambda: panel.confirm_bar.layout.display == "flex")
        panel.confirm_yes.click()
        # Never delivered, the VM goes straight back to the pool.
        await until(_shows(panel, available=2, assigned=1))
        assert "Released" in panel.notice_html.value and "alice" in panel.notice_html.value
        assert (await lablink.my_vm("alice")).body["status"] == "none"

        # Retiring bob's VM says he loses it, and takes it from him.
        bobs = query(lablink.database_url, "SELECT hostname FROM vms WHERE assigned_user = 'bob'")[0][0]
        panel._rows[bobs].retire_button.click()
        await until(lambda: "bob" in panel.confirm_text.value and panel.confirm_bar.layout.display == "flex")
        panel.confirm_yes.click()
        await until(lambda: panel._rows[bobs].retire_button.disabled)
        assert panel.counts["retired"] == 1 and _counts(panel)["assigned"] == 0

        # Register: tokens are shown once; a name already used shows the server's error.
        panel.hostnames_box.value = "pv-new-1\npv-new-2"
        panel.register_button.click()
        await until(lambda: "pv-new-2" in panel.tokens_html.value)
        assert "not shown again" in panel.tokens_html.value and panel.hostnames_box.value == ""
        await until(lambda: panel.counts.get("provisioning") == 2)
        panel.hide_tokens_button.click()
        await until(lambda: panel.tokens_html.value == "")
        panel.hostnames_box.value = "pv-new-1"
        panel.register_button.click()
        await until(lambda: "Already registered" in panel.error_html.value)

        panel.show_token_button.click()
        await until(lambda: "configuration" in panel.enrollment_html.value)
        assert panel.rotate_token_button.disabled

        assert "lablink/api/vms.csv" in panel.links_html.value
        assert "assigned" in panel.events_html.value and "retired" in panel.events_html.value
    finally:
        panel.close()
    follower = panel._follower
    assert follower is not None
    await until(lambda: follower.done())
    assert panel.comm is None


async def test_panel_shows_refusals_instead_of_raising(lablink):
    panel = InstructorPanel(url=lablink.url, token="tok-alice", wait=2)
    try:
        assert not await panel.ready()
        assert "Only instructors" in panel.error_html.value
        assert "c.LabLink.instructors" in panel.error_html.value
        assert panel.problem.startswith("Only instructors") and "c.LabLink.instructors" in panel.problem
    finally:
        panel.close()
    nowhere = InstructorPanel(url="http://127.0.0.1:9/", token="x", wait=2)
    try:
        await until(lambda: "Cannot reach" in nowhere.error_html.value)
    finally:
        nowhere.close()


async def test_instructor_notebook_runs(lablink, monkeypatch):
    await _available(lablink, "nb-1", "nb-2")
    assert (await lablink.request_vm("alice", linux_command(fresh_code()))).code == 200
    # The kernel finds the server the way a course would point it there.
    monkeypatch.setenv("LABLINK_URL", lablink.url)
    monkeypatch.setenv("LABLINK_TOKEN", f"tok-{INSTRUCTOR}")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    client = NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": "."}})
    await client.async_execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    texts = [o.get("data", {}).get("text/plain", "") or o.get("text", "") for o in outputs]
    counts = next(json.loads(t) for t in texts if t.startswith("{") and '"available"' in t)
    assert counts["available"] == 1 and counts["assigned"] == 1
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)


async def test_instructor_notebook_says_what_is_wrong_when_it_finds_no_server(tmp_path):
    # A kernel with nothing to go on (not started by a LabLink server, no LABLINK_URL).
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    await client.async_execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "set LABLINK_URL" in printed and "InstructorPanel(url=" in printed
