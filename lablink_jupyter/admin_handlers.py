"""HTTP handlers for instructors: the fleet API, the CSV export, the audit log and the admin page.

Every route answers 403 `{error, hint}` to anyone who is not an instructor
(roles.is_instructor decides); the page sends a visitor who is not logged in
to the login page first.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from datetime import datetime, timezone
from typing import Any

from jupyter_server.auth.decorator import allow_unauthenticated

from . import routes
from .db import VmHeld, VmNotFound, VmNotHeld, VmsAlreadyRegistered
from .fleet import COUNTED, FleetAdmin, parse_hostnames
from .handlers import LOG_IN_HINT, ApiError, LabLinkHandler

#: Words for the statuses on the counts bar and in tables.
STATUS_LABELS = {
    "available": "available",
    "assigned": "assigned",
    "configuring": "setting up",
    "active": "active",
    "failed": "failed",
    "stale": "stale",
    "provisioning": "provisioning",
    "released": "tearing down",
    "retired": "retired",
}

#: Most events one page holds.
MAX_EVENTS_PAGE = 500


def route_pattern(path: str) -> str:
    """A route path from routes.py as a tornado pattern: '{name}' becomes a named group."""
    parts = re.split(r"\{(\w+)\}", path)
    pattern = ""
    for index, part in enumerate(parts):
        pattern += f"(?P<{part}>[^/]+)" if index % 2 else re.escape(part)
    return pattern


def ago(seconds: float | None) -> str:
    """A short human duration: '40 s', '12 min', '3 h', '2 d'."""
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{int(seconds)} s"
    if seconds < 90 * 60:
        return f"{int(seconds // 60)} min"
    if seconds < 36 * 3600:
        return f"{int(seconds // 3600)} h"
    return f"{int(seconds // 86400)} d"


class InstructorHandler(LabLinkHandler):
    """Base of the instructor routes: who may call them, and what their failures mean."""

    @property
    def fleet(self) -> FleetAdmin:
        """The process's fleet operations."""
        return self.settings["lablink_fleet"]  # type: ignore[no-any-return]

    def instructor(self) -> str:
        """The calling instructor's username, or 403."""
        username = self.acting_username
        if username is None:
            raise ApiError(403, "Log in first.", LOG_IN_HINT)
        if not self.lablink.is_instructor(self.current_user, self.identity_provider):
            raise ApiError(403, "Only instructors can manage the fleet.",
                           self.lablink.how_to_make_instructor(username, self.current_user), user=username)
        return username

    async def fleet_call(self, call: Awaitable[Any]) -> Any:
        """Await a fleet operation, turning what went wrong into an answer the caller can act on."""
        try:
            return await self._run(call)
        except VmNotFound as exc:
            raise ApiError(404, f"There is no VM called {exc.args[0]}.",
                           "GET lablink/api/vms lists every VM.") from None
        except VmNotHeld as exc:
            raise ApiError(409, f"No student holds {exc.hostname} (it is {exc.status}).",
                           "Only a VM a student holds can be released.") from None
        except VmHeld as exc:
            raise ApiError(409, f"{exc.hostname} is in use by {exc.user}.",
                           f"Retire it anyway with ?force=1; {exc.user} loses it.") from None
        except VmsAlreadyRegistered as exc:
            raise ApiError(409, "Already registered: " + ", ".join(exc.hostnames) + ".",
                           "Nothing was registered. Leave those out (or retire them first) "
                           "and register again.") from None

    def int_argument(self, name: str, default: int | None, low: int, high: int) -> int | None:
        """The integer query argument `name` within [low, high], or 400."""
        text = self.get_query_argument(name, None)
        if text is None or text == "":
            return default
        try:
            value = int(text)
        except ValueError:
            raise ApiError(400, f"'{name}' must be a whole number.") from None
        if not low <= value <= high:
            raise ApiError(400, f"'{name}' must be between {low} and {high}.")
        return value

    def flag_argument(self, name: str) -> bool:
        """Whether the query argument `name` is set to a true value (1, true, yes)."""
        text = self.get_query_argument(name, "") or ""
        if text.lower() in ("", "0", "false", "no"):
            return False
        if text.lower() in ("1", "true", "yes"):
            return True
        raise ApiError(400, f"'{name}' must be 1 or 0.")

    def path_hostname(self, hostname: str) -> str:
        """The hostname in the URL, checked."""
        return self.hostname_field({"hostname": hostname})


