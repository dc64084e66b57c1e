"""What instructors ask of LabLink: the fleet overview, registering, releasing, retiring, the audit log.

A `FleetAdmin` sits on the process's allocator and shares its database and
listener; like the allocator it keeps no state of its own.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from .allocator import Allocator, ClientGone, new_token, normalize_hostname
from .db import token_digest
from .listener import Subscription
from .statuses import VmStatus

#: The channel the events trigger notifies (sql/002_instructor.sql).
EVENTS_CHANNEL = "lablink_events"

#: What the counts bar shows, in order; "stale" takes VMs of any status that stopped polling.
COUNTED = ("available", "assigned", "configuring", "active", "failed", "stale",
           "provisioning", "released", "retired")

#: Most hostnames one registration takes.
MAX_REGISTER = 500

#: Columns of the CSV export, one row a VM, then one row an assignment.
CSV_COLUMNS = ("record", "hostname", "status", "user", "from", "to", "seconds_to_active", "codes",
               "failures", "ended_as", "last_seen_at", "stale", "last_error")


def parse_hostnames(value: object) -> list[str]:
    """Hostnames from a JSON list, or from text separated by spaces, commas or lines; ValueError if bad."""
    if isinstance(value, str):
        items: list[object] = [part for part in value.replace(",", " ").split()]
    elif isinstance(value, list):
        items = value
    else:
        raise ValueError("give 'hostnames' as a list of hostnames")
    hostnames: list[str] = []
    refused: list[str] = []  # every bad one at once, so that one fix is enough
    for item in items:
        try:
            hostname = normalize_hostname(item)
        except ValueError as exc:
            shown = item if isinstance(item, str) else type(item).__name__
            refused.append(f"{str(shown)[:80]!r}: {exc}")
            continue
        if hostname not in hostnames:
            hostnames.append(hostname)
    if refused:
        shown_refusals = "; ".join(refused[:10])
        more = f" (and {len(refused) - 10} more)" if len(refused) > 10 else ""
        raise ValueError(shown_refusals + more)
    if not hostnames:
        raise ValueError("no hostnames given")
    if len(hostnames) > MAX_REGISTER:
        raise ValueError(f"at most {MAX_REGISTER} hostnames at a time")
    return hostnames


def iso(moment: datetime | None) -> str | None:
    """A timestamp as ISO 8601, or None."""
    return None if moment is None else moment.isoformat()


def vm_summary(row: dict[str, Any]) -> dict[str, Any]:
    """What an instructor sees of one VM (never its code or PIN)."""
    return {
        "hostname": row["hostname"],
        "status": row["status"],
        "user": row["assigned_user"],
        "stale": bool(row["stale"]),
        "last_seen_at": iso(row["last_seen_at"]),
        "seconds_since_seen": _rounded(row["seconds_since_seen"]),
        "seconds_in_status": _rounded(row["seconds_in_status"]),
        "status_changed_at": iso(row["status_changed_at"]),
        "assigned_at": iso(row["assigned_at"]) if row["assigned_user"] else None,
        "active_at": iso(row["active_at"]) if row["assigned_user"] else None,
        "created_at": iso(row["created_at"]),
        "last_error": row["last_error"] if row["status"] == VmStatus.FAILED else None,
    }


def count_vms(vms: Iterable[dict[str, Any]]) -> dict[str, int]:
    """VMs by what the counts bar shows: each VM counted once, stale ones as stale."""
    counts = dict.fromkeys(COUNTED, 0)
    total = 0
    for vm in vms:
        total += 1
        counts["stale" if vm["stale"] else vm["status"]] += 1
    counts["total"] = total
    return counts


def event_view(row: dict[str, Any]) -> dict[str, Any]:
    """One audit event as the API shows it."""
    return {
        "id": row["id"],
        "at": iso(row["at"]),
        "actor": row["actor"],
        "action": row["action"],
        "hostname": row["hostname"],
        "detail": row["detail"],
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _cell(value: Any) -> str:
    """A CSV cell; text a spreadsheet would run as a formula is quoted with a leading apostrophe."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


