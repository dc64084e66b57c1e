#!/usr/bin/env python3
"""lablink-subscribe: wait for a LabLink assignment and set Chrome Remote Desktop up for it.

Runs on each lab VM from boot. It long-polls the allocator, and when a student is
given this VM it runs Google's start-host with the student's one-time code and
the allocator's PIN, then reports whether that worked. On release it removes
the CRD host again. Standard library plus ``requests`` only, so this one file
can be copied to a VM as is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import requests

__version__ = "0.1.0"

log = logging.getLogger("lablink-subscribe")

# Paths under the allocator's base URL; a test checks they match lablink_jupyter.routes.
ENROLL_PATH = "lablink/api/vms/enroll"
STARTUP_PATH = "lablink/vm_startup"
STATUS_PATH = "lablink/api/vm_status"

# A copy of lablink_jupyter.crd.CODE_RE (this file must stand alone); a test checks they agree.
CODE_RE = re.compile(r"4/0[A-Za-z0-9_-]{17,509}")
PIN_RE = re.compile(r"[0-9]{6,12}")
REDIRECT_URL = "https://remotedesktop.google.com/_/oauthredirect"

DEFAULT_START_HOST = "/opt/google/chrome-remote-desktop/start-host"
CONNECT_TIMEOUT = 10.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
RETIRED_WAIT = 60.0  # a retired VM asks again this often: an instructor may register it again
STOP_HOST_TIMEOUT = 60.0
MAX_SERVER_ERROR_CHARS = 200
MAX_OUTPUT_BYTES = 64 * 1024

MSG_CODE_REJECTED = (
    "Google rejected the code (it expires a few minutes after it is shown, and works "
    "once): get a fresh command from remotedesktop.google.com/headless and paste it again."
)
MSG_NOT_INSTALLED = "Chrome Remote Desktop is not installed on this VM; tell your instructor."
MSG_TIMED_OUT = (
    "Chrome Remote Desktop setup timed out on the VM; try a fresh code, and tell your "
    "instructor if it happens again."
)
MSG_INTERRUPTED = (
    "Setting up Chrome Remote Desktop was interrupted (the VM's LabLink program restarted): "
    "get a fresh command from remotedesktop.google.com/headless and paste it again."
)
MSG_BAD_ASSIGNMENT = (
    "The VM received a code or PIN it cannot use; paste a fresh command, and tell your "
    "instructor if it happens again."
)


class Stop(BaseException):
    """Raised from the signal handler so that a blocked request or sleep ends at once.

    A BaseException, like KeyboardInterrupt, so that no library's ``except Exception``
    swallows it.
    """


class UnusableAnswer(Exception):
    """The allocator answered with something this program will not act on; str is a short reason."""


class BadAssignment(Exception):
    """A well-addressed assignment whose code or PIN fails validation; str is a short reason."""


@dataclass(frozen=True)
class Settings:
    """Everything the command line and the LABLINK_* environment decide."""

    allocator: str
    hostname: str
    token: str | None = dataclasses.field(repr=False)
    enroll_token: str | None = dataclasses.field(repr=False)
    start_host: str
    state_dir: Path
    desktop_user: str | None
    pin_via: str
    start_host_timeout: float
    read_timeout: float
    host_config_dir: Path
    once: bool = False
    verbose: bool = False


@dataclass(frozen=True)
class Assignment:
    """Work for this VM: the student's CRD code and the PIN, with the allocator's work id."""

    hostname: str
    code: str = dataclasses.field(repr=False)
    pin: str = dataclasses.field(repr=False)
    work_id: str | int | None


@dataclass(frozen=True)
class Outcome:
    """What became of one assignment, as reported to the allocator."""

    status: str  # "active" or "failed"; STARTED only in the state file, while start-host runs
    message: str | None = None


#: Recorded while start-host runs: after a restart, the same work is not run again with
#: a one-time code that run may have used.
STARTED = "started"


# ---------------------------------------------------------------- pure helpers


def endpoint_url(base_url: str, path: str) -> str:
    """Join the allocator's base URL (which may carry a path) and an endpoint path."""
    return base_url.rstrip("/") + "/" + path.lstrip("/")


