"""HTTP handlers: parse, authorise, call the allocator, answer.

Errors are JSON `{error, hint}` with the right status. Bodies stream in and
are refused with 413 past `LabLink.max_body_bytes`, before they are buffered
whole. VM routes authenticate with their own bearer token and skip Jupyter's
login and XSRF; every other route keeps both.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from jupyter_server.auth.decorator import allow_unauthenticated
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import httputil, web

from . import crd, routes
from .allocator import (
    Allocator,
    AllocatorNotReady,
    ClientGone,
    EnrollmentClosed,
    NotAuthorized,
    normalize_hostname,
)
from .db import CodeAlreadyUsed, DatabaseUnavailable, HeldByAnother, NoVmFree, VmRetired
from .roles import SINGLE_USER_PROVIDERS
from .statuses import VmStatus

if TYPE_CHECKING:
    from .app import LabLink

STUDENT_COOKIE = "lablink-student"
NOTES_COOKIE = "lablink-notes"  # a request's notes, carried to the VM page it is sent on to
LOG_IN_HINT = (
    "Open the link your course gave you and log in; programs send "
    "'Authorization: token <token>'."
)
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


class ApiError(web.HTTPError):
    """An error the client can act on: a status, what happened, and what to do."""

    def __init__(self, status: int, error: str, hint: str | None = None,
                 user: str | None = None, *, retry_after: int | None = None) -> None:
        super().__init__(status, reason=None)
        self.error = error
        self.hint = hint
        self.user = user  # who the server took the caller for, when that is what the refusal is about
        self.retry_after = retry_after


def _after_body(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Run the checks that need the whole body before the handler method itself."""

    @functools.wraps(method)
    async def wrapper(self: LabLinkHandler, *args: Any, **kwargs: Any) -> None:
        self._body_complete()
        await method(self, *args, **kwargs)

    wrapper._lablink_after_body = True  # type: ignore[attr-defined]
    return wrapper


