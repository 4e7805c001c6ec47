//! SQL of rate limits: the states of a batch of checks, and the rules of Envoy's protocol.

use std::collections::HashMap;

use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor};

use super::{StoredLimit, account_key, parse_stored, stored_limit};
use crate::domain::rate::{RateBook, RateState};
use crate::domain::rules::{KeyTemplate, PatternEntry, Rule};
use crate::domain::{AccountKey, LimitName, LimitSpec, Period, Timestamp, Unit};
use crate::storage::StorageError;

#[derive(Debug, serde::Deserialize)]
struct StoredState {
    name: String,
    /// The tat in µs since the epoch: any stored instant reads back, even one past year 9999 that a state
    /// written before [`crate::domain::limit::MAX_RATE_REFILL`] may hold (RFC 3339 text could not carry it).
    tat_us: i64,
    used: i64,
}

/// Loads the book of `accounts` (sorted) under the states' row locks, in one statement: each account's own
/// limits and its plan's in its unit (rate limits among them are kept), its states, and the clock.
pub(super) async fn load(
    conn: &mut PgConnection,
    accounts: &[AccountKey],
    now: Option<Timestamp>,
) -> Result<RateBook, StorageError> {
    let (keys, units): (Vec<String>, Vec<String>) =
        accounts.iter().map(|a| (a.key_id.as_str().to_owned(), a.unit.as_str().to_owned())).unzip();
    // States are locked in key order (ORDER BY under FOR UPDATE locks rows as sorted), so two batches on
    // overlapping keys wait for each other rather than deadlock. They are found by `key_id = ANY(…)` on the
    // primary key, not by a join with the key list: a plan made while the table was empty (and analysed so)
    // joined the other way round and scanned every state of the table per batch once it had grown — 623
    // checks/s instead of 10,000 in the benchmark. A batch may also lock another unit's state of one of its
    // keys (the key and unit lists are matched separately); it is then ignored. Accounts and plans are
    // looked up by one-table subqueries on their keys, never by a join (see PLAN_SETTINGS).
    let rows = sqlx::query!(
        r#"WITH k AS (SELECT * FROM UNNEST($1::text[], $2::text[]) AS k(key_id, unit)),
           s AS MATERIALIZED (
               SELECT r.key_id, r.unit, r.name, r.tat, r.used
               FROM rate_states r WHERE r.key_id = ANY($1) AND r.unit = ANY($2)
               ORDER BY r.key_id, r.unit, r.name
               FOR UPDATE
           )
           SELECT k.key_id AS "key_id!", k.unit AS "unit!",
                  (SELECT a.limits FROM accounts a WHERE a.key_id = k.key_id AND a.unit = k.unit)
                      AS "limits?: Json<Vec<StoredLimit>>",
                  (SELECT jsonb_agg(jsonb_build_object('name', pl.name, 'period', pl.period, 'amount', pl.amount,
                                                       'burst', pl.burst))
                   FROM plan_limits pl
                   WHERE pl.plan_id = (SELECT kp.plan_id FROM key_plans kp WHERE kp.key_id = k.key_id)
                     AND pl.unit = k.unit AND pl.burst IS NOT NULL)
                      AS "plan_limits?: Json<Vec<StoredLimit>>",
                  (SELECT jsonb_agg(jsonb_build_object('name', s.name, 'tat_us', (extract(epoch FROM s.tat) * 1000000)::int8,
                                                       'used', s.used))
                   FROM s WHERE s.key_id = k.key_id AND s.unit = k.unit) AS "states?: Json<Vec<StoredState>>",
                  COALESCE($3, clock_timestamp()) AS "now!"
           FROM k"#,
        &keys,
        &units,
        now,
    )
    .fetch_all(conn)
    .await?;
    let mut book =
        RateBook { now: rows.first().map_or(Timestamp::UNIX_EPOCH, |r| r.now), ..RateBook::default() };
    for r in rows {
        let account = account_key(r.key_id, r.unit)?;
        let own: HashMap<LimitName, LimitSpec> = r
            .limits
            .map(|j| j.0)
            .unwrap_or_default()
            .into_iter()
            .map(|l| stored_limit(l).map(|l| (l.name.clone(), l)))
            .collect::<Result<_, _>>()?;
        let plan: Vec<LimitSpec> = r
            .plan_limits
            .map(|j| j.0)
            .unwrap_or_default()
            .into_iter()
            .map(stored_limit)
            .collect::<Result<_, _>>()?;
        let own = own.into_iter().collect();
        book.limits.insert(account.clone(), crate::domain::effective_rate_limits(&own, &plan));
        for s in r.states.map(|j| j.0).unwrap_or_default() {
            let name = parse_stored(LimitName::parse(s.name))?;
            let tat = Timestamp::from_timestamp_micros(s.tat_us)
                .ok_or_else(|| StorageError::Corrupt(format!("rate state {name}: tat {} µs", s.tat_us)))?;
            book.loaded.insert((account.clone(), name.clone()));
            book.states.insert((account.clone(), name), RateState { tat, used: s.used });
        }
    }
    Ok(book)
}