def display_url(url: str) -> str:
    """The URL without any user:password part, for logs."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def backoff_delay(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): full jitter, doubling, capped."""
    ceiling = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(attempt, 32))
    return ceiling * rng()


def parse_assignment(body: Mapping[str, Any], our_hostname: str) -> Assignment:
    """Check an ``assigned`` answer; UnusableAnswer if malformed, BadAssignment if code/PIN are bad."""
    hostname, code, pin = body.get("hostname"), body.get("code"), body.get("pin")
    work_id = body.get("work_id")
    for name, value in (("hostname", hostname), ("code", code), ("pin", pin)):
        if not isinstance(value, str):
            raise UnusableAnswer(f"assignment without a usable {name!r}")
    if work_id is not None and not _is_work_id(work_id):
        raise UnusableAnswer("assignment with a malformed 'work_id'")
    if hostname != our_hostname:
        raise UnusableAnswer("assignment addressed to another hostname")
    assignment = Assignment(hostname=hostname, code=code, pin=pin, work_id=work_id)
    if not CODE_RE.fullmatch(code):
        raise BadAssignment("the code is not a well-formed CRD code")
    if not PIN_RE.fullmatch(pin):
        raise BadAssignment("the PIN is not 6 to 12 digits")
    return assignment


def _is_work_id(value: object) -> bool:
    """A work id is an int or a short printable string (it is logged and stored)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and 0 < len(value) <= 100 and value.isprintable()


def start_host_argv(
    settings: Settings, assignment: Assignment, *, running_as_root: bool
) -> list[str]:
    """The start-host command line, built here: nothing the allocator sends is run as given."""
    argv = [
        settings.start_host,
        f"--code={assignment.code}",
        f"--redirect-url={REDIRECT_URL}",
        f"--name={settings.hostname}",
    ]
    if settings.pin_via == "flag":
        argv.append(f"--pin={assignment.pin}")
    if running_as_root and settings.desktop_user:
        argv.append(f"--user-name={settings.desktop_user}")
    return argv


def start_host_env(environ: Mapping[str, str]) -> dict[str, str]:
    """This program's environment without DISPLAY, as Google's ``DISPLAY= start-host`` asks."""
    return {key: value for key, value in environ.items() if key != "DISPLAY"}


def start_host_stdin(settings: Settings, assignment: Assignment) -> bytes | None:
    """What start-host reads: the PIN twice (its prompt and confirmation), unless passed by flag."""
    if settings.pin_via == "flag":
        return None
    return f"{assignment.pin}\n{assignment.pin}\n".encode()


def classify_failure(returncode: int | None, output: str, *, timed_out: bool = False,
                     missing: bool = False) -> str:
    """A message a student can act on, from how start-host ended (its output is never quoted)."""
    if missing:
        return MSG_NOT_INSTALLED
    if timed_out:
        return MSG_TIMED_OUT
    lowered = output.lower()
    if "oauth" in lowered or "invalid_grant" in lowered or "code" in lowered:
        return MSG_CODE_REJECTED
    return (
        f"Chrome Remote Desktop could not start on this VM (exit {returncode}); "
        "tell your instructor."
    )


def default_state_dir(running_as_root: bool) -> Path:
    """Where the VM token and the last report live by default."""
    if running_as_root:
        return Path("/var/lib/lablink")
    return Path.home() / ".local" / "state" / "lablink"


def default_host_config_dir(desktop_user: str | None) -> Path:
    """Where start-host leaves host#<hash>.json for the desktop user (or the current one)."""
    home = os.path.expanduser(f"~{desktop_user}") if desktop_user else str(Path.home())
    return Path(home) / ".config" / "chrome-remote-desktop"


