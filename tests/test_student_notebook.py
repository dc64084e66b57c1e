"""notebooks/student.ipynb, executed by nbclient in a real ipykernel against the live test server."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

from conftest import fresh_code, linux_command, query, until

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "student.ipynb"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def test_the_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cell"
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert "widgets" not in notebook.metadata


async def test_student_notebook_runs_and_its_panel_gets_a_vm(lablink, vm_factory, tmp_path,
                                                             monkeypatch: pytest.MonkeyPatch):
    vm_factory("lab-vm-1")
    await until(lambda: query(lablink.database_url, "SELECT 1 FROM vms WHERE status = 'available'"))
    # The kernel inherits LABLINK_URL from the server's start-up; as under JupyterHub, the
    # student has a token of their own.
    assert os.environ["LABLINK_URL"] == lablink.url
    monkeypatch.setenv("LABLINK_TOKEN", "tok-carol")

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # After the notebook's own cells: what the student does next, through the same widgets.
    notebook.cells += [
        new_code_cell("panel = _\n"
                      f"panel.command.value = {linux_command(fresh_code())!r}\n"
                      "panel.request_button.click()"),
        new_code_cell(
            "import asyncio, json\n"
            "for _tick in range(600):\n"
            "    if 'Ready' in panel.status_display.value:\n"
            "        break\n"
            "    await asyncio.sleep(0.1)  # the kernel's loop runs the panel's work meanwhile\n"
            "print(json.dumps({'url': panel.server_url, 'status': panel.status_display.value,\n"
            "                  'pin': panel.pin_display.value}))"
        ),
    ]
    client = NotebookClient(notebook, kernel_name="python3", timeout=120, store_widget_state=True,
                            resources={"metadata": {"path": str(tmp_path)}})
    await client.async_execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error" or o.get("name") == "stderr"], outputs
    shown = json.loads(next(o.text for o in outputs if o.output_type == "stream"))
    server_view = (await lablink.my_vm("carol")).body
    assert shown["url"] == lablink.url
    assert "Ready" in shown["status"]
    assert f">{server_view['pin']}<" in shown["pin"]

    # The saved widget state holds the panel, and the cell's output shows it.
    state = notebook.metadata.widgets[WIDGET_STATE]["state"]
    models = [model["state"] for model in state.values()]
    panel_models = [m for m in models if "lablink-panel" in m.get("_dom_classes", ())]
    assert len(panel_models) == 1 and panel_models[0]["_model_name"] == "VBoxModel"
    assert any(m.get("description") == "Request a VM" for m in models)
    panel_output = _display_of(notebook.cells[1].outputs)
    assert panel_output["model_id"] in state


def _display_of(outputs: list[Any]) -> dict[str, Any]:
    (display,) = [o for o in outputs if o.output_type == "execute_result"]
    return display.data["application/vnd.jupyter.widget-view+json"]  # type: ignore[no-any-return]
