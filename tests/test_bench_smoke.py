"""The benchmark scripts still work: each runs at N = 50 on the test PostgreSQL and prints its JSON.

Only the shape of the answer and the design's invariants are checked (connections
held, every waiter healthy, no wrong assignment); timings are for the benchmarks
themselves, never for tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp", reason="the benchmarks need the 'bench' extra")

# Each run starts allocator processes of its own (about a minute in all).
pytestmark = pytest.mark.slow

BENCH = Path(__file__).parent / "bench"


def run_bench(script: str, database_url: str, *args: str) -> dict[str, Any]:
    """Run one benchmark script against `database_url` and parse what it prints."""
    completed = subprocess.run(
        [sys.executable, str(BENCH / script), "--database-url", database_url, *args],
        capture_output=True, text=True, timeout=240, cwd=BENCH, stdin=subprocess.DEVNULL,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result: dict[str, Any] = json.loads(completed.stdout)
    assert result["benchmark"] == script.removesuffix(".py")
    assert {"cpus", "cpu_model", "load_average_at_start"} <= set(result["machine"])
    assert result["postgres"]["max_connections"] > 0
    return result


def test_waiters(postgres_server: str) -> None:
    result = run_bench("waiters.py", postgres_server, "--sizes", "50", "--poll-timeout", "2",
                       "--idle-seconds", "0.5")
    (one,) = result["results"]
    assert one["waiters"] == 50 and one["allocator"] == "lablink"
    assert one["health_after_windows"]["all_healthy"], one["health_after_windows"]
    assert one["health_after_windows"]["errors"] == {}
    assert one["pg_connections"]["peak"] <= 3
    assert one["pg_connections"]["by_name"]["lablink-listener"] == 1
    assert one["threads"]["while_waiting"] >= 1 and one["rss_mb"]["after_windows"] > 0
    assert {"allocator_cpu_percent", "postgres_cpu_percent", "allocator_cpu_ms_per_window_end"} <= set(one["steady"])


def test_wakeup(postgres_server: str) -> None:
    result = run_bench("wakeup.py", postgres_server, "--sizes", "50", "--assignments", "10")
    (one,) = result["results"]
    assert one["delivered"] == 10 and one["errors"] == {} and one["delivered_to_another_vm"] == 0
    for name in ("request_sent_to_vm_answered", "student_answered_to_vm_answered", "student_request"):
        assert one[name]["count"] == 10 and {"p50_ms", "p99_ms", "max_ms"} <= set(one[name])
    assert one["allocator_cpu_ms_per_assignment"] > 0


def test_burst(postgres_server: str) -> None:
    result = run_bench("burst.py", postgres_server, "--sizes", "50")
    (one,) = result["results"]
    assert one["all_correct"], one
    assert one["codes_delivered"] == 50 and one["errors"] == {}
    assert one["time_to_code"]["count"] == 50


def test_baseline(postgres_server: str) -> None:
    result = run_bench("baseline.py", postgres_server, "--waiters", "50", "--wakeup", "50",
                       "--assignments", "5", "--poll-timeout", "2", "--idle-seconds", "0.5")
    (waiting,) = result["side_by_side"]["waiters"]
    assert waiting["lablink"]["pg_connections"] <= 3 and waiting["lablink"]["all_healthy"]
    # The design replaced: a connection and a thread for every waiting VM.
    assert waiting["thread_per_waiter"]["pg_connections_per_held_waiter"] >= 1
    assert waiting["thread_per_waiter"]["threads"] > waiting["thread_per_waiter"]["held_after_two_windows"]
    (woken,) = result["side_by_side"]["wakeup"]
    assert woken["lablink"]["delivered"] == 5 and woken["thread_per_waiter"]["delivered"] == 5
    assert set(woken["thread_per_waiter_over_lablink"]) == {"p99", "allocator_cpu_per_assignment",
                                                             "postgres_cpu_per_assignment"}
