"""The instructor's panel: the whole fleet in a notebook, live.

`InstructorPanel()` shows the counts by status, a table of every VM that
follows the audit log's long-poll, Release and Retire for each VM (each asks
for confirmation), a box to register hostnames, a link to the CSV export and
the recent events.

It never blocks the kernel: button callbacks only schedule coroutines on the
kernel's event loop; those run each blocking request in `asyncio.to_thread`
and are the only code that changes widgets once the panel is built.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any
from urllib.parse import urlparse

import ipywidgets as widgets

from lablink_jupyter import routes

from .client import DEFAULT_TIMEOUT, LabLinkClient, LabLinkError

#: The counts the bar shows, with their captions and colours.
COUNTS = (
    ("available", "available", "#2ec27e"),
    ("assigned", "assigned", "#62a0ea"),
    ("configuring", "setting up", "#1c71d8"),
    ("active", "active", "#26a269"),
    ("failed", "failed", "#e01b24"),
    ("stale", "stale", "#e5a50a"),
)
#: Words for statuses in the table.
STATUS_WORDS = {"configuring": "setting up", "released": "tearing down"}
#: Columns of the VM table.
COLUMNS = ("VM", "status", "student", "last seen", "in status", "", "")
#: Seconds between retries after the server could not be reached, at most.
MAX_BACKOFF = 30.0


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{int(seconds)} s"
    if seconds < 5400:
        return f"{int(seconds // 60)} min"
    return f"{int(seconds // 3600)} h"


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _box(kind: str, text: str = "") -> str:
    colours = {"error": ("#c01c28", "#fdecea"), "note": ("#1a5fb4", "#eaf1fb")}
    border, background = colours[kind]
    return (f'<div style="border-left:4px solid {border};background:{background};'
            f'padding:.4rem .8rem;margin:.3rem 0">{text}</div>')


class _VmRow:
    """The widgets of one VM's row in the table."""

    def __init__(self, panel: InstructorPanel, hostname: str) -> None:
        self.hostname = hostname
        self.name = widgets.HTML(f"<code>{html.escape(hostname)}</code>")
        self.status = widgets.HTML()
        self.user = widgets.Label()
        self.seen = widgets.Label()
        self.in_status = widgets.Label()
        self.release_button = widgets.Button(description="Release", layout=widgets.Layout(width="auto"),
                                             tooltip=f"Take {hostname} back from its student")
        self.retire_button = widgets.Button(description="Retire", layout=widgets.Layout(width="auto"),
                                            tooltip=f"Take {hostname} out of the fleet")
        self.release_button.on_click(panel._callback(lambda: panel._ask("release", hostname)))
        self.retire_button.on_click(panel._callback(lambda: panel._ask("retire", hostname)))

    @property
    def cells(self) -> list[widgets.Widget]:
        """The row's widgets, in column order."""
        return [self.name, self.status, self.user, self.seen, self.in_status,
                self.release_button, self.retire_button]

    def show(self, vm: dict[str, Any]) -> None:
        """Show the VM's current state."""
        status = vm["status"]
        text = html.escape(STATUS_WORDS.get(status, status))
        if vm.get("stale"):
            text += ' <b style="color:#9c6b00">stale</b>'
        if vm.get("last_error"):
            text += f'<br><small>{html.escape(vm["last_error"])}</small>'
        self.status.value = text
        self.user.value = vm.get("user") or ""
        seen = vm.get("seconds_since_seen")
        self.seen.value = "never" if seen is None else f"{_ago(seen)} ago"
        self.in_status.value = _ago(vm.get("seconds_in_status"))
        self.release_button.disabled = not vm.get("user")
        self.retire_button.disabled = status == "retired"

    def close(self) -> None:
        """Close the row's widgets."""
        for cell in self.cells:
            cell.close()