class FleetAdmin:
    """The instructor's operations on the fleet."""

    def __init__(self, allocator: Allocator) -> None:
        self.allocator = allocator

    @property
    def stale_after(self) -> float:
        """Seconds without a poll after which a VM is stale."""
        return self.allocator.settings.stale_after

    async def overview(self) -> dict[str, Any]:
        """Every VM, the counts by status, and the newest event id (to long-poll from)."""
        # The newest event first: a change committed after this read wakes a long-poll from it.
        _events, latest_id = await self.allocator.db.events_page(0)
        rows = await self.allocator.db.fleet(self.stale_after)
        vms = [vm_summary(row) for row in rows]
        return {
            "vms": vms,
            "counts": count_vms(vms),
            "stale_after": self.stale_after,
            "latest_event_id": latest_id,
        }

    async def register(self, hostnames: list[str], actor: str) -> list[dict[str, Any]]:
        """Register VMs as provisioning; each with its own token, returned only now."""
        tokens = {hostname: new_token() for hostname in hostnames}
        rows = await self.allocator.db.register_vms(
            [(hostname, token_digest(tokens[hostname])) for hostname in hostnames], actor
        )
        return [
            {"hostname": row["hostname"], "status": row["status"], "token": tokens[row["hostname"]],
             "registered_again": not row["created"]}
            for row in rows
        ]

    async def release(self, hostname: str, actor: str) -> dict[str, Any]:
        """Let go of the VM for whoever holds it."""
        row = await self.allocator.db.release_vm(hostname, actor)
        return {"hostname": row["hostname"], "status": row["status"], "released_from": row["held_by"]}

    async def retire(self, hostname: str, actor: str, force: bool) -> dict[str, Any]:
        """Take the VM out of the fleet (a held VM only with `force`)."""
        row = await self.allocator.db.retire_vm(hostname, actor, force)
        return {"hostname": row["hostname"], "status": row["status"], "released_from": row["held_by"]}

    async def events(
        self,
        *,
        limit: int = 50,
        before: int | None = None,
        after: int | None = None,
        hostname: str | None = None,
        wait: float = 0.0,
        client_gone: ClientGone | None = None,
    ) -> dict[str, Any]:
        """A page of the audit log, newest first; with `wait`, once an event newer than `after` exists.

        Without `after`, waiting means waiting for anything newer than what
        exists when the call starts. LISTEN comes before the read, so an event
        committed at any moment is either read or wakes the wait.
        """
        db = self.allocator.db
        if wait <= 0:
            return self._page(*await db.events_page(limit + 1, before=before, after=after, hostname=hostname),
                              limit)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait, self.allocator.settings.poll_timeout)
        client_gone = client_gone or ClientGone()
        subscription: Subscription = await self.allocator.listener.subscribe(EVENTS_CHANNEL)
        client_gone.watch(subscription)
        try:
            if after is None:
                _none, after = await db.events_page(0)
            while True:
                rows, latest_id = await db.events_page(limit + 1, before=before, after=after,
                                                       hostname=hostname)
                remaining = deadline - loop.time()
                if rows or remaining <= 0 or client_gone.gone:
                    return self._page(rows, latest_id, limit)
                if not subscription.listening:
                    remaining = min(remaining, self.allocator.settings.recheck_interval)
                await subscription.wait(remaining)
        finally:
            client_gone.unwatch(subscription)
            subscription.close()

    @staticmethod
    def _page(rows: list[dict[str, Any]], latest_id: int, limit: int) -> dict[str, Any]:
        more = len(rows) > limit
        rows = rows[:limit]
        return {
            "events": [event_view(row) for row in rows],
            "latest_id": latest_id,
            "next_before": rows[-1]["id"] if more and rows else None,
        }

    async def csv_text(self) -> str:
        """The fleet and every assignment ever made, as CSV."""
        rows = await self.allocator.db.fleet(self.stale_after)
        history = await self.allocator.db.assignment_history()
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            held = row["assigned_user"] is not None
            writer.writerow(_cell(v) for v in (
                "vm", row["hostname"], row["status"], row["assigned_user"],
                row["assigned_at"] if held else None, None,
                (row["active_at"] - row["assigned_at"]).total_seconds()
                if held and row["active_at"] and row["assigned_at"] else None,
                None, None, None, row["last_seen_at"], bool(row["stale"]),
                row["last_error"] if row["status"] == VmStatus.FAILED else None,
            ))
        for item in history:
            writer.writerow(_cell(v) for v in (
                "assignment", item["hostname"], "current" if item["ended_at"] is None else "ended",
                item["username"], item["assigned_at"], item["ended_at"], item["seconds_to_active"],
                item["codes"], item["failures"], item["ended_as"], None, None, None,
            ))
        return out.getvalue()

    async def enrollment_token(self) -> dict[str, Any]:
        """The fleet enrollment token in effect, and whether it can be rotated here."""
        token = await self.allocator.current_enrollment_token()
        configured = self.allocator.enrollment_token_configured
        return {"token": token, "source": "config" if configured else "database", "rotatable": not configured}

    async def rotate_enrollment_token(self, actor: str) -> dict[str, Any]:
        """A new fleet enrollment token (stored in the database; the old one stops working)."""
        token = await self.allocator.rotate_enrollment_token(actor)
        return {"token": token, "source": "database", "rotatable": True}
