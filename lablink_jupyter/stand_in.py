"""A stand-in for Google's start-host and chrome-remote-desktop, for demo VMs and tests.

Google's binaries need a real Google account and a desktop, so demo VMs run
``lablink-subscribe`` against these instead. ``write_stand_in`` writes both
programs into a directory as plain executables: each is a copy of this file
(standard library only), so they run without a shell and without this package
on the import path. They record every call in ``calls.jsonl`` beside them and
behave like the real ones where lablink-subscribe can tell the difference:

* ``start-host`` reads stdin to EOF and needs the same PIN (6+ digits) twice
  there, unless given ``--pin=``; it sleeps ``delay`` seconds if that file
  exists, and waits (at most ten minutes) while a file ``hold`` exists; it
  exits with the code in ``exit_code`` (printing ``stderr``) if that file
  exists; otherwise it writes ``config/host#<sha1 of --name>.json``.
* ``chrome-remote-desktop --stop`` only records the call.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["START_HOST", "STOP_PROGRAM", "CALLS_FILE", "main", "read_calls", "write_stand_in"]

START_HOST = "start-host"
STOP_PROGRAM = "chrome-remote-desktop"
CALLS_FILE = "calls.jsonl"
CONFIG_DIR = "config"
EXIT_CODE_FILE = "exit_code"
STDERR_FILE = "stderr"
DELAY_FILE = "delay"
HOLD_FILE = "hold"
HOLD_LIMIT = 600.0
PIN_MESSAGE = "PIN must be at least six digits"
_PIN_RE = re.compile(r"[0-9]{6,}")


def write_stand_in(directory: Path) -> Path:
    """Create ``directory`` with executable start-host and chrome-remote-desktop; return start-host."""
    directory = Path(directory)
    (directory / CONFIG_DIR).mkdir(parents=True, exist_ok=True)
    program = f"#!{sys.executable}\n" + Path(__file__).read_text(encoding="utf-8")
    for name in (START_HOST, STOP_PROGRAM):
        _write_executable(directory / name, program)
    return directory / START_HOST


def read_calls(directory: Path) -> list[dict[str, Any]]:
    """Every call the stand-in programs in ``directory`` recorded, oldest first."""
    try:
        lines = (Path(directory) / CALLS_FILE).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Act as the program named by argv[0] (start-host or chrome-remote-desktop)."""
    argv = list(sys.argv if argv is None else argv)
    directory = Path(argv[0]).resolve().parent
    program = Path(argv[0]).name
    if program == STOP_PROGRAM:
        _record(directory, program, argv, stdin=None)
        return 0
    if program != START_HOST:
        print(f"stand-in: unknown program name {program!r}", file=sys.stderr)
        return 2
    return _start_host(directory, argv)


def _start_host(directory: Path, argv: list[str]) -> int:
    """Behave like start-host closely enough for lablink-subscribe to be tested against it."""
    stdin = sys.stdin.read() if sys.stdin is not None else ""
    _record(directory, START_HOST, argv, stdin=stdin)
    flags = _flags(argv[1:])

    delay = _read_optional(directory / DELAY_FILE)
    if delay is not None and delay.strip():
        time.sleep(float(delay))
    held_until = time.monotonic() + HOLD_LIMIT
    while (directory / HOLD_FILE).exists() and time.monotonic() < held_until:
        time.sleep(0.05)

    pin = flags.get("pin")
    if pin is None:
        lines = stdin.splitlines()
        pin_ok = len(lines) >= 2 and lines[0] == lines[1] and bool(_PIN_RE.fullmatch(lines[0]))
    else:
        pin_ok = bool(_PIN_RE.fullmatch(pin))
    if not pin_ok:
        print(PIN_MESSAGE, file=sys.stderr)
        return 1

    exit_code = _read_optional(directory / EXIT_CODE_FILE)
    if exit_code is not None and exit_code.strip():
        message = _read_optional(directory / STDERR_FILE)
        if message:
            sys.stderr.write(message if message.endswith("\n") else message + "\n")
        return int(exit_code.strip())

    name = flags.get("name") or socket.gethostname()
    host_id = hashlib.sha1(name.encode("utf-8")).hexdigest()
    config = {"host_name": name, "host_id": host_id, "user_name": flags.get("user-name")}
    config_dir = directory / CONFIG_DIR
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / f"host#{host_id}.json").write_text(json.dumps(config) + "\n", encoding="utf-8")
    return 0


def _flags(args: Sequence[str]) -> dict[str, str]:
    """``--key=value`` arguments as a dict (later ones win, as with the real program)."""
    flags: dict[str, str] = {}
    for arg in args:
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            flags[key] = value
    return flags


def _record(directory: Path, program: str, argv: list[str], *, stdin: str | None) -> None:
    """Append one JSON line describing this call to calls.jsonl."""
    record = {
        "program": program,
        "argv": argv,
        "stdin": stdin,
        "display": os.environ.get("DISPLAY"),
        "uid": os.getuid(),
        "time": time.time(),
    }
    line = (json.dumps(record) + "\n").encode("utf-8")
    # One O_APPEND write per call keeps lines whole when calls overlap.
    fd = os.open(directory / CALLS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _read_optional(path: Path) -> str | None:
    """The text of a control file, or None when it does not exist."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _write_executable(path: Path, text: str) -> None:
    """Write an executable (mode 0755) atomically, so a running copy is never half-written."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temp, 0o755)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    raise SystemExit(main())
