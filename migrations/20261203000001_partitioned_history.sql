-- History partitioned by time (issue 11): `transactions` becomes a table partitioned by range of created_at, so
-- old months can be detached and dropped (`allowance retention run`) instead of growing for ever.
--
-- The table as it stands becomes the first partition, `transactions_legacy`, covering everything before the
-- first day of the month after the later of today and its newest row (UTC): its rows are not copied. Monthly
-- partitions `transactions_YYYYMM` follow, created ahead of time by the service, and `transactions_default`
-- takes any row outside them so that an insert never fails.
--
-- The primary key must contain the partition key: (transaction_id, position, created_at). A transaction id is
-- kept unique across partitions by the service (a transaction-scoped advisory lock on each new id, taken in
-- the statement that locks a batch's accounts, before the lookup by id; see docs/design.md).

ALTER TABLE transactions RENAME TO transactions_legacy;
ALTER INDEX transactions_account_created RENAME TO transactions_legacy_account_created;
ALTER INDEX transactions_open_holds RENAME TO transactions_legacy_open_holds;
ALTER TABLE transactions_legacy DROP CONSTRAINT transactions_pkey;
ALTER TABLE transactions_legacy
    ADD CONSTRAINT transactions_legacy_pkey PRIMARY KEY (transaction_id, position, created_at);

-- Same columns (order, collations, defaults, CHECK constraints by name) as the legacy table.
CREATE TABLE transactions (LIKE transactions_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (created_at);
ALTER TABLE transactions ADD PRIMARY KEY (transaction_id, position, created_at);
ALTER TABLE transactions ADD FOREIGN KEY (account_id) REFERENCES accounts (id);
-- The same indexes as before, on every partition (the legacy table's own are attached, not rebuilt).
CREATE INDEX transactions_account_created ON transactions (account_id, created_at DESC, transaction_id DESC);
CREATE INDEX transactions_open_holds ON transactions (account_id, expires_at) WHERE state = 1;

-- The partitions of `transactions` with their ranges, for the service and operators. `lower` NULL: from
-- MINVALUE; `lower` and `upper` NULL with `is_default`: the default partition. `rows_estimate` is the
-- planner's (reltuples; -1 before the first ANALYZE).
CREATE VIEW transactions_partitions AS
SELECT c.relname::text AS name,
       CASE WHEN b.expr LIKE 'FOR VALUES FROM (MINVALUE)%' OR b.expr = 'DEFAULT' THEN NULL
            ELSE substring(b.expr FROM 'FROM \(''([^'']+)''\)')::timestamptz END AS lower,
       CASE WHEN b.expr = 'DEFAULT' OR b.expr LIKE '%TO (MAXVALUE)' THEN NULL
            ELSE substring(b.expr FROM 'TO \(''([^'']+)''\)')::timestamptz END AS upper,
       b.expr = 'DEFAULT' AS is_default,
       c.reltuples::int8 AS rows_estimate
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS expr) b
WHERE i.inhparent = 'transactions'::regclass;

-- Creates the partition `name` for [lower, upper) unless a partition of that name exists; rows of that range
-- already in the default partition are moved into it (so that a late partition loses nothing). Returns
-- whether it created one. Refuses a range that overlaps another partition (Postgres's own error).
CREATE FUNCTION transactions_create_partition(name text, lower timestamptz, upper timestamptz)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM transactions_partitions p WHERE p.name = transactions_create_partition.name) THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE transactions INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', name);
    -- As 20261122000002 set on the table before it was partitioned (a parent cannot hold them).
    EXECUTE format('ALTER TABLE %I SET (autovacuum_analyze_scale_factor = 0.02, '
                   'autovacuum_analyze_threshold = 1000)', name);
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

DO $$
DECLARE
    bound timestamptz;
    m timestamptz;
BEGIN
    -- Rows may lie in the future (a clock ahead, tests): the legacy range covers them all.
    SELECT date_trunc('month', greatest(now(), max(created_at)) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
           + interval '1 month'
      INTO bound FROM transactions_legacy;
    -- Proves the range with one scan before ATTACH (which then skips its own validating scan).
    EXECUTE format('ALTER TABLE transactions_legacy ADD CONSTRAINT transactions_legacy_range '
                   'CHECK (created_at < %L)', bound);
    EXECUTE format('ALTER TABLE transactions ATTACH PARTITION transactions_legacy '
                   'FOR VALUES FROM (MINVALUE) TO (%L)', bound);
    ALTER TABLE transactions_legacy DROP CONSTRAINT transactions_legacy_range;
    FOR i IN 0..2 LOOP
        m := ((bound AT TIME ZONE 'UTC') + make_interval(months => i)) AT TIME ZONE 'UTC';
        PERFORM transactions_create_partition(
            'transactions_' || to_char(m AT TIME ZONE 'UTC', 'YYYYMM'), m,
            ((m AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC');
    END LOOP;
END
$$;

CREATE TABLE transactions_default PARTITION OF transactions DEFAULT;
ALTER TABLE transactions_default SET (autovacuum_analyze_scale_factor = 0.02, autovacuum_analyze_threshold = 1000);
