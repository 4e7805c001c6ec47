-- Callers and the audit trail.

-- A caller is a service or an operator holding a credential `<id>:<secret>`. Only SHA-256 hashes of secrets are
-- kept (a secret is 256 random bits, so a fast hash is enough: there is nothing to brute-force). During a
-- rotation a caller has two valid secrets: `secret_hash` (the newest) and `previous_secret_hash`, until the
-- previous one is revoked. A revoked caller is kept (audit events name it) and never authenticates again.
CREATE TABLE callers (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    -- Subset of 'spend', 'read', 'admin'.
    scopes text[] NOT NULL,
    -- Keys the caller may touch, by prefix; empty = every key.
    key_prefixes text[] NOT NULL DEFAULT '{}',
    secret_hash bytea NOT NULL CHECK (length(secret_hash) = 32),
    previous_secret_hash bytea CHECK (length(previous_secret_hash) = 32),
    created_at timestamptz NOT NULL,
    rotated_at timestamptz,
    revoked_at timestamptz,
    updated_at timestamptz NOT NULL
);

-- Every change of limits, plans and callers, and every Reverse, written in the database transaction of the
-- change itself. Append-only: nothing in the service updates or deletes a row.
CREATE TABLE audit_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL,
    -- NULL when the change was made without a caller: authentication turned off, or the CLI writing to the
    -- database directly (the first admin credential).
    caller_id uuid,
    caller_name text NOT NULL,
    request_id text NOT NULL,
    -- e.g. limit.put, plan.delete, caller.revoke, transaction.reverse
    action text NOT NULL,
    key_id text COLLATE "C",
    unit text COLLATE "C",
    -- What was changed: a limit's name, a plan's name, a caller's id, a transaction's id.
    subject text NOT NULL,
    before jsonb,
    after jsonb
);
CREATE INDEX audit_events_key ON audit_events (key_id, id) WHERE key_id IS NOT NULL;
CREATE INDEX audit_events_caller ON audit_events (caller_id, id) WHERE caller_id IS NOT NULL;
CREATE INDEX audit_events_at ON audit_events (at);
