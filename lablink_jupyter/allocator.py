"""The allocator: what each HTTP route asks of LabLink, on top of the database and the listener.

One `Allocator` lives in each Jupyter server process running the extension.
It keeps no state that matters: PostgreSQL holds the fleet, so several
allocator processes on one database work together.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from . import crd, metrics, routes
from .db import (
    CodeAlreadyUsed,
    HeldByAnother,
    Database,
    DatabaseUnavailable,
    NoVmFree,
    VmRetired,
    age_seconds,
    token_digest,
)
from .listener import FLEET_CHANNEL, NotificationListener, Subscription, vm_channel
from .statuses import HELD, WORK_PENDING, VmStatus

#: What a hostname may look like (mirrors the CHECK on vms.hostname).
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)

#: Names that are also routes under lablink/api/vms/: `DELETE lablink/api/vms/enroll` could not
#: retire a VM called "enroll", so no VM may be called that.
RESERVED_HOSTNAMES = frozenset({routes.VM_ENROLL.rsplit("/", 1)[1]})


#: How a request for a VM can be refused, and the outcome each is counted as in the metrics.
_REFUSALS: tuple[tuple[type[Exception], str], ...] = (
    (crd.CrdCommandError, "bad_command"),
    (NoVmFree, "no_vm_free"),
    (CodeAlreadyUsed, "code_already_used"),
    (HeldByAnother, "held_by_another"),
    (DatabaseUnavailable, "database_unavailable"),  # AllocatorNotReady too
)


class AllocatorNotReady(DatabaseUnavailable):
    """The allocator is starting or stopping."""


#: The shared setting holding the fleet enrollment token when none is configured.
ENROLLMENT_TOKEN_SETTING = "enrollment_token"


class NotAuthorized(Exception):
    """The presented token does not belong to this VM (or to the fleet)."""


class _StaleCredentials(Exception):
    """A poll's token (or the VM's id) no longer matches the row: check it the slow way."""


class EnrollmentClosed(Exception):
    """Enrollment was attempted but no fleet token is in effect."""


def normalize_hostname(value: object) -> str:
    """A valid lower-case hostname, or ValueError with what is wrong."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("hostname is missing")
    if not value.isascii():
        # Checked before lower(): some look-alikes lower-case to ASCII (KELVIN SIGN to "k").
        raise ValueError("hostname may hold only ASCII letters, digits, '-' and '.'")
    hostname = value.strip().lower()
    if not HOSTNAME_RE.match(hostname):
        raise ValueError("hostname may hold only letters, digits, '-' and '.' (at most 253 characters)")
    if hostname in RESERVED_HOSTNAMES:
        raise ValueError(f"'{hostname}' is the name of a LabLink route and cannot be a VM's hostname; "
                         "give the VM another name")
    return hostname


def new_pin(length: int = 6) -> str:
    """A random PIN of `length` digits, for one assignment."""
    return "".join(secrets.choice("0123456789") for _ in range(length))


def new_token() -> str:
    """A random bearer token."""
    return secrets.token_urlsafe(32)


class ClientGone:
    """Tells long-polls that their HTTP client went away, so they stop waiting at once."""

    __slots__ = ("gone", "_watching")

    def __init__(self) -> None:
        self.gone = False
        self._watching: list[Subscription] = []

    def set(self) -> None:
        """The client disconnected."""
        self.gone = True
        for subscription in list(self._watching):
            subscription.interrupt()

    def watch(self, subscription: Subscription) -> None:
        """Interrupt `subscription` if the client goes."""
        if subscription not in self._watching:
            self._watching.append(subscription)

    def unwatch(self, subscription: Subscription) -> None:
        """Stop watching `subscription`."""
        if subscription in self._watching:
            self._watching.remove(subscription)


@dataclass(slots=True)
class _Poll:
    """One VM's long-poll in progress; a newer poll for the same VM replaces it."""

    subscription: Subscription
    superseded: bool = False


