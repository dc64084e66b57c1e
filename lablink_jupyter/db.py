"""Every query LabLink makes, over a small async connection pool.

The schema lives in sql/; this module only runs statements against it. Each
state change and its audit event are written in one transaction, so nothing is
half-written.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .statuses import VmStatus

#: How pooled connections show in pg_stat_activity.
APPLICATION_NAME = "lablink-pool"

#: A pooled connection in use less than this many seconds ago is handed out as is; one idle
#: longer is first checked with a round trip (it may have died with the server meanwhile).
TRUSTED_AFTER_USE = 1.0

#: Key of the advisory lock that serialises migrations across allocator processes.
MIGRATION_LOCK_KEY = 0x4C41424C494E4B  # "LABLINK"

#: First key of the per-student advisory locks (the second is a hash of the username).
USER_LOCK_SPACE = 0x4C4C

#: Columns a student or an instructor may see (never the code or the token hash).
_PUBLIC = (
    "id", "hostname", "status", "assigned_user", "pin", "work_id", "last_error", "last_seen_at",
    "created_at", "status_changed_at", "assigned_at", "code_received_at", "delivered_at",
    "active_at", "failed_at", "released_at", "retired_at",
)
PUBLIC_COLUMNS = ", ".join(_PUBLIC)
PUBLIC_COLUMNS_OF_VMS = ", ".join(f"vms.{c}" for c in _PUBLIC)

#: Whether a VM was seen within stale_after seconds.
_SEEN = "coalesce(last_seen_at > now() - make_interval(secs => %(stale_after)s), false)"

#: Whether a VM is stale: expected to poll but not seen for stale_after seconds.
_STALE = f"(status NOT IN ('provisioning', 'retired') AND NOT {_SEEN})"

#: The order free VMs are handed out in: VMs whose poll is open or just answered first, one
#: whose last poll closed unanswered (it died, or is restarting) only when no other is free;
#: then the most recently seen. The index vms_pick (sql/005_pick_index.sql) is this order, so
#: the pick reads one index entry instead of sorting every free VM: keep the two identical.
_PICK_ORDER = (
    "(disconnected_at IS NOT NULL AND disconnected_at >= last_seen_at), last_seen_at DESC"
)


#: Give a student a free VM, record the code as used and log it, in one statement. FOR UPDATE
#: SKIP LOCKED: two requests never claim the same VM. Nothing is assigned to a student who
#: already holds a VM, nor with a code used before. The student's advisory lock is taken first
#: (a one-time subquery) and held to the commit, so a second request of theirs (see
#: _assign_in) waits for this one and then finds its VM.
_ASSIGN_FREE_VM = (
    "WITH pick AS ("
    "  SELECT id FROM vms"
    "  WHERE (SELECT true FROM pg_advisory_xact_lock(%(lock_space)s, hashtext(%(user)s)))"
    "    AND status = 'available'"
    f"    AND {_SEEN}"
    "    AND NOT EXISTS (SELECT 1 FROM vms AS held WHERE held.assigned_user = %(user)s)"
    f"  ORDER BY {_PICK_ORDER}"
    "  LIMIT 1"
    "  FOR UPDATE OF vms SKIP LOCKED),"
    " used AS ("
    "  INSERT INTO used_codes (digest) SELECT %(digest)s FROM pick"
    "  ON CONFLICT DO NOTHING RETURNING digest),"
    " assigned AS ("
    "  UPDATE vms SET status = 'assigned', status_changed_at = now(),"
    "   assigned_user = %(user)s, crd_code = %(code)s, code_digest = %(digest)s,"
    "   pin = %(pin)s, work_id = vms.work_id + 1, assigned_at = now(),"
    "   code_received_at = now(), delivered_at = NULL, active_at = NULL,"
    "   failed_at = NULL, released_at = NULL, last_error = NULL"
    f"  FROM pick, used WHERE vms.id = pick.id RETURNING {PUBLIC_COLUMNS_OF_VMS}),"
    " logged AS ("
    "  INSERT INTO events (actor, action, vm_id, hostname)"
    "  SELECT %(user)s, 'assigned', id, hostname FROM assigned)"
    " SELECT * FROM assigned"
)


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached right now; the caller should answer 503."""


