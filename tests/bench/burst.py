"""Benchmark `burst`: the class starts — S students ask at the same instant, S VMs wait.

For each S: a fresh allocator process with S VMs polling; the students' HTTP
connections are opened beforehand (as their browsers or the Hub's proxy hold
them), then every student's request is sent at once. Reports per student the
time from the burst until their VM had its code, and until their own answer;
whether every assignment is right (no VM twice, no student twice, each code
reached the VM its student was told); and every error. Prints JSON.

    python tests/bench/burst.py                     # S = 100, 500
    python tests/bench/burst.py --sizes 500,1000
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import harness
from harness import DatabaseProbe, ServerProcess


async def measure_burst(server: ServerProcess, probe: DatabaseProbe, count: int, poll_timeout: float,
                        *, within: float = 30.0, prefix: str = "bench-vm",
                        profile: Path | None = None) -> dict[str, Any]:
    """`count` students at once against `count` waiting VMs on `server`."""
    result: dict[str, Any] = {"allocator": server.kind, "students": count, "vms": count}
    async with harness.fleet_running(server, count, read_timeout=poll_timeout + 60,
                                     prefix=prefix) as (fleet, session, timings):
        result.update(timings)
        result["settled"] = await harness.settled(probe, fleet, within=30 + count / 100)
        # Open the connections the burst will use (students' requests, then the VMs' reports).
        await asyncio.gather(*(harness.health(session, server) for _ in range(2 * count)))
        students = [f"{prefix}-student-{n}@example.edu" for n in range(count)]
        codes = [harness.fresh_code() for _ in students]
        profiler = harness.Profiler(server.pid, profile)
        profiler.start()
        cpu0 = server.cpu_seconds()
        started = time.perf_counter()
        answers = await asyncio.gather(*(harness.request_vm(session, server, s, c)
                                         for s, c in zip(students, codes)))
        granted = [a for a in answers if a.status == 200]
        deliveries = await asyncio.gather(*(fleet.delivered(a.code, within=within) for a in granted))
        finished = time.perf_counter()
        await asyncio.sleep(0.5)
        cpu1 = server.cpu_seconds()
        profiler.stop()
        held = await asyncio.to_thread(probe.assignments)
        result["vm_errors"] = fleet.error_summary()
        codes_per_vm = Counter(d.hostname for d in fleet.by_code_deliveries())

    to_code = [d.at - started for d in deliveries if d is not None]
    told = {a.student: a.body.get("hostname") for a in granted}
    wrong_vm = sum(1 for a, d in zip(granted, deliveries) if d is not None and d.hostname != told[a.student])
    hostnames = Counter(told.values())
    held_by = Counter(student for student, _ in held)
    held_vms = Counter(hostname for _, hostname in held)
    errors = Counter(f"HTTP {a.status}" for a in answers if a.status != 200)
    result.update({
        "granted": len(granted),
        "codes_delivered": len(to_code),
        "seconds_until_every_vm_had_its_code": round(finished - started, 3) if len(to_code) == count else None,
        "time_to_code": harness.percentiles(to_code),
        "time_to_student_answer": harness.percentiles([a.answered - started for a in granted]),
        "correct": {
            "no_vm_given_twice": all(n == 1 for n in hostnames.values()) and all(n == 1 for n in held_vms.values()),
            "no_student_given_two": all(n == 1 for n in held_by.values()) and len(told) == len(granted),
            "no_vm_received_two_codes": all(n == 1 for n in codes_per_vm.values()),
            "each_code_reached_its_students_vm": wrong_vm == 0 and len(to_code) == len(granted),
            "database_agrees": sorted(held) == sorted(told.items()),
        },
        "errors": dict(errors),
        "allocator_cpu_ms_per_assignment": round(1000 * (cpu1 - cpu0) / len(to_code), 3) if to_code else None,
    })
    result["all_correct"] = all(result["correct"].values()) and not errors and len(to_code) == count
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every size, each on a fresh allocator process and an emptied fleet."""
    def measure(server: ServerProcess, probe: DatabaseProbe, count: int, profile: Path | None) -> Any:
        return measure_burst(server, probe, count, args.poll_timeout, profile=profile)
    return harness.run_each_size(args, "burst", measure, label=lambda count: f"S = {count}")


def main() -> None:
    """Parse the options, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=harness.sizes, default=[100, 500], help="numbers of students (and of VMs)")
    parser.add_argument("--poll-timeout", type=float, default=120.0,
                        help="the allocator's poll window; longer than the run, so no window ends inside it")
    harness.parse_and_run(parser, run)


if __name__ == "__main__":
    main()
