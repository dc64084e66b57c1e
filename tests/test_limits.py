"""Limits: big bodies get 413 however they are sent, and thousands of polls for one VM hold one waiter."""

from __future__ import annotations

import asyncio
import gc
import json

import pytest

from conftest import ENROLL_TOKEN, fresh_code, linux_command, query, until
from lablink_jupyter.handlers import LabLinkHandler

#: c.LabLink.max_body_bytes, by default.
LIMIT = 64 * 1024
POST_ROUTES = ["lablink/api/vms/enroll", "lablink/vm_startup", "lablink/api/vm_status",
               "lablink/api/request_vm", "lablink/api/release"]


async def raw_exchange(lablink, head: bytes, chunks: list[bytes], *, read_timeout: float = 30) -> tuple[int, bytes]:
    """Send a request head and body pieces on a socket of its own; the status and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", lablink.port)
    try:
        writer.write(head)
        for chunk in chunks:
            writer.write(chunk)
            try:
                await writer.drain()
            except ConnectionError:
                break  # the server answered and closed while the body was still going out
        answer = await asyncio.wait_for(_read_response(reader), read_timeout)
    finally:
        writer.close()
    return answer


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return status, body


def head_for(lablink, path: str, auth: str, extra: str) -> bytes:
    """A request head for `path` with the given Authorization and framing headers."""
    return (f"POST {lablink.base_url}{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


def auth_for(path: str, vm_token: str) -> str:
    """Credentials that would let the request through if its body were fine."""
    if path == "lablink/api/vms/enroll":
        return f"Bearer {ENROLL_TOKEN}"
    if path in ("lablink/vm_startup", "lablink/api/vm_status"):
        return f"Bearer {vm_token}"
    return "token tok-alice"


def big_body(size: int) -> bytes:
    """A JSON object of `size` bytes whose fields would be valid if it were small."""
    filler = "x" * (size - 60)
    return json.dumps({"hostname": "vm-a", "crd_command": linux_command(fresh_code()), "pad": filler}).encode()[:size]


def assert_413(status: int, body: bytes, limit: int) -> None:
    assert status == 413, (status, body[:300])
    error = json.loads(body)["error"]
    assert str(limit) in error


@pytest.mark.parametrize("path", POST_ROUTES)
async def test_body_over_the_limit_with_content_length_gets_413(lablink, path):
    vm_token = await lablink.enroll("vm-a")
    limit = LIMIT
    body = big_body(limit + 1000)
    status, answer = await raw_exchange(lablink, head_for(lablink, path, auth_for(path, vm_token),
                                                          f"Content-Length: {len(body)}\r\n"), [body])
    assert_413(status, answer, limit)
    assert query(lablink.database_url, "SELECT count(*) FROM vms WHERE hostname <> 'vm-a'") == [(0,)]


@pytest.mark.parametrize("shape", ["one big chunk", "many small chunks", "just over"])
@pytest.mark.parametrize("path", POST_ROUTES)
async def test_chunked_body_over_the_limit_gets_413(lablink, path, shape):
    vm_token = await lablink.enroll("vm-a")
    limit = LIMIT
    body = big_body({"one big chunk": 3 * limit, "many small chunks": 2 * limit, "just over": limit + 2}[shape])
    size = len(body) if shape != "many small chunks" else 1000
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    chunks = [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]
    status, answer = await raw_exchange(
        lablink, head_for(lablink, path, auth_for(path, vm_token), "Transfer-Encoding: chunked\r\n"), chunks)
    assert_413(status, answer, limit)
    health = await lablink.health()
    assert health["database"] == "ok"


async def test_a_chunked_body_far_over_the_limit_is_dropped_and_answered_413(lablink):
    # 128 times the limit, in chunks: read and dropped (never buffered), then answered.
    vm_token = await lablink.enroll("vm-a")
    piece = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
    status, answer = await raw_exchange(
        lablink, head_for(lablink, "lablink/vm_startup", f"Bearer {vm_token}", "Transfer-Encoding: chunked\r\n"),
        [piece] * 128 + [b"0\r\n\r\n"])
    assert_413(status, answer, LIMIT)
    assert (await lablink.health())["database"] == "ok"


async def test_a_body_at_the_limit_is_read(lablink):
    # The limit is on the body, not on a number in a header: a chunked body just under it is parsed.
    vm_token = await lablink.enroll("vm-a")
    body = json.dumps({"hostname": "vm-a", "wait": 0, "pad": "x" * (64 * 1024 - 100)}).encode()
    assert len(body) <= 64 * 1024
    chunks = [b"%x\r\n%s\r\n" % (len(body), body), b"0\r\n\r\n"]
    status, answer = await raw_exchange(
        lablink, head_for(lablink, "lablink/vm_startup", f"Bearer {vm_token}", "Transfer-Encoding: chunked\r\n"),
        chunks)
    assert status == 200 and json.loads(answer) == {"status": "waiting"}


async def test_uploads_cut_off_midway_leave_no_request_behind(lablink):
    # A client that goes away mid-body must not leave its request waiting for the rest forever.
    vm_token = await lablink.enroll("vm-a")

    def live_handlers() -> int:
        gc.collect()
        return sum(1 for obj in gc.get_objects() if isinstance(obj, LabLinkHandler) and not obj._finished)

    before = live_handlers()
    for framing in ("Content-Length: 5000\r\n", "Transfer-Encoding: chunked\r\n"):
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", lablink.port)
            writer.write(head_for(lablink, "lablink/vm_startup", f"Bearer {vm_token}", framing))
            writer.write(b"100\r\n{\"hostname\"" if "chunked" in framing else b'{"hostname"')
            await writer.drain()
            writer.close()
    await until(lambda: live_handlers() <= before, within=20)


async def test_no_vm_free_says_when_to_come_back(lablink):
    reply = await lablink.request_vm("alice", linux_command(fresh_code()))
    assert reply.code == 503 and reply.error == "No VM is free right now."
    assert reply.headers["Retry-After"] == "60"
