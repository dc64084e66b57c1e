"""No code, PIN or token in any log line, notification payload or stored row where it does not belong.

One full run with real processes — `jupyter lablink` logging at DEBUG, a
`lablink-subscribe -v` VM — through every path a secret travels: enrollment,
delivery, redelivery, a start-host failure whose output quotes the code, a
re-arm, a code pasted twice, a damaged code, release and teardown. Meanwhile a
separate connection LISTENs on the channels. Afterwards every line printed by
the server, the VM and PostgreSQL is searched for every secret.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from conftest import ENROLL_TOKEN, VmProcess, fresh_code, linux_command, query, until
from processes import AllocatorProcess


def postgres_log(database_url: str) -> Path | None:
    """The embedded PostgreSQL's log file, when the tests run on it."""
    host = conninfo_to_dict(database_url).get("host")
    if host and Path(str(host)).is_dir() and (Path(str(host)) / "log").is_file():
        return Path(str(host)) / "log"
    return None


async def test_no_secret_in_any_log_payload_or_leftover_row(empty_database: str, tmp_path: Path) -> None:
    pg_log = postgres_log(empty_database)
    pg_log_start = pg_log.stat().st_size if pg_log else 0
    # Secrets come from the environment, as the README says to deploy: Jupyter itself logs
    # its whole configuration at debug level, so a token in a config file would be logged.
    server = AllocatorProcess("", tmp_path / "server",
                              {"poll_timeout": 2.0, "stale_after": 30.0, "log_level": "DEBUG"},
                              server_settings={"log_level": "DEBUG"},
                              environment={"LABLINK_ENROLL_TOKEN": ENROLL_TOKEN,
                                           "LABLINK_DATABASE_URL": empty_database})
    listener = await psycopg.AsyncConnection.connect(empty_database, autocommit=True)
    payloads: list[str] = []
    await listener.execute("LISTEN vm_updates")
    await listener.execute("LISTEN vm_updates_1")

    async def collect() -> None:
        async for notify in listener.notifies():
            payloads.append(notify.payload)

    collecting = asyncio.ensure_future(collect())
    vm = VmProcess("lab-vm-1", tmp_path / "vm", server.url, extra_args=["-v"])
    vm.home.mkdir(parents=True)
    secrets: dict[str, str] = {"enrollment token": ENROLL_TOKEN}
    try:
        await server.start().ready()
        vm.start()
        await until(lambda: (vm.home / "state" / "token").exists(), within=60)
        await until(_polling(server), within=60)
        await until(lambda: query(empty_database, "SELECT status FROM vms") == [("available",)], within=60)

        first, failing, rearm, second = fresh_code(), fresh_code(), fresh_code(), fresh_code()
        secrets.update({"first code": first, "failing code": failing, "re-arm code": rearm,
                        "second student's code": second})
        reply = await server.call("POST", "lablink/api/request_vm", user="alice",
                                  json_body={"crd_command": linux_command(first)})
        assert reply.code == 200, reply
        secrets["alice's PIN"] = reply.body["pin"]
        await server.wait_for_status("alice", "active")
        again = await server.call("POST", "lablink/api/request_vm", user="alice",
                                  json_body={"crd_command": linux_command(first)})
        assert again.code == 200 and again.body["outcome"] == "unchanged"
        assert "it is ready" in " ".join(again.body["notes"])  # not "being set up": it is active
        stolen = await server.call("POST", "lablink/api/request_vm", user="bob",
                                   json_body={"crd_command": linux_command(first)})
        assert stolen.code in (409, 503)  # a code works once (and no VM is free anyway): bob gets nothing

        # start-host fails and prints the code, as Google's does on an OAuth error.
        vm.crd_dir.joinpath("exit_code").write_text("1")
        vm.crd_dir.joinpath("stderr").write_text(f"OAuth error: invalid_grant for code {failing}\n")
        reply = await server.call("POST", "lablink/api/request_vm", user="alice",
                                  json_body={"crd_command": linux_command(failing)})
        assert reply.code == 200 and reply.body["outcome"] == "rearmed"
        failed = await server.wait_for_status("alice", "failed")
        assert failing not in json.dumps(failed)
        vm.crd_dir.joinpath("exit_code").unlink()
        reply = await server.call("POST", "lablink/api/request_vm", user="alice",
                                  json_body={"crd_command": linux_command(rearm)})
        assert reply.code == 200
        await server.wait_for_status("alice", "active")

        damaged = rearm[:-3] + "$;`"
        refused = await server.call("POST", "lablink/api/request_vm", user="alice",
                                    json_body={"crd_command": f'--code="{damaged}"'})
        assert refused.code == 400 and rearm[5:-3] not in json.dumps(refused.body)

        assert (await server.call("POST", "lablink/api/release", user="alice")).code == 200
        await until(lambda: vm.calls("chrome-remote-desktop"), within=60)
        await until(_polling(server), within=60)
        reply = await server.call("POST", "lablink/api/request_vm", user="bob",
                                  json_body={"crd_command": linux_command(second)})
        assert reply.code == 200, reply
        secrets["bob's PIN"] = reply.body["pin"]
        await server.wait_for_status("bob", "active")
        assert (await server.call("POST", "lablink/api/release", user="bob")).code == 200
        await until(lambda: len(vm.calls("chrome-remote-desktop")) == 2, within=60)
        await until(_polling(server), within=60)
        secrets["VM token"] = (vm.home / "state" / "token").read_text().strip()
        secrets["students' Jupyter tokens"] = "tok-alice"
        rows = _every_row(empty_database)
    finally:
        vm.stop()
        server.stop()
        collecting.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
        await listener.close()

    assert [c["argv"][1] for c in vm.calls()] == [f"--code={c}" for c in (first, failing, rearm, second)]
    logs = {"server": server.log(), "VM": vm.log()}
    if pg_log is not None:
        logs["PostgreSQL"] = pg_log.read_bytes()[pg_log_start:].decode(errors="replace")
    assert "assignment received" in logs["VM"] and "POST /lablink/vm_startup" in logs["server"]
    for where, text in logs.items():
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} appears in the {where} log"

    assert len(payloads) >= 10, payloads
    for payload in payloads:
        assert set(json.loads(payload)) == {"id", "hostname", "status"}, payload
        assert not any(secret in payload for secret in secrets.values()), payload

    # Once everything is released, no code, PIN or token is left in any table, only digests.
    for what, secret in secrets.items():
        assert secret not in rows, f"the {what} is still stored"


def _polling(server: AllocatorProcess) -> Any:
    async def check() -> bool:
        health = await server.call("GET", "lablink/api/health")
        return health.code == 200 and health.body["vm_polls"] == 1
    return check


def _every_row(database_url: str) -> str:
    """Every row of every LabLink table, as one text."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        return "\n".join(str(conn.execute(f"SELECT * FROM {table}").fetchall())  # noqa: S608
                         for table in ("vms", "events", "fleet_settings", "lablink_migrations"))
