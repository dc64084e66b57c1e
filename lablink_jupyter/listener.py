"""The one LISTEN connection of an allocator process, and its fan-out to waiters.

Every long-poll in the process waits on a `Subscription`, an asyncio future —
never a thread or a connection of its own. A single task owns the listening
connection: it LISTENs on the channels waiters need (batched into one round
trip, reference-counted, UNLISTENed a little after the last waiter leaves),
and wakes only the waiters of the channel a notification names.

Notifications are hints; the row is the truth. A waiter that is woken re-reads
its row. When the connection drops, every waiter is woken so it re-reads, and
the listener reconnects with backoff and LISTENs again before waking them once
more: a change made while it was away is seen by that re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterable

import psycopg
from psycopg import sql


def vm_channel(vm_id: int) -> str:
    """The channel the trigger notifies when VM `vm_id` changes."""
    return f"vm_updates_{int(vm_id)}"


#: How the listening connection shows in pg_stat_activity.
APPLICATION_NAME = "lablink-listener"

#: The channel notified when any VM changes (dashboards, students without a VM).
FLEET_CHANNEL = "vm_updates"


class Subscription:
    """One waiter's interest in one channel; wait on it, close it when done."""

    __slots__ = ("channel", "_listener", "_waiter", "_woken", "_closed")

    def __init__(self, listener: NotificationListener, channel: str) -> None:
        self.channel = channel
        self._listener = listener
        self._waiter: asyncio.Future[None] | None = None
        self._woken = False
        self._closed = False

    def wake(self) -> None:
        """Mark that the row may have changed, and end a wait in progress."""
        self._woken = True
        self.interrupt()

    def interrupt(self) -> None:
        """End a wait in progress without claiming a change (disconnects, replacement)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s; True if woken by a change since the last wait returned.

        A notification that arrives while the waiter is busy re-reading its
        row is kept, so the next wait returns at once: no wake-up is lost.
        """
        if not self._woken and not self._closed and timeout > 0:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        woken, self._woken = self._woken, False
        return woken

    @property
    def listening(self) -> bool:
        """Whether a notification on this channel would reach this waiter right now."""
        return self._listener.is_listening(self.channel)

    def close(self) -> None:
        """Stop receiving; the channel is UNLISTENed once no waiter needs it."""
        if not self._closed:
            self._closed = True
            self.interrupt()
            self._listener._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class NotificationListener:
    """Owns the process's LISTEN connection and wakes the waiters of each notification."""

    def __init__(
        self,
        conninfo: str,
        *,
        log: logging.Logger | None = None,
        unlisten_delay: float = 5.0,
        ping_interval: float = 30.0,
        max_backoff: float = 10.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.conninfo = conninfo
        self.log = log or logging.getLogger(__name__)
        self.unlisten_delay = unlisten_delay
        self.ping_interval = ping_interval
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        # Lists, not sets: nearly every channel has one waiter, and ten thousand sets cost megabytes.
        self._subscribers: dict[str, list[Subscription]] = {}
        # Kept up to date as waiters come and go, so that one change costs the same with ten or
        # ten thousand channels: those LISTENed without waiters (oldest first, UNLISTENed once
        # idle for unlisten_delay), and those with waiters not LISTENed yet.
        self._idle_since: dict[str, float] = {}
        self._to_listen: set[str] = set()
        self._listening: set[str] = set()
        self._confirmations: dict[str, list[asyncio.Future[None]]] = {}
        self._reconcile_needed = asyncio.Event()
        self._expiry: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self.reconnects = 0

    # -- what waiters use -------------------------------------------------------

    async def subscribe(self, channel: str, timeout: float = 5.0) -> Subscription:
        """A subscription to `channel`, returned once LISTEN is in effect (or after `timeout`).

        After this returns with `listening` true, any change committed later
        is notified to it; the caller reads its row only after subscribing.
        """
        subscription = Subscription(self, channel)
        subscribers = self._subscribers.get(channel)
        if subscribers is None:
            self._subscribers[channel] = [subscription]
            self._idle_since.pop(channel, None)
        else:
            subscribers.append(subscription)
        if self.is_listening(channel):
            return subscription
        self._to_listen.add(channel)
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(channel, []).append(confirmed)
        self._reconcile_needed.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(confirmed), timeout)
        return subscription

    def is_listening(self, channel: str) -> bool:
        """Whether LISTEN on `channel` is in effect on a live connection."""
        return self._connected and channel in self._listening

    @property
    def connected(self) -> bool:
        """Whether the listening connection is up."""
        return self._connected

    @property
    def waiter_count(self) -> int:
        """How many subscriptions are open."""
        return sum(len(s) for s in self._subscribers.values())

    @property
    def channel_count(self) -> int:
        """How many channels are LISTENed on the live connection."""
        return len(self._listening) if self._connected else 0

    def wake_all(self) -> None:
        """Wake every waiter so it re-reads its row."""
        for subscriptions in list(self._subscribers.values()):
            for subscription in list(subscriptions):
                subscription.wake()

    def _remove(self, subscription: Subscription) -> None:
        subscriptions = self._subscribers.get(subscription.channel)
        if subscriptions is None or subscription not in subscriptions:
            return
        subscriptions.remove(subscription)
        if not subscriptions:
            channel = subscription.channel
            del self._subscribers[channel]
            if channel in self._listening:
                self._idle_since[channel] = time.monotonic()
                self._schedule_expiry()
            else:
                self._to_listen.discard(channel)
                _resolve_all(self._confirmations.pop(channel, ()))

    def _schedule_expiry(self) -> None:
        # One timer, for the channel idle longest; the reconcile it triggers schedules the next.
        if self._expiry is None and self._idle_since:
            oldest = next(iter(self._idle_since.values()))
            delay = max(0.0, oldest + self.unlisten_delay - time.monotonic())
            self._expiry = asyncio.get_running_loop().call_later(delay, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        self._reconcile_needed.set()

    # -- life cycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the task that owns the connection."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="lablink-listener")

    async def stop(self) -> None:
        """Stop the task, close the connection and release every waiter."""
        task, self._task = self._task, None
        try:
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    # The task's own end is expected; the caller's cancellation is not ours to eat.
                    if _being_cancelled():
                        raise
        finally:
            self._connected = False
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None
            self.wake_all()

    async def _run(self) -> None:
        backoff = 0.25
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, connect_timeout=int(self.connect_timeout),
                    application_name=APPLICATION_NAME,
                )
            except psycopg.OperationalError as exc:
                delay = backoff * (0.5 + random.random())
                self.log.warning(
                    "LabLink listener cannot reach PostgreSQL (%s); retrying in %.1f s",
                    _short(exc), delay,
                )
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            try:
                async with conn:
                    # A new connection listens on nothing: LISTEN on every channel with waiters.
                    self._listening = set()
                    self._idle_since.clear()
                    self._to_listen = set(self._subscribers)
                    await self._reconcile(conn)
                    self._connected = True
                    if self.reconnects:
                        self.log.info("LabLink listener reconnected; waiters re-read their rows")
                    # Changes may have been committed while nobody listened.
                    self.wake_all()
                    backoff = 0.25
                    while True:
                        await self._pump(conn)
                        await self._reconcile(conn)
            except psycopg.Error as exc:
                self.log.warning("LabLink listener lost its connection (%s); reconnecting", _short(exc))
            finally:
                self._connected = False
                self._listening = set()
            self.reconnects += 1
            self.wake_all()
            await asyncio.sleep(backoff * random.random())

    async def _pump(self, conn: psycopg.AsyncConnection[object]) -> None:
        """Deliver notifications until the channel set must change or a ping is due."""
        pump = asyncio.create_task(self._deliver(conn))
        changed = asyncio.create_task(self._reconcile_needed.wait())
        try:
            done, _ = await asyncio.wait(
                {pump, changed}, timeout=self.ping_interval, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            changed.cancel()
            if not pump.done():
                # Cancelling is safe here: the task only ever awaits socket readiness.
                pump.cancel()
            # Not `await pump` under suppress(CancelledError): that would also swallow a
            # cancellation of this task arriving meanwhile, and stop() would wait forever.
            await asyncio.wait({pump})
        if not pump.cancelled():
            pump.result()  # a lost connection's error goes on to _run, which reconnects
        if not done:
            # Quiet for a while: prove the connection is alive (a half-open socket never errors).
            await conn.execute("SELECT 1")

    async def _deliver(self, conn: psycopg.AsyncConnection[object]) -> None:
        async for notify in conn.notifies():
            for subscription in list(self._subscribers.get(notify.channel, ())):
                subscription.wake()

    async def _reconcile(self, conn: psycopg.AsyncConnection[object]) -> None:
        """LISTEN on channels that gained waiters, UNLISTEN those idle long enough, in one round trip."""
        self._reconcile_needed.clear()
        to_listen = sorted(c for c in self._to_listen if c in self._subscribers and c not in self._listening)
        self._to_listen.clear()
        now = time.monotonic()
        to_unlisten = []
        for channel, since in self._idle_since.items():  # oldest first
            if now - since < self.unlisten_delay:
                break
            to_unlisten.append(channel)
        for channel in to_unlisten:
            del self._idle_since[channel]
        # Before the round trip: a waiter arriving meanwhile must not count on these.
        self._listening.difference_update(to_unlisten)
        if to_listen or to_unlisten:
            await conn.execute(_statements(to_listen, to_unlisten))
            self._listening.update(to_listen)
        now = time.monotonic()
        for channel in to_listen:
            if channel not in self._subscribers:  # its waiters left during the round trip
                self._idle_since[channel] = now
        for channel in to_unlisten:
            if channel in self._subscribers:  # a waiter arrived during the round trip
                self._to_listen.add(channel)
                self._reconcile_needed.set()
        self._schedule_expiry()
        for channel in list(self._confirmations):
            if channel in self._listening or channel not in self._subscribers:
                _resolve_all(self._confirmations.pop(channel))


def _resolve_all(futures: Iterable[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


def _statements(to_listen: Iterable[str], to_unlisten: Iterable[str]) -> sql.Composed:
    # Channel names go through sql.Identifier: quoted, so never case-folded or injected.
    parts = [sql.SQL("LISTEN {}").format(sql.Identifier(c)) for c in to_listen]
    parts += [sql.SQL("UNLISTEN {}").format(sql.Identifier(c)) for c in to_unlisten]
    return sql.SQL("; ").join(parts)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _being_cancelled() -> bool:
    """Whether the running task has been asked to stop (Python 3.11+ can tell; 3.10 cannot)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling and cancelling())
