"""The Prometheus figures after a known sequence, and VMs that never report are marked failed."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import INSTRUCTOR, fresh_code, linux_command, query, until


@pytest.fixture
def lablink_config(lablink_config, request):
    # Sweep often, so the figures and the timeouts show quickly; a test may add settings.
    return {**lablink_config, "fleet_refresh_interval": 0.2, **getattr(request, "param", {})}


#: A VM gets two seconds to report.
short_configure_timeout = pytest.mark.parametrize(
    "lablink_config", [{"configure_timeout": 2.0}], indirect=True, ids=["configure_timeout=2"])


async def _metrics(lablink):
    reply = await lablink.call("GET", "metrics", user=INSTRUCTOR)
    assert reply.code == 200, reply
    samples = {}
    for family in text_string_to_metric_families(reply.body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_after_a_known_sequence(lablink):
    before = await _metrics(lablink)
    token0 = await lablink.enroll("m-0")
    assert (await lablink.poll("m-0", token0, wait=0)).code == 200
    # m-0 waits for work while alice asks: its answer is one wake-up.
    poll = asyncio.ensure_future(lablink.poll("m-0", token0))

    async def polling():
        return (await lablink.health())["vm_polls"] == 1

    await until(polling)
    during = await _metrics(lablink)
    # The gauge is the process's: count from what it showed before this test's poll.
    polls_before = _value(before, "lablink_vm_polls_waiting")
    assert _value(during, "lablink_vm_polls_waiting") - polls_before == 1
    assert (await lablink.request_vm("alice", linux_command(fresh_code()))).body["hostname"] == "m-0"
    work = (await poll).body
    assert work["status"] == "assigned"
    report = await lablink.call("POST", "lablink/api/vm_status", token=token0, json_body={
        "hostname": "m-0", "status": "active", "work_id": work["work_id"]})
    assert report.code == 200

    for hostname in ("m-1", "m-2"):
        token = await lablink.enroll(hostname)
        assert (await lablink.poll(hostname, token, wait=0)).code == 200
    bob = await lablink.request_vm("bob", linux_command(fresh_code()))
    assert bob.body["outcome"] == "assigned"
    assert (await lablink.request_vm("bob", linux_command(fresh_code()))).body["outcome"] == "rearmed"
    assert (await lablink.request_vm("carol", "not a command")).code == 400
    assert (await lablink.request_vm("dave", linux_command(fresh_code()))).code == 200
    assert (await lablink.request_vm("erin", linux_command(fresh_code()))).code == 503

    def deltas(samples):
        return {outcome: _value(samples, "lablink_assignment_requests_total", outcome=outcome)
                - _value(before, "lablink_assignment_requests_total", outcome=outcome)
                for outcome in ("assigned", "rearmed", "unchanged", "no_vm_free", "bad_command",
                                "code_already_used")}

    async def settled():
        samples = await _metrics(lablink)
        fleet = {status: _value(samples, "lablink_vms", status=status)
                 for status in ("available", "assigned", "active", "configuring", "failed")}
        return samples if fleet == {"available": 0, "assigned": 2, "active": 1, "configuring": 0,
                                    "failed": 0} else None

    samples = await until(settled, within=20)
    assert deltas(samples) == {"assigned": 3, "rearmed": 1, "unchanged": 0, "no_vm_free": 1,
                               "bad_command": 1, "code_already_used": 0}
    assert _value(samples, "lablink_vms_stale") == 0
    assert _value(samples, "lablink_vm_polls_waiting") == polls_before
    wakeups = (_value(samples, "lablink_wakeup_latency_seconds_count")
               - _value(before, "lablink_wakeup_latency_seconds_count"))
    assert wakeups == 1
    latency = (_value(samples, "lablink_wakeup_latency_seconds_sum")
               - _value(before, "lablink_wakeup_latency_seconds_sum"))
    assert 0 < latency < 60


@short_configure_timeout
async def test_vm_that_never_reports_is_marked_failed(lablink):
    silent = await lablink.enroll("quiet-vm")
    assert (await lablink.poll("quiet-vm", silent, wait=0)).code == 200
    timeouts_before = (await _metrics(lablink)).get(("lablink_configure_timeouts_total", ()), 0.0)
    reply = await lablink.request_vm("alice", linux_command(fresh_code()))
    assert reply.body["hostname"] == "quiet-vm"
    # The VM never polls again: the sweep gives up on it once configure_timeout has passed.
    view = await lablink.wait_for_status("alice", "failed", within=30)
    assert "did not respond" in view["error"] and view["pin"] == reply.body["pin"]
    (vm,) = (await lablink.call("GET", "lablink/api/vms", user=INSTRUCTOR)).body["vms"]
    assert vm["status"] == "failed" and "did not respond" in vm["last_error"] and vm["user"] == "alice"
    assert query(lablink.database_url, "SELECT crd_code FROM vms") == [(None,)]
    events = query(lablink.database_url, "SELECT actor, action, detail FROM events ORDER BY id")
    assert events[-1] == ("system", "failed", "no report within 2 s")
    samples = await _metrics(lablink)
    assert samples[("lablink_configure_timeouts_total", ())] - timeouts_before == 1

    # A VM that took the code but never reported (configuring) is failed the same way.
    token = await lablink.enroll("slow-vm")
    assert (await lablink.poll("slow-vm", token, wait=0)).code == 200
    assert (await lablink.request_vm("bob", linux_command(fresh_code()))).body["hostname"] == "slow-vm"
    assert (await lablink.poll("slow-vm", token, wait=0)).body["status"] == "assigned"
    view = await lablink.wait_for_status("bob", "failed", within=30)
    assert "did not respond" in view["error"]
    late = await lablink.call("POST", "lablink/api/vm_status", token=token, json_body={
        "hostname": "slow-vm", "status": "active", "work_id": 1})
    assert late.code == 409

    # Released, the silent VM waits for its teardown report and is never handed out meanwhile.
    assert (await lablink.call("POST", "lablink/api/release", user="alice")).code == 200
    assert (await lablink.request_vm("alice", linux_command(fresh_code()))).code == 503


@short_configure_timeout
async def test_sweeps_from_many_processes_fail_a_vm_once(lablink):
    token = await lablink.enroll("race-vm")
    assert (await lablink.poll("race-vm", token, wait=0)).code == 200
    assert (await lablink.request_vm("alice", linux_command(fresh_code()))).code == 200
    query(lablink.database_url, "UPDATE vms SET code_received_at = now() - interval '1 hour'")
    # Every allocator process sweeps (this server's own sweep too); run at once, they fail the VM once.
    results = await asyncio.gather(*(lablink.allocator.db.fail_unresponsive(2.0, "The VM did not respond.")
                                     for _ in range(6)))
    assert sum(len(r) for r in results) <= 1
    await lablink.wait_for_status("alice", "failed", within=30)
    assert query(lablink.database_url,
                 "SELECT count(*) FROM events WHERE actor = 'system' AND action = 'failed'") == [(1,)]
