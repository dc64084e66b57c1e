"""Stopping the listener ends its task even when the stop lands while a pump is winding down."""

from __future__ import annotations

import asyncio

from conftest import until
from lablink_jupyter.listener import NotificationListener


async def test_stop_during_a_pump_wind_down_is_not_swallowed(database_url):
    # A long ping interval: if the stop were swallowed, the task would sit in its next pump.
    listener = NotificationListener(database_url, ping_interval=600)
    winding_down = asyncio.Event()
    deliver = listener._deliver

    async def slow_to_end(conn):
        try:
            await deliver(conn)
        except asyncio.CancelledError:
            winding_down.set()
            await asyncio.sleep(0.5)  # the pump takes a moment to end
            raise

    listener._deliver = slow_to_end  # type: ignore[method-assign]
    listener.start()
    try:
        await until(lambda: listener.connected)
        # A new channel makes the listener end its pump to LISTEN; stop while that pump ends.
        subscribing = asyncio.ensure_future(listener.subscribe("lablink_stop_test"))
        await asyncio.wait_for(winding_down.wait(), 10)
        # Not wait_for: its own cancellation would end a stuck stop() and hide the fault.
        stopping = asyncio.ensure_future(listener.stop())
        done, _ = await asyncio.wait({stopping}, timeout=10)
        assert stopping in done, "stop() never ended: its cancellation was swallowed"
        assert not listener.connected
    finally:
        await listener.stop()
        subscribing.cancel()


async def test_a_caller_cancelled_while_stopping_the_listener_stays_cancelled(database_url):
    # A server shutting down within a deadline cancels its own stop; stop() must not eat that.
    listener = NotificationListener(database_url, ping_interval=600)
    deliver = listener._deliver
    ending = asyncio.Event()

    async def slow_to_end(conn):
        try:
            await deliver(conn)
        except asyncio.CancelledError:
            ending.set()
            await asyncio.sleep(0.5)
            raise

    listener._deliver = slow_to_end  # type: ignore[method-assign]
    listener.start()
    await until(lambda: listener.connected)
    subscription = await listener.subscribe("lablink_stop_cancel_test")
    stopping = asyncio.ensure_future(listener.stop())
    await asyncio.wait_for(ending.wait(), 10)
    stopping.cancel()
    done, _ = await asyncio.wait({stopping}, timeout=10)
    assert stopping in done and stopping.cancelled()
    # Cancelled or not, the stop released its waiters and left nothing connected.
    assert not listener.connected
    assert await subscription.wait(0) is True
    subscription.close()