@web.stream_request_body
class LabLinkHandler(ExtensionHandlerMixin, JupyterHandler):
    """Base of every LabLink handler: the allocator, body limits, JSON answers."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Every method with a body gets the body checks, so none can forget XSRF.
        for name in ("post", "put", "patch", "delete"):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_lablink_after_body", False):
                setattr(cls, name, _after_body(method))

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self._chunks: list[bytes] = []
        self._body_size = 0
        # Jupyter checks XSRF in prepare(), but a form's _xsrf field is in the body,
        # which streams in afterwards: the check runs in _body_complete() instead.
        self._xsrf_deferred = True
        self.client_gone = ClientGone()

    @property
    def lablink(self) -> LabLink:
        """The extension app (its settings)."""
        return self.extensionapp  # type: ignore[return-value]

    @property
    def allocator(self) -> Allocator:
        """The process's allocator."""
        return self.settings["lablink_allocator"]  # type: ignore[no-any-return]

    @property
    def max_body_bytes(self) -> int:
        """The largest body accepted."""
        return int(self.lablink.max_body_bytes)

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        self._refuse_large_body()

    def _refuse_large_body(self) -> None:
        length = self.request.headers.get("Content-Length")
        if length is not None:
            try:
                too_large = int(length) > self.max_body_bytes
            except ValueError:
                raise ApiError(400, "Content-Length is not a number.") from None
            if too_large:
                raise self._too_large()
        # A chunked body is counted in data_received, dropped past the limit and answered 413 at
        # its end. Tornado's max_body_size is left alone: lowered to our limit it answers a bare
        # 400, and answering early then closing makes the client lose the answer to a reset.

    def _too_large(self) -> ApiError:
        return ApiError(413, f"The request body is larger than {self.max_body_bytes} bytes.",
                        "Send only the fields this endpoint takes.")

    def data_received(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size <= self.max_body_bytes:
            self._chunks.append(chunk)

    def _body_complete(self) -> None:
        if self._body_size > self.max_body_bytes:
            raise self._too_large()
        self.request.body = b"".join(self._chunks)
        self._chunks = []
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.startswith(FORM_TYPES):
            try:
                httputil.parse_body_arguments(
                    content_type, self.request.body, self.request.body_arguments, self.request.files,
                    self.request.headers,
                )
            except httputil.HTTPInputError:
                raise ApiError(400, "The form body is malformed.",
                               "Reload the page and submit the form again; programs send JSON.") from None
            for name, values in self.request.body_arguments.items():
                self.request.arguments.setdefault(name, []).extend(values)
        self._xsrf_deferred = False
        if self.request.method not in {"GET", "HEAD", "OPTIONS"}:
            try:
                self.check_xsrf_cookie()
            except web.HTTPError as exc:
                if exc.status_code != 403:
                    raise
                if self.current_user is None and self.lablink.identity != "email":
                    raise ApiError(403, "Log in first.", LOG_IN_HINT) from None
                if not self.has_form_body:
                    # The open form's JSON callers log in to nothing: XSRF is all they lack.
                    raise ApiError(403, "The request has no valid XSRF token.",
                                   "Send the _xsrf cookie's value in an X-XSRFToken header, as the "
                                   "form's page does.") from None
                raise ApiError(403, "This form is out of date or was sent from another site.",
                               "Reload the page and submit it again.") from None

    def check_xsrf_cookie(self) -> None:
        if getattr(self, "_xsrf_deferred", False):
            return None
        return super().check_xsrf_cookie()

    def flash(self, name: str, text: str) -> None:
        """Carry `text` across the redirect that follows (a signed cookie, read once by take_flash)."""
        self.set_signed_cookie(name, text, expires_days=None, httponly=True, samesite="Lax")

    def take_flash(self, name: str) -> str | None:
        """What flash() left under `name`, once."""
        value = self.get_signed_cookie(name, max_age_days=1)
        if value is None:
            return None
        self.clear_cookie(name)
        return value.decode()

    def on_connection_close(self) -> None:
        super().on_connection_close()  # ends the wait for a streamed body that will never come
        self.client_gone.set()

    # -- reading requests ---------------------------------------------------------

    @property
    def is_form(self) -> bool:
        """Whether a browser posted an HTML form (answered with pages, not JSON)."""
        return self.has_form_body and "text/html" in self.request.headers.get("Accept", "")

    @property
    def has_form_body(self) -> bool:
        """Whether the body is form-encoded."""
        return self.request.headers.get("Content-Type", "").startswith(FORM_TYPES)

    def body_fields(self) -> dict[str, Any]:
        """The request's fields: a JSON object, or a form's fields."""
        if self.has_form_body:
            fields: dict[str, Any] = {}
            for name, values in self.request.body_arguments.items():
                if len(values) != 1:
                    raise ApiError(400, f"The field '{name}' is given more than once.")
                fields[name] = _decode(values[0], name)
            return fields
        body = self.request.body
        if not body.strip():
            return {}
        try:
            text = body.decode("utf-8")
            value = _JSON.decode(text)
        except UnicodeDecodeError:
            raise ApiError(400, "The body is not UTF-8.", "Send a JSON object.") from None
        except _DuplicateKey as exc:
            raise ApiError(400, f"The key '{exc.args[0]}' appears more than once.") from None
        except (ValueError, RecursionError):
            raise ApiError(400, "The body is not valid JSON.", "Send a JSON object.") from None
        if not isinstance(value, dict):
            raise ApiError(400, "The body must be a JSON object.", "Send the fields this endpoint takes as one JSON object.")
        _refuse_unstorable(value)
        return value

    def text_field(self, fields: dict[str, Any], name: str, *, required: bool = True,
                   max_length: int | None = None) -> str | None:
        """The string field `name`, checked for type and length."""
        value = fields.get(name)
        if value is None:
            if required:
                raise ApiError(400, f"The field '{name}' is missing.")
            return None
        if not isinstance(value, str):
            raise ApiError(400, f"The field '{name}' must be a string.", f'Send it as text, e.g. {{"{name}": "…"}}.')
        if max_length is not None and len(value) > max_length:
            raise ApiError(400, f"The field '{name}' is longer than {max_length} characters.")
        return value

    def wait_argument(self) -> float:
        """The `wait` query argument: seconds a long-poll may be held (0 by default)."""
        text = self.get_query_argument("wait", "0")
        try:
            wait = float(text)
        except ValueError:
            raise ApiError(400, "'wait' must be a number of seconds.") from None
        if not 0 <= wait <= 3600:
            raise ApiError(400, "'wait' must be between 0 and 3600 seconds.")
        return wait

    def hostname_field(self, fields: dict[str, Any]) -> str:
        """The `hostname` field, normalised."""
        try:
            return normalize_hostname(fields.get("hostname"))
        except ValueError as exc:
            raise ApiError(400, f"Bad hostname: {exc}.") from None

    # -- answering ----------------------------------------------------------------

    def write_json(self, value: Any, status: int = 200) -> None:
        """Finish with `value` as JSON."""
        if self.client_gone.gone:
            return
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(value, default=str))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            self._expected_refusal = True
            body: dict[str, Any] = {"error": exc.error}
            if exc.hint:
                body["hint"] = exc.hint
            if exc.user:
                body["user"] = exc.user
            if exc.retry_after is not None:
                # Set here: tornado clears every header set before the error was raised.
                self.set_header("Retry-After", str(exc.retry_after))
        elif isinstance(exc, web.HTTPError):
            body = {"error": exc.log_message or httputil.responses.get(status_code, "Error")}
        else:
            body = {"error": "Internal error.", "hint": "The server log has the details."}
        if self.is_form:
            self.set_header("Content-Type", "text/html; charset=UTF-8")
            self.finish(self.lablink.render_page(self, "error.html", error=body["error"],
                                                 hint=body.get("hint")))
            return
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(body))

    def _log(self) -> None:
        if getattr(self, "_expected_refusal", False) and self.get_status() >= 500:
            # "No VM is free" and "database unavailable" are answers, not server faults:
            # one line, without the request-header dump Jupyter adds to 5xx.
            self.log.warning("%d %s %s %.2fms", self.get_status(), self.request.method,
                             self.request.path, 1000.0 * self.request.request_time())
            return
        super()._log()

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ApiError):
            return  # an expected refusal; the access log already has the status
        super().log_exception(typ, value, tb)

    async def _run(self, call: Awaitable[Any]) -> Any:
        """Await an allocator call, turning an unreachable database into 503."""
        try:
            return await call
        except AllocatorNotReady:
            raise ApiError(503, "LabLink is starting or stopping.", "Try again in a few seconds.",
                           retry_after=5) from None
        except DatabaseUnavailable:
            raise ApiError(503, "The database is unavailable right now.", "Try again in a few seconds.",
                           retry_after=5) from None

    def redirect_to_login(self) -> None:
        """Send the browser to log in, and back here afterwards."""
        url = self.get_login_url()
        # Under JupyterHub the login URL is the Hub's OAuth URL, which carries its own query
        # (and the way back in a state cookie); tornado's @authenticated adds `next` the same way.
        if "?" not in url:
            url += "?" + urlencode({"next": self.request.uri})
        self.redirect(url)

    # -- who is asking --------------------------------------------------------------

    def student(self, fields: dict[str, Any] | None = None) -> str:
        """The student's identity: the Jupyter user, or the email given on the open form."""
        if self.lablink.identity == "email":
            email = None
            if fields is not None:
                email = self.text_field(fields, "email", required=False, max_length=254)
            if email:
                email = email.strip().lower()
                if not _looks_like_email(email):
                    raise ApiError(400, "That does not look like an email address.",
                                   "Type the address you use for this course, like ada@example.edu.")
                return email
            remembered = self.get_signed_cookie(STUDENT_COOKIE, max_age_days=1)
            if remembered:
                return remembered.decode()
            if self.current_user is None:
                raise ApiError(400, "Type your email address first.")
        username = self.acting_username
        if username is None:
            raise ApiError(403, "Log in first.", LOG_IN_HINT)
        return username

    def vouched_for(self, student: str) -> bool:
        """Whether this request shows it comes from `student`, who may then use the VM they hold.

        Always, with a Jupyter login. On the open form anyone can type anyone's email, so
        only from the browser that student got their VM in (its signed cookie); the
        database still lets the same Google code through again (Database.assign_vm).
        """
        if self.lablink.identity != "email" or self.current_user is not None:
            return True
        remembered = self.get_signed_cookie(STUDENT_COOKIE, max_age_days=1)
        return remembered is not None and remembered.decode() == student

    def remember_student(self, student: str) -> None:
        """On the open form, this browser is now `student`'s (see vouched_for)."""
        if self.lablink.identity == "email":
            self.set_signed_cookie(STUDENT_COOKIE, student, expires_days=1, httponly=True,
                                   samesite="Lax")

    @property
    def acting_username(self) -> str | None:
        """Whom this request acts for, as students' VMs, the audit log and pages name them.

        A plain Jupyter server belongs to one person: whoever holds its token or password
        is its owner, whatever anonymous name (new on every token request) Jupyter gives
        the session. Otherwise the logged-in user; None when nobody is logged in.
        """
        if self.current_user is None:
            return None
        if type(self.identity_provider) in SINGLE_USER_PROVIDERS:
            return self.lablink.server_owner
        return str(self.current_user.username)