def short_server_error(response: requests.Response) -> str:
    """The allocator's JSON ``error`` (one line, bounded), or the HTTP reason phrase."""
    try:
        body = response.json()
    except ValueError:
        body = None
    text = body.get("error") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text.strip():
        text = response.reason or "no error message"
    return " ".join(text.split())[:MAX_SERVER_ERROR_CHARS]


def network_reason(error: requests.RequestException) -> str:
    """A few words for a failed request, without its URL or headers."""
    if isinstance(error, requests.ConnectTimeout):
        return "connect timed out"
    if isinstance(error, requests.ReadTimeout):
        return "no answer in time"
    if isinstance(error, requests.ConnectionError):
        return "cannot connect"
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "answer cut off"
    return type(error).__name__


# ---------------------------------------------------------------- settings


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (every value also settable via LABLINK_* variables)."""
    parser = argparse.ArgumentParser(
        prog="lablink-subscribe",
        description="Wait for a LabLink assignment and set Chrome Remote Desktop up for it.",
        epilog="Prefer LABLINK_VM_TOKEN / LABLINK_ENROLL_TOKEN to the token flags: "
        "command lines are visible to every user in ps.",
    )
    parser.add_argument("--allocator", help="the allocator's base URL [LABLINK_ALLOCATOR_URL]")
    parser.add_argument("--hostname", help="this VM's name at the allocator [LABLINK_HOSTNAME]")
    parser.add_argument("--token", help="this VM's own token [LABLINK_VM_TOKEN]")
    parser.add_argument("--enroll-token", help="the fleet enrollment token [LABLINK_ENROLL_TOKEN]")
    parser.add_argument("--start-host", help=f"CRD's start-host [LABLINK_START_HOST; {DEFAULT_START_HOST}]")
    parser.add_argument("--state-dir", help="where the VM token is kept [LABLINK_STATE_DIR]")
    parser.add_argument("--desktop-user", help="the user CRD runs for, when run as root [LABLINK_DESKTOP_USER]")
    parser.add_argument("--pin-via", choices=("stdin", "flag"), default="stdin",
                        help="give start-host the PIN on stdin (default) or by its --pin flag")
    parser.add_argument("--start-host-timeout", type=_positive_float, default=120.0,
                        help="seconds before start-host is killed (default 120)")
    parser.add_argument("--read-timeout", type=_positive_float, default=90.0,
                        help="seconds to wait for a poll's answer (default 90)")
    parser.add_argument("--host-config-dir", help="where CRD keeps host#*.json (removed on release)")
    parser.add_argument("--once", action="store_true", help="do one poll cycle and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_settings(
    argv: Sequence[str] | None, environ: Mapping[str, str], *, running_as_root: bool
) -> Settings:
    """Settings from flags, falling back to LABLINK_* variables; exits with usage on error."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def pick(flag: str | None, variable: str) -> str | None:
        return flag if flag else (environ.get(variable) or None)

    allocator = pick(args.allocator, "LABLINK_ALLOCATOR_URL")
    hostname = pick(args.hostname, "LABLINK_HOSTNAME")
    token = pick(args.token, "LABLINK_VM_TOKEN")
    enroll_token = pick(args.enroll_token, "LABLINK_ENROLL_TOKEN")
    if not allocator:
        parser.error("give the allocator's URL: --allocator or LABLINK_ALLOCATOR_URL")
    if not re.match(r"https?://[^/\s]+", allocator):
        parser.error("the allocator URL must start with http:// or https://")
    if not hostname:
        parser.error("give this VM's name: --hostname or LABLINK_HOSTNAME")
    if len(hostname) > 255 or not hostname.isprintable() or any(ch.isspace() for ch in hostname):
        parser.error("the hostname must be printable, without spaces, at most 255 characters")
    if not token and not enroll_token:
        parser.error("give a token: --token / LABLINK_VM_TOKEN or --enroll-token / LABLINK_ENROLL_TOKEN")
    desktop_user = pick(args.desktop_user, "LABLINK_DESKTOP_USER")
    state_dir = pick(args.state_dir, "LABLINK_STATE_DIR")
    return Settings(
        allocator=allocator,
        hostname=hostname,
        token=token,
        enroll_token=enroll_token,
        start_host=pick(args.start_host, "LABLINK_START_HOST") or DEFAULT_START_HOST,
        state_dir=Path(state_dir) if state_dir else default_state_dir(running_as_root),
        desktop_user=desktop_user,
        pin_via=args.pin_via,
        start_host_timeout=args.start_host_timeout,
        read_timeout=args.read_timeout,
        host_config_dir=(
            Path(args.host_config_dir) if args.host_config_dir
            else default_host_config_dir(desktop_user)
        ),
        once=args.once,
        verbose=args.verbose,
    )


