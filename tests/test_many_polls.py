"""One poll per VM however many connections: thousands of idle polls for one VM hold one waiter.

The poll window is long here, so that the one poll left open is still open
when the test looks, however slow the machine.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from conftest import fresh_code, linux_command, until
from test_limits import _read_response

POLLS = 2000
BATCH = 100


@pytest.fixture
def lablink_config(lablink_config: dict[str, Any]) -> dict[str, Any]:
    return {**lablink_config, "poll_timeout": 300.0, "stale_after": 600.0}



@pytest.mark.slow
async def test_thousands_of_polls_for_one_vm_hold_one_waiter(lablink):
    token = await lablink.enroll("vm-a")
    await lablink.poll("vm-a", token, wait=0)
    listener = lablink.allocator.listener
    body = json.dumps({"hostname": "vm-a"}).encode()
    request = (f"POST {lablink.base_url}lablink/vm_startup HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    answers: list[asyncio.Future[tuple[int, bytes]]] = []
    peak = 0
    try:
        started = time.monotonic()
        # Each connection sends one poll and then sits idle, open. Batches are paced by the
        # answers (each poll answers the one it replaces), so that the test measures the cap on
        # waiters, not how long a flood queues for the two pooled database connections.
        for batch in range(0, POLLS, BATCH):
            opened = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", lablink.port)
                                            for _ in range(batch, min(batch + BATCH, POLLS))))
            for reader, writer in opened:
                writer.write(request)
                connections.append((reader, writer))
                answers.append(asyncio.ensure_future(_read_response(reader)))
            await asyncio.gather(*(w.drain() for _, w in opened))
            await until(lambda: sum(a.done() for a in answers) >= len(answers) - 1, within=120)
            peak = max(peak, listener.waiter_count)
        elapsed = time.monotonic() - started
        health = await lablink.health()
        assert health["vm_polls"] == 1 and health["waiters"] == 1 and health["channels"] == 1, health
        superseded = [a.result() for a in answers if a.done()]
        assert all(code == 200 and json.loads(body) == {"status": "waiting"} for code, body in superseded), \
            {code for code, _ in superseded}
        (last,) = [a for a in answers if not a.done()]

        # The server still serves everyone else at once, and the one poll left gets the work.
        assert (await lablink.my_vm("bob")).body["status"] == "none"
        reply = await lablink.request_vm("alice", linux_command(fresh_code()))
        assert reply.code == 200, reply
        code, answer = await asyncio.wait_for(last, 30)
        assert code == 200 and json.loads(answer)["status"] == "assigned"
        assert peak == 1
        print(f"{POLLS} polls on {len(connections)} open connections in {elapsed:.1f} s")
    finally:
        for _, writer in connections:
            writer.transport.abort()
        for answer in answers:
            answer.cancel()
    await until(lambda: listener.waiter_count == 0, within=30)
