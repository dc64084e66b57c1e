"""What runs inside a notebook kernel: the LabLink panels and the client they use."""

from __future__ import annotations

from .instructor import InstructorPanel
from .student import StudentPanel

__all__ = ["InstructorPanel", "StudentPanel"]