# ---------------------------------------------------------------- state on disk


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a file only its owner can read (mode 0600)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


class State:
    """The VM token and the last report, kept in the state dir across restarts."""

    def __init__(self, directory: Path) -> None:
        self.token_path = directory / "token"
        self.last_work_path = directory / "last_work.json"

    def load_token(self) -> str | None:
        """The saved VM token, if any."""
        try:
            token = self.token_path.read_text(encoding="utf-8").strip()
        except OSError:
            return None
        return token or None

    def save_token(self, token: str) -> None:
        """Keep the VM token for the next start (a failure is logged, not fatal)."""
        try:
            write_private(self.token_path, token + "\n")
        except OSError as error:
            log.warning("cannot save the VM token in %s (%s); it will enroll again after a restart",
                        self.token_path.parent, error.strerror or type(error).__name__)

    def load_last_work(self) -> tuple[str | int | None, Outcome] | None:
        """The work id and outcome of the last assignment handled, if recorded."""
        try:
            data = json.loads(self.last_work_path.read_text(encoding="utf-8"))
            outcome = Outcome(status=data["status"], message=data.get("message"))
            return data["work_id"], outcome
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def last_start_host_pid(self) -> int | None:
        """The process id of the start-host run recorded as STARTED, if any."""
        try:
            pid = json.loads(self.last_work_path.read_text(encoding="utf-8")).get("start_host_pid")
        except (OSError, ValueError, AttributeError):
            return None
        return pid if isinstance(pid, int) and pid > 0 else None

    def save_last_work(self, work_id: str | int | None, outcome: Outcome,
                       start_host_pid: int | None = None) -> None:
        """Record an assignment's outcome so a redelivery is answered without rerunning start-host."""
        record: dict[str, Any] = {"work_id": work_id, "status": outcome.status, "message": outcome.message}
        if start_host_pid is not None:
            record["start_host_pid"] = start_host_pid
        try:
            write_private(self.last_work_path, json.dumps(record) + "\n")
        except OSError as error:
            log.warning("cannot save the last report in %s (%s)",
                        self.last_work_path.parent, error.strerror or type(error).__name__)


# ---------------------------------------------------------------- running CRD


def run_start_host(settings: Settings, assignment: Assignment,
                   on_started: Callable[[int], None] | None = None) -> Outcome:
    """Run start-host for an assignment, without a shell and with a timeout; never log its output.

    `on_started` is given start-host's process id as soon as it runs.
    """
    running_as_root = os.geteuid() == 0
    argv = start_host_argv(settings, assignment, running_as_root=running_as_root)
    stdin_data = start_host_stdin(settings, assignment)
    if not (os.path.isfile(settings.start_host) and os.access(settings.start_host, os.X_OK)):
        return Outcome("failed", classify_failure(None, "", missing=True))
    # Output goes to an unlinked temp file, not a pipe: a daemon that start-host leaves
    # behind may keep a pipe open long after start-host itself has exited.
    with tempfile.TemporaryFile() as output:
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=start_host_env(os.environ),
                close_fds=True,
                start_new_session=True,
            )
        except OSError:
            return Outcome("failed", classify_failure(None, "", missing=True))
        if on_started is not None:
            on_started(process.pid)
        try:
            if stdin_data is not None and process.stdin is not None:
                try:
                    process.stdin.write(stdin_data)
                    process.stdin.close()
                except BrokenPipeError:
                    pass
            try:
                returncode = process.wait(timeout=settings.start_host_timeout)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                return Outcome("failed", classify_failure(None, "", timed_out=True))
        finally:
            if process.poll() is None:
                _kill_group(process)
        if returncode == 0:
            return Outcome("active")
        output.seek(0)
        text = output.read(MAX_OUTPUT_BYTES).decode("utf-8", "replace")
        return Outcome("failed", classify_failure(returncode, text))


