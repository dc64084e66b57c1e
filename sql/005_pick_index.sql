-- The pick of a free VM (db._PICK_ORDER) reads the first entry of this index instead of
-- sorting every free VM: with 5,000 VMs waiting the sort was most of an assignment's
-- PostgreSQL time, and it grew with the fleet. The expression must stay identical to the
-- ORDER BY for the planner to use it. It replaces the index on last_seen_at alone: each
-- poll rewrites last_seen_at, so each index on it is one more write per poll.
DROP INDEX IF EXISTS vms_available;
CREATE INDEX vms_pick ON vms (((disconnected_at IS NOT NULL AND disconnected_at >= last_seen_at)), last_seen_at DESC)
    WHERE status = 'available';
