"""The design LabLink replaces, rebuilt minimally for comparison: one thread and one connection per waiter.

A threaded WSGI server (the standard library's wsgiref) whose `vm_startup`
handler opens its own psycopg connection, LISTENs on the VM's channel, reads
the row and blocks in `select()` on that connection until a notification or
the poll window ends. Students' requests open a connection of their own too.
It runs on LabLink's schema (sql/001_vms.sql: the same trigger, the same
`vm_updates_<id>` channels) and answers on LabLink's paths, so the benchmark
drives both with the same simulated VMs and students. Not part of LabLink.
"""

from __future__ import annotations

import argparse
import hmac
import json
import secrets
import select
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from lablink_jupyter import crd, routes
from lablink_jupyter.db import code_digest, token_digest

APPLICATION_NAME = "lablink-baseline"

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """wsgiref with a thread per connection, as a threaded Flask/WSGI deployment runs."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog Tornado uses too


class QuietHandler(WSGIRequestHandler):
    """No access log on stderr."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return None


class HttpError(Exception):
    """An answer other than 200."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


class Baseline:
    """The allocator: settings, and a count of the waiters blocked right now."""

    def __init__(self, database_url: str, enrollment_token: str, poll_timeout: float, stale_after: float) -> None:
        self.database_url = database_url
        self.enrollment_token = enrollment_token
        self.poll_timeout = poll_timeout
        self.stale_after = stale_after
        self._lock = threading.Lock()
        self.waiters = 0

    def connect(self, autocommit: bool = True) -> psycopg.Connection[dict[str, Any]]:
        """A new connection, as the old design made for every request."""
        return psycopg.connect(self.database_url, autocommit=autocommit, row_factory=dict_row,
                               application_name=APPLICATION_NAME)

    # -- the WSGI application ---------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "").lstrip("/")
        try:
            if environ["REQUEST_METHOD"] == "GET" and path == routes.HEALTH:
                status, body = 200, {"waiters": self.waiters, "listener": "listening"}
            elif environ["REQUEST_METHOD"] != "POST":
                raise HttpError(405, "method not allowed")
            else:
                length = int(environ.get("CONTENT_LENGTH") or 0)
                fields = json.loads(environ["wsgi.input"].read(length) or b"{}")
                token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")[2].strip()
                handler = {
                    routes.VM_ENROLL: self.enroll,
                    routes.VM_STARTUP: self.vm_startup,
                    routes.VM_STATUS: self.vm_status,
                    routes.REQUEST_VM: self.request_vm,
                }.get(path)
                if handler is None:
                    raise HttpError(404, "no such route")
                status, body = handler(fields, token)
        except HttpError as exc:
            status, body = exc.status, {"error": exc.error}
        except Exception as exc:  # what a WSGI server turns into 500: too many clients, select() limits
            status, body = 500, {"error": f"{type(exc).__name__}: {str(exc).strip()[:200]}"}
        data = json.dumps(body, default=str).encode()
        start_response(f"{status} {'OK' if status < 400 else 'Error'}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    # -- VM side -------------------------------------------------------------------------

    def enroll(self, fields: dict[str, Any], token: str) -> tuple[int, dict[str, Any]]:
        """Create the VM row (or rotate its token)."""
        if not hmac.compare_digest(token.encode(), self.enrollment_token.encode()):
            raise HttpError(401, "not the fleet token")
        hostname = str(fields["hostname"]).lower()
        vm_token = secrets.token_urlsafe(32)
        with self.connect() as conn:
            conn.execute(
                "INSERT INTO vms (hostname, token_hash) VALUES (%s, %s)"
                " ON CONFLICT (hostname) DO UPDATE SET token_hash = EXCLUDED.token_hash",
                (hostname, token_digest(vm_token)),
            )
        return 201, {"hostname": hostname, "token": vm_token}

    def _authenticate(self, conn: psycopg.Connection[dict[str, Any]], fields: dict[str, Any],
                      token: str) -> dict[str, Any]:
        row = conn.execute("SELECT id, hostname, token_hash FROM vms WHERE hostname = %s",
                           (str(fields.get("hostname", "")).lower(),)).fetchone()
        expected = row["token_hash"] if row else "-" * 64
        if row is None or not hmac.compare_digest(token_digest(token).encode(), expected.encode()):
            raise HttpError(401, "bad token")
        return row

    def vm_startup(self, fields: dict[str, Any], token: str) -> tuple[int, dict[str, Any]]:
        """The long-poll: this thread and this connection wait for this VM only."""
        with self.connect() as conn:
            vm = self._authenticate(conn, fields, token)
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(f"vm_updates_{vm['id']}")))
            deadline = time.monotonic() + self.poll_timeout
            with self._lock:
                self.waiters += 1
            try:
                while True:
                    row = self._poll(conn, vm["id"])
                    if row["status"] in ("configuring", "assigned") and row["crd_code"]:
                        return 200, {"status": "assigned", "hostname": row["hostname"], "code": row["crd_code"],
                                     "command": crd.linux_command(row["crd_code"], row["hostname"]),
                                     "pin": row["pin"], "work_id": row["work_id"]}
                    if row["status"] == "released":
                        return 200, {"status": "released"}
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return 200, {"status": "waiting"}
                    # The old design's listen_for_notifications(): select() on the connection's socket.
                    readable, _, _ = select.select([conn.fileno()], [], [], remaining)
                    if readable:
                        for _ in conn.notifies(timeout=0):
                            pass
            finally:
                with self._lock:
                    self.waiters -= 1

    def _poll(self, conn: psycopg.Connection[dict[str, Any]], vm_id: int) -> dict[str, Any]:
        row = conn.execute(
            "UPDATE vms SET last_seen_at = now(),"
            " status = CASE status WHEN 'provisioning' THEN 'available'"
            "                      WHEN 'assigned' THEN 'configuring' ELSE status END,"
            " status_changed_at = CASE WHEN status IN ('provisioning', 'assigned')"
            "                          THEN now() ELSE status_changed_at END,"
            " delivered_at = CASE WHEN status = 'assigned' THEN now() ELSE delivered_at END"
            " WHERE id = %s RETURNING id, hostname, status, crd_code, pin, work_id",
            (vm_id,),
        ).fetchone()
        assert row is not None
        return row

    def vm_status(self, fields: dict[str, Any], token: str) -> tuple[int, dict[str, Any]]:
        """The VM reports CRD up."""
        with self.connect() as conn:
            vm = self._authenticate(conn, fields, token)
            row = conn.execute(
                "UPDATE vms SET status = %s, status_changed_at = now(), active_at = now(), crd_code = NULL"
                " WHERE id = %s AND status IN ('assigned', 'configuring') RETURNING hostname, status",
                (str(fields.get("status")), vm["id"]),
            ).fetchone()
        if row is None:
            raise HttpError(409, "report no longer applies")
        return 200, row

    # -- student side -------------------------------------------------------------------

    def request_vm(self, fields: dict[str, Any], _token: str) -> tuple[int, dict[str, Any]]:
        """Give the student (by email) a free VM: the same atomic pick as LabLink."""
        student = str(fields["email"]).strip().lower()
        code = crd.parse_crd_command(str(fields["crd_command"])).code
        pin = "".join(secrets.choice("0123456789") for _ in range(6))
        with self.connect(autocommit=False) as conn:
            held = conn.execute("SELECT hostname, pin, status FROM vms WHERE assigned_user = %s",
                                (student,)).fetchone()
            if held is not None:
                return 200, held
            row = conn.execute(
                "WITH pick AS ("
                "  SELECT id FROM vms WHERE status = 'available'"
                "    AND last_seen_at > now() - make_interval(secs => %(stale_after)s)"
                "  ORDER BY last_seen_at DESC LIMIT 1 FOR UPDATE SKIP LOCKED)"
                " UPDATE vms SET status = 'assigned', status_changed_at = now(),"
                "  assigned_user = %(user)s, crd_code = %(code)s, code_digest = %(digest)s,"
                "  pin = %(pin)s, work_id = vms.work_id + 1, assigned_at = now(), code_received_at = now()"
                " FROM pick WHERE vms.id = pick.id RETURNING vms.hostname, vms.pin, vms.status",
                {"stale_after": self.stale_after, "user": student, "code": code,
                 "digest": code_digest(code), "pin": pin},
            ).fetchone()
        if row is None:
            raise HttpError(503, "No VM is free right now.")
        return 200, row


def main() -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--enrollment-token", required=True)
    parser.add_argument("--poll-timeout", type=float, default=45.0)
    parser.add_argument("--stale-after", type=float, default=150.0)
    args = parser.parse_args()
    app = Baseline(args.database_url, args.enrollment_token, args.poll_timeout, args.stale_after)
    with make_server("127.0.0.1", args.port, app, server_class=ThreadingWSGIServer,
                     handler_class=QuietHandler) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