class VmsHandler(InstructorHandler):
    """GET lablink/api/vms: every VM and the counts; POST: register hostnames, one token each."""

    @allow_unauthenticated
    async def get(self) -> None:
        self.instructor()
        self.write_json(await self.fleet_call(self.fleet.overview()))

    @allow_unauthenticated
    async def post(self) -> None:
        fields = self.body_fields()
        actor = self.instructor()
        try:
            hostnames = parse_hostnames(fields.get("hostnames"))
        except ValueError as exc:
            raise ApiError(400, f"Bad hostnames: {exc}.",
                           'Send {"hostnames": ["lab-vm-1", "lab-vm-2"]}.') from None
        registered = await self.fleet_call(self.fleet.register(hostnames, actor))
        self.write_json({
            "vms": registered,
            "hint": "Each token is shown only now. Start each VM with lablink-subscribe "
                    "--hostname NAME and LABLINK_VM_TOKEN set to its token.",
        }, status=201)


class VmReleaseHandler(InstructorHandler):
    """POST lablink/api/vms/<hostname>/release: take the VM back from whoever holds it."""

    @allow_unauthenticated
    async def post(self, hostname: str) -> None:
        self.body_fields()
        actor = self.instructor()
        self.write_json(await self.fleet_call(self.fleet.release(self.path_hostname(hostname), actor)))


class VmOneHandler(InstructorHandler):
    """DELETE lablink/api/vms/<hostname>[?force=1]: retire the VM (a held one only with force)."""

    @allow_unauthenticated
    async def delete(self, hostname: str) -> None:
        self.body_fields()
        actor = self.instructor()
        force = self.flag_argument("force")
        self.write_json(await self.fleet_call(self.fleet.retire(self.path_hostname(hostname), actor, force)))


class VmsCsvHandler(InstructorHandler):
    """GET lablink/api/vms.csv: the fleet and the history of every assignment."""

    @allow_unauthenticated
    async def get(self) -> None:
        self.instructor()
        text = await self.fleet_call(self.fleet.csv_text())
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
        self.set_header("Content-Type", "text/csv; charset=UTF-8")
        self.set_header("Content-Disposition", f'attachment; filename="lablink-vms-{stamp}.csv"')
        self.set_header("Cache-Control", "no-store")
        self.finish(text)


class EventsHandler(InstructorHandler):
    """GET lablink/api/events[?limit&before&after&hostname&wait]: the audit log, newest first."""

    @allow_unauthenticated
    async def get(self) -> None:
        self.instructor()
        limit = self.int_argument("limit", 50, 1, MAX_EVENTS_PAGE)
        before = self.int_argument("before", None, 1, 2**62)
        after = self.int_argument("after", None, 0, 2**62)
        hostname_text = self.get_query_argument("hostname", None)
        hostname = self.path_hostname(hostname_text) if hostname_text else None
        wait = self.wait_argument()
        assert limit is not None
        page = await self.fleet_call(self.fleet.events(
            limit=limit, before=before, after=after, hostname=hostname, wait=wait,
            client_gone=self.client_gone,
        ))
        self.write_json(page)


class EnrollmentTokenHandler(InstructorHandler):
    """GET lablink/api/enrollment_token: the fleet token; POST: rotate it."""

    @allow_unauthenticated
    async def get(self) -> None:
        self.instructor()
        self.write_json(await self.fleet_call(self.fleet.enrollment_token()))

    @allow_unauthenticated
    async def post(self) -> None:
        self.body_fields()
        actor = self.instructor()
        if self.allocator.enrollment_token_configured:
            raise ApiError(409, "The enrollment token is set in the configuration.",
                           "Change c.LabLink.enrollment_token and restart every allocator process.")
        self.write_json(await self.fleet_call(self.fleet.rotate_enrollment_token(actor)))


