"""The StudentPanel: a student asks for a lab VM from a notebook and follows it until it is ready.

Nothing here blocks the kernel. A click only flips widget state and schedules a
coroutine on the kernel's event loop; each blocking HTTP call runs in a daemon
thread whose result that coroutine awaits; only coroutines on the loop (and
the click handlers, which run there too) change widgets. The server judges
every paste: the panel sends it as it is and shows the verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import html
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, TypeVar

import ipywidgets as widgets

from lablink_jupyter.crd import ACCESS_URL, HEADLESS_URL
from lablink_jupyter.statuses import HELD, VmStatus

from .client import LabLinkClient, LabLinkError

__all__ = ["StudentPanel"]

T = TypeVar("T")

#: Seconds each status long-poll asks the server to hold; the server caps it at its poll_timeout.
FOLLOW_WAIT = 40.0
#: Seconds between attempts while the server cannot be reached (the last one repeats).
RETRY_DELAYS = (2.0, 4.0, 8.0, 15.0, 30.0)

NO_VM = "none"
HELD_STATUSES = frozenset(status.value for status in HELD)
SETTING_UP = frozenset({VmStatus.ASSIGNED.value, VmStatus.CONFIGURING.value})
STATUS_LABELS = {
    VmStatus.ASSIGNED.value: "Assigned",
    VmStatus.CONFIGURING.value: "Setting up",
    VmStatus.ACTIVE.value: "Ready",
    VmStatus.FAILED.value: "Failed",
}

ERROR_STYLE = "color: var(--jp-error-color1, #c62828)"
MUTED_STYLE = "color: var(--jp-ui-font-color2, #616161)"
BIG_STYLE = (
    "font-family: var(--jp-code-font-family, monospace); font-size: 1.8em; font-weight: 600; "
    "letter-spacing: 0.06em; user-select: all"
)


LINK_STYLE = "color: var(--jp-content-link-color, #1976d2); text-decoration: underline"


def _link(url: str) -> str:
    shown = url.removeprefix("https://")
    # Widget HTML gets no link styling from JupyterLab: without this it reads as plain text.
    return (f'<a href="{html.escape(url)}" target="_blank" rel="noopener noreferrer" '
            f'style="{LINK_STYLE}">{html.escape(shown)}</a>')


def _steps_html(intro: str) -> str:
    return (
        f"<div>{intro}</div><ol style='margin: 0.3em 0'>"
        f"<li>Open {_link(HEADLESS_URL)} (it opens in a new tab) and sign in with your Google account.</li>"
        "<li>Click <b>Begin</b>, then <b>Next</b>, then <b>Authorize</b>.</li>"
        "<li>Copy the command shown under <b>Debian Linux</b>, paste it below and click the button. "
        "Google's code in it expires within minutes, so paste it right away.</li></ol>"
    )


def _error_html(exc: LabLinkError) -> str:
    hint = f"<div>{html.escape(exc.hint)}</div>" if exc.hint else ""
    return f"<div style='{ERROR_STYLE}'><b>{html.escape(exc.error)}</b></div>{hint}"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _off_loop(call: Callable[[], T]) -> T:
    """Run one blocking call in a daemon thread and await its result on the running loop.

    A daemon thread rather than the default executor: a kernel that shuts down
    or restarts never waits for a long-poll still in flight.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            result = call()
        except BaseException as exc:  # handed to the awaiting coroutine, which decides
            report = functools.partial(settle, functools.partial(future.set_exception, exc))
        else:
            report = functools.partial(settle, functools.partial(future.set_result, result))
        # A closed loop (the kernel is stopping) raises RuntimeError: nobody waits for the answer.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(report)

    threading.Thread(target=run, name="lablink-call", daemon=True).start()
    return await future


def _on_kernel_loop(handler: Callable[..., None]) -> Callable[..., None]:
    """Run a click handler on the panel's event loop, whichever thread delivered the click."""

    @functools.wraps(handler)
    def wrapper(self: StudentPanel, *args: Any) -> None:
        loop = self._loop
        if loop is not None and _running_loop() is not loop and not loop.is_closed():
            loop.call_soon_threadsafe(handler, self, *args)
            return
        handler(self, *args)

    return wrapper


