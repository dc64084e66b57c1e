-- Google's codes work once. Remember a digest of every code handed to a VM, so a code
-- pasted again -- by the same student after a release, or by another -- is refused,
-- not sent to a VM that start-host would fail on. Rows older than a week are pruned.
CREATE TABLE used_codes (
    digest  text PRIMARY KEY,
    used_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO used_codes (digest)
SELECT code_digest FROM vms WHERE code_digest IS NOT NULL
ON CONFLICT DO NOTHING;