class VmHandler(LabLinkHandler):
    """Base of the routes a VM calls: its own bearer token, no Jupyter login, no XSRF."""

    async def prepare(self) -> None:  # type: ignore[override]
        # Skip Jupyter's identity provider: the bearer token here is a VM token, and
        # under JupyterHub resolving it would cost a Hub API call per poll.
        self.current_user = self._jupyter_current_user = None
        if not self.check_host():
            raise web.HTTPError(403)
        self._refuse_large_body()

    def check_xsrf_cookie(self) -> None:
        return None  # VMs authenticate by bearer token, which a browser never sends on its own

    def bearer_token(self) -> str:
        """The token in `Authorization: Bearer …`, or 401."""
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "A bearer token is required.",
                           "Send 'Authorization: Bearer <token>' (lablink-subscribe does this).")
        return token.strip()

    async def authenticated_vm(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The calling VM's row, after checking its token against its hostname."""
        hostname = self.hostname_field(fields)
        token = self.bearer_token()
        with refusing_bad_vm_tokens():
            return await self._run(self.allocator.authenticate_vm(hostname, token))  # type: ignore[no-any-return]


def _retired() -> ApiError:
    return ApiError(410, "This VM was retired by an instructor.",
                    "An instructor must register it again before it can be used.")


@contextlib.contextmanager
def refusing_bad_vm_tokens() -> Iterator[None]:
    """Answer 401 for a token that is not the VM's, 410 for a retired VM."""
    try:
        yield
    except NotAuthorized:
        raise ApiError(401, "This token does not belong to that VM.",
                       "Enroll the VM again with the fleet enrollment token.") from None
    except VmRetired:
        raise _retired() from None


class EnrollHandler(VmHandler):
    """POST lablink/api/vms/enroll: a VM trades the fleet token for its own."""

    @allow_unauthenticated
    async def post(self) -> None:
        fields = self.body_fields()
        hostname = self.hostname_field(fields)
        presented = self.bearer_token()
        try:
            token = await self._run(self.allocator.enroll(hostname, presented))
        except EnrollmentClosed:
            raise ApiError(403, "Enrollment is closed.", "Set c.LabLink.enrollment_token.") from None
        except NotAuthorized:
            raise ApiError(401, "That is not the fleet enrollment token.") from None
        except VmRetired:
            raise _retired() from None
        self.write_json({"hostname": hostname, "token": token}, status=201)


class VmStartupHandler(VmHandler):
    """POST lablink/vm_startup: the VM's long-poll for its next instruction."""

    @allow_unauthenticated
    async def post(self) -> None:
        hostname, token, window = self._poll_request()
        with refusing_bad_vm_tokens():
            vm_id, answer = await self._run(self.allocator.poll(hostname, token, self.client_gone, window))
        if answer["status"] == "retired":
            raise _retired()
        self.write_json(answer)
        if self.client_gone.gone:
            self.allocator.response_lost(vm_id)
        else:
            self.allocator.response_written(vm_id, answer)

    def _poll_request(self) -> tuple[str, str, float | None]:
        """The polling VM's hostname and token, and the window it asks for (the body is not kept)."""
        fields = self.body_fields()
        hostname = self.hostname_field(fields)
        token = self.bearer_token()
        window = fields.get("wait")
        if window is not None and (isinstance(window, bool) or not isinstance(window, (int, float))
                                   or not 0 <= window <= 3600):
            raise ApiError(400, "The field 'wait' must be a number of seconds.")
        return hostname, token, window


class VmStatusHandler(VmHandler):
    """POST lablink/api/vm_status: the VM reports CRD up, a failure, or teardown done."""

    REPORTABLE = {VmStatus.ACTIVE.value, VmStatus.FAILED.value, VmStatus.AVAILABLE.value}

    @allow_unauthenticated
    async def post(self) -> None:
        fields = self.body_fields()
        vm = await self.authenticated_vm(fields)
        status = self.text_field(fields, "status")
        if status not in self.REPORTABLE:
            raise ApiError(400, "The field 'status' must be 'active', 'failed' or 'available'.")
        message = self.text_field(fields, "message", required=False, max_length=2000)
        work_id = fields.get("work_id")
        if work_id is not None and (isinstance(work_id, bool) or not isinstance(work_id, int)
                                    or not 0 <= work_id < 2**62):
            raise ApiError(400, "The field 'work_id' must be the integer the assignment carried.")
        row = await self._run(self.allocator.report(
            vm["id"], VmStatus(status), (message or "").strip()[:500] or None, work_id
        ))
        if row is None:
            # The work was replaced (a fresh code, a release) or was never delivered.
            raise ApiError(409, "This report no longer applies.", "Poll lablink/vm_startup for the current work.")
        self.write_json({"hostname": row["hostname"], "status": row["status"]})


class RequestVmHandler(LabLinkHandler):
    """POST lablink/api/request_vm: a student pastes a CRD command and gets a VM and a PIN."""

    @allow_unauthenticated
    async def post(self) -> None:
        fields = self.body_fields()
        try:
            user = self.student(fields)
            command = self.text_field(fields, "crd_command", required=False) or ""
            try:
                view = await self._run(self.allocator.request_vm(
                    user, command, may_use_held=self.vouched_for(user)))
            except crd.CrdCommandError as exc:
                raise ApiError(400, exc.message, exc.hint) from None
            except NoVmFree:
                raise ApiError(503, "No VM is free right now.",
                               "Every VM is in use or still starting. Try again in a minute, "
                               "or tell your instructor.", retry_after=60) from None
            except CodeAlreadyUsed:
                raise ApiError(409, "This code was used already, and each code works only once.",
                               crd.HOW_TO_GET_A_COMMAND) from None
            except HeldByAnother:
                raise ApiError(409, f"{user} already has a VM, asked for from another browser.",
                               "Use the browser you asked from, or ask your instructor to release "
                               "that VM.") from None
        except ApiError as exc:
            if self.is_form and exc.status_code != 403:
                self.set_status(exc.status_code)
                if exc.retry_after is not None:
                    self.set_header("Retry-After", str(exc.retry_after))
                self.finish(self.lablink.render_page(self, "form.html", error=exc.error, hint=exc.hint,
                                                     command=fields.get("crd_command"),
                                                     email=fields.get("email")))
                return
            raise
        self.remember_student(user)
        if self.is_form:
            if view["notes"]:
                self.flash(NOTES_COOKIE, json.dumps(view["notes"]))
            self.redirect(self.base_url + routes.VM_PAGE, status=303)
            return
        self.write_json(view)


class MyVmHandler(LabLinkHandler):
    """GET lablink/api/my_vm[?wait=S&known=STATUS]: the student's VM, optionally long-polled."""

    @allow_unauthenticated
    async def get(self) -> None:
        user = self.student()
        wait = self.wait_argument()
        known = self.get_query_argument("known", None)
        view = await self._run(self.allocator.my_vm(user, wait, known, self.client_gone))
        self.write_json(view)


class ReleaseHandler(LabLinkHandler):
    """POST lablink/api/release: the student gives their VM back."""

    @allow_unauthenticated
    async def post(self) -> None:
        self.body_fields()
        user = self.student()
        row = await self._run(self.allocator.release(user))
        if self.is_form:
            self.redirect(self.base_url + routes.FORM_PAGE, status=303)
            return
        if row is None:
            raise ApiError(404, "You have no VM to release.", "It may have been released already.")
        self.write_json({"hostname": row["hostname"], "status": row["status"]})


class HealthHandler(LabLinkHandler):
    """GET lablink/api/health: database, listener and waiters, for load balancers and people."""

    @allow_unauthenticated
    async def get(self) -> None:
        health = await self.allocator.health()
        self.write_json(health, status=200 if health["database"] == "ok" else 503)


class SubscribeProgramHandler(LabLinkHandler):
    """GET lablink/lablink_subscribe.py: the VM program, so a VM image can fetch it at boot."""

    @allow_unauthenticated
    def get(self) -> None:
        import lablink_subscribe

        self.set_header("Content-Type", "text/x-python; charset=UTF-8")
        self.finish(Path(lablink_subscribe.__file__).read_bytes())


class FormPageHandler(LabLinkHandler):
    """GET lablink/: the web form a student pastes their command into."""

    @allow_unauthenticated
    async def get(self) -> None:
        if self.lablink.identity == "jupyter" and self.current_user is None:
            self.redirect_to_login()
            return
        held = student = None
        try:
            student = self.student()
            view = await self.allocator.my_vm(student)
            held = view if view["status"] != "none" else None
        except (ApiError, DatabaseUnavailable):
            pass  # not known yet, or the database is down: the form itself still works
        # On the open form, a browser that got a VM has its email filled in.
        email = student if held is not None and self.lablink.identity == "email" else None
        self.finish(self.lablink.render_page(self, "form.html", held=held, email=email))


class VmPageHandler(LabLinkHandler):
    """GET lablink/vm: the success page with hostname, PIN and live status."""

    @allow_unauthenticated
    async def get(self) -> None:
        if self.lablink.identity == "jupyter" and self.current_user is None:
            self.redirect_to_login()
            return
        try:
            user = self.student()
        except ApiError:
            self.redirect(self.base_url + routes.FORM_PAGE)
            return
        view = await self._run(self.allocator.my_vm(user))
        if view["status"] == "none":
            self.redirect(self.base_url + routes.FORM_PAGE)
            return
        try:
            notes = json.loads(self.take_flash(NOTES_COOKIE) or "[]")
        except ValueError:
            notes = []
        self.finish(self.lablink.render_page(self, "vm.html", vm=view, notes=notes))


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


NUL_HINT = "Copy the text again from where it came; a NUL character is never part of it."

# One decoder for every request: json.loads with a hook would build a new one each call.
_JSON = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _refuse_unstorable(value: Any) -> None:
    # PostgreSQL text holds neither NUL nor a lone surrogate (JSON can carry "\\ud800"); refuse
    # both here with a clear answer instead of failing in the database driver.
    if isinstance(value, str):
        if "\x00" in value:
            raise ApiError(400, "Text fields may not contain NUL characters.", NUL_HINT)
        if not _is_encodable(value):
            raise ApiError(400, "Text fields must be valid Unicode (no lone surrogates).",
                           "Copy the text again from where it came.")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_unstorable(key)
            _refuse_unstorable(item)
    elif isinstance(value, list):
        for item in value:
            _refuse_unstorable(item)


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decode(raw: bytes, name: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, f"The field '{name}' is not UTF-8.") from None
    if "\x00" in text:
        raise ApiError(400, "Text fields may not contain NUL characters.", NUL_HINT)
    return text


def _looks_like_email(text: str) -> bool:
    local, at, domain = text.rpartition("@")
    return bool(at and local and "." in domain and " " not in text and len(text) <= 254)


default_handlers: list[tuple[str, type[LabLinkHandler]]] = [
    (routes.VM_ENROLL, EnrollHandler),
    (routes.VM_STARTUP, VmStartupHandler),
    (routes.VM_STATUS, VmStatusHandler),
    (routes.REQUEST_VM, RequestVmHandler),
    (routes.MY_VM, MyVmHandler),
    (routes.RELEASE, ReleaseHandler),
    (routes.HEALTH, HealthHandler),
    (routes.SUBSCRIBE_PROGRAM, SubscribeProgramHandler),
    (routes.FORM_PAGE, FormPageHandler),
    (routes.VM_PAGE, VmPageHandler),
]