@dataclass
class AllocatorSettings:
    """The settings the allocator acts on (copied from the LabLink traits)."""

    poll_timeout: float = 45.0
    stale_after: float = 150.0
    pin_length: int = 6
    code_warning_after: float = 180.0
    recheck_interval: float = 5.0
    enrollment_token: str = ""
    configure_timeout: float = 300.0
    fleet_refresh_interval: float = 10.0


class Allocator:
    """Assigns VMs to students and delivers the work to the VMs."""

    def __init__(self, settings: AllocatorSettings, log: logging.Logger | None = None) -> None:
        self.settings = settings
        self.log = log or logging.getLogger(__name__)
        self._db: Database | None = None
        self._listener: NotificationListener | None = None
        self._polls: dict[int, _Poll] = {}
        self._seen_at: dict[int, datetime] = {}  # the database's last_seen_at of each VM's current poll
        # hostname -> id, learnt from a VM's first successful token check (ids never change).
        self._vm_ids: dict[str, int] = {}
        self._enrollment_token = settings.enrollment_token
        # Work handed to a VM, by VM id: (work_id, seconds from the request to the read, read time).
        self._wakeups: dict[int, tuple[int, float, float]] = {}
        self._fleet_task: asyncio.Task[None] | None = None

    @property
    def db(self) -> Database:
        """The database; DatabaseUnavailable until start() has finished."""
        if self._db is None:
            raise AllocatorNotReady("starting or stopping")
        return self._db

    @property
    def listener(self) -> NotificationListener:
        """The notification listener; DatabaseUnavailable until start() has finished."""
        if self._listener is None:
            raise AllocatorNotReady("starting or stopping")
        return self._listener

    @property
    def started(self) -> bool:
        """Whether start() has finished."""
        return self._db is not None and self._listener is not None

    async def start(self, database: Database, listener: NotificationListener) -> None:
        """Migrate, open the pool, start listening."""
        applied = await database.migrate()
        if applied:
            self.log.info("LabLink applied migrations: %s", ", ".join(applied))
        await database.open()
        listener.start()
        if not self._enrollment_token:
            # Shared through the database so every allocator process accepts the same one.
            self._enrollment_token = await database.get_or_create_setting(ENROLLMENT_TOKEN_SETTING, new_token())
        self._db, self._listener = database, listener
        self._fleet_task = asyncio.create_task(self._watch_fleet(), name="lablink-fleet")

    async def stop(self) -> None:
        """Stop listening and close the pool."""
        task, self._fleet_task = self._fleet_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        database, listener = self._db, self._listener
        self._db = self._listener = None
        if listener is not None:
            await listener.stop()
        if database is not None:
            await database.close()

    @property
    def enrollment_token(self) -> str:
        """The fleet token VMs present to enroll (as this process last read it)."""
        return self._enrollment_token

    @property
    def enrollment_token_configured(self) -> bool:
        """Whether the fleet token comes from c.LabLink.enrollment_token (so it cannot be rotated here)."""
        return bool(self.settings.enrollment_token)

    async def current_enrollment_token(self) -> str:
        """The fleet token in effect: the configured one, or the one shared through the database."""
        if not self.enrollment_token_configured:
            # Another allocator process may have rotated it.
            stored = await self.db.get_setting(ENROLLMENT_TOKEN_SETTING)
            if stored:
                self._enrollment_token = stored
        return self._enrollment_token

    async def rotate_enrollment_token(self, actor: str) -> str:
        """Replace the shared fleet token; VMs enrolled already keep their own tokens."""
        token = new_token()
        await self.db.replace_setting(ENROLLMENT_TOKEN_SETTING, token, actor, "enrollment token rotated")
        self._enrollment_token = token
        return token

    # -- VM side ----------------------------------------------------------------

    async def enroll(self, hostname: str, presented: str) -> str:
        """Create or re-key the VM `hostname`; returns its new token (only its hash is kept)."""
        expected = await self.current_enrollment_token()
        if not expected:
            raise EnrollmentClosed()
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            raise NotAuthorized()
        token = new_token()
        await self.db.enroll_vm(hostname, token_digest(token))
        return token

    async def authenticate_vm(self, hostname: str, presented: str, *, background: bool = False) -> dict[str, Any]:
        """The VM's row if `presented` is its token; NotAuthorized otherwise.

        `background`: for a poll, which queues behind students' work (see Database.background).
        """
        async with self.db.background if background else contextlib.nullcontext():
            row = await self.db.vm_credentials(hostname)
        expected = row["token_hash"] if row else None
        # Compare digests in constant time, and do the same work whether or not the VM exists.
        if not hmac.compare_digest(token_digest(presented).encode(), (expected or "-" * 64).encode()):
            raise NotAuthorized()
        assert row is not None
        if row["status"] == VmStatus.RETIRED:
            raise VmRetired(hostname)
        return row

    async def poll(
        self, hostname: str, presented: str, client_gone: ClientGone | None = None, window: float | None = None
    ) -> tuple[int, dict[str, Any]]:
        """The VM's id and next instruction (see wait_for_work), if `presented` is its token.

        NotAuthorized or VmRetired otherwise. Once a hostname's id is known, the
        token is checked by the poll's first read itself, saving a round trip on
        every poll; a token rotated meanwhile fails that read, and the slow path
        decides.
        """
        digest = token_digest(presented)
        vm_id = self._vm_ids.get(hostname)
        if vm_id is not None:
            try:
                return vm_id, await self.wait_for_work(vm_id, client_gone, window, token_hash=digest)
            except _StaleCredentials:
                del self._vm_ids[hostname]
        row = await self.authenticate_vm(hostname, presented, background=True)
        vm_id = self._vm_ids[hostname] = row["id"]
        return vm_id, await self.wait_for_work(vm_id, client_gone, window)

    async def wait_for_work(
        self, vm_id: int, client_gone: ClientGone | None = None, window: float | None = None,
        *, token_hash: str | None = None,
    ) -> dict[str, Any]:
        """The VM's next instruction: its work, a release, or `waiting` once the window ends.

        LISTEN first, then read the row, then wait: a student's request
        committed at any moment is either seen by the read or notified. With
        `token_hash`, the first read checks it (_StaleCredentials if it fails).
        """
        loop = asyncio.get_running_loop()
        window = self.settings.poll_timeout if window is None else min(window, self.settings.poll_timeout)
        deadline = loop.time() + window
        client_gone = client_gone or ClientGone()
        subscription = await self.listener.subscribe(vm_channel(vm_id), timeout=min(5.0, window))
        client_gone.watch(subscription)
        metrics.VM_POLLS_WAITING.inc()
        poll: _Poll | None = None
        try:
            answer = await self._collect(vm_id, background=True, token_hash=token_hash)
            # One poll per VM: a newer one means the old connection is dead or duplicated.
            # Replaced only now, so that a request with a wrong token replaces nothing.
            poll = _Poll(subscription)
            previous = self._polls.get(vm_id)
            self._polls[vm_id] = poll
            if previous is not None:
                previous.superseded = True
                previous.subscription.interrupt()
            while answer is None:
                remaining = deadline - loop.time()
                if remaining <= 0 or poll.superseded or client_gone.gone:
                    return {"status": "waiting"}
                if not subscription.listening:
                    # Notifications are down: re-read now and then, so nothing waits a whole window.
                    remaining = min(remaining, self.settings.recheck_interval)
                woken = await subscription.wait(remaining)
                if poll.superseded or client_gone.gone:
                    return {"status": "waiting"}
                if not woken and loop.time() >= deadline:
                    # The window ended with no change notified; the VM's next poll reads the row.
                    return {"status": "waiting"}
                answer = await self._collect(vm_id, background=not woken)
            return answer
        finally:
            metrics.VM_POLLS_WAITING.dec()
            client_gone.unwatch(subscription)
            subscription.close()
            seen_at = self._seen_at.pop(vm_id, None) if self._polls.get(vm_id) is poll else None
            if poll is not None and self._polls.get(vm_id) is poll:
                del self._polls[vm_id]
            if client_gone.gone and seen_at is not None:
                # The VM went away mid-poll: hand it to nobody until it polls again.
                with contextlib.suppress(DatabaseUnavailable):
                    await self.db.note_disconnect(vm_id, seen_at)

    def response_written(self, vm_id: int, answer: dict[str, Any]) -> None:
        """The VM's answer went out: time the wake-up if it delivered new work.

        The time from the student's request to the VM's poll reading it comes
        from the database clock (the request may have been made in another
        allocator process); the rest is measured here.
        """
        wakeup = self._wakeups.pop(vm_id, None)
        if wakeup is None or answer.get("work_id") != wakeup[0]:
            return
        _work_id, seconds_to_read, read_at = wakeup
        latency = seconds_to_read + (asyncio.get_running_loop().time() - read_at)
        metrics.WAKEUP_LATENCY.observe(max(0.0, latency))

    def response_lost(self, vm_id: int) -> None:
        """The VM's answer could not be written (it went away); forget its timing."""
        self._wakeups.pop(vm_id, None)

    async def _collect(self, vm_id: int, background: bool, token_hash: str | None = None) -> dict[str, Any] | None:
        """Mark the VM seen and return its instruction, if it has one.

        A read after a notification is a delivery a student waits for; any other read
        only keeps the VM waiting and goes in the background. A function of its own
        so that the row is not kept while the poll waits.
        """
        async with self.db.background if background else contextlib.nullcontext():
            if token_hash is None:
                row = await self.db.poll_vm(vm_id)
            else:
                row = await self.db.poll_vm(vm_id, token_hash=token_hash)
        if row is None:
            if token_hash is not None:
                raise _StaleCredentials()
            return {"status": "retired"}
        self._seen_at[vm_id] = row["last_seen_at"]
        answer = self._instruction(row)
        if answer is not None and row["previous_status"] == VmStatus.ASSIGNED and row["seconds_since_code"] is not None:
            self._wakeups[vm_id] = (row["work_id"], row["seconds_since_code"], asyncio.get_running_loop().time())
        return answer

    def _instruction(self, row: dict[str, Any]) -> dict[str, Any] | None:
        status = row["status"]
        if status in WORK_PENDING and row["crd_code"]:
            return {
                "status": "assigned",
                "hostname": row["hostname"],
                "code": row["crd_code"],
                "command": crd.linux_command(row["crd_code"], row["hostname"]),
                "pin": row["pin"],
                "work_id": row["work_id"],
            }
        if status == VmStatus.RELEASED:
            return {"status": "released"}
        if status == VmStatus.RETIRED:
            return {"status": "retired"}
        return None

    async def report(
        self, vm_id: int, status: VmStatus, message: str | None, work_id: int | None
    ) -> dict[str, Any] | None:
        """Record the VM's report; None when it no longer applies."""
        return await self.db.report_vm_status(vm_id, status, message, work_id)

    # -- student side -------------------------------------------------------------

    async def request_vm(self, user: str, command_text: str, *, may_use_held: bool = True) -> dict[str, Any]:
        """Parse the pasted command and give the student a VM (or re-arm theirs).

        `may_use_held` false: HeldByAnother if the student holds a VM (see Database.assign_vm).
        """
        try:
            command = crd.parse_crd_command(command_text)
            assignment = await self.db.assign_vm(
                user, command.code, new_pin(self.settings.pin_length), self.settings.stale_after,
                may_use_held=may_use_held,
            )
        except tuple(kind for kind, _outcome in _REFUSALS) as refusal:
            outcome = next(outcome for kind, outcome in _REFUSALS if isinstance(refusal, kind))
            metrics.ASSIGNMENT_REQUESTS.labels(outcome=outcome).inc()
            raise
        metrics.ASSIGNMENT_REQUESTS.labels(outcome=assignment.outcome).inc()
        view = self.vm_view(assignment.vm)
        notes = []
        other_system = {"windows-cmd": "Windows", "windows-powershell": "Windows", "macos": "macOS"}
        if command.variant in other_system:
            notes.append(
                f"This is the {other_system[command.variant]} version of the command; that works too: "
                "only the code in it is used."
            )
        if command.ignored:
            notes.append(
                f"Only the code in your paste was used; the rest ({', '.join(command.ignored)}) "
                "was left out: nothing pasted here is ever run."
            )
        if assignment.outcome == "moved":
            notes.append(
                f"{assignment.moved_from} stopped responding, so you now have {view['hostname']}, "
                "with a new PIN."
            )
        if assignment.outcome == "rearmed":
            notes.append("Your VM keeps its PIN and is being set up again with the new code.")
        elif assignment.outcome == "unchanged":
            notes.append("You already have this VM with this code"
                         + ("; it is ready." if view["status"] == VmStatus.ACTIVE else "; it is being set up."))
        view["outcome"] = assignment.outcome
        view["notes"] = notes
        return view

    async def my_vm(
        self,
        user: str,
        wait: float = 0.0,
        known: str | None = None,
        client_gone: ClientGone | None = None,
    ) -> dict[str, Any]:
        """The student's VM; with `wait`, answer once its status differs from `known`."""
        row = await self.db.vm_of_user(user)
        if wait <= 0 or known is None:
            return self.vm_view(row)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait, self.settings.poll_timeout)
        client_gone = client_gone or ClientGone()
        subscription: Subscription | None = None
        try:
            while True:
                channel = _channel_of(row)
                if subscription is None or subscription.channel != channel:
                    if subscription is not None:
                        client_gone.unwatch(subscription)
                        subscription.close()
                    subscription = await self.listener.subscribe(channel)
                    client_gone.watch(subscription)
                    row = await self.db.vm_of_user(user)  # read again now that LISTEN is in effect
                    if _channel_of(row) != channel:
                        continue
                view = self.vm_view(row)
                remaining = deadline - loop.time()
                if view["status"] != known or remaining <= 0 or client_gone.gone:
                    return view
                if not subscription.listening:
                    remaining = min(remaining, self.settings.recheck_interval)
                await subscription.wait(remaining)
                row = await self.db.vm_of_user(user)
        finally:
            if subscription is not None:
                client_gone.unwatch(subscription)
                subscription.close()

    async def release(self, user: str, actor: str | None = None) -> dict[str, Any] | None:
        """Let go of the student's VM."""
        return await self.db.release_user_vm(user, actor)

    def vm_view(self, row: dict[str, Any] | None) -> dict[str, Any]:
        """What a student may see of their VM (never the code)."""
        if row is None:
            return {"status": "none", "hostname": None, "pin": None}
        now = datetime.now(timezone.utc)
        status = VmStatus(row["status"])
        view: dict[str, Any] = {
            "hostname": row["hostname"],
            "status": status.value,
            "pin": row["pin"] if status in HELD else None,
            "message": _student_message(status, row),
            "seconds_in_status": age_seconds(row["status_changed_at"], now),
            "access_url": crd.ACCESS_URL,
        }
        if status == VmStatus.FAILED and row.get("last_error"):
            view["error"] = row["last_error"]
        code_age = age_seconds(row.get("code_received_at"), now)
        if status in WORK_PENDING and code_age is not None and code_age > self.settings.code_warning_after:
            view["warning"] = (
                f"Your code was pasted {int(code_age // 60)} minutes ago and Google's codes expire "
                "after a few minutes. If setup fails, get a fresh command and paste it again."
            )
        silent_for = age_seconds(row.get("last_seen_at"), now)
        if status in HELD and silent_for is not None and silent_for > self.settings.stale_after:
            remedy = ("release it and ask again" if status == VmStatus.ACTIVE
                      else "paste a fresh command: you will get another VM")
            view["warning"] = (
                f"{row['hostname']} has not checked in for {int(silent_for // 60)} minutes. "
                f"If you cannot connect, {remedy}, or tell your instructor."
            )
        return view

    # -- the fleet as a whole ---------------------------------------------------------

    @property
    def timeout_message(self) -> str:
        """What a student whose VM never reported is told."""
        return (
            f"The VM did not respond within {self.settings.configure_timeout:g} seconds. "
            "Paste a fresh command to get another VM."
        )

    async def fail_unresponsive(self) -> list[dict[str, Any]]:
        """Mark failed the VMs that got work but never reported within configure_timeout."""
        timeout = self.settings.configure_timeout
        if timeout <= 0:
            return []
        failed = await self.db.fail_unresponsive(timeout, self.timeout_message)
        for row in failed:
            metrics.CONFIGURE_TIMEOUTS.inc()
            self.log.warning(
                "LabLink: %s (held by %s) did not report within %g s; marked failed",
                row["hostname"], row["assigned_user"], timeout,
            )
        return failed

    async def refresh_fleet_metrics(self) -> None:
        """Read the fleet-wide figures from the database into the Prometheus gauges."""
        metrics.set_fleet_counts(await self.db.status_counts(self.settings.stale_after))

    def _fleet_interval(self) -> float:
        interval = self.settings.fleet_refresh_interval
        if self.settings.configure_timeout > 0:
            # Check often enough that a silent VM is failed soon after its time is up.
            interval = min(interval, max(0.1, self.settings.configure_timeout / 4))
        return interval

    async def _watch_fleet(self) -> None:
        """Sweep for VMs that never reported and refresh the fleet metrics, every interval."""
        while True:
            try:
                await self.fail_unresponsive()
                await self.refresh_fleet_metrics()
            except DatabaseUnavailable as exc:
                self.log.debug("LabLink fleet sweep skipped: %s", exc)
            except Exception:
                # Keep sweeping: one bad round must not end the task for the life of the process.
                self.log.exception("LabLink fleet sweep failed")
            await asyncio.sleep(self._fleet_interval())

    # -- health -------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """Whether the database and the listener work, and how many wait."""
        if not self.started:
            return {"database": "starting", "listener": "starting", "waiters": 0, "vm_polls": 0,
                    "channels": 0, "listener_reconnects": 0}
        database = "ok"
        try:
            await self.db.ping()
        except DatabaseUnavailable:
            database = "unavailable"
        return {
            "database": database,
            "listener": "listening" if self.listener.connected else "reconnecting",
            "waiters": self.listener.waiter_count,
            "vm_polls": len(self._polls),
            "channels": self.listener.channel_count,
            "listener_reconnects": self.listener.reconnects,
        }


def _channel_of(row: dict[str, Any] | None) -> str:
    # A student without a VM waits on the fleet channel, where a new assignment shows up.
    return vm_channel(row["id"]) if row else FLEET_CHANNEL


def _student_message(status: VmStatus, row: dict[str, Any]) -> str:
    hostname = row["hostname"]
    if status == VmStatus.ASSIGNED:
        return f"{hostname} is yours; waiting for it to pick up your code."
    if status == VmStatus.CONFIGURING:
        return f"{hostname} is setting up Chrome Remote Desktop."
    if status == VmStatus.ACTIVE:
        return (
            f"{hostname} is ready: open {crd.ACCESS_URL}, choose {hostname} and enter your PIN."
        )
    if status == VmStatus.FAILED:
        return (
            f"{hostname} could not set up Chrome Remote Desktop. Get a fresh command from "
            f"{crd.HEADLESS_URL} and paste it again; you keep the same VM."
        )
    return f"{hostname} is {status.value}."
