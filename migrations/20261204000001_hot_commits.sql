-- Commits, reverses and expiries become HOT updates (issue 8): no index of `transactions` names a column they
-- change, and pages keep room for the new row version.
--
-- The partial index of open holds (`WHERE state = 1`) named `state`, so every state change wrote a new row
-- version elsewhere plus two index entries, and left a dead row for vacuum. It is replaced by an index on
-- (account_id, expires_at), columns a hold never changes, read from a cursor per account:
--
--   every hold of an account expiring at or before the account's `updated_at` has been released.
--
-- A batch that writes an account has loaded and released every hold of it expiring by its `now`, and writes
-- `updated_at = now`; a hold made later expires after that (a batch never decides before the accounts' last
-- write). So a refresh reads only the holds expiring in (updated_at, now], each once.
--
-- What the partial index also served:
--   * the sweeper's search for idle accounts with expired holds: `holds_until`, the latest expiry of a hold
--     placed on the account (NULL: none since it was last retired). Only accounts with
--     updated_at < holds_until can have an unreleased hold.
--   * the open-holds gauge: `open_holds`, the account's holds that are neither committed, reversed nor
--     released (counted on the transaction's first key, as the gauge counted them).
--   * retention's check that an old partition has no open hold: probes by account (see history.rs).

ALTER TABLE accounts ADD COLUMN IF NOT EXISTS holds_until timestamptz;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS open_holds integer NOT NULL DEFAULT 0;

-- The cursor must hold for the data as it stands: an account with an open hold expiring at or before its
-- last write (written so by an older binary, or by hand) starts its cursor just before that hold.
UPDATE accounts a
SET updated_at = LEAST(a.updated_at, h.first_expiry - interval '1 microsecond'),
    holds_until = h.last_expiry,
    open_holds = h.open
FROM (SELECT account_id, min(expires_at) AS first_expiry, max(expires_at) AS last_expiry,
             count(*) FILTER (WHERE position = 0) AS open
      FROM transactions WHERE state = 1 GROUP BY account_id) h
WHERE a.id = h.account_id;

CREATE INDEX transactions_account_expiry ON transactions (account_id, expires_at);
DROP INDEX transactions_open_holds;

-- Room on each page for the committed version of the rows inserted there (HOT needs the same page). Applies
-- to pages written from now on; partitions made later get it from the function below.
DO $$
DECLARE
    p text;
BEGIN
    FOR p IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'transactions'::regclass LOOP
        EXECUTE format('ALTER TABLE %I SET (fillfactor = 80)', p);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION transactions_create_partition(name text, lower timestamptz, upper timestamptz)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM transactions_partitions p WHERE p.name = transactions_create_partition.name) THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE transactions INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', name);
    EXECUTE format('ALTER TABLE %I SET (autovacuum_analyze_scale_factor = 0.02, '
                   'autovacuum_analyze_threshold = 1000, fillfactor = 80)', name);
    IF EXISTS (SELECT 1 FROM pg_class WHERE relname = 'transactions_default') THEN
        EXECUTE format('WITH moved AS (DELETE FROM transactions_default WHERE created_at >= $1 AND created_at < $2
                                       RETURNING *)
                        INSERT INTO %I SELECT * FROM moved', name) USING lower, upper;
    END IF;
    EXECUTE format('ALTER TABLE transactions ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   name, lower, upper);
    RETURN true;
END
$$;