class StudentPanel(widgets.VBox):
    """Paste Google's Chrome Remote Desktop command, get a lab VM and its PIN, follow it until ready."""

    #: Panels still following their VM; a new panel retires the older ones (a re-run cell).
    _live: ClassVar[weakref.WeakSet[StudentPanel]] = weakref.WeakSet()

    def __init__(self, url: str | None = None, token: str | None = None, **kwargs: Any) -> None:
        """Find the LabLink server: `url`/`token`, else LABLINK_URL/LABLINK_TOKEN, else the kernel's own."""
        self.heading = widgets.HTML("<div style='font-size: 1.3em; font-weight: 600'>Your lab VM</div>")
        self.hostname_display = widgets.HTML()
        self.pin_display = widgets.HTML()
        self.status_display = widgets.HTML()
        self.notes = widgets.HTML()
        self.access_note = widgets.HTML()
        self.release_button = widgets.Button(description="Release this VM", icon="sign-out")
        self.release_question = widgets.HTML()
        self.confirm_release_button = widgets.Button(description="Yes, give it back", button_style="danger")
        self.keep_button = widgets.Button(description="Keep it")
        self.release_row = widgets.HBox([self.release_button])
        self.release_feedback = widgets.HTML()
        self.vm_card = widgets.VBox([
            self.hostname_display, self.pin_display, self.status_display, self.notes,
            self.access_note, self.release_row, self.release_feedback,
        ])
        self.instructions = widgets.HTML(_steps_html("To get a VM:"))
        self.command = widgets.Textarea(
            placeholder='DISPLAY= /opt/google/chrome-remote-desktop/start-host --code="4/0…" '
                        '--redirect-url="…" --name=$(hostname)',
            rows=4, layout=widgets.Layout(width="100%"),
        )
        self.request_button = widgets.Button(description="Request a VM", button_style="primary",
                                             icon="desktop")
        self.feedback = widgets.HTML()
        self.paste_section = widgets.VBox([self.instructions, self.command, self.request_button,
                                           self.feedback])
        self.connection_note = widgets.HTML()
        super().__init__([self.heading, self.paste_section, self.connection_note], **kwargs)
        self._parts: list[widgets.Widget] = [
            self.heading, self.hostname_display, self.pin_display, self.status_display, self.notes,
            self.access_note, self.release_button, self.release_question, self.confirm_release_button,
            self.keep_button, self.release_row, self.release_feedback, self.vm_card, self.instructions,
            self.command, self.request_button, self.feedback, self.paste_section, self.connection_note,
        ]
        for part, name in [
            (self, "panel"), (self.hostname_display, "hostname"), (self.pin_display, "pin"),
            (self.status_display, "status"), (self.command, "command"),
            (self.request_button, "request"), (self.feedback, "feedback"),
            (self.release_button, "release"), (self.confirm_release_button, "confirm-release"),
            (self.keep_button, "keep"), (self.connection_note, "connection"),
        ]:
            part.add_class(f"lablink-{name}")

        self._loop = _running_loop()
        self._closed = False
        self._busy = False
        self._view: dict[str, Any] = {"status": NO_VM}
        self._setting_up_since: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._follow_task: asyncio.Task[None] | None = None
        self._client: LabLinkClient | None = None
        self._setup_problem: LabLinkError | None = None

        self.request_button.on_click(self._on_request_click)
        self.release_button.on_click(self._on_release_click)
        self.keep_button.on_click(self._on_keep_click)
        self.confirm_release_button.on_click(self._on_confirm_release_click)

        for older in list(StudentPanel._live):
            older._retire()
        try:
            self._client = LabLinkClient(url, token)
        except LabLinkError as exc:
            self._setup_problem = exc
            self.connection_note.value = _error_html(exc)
            return
        StudentPanel._live.add(self)
        self.connection_note.value = f"<span style='{MUTED_STYLE}'>Looking for your VM…</span>"
        if self._loop is None:
            self.connection_note.value = _error_html(_NO_LOOP)
            return
        self._follow_from(None)
        self._spawn(self._tick())

    # -- what other code may ask ----------------------------------------------------------

    @property
    def server_url(self) -> str | None:
        """The LabLink server this panel talks to (None when none was found)."""
        return self._client.address.url if self._client else None

    @property
    def following(self) -> bool:
        """Whether the panel is following its VM's status in the background."""
        return self._follow_task is not None and not self._follow_task.done()

    def close(self) -> None:
        """Stop following the VM and close the panel's widgets."""
        self._stop()
        for part in self._parts:
            part.close()
        super().close()

    # -- background work --------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        loop = self._loop or _running_loop()
        if loop is None or loop.is_closed():
            work.close()
            self.feedback.value = _error_html(_NO_LOOP)
            return None
        self._loop = loop
        task = loop.create_task(self._guarded(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guarded(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # shown in the panel: a traceback in the cell helps no student
            if not self._closed:
                self.connection_note.value = _error_html(LabLinkError(
                    None, f"The panel stopped on an unexpected error: {type(exc).__name__}: {exc}",
                    "Run the cell again; if it happens again, tell your instructor."))

    def _stop(self) -> None:
        self._closed = True
        StudentPanel._live.discard(self)
        for task in list(self._tasks):
            task.cancel()
        self._follow_task = None

    def _retire(self) -> None:
        """Stop this panel because a newer one took over (usually: the cell ran again)."""
        self._stop()
        for button in (self.request_button, self.release_button, self.confirm_release_button,
                       self.keep_button):
            button.disabled = True
        self.command.disabled = True
        self.connection_note.value = (
            f"<span style='{MUTED_STYLE}'>This panel has stopped: a newer LabLink panel in this "
            "notebook took over. Use that one.</span>"
        )

    def _follow_from(self, known: str | None) -> None:
        if self._follow_task is not None:
            self._follow_task.cancel()
        self._follow_task = self._spawn(self._follow(known))

    async def _follow(self, known: str | None) -> None:
        """Show the VM, then long-poll my_vm for each change of its status (None: ask at once)."""
        assert self._client is not None
        # A session of its own: a held long-poll never stands in front of a click.
        poller = self._client.copy()
        failures = 0
        while True:
            wait = FOLLOW_WAIT if known is not None else 0.0
            try:
                view = await _off_loop(functools.partial(poller.my_vm, wait=wait, known=known))
            except LabLinkError as exc:
                delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]
                failures += 1
                self.connection_note.value = _error_html(exc) + (
                    f"<div style='{MUTED_STYLE}'>Trying again in {delay:.0f} s.</div>")
                await asyncio.sleep(delay)
                continue
            failures = 0
            self.connection_note.value = ""
            self._show_vm(view)
            known = str(view.get("status", NO_VM))

    async def _tick(self) -> None:
        """Count the seconds of setup on screen; the server is asked only by the long-poll."""
        while True:
            await asyncio.sleep(1.0)
            if self._view.get("status") in SETTING_UP:
                self._show_status_line()

    # -- clicks ------------------------------------------------------------------------------

    @_on_kernel_loop
    def _on_request_click(self, _button: widgets.Button | None = None) -> None:
        if self._busy or self._closed:
            return
        if self._client is None:
            self.feedback.value = _error_html(self._setup_problem or _NO_LOOP)
            return
        self._busy = True
        self.request_button.disabled = True
        self.feedback.value = "Requesting…"
        if self._spawn(self._request(self.command.value)) is None:
            self._busy = False
            self.request_button.disabled = False

    async def _request(self, pasted: str) -> None:
        assert self._client is not None
        client = self._client
        try:
            view = await _off_loop(functools.partial(client.request_vm, pasted))
        except LabLinkError as exc:
            self.feedback.value = _error_html(exc)
        else:
            self.command.value = ""  # the code works once; keep it out of saved widget state
            self.feedback.value = ""
            self.notes.value = "".join(f"<div style='{MUTED_STYLE}'>{html.escape(str(note))}</div>"
                                       for note in view.get("notes") or [])
            self._show_vm(view)
            self._follow_from(str(view.get("status", NO_VM)))
        finally:
            self._busy = False
            if not self._closed:
                self.request_button.disabled = False

    @_on_kernel_loop
    def _on_release_click(self, _button: widgets.Button | None = None) -> None:
        if self._busy or self._closed:
            return
        hostname = html.escape(str(self._view.get("hostname") or "this VM"))
        self.release_question.value = (
            f"<b>Give {hostname} back?</b> Anything on it that is not saved elsewhere is lost."
        )
        self.release_feedback.value = ""
        self.release_row.children = (self.release_question, self.confirm_release_button, self.keep_button)

    @_on_kernel_loop
    def _on_keep_click(self, _button: widgets.Button | None = None) -> None:
        self.release_row.children = (self.release_button,)

    @_on_kernel_loop
    def _on_confirm_release_click(self, _button: widgets.Button | None = None) -> None:
        if self._busy or self._closed or self._client is None:
            return
        self._busy = True
        self.confirm_release_button.disabled = self.keep_button.disabled = True
        self.release_feedback.value = "Releasing…"
        if self._spawn(self._release()) is None:
            self._busy = False
            self.confirm_release_button.disabled = self.keep_button.disabled = False

    async def _release(self) -> None:
        assert self._client is not None
        client = self._client
        hostname = str(self._view.get("hostname") or "your VM")
        try:
            await _off_loop(client.release)
        except LabLinkError as exc:
            if exc.status != 404:  # 404: it was released already, which is what was asked
                self.release_feedback.value = _error_html(exc)
                return
        finally:
            self._busy = False
            if not self._closed:
                self.confirm_release_button.disabled = self.keep_button.disabled = False
        self.release_row.children = (self.release_button,)
        self.release_feedback.value = self.notes.value = ""
        self._show_vm({"status": NO_VM})
        self.feedback.value = (
            f"<div>You gave <b>{html.escape(hostname)}</b> back. To get a VM again, paste a "
            "new command.</div>"
        )
        self._follow_from(NO_VM)

    # -- what the student sees ------------------------------------------------------------

    def _show_vm(self, view: dict[str, Any]) -> None:
        if self._closed:
            return
        before = self._view
        status = str(view.get("status", NO_VM))
        self._view = view
        if status in SETTING_UP:
            seconds = float(view.get("seconds_in_status") or 0)
            if before.get("status") not in SETTING_UP or self._setting_up_since is None:
                self._setting_up_since = time.monotonic() - seconds
        else:
            self._setting_up_since = None

        if status not in HELD_STATUSES:
            if before.get("status") in HELD_STATUSES:
                lost = html.escape(str(before.get("hostname")))
                self.feedback.value = (
                    f"<div>You no longer have <b>{lost}</b>: it was released (perhaps by your "
                    "instructor). To get a VM again, paste a new command.</div>"
                )
            self.instructions.value = _steps_html("To get a VM:")
            self.request_button.description = "Request a VM"
            self.children = (self.heading, self.paste_section, self.connection_note)
            return

        hostname = html.escape(str(view.get("hostname")))
        pin = html.escape(str(view.get("pin") or ""))
        self.hostname_display.value = (
            f"<div>VM <span class='lablink-hostname-value' style='{BIG_STYLE}'>{hostname}</span></div>"
        )
        self.pin_display.value = (
            f"<div>PIN <span class='lablink-pin-value' style='{BIG_STYLE}'>{pin}</span></div>"
        )
        self._show_status_line()
        if status == VmStatus.ACTIVE.value:
            self.access_note.value = (
                f"<div>Connect: open {_link(ACCESS_URL)}, choose <b>{hostname}</b> and enter the PIN.</div>"
            )
        else:
            self.access_note.value = (
                f"<div style='{MUTED_STYLE}'>When the status says Ready, open {_link(ACCESS_URL)}, "
                f"choose <b>{hostname}</b> and enter the PIN.</div>"
            )
        parts: list[widgets.Widget] = [self.heading, self.vm_card]
        if status == VmStatus.FAILED.value or view.get("warning"):
            self.instructions.value = _steps_html(
                f"Paste a <b>fresh</b> command to set {hostname} up again (you keep it and its PIN):")
            self.request_button.description = "Send the fresh code"
            parts.append(self.paste_section)
        parts.append(self.connection_note)
        self.children = tuple(parts)

    def _show_status_line(self) -> None:
        view = self._view
        status = str(view.get("status", NO_VM))
        label = STATUS_LABELS.get(status, status)
        elapsed = ""
        if status in SETTING_UP and self._setting_up_since is not None:
            elapsed = f" ({int(time.monotonic() - self._setting_up_since)} s)"
        style = ERROR_STYLE if status == VmStatus.FAILED.value else ""
        # When ready, the access note below says what to do, with the link to click.
        message = "" if status == VmStatus.ACTIVE.value else str(view.get("message") or "")
        lines = [
            f"<div style='{style}'>Status: <b>{html.escape(label)}</b>{elapsed}"
            + (f" — {html.escape(message)}" if message else "") + "</div>"
        ]
        if view.get("error"):
            lines.append(f"<div style='{ERROR_STYLE}'>The VM said: {html.escape(str(view['error']))}</div>")
        if view.get("warning"):
            lines.append(f"<div style='{MUTED_STYLE}'>{html.escape(str(view['warning']))}</div>")
        self.status_display.value = "".join(lines)


_NO_LOOP = LabLinkError(
    None, "This panel needs a running Jupyter kernel.",
    "Create it in a notebook cell: from lablink_jupyter import StudentPanel; StudentPanel()",
)
