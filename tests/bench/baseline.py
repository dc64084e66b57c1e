"""Benchmark `baseline`: the `waiters` and `wakeup` runs against LabLink and the design it replaces.

The design LabLink replaces held one thread and one PostgreSQL connection per
waiting VM, blocked in select() until notified; thread_per_waiter.py rebuilds it
minimally (a threaded WSGI server on LabLink's schema, paths and trigger). Both
allocators run in the same run, one after the other, on the same PostgreSQL and
the same database (emptied in between), against the same simulated VMs and
students; the report puts them side by side with the ratios. Prints JSON.

    python tests/bench/baseline.py                                         # ~2-3 min
    python tests/bench/baseline.py --waiters 100,1000,5000,10000 --wakeup 50,1000 --max-connections 5000

With PostgreSQL's default max_connections (100) the thread-per-waiter allocator
stops near 95 waiters; with more connections, near 500 (select() cannot watch a
file descriptor above 1023, and each waiter holds two).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

import harness
import wakeup
import waiters
from harness import DatabaseProbe, Postgres, ServerProcess, log

ALLOCATORS: dict[str, Callable[..., ServerProcess]] = {
    "lablink": harness.start_lablink,
    "baseline": harness.start_baseline,
}


def _waiters_summary(r: dict[str, Any]) -> dict[str, Any]:
    held = r["health_after_windows"]["allocator_holds"]
    per_held = max(held, 1)
    return {
        "held_after_two_windows": held,
        "all_healthy": r["health_after_windows"]["all_healthy"],
        "vm_errors": r["health_after_windows"]["errors"],
        "pg_connections": r["pg_connections"]["while_waiting"],
        "pg_connections_peak": r["pg_connections"]["peak"],
        "pg_connections_per_held_waiter": round(r["pg_connections"]["while_waiting"] / per_held, 3),
        "threads": r["threads"]["while_waiting"],
        "rss_mb": r["rss_mb"]["after_windows"],
        "rss_kb_per_held_waiter": round((r["rss_mb"]["after_windows"] - r["rss_mb"]["empty"]) * 1024 / per_held, 1),
        "idle_cpu_percent": r["idle"]["allocator_cpu_percent"],
        "steady_cpu_percent": r["steady"]["allocator_cpu_percent"],
    }


def _wakeup_summary(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "delivered": r["delivered"],
        "errors": r["errors"],
        "p50_ms": r["request_sent_to_vm_answered"]["p50_ms"],
        "p99_ms": r["request_sent_to_vm_answered"]["p99_ms"],
        "max_ms": r["request_sent_to_vm_answered"]["max_ms"],
        "allocator_cpu_ms_per_assignment": r["allocator_cpu_ms_per_assignment"],
        "postgres_cpu_ms_per_assignment": r["postgres_cpu_ms_per_assignment"],
    }


def _ratio(numerator: Any, denominator: Any) -> float | None:
    if not isinstance(numerator, (int, float)) or not isinstance(denominator, (int, float)) or not denominator:
        return None
    return round(numerator / denominator, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both allocators, every size, one after the other on one database."""
    machine = harness.machine()
    raw: dict[str, dict[str, dict[int, dict[str, Any]]]] = {"waiters": {}, "wakeup": {}}
    with Postgres(args.database_url, args.max_connections) as postgres:
        database_url = postgres.create_database()
        probe = DatabaseProbe(database_url)
        try:
            for kind, start in ALLOCATORS.items():
                for count in args.waiters:
                    harness.reset_fleet(database_url)
                    log(f"baseline: {kind} waiters, N = {count}")
                    server = start(database_url, poll_timeout=args.poll_timeout)
                    with harness.running(server):
                        raw["waiters"].setdefault(kind, {})[count] = asyncio.run(waiters.measure_waiters(
                            server, probe, count, args.poll_timeout, windows=args.windows,
                            idle_seconds=args.idle_seconds, prefix=f"{kind}-vm"))
                for count in args.wakeup:
                    assignments = wakeup.assignments_for(args, count)
                    harness.reset_fleet(database_url)
                    log(f"baseline: {kind} wakeup, N = {count}, {assignments} assignments")
                    server = start(database_url, poll_timeout=args.wakeup_poll_timeout)
                    with harness.running(server):
                        raw["wakeup"].setdefault(kind, {})[count] = asyncio.run(wakeup.measure_wakeup(
                            server, probe, count, assignments, args.wakeup_poll_timeout, prefix=f"{kind}-vm"))
        finally:
            probe.close()
        described = postgres.describe()

    side_by_side: dict[str, list[dict[str, Any]]] = {"waiters": [], "wakeup": []}
    for count in args.waiters:
        ours, theirs = (_waiters_summary(raw["waiters"][k][count]) for k in ("lablink", "baseline"))
        side_by_side["waiters"].append({
            "waiters": count, "lablink": ours, "thread_per_waiter": theirs,
            "thread_per_waiter_over_lablink": {
                "pg_connections_per_waiter": _ratio(theirs["pg_connections_per_held_waiter"],
                                                    ours["pg_connections_per_held_waiter"]),
                "rss_per_waiter": _ratio(theirs["rss_kb_per_held_waiter"], ours["rss_kb_per_held_waiter"]),
                "threads": _ratio(theirs["threads"], ours["threads"]),
            },
        })
    for count in args.wakeup:
        ours, theirs = (_wakeup_summary(raw["wakeup"][k][count]) for k in ("lablink", "baseline"))
        side_by_side["wakeup"].append({
            "waiters": count, "lablink": ours, "thread_per_waiter": theirs,
            "thread_per_waiter_over_lablink": {
                "p99": _ratio(theirs["p99_ms"], ours["p99_ms"]),
                "allocator_cpu_per_assignment": _ratio(theirs["allocator_cpu_ms_per_assignment"],
                                                       ours["allocator_cpu_ms_per_assignment"]),
                "postgres_cpu_per_assignment": _ratio(theirs["postgres_cpu_ms_per_assignment"],
                                                      ours["postgres_cpu_ms_per_assignment"]),
            },
        })
    for section in raw.values():
        for per_kind in section.values():
            for result in per_kind.values():
                result.pop("sample", None)
    return {"benchmark": "baseline", "machine": machine, "postgres": described,
            "side_by_side": side_by_side,
            "details": {section: {kind: list(per.values()) for kind, per in kinds.items()}
                        for section, kinds in raw.items()}}


def main() -> None:
    """Parse the options, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waiters", type=harness.sizes, default=[100, 200], help="sizes of the waiters run")
    parser.add_argument("--wakeup", type=harness.sizes, default=[50, 1000], help="sizes of the wakeup run")
    parser.add_argument("--assignments", type=int, default=0,
                        help="assignments per wakeup size (default: half the VMs, at most 500)")
    parser.add_argument("--poll-timeout", type=float, default=5.0, help="poll window of the waiters run")
    parser.add_argument("--windows", type=int, default=2, help="poll windows every VM must live through")
    parser.add_argument("--idle-seconds", type=float, default=2.0, help="longest span to measure idle CPU over")
    parser.add_argument("--wakeup-poll-timeout", type=float, default=120.0, help="poll window of the wakeup run")
    harness.parse_and_run(parser, run)


if __name__ == "__main__":
    main()