def _runs_start_host(pid: int, settings: Settings) -> bool:
    """Whether process `pid` is still a start-host (a process id may be reused after a reboot)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return os.path.basename(settings.start_host).encode() in cmdline


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Kill start-host and whatever it started (it leads its own session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        process.kill()
    process.wait()


def tear_down(settings: Settings) -> None:
    """Stop the CRD host and forget its registration; missing pieces are fine."""
    stop_program = Path(settings.start_host).parent / "chrome-remote-desktop"
    if stop_program.is_file() and os.access(stop_program, os.X_OK):
        try:
            result = subprocess.run(
                [str(stop_program), "--stop"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=start_host_env(os.environ),
                timeout=STOP_HOST_TIMEOUT,
                close_fds=True,
            )
            if result.returncode != 0:
                log.warning("chrome-remote-desktop --stop exited %d", result.returncode)
        except subprocess.TimeoutExpired:
            log.warning("chrome-remote-desktop --stop timed out after %.0f s", STOP_HOST_TIMEOUT)
        except OSError as error:
            log.warning("cannot run chrome-remote-desktop --stop (%s)",
                        error.strerror or type(error).__name__)
    removed = 0
    try:
        host_files = list(settings.host_config_dir.glob("host#*.json"))
    except OSError:
        host_files = []
    for host_file in host_files:
        try:
            host_file.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("cannot remove %s (%s)", host_file, error.strerror or type(error).__name__)
    log.info("released: CRD host stopped, %d host file(s) removed", removed)


# ---------------------------------------------------------------- the allocator


class Subscriber:
    """The poll loop: enroll if need be, wait for work, act on it, report, repeat."""

    def __init__(self, settings: Settings, session: requests.Session | None = None) -> None:
        self.settings = settings
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = f"lablink-subscribe/{__version__}"
        self.state = State(settings.state_dir)
        self.token = settings.token or self.state.load_token()
        self.failures = 0
        self.announced_waiting = False

    # -- requests

    def _post(self, path: str, body: dict[str, Any], token: str,
              read_timeout: float = 30.0) -> requests.Response:
        return self.session.post(
            endpoint_url(self.settings.allocator, path),
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=(CONNECT_TIMEOUT, read_timeout),
        )

    def _sleep_after_failure(self, what: str) -> None:
        delay = backoff_delay(self.failures)
        self.failures += 1
        self.announced_waiting = False
        if self.settings.once:
            log.warning("%s; not retrying (--once)", what)
            return
        log.warning("%s; retrying in %.1f s", what, delay)
        time.sleep(delay)

    def _good_answer(self) -> None:
        self.failures = 0

    # -- enrollment

    def enroll(self) -> bool:
        """Trade the enrollment token for this VM's own token; False (after backing off) if not."""
        if not self.settings.enroll_token:
            self._sleep_after_failure("no VM token and no enrollment token")
            return False
        try:
            response = self._post(ENROLL_PATH, {"hostname": self.settings.hostname},
                                  self.settings.enroll_token)
        except requests.RequestException as error:
            self._sleep_after_failure(f"allocator unreachable/unusable ({network_reason(error)})")
            return False
        if response.status_code >= 500:
            self._sleep_after_failure(f"allocator unreachable/unusable (HTTP {response.status_code})")
            return False
        if response.status_code >= 400:
            self._sleep_after_failure(
                f"enrollment refused (HTTP {response.status_code}: {short_server_error(response)})")
            return False
        try:
            body = response.json()
        except ValueError:
            body = None
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token.strip():
            self._sleep_after_failure("allocator unreachable/unusable (enrollment answer without a token)")
            return False
        self.token = token.strip()
        self.state.save_token(self.token)
        self._good_answer()
        log.info("enrolled as %s", self.settings.hostname)
        return True

    # -- polling

    def poll_once(self) -> bool:
        """One poll and whatever it asks for; True when the allocator gave a usable answer."""
        if self.token is None and not self.enroll():
            return False
        assert self.token is not None
        if not self.announced_waiting:
            log.info("polling %s as %s", display_url(self.settings.allocator),
                     self.settings.hostname)
            self.announced_waiting = True
        else:
            log.debug("polling again")
        try:
            response = self._post(STARTUP_PATH, {"hostname": self.settings.hostname},
                                  self.token, read_timeout=self.settings.read_timeout)
        except requests.RequestException as error:
            self._sleep_after_failure(f"allocator unreachable/unusable ({network_reason(error)})")
            return False
        return self._handle_poll_answer(response)

    def _handle_poll_answer(self, response: requests.Response) -> bool:
        code = response.status_code
        if code == 401 and self.settings.enroll_token:
            self.token = None
            self._sleep_after_failure("the allocator refused this VM's token (HTTP 401), "
                                      "so it will enroll again")
            return False
        if code == 410:
            log.warning("this VM is retired at the allocator; checking again in %.0f s", RETIRED_WAIT)
            self.announced_waiting = False
            # Retired while a student held it: their CRD host must not stay registered here.
            tear_down(self.settings)
            if not self.settings.once:
                time.sleep(RETIRED_WAIT)
            return False
        if code >= 500 or (code < 400 and code != 200):
            self._sleep_after_failure(f"allocator unreachable/unusable (HTTP {code})")
            return False
        if code >= 400:
            self._sleep_after_failure(f"poll refused (HTTP {code}: {short_server_error(response)})")
            return False
        try:
            body = response.json()
        except ValueError:
            self._sleep_after_failure("allocator unreachable/unusable (answer is not JSON)")
            return False
        status = body.get("status") if isinstance(body, dict) else None
        if status == "waiting":
            self._good_answer()
            return True
        if status == "released":
            self._good_answer()
            self.announced_waiting = False
            tear_down(self.settings)
            self.report({"hostname": self.settings.hostname, "status": "available"})
            return True
        if status == "assigned":
            assert isinstance(body, dict)
            try:
                self.handle_assignment(body)
            except UnusableAnswer as error:
                self._sleep_after_failure(f"allocator unreachable/unusable ({error})")
                return False
            self._good_answer()
            self.announced_waiting = False
            return True
        shown = status if isinstance(status, str) and status.isidentifier() else "none"
        self._sleep_after_failure(f"allocator unreachable/unusable (unknown status {shown[:30]!r})")
        return False

    def handle_assignment(self, body: Mapping[str, Any]) -> None:
        """Set CRD up for an assignment (or re-send the report of one already handled)."""
        try:
            assignment = parse_assignment(body, self.settings.hostname)
        except BadAssignment as error:
            work_id = body.get("work_id")
            log.error("assignment %s refused: %s; start-host not run", work_id, error)
            outcome = Outcome("failed", MSG_BAD_ASSIGNMENT)
            self.state.save_last_work(work_id, outcome)
            self._report_outcome(work_id, outcome)
            return
        log.info("assignment received for %s (work %s)", assignment.hostname, assignment.work_id)
        previous = self.state.load_last_work()
        if assignment.work_id is not None and previous and previous[0] == assignment.work_id:
            if previous[1].status != STARTED:
                log.info("work %s was already handled; re-sending its report", assignment.work_id)
                self._report_outcome(assignment.work_id, previous[1])
                return
            log.warning("work %s was being set up when this program stopped; start-host is not run "
                        "again with the same one-time code", assignment.work_id)
            outcome = self._outcome_of_interrupted_setup()
        else:
            def started(pid: int) -> None:
                self.state.save_last_work(assignment.work_id, Outcome(STARTED), start_host_pid=pid)
            outcome = run_start_host(self.settings, assignment, on_started=started)
        if outcome.status == "active":
            log.info("start-host ok")
        else:
            log.warning("start-host failed: %s", outcome.message)
        self.state.save_last_work(assignment.work_id, outcome)
        self._report_outcome(assignment.work_id, outcome)

    def _outcome_of_interrupted_setup(self) -> Outcome:
        """What became of a start-host run this program was stopped during.

        That start-host leads its own session and may still run: wait for it (up to the
        start-host timeout), then a registered host means it worked.
        """
        pid = self.state.last_start_host_pid()
        deadline = time.monotonic() + self.settings.start_host_timeout
        while pid is not None and _runs_start_host(pid, self.settings) and time.monotonic() < deadline:
            time.sleep(0.2)
        if list(self.settings.host_config_dir.glob("host#*.json")):
            return Outcome("active")
        return Outcome("failed", MSG_INTERRUPTED)

    def _report_outcome(self, work_id: str | int | None, outcome: Outcome) -> None:
        body: dict[str, Any] = {"hostname": self.settings.hostname, "status": outcome.status}
        if outcome.message is not None:
            body["message"] = outcome.message
        body["work_id"] = work_id
        self.report(body)

    def report(self, body: dict[str, Any]) -> bool:
        """POST a status until the allocator accepts (True) or refuses (False) it."""
        attempt = 0
        while True:
            try:
                response = self._post(STATUS_PATH, body, self.token or "")
            except requests.RequestException as error:
                reason = network_reason(error)
            else:
                if 200 <= response.status_code < 300:
                    log.info("report sent: %s", body["status"])
                    return True
                if response.status_code == 409:
                    # Normal after a release or a fresh code during setup: the poll brings what is next.
                    log.info("report %s no longer needed (%s)", body["status"],
                             short_server_error(response))
                    return False
                if 400 <= response.status_code < 500:
                    log.warning("report %s refused (HTTP %d: %s)", body["status"],
                                response.status_code, short_server_error(response))
                    return False
                reason = f"HTTP {response.status_code}"
            if self.settings.once:
                log.warning("allocator unreachable/unusable (%s); report not sent (--once)", reason)
                return False
            delay = backoff_delay(attempt)
            attempt += 1
            log.warning("allocator unreachable/unusable (%s); retrying the report in %.1f s",
                        reason, delay)
            time.sleep(delay)

    def run(self) -> int:
        """Poll until stopped; with --once, one cycle (exit 0 if the answer was usable)."""
        if self.settings.once:
            return 0 if self.poll_once() else 1
        while True:
            self.poll_once()


# ---------------------------------------------------------------- entry point


def _raise_stop(signum: int, _frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run lablink-subscribe (the console-script entry point)."""
    running_as_root = os.geteuid() == 0
    settings = parse_settings(argv, os.environ, running_as_root=running_as_root)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if settings.verbose else logging.INFO,
        # The hostname in every line: one machine may run several VMs' logs into one place.
        format=f"%(asctime)s %(name)s[{settings.hostname}] %(levelname)s %(message)s",
    )
    # urllib3 would add a line per request; the events above are the log.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    log.info("lablink-subscribe %s starting for %s", __version__, settings.hostname)
    try:
        return Subscriber(settings).run()
    except Stop as stop:
        log.info("stopping (%s)", stop)
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