class AdminPageHandler(InstructorHandler):
    """GET lablink/admin: the fleet overview as a page; POST: the page's forms."""

    ACTIONS = ("release", "retire", "register", "show_token", "rotate_token")

    #: Carries a release's or retirement's notice across the redirect that follows it.
    NOTICE_COOKIE = "lablink-admin-notice"

    @allow_unauthenticated
    async def get(self) -> None:
        if self.current_user is None:
            self.redirect_to_login()
            return
        if not self._may_enter():
            return
        await self._render(notice=self.take_flash(self.NOTICE_COOKIE))

    @allow_unauthenticated
    async def post(self) -> None:
        fields = self.body_fields()
        if not self._may_enter():
            return
        actor = self.instructor()
        action = fields.get("action")
        values: dict[str, Any] = {}
        try:
            if action not in self.ACTIONS:
                raise ApiError(400, "Unknown action.", "Use the buttons on this page.")
            if action == "register":
                try:
                    hostnames = parse_hostnames(fields.get("hostnames", ""))
                except ValueError as exc:
                    raise ApiError(400, f"Bad hostnames: {exc}.",
                                   "Type one hostname a line, like lab-vm-1.") from None
                values["registered"] = await self.fleet_call(self.fleet.register(hostnames, actor))
                values["notice"] = f"Registered {len(hostnames)} VM(s)."
            elif action == "show_token":
                values["enrollment"] = await self.fleet_call(self.fleet.enrollment_token())
            elif action == "rotate_token":
                if self.allocator.enrollment_token_configured:
                    raise ApiError(409, "The enrollment token is set in the configuration.",
                                   "Change c.LabLink.enrollment_token and restart.")
                if fields.get("confirm") != "1":
                    raise ApiError(400, "Tick the box to confirm the rotation.")
                values["enrollment"] = await self.fleet_call(self.fleet.rotate_enrollment_token(actor))
                values["notice"] = "The enrollment token was rotated; the old one no longer enrolls VMs."
            else:
                hostname = self.hostname_field(fields)
                if action == "release":
                    done = await self.fleet_call(self.fleet.release(hostname, actor))
                    notice = f"Released {hostname} from {done['released_from']}."
                else:
                    done = await self.fleet_call(
                        self.fleet.retire(hostname, actor, fields.get("force") == "1"))
                    notice = f"Retired {hostname}."
                # Back to the page by GET, so that reloading it does not do this again. (The
                # other actions show a token once, which must not travel through a redirect.)
                self.flash(self.NOTICE_COOKIE, notice)
                self.redirect(self.base_url + routes.ADMIN_PAGE, status=303)
                return
        except ApiError as exc:
            if exc.status_code == 503:
                raise
            self.set_status(exc.status_code)
            values = {"error": exc.error, "hint": exc.hint}
        await self._render(**values)

    def _may_enter(self) -> bool:
        try:
            self.instructor()
        except ApiError as exc:
            self.set_status(exc.status_code)
            self.finish(self.lablink.render_page(self, "denied.html", error=exc.error, hint=exc.hint))
            return False
        return True

    async def _render(self, **values: Any) -> None:
        overview = await self.fleet_call(self.fleet.overview())
        events = await self.fleet_call(self.fleet.events(limit=30))
        self.finish(self.lablink.render_page(
            self, "admin.html",
            vms=overview["vms"], counts=overview["counts"], counted=COUNTED, labels=STATUS_LABELS,
            stale_after=overview["stale_after"], latest_event_id=overview["latest_event_id"],
            events=events["events"], ago=ago,
            configure_timeout=self.lablink.configure_timeout,
            rotatable=not self.allocator.enrollment_token_configured,
            **values,
        ))


admin_handlers: list[tuple[str, type[LabLinkHandler]]] = [
    (route_pattern(routes.VMS), VmsHandler),
    (route_pattern(routes.VMS_CSV), VmsCsvHandler),
    (route_pattern(routes.VM_RELEASE), VmReleaseHandler),
    (route_pattern(routes.VM_ONE), VmOneHandler),
    (route_pattern(routes.EVENTS), EventsHandler),
    (route_pattern(routes.ENROLLMENT_TOKEN), EnrollmentTokenHandler),
    (route_pattern(routes.ADMIN_PAGE), AdminPageHandler),
]
