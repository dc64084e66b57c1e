-- When an allocator sees a VM's long-poll connection close with no answer (the VM
-- process died, the VM shut down, or it is restarting), it notes the moment. Until the
-- VM polls again, other free VMs are handed out before it.
ALTER TABLE vms ADD COLUMN disconnected_at timestamptz;
