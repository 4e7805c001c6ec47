-- One row per (key, unit): the limits and the running totals of each rolling window.
-- Totals are numeric: an unlimited key may record more than i64::MAX in a window and must not wrap or fail.
-- Invariant (see src/domain/account.rs): <x>_<window> sums the transactions created after aged_<window>.
CREATE TABLE accounts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id text COLLATE "C" NOT NULL,
    unit text COLLATE "C" NOT NULL,
    limit_daily bigint CHECK (limit_daily >= 0),
    limit_weekly bigint CHECK (limit_weekly >= 0),
    limit_monthly bigint CHECK (limit_monthly >= 0),
    limit_annual bigint CHECK (limit_annual >= 0),
    committed_daily numeric NOT NULL DEFAULT 0,
    committed_weekly numeric NOT NULL DEFAULT 0,
    committed_monthly numeric NOT NULL DEFAULT 0,
    committed_annual numeric NOT NULL DEFAULT 0,
    held_daily numeric NOT NULL DEFAULT 0,
    held_weekly numeric NOT NULL DEFAULT 0,
    held_monthly numeric NOT NULL DEFAULT 0,
    held_annual numeric NOT NULL DEFAULT 0,
    aged_daily timestamptz NOT NULL,
    aged_weekly timestamptz NOT NULL,
    aged_monthly timestamptz NOT NULL,
    aged_annual timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (key_id, unit)
);

-- Every reservation ever made. Rows are never deleted: state records what became of each.
-- state: 1 held, 2 committed, 3 reversed, 4 expired (the proto's numbers).
CREATE TABLE transactions (
    transaction_id text COLLATE "C" PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts (id),
    amount bigint NOT NULL CHECK (amount > 0),
    held_amount bigint NOT NULL CHECK (held_amount > 0),
    state smallint NOT NULL CHECK (state BETWEEN 1 AND 4),
    created_at timestamptz NOT NULL,
    expires_at timestamptz,
    committed_at timestamptz,
    reversed_at timestamptz,
    committed_late boolean NOT NULL DEFAULT false,
    metadata jsonb NOT NULL DEFAULT '{}'
);

-- Listing newest first, and the range scans that age spend out of a window.
CREATE INDEX transactions_account_created ON transactions (account_id, created_at DESC, transaction_id DESC);
-- Open holds by expiry: what a refresh must release. Small: only HELD rows are in it.
CREATE INDEX transactions_open_holds ON transactions (account_id, expires_at) WHERE state = 1;
