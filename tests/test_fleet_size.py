"""What an assignment costs PostgreSQL does not grow with the number of free VMs."""

from __future__ import annotations

from typing import Any

import psycopg

from lablink_jupyter import db

FREE_VMS = 3000


def _rows_read_from_vms(plan: dict[str, Any]) -> int:
    """Rows every scan of the vms table produced, over all its loops."""
    total = 0
    if plan.get("Relation Name") == "vms" and "Scan" in plan["Node Type"]:
        total += plan["Actual Rows"] * plan["Actual Loops"]
    for child in plan.get("Plans", []):
        total += _rows_read_from_vms(child)
    return total


def _plan_nodes(plan: dict[str, Any]) -> list[str]:
    return [plan["Node Type"], *(node for child in plan.get("Plans", []) for node in _plan_nodes(child))]


async def test_picking_a_free_vm_reads_one_row_however_many_are_free(empty_database):
    await db.Database(empty_database).migrate()
    with psycopg.connect(empty_database, autocommit=True) as conn:
        # Seen at different moments, as a real fleet is; the most recently seen goes first.
        conn.execute(
            "INSERT INTO vms (hostname, status, token_hash, last_seen_at)"
            " SELECT 'lab-vm-' || n, 'available', md5(n::text), now() - n * interval '1 ms'"
            " FROM generate_series(1, %s) AS n",
            (FREE_VMS,),
        )
        conn.execute("ANALYZE vms")
        params = {"stale_after": 150, "user": "alice", "code": "4/0AVG7fiQ3xampleCode",
                  "digest": db.code_digest("4/0AVG7fiQ3xampleCode"), "pin": "123456",
                  "lock_space": db.USER_LOCK_SPACE}
        with conn.transaction(force_rollback=True):
            (plan_json,) = conn.execute(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + db._ASSIGN_FREE_VM, params  # noqa: SLF001
            ).fetchone()
            picked = conn.execute("SELECT hostname FROM vms WHERE assigned_user = 'alice'").fetchone()
    plan = plan_json[0]["Plan"]
    assert picked == ("lab-vm-1",)
    assert "Sort" not in _plan_nodes(plan)
    # The pick's first index entry, the claimed row by its key: a handful, not thousands.
    assert _rows_read_from_vms(plan) <= 3, plan