/// Writes the states a batch changed. Returns false when a state this batch created was created meanwhile
/// by another: the caller rolls back and retries, and the retry finds it (locked).
pub(super) async fn save(conn: &mut PgConnection, book: &RateBook) -> Result<bool, sqlx::Error> {
    let mut upd = Columns::default();
    let mut ins = Columns::default();
    for ((account, name), state) in &book.changed {
        let existed = book.loaded.contains(&(account.clone(), name.clone()));
        let c = if existed { &mut upd } else { &mut ins };
        c.keys.push(account.key_id.as_str().to_owned());
        c.units.push(account.unit.as_str().to_owned());
        c.names.push(name.as_str().to_owned());
        c.tats.push(state.tat);
        c.used.push(state.used);
    }
    if upd.keys.is_empty() && ins.keys.is_empty() {
        return Ok(true);
    }
    let inserted = sqlx::query_scalar!(
        r#"WITH upd AS (
               UPDATE rate_states r SET tat = u.tat, used = u.used
               FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::bigint[])
                   AS u(key_id, unit, name, tat, used)
               WHERE r.key_id = ANY($1) AND r.key_id = u.key_id AND r.unit = u.unit AND r.name = u.name
           ), ins AS (
               INSERT INTO rate_states (key_id, unit, name, tat, used)
               SELECT * FROM UNNEST($6::text[], $7::text[], $8::text[], $9::timestamptz[], $10::bigint[])
               ON CONFLICT DO NOTHING
               RETURNING 1
           )
           SELECT count(*) AS "inserted!" FROM ins"#,
        &upd.keys,
        &upd.units,
        &upd.names,
        &upd.tats,
        &upd.used,
        &ins.keys,
        &ins.units,
        &ins.names,
        &ins.tats,
        &ins.used,
    )
    .fetch_one(conn)
    .await?;
    Ok(inserted == ins.keys.len() as i64)
}

#[derive(Default)]
struct Columns {
    keys: Vec<String>,
    units: Vec<String>,
    names: Vec<String>,
    tats: Vec<Timestamp>,
    used: Vec<i64>,
}

struct RuleRow {
    name: String,
    domain: String,
    pattern: Json<Vec<PatternEntry>>,
    key_template: String,
    unit: String,
    limit_name: String,
    period: Option<String>,
    amount: Option<i64>,
    burst: Option<i64>,
    shadow: bool,
}

impl RuleRow {
    fn into_domain(self) -> Result<Rule, StorageError> {
        let limit_name = parse_stored(LimitName::parse(self.limit_name))?;
        let default = match (self.period, self.amount, self.burst) {
            (Some(period), Some(amount), Some(burst)) => {
                let period: Period = period.parse().map_err(StorageError::Corrupt)?;
                Some(parse_stored(
                    LimitSpec::new(limit_name.clone(), period, Some(amount))
                        .and_then(|l| l.with_burst(burst)),
                )?)
            }
            _ => None,
        };
        let pattern = self.pattern.0;
        parse_stored(
            Rule {
                name: parse_stored(LimitName::parse(self.name))?,
                domain: self.domain,
                key_template: parse_stored(KeyTemplate::parse(self.key_template, &pattern))?,
                pattern,
                unit: parse_stored(Unit::parse(self.unit))?,
                limit_name,
                default,
                shadow: self.shadow,
            }
            .check(),
        )
    }
}

pub(super) async fn rules<'e>(
    db: impl PgExecutor<'e>,
    name: Option<&LimitName>,
) -> Result<Vec<Rule>, StorageError> {
    let rows = sqlx::query_as!(
        RuleRow,
        r#"SELECT name, domain, pattern AS "pattern: Json<Vec<PatternEntry>>", key_template, unit, limit_name,
                  period, amount, burst, shadow
           FROM rate_rules WHERE $1::text IS NULL OR name = $1 ORDER BY name"#,
        name.map(LimitName::as_str)
    )
    .fetch_all(db)
    .await?;
    rows.into_iter().map(RuleRow::into_domain).collect()
}

pub(super) async fn upsert_rule(conn: &mut PgConnection, rule: &Rule) -> Result<(), sqlx::Error> {
    let d = rule.default.as_ref();
    sqlx::query!(
        r#"INSERT INTO rate_rules (name, domain, pattern, key_template, unit, limit_name, period, amount, burst, shadow)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
           ON CONFLICT (name) DO UPDATE SET domain = EXCLUDED.domain, pattern = EXCLUDED.pattern,
               key_template = EXCLUDED.key_template, unit = EXCLUDED.unit, limit_name = EXCLUDED.limit_name,
               period = EXCLUDED.period, amount = EXCLUDED.amount, burst = EXCLUDED.burst,
               shadow = EXCLUDED.shadow, updated_at = now()"#,
        rule.name.as_str(),
        rule.domain,
        Json(&rule.pattern) as _,
        rule.key_template.as_str(),
        rule.unit.as_str(),
        rule.limit_name.as_str(),
        d.map(|d| d.period.to_string()),
        d.and_then(|d| d.amount),
        d.and_then(|d| d.burst),
        rule.shadow,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub(super) async fn delete_rule(conn: &mut PgConnection, name: &LimitName) -> Result<bool, sqlx::Error> {
    let n = sqlx::query!("DELETE FROM rate_rules WHERE name = $1", name.as_str()).execute(conn).await?;
    Ok(n.rows_affected() > 0)
}
