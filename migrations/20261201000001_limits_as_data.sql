-- Limits as data: named limits over any period, on keys and in plans; reservations that charge several keys.

-- Plans: named sets of limits per unit. A key on a plan gets its limits unless it overrides them.
CREATE TABLE plans (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text COLLATE "C" NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- period is the canonical text of src/domain/period.rs (`rolling 86400s`, `calendar 1 month from … in …`).
CREATE TABLE plan_limits (
    plan_id bigint NOT NULL REFERENCES plans (id) ON DELETE CASCADE,
    unit text COLLATE "C" NOT NULL,
    name text COLLATE "C" NOT NULL,
    period text NOT NULL,
    amount bigint NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (plan_id, unit, name)
);

-- Which plan a key is on (every unit of the key). Changing a plan's limits changes every key on it at once.
CREATE TABLE key_plans (
    key_id text COLLATE "C" PRIMARY KEY,
    plan_id bigint NOT NULL REFERENCES plans (id),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX key_plans_plan ON key_plans (plan_id);

-- An account's own limits and its running totals move into two jsonb columns of the same row, so that a
-- batch reads and writes one narrow row per account whatever its number of limits:
--   limits: [{"name": "daily", "period": "rolling 86400s", "amount": 1000}]   (amount null = unlimited)
--   totals: [{"p": "rolling 86400s", "c": "250", "h": "0", "s": "<since>"}]   (c, h: decimal strings)
ALTER TABLE accounts
    ADD COLUMN limits jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN totals jsonb NOT NULL DEFAULT '[]';

UPDATE accounts a SET
    limits = COALESCE((
        SELECT jsonb_agg(jsonb_build_object('name', w.name, 'period', w.period, 'amount', w.amount) ORDER BY w.name)
        FROM (VALUES ('daily', 'rolling 86400s', a.limit_daily),
                     ('weekly', 'rolling 604800s', a.limit_weekly),
                     ('monthly', 'rolling 2592000s', a.limit_monthly),
                     ('annual', 'rolling 31536000s', a.limit_annual)) AS w (name, period, amount)
        WHERE w.amount IS NOT NULL), '[]'),
    totals = (
        SELECT jsonb_agg(jsonb_build_object('p', w.period, 'c', w.c::text, 'h', w.h::text, 's', w.s) ORDER BY w.period)
        FROM (VALUES ('rolling 86400s', a.committed_daily, a.held_daily, a.aged_daily),
                     ('rolling 604800s', a.committed_weekly, a.held_weekly, a.aged_weekly),
                     ('rolling 2592000s', a.committed_monthly, a.held_monthly, a.aged_monthly),
                     ('rolling 31536000s', a.committed_annual, a.held_annual, a.aged_annual)) AS w (period, c, h, s));

ALTER TABLE accounts
    DROP COLUMN limit_daily, DROP COLUMN limit_weekly, DROP COLUMN limit_monthly, DROP COLUMN limit_annual,
    DROP COLUMN committed_daily, DROP COLUMN committed_weekly, DROP COLUMN committed_monthly,
    DROP COLUMN committed_annual,
    DROP COLUMN held_daily, DROP COLUMN held_weekly, DROP COLUMN held_monthly, DROP COLUMN held_annual,
    DROP COLUMN aged_daily, DROP COLUMN aged_weekly, DROP COLUMN aged_monthly, DROP COLUMN aged_annual;

-- A transaction charges one or more accounts: one row per account, `position` 0 being the first key named
-- (it alone carries the metadata). Every row of a transaction has the same amounts, times and state, except
-- that a hold past its expiry is marked expired (state 4) per row, as each account releases it. A single-key
-- transaction is one row, as before.
ALTER TABLE transactions ADD COLUMN position smallint NOT NULL DEFAULT 0 CHECK (position BETWEEN 0 AND 7);
ALTER TABLE transactions DROP CONSTRAINT transactions_pkey, ADD PRIMARY KEY (transaction_id, position);
