-- Request rate limits beside spending limits, and the rules that map Envoy's rate-limit descriptors to keys.

-- A limit with a burst is a rate limit: `amount` requests per `period`, at most `burst` at once (GCRA). Keys'
-- own limits keep theirs in accounts.limits (jsonb, field "burst").
ALTER TABLE plan_limits ADD COLUMN burst bigint CHECK (burst >= 1);

-- One row of state per key, unit and rate limit. Rolling periods (GCRA): `tat` is the theoretical arrival
-- time, `used` unused. Calendar periods (fixed windows): `tat` is the start of the counted period and `used`
-- what was counted in it. Written with synchronous_commit off (a crash may forget the last few milliseconds
-- of counts, never money), and only `tat`/`used` change, so updates are HOT: the fill factor leaves room.
CREATE TABLE rate_states (
    key_id text COLLATE "C" NOT NULL,
    unit text COLLATE "C" NOT NULL,
    name text COLLATE "C" NOT NULL,
    tat timestamptz NOT NULL,
    used bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, unit, name)
) WITH (fillfactor = 70);

-- Envoy rate-limit service rules: a domain and a descriptor pattern (entries matched in order; a NULL value
-- matches any value) map to a key (a template over the descriptor's values), a unit and a limit name, with an
-- optional default limit used when the key has no limit of that name (own or from its plan).
CREATE TABLE rate_rules (
    name text COLLATE "C" PRIMARY KEY,
    domain text COLLATE "C" NOT NULL,
    -- [{"key": "api_key", "value": null}, {"key": "path", "value": "/v1/pay"}]
    pattern jsonb NOT NULL,
    key_template text NOT NULL,
    unit text COLLATE "C" NOT NULL,
    limit_name text COLLATE "C" NOT NULL,
    -- The default limit: period is the canonical text of src/domain/period.rs.
    period text,
    amount bigint CHECK (amount >= 0),
    burst bigint CHECK (burst >= 1),
    -- Count and report, never deny.
    shadow boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);