class NoVmFree(Exception):
    """Every VM is taken, stale or not yet booted."""


class CodeAlreadyUsed(Exception):
    """The pasted code was handed to a VM before; Google's codes work once."""


class HeldByAnother(Exception):
    """The student holds a VM, and this request could not show it comes from them."""


class VmNotFound(Exception):
    """No VM has that hostname."""


class VmRetired(Exception):
    """The VM was retired by an instructor."""


class VmHeld(Exception):
    """The VM is held by a student (`user`), so retiring it needs confirmation."""

    def __init__(self, hostname: str, user: str) -> None:
        super().__init__(hostname)
        self.hostname = hostname
        self.user = user


class VmNotHeld(Exception):
    """No student holds the VM, so there is nothing to release."""

    def __init__(self, hostname: str, status: str) -> None:
        super().__init__(hostname)
        self.hostname = hostname
        self.status = status


class VmsAlreadyRegistered(Exception):
    """Some of the hostnames to register are VMs already in use (`hostnames`)."""

    def __init__(self, hostnames: list[str]) -> None:
        super().__init__(", ".join(hostnames))
        self.hostnames = hostnames


@dataclass(frozen=True)
class Assignment:
    """The outcome of a student's request: their VM, and what happened to it."""

    vm: dict[str, Any]
    # "assigned" (a new VM), "rearmed" (a new code for the held VM), "unchanged" (the same
    # code again), or "moved" (the held VM stopped responding; this is another)
    outcome: str
    moved_from: str | None = None


def code_digest(code: str) -> str:
    """The digest by which a code is recognised later without keeping it."""
    return hashlib.sha256(code.encode()).hexdigest()


def token_digest(token: str) -> str:
    """The digest stored for a VM token (tokens are long random strings, so a plain hash suffices)."""
    return hashlib.sha256(token.encode()).hexdigest()


def migrations_dir() -> Path:
    """Where the numbered .sql files are: inside the installed package, or sql/ in a checkout."""
    packaged = resources.files("lablink_jupyter").joinpath("sql")
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "sql"


def _unavailable(exc: Exception) -> DatabaseUnavailable:
    return DatabaseUnavailable(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}")