class InstructorPanel(widgets.VBox):
    """The fleet at a glance, live: counts, every VM with Release/Retire, registration, CSV, events."""

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 wait: float = 25.0, recent_events: int = 12) -> None:
        super().__init__()
        self.wait = wait
        self.recent_events = recent_events
        #: The latest figures shown: counts by status, the VMs, the recent events.
        self.counts: dict[str, int] = {}
        self.vms: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.client: LabLinkClient | None = None
        self._poll_client: LabLinkClient | None = None
        self._rows: dict[str, _VmRow] = {}
        self._pending: tuple[str, str, bool] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._follower: asyncio.Task[None] | None = None
        self._closed = False
        self._shown = False
        self._settled = asyncio.Event()  # set once the fleet or an error has been shown
        self._problem: LabLinkError | None = None
        # One action at a time: a second click waits instead of racing the first.
        self._action_lock = asyncio.Lock()
        # The newest event id read before the fleet was last read: the long-poll waits for later ones.
        self._latest_event_id = 0

        self.title = widgets.HTML("<h3 style='margin:.2rem 0'>LabLink fleet</h3>")
        self.error_html = widgets.HTML()
        self.notice_html = widgets.HTML()
        self.count_labels = {name: widgets.Label("0", style={"font_weight": "bold", "font_size": "1.3em"})
                             for name, _, _ in COUNTS}
        chips = [
            widgets.VBox([self.count_labels[name], widgets.Label(caption)],
                         layout=widgets.Layout(border=f"2px solid {colour}", padding="0 .6em",
                                               margin="0 .4em 0 0", align_items="center"))
            for name, caption, colour in COUNTS
        ]
        self.bar_html = widgets.HTML()
        self.table = widgets.GridBox(layout=widgets.Layout(
            grid_template_columns="minmax(8em, 1.2fr) minmax(8em, 1.4fr) 1fr 7em 6em auto auto",
            grid_gap="2px 12px", align_items="center"))
        self._headers = [widgets.HTML(f"<b>{name}</b>") for name in COLUMNS]

        self.confirm_text = widgets.HTML()
        self.confirm_yes = widgets.Button(description="Yes", button_style="danger")
        self.confirm_no = widgets.Button(description="Cancel")
        self.confirm_bar = widgets.HBox([self.confirm_text, self.confirm_yes, self.confirm_no],
                                        layout=widgets.Layout(display="none", align_items="center"))
        self.confirm_yes.on_click(self._callback(self._confirm))
        self.confirm_no.on_click(self._callback(self._cancel))

        self.hostnames_box = widgets.Textarea(placeholder="lab-vm-1\nlab-vm-2",
                                              layout=widgets.Layout(width="22em", height="4.5em"))
        self.register_button = widgets.Button(description="Register", button_style="primary",
                                              tooltip="Register these hostnames; each gets a token, shown once")
        self.register_button.on_click(self._callback(self._register))
        self.tokens_html = widgets.HTML()
        self.hide_tokens_button = widgets.Button(description="Hide tokens",
                                                 layout=widgets.Layout(display="none"))
        self.hide_tokens_button.on_click(self._callback(self._hide_tokens))

        self.show_token_button = widgets.Button(description="Show enrollment token")
        self.show_token_button.on_click(self._callback(self._show_enrollment_token))
        self.rotate_token_button = widgets.Button(description="Rotate enrollment token")
        self.rotate_token_button.on_click(self._callback(lambda: self._ask("rotate", "")))
        self.enrollment_html = widgets.HTML()

        self.links_html = widgets.HTML()
        self.events_html = widgets.HTML()
        self.updated_label = widgets.Label()

        self.children = [
            self.title, self.error_html, self.notice_html,
            widgets.HBox(chips), self.bar_html, self.confirm_bar, self.table,
            widgets.HTML("<b>Register VMs</b> (one hostname a line)"),
            widgets.HBox([self.hostnames_box, self.register_button]),
            self.tokens_html, self.hide_tokens_button,
            widgets.HBox([self.show_token_button, self.rotate_token_button]), self.enrollment_html,
            self.links_html, widgets.HTML("<b>Recent events</b>"), self.events_html, self.updated_label,
        ]
        self._render_table()

        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        try:
            self.client = LabLinkClient(url, token)
            self._poll_client = LabLinkClient(self.client.address.url, self.client.address.token)
        except LabLinkError as exc:
            self._show_error(exc)
            return
        self.links_html.value = self._links()
        if self._loop is None:
            self._show_error(LabLinkError(None, "InstructorPanel needs a running event loop.",
                                          "Use it in a Jupyter notebook (its kernel runs one)."))
            return
        self._follower = self._loop.create_task(self._follow())

    # -- what a notebook may call -------------------------------------------------------

    async def refresh(self) -> None:
        """Read the fleet and the recent events now, and show them."""
        async with self._action_lock:
            await self._refresh(self._require_client())

    async def ready(self, timeout: float = 30.0) -> bool:
        """Wait (up to `timeout` s) for the first answer; whether the panel shows the fleet."""
        try:
            await asyncio.wait_for(self._settled.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return self._shown

    def close(self) -> None:
        """Stop following the fleet and close every widget of the panel."""
        if self._closed:
            return
        self._closed = True
        for task in [self._follower, *self._tasks]:
            if task is not None and not task.done():
                task.cancel()
        for client in (self.client, self._poll_client):
            if client is not None:
                client.session.close()
        for row in self._rows.values():
            row.close()
        self._rows.clear()
        for child in self._descendants():
            child.close()
        super().close()

    # -- background ------------------------------------------------------------------------

    def _callback(self, make: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[Any], None]:
        """A button callback that only schedules the coroutine `make()` on the kernel's loop."""

        def callback(_button: Any) -> None:
            loop = self._loop
            if self._closed or loop is None or self.client is None:
                return

            def start() -> None:
                if self._closed:
                    return
                task = loop.create_task(make())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

            loop.call_soon_threadsafe(start)

        return callback

    async def _refresh(self, client: LabLinkClient) -> None:
        overview, page = await asyncio.to_thread(self._read_fleet, client)
        self._show_fleet(overview, page)

    def _read_fleet(self, client: LabLinkClient) -> tuple[dict[str, Any], dict[str, Any]]:
        # Runs in a worker thread: both requests on one client, one after the other.
        overview = client.call("GET", routes.VMS)
        page = client.call("GET", routes.EVENTS, params={"limit": self.recent_events})
        return overview, page

    async def _follow(self) -> None:
        """Show the fleet, then refresh it whenever the audit log says something happened."""
        # This task has a client of its own: a requests session is not shared between threads.
        assert self._poll_client is not None
        delay = 1.0
        while not self._closed:
            try:
                await self._refresh(self._poll_client)
                await asyncio.to_thread(
                    self._poll_client.call, "GET", routes.EVENTS,
                    params={"after": self._latest_event_id, "wait": self.wait, "limit": 1},
                    timeout=DEFAULT_TIMEOUT + self.wait,
                )
                # Whether news or a quiet window's end, refresh: ages and staleness move on too.
                delay = 1.0
            except LabLinkError as exc:
                self._show_error(exc)
            except (KeyError, TypeError, ValueError) as exc:
                self._show_error(LabLinkError(None, f"The LabLink server sent an answer this panel "
                                                    f"does not understand ({type(exc).__name__}).",
                                              "Is the server running the same LabLink version?"))
            else:
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    # -- actions ---------------------------------------------------------------------------

    async def _ask(self, action: str, hostname: str) -> None:
        vm = next((vm for vm in self.vms if vm["hostname"] == hostname), None)
        holder = vm.get("user") if vm else None
        if action == "release":
            question = f"Release <b>{html.escape(hostname)}</b> from {html.escape(holder or 'its student')}? They lose the VM."
        elif action == "retire":
            question = f"Retire <b>{html.escape(hostname)}</b>? It is never handed out again until registered again."
            if holder:
                question += f" {html.escape(holder)} holds it and loses it."
        else:
            question = ("Rotate the fleet enrollment token? The old one stops enrolling new VMs "
                        "(enrolled VMs keep working).")
        self._pending = (action, hostname, bool(holder))
        self.confirm_text.value = question + "&nbsp;"
        self.confirm_yes.description = {"release": "Yes, release", "retire": "Yes, retire"}.get(action, "Yes, rotate")
        self.confirm_bar.layout.display = "flex"

    async def _cancel(self) -> None:
        self._pending = None
        self.confirm_bar.layout.display = "none"

    async def _confirm(self) -> None:
        pending, self._pending = self._pending, None
        self.confirm_bar.layout.display = "none"
        if pending is None:
            return
        async with self._action_lock:
            await self._act(*pending)

    async def _act(self, action: str, hostname: str, held: bool) -> None:
        client = self._require_client()
        try:
            if action == "release":
                answer = await asyncio.to_thread(
                    client.call, "POST", routes.VM_RELEASE.format(hostname=hostname), json={})
                self._notice(f"Released {html.escape(hostname)} from {html.escape(answer['released_from'])}.")
            elif action == "retire":
                await asyncio.to_thread(client.call, "DELETE", routes.VM_ONE.format(hostname=hostname),
                                        params={"force": 1} if held else None)
                self._notice(f"Retired {html.escape(hostname)}.")
            else:
                answer = await asyncio.to_thread(client.call, "POST", routes.ENROLLMENT_TOKEN, json={})
                self._show_enrollment(answer)
                self._notice("The enrollment token was rotated.")
            self._show_error(None)
            await self._refresh(client)
        except LabLinkError as exc:
            self._show_error(exc)

    async def _register(self) -> None:
        async with self._action_lock:
            await self._register_now()

    async def _register_now(self) -> None:
        text = self.hostnames_box.value
        if not text.strip():
            self._show_error(LabLinkError(None, "Type the hostnames to register first, one a line."))
            return
        client = self._require_client()
        try:
            answer = await asyncio.to_thread(client.call, "POST", routes.VMS, json={"hostnames": text})
        except LabLinkError as exc:
            self._show_error(exc)
            return
        rows = "".join(
            f"<tr><td><code>{html.escape(vm['hostname'])}</code></td>"
            f"<td><code>{html.escape(vm['token'])}</code></td></tr>"
            for vm in answer["vms"]
        )
        self.tokens_html.value = _box(
            "note",
            "<b>Copy these tokens now: they are not shown again.</b> Start each VM with "
            "<code>lablink-subscribe --hostname NAME</code> and <code>LABLINK_VM_TOKEN</code> set to its token."
            f"<table>{rows}</table>",
        )
        self.hide_tokens_button.layout.display = "flex"
        self.hostnames_box.value = ""
        self._show_error(None)
        self._notice(f"Registered {len(answer['vms'])} VM(s).")
        try:
            await self._refresh(client)
        except LabLinkError as exc:
            self._show_error(exc)

    async def _hide_tokens(self) -> None:
        self.tokens_html.value = ""
        self.hide_tokens_button.layout.display = "none"

    async def _show_enrollment_token(self) -> None:
        client = self._require_client()
        try:
            async with self._action_lock:
                answer = await asyncio.to_thread(client.call, "GET", routes.ENROLLMENT_TOKEN)
        except LabLinkError as exc:
            self._show_error(exc)
            return
        self._show_enrollment(answer)

    # -- showing -----------------------------------------------------------------------------

    def _show_fleet(self, overview: dict[str, Any], page: dict[str, Any]) -> None:
        self.vms = overview["vms"]
        self.counts = overview["counts"]
        self.events = page["events"]
        self._latest_event_id = int(overview["latest_event_id"])
        for name, label in self.count_labels.items():
            label.value = str(self.counts.get(name, 0))
        self.bar_html.value = self._bar()
        self._render_table()
        self.events_html.value = self._events_list()
        self.updated_label.value = (f"{self.counts.get('total', 0)} VMs; updated "
                                    f"{datetime.now().strftime('%H:%M:%S')}")
        self.error_html.value = ""
        self._shown = True
        self._settled.set()

    def _render_table(self) -> None:
        seen = set()
        cells: list[widgets.Widget] = list(self._headers)
        for vm in self.vms:
            hostname = vm["hostname"]
            seen.add(hostname)
            row = self._rows.get(hostname)
            if row is None:
                row = self._rows[hostname] = _VmRow(self, hostname)
            row.show(vm)
            cells.extend(row.cells)
        for hostname in list(self._rows):
            if hostname not in seen:
                self._rows.pop(hostname).close()
        self.table.children = cells

    def _bar(self) -> str:
        total = sum(self.counts.get(name, 0) for name, _, _ in COUNTS)
        if not total:
            return ""
        parts = "".join(
            f'<span title="{self.counts[name]} {caption}" style="flex:{self.counts[name]};background:{colour}"></span>'
            for name, caption, colour in COUNTS if self.counts.get(name)
        )
        return f'<div style="display:flex;height:10px;border-radius:4px;overflow:hidden;margin:4px 0">{parts}</div>'

    def _events_list(self) -> str:
        if not self.events:
            return "<i>Nothing has happened yet.</i>"
        items = []
        for event in self.events:
            at = (event.get("at") or "")[11:19]
            text = f"{html.escape(event['actor'])} — {html.escape(event['action'])}"
            if event.get("hostname"):
                text += f" <code>{html.escape(event['hostname'])}</code>"
            if event.get("detail"):
                text += f" ({html.escape(event['detail'])})"
            items.append(f"<li><small>{at}</small> {text}</li>")
        return f"<ol style='margin:0;padding-left:1.4em'>{''.join(items)}</ol>"

    def _links(self) -> str:
        assert self.client is not None
        address = self.client.address
        base = address.url
        if address.source in ("parent server", "JupyterHub") or _is_loopback(address.url):
            # The kernel's address is not the browser's (a loopback URL, a proxied server): a
            # path works whatever host the browser used, with the login cookie it has there.
            base = urlparse(address.url).path
        csv_url = html.escape(base + routes.VMS_CSV, quote=True)
        page_url = html.escape(base + routes.ADMIN_PAGE, quote=True)
        return (f'<a href="{csv_url}" download target="_blank">Download the CSV</a> (every VM and every '
                f'assignment) · <a href="{page_url}" target="_blank">open the admin page</a>')

    def _show_enrollment(self, answer: dict[str, Any]) -> None:
        where = ("set in the configuration (c.LabLink.enrollment_token)" if answer.get("source") == "config"
                 else "kept in the database")
        self.enrollment_html.value = (f"Fleet enrollment token ({where}): "
                                      f"<code>{html.escape(answer['token'])}</code>")
        self.rotate_token_button.disabled = not answer.get("rotatable", False)

    def _notice(self, text: str) -> None:
        self.notice_html.value = _box("note", text)

    @property
    def problem(self) -> str | None:
        """What the panel shows as wrong, as plain text (for notebooks run without a browser)."""
        if self._problem is None:
            return None
        return " ".join(part for part in (self._problem.error, self._problem.hint) if part)

    def _show_error(self, exc: LabLinkError | None) -> None:
        self._problem = exc
        if exc is None:
            self.error_html.value = ""
            return
        text = f"<b>{html.escape(exc.error)}</b>"
        if exc.hint:
            text += f"<br>{html.escape(exc.hint)}"
        self.error_html.value = _box("error", text)
        self._settled.set()

    def _require_client(self) -> LabLinkClient:
        if self.client is None:
            raise LabLinkError(None, "The panel has no connection to LabLink.")
        return self.client

    def _descendants(self) -> list[widgets.Widget]:
        found: list[widgets.Widget] = []
        stack = list(self.children) + list(self._headers)
        while stack:
            widget = stack.pop()
            found.append(widget)
            stack.extend(getattr(widget, "children", ()))
        return found
