"""The README's first command, and the embedded PostgreSQL keeping data across restarts."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import psycopg
import requests

from conftest import fresh_code, linux_command
from lablink_jupyter.db import Database, migrations_dir, token_digest
from lablink_jupyter.embedded import start_embedded_postgres

#: Every migration in sql/, in the order they are applied.
MIGRATIONS = sorted(path.name for path in migrations_dir().glob("[0-9]*.sql"))


async def test_embedded_postgres_keeps_everything_across_a_restart(tmp_path):
    data_dir = tmp_path / "lablink-data"
    embedded = start_embedded_postgres(data_dir)
    database = Database(embedded.url)
    assert await database.migrate() == MIGRATIONS
    await database.open()
    await database.enroll_vm("kept-vm", token_digest("t"))
    await database.close()
    embedded.stop()

    embedded = start_embedded_postgres(data_dir)
    try:
        database = Database(embedded.url)
        assert await database.migrate() == []  # already applied: idempotent
        await database.open()
        row = await database.vm_credentials("kept-vm")
        assert row is not None and row["token_hash"] == token_digest("t")
        await database.close()
    finally:
        embedded.stop()


async def test_two_allocators_migrating_at_once_do_not_race(database_url):
    name = f"lablink_race_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(database_url, dbname=name)
    try:
        results = await asyncio.gather(*(Database(url).migrate() for _ in range(4)))
        assert sorted(results, key=len) == [[], [], [], MIGRATIONS]
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_jupyter_lablink_with_demo_vms_runs_the_whole_flow(tmp_path, database_url):
    # `make run` is `jupyter lablink --demo-vms=3`; here with the embedded database in a temp dir.
    port = _free_port()
    token = uuid.uuid4().hex
    lablink = shutil.which("jupyter-lablink", path=os.path.dirname(sys.executable)) or "jupyter-lablink"
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "data"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [lablink, "--demo-vms=2", f"--port={port}", "--no-browser", "--allow-root",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
         f"--LabLink.embedded_data_dir={tmp_path / 'lablink'}", "--LabLink.poll_timeout=5"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/"
    session = requests.Session()
    session.headers["Authorization"] = f"token {token}"
    try:
        _wait_until(lambda: _available(session, base) == 2, f"demo VMs never came up: {tmp_path / 'server.log'}")
        page = session.get(base + "lablink/")
        assert page.status_code == 200 and "Chrome Remote Desktop command" in page.text

        code = fresh_code()
        reply = session.post(base + "lablink/api/request_vm", json={"crd_command": linux_command(code)})
        assert reply.status_code == 200, reply.text
        vm = reply.json()
        view = vm
        deadline = time.monotonic() + 60
        while view["status"] != "active" and time.monotonic() < deadline:
            view = session.get(base + "lablink/api/my_vm", params={"wait": 5, "known": view["status"]}).json()
        assert view["status"] == "active", view
        calls = tmp_path / "lablink" / "demo-vms" / vm["hostname"] / "crd" / "calls.jsonl"
        recorded = [json.loads(line) for line in calls.read_text().splitlines()]
        assert f"--code={code}" in recorded[0]["argv"]

        # A demo VM killed by hand comes back by itself and polls again.
        (other,) = {"demo-vm-1", "demo-vm-2"} - {vm["hostname"]}
        os.kill(_subscribe_pid(tmp_path, other), signal.SIGKILL)
        _wait_until(lambda: _available(session, base) == 1, "the killed demo VM still polls")
        _wait_until(lambda: _available(session, base) == 2, f"{other} never came back", within=60)
    finally:
        server.send_signal(signal.SIGTERM)  # SIGINT asks "Shut down?" or is ignored without a tty
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    output = (tmp_path / "server.log").read_text(errors="replace")
    assert code not in output and vm["pin"] not in output
    # The demo VMs stopped with the server.
    processes = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "lablink" / "demo-vms") not in processes


def _subscribe_pid(tmp_path, hostname):
    """The process id of the demo VM `hostname` started under tmp_path."""
    processes = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    (pid,) = [int(line.split(None, 1)[0]) for line in processes.splitlines()
              if f"--hostname {hostname} " in line and str(tmp_path) in line]
    return pid


def _available(session, base):
    try:
        health = session.get(base + "lablink/api/health", timeout=5)
    except requests.RequestException:
        return 0
    if health.status_code != 200:
        return 0
    return health.json().get("vm_polls", 0)


def _wait_until(predicate, message, within=90):
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.2)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
