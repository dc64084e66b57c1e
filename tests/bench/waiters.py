"""Benchmark `waiters`: N simulated VMs long-poll one allocator process; what does holding them cost?

For each N: a fresh allocator process, N VMs enrolled and polling. Reports the
PostgreSQL connections the allocator holds (pg_stat_activity), its threads and
RSS, its CPU (and PostgreSQL's) while every VM waits quietly, the steady cost
over two poll windows (each window ends with a re-poll), and whether every
waiter is still healthy after those windows. Prints JSON.

    python tests/bench/waiters.py                                   # N = 100, 1000; ~1 min
    python tests/bench/waiters.py --sizes 100,1000,5000,10000 --poll-timeout 45
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import harness
from harness import DatabaseProbe, Fleet, Sampler, ServerProcess, log


async def measure_waiters(server: ServerProcess, probe: DatabaseProbe, count: int, poll_timeout: float,
                          *, windows: int = 2, idle_seconds: float = 10.0,
                          prefix: str = "bench-vm", profile: Path | None = None) -> dict[str, Any]:
    """Hold `count` waiting VMs on `server` for `windows` poll windows and measure the cost."""
    sampler = Sampler(server, probe)
    empty = sampler.sample()
    sampler.start()
    result: dict[str, Any] = {"allocator": server.kind, "waiters": count, "poll_timeout_s": poll_timeout}
    try:
        async with harness.fleet_running(server, count, read_timeout=poll_timeout + 60,
                                         prefix=prefix) as (fleet, session, timings):
            result.update(timings)
            profiler = harness.Profiler(server.pid, profile)
            profiler.start()
            start = (server.cpu_seconds(), probe.postgres_cpu_seconds(), time.perf_counter())
            result["idle"] = await _idle(server, probe, fleet, sampler, poll_timeout, idle_seconds)
            result["steady"], completed = await _windows(server, probe, fleet, poll_timeout, windows, start)
            profiler.stop()
            held = 0
            for _ in range(10):  # the last re-polls may still be on their way in
                said = await harness.health(session, server)
                held = max(held, int(said.get("vm_polls", said.get("waiters", 0))))
                if held >= count:
                    break
                await asyncio.sleep(0.5)
            healthy = fleet.healthy()
            handed_out = probe.seen_within(server.stale_after)
            result["health_after_windows"] = {
                "windows": windows,
                "vms_that_completed_the_windows": completed,
                "vms_polling_now": fleet.in_poll(),
                "vms_healthy": healthy,
                "allocator_holds": held,
                "seen_by_database_within_a_window": probe.seen_within(poll_timeout + 5),
                "could_be_handed_out": handed_out,
                "errors": fleet.error_summary(),
                "all_healthy": completed == count and healthy == count and held >= count and handed_out == count,
            }
            final = sampler.sample()
    finally:
        await sampler.stop()
    idle = result["idle"]
    result["pg_connections"] = {"while_waiting": idle["sample"]["pg_connections"],
                                "by_name": idle["sample"]["pg_connections_by_name"],
                                "peak": sampler.peak_connections,
                                "per_waiter": round(idle["sample"]["pg_connections"] / count, 3)}
    result["threads"] = {"empty": empty["threads"], "while_waiting": idle["sample"]["threads"],
                         "peak": sampler.peak_threads}
    result["rss_mb"] = {"empty": empty["rss_mb"], "while_waiting": idle["sample"]["rss_mb"],
                        "after_windows": final["rss_mb"], "peak": sampler.peak_rss_mb,
                        "per_waiter_kb": round((final["rss_mb"] - empty["rss_mb"]) * 1024 / count, 1)}
    del idle["sample"]
    return result


async def _idle(server: ServerProcess, probe: DatabaseProbe, fleet: Fleet, sampler: Sampler,
                poll_timeout: float, idle_seconds: float) -> dict[str, Any]:
    """CPU while every VM waits and no window ends: the cost of merely holding them."""
    # Polls are held before their first read is done: wait until the database has seen every VM.
    await harness.until(lambda: probe.seen_within(poll_timeout) >= len(fleet.vms), within=poll_timeout)
    await asyncio.sleep(0.5)
    quiet_until = (fleet.first_poll_at or time.perf_counter()) + poll_timeout - 0.5
    span = min(idle_seconds, quiet_until - time.perf_counter())
    sample = await asyncio.to_thread(sampler.sample)
    if span < 0.5:
        return {"seconds_measured": 0.0, "allocator_cpu_percent": None, "postgres_cpu_percent": None,
                "note": "no quiet moment: the ramp took most of a poll window", "sample": sample}
    cpu0, pg0, t0 = server.cpu_seconds(), probe.postgres_cpu_seconds(), time.perf_counter()
    await asyncio.sleep(span)
    cpu1, pg1, t1 = server.cpu_seconds(), probe.postgres_cpu_seconds(), time.perf_counter()
    wall = t1 - t0
    return {
        "seconds_measured": round(wall, 2),
        "allocator_cpu_percent": round(100 * (cpu1 - cpu0) / wall, 2),
        "postgres_cpu_percent": round(100 * (pg1 - pg0) / wall, 2) if pg0 is not None and pg1 is not None else None,
        "sample": sample,
    }


async def _windows(server: ServerProcess, probe: DatabaseProbe, fleet: Fleet, poll_timeout: float,
                   windows: int, start: tuple[float, float | None, float]) -> tuple[dict[str, Any], int]:
    """Run until every VM has seen `windows` windows end (or progress stops); CPU since `start`."""
    cpu0, pg0, t0 = start
    deadline = time.monotonic() + windows * (poll_timeout + len(fleet.vms) / 200) + 30
    last_progress, last_done = time.monotonic(), -1
    while time.monotonic() < deadline:
        done = sum(vm.waiting_answers >= windows for vm in fleet.vms)
        if done == len(fleet.vms):
            break
        if done != last_done:
            last_done, last_progress = done, time.monotonic()
        elif done > 0 and time.monotonic() - last_progress > poll_timeout + 5:
            break  # the rest are not coming: they are failing, not waiting
        await asyncio.sleep(0.2)
    cpu1, pg1, t1 = server.cpu_seconds(), probe.postgres_cpu_seconds(), time.perf_counter()
    done = sum(vm.waiting_answers >= windows for vm in fleet.vms)
    repolls = sum(vm.waiting_answers for vm in fleet.vms)
    wall = t1 - t0
    log(f"{server.kind}: {done}/{len(fleet.vms)} VMs completed {windows} windows in {wall:.1f} s")
    return {
        "seconds": round(wall, 2),
        "window_ends_answered": repolls,
        "allocator_cpu_percent": round(100 * (cpu1 - cpu0) / wall, 2),
        "postgres_cpu_percent": round(100 * (pg1 - pg0) / wall, 2) if pg0 is not None and pg1 is not None else None,
        "allocator_cpu_ms_per_window_end": round(1000 * (cpu1 - cpu0) / repolls, 3) if repolls else None,
    }, done


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every size, each on a fresh allocator process and an emptied fleet."""
    def measure(server: ServerProcess, probe: DatabaseProbe, count: int, profile: Path | None) -> Any:
        return measure_waiters(server, probe, count, args.poll_timeout, windows=args.windows,
                               idle_seconds=args.idle_seconds, profile=profile)
    return harness.run_each_size(args, "waiters", measure)


def main() -> None:
    """Parse the options, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=harness.sizes, default=[100, 1000], help="numbers of VMs, e.g. 100,1000,5000,10000")
    parser.add_argument("--poll-timeout", type=float, default=10.0, help="the allocator's poll window, seconds")
    parser.add_argument("--windows", type=int, default=2, help="poll windows every VM must live through")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="longest span to measure idle CPU over")
    harness.parse_and_run(parser, run)


if __name__ == "__main__":
    main()