class Database:
    """The allocator's view of PostgreSQL: a pool and the queries that use it."""

    def __init__(
        self,
        conninfo: str,
        *,
        pool_size: int = 2,
        connect_timeout: float = 5.0,
        log: logging.Logger | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.log = log or logging.getLogger(__name__)
        self.connect_timeout = connect_timeout
        self._last_used: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        #: Held around queries that only keep a VM waiting (a poll's token check and first read):
        #: they take at most this share of the pool and queue here, without the pool's time limit,
        #: so a herd of polls neither fails for waiting nor stands between a student and a VM.
        self.background = asyncio.Semaphore(max(1, pool_size - 1))
        self.pool = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "row_factory": dict_row, "application_name": APPLICATION_NAME},
            open=False,
            timeout=connect_timeout,
            # A connection that died with the server is found and replaced before use.
            check=self._check_if_idle,
            reconnect_timeout=0,  # keep trying to reconnect for as long as the process lives
        )

    async def _check_if_idle(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Check a connection before use unless it was just in use (under load, no extra round trips)."""
        if time.monotonic() - self._last_used.get(conn, float("-inf")) > TRUSTED_AFTER_USE:
            await AsyncConnectionPool.check_connection(conn)

    async def open(self) -> None:
        """Open the pool, waiting until one connection works."""
        await self.pool.open(wait=True, timeout=self.connect_timeout * 6)

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.pool.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[dict[str, Any]]]:
        """A pooled connection; connection failures become DatabaseUnavailable."""
        try:
            async with self.pool.connection() as conn:
                try:
                    yield conn
                finally:
                    self._last_used[conn] = time.monotonic()
        except (PoolTimeout, psycopg.OperationalError) as exc:
            raise _unavailable(exc) from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[psycopg.AsyncConnection[dict[str, Any]]]:
        """A pooled connection inside one transaction."""
        async with self.connection() as conn:
            try:
                async with conn.transaction():
                    yield conn
            except psycopg.OperationalError as exc:
                raise _unavailable(exc) from exc

    # -- schema -----------------------------------------------------------------

    async def migrate(self) -> list[str]:
        """Apply the numbered migrations not applied yet; safe to run from many processes at once."""
        applied: list[str] = []
        async with await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, connect_timeout=int(self.connect_timeout)
        ) as conn:
            await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS lablink_migrations ("
                    " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                cur = await conn.execute("SELECT name FROM lablink_migrations")
                done = {row[0] for row in await cur.fetchall()}
                for path in sorted(migrations_dir().glob("[0-9]*.sql")):
                    if path.name in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(path.read_text())  # type: ignore[arg-type]
                        await conn.execute(
                            "INSERT INTO lablink_migrations (name) VALUES (%s)", (path.name,)
                        )
                    applied.append(path.name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        return applied

    async def ping(self) -> None:
        """Raise DatabaseUnavailable unless a query goes through."""
        async with self.connection() as conn:
            try:
                await conn.execute("SELECT 1")
            except psycopg.OperationalError as exc:
                raise _unavailable(exc) from exc

    # -- fleet settings -------------------------------------------------------------

    async def get_or_create_setting(self, name: str, make_value: str) -> str:
        """The shared setting `name`, storing `make_value` if none is stored yet."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO fleet_settings (name, value) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING value",
                (name, make_value),
            )
            row = await cur.fetchone()
            assert row is not None
            return str(row["value"])

    # -- VM side --------------------------------------------------------------------

    async def enroll_vm(self, hostname: str, token_hash: str) -> dict[str, Any]:
        """Create the VM (as provisioning) or rotate its token; refuse a retired VM."""
        async with self.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO vms (hostname, token_hash) VALUES (%s, %s)"
                " ON CONFLICT (hostname) DO UPDATE SET token_hash = EXCLUDED.token_hash"
                " WHERE vms.status <> 'retired'"
                " RETURNING id, hostname, status, (xmax = 0) AS created",
                (hostname, token_hash),
            )
            row = await cur.fetchone()
            if row is None:
                raise VmRetired(hostname)
            await self._event(
                conn, f"vm:{hostname}", "enrolled" if row["created"] else "token rotated", row["id"], hostname
            )
            return row

    async def vm_credentials(self, hostname: str) -> dict[str, Any] | None:
        """The id, status and token hash of a VM, to authenticate it."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT id, hostname, status, token_hash FROM vms WHERE hostname = %s", (hostname,)
            )
            return await cur.fetchone()

    async def poll_vm(self, vm_id: int, token_hash: str | None = None) -> dict[str, Any] | None:
        """Record that the VM polled and collect its work, in one statement.

        A provisioning VM becomes available; work waiting for it (assigned)
        moves to configuring and is returned with the code. Work already
        delivered (configuring) is returned again: the earlier answer may have
        gone into a dead socket, and only the VM's report ends it. With
        `token_hash`, nothing happens (None) unless it is the VM's: the poll's
        token check and its first read are one round trip.
        """
        async with self.connection() as conn:
            # One statement: the state change and its audit event commit together.
            cur = await conn.execute(
                "WITH before AS (SELECT id, status FROM vms WHERE id = %(id)s"
                "  AND (%(token_hash)s::text IS NULL OR token_hash = %(token_hash)s) FOR UPDATE),"
                " polled AS ("
                "  UPDATE vms SET last_seen_at = now(),"
                "   status = CASE vms.status WHEN 'provisioning' THEN 'available'"
                "                           WHEN 'assigned' THEN 'configuring' ELSE vms.status END,"
                "   status_changed_at = CASE WHEN vms.status IN ('provisioning', 'assigned')"
                "                            THEN now() ELSE vms.status_changed_at END,"
                "   delivered_at = CASE WHEN vms.status = 'assigned' THEN now() ELSE vms.delivered_at END"
                "  FROM before WHERE vms.id = before.id"
                "  RETURNING vms.id, vms.hostname, vms.status, vms.crd_code, vms.pin, vms.work_id,"
                "   vms.code_received_at, vms.last_seen_at, before.status AS previous_status,"
                "   extract(epoch FROM clock_timestamp() - vms.code_received_at)::float8"
                "    AS seconds_since_code),"
                " logged AS ("
                "  INSERT INTO events (actor, action, vm_id, hostname)"
                "  SELECT 'vm:' || hostname,"
                "   CASE previous_status WHEN 'provisioning' THEN 'online'"
                "                        WHEN 'assigned' THEN 'delivered' ELSE 'delivered again' END,"
                "   id, hostname"
                "  FROM polled WHERE previous_status IN ('provisioning', 'assigned', 'configuring'))"
                " SELECT * FROM polled",
                {"id": vm_id, "token_hash": token_hash},
            )
            return await cur.fetchone()

    async def note_disconnect(self, vm_id: int, seen_at: datetime) -> None:
        """The VM's poll closed unanswered; unless it has polled again since `seen_at`."""
        async with self.connection() as conn:
            await conn.execute(
                "UPDATE vms SET disconnected_at = now() WHERE id = %s AND last_seen_at = %s",
                (vm_id, seen_at),
            )

    async def report_vm_status(
        self, vm_id: int, status: VmStatus, message: str | None, work_id: int | None
    ) -> dict[str, Any] | None:
        """Apply the VM's own report; None if it no longer applies (stale work, released VM).

        One statement, its audit event included: atomic without a transaction around it.
        """
        if status is VmStatus.AVAILABLE:
            # Teardown finished: only a released VM returns to the pool.
            change = sql.SQL(
                "UPDATE vms SET status = 'available', status_changed_at = now(), code_digest = NULL"
                " WHERE id = %(id)s AND status = 'released'"
            )
            action = "torn down"
        else:
            timestamp = sql.Identifier("active_at" if status is VmStatus.ACTIVE else "failed_at")
            change = sql.SQL(
                "UPDATE vms SET status = %(status)s, status_changed_at = now(), {ts} = now(),"
                " crd_code = NULL, last_error = %(message)s"
                " WHERE id = %(id)s AND status IN ('assigned', 'configuring')"
                " AND (%(work_id)s::bigint IS NULL OR work_id = %(work_id)s)"
                " AND (%(work_id)s::bigint IS NOT NULL OR status = 'configuring')"
            ).format(ts=timestamp)
            action = status.value
        query = sql.SQL(
            "WITH changed AS ({change} RETURNING {columns}),"
            " logged AS ("
            "  INSERT INTO events (actor, action, vm_id, hostname, detail)"
            "  SELECT 'vm:' || hostname, %(action)s, id, hostname, %(detail)s FROM changed)"
            " SELECT * FROM changed"
        ).format(change=change, columns=sql.SQL(PUBLIC_COLUMNS))
        detail = message if status is VmStatus.FAILED else None
        async with self.connection() as conn:
            cur = await conn.execute(query, {
                "status": status.value, "message": detail, "id": vm_id, "work_id": work_id,
                "action": action, "detail": detail,
            })
            return await cur.fetchone()

    # -- student side -----------------------------------------------------------------

    async def assign_vm(
        self, user: str, code: str, pin: str, stale_after: float, *, may_use_held: bool = True
    ) -> Assignment:
        """Give `user` a VM with this code, or re-arm the VM they hold.

        With `may_use_held` false, a student who holds a VM gets HeldByAnother instead of
        it (the open form, where anyone can type anyone's email), unless this is the code
        their VM was given.

        The pick is one statement with FOR UPDATE SKIP LOCKED, so two requests
        never claim the same VM; the partial unique index on assigned_user
        makes a second VM for the same student impossible even across
        allocator processes.
        """
        digest = code_digest(code)
        for _attempt in range(3):
            try:
                # Most requests are a student's first: one statement, one round trip. Only a
                # student who holds a VM (or finds none free) needs the transaction below.
                async with self.connection() as conn:
                    vm = await self._assign_free_vm(conn, user, code, digest, pin, stale_after)
                if vm is not None:
                    return Assignment(vm, "assigned")
                async with self.transaction() as conn:
                    return await self._assign_in(conn, user, code, digest, pin, stale_after, may_use_held)
            except errors.UniqueViolation as exc:
                constraint = exc.diag.constraint_name
                if constraint == "vms_one_per_code":
                    raise CodeAlreadyUsed() from None
                if constraint != "vms_one_per_user":
                    raise
                # The same student asked twice at once and the other request won: retry, which
                # now finds their VM.
                continue
        raise NoVmFree()

    async def _assign_in(
        self,
        conn: psycopg.AsyncConnection[dict[str, Any]],
        user: str,
        code: str,
        digest: str,
        pin: str,
        stale_after: float,
        may_use_held: bool,
    ) -> Assignment:
        # Requests of one student queue behind each other (a double click, two tabs): the
        # second then finds the VM the first got, instead of racing it for the last free one.
        await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (USER_LOCK_SPACE, user))
        cur = await conn.execute(
            f"SELECT {PUBLIC_COLUMNS}, code_digest, {_SEEN} AS live"
            " FROM vms WHERE assigned_user = %(user)s FOR UPDATE",
            {"stale_after": stale_after, "user": user},
        )
        held = await cur.fetchone()
        moved_from = None
        if held is not None and not may_use_held and held["code_digest"] != digest:
            # Only the student has their own Google code: the same paste twice (a double
            # click, before the browser was remembered) is theirs.
            raise HeldByAnother()
        if held is not None:
            if held["code_digest"] == digest:
                if held["status"] == VmStatus.FAILED:
                    raise CodeAlreadyUsed()
                del held["code_digest"], held["live"]
                return Assignment(held, "unchanged")
            await self._use_code(conn, digest)
            if not held["live"] and held["status"] != VmStatus.ACTIVE:
                # Re-arming a VM that stopped polling would only fail again: give the
                # student a live one, and leave the dead one to tear down if it returns.
                await self._release_in(conn, held["id"], "released", user,
                                       "moved: the VM stopped responding")
                moved_from = held["hostname"]
            else:
                cur = await conn.execute(
                    "UPDATE vms SET status = 'assigned', status_changed_at = now(), crd_code = %s,"
                    " code_digest = %s, work_id = work_id + 1, code_received_at = now(),"
                    " delivered_at = NULL, last_error = NULL"
                    f" WHERE id = %s RETURNING {PUBLIC_COLUMNS}",
                    (code, digest, held["id"]),
                )
                vm = await cur.fetchone()
                assert vm is not None
                await self._event(conn, user, "re-armed with a new code", vm["id"], vm["hostname"])
                return Assignment(vm, "rearmed")
        else:
            await self._use_code(conn, digest)

        cur = await conn.execute(
            "WITH pick AS ("
            "  SELECT id FROM vms"
            "  WHERE status = 'available'"
            f"    AND {_SEEN}"
            f"  ORDER BY {_PICK_ORDER}"
            "  LIMIT 1"
            "  FOR UPDATE SKIP LOCKED)"
            " UPDATE vms SET status = 'assigned', status_changed_at = now(),"
            "  assigned_user = %(user)s, crd_code = %(code)s, code_digest = %(digest)s,"
            "  pin = %(pin)s, work_id = vms.work_id + 1, assigned_at = now(),"
            "  code_received_at = now(), delivered_at = NULL, active_at = NULL,"
            "  failed_at = NULL, released_at = NULL, last_error = NULL"
            f" FROM pick WHERE vms.id = pick.id RETURNING {PUBLIC_COLUMNS_OF_VMS}",
            {"stale_after": stale_after, "user": user, "code": code, "digest": digest, "pin": pin},
        )
        vm = await cur.fetchone()
        if vm is None:
            raise NoVmFree()
        await self._event(conn, user, "assigned", vm["id"], vm["hostname"],
                          f"moved from {moved_from}" if moved_from else None)
        return Assignment(vm, "moved" if moved_from else "assigned", moved_from)

    async def _use_code(self, conn: psycopg.AsyncConnection[dict[str, Any]], digest: str) -> None:
        """Record that this code goes to a VM now; CodeAlreadyUsed if one ever had it."""
        cur = await conn.execute(
            "INSERT INTO used_codes (digest) VALUES (%s) ON CONFLICT DO NOTHING RETURNING digest",
            (digest,),
        )
        if await cur.fetchone() is None:
            raise CodeAlreadyUsed()

    async def _assign_free_vm(
        self,
        conn: psycopg.AsyncConnection[dict[str, Any]],
        user: str,
        code: str,
        digest: str,
        pin: str,
        stale_after: float,
    ) -> dict[str, Any] | None:
        """Give `user` a free VM, record the code as used and log it, in one statement.

        None if none is free, they hold one, or the code was used before: the
        transaction in _assign_in then decides which.
        """
        cur = await conn.execute(
            _ASSIGN_FREE_VM,
            {"stale_after": stale_after, "user": user, "code": code, "digest": digest, "pin": pin,
             "lock_space": USER_LOCK_SPACE},
        )
        return await cur.fetchone()

    async def vm_of_user(self, user: str) -> dict[str, Any] | None:
        """The VM `user` holds, if any."""
        async with self.connection() as conn:
            cur = await conn.execute(
                f"SELECT {PUBLIC_COLUMNS} FROM vms WHERE assigned_user = %s", (user,)
            )
            return await cur.fetchone()

    async def release_user_vm(self, user: str, actor: str | None = None) -> dict[str, Any] | None:
        """Let go of the VM `user` holds; None if they hold none.

        A VM that never received its work goes straight back to the pool;
        one that may have set CRD up is `released` until it reports teardown.
        """
        async with self.transaction() as conn:
            cur = await conn.execute("SELECT id FROM vms WHERE assigned_user = %s FOR UPDATE", (user,))
            held = await cur.fetchone()
            if held is None:
                return None
            return await self._release_in(conn, held["id"], "released", actor or user,
                                          f"held by {user}" if actor and actor != user else None)

    async def _release_in(
        self,
        conn: psycopg.AsyncConnection[dict[str, Any]],
        vm_id: int,
        action: str,
        actor: str,
        detail: str | None,
    ) -> dict[str, Any]:
        """Free a held VM inside the caller's transaction, with its event."""
        cur = await conn.execute(
            "UPDATE vms SET status = CASE WHEN delivered_at IS NULL AND status = 'assigned'"
            "                             THEN 'available' ELSE 'released' END,"
            " status_changed_at = now(), assigned_user = NULL, crd_code = NULL, pin = NULL,"
            " released_at = now()"
            f" WHERE id = %s RETURNING {PUBLIC_COLUMNS}",
            (vm_id,),
        )
        row = await cur.fetchone()
        assert row is not None
        await self._event(conn, actor, action, row["id"], row["hostname"], detail)
        return row

    # -- instructor side ----------------------------------------------------------------

    async def fleet(self, stale_after: float) -> list[dict[str, Any]]:
        """Every VM as an instructor sees it (never the code or the PIN), by hostname.

        Ages are computed by the database clock, the one every allocator process shares.
        """
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT id, hostname, status, assigned_user, last_error, last_seen_at, created_at,"
                " status_changed_at, assigned_at, delivered_at, active_at, failed_at, released_at,"
                " retired_at,"
                " extract(epoch FROM now() - last_seen_at)::float8 AS seconds_since_seen,"
                " extract(epoch FROM now() - status_changed_at)::float8 AS seconds_in_status,"
                f" {_STALE} AS stale"
                " FROM vms ORDER BY hostname",
                {"stale_after": stale_after},
            )
            return await cur.fetchall()

    async def status_counts(self, stale_after: float) -> dict[str, tuple[int, int]]:
        """For each status: how many VMs, and how many of those are stale."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT status, count(*)::int AS vms,"
                f" count(*) FILTER (WHERE {_STALE})::int AS stale"
                " FROM vms GROUP BY status",
                {"stale_after": stale_after},
            )
            return {row["status"]: (row["vms"], row["stale"]) for row in await cur.fetchall()}

    async def register_vms(
        self, vms: list[tuple[str, str]], actor: str
    ) -> list[dict[str, Any]]:
        """Register (hostname, token hash) pairs as provisioning VMs, all or none.

        A retired VM is registered again with its new token; any other VM that
        already exists makes the whole call fail with VmsAlreadyRegistered.
        """
        hostnames = [hostname for hostname, _ in vms]
        try:
            async with self.transaction() as conn:
                cur = await conn.execute(
                    "SELECT hostname FROM vms WHERE hostname = ANY(%s) AND status <> 'retired'"
                    " ORDER BY hostname FOR UPDATE",
                    (hostnames,),
                )
                taken = [row["hostname"] for row in await cur.fetchall()]
                if taken:
                    raise VmsAlreadyRegistered(taken)
                cur = await conn.execute(
                    "INSERT INTO vms (hostname, token_hash)"
                    " SELECT * FROM unnest(%s::text[], %s::text[])"
                    " ON CONFLICT (hostname) DO UPDATE SET status = 'provisioning',"
                    "  token_hash = EXCLUDED.token_hash, status_changed_at = now(), retired_at = NULL,"
                    "  last_seen_at = NULL, last_error = NULL"
                    " WHERE vms.status = 'retired'"
                    " RETURNING id, hostname, status, (xmax = 0) AS created",
                    (hostnames, [token_hash for _, token_hash in vms]),
                )
                rows = await cur.fetchall()
                if len(rows) != len(vms):
                    # Another request registered some of them between the check and the insert.
                    done = {row["hostname"] for row in rows}
                    raise VmsAlreadyRegistered(sorted(set(hostnames) - done))
                for row in rows:
                    await self._event(conn, actor, "registered" if row["created"] else "registered again",
                                      row["id"], row["hostname"])
                return sorted(rows, key=lambda row: hostnames.index(row["hostname"]))
        except errors.UniqueViolation:
            raise VmsAlreadyRegistered(hostnames) from None

    async def release_vm(self, hostname: str, actor: str) -> dict[str, Any]:
        """An instructor lets go of the VM `hostname` for whoever holds it.

        Like a student's own release: a VM that never received its work goes
        straight back to the pool, one that may have set CRD up tears down first.
        """
        async with self.transaction() as conn:
            cur = await conn.execute(
                "SELECT id, status, assigned_user FROM vms WHERE hostname = %s FOR UPDATE", (hostname,)
            )
            before = await cur.fetchone()
            if before is None:
                raise VmNotFound(hostname)
            if before["assigned_user"] is None:
                raise VmNotHeld(hostname, before["status"])
            cur = await conn.execute(
                "UPDATE vms SET status = CASE WHEN delivered_at IS NULL AND status = 'assigned'"
                "                             THEN 'available' ELSE 'released' END,"
                " status_changed_at = now(), assigned_user = NULL, crd_code = NULL, pin = NULL,"
                " released_at = now()"
                f" WHERE id = %s RETURNING {PUBLIC_COLUMNS}",
                (before["id"],),
            )
            row = await cur.fetchone()
            assert row is not None
            held_by = before["assigned_user"]
            await self._event(conn, actor, "released", row["id"], row["hostname"], f"held by {held_by}")
            row["held_by"] = held_by
            return row

    async def retire_vm(self, hostname: str, actor: str, force: bool = False) -> dict[str, Any]:
        """Take the VM `hostname` out of the fleet; a held VM needs `force`.

        Retiring a retired VM changes nothing and writes no event.
        """
        async with self.transaction() as conn:
            cur = await conn.execute(
                "SELECT id, status, assigned_user FROM vms WHERE hostname = %s FOR UPDATE", (hostname,)
            )
            before = await cur.fetchone()
            if before is None:
                raise VmNotFound(hostname)
            held_by = before["assigned_user"]
            if before["status"] == VmStatus.RETIRED:
                cur = await conn.execute(f"SELECT {PUBLIC_COLUMNS} FROM vms WHERE id = %s", (before["id"],))
                row = await cur.fetchone()
                assert row is not None
                row["held_by"] = None
                return row
            if held_by is not None and not force:
                raise VmHeld(hostname, held_by)
            cur = await conn.execute(
                "UPDATE vms SET status = 'retired', status_changed_at = now(), retired_at = now(),"
                " assigned_user = NULL, crd_code = NULL, pin = NULL,"
                " released_at = CASE WHEN assigned_user IS NULL THEN released_at ELSE now() END"
                f" WHERE id = %s RETURNING {PUBLIC_COLUMNS}",
                (before["id"],),
            )
            row = await cur.fetchone()
            assert row is not None
            await self._event(conn, actor, "retired", row["id"], row["hostname"],
                              f"held by {held_by}" if held_by else None)
            row["held_by"] = held_by
            return row

    async def fail_unresponsive(self, timeout: float, message: str) -> list[dict[str, Any]]:
        """Mark failed every VM that got work over `timeout` s ago and never reported; the ones marked.

        One statement, so several allocator processes may run it at once: a
        row another process already failed no longer matches, and gets no
        second event.
        """
        async with self.connection() as conn:
            cur = await conn.execute(
                "WITH timed_out AS ("
                "  UPDATE vms SET status = 'failed', status_changed_at = now(), failed_at = now(),"
                "   crd_code = NULL, last_error = %(message)s"
                "  WHERE status IN ('assigned', 'configuring')"
                "   AND code_received_at < now() - make_interval(secs => %(timeout)s)"
                "  RETURNING id, hostname, assigned_user, delivered_at),"
                " logged AS ("
                "  INSERT INTO events (actor, action, vm_id, hostname, detail)"
                "  SELECT 'system', 'failed', id, hostname, %(detail)s FROM timed_out)"
                " SELECT * FROM timed_out",
                {
                    "message": message,
                    "timeout": timeout,
                    "detail": f"no report within {timeout:g} s",
                },
            )
            return await cur.fetchall()

    async def events_page(
        self,
        limit: int,
        *,
        before: int | None = None,
        after: int | None = None,
        hostname: str | None = None,
    ) -> tuple[list[dict[str, Any]], int]:
        """Up to `limit` events newest first, and the id of the newest event of all.

        Both come from one statement, so they agree with each other.
        """
        async with self.connection() as conn:
            cur = await conn.execute(
                "WITH latest AS (SELECT coalesce(max(id), 0) AS latest_id FROM events),"
                " page AS ("
                "  SELECT id, at, actor, action, hostname, detail FROM events"
                "  WHERE (%(before)s::bigint IS NULL OR id < %(before)s)"
                "   AND (%(after)s::bigint IS NULL OR id > %(after)s)"
                "   AND (%(hostname)s::text IS NULL OR hostname = %(hostname)s)"
                "  ORDER BY id DESC LIMIT %(limit)s)"
                " SELECT latest.latest_id, page.* FROM latest LEFT JOIN page ON true"
                " ORDER BY page.id DESC NULLS LAST",
                {"before": before, "after": after, "hostname": hostname, "limit": limit},
            )
            rows = await cur.fetchall()
        latest_id = int(rows[0]["latest_id"])
        events = [{k: v for k, v in row.items() if k != "latest_id"} for row in rows if row["id"] is not None]
        return events, latest_id

    async def assignment_history(self) -> list[dict[str, Any]]:
        """Every assignment ever made, by hostname then time."""
        async with self.connection() as conn:
            cur = await conn.execute(
                "SELECT hostname, username, assigned_at, active_at, ended_at, ended_as, codes, failures,"
                " extract(epoch FROM active_at - assigned_at)::float8 AS seconds_to_active"
                " FROM assignments ORDER BY hostname, assigned_at, id"
            )
            return await cur.fetchall()

    async def get_setting(self, name: str) -> str | None:
        """The shared setting `name`, if stored."""
        async with self.connection() as conn:
            cur = await conn.execute("SELECT value FROM fleet_settings WHERE name = %s", (name,))
            row = await cur.fetchone()
            return None if row is None else str(row["value"])

    async def replace_setting(self, name: str, value: str, actor: str, action: str) -> None:
        """Store a new value for the shared setting `name`, with its event (never the value)."""
        async with self.transaction() as conn:
            await conn.execute(
                "INSERT INTO fleet_settings (name, value) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                (name, value),
            )
            await self._event(conn, actor, action, None, None)

    # -- audit log ------------------------------------------------------------------

    async def _event(
        self,
        conn: psycopg.AsyncConnection[dict[str, Any]],
        actor: str,
        action: str,
        vm_id: int | None,
        hostname: str | None,
        detail: str | None = None,
    ) -> None:
        await conn.execute(
            "INSERT INTO events (actor, action, vm_id, hostname, detail) VALUES (%s, %s, %s, %s, %s)",
            (actor, action, vm_id, hostname, detail),
        )


def age_seconds(moment: datetime | None, now: datetime) -> float | None:
    """Seconds from `moment` to `now`, or None."""
    return None if moment is None else max(0.0, (now - moment).total_seconds())
