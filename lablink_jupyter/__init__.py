"""LabLink for Jupyter: hand lab VMs to students over Chrome Remote Desktop."""

from __future__ import annotations

from typing import Any

from ._version import __version__

__all__ = ["__version__", "StudentPanel", "InstructorPanel"]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import LabLink

    return [{"module": "lablink_jupyter.app", "app": LabLink}]


def __getattr__(name: str) -> Any:
    # The panels live in labextension_py and pull in ipywidgets: import them only when asked.
    if name in ("StudentPanel", "InstructorPanel"):
        import labextension_py

        return getattr(labextension_py, name)
    raise AttributeError(f"module 'lablink_jupyter' has no attribute {name!r}")
