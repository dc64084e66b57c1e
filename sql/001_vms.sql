-- The fleet: one row a VM, and the audit log of everything that happened to it.
-- PostgreSQL is the only source of truth; allocator processes keep no state.

CREATE TABLE vms (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hostname        text NOT NULL UNIQUE
                    CHECK (hostname ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$'
                           AND length(hostname) <= 253),
    -- mirrored by lablink_jupyter.statuses.VmStatus
    status          text NOT NULL DEFAULT 'provisioning'
                    CHECK (status IN ('provisioning', 'available', 'assigned', 'configuring',
                                      'active', 'failed', 'released', 'retired')),
    assigned_user   text,
    crd_code        text,
    -- sha256 of the last code handed to this VM: a code works once, so it is refused if pasted again
    code_digest     text,
    pin             text CHECK (pin ~ '^[0-9]{6,12}$'),
    -- bumps with every new piece of work, so a late report about old work is recognised
    work_id         bigint NOT NULL DEFAULT 0,
    token_hash      text,
    last_error      text,
    last_seen_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    status_changed_at timestamptz NOT NULL DEFAULT now(),
    assigned_at     timestamptz,
    code_received_at timestamptz,
    delivered_at    timestamptz,
    active_at       timestamptz,
    failed_at       timestamptz,
    released_at     timestamptz,
    retired_at      timestamptz,
    -- a student holds the VM exactly while assigned_user is set
    CHECK ((assigned_user IS NOT NULL) = (status IN ('assigned', 'configuring', 'active', 'failed'))),
    CHECK (crd_code IS NULL OR status IN ('assigned', 'configuring'))
);

-- One VM per student at a time.
CREATE UNIQUE INDEX vms_one_per_user ON vms (assigned_user) WHERE assigned_user IS NOT NULL;
-- A code goes to one VM: two VMs never hold the same code.
CREATE UNIQUE INDEX vms_one_per_code ON vms (code_digest) WHERE code_digest IS NOT NULL;
-- The pick of a free VM scans only free VMs.
CREATE INDEX vms_available ON vms (last_seen_at) WHERE status = 'available';

CREATE TABLE events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,          -- a username, 'vm:<hostname>' or 'system'
    action      text NOT NULL,          -- e.g. 'assigned', 'delivered', 'active', 'released'
    vm_id       bigint REFERENCES vms (id) ON DELETE SET NULL,
    hostname    text,
    detail      text                    -- never a code, a PIN or a token
);
CREATE INDEX events_vm ON events (vm_id, id);

-- Settings the allocator processes share (the fleet enrollment token when none is configured).
CREATE TABLE fleet_settings (
    name    text PRIMARY KEY,
    value   text NOT NULL
);

-- Tell listeners a VM changed. The payload carries id, hostname and status only:
-- any session that LISTENs can read it, so never the code or the PIN.
CREATE FUNCTION vms_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    payload text := json_build_object('id', NEW.id, 'hostname', NEW.hostname,
                                      'status', NEW.status)::text;
BEGIN
    PERFORM pg_notify('vm_updates_' || NEW.id, payload);
    PERFORM pg_notify('vm_updates', payload);
    RETURN NULL;
END;
$$;

CREATE TRIGGER vms_notify_insert AFTER INSERT ON vms
    FOR EACH ROW EXECUTE FUNCTION vms_notify();
CREATE TRIGGER vms_notify_update AFTER UPDATE ON vms
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.work_id IS DISTINCT FROM NEW.work_id
          OR OLD.assigned_user IS DISTINCT FROM NEW.assigned_user)
    EXECUTE FUNCTION vms_notify();
