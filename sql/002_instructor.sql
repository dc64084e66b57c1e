-- What instructors need: the history of every assignment (for the CSV export), and a
-- channel that tells dashboards a new audit event was written.

-- One row per time a student held a VM, kept up by a trigger on vms so that every
-- path that changes a VM (student, instructor, VM report, timeout sweep) records it
-- in the same transaction as the change.
CREATE TABLE assignments (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vm_id       bigint REFERENCES vms (id) ON DELETE SET NULL,
    hostname    text NOT NULL,
    username    text NOT NULL,
    assigned_at timestamptz NOT NULL,
    active_at   timestamptz,                -- the first time the VM reported CRD up
    codes       integer NOT NULL DEFAULT 1, -- codes pasted while holding it (a re-arm adds one)
    failures    integer NOT NULL DEFAULT 0, -- times it went to failed while held
    ended_at    timestamptz,
    ended_as    text                        -- the VM's status when it was let go
);
-- A VM has at most one assignment in progress.
CREATE UNIQUE INDEX assignments_open ON assignments (vm_id) WHERE ended_at IS NULL;
CREATE INDEX assignments_by_host ON assignments (hostname, assigned_at);

-- VMs held when this migration runs get their assignment in progress.
INSERT INTO assignments (vm_id, hostname, username, assigned_at, active_at)
SELECT id, hostname, assigned_user, coalesce(assigned_at, status_changed_at),
       CASE WHEN status = 'active' THEN active_at END
FROM vms WHERE assigned_user IS NOT NULL;

CREATE FUNCTION vms_assignment_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.assigned_user IS NOT NULL AND OLD.assigned_user IS DISTINCT FROM NEW.assigned_user THEN
        UPDATE assignments SET ended_at = now(), ended_as = NEW.status
         WHERE vm_id = OLD.id AND ended_at IS NULL;
    END IF;
    IF NEW.assigned_user IS NOT NULL THEN
        IF OLD.assigned_user IS DISTINCT FROM NEW.assigned_user THEN
            INSERT INTO assignments (vm_id, hostname, username, assigned_at)
            VALUES (NEW.id, NEW.hostname, NEW.assigned_user, coalesce(NEW.assigned_at, now()));
        ELSIF OLD.work_id IS DISTINCT FROM NEW.work_id THEN
            UPDATE assignments SET codes = codes + 1 WHERE vm_id = NEW.id AND ended_at IS NULL;
        END IF;
        IF NEW.status = 'active' AND OLD.status IS DISTINCT FROM 'active' THEN
            UPDATE assignments SET active_at = coalesce(active_at, NEW.active_at, now())
             WHERE vm_id = NEW.id AND ended_at IS NULL;
        ELSIF NEW.status = 'failed' AND OLD.status IS DISTINCT FROM 'failed' THEN
            UPDATE assignments SET failures = failures + 1 WHERE vm_id = NEW.id AND ended_at IS NULL;
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER vms_assignment_history AFTER UPDATE ON vms
    FOR EACH ROW
    WHEN (OLD.assigned_user IS DISTINCT FROM NEW.assigned_user
          OR OLD.work_id IS DISTINCT FROM NEW.work_id
          OR OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION vms_assignment_history();

-- Newest-first pages filtered by VM.
CREATE INDEX events_by_host ON events (hostname, id);

-- Tell dashboards an event was written. The payload is the event's id only: what
-- happened is read from the table, by those allowed to read it.
CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('lablink_events', NEW.id::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_notify();
