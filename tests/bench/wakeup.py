"""Benchmark `wakeup`: with N VMs waiting, assignments one after another; how fast does the VM hear?

For each N: a fresh allocator process with N VMs polling, then A students ask
for a VM one after another (each waits until the VM it was given has received
the code, as the VM then reports `active` and polls again). For each assignment:
student request sent → VM's answer arrived (the target), student's answer
arrived → VM's answer arrived (negative when the VM hears first), and the
student's own request time. Also the CPU per assignment, of the allocator and
of PostgreSQL, to show whether it grows with N. Prints JSON.

    python tests/bench/wakeup.py                                  # N = 100, 1000; A = N/2 up to 500
    python tests/bench/wakeup.py --sizes 1000,5000,10000 --assignments 500
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import harness
from harness import DatabaseProbe, ServerProcess


async def measure_wakeup(server: ServerProcess, probe: DatabaseProbe, count: int, assignments: int,
                         poll_timeout: float, *, prefix: str = "bench-vm",
                         profile: Path | None = None) -> dict[str, Any]:
    """`assignments` students in a row against `count` waiting VMs on `server`."""
    result: dict[str, Any] = {"allocator": server.kind, "waiters": count, "assignments": assignments}
    sent_to_vm: list[float] = []
    answered_to_vm: list[float] = []
    student: list[float] = []
    errors: dict[str, int] = {}
    wrong = 0
    async with harness.fleet_running(server, count, read_timeout=poll_timeout + 60,
                                     prefix=prefix) as (fleet, session, timings):
        result.update(timings)
        result["settled"] = await harness.settled(probe, fleet, within=30 + count / 100)
        profiler = harness.Profiler(server.pid, profile)
        profiler.start()
        cpu0, pg0, t0 = server.cpu_seconds(), probe.postgres_cpu_seconds(), time.perf_counter()
        for n in range(assignments):
            answer = await harness.request_vm(session, server, f"{prefix}-student-{n}@example.edu")
            if answer.status != 200:
                key = f"HTTP {answer.status}"
                errors[key] = errors.get(key, 0) + 1
                continue
            delivery = await fleet.delivered(answer.code, within=poll_timeout)
            if delivery is None:
                errors["not delivered"] = errors.get("not delivered", 0) + 1
                continue
            if delivery.hostname != answer.body.get("hostname"):
                wrong += 1
            student.append(answer.answered - answer.sent)
            sent_to_vm.append(delivery.at - answer.sent)
            answered_to_vm.append(delivery.at - answer.answered)
        wall = time.perf_counter() - t0
        await asyncio.sleep(0.5)  # the last VM's report and its next poll belong to its assignment
        cpu1, pg1 = server.cpu_seconds(), probe.postgres_cpu_seconds()
        profiler.stop()
        result["sample"] = await asyncio.to_thread(harness.Sampler(server, probe).sample)
        result["vm_errors"] = fleet.error_summary()
    done = len(sent_to_vm)
    result.update({
        "delivered": done,
        "errors": errors,
        "delivered_to_another_vm": wrong,
        "seconds": round(wall, 2),
        "request_sent_to_vm_answered": harness.percentiles(sent_to_vm),
        "student_answered_to_vm_answered": harness.percentiles(answered_to_vm),
        "student_request": harness.percentiles(student),
        "allocator_cpu_ms_per_assignment": round(1000 * (cpu1 - cpu0) / done, 3) if done else None,
        "postgres_cpu_ms_per_assignment": (round(1000 * (pg1 - pg0) / done, 3)
                                           if done and pg0 is not None and pg1 is not None else None),
    })
    return result


def assignments_for(args: argparse.Namespace, count: int) -> int:
    """How many students ask in a row with `count` VMs waiting."""
    return int(args.assignments or min(500, max(1, count // 2)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every size, each on a fresh allocator process and an emptied fleet."""
    def measure(server: ServerProcess, probe: DatabaseProbe, count: int, profile: Path | None) -> Any:
        return measure_wakeup(server, probe, count, assignments_for(args, count), args.poll_timeout,
                              profile=profile)
    return harness.run_each_size(
        args, "wakeup", measure, label=lambda count: f"N = {count}, {assignments_for(args, count)} assignments")


def main() -> None:
    """Parse the options, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=harness.sizes, default=[100, 1000], help="numbers of waiting VMs")
    parser.add_argument("--assignments", type=int, default=0,
                        help="assignments per size (default: half the VMs, at most 500)")
    parser.add_argument("--poll-timeout", type=float, default=120.0,
                        help="the allocator's poll window; longer than the run, so no window ends inside it")
    harness.parse_and_run(parser, run)


if __name__ == "__main__":
    main()
