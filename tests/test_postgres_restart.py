"""PostgreSQL stops and starts again while VMs wait and students hold VMs: a clear 503 meanwhile, nothing lost.

The test starts an embedded PostgreSQL of its own (whatever
LABLINK_TEST_DATABASE_URL says), so that it can stop it under load.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import fresh_code, linux_command, query, until
from lablink_jupyter.embedded import EmbeddedPostgres, start_embedded_postgres

pytestmark = pytest.mark.slow


class RestartablePostgres:
    """An embedded PostgreSQL that the test can stop and start again, at the same address."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.embedded: EmbeddedPostgres | None = start_embedded_postgres(data_dir)
        self.url = self.embedded.url

    def stop(self) -> None:
        """Stop the server (a fast shutdown: every connection is cut)."""
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None

    def start(self) -> None:
        """Start it again on the same data directory."""
        self.embedded = start_embedded_postgres(self.data_dir)
        assert self.embedded.url == self.url


@pytest.fixture
def restartable_postgres() -> Iterator[RestartablePostgres]:
    """A PostgreSQL of this test's own (outside pytest's temp tree, as in conftest.postgres_server)."""
    data_dir = Path(tempfile.mkdtemp(prefix="lablink-restart-postgres-"))
    server = RestartablePostgres(data_dir)
    yield server
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def lablink_config(lablink_config: dict[str, Any], restartable_postgres: RestartablePostgres) -> dict[str, Any]:
    return {**lablink_config, "database_url": restartable_postgres.url, "poll_timeout": 2.0}


async def test_postgres_restart_under_load_loses_nothing(lablink, vm_factory, restartable_postgres) -> None:
    vms = {name: vm_factory(name) for name in ("vm-1", "vm-2", "vm-3")}
    await until(_health_says(lablink, vm_polls=3), within=60)
    await until(lambda: query(restartable_postgres.url, "SELECT count(*) FROM vms WHERE status = 'available'")
                == [(3,)], within=60)
    first = await lablink.request_vm("alice", linux_command(fresh_code()))
    assert first.code == 200
    await lablink.wait_for_status("alice", "active")
    reconnects = lablink.allocator.listener.reconnects

    await asyncio.to_thread(restartable_postgres.stop)
    outage = await asyncio.gather(
        lablink.request_vm("bob", linux_command(fresh_code())),
        lablink.my_vm("alice"),
        lablink.call("GET", "lablink/api/health"),
    )
    for reply in outage:
        assert reply.code == 503, reply
    assert outage[0].error == "The database is unavailable right now." and outage[0].headers["Retry-After"]
    assert outage[2].body["database"] == "unavailable"

    await asyncio.to_thread(restartable_postgres.start)
    # Ask at once, before the listener is back: every answer is a 503 until one is a 200.
    bob_code = fresh_code()

    async def bob_asks() -> Any:
        reply = await lablink.request_vm("bob", linux_command(bob_code))
        assert reply.code in (200, 503), reply
        return reply if reply.code == 200 else None

    bob = await until(bob_asks, within=60, every=0.5)
    await lablink.wait_for_status("bob", "active", within=90)
    carol = await lablink.request_vm("carol", linux_command(fresh_code()))
    assert carol.code == 200, carol
    await lablink.wait_for_status("carol", "active", within=90)

    alice = (await lablink.my_vm("alice")).body
    assert (alice["hostname"], alice["pin"], alice["status"]) == (first.body["hostname"], first.body["pin"], "active")
    assert len({first.body["hostname"], bob.body["hostname"], carol.body["hostname"]}) == 3
    assert lablink.allocator.listener.reconnects > reconnects
    # None waits forever: every VM is back to polling, and each set CRD up exactly once.
    await until(_health_says(lablink, vm_polls=3, listener="listening"), within=60)
    for name, vm in vms.items():
        assert len(vm.calls()) == 1, (name, vm.calls())
        assert "Traceback" not in vm.log()


def _health_says(lablink: Any, **expected: Any) -> Any:
    async def check() -> bool:
        reply = await lablink.call("GET", "lablink/api/health")
        return reply.code == 200 and all(reply.body.get(k) == v for k, v in expected.items())
    return check
