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
