//! Every SQL statement of the service. Statements are set-based: a batch of any size costs the same round trips.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{Postgres, Transaction as PgTx};

use super::{
    Access, BatchOutput, Cursor, HistoryPartition, HoldBookkeeping, HoldCheck, PartitionDrop, PlanDeletion,
    PlanInfo, PoolStats, StorageError, Store, sorted_unique,
};
use crate::domain::{
    Account, AccountKey, Actor, AgedOut, AuditEvent, AuditFilter, CallerId, CallerRecord, Changes, Counted,
    ExpiringHold, KeyId, Ledger, LimitName, LimitSpec, Loaded, MAX_HOLD_TTL, Metadata, Period, Plan,
    PlanName, Rejection, Timestamp, Totals, Transaction, TransactionId, TxState, Unit,
};

mod audit;
mod history;
mod holds;
mod rates;

/// Embedded migrations, the same files `sqlx migrate run` applies.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How often a batch is retried after a deadlock, a serialization failure or a transaction id taken by a
/// concurrent batch of another account.
const MAX_ATTEMPTS: u32 = 5;

/// Connections are replaced this often: ordinary hygiene (server-side memory, DNS and failover changes). The
/// round-1 reason — generic plans cached while the tables were empty — is handled by [`PLAN_SETTINGS`].
pub const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// Planner settings of the serving connections. Every statement of the service finds rows by key (an
/// account by (key, unit), transactions by id or by account and time range): an index path is the only sane
/// plan at any table size. Two failure modes are ruled out:
/// - Postgres caches a generic plan per prepared statement and connection; one made while the tables are
///   nearly empty (a fresh database, a new partition) seq-scans and hash-joins whole tables and stays cached
///   as they grow, until the next ANALYZE of the table (the benchmark saw four fifths of the throughput lost
///   that way). With seq scans, hash and merge joins off, only index paths remain (a table with no usable
///   index is still scanned: the settings only penalise, never forbid).
/// - Left to choose, Postgres kept planning every execution afresh (custom plans: their estimates for the
///   actual time ranges beat the generic plan's), about 1 ms of planning per batch, more than the batch's
///   execution. Since the plan is the index path either way, `force_generic_plan` plans once per connection.
///
/// The settings alone are not enough: a plan made on an empty table may still walk a *whole index* and
/// filter (costed as one page, it beats one probe per key). So every statement reaches the big tables
/// (accounts, transactions, key_plans, rate_states) only in shapes whose sole index path is an index
/// condition: `column = ANY($array)` or `= $param` on an index's leading column, or a one-table subquery
/// (scalar, or LATERAL with an aggregate or LIMIT, so it is never flattened into a join) correlated on the
/// index's columns. Never a join of a big table with a key list or another table on the join's column:
/// that is what walked whole indexes (tests/it/plans.rs shows, by Postgres's own counters, that plans made
/// on empty tables read a few rows per call after a hundredfold growth).
///
/// JIT is off: a disabled seq scan is costed at 10^10, far above `jit_above_cost`, so every statement on a
/// table without a usable index (the callers table, re-read every two seconds) was JIT-compiled, 30–120 ms
/// of CPU each time, to read one row (seen with auto_explain in the benchmark). Nothing here runs long enough
/// to gain from JIT.
///
/// Sent as startup parameters: no round trip. Migrations and maintenance connections keep the defaults.
pub const PLAN_SETTINGS: [(&str, &str); 5] = [
    ("enable_seqscan", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
    ("plan_cache_mode", "force_generic_plan"),
    ("jit", "off"),
];

/// How a read batch begins: its own snapshot, in the same round trip as BEGIN.
const BEGIN_READ: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY";

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Connections for rate-limit batches; the same pool unless [`PgStore::with_rate_pool`] gave one whose
    /// connections commit asynchronously.
    rates: PgPool,
    /// Spending batches decide at the database's clock (see [`PgStore::with_database_clock`]).
    database_clock: bool,
    /// Tasks waiting in `begin` for a connection.
    waiting: Arc<AtomicU64>,
}

impl From<sqlx::Error> for StorageError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            // A value the database holds that this release cannot read: no retry will help.
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StorageError::Corrupt(e.to_string()),
            e => StorageError::Unavailable(Arc::new(e)),
        }
    }
}

/// Why one attempt of a batch failed.
enum Attempt {
    /// Worth running again: the conflict is gone once the other party has finished.
    Retry,
    Failed(StorageError),
}

impl From<sqlx::Error> for Attempt {
    fn from(e: sqlx::Error) -> Self {
        let code = e.as_database_error().and_then(|d| d.code());
        match code.as_deref() {
            // serialization_failure, deadlock_detected
            Some("40001" | "40P01") => Attempt::Retry,
            _ => Attempt::Failed(e.into()),
        }
    }
}

impl From<StorageError> for Attempt {
    fn from(e: StorageError) -> Self {
        Attempt::Failed(e)
    }
}

impl PgStore {
    pub fn new(pool: PgPool) -> Self {
        Self { rates: pool.clone(), pool, waiting: Arc::default(), database_clock: false }
    }

    /// Batches decide at the database's clock (read in the statement that locks their accounts) instead
    /// of this replica's: replicas whose clocks disagree still agree on every window. `allowance serve`
    /// turns it on; tests that drive a clock leave it off.
    pub fn with_database_clock(mut self) -> Self {
        self.database_clock = true;
        self
    }

    /// `now` where the caller's clock decides, or none where the database's clock does (statements then use
    /// `COALESCE($n, now())`): so a replica whose own clock is off sweeps and counts holds at the one clock.
    fn clock_or_database(&self, now: Timestamp) -> Option<Timestamp> {
        (!self.database_clock).then_some(now)
    }

    /// Rate-limit batches run on `pool`: give it [`PgStore::rate_options`] so that they commit without
    /// waiting for the WAL flush. Never money: spending batches keep the durable pool.
    pub fn with_rate_pool(mut self, pool: PgPool) -> Self {
        self.rates = pool;
        self
    }

    /// The serving options with `synchronous_commit = off`: a crash may forget the last few milliseconds of
    /// rate-limit counts (a few requests admitted twice), in exchange for commits that need no disk flush.
    pub fn rate_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
        let mut settings = PLAN_SETTINGS.to_vec();
        settings.push(("synchronous_commit", "off"));
        Ok(Self::connect_options(url)?.options(settings))
    }

    async fn begin(&self, access: Access) -> Result<PgTx<'static, Postgres>, sqlx::Error> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let tx = begin_on(&self.pool, if access.writes() { "BEGIN" } else { BEGIN_READ }).await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        tx
    }

    /// Connection settings for `url`.
    pub fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(sqlx::Error::Configuration("expected a postgres:// or postgresql:// URL".into()));
        }
        Ok(url.parse::<PgConnectOptions>()?.application_name("allowance"))
    }

    /// Connection settings of the serving pool: [`PgStore::connect_options`] with [`PLAN_SETTINGS`].
    pub fn serving_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
        Ok(Self::connect_options(url)?.options(PLAN_SETTINGS))
    }

    /// Pool settings of the service: a bounded wait for a connection, and connections replaced every
    /// [`CONNECTION_LIFETIME`].
    pub fn pool_options(max_connections: u32) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(max_connections)
            // No ping (a round trip) before every batch: a connection that died while idle fails on its
            // BEGIN instead, and `begin_on` takes another.
            .test_before_acquire(false)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .max_lifetime(CONNECTION_LIFETIME)
    }

    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StorageError> {
        let options = Self::connect_options(url)?;
        // One connection first, for its error: a pool retries a refused connection until its acquire timeout
        // and then reports only that it timed out.
        use sqlx::Connection;
        sqlx::PgConnection::connect_with(&options).await?.close().await?;
        let pool = Self::pool_options(max_connections).connect_with(options).await?;
        Ok(Self::new(pool))
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    #[tracing::instrument(name = "storage.batch", skip_all, fields(?access, accounts = accounts.len()))]
    async fn attempt<R, F>(
        &self,
        access: Access,
        accounts: &[AccountKey],
        ids: &[TransactionId],
        also: &[(AccountKey, Period)],
        now: Timestamp,
        apply: &mut F,
    ) -> Result<BatchOutput<R>, Attempt>
    where
        F: FnMut(&mut Ledger) -> R,
    {
        let mut tx = self.begin(access).await?;
        let rows = if access.writes() {
            lock_accounts(&mut tx, accounts, ids).await?
        } else {
            read_accounts(&mut tx, accounts, ids).await?
        };
        // Never earlier than the accounts' last write (see `Ledger::open`), and the same instant for the
        // load's ranges as for the ledger.
        // One clock for every replica: the database's, read with the accounts (after their locks), unless a
        // test drives the clock.
        let now = match self.database_clock {
            true => rows.iter().filter_map(|r| r.db_now).max().unwrap_or(now),
            false => now,
        };
        let now = rows.iter().map(|r| r.updated_at).fold(now, Timestamp::max);
        let (account_ids, loaded, stored) =
            load(&mut tx, rows, ids, also, now, access.recounts(), access == Access::Repair).await?;
        let mut ledger = Ledger::open(now, loaded);
        let value = apply(&mut ledger);
        let changes = ledger.into_changes();
        let expired_holds = changes.expired_holds;
        if access.writes() {
            if !save(&mut tx, &account_ids, &stored, changes, now).await? {
                return Err(Attempt::Retry);
            }
            tx.commit().await?;
        }
        Ok(BatchOutput { value, expired_holds, now })
    }
}

/// Connections found dead (at BEGIN, or by a read) before one works: more than a pool holds, so that every
/// connection a database restart left dead can be found so.
const STALE_CONNECTIONS: usize = 64;

/// A transaction begun by `begin` on a connection of `pool`. Pools do not ping a connection before handing it
/// out, so one may have died while idle (the database restarted, a proxy closed it): its BEGIN fails having
/// changed nothing, the connection is dropped, and the next one is tried.
async fn begin_on(pool: &PgPool, begin: &'static str) -> Result<PgTx<'static, Postgres>, sqlx::Error> {
    on_live_connection(|| pool.begin_with(begin)).await
}

/// Runs `attempt` again while the pooled connection it was given turns out to have died while idle: for
/// attempts that change nothing when they fail so (a BEGIN, a read). The dead connection leaves the pool as
/// it fails, so the next attempt gets another. Without it, reads and the readiness check failed once per
/// dead connection after a database restart (readiness stayed NOT_SERVING for seconds).
async fn on_live_connection<T, E, F, Fut>(mut attempt: F) -> Result<T, E>
where
    E: LostConnection,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut lost = 0;
    loop {
        match attempt().await {
            Err(e) if lost < STALE_CONNECTIONS && e.connection_lost() => lost += 1,
            other => return other,
        }
    }
}

trait LostConnection {
    fn connection_lost(&self) -> bool;
}

impl LostConnection for sqlx::Error {
    fn connection_lost(&self) -> bool {
        connection_lost(self)
    }
}

impl LostConnection for StorageError {
    fn connection_lost(&self) -> bool {
        matches!(self, StorageError::Unavailable(e) if connection_lost(e))
    }
}

/// The connection is gone (closed, reset, or the server ended it), as opposed to the database refusing.
fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("08") || c == "57P01"),
        _ => false,
    }
}

impl PgStore {
    #[tracing::instrument(name = "storage.rate_batch", skip_all, fields(accounts = accounts.len()))]
    async fn rate_attempt<R, F>(
        &self,
        accounts: &[AccountKey],
        now: Option<Timestamp>,
        apply: &mut F,
    ) -> Result<R, Attempt>
    where
        F: FnMut(&mut crate::domain::rate::RateBook) -> R,
    {
        let mut tx = begin_on(&self.rates, "BEGIN").await?;
        let mut book = rates::load(&mut tx, accounts, now).await?;
        let value = apply(&mut book);
        if !rates::save(&mut tx, &book).await? {
            return Err(Attempt::Retry);
        }
        tx.commit().await?;
        Ok(value)
    }
}

impl Store for PgStore {
    async fn with_rates<R, F>(
        &self,
        accounts: &[AccountKey],
        now: Option<Timestamp>,
        mut apply: F,
    ) -> Result<R, StorageError>
    where
        R: Send,
        F: FnMut(&mut crate::domain::rate::RateBook) -> R + Send,
    {
        let accounts = sorted_unique(accounts);
        let mut attempt = 1;
        loop {
            match self.rate_attempt(&accounts, now, &mut apply).await {
                Ok(value) => return Ok(value),
                Err(Attempt::Retry) if attempt < MAX_ATTEMPTS => attempt += 1,
                Err(Attempt::Retry) => return Err(StorageError::Contended),
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
    }

    async fn rate_rules(&self) -> Result<Vec<crate::domain::rules::Rule>, StorageError> {
        on_live_connection(|| rates::rules(&self.pool, None)).await
    }

    async fn put_rate_rule(
        &self,
        rule: &crate::domain::rules::Rule,
        audit: AuditEvent,
    ) -> Result<(), StorageError> {
        let mut tx = self.pool.begin().await?;
        // Serialises concurrent changes of one rule, so `before` is exact.
        sqlx::query!("SELECT pg_advisory_xact_lock(hashtext('rate_rules:' || $1))", rule.name.as_str())
            .execute(&mut *tx)
            .await?;
        let before = rates::rules(&mut *tx, Some(&rule.name)).await?.pop();
        rates::upsert_rule(&mut tx, rule).await?;
        let audit = audit.change(before.map(|r| r.audit_json()), Some(rule.audit_json()));
        audit::insert_audit(&mut tx, &[audit], self.database_clock).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_rate_rule(&self, name: &LimitName, audit: AuditEvent) -> Result<bool, StorageError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query!("SELECT pg_advisory_xact_lock(hashtext('rate_rules:' || $1))", name.as_str())
            .execute(&mut *tx)
            .await?;
        let Some(before) = rates::rules(&mut *tx, Some(name)).await?.pop() else {
            return Ok(false);
        };
        rates::delete_rule(&mut tx, name).await?;
        audit::insert_audit(&mut tx, &[audit.change(Some(before.audit_json()), None)], self.database_clock)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn with_ledger<R, F>(
        &self,
        access: Access,
        accounts: &[AccountKey],
        transactions: &[TransactionId],
        also: &[(AccountKey, Period)],
        now: Timestamp,
        mut apply: F,
    ) -> Result<BatchOutput<R>, StorageError>
    where
        R: Send,
        F: FnMut(&mut Ledger) -> R + Send,
    {
        let accounts = sorted_unique(accounts);
        let mut attempt = 1;
        loop {
            match self.attempt(access, &accounts, transactions, also, now, &mut apply).await {
                Ok(out) => return Ok(out),
                Err(Attempt::Retry) if attempt < MAX_ATTEMPTS => {
                    attempt += 1;
                    tracing::debug!(attempt, "retrying a batch after a conflict");
                }
                Err(Attempt::Retry) => return Err(StorageError::Contended),
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
    }

    async fn get_transaction(
        &self,
        id: &TransactionId,
        now: Timestamp,
    ) -> Result<Option<(Transaction, Timestamp)>, StorageError> {
        let row = on_live_connection(|| {
            sqlx::query_as!(
                TxRow,
                r#"SELECT t.transaction_id,
                      (SELECT array_agg((SELECT a2.key_id::text FROM accounts a2 WHERE a2.id = t2.account_id)
                                        ORDER BY t2.position)
                       FROM transactions t2 WHERE t2.transaction_id = t.transaction_id) AS "keys!",
                      (SELECT a.unit FROM accounts a WHERE a.id = t.account_id) AS "unit!",
                      t.amount, t.held_amount, t.state, t.created_at,
                      t.expires_at, t.committed_at, t.reversed_at, t.committed_late, t.metadata,
                      COALESCE($2, now()) AS read_at
               FROM transactions t
               WHERE t.transaction_id = $1 AND t.position = 0"#,
                id.as_str(),
                self.clock_or_database(now),
            )
            .fetch_optional(&self.pool)
        })
        .await?;
        row.map(|r| r.into_domain_read(now)).transpose()
    }

    async fn list_transactions(
        &self,
        account: &AccountKey,
        cursor: Option<&Cursor>,
        limit: u32,
        now: Timestamp,
    ) -> Result<(Vec<Transaction>, Timestamp), StorageError> {
        // Without a cursor, start past any representable instant: one query plan for every page.
        let (before, before_id) = match cursor {
            Some(c) => (c.created_at, c.transaction_id.as_str()),
            None => (far_future(), ""),
        };
        let rows = on_live_connection(|| {
            sqlx::query_as!(
                TxRow,
                r#"SELECT p.transaction_id AS "transaction_id!",
                      (SELECT array_agg((SELECT a2.key_id::text FROM accounts a2 WHERE a2.id = t2.account_id)
                                        ORDER BY t2.position)
                       FROM transactions t2 WHERE t2.transaction_id = t.transaction_id) AS "keys!",
                      $2::text AS "unit!", p.amount AS "amount!", p.held_amount AS "held_amount!",
                      p.state AS "state!", p.created_at AS "created_at!", p.expires_at,
                      p.committed_at, p.reversed_at, p.committed_late AS "committed_late!",
                      p.metadata AS "metadata!", COALESCE($6, now()) AS read_at
               FROM transactions t
               -- LIMIT 1 keeps the lookup a subquery of its own (never flattened into a join): its only plan
               -- is the primary key.
               CROSS JOIN LATERAL (SELECT * FROM transactions p
                                   WHERE p.transaction_id = t.transaction_id AND p.position = 0 LIMIT 1) p
               WHERE t.account_id = (SELECT a.id FROM accounts a WHERE a.key_id = $1 AND a.unit = $2)
                 AND (t.created_at < $3 OR (t.created_at = $3 AND t.transaction_id < $4))
               ORDER BY t.created_at DESC, t.transaction_id DESC
               LIMIT $5"#,
                account.key_id.as_str(),
                account.unit.as_str(),
                before,
                before_id,
                i64::from(limit),
                self.clock_or_database(now),
            )
            .fetch_all(&self.pool)
        })
        .await?;
        let at = rows.first().and_then(|r| r.read_at).unwrap_or(now);
        let page = rows.into_iter().map(TxRow::into_domain).collect::<Result<_, _>>()?;
        Ok((page, at))
    }

    async fn accounts_with_expired_holds(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> Result<Vec<AccountKey>, StorageError> {
        // Only an account whose last write came before the latest expiry of its holds can have one unreleased
        // (the cursor of the migration 20261204000001). One whose holds have all expired, none left open, is
        // retired (`holds_until` cleared) so that it is not looked at again.
        let now = self.clock_or_database(now);
        let candidates = sqlx::query!(
            r#"SELECT a.id, a.key_id, a.unit, a.xmin::text AS "version!",
                      a.holds_until <= COALESCE($1, now()) AS "all_expired!",
                      EXISTS (SELECT 1 FROM transactions t
                              WHERE t.account_id = a.id AND t.expires_at > a.updated_at
                                AND t.expires_at <= COALESCE($1, now()) AND t.created_at < COALESCE($1, now())
                                AND t.created_at > a.updated_at - $2::int8 * interval '1 second' AND t.state = 1)
                        AS "expired!"
               FROM accounts a
               WHERE a.updated_at < a.holds_until AND a.updated_at < COALESCE($1, now())"#,
            now,
            MAX_HOLD_TTL.num_seconds(),
        )
        .fetch_all(&self.pool)
        .await?;
        let (retired, versions): (Vec<i64>, Vec<String>) = candidates
            .iter()
            .filter(|c| c.all_expired && !c.expired)
            .map(|c| (c.id, c.version.clone()))
            .unzip();
        if !retired.is_empty() {
            // Locked in id order, as batches lock accounts; cleared only if the row is still the version read
            // above (a batch that wrote it meanwhile may have placed a hold).
            sqlx::query!(
                r#"WITH locked AS MATERIALIZED (
                       SELECT a.id FROM accounts a WHERE a.id = ANY($1) ORDER BY a.id FOR UPDATE)
                   UPDATE accounts a SET holds_until = NULL
                   FROM UNNEST($1::int8[], $2::text[]) AS u(id, version)
                   WHERE a.id = ANY($1) AND (SELECT count(*) FROM locked) >= 0 AND a.id = u.id
                     AND a.xmin = u.version::xid"#,
                &retired,
                &versions,
            )
            .execute(&self.pool)
            .await?;
        }
        candidates
            .into_iter()
            .filter(|c| c.expired)
            .take(limit as usize)
            .map(|c| account_key(c.key_id, c.unit))
            .collect()
    }

    async fn open_holds(&self) -> Result<u64, StorageError> {
        // Counted on each account as holds are placed and settled; a hold past its expiry counts until a
        // batch of its key, or the sweeper, releases it.
        let n = on_live_connection(|| {
            sqlx::query_scalar!(r#"SELECT COALESCE(sum(open_holds), 0)::int8 AS "n!" FROM accounts"#)
                .fetch_one(&self.pool)
        })
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn check_holds(&self, accounts: &[AccountKey]) -> Result<HoldCheck, StorageError> {
        holds::check(&self.pool, accounts).await
    }

    async fn repair_hold_bookkeeping(
        &self,
        accounts: &[AccountKey],
        by: &Actor,
        now: Timestamp,
    ) -> Result<Vec<HoldBookkeeping>, StorageError> {
        holds::repair(&self.pool, accounts, by, now, self.database_clock).await
    }

    async fn counted(
        &self,
        account: &AccountKey,
        period: &Period,
        from: Timestamp,
        now: Timestamp,
        max_committed: u32,
    ) -> Result<Counted, StorageError> {
        let committed_rows = if period.rolling_length().is_some() { i64::from(max_committed) } else { 0 };
        let rows = sqlx::query!(
            r#"SELECT 1::int2 AS "kind!", t.created_at AS "created_at!", t.expires_at, t.amount AS "amount!"
               FROM transactions t
               WHERE t.account_id = (SELECT id FROM accounts WHERE key_id = $1 AND unit = $2)
                 AND t.state = 1 AND t.expires_at > $4 AND t.created_at >= $3
               UNION ALL
               (SELECT 2::int2, t.created_at, NULL, t.amount
                FROM transactions t
                WHERE t.account_id = (SELECT id FROM accounts WHERE key_id = $1 AND unit = $2)
                  AND t.state = 2 AND t.created_at >= $3
                ORDER BY t.created_at
                LIMIT $5)"#,
            account.key_id.as_str(),
            account.unit.as_str(),
            from,
            now,
            committed_rows + 1,
        )
        .fetch_all(&self.pool)
        .await?;
        let mut counted = Counted { complete: true, ..Counted::default() };
        for r in rows {
            match (r.kind, r.expires_at) {
                (1, Some(expires_at)) => counted.holds.push((r.created_at, expires_at, r.amount)),
                _ => counted.committed.push((r.created_at, r.amount)),
            }
        }
        counted.committed.sort();
        if counted.committed.len() as i64 > committed_rows {
            counted.committed.truncate(max_committed as usize);
            counted.complete = false;
        }
        Ok(counted)
    }

    async fn put_plan(&self, plan: &Plan, audit: AuditEvent) -> Result<(), StorageError> {
        let (mut units, mut names, mut periods, mut amounts, mut bursts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (unit, specs) in &plan.limits {
            for spec in specs {
                units.push(unit.as_str().to_owned());
                names.push(spec.name.as_str().to_owned());
                periods.push(spec.period.to_string());
                amounts.push(spec.amount.unwrap_or(i64::MAX));
                bursts.push(spec.burst);
            }
        }
        let mut tx = self.pool.begin().await?;
        // Locks the plan's row (new or not); `xmax = 0` tells a row this statement inserted.
        let row = sqlx::query!(
            r#"INSERT INTO plans (name) VALUES ($1)
               ON CONFLICT (name) DO UPDATE SET updated_at = now()
               RETURNING id, (xmax = 0) AS "inserted!""#,
            plan.name.as_str()
        )
        .fetch_one(&mut *tx)
        .await?;
        let plan_id = row.id;
        let before = if row.inserted { None } else { plans_in(&mut *tx, Some(&plan.name)).await?.pop() };
        // Two statements: a CTE's DELETE is not visible to the INSERT of the same statement.
        sqlx::query!("DELETE FROM plan_limits WHERE plan_id = $1", plan_id).execute(&mut *tx).await?;
        sqlx::query!(
            r#"INSERT INTO plan_limits (plan_id, unit, name, period, amount, burst)
               SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[])"#,
            plan_id,
            &units,
            &names,
            &periods,
            &amounts,
            &bursts as &[Option<i64>],
        )
        .execute(&mut *tx)
        .await?;
        let audit = audit.change(before.map(|b| b.plan.audit_json()), Some(plan.audit_json()));
        audit::insert_audit(&mut tx, &[audit], self.database_clock).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_plan(&self, name: &PlanName) -> Result<Option<PlanInfo>, StorageError> {
        let plans = self.plans(Some(name)).await?;
        Ok(plans.into_iter().next())
    }

    async fn list_plans(&self) -> Result<Vec<PlanInfo>, StorageError> {
        self.plans(None).await
    }

    async fn delete_plan(&self, name: &PlanName, audit: AuditEvent) -> Result<PlanDeletion, StorageError> {
        let mut tx = self.pool.begin().await?;
        let Some(plan_id) =
            sqlx::query_scalar!("SELECT id FROM plans WHERE name = $1 FOR UPDATE", name.as_str())
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Ok(PlanDeletion::NotFound);
        };
        let keys =
            sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM key_plans WHERE plan_id = $1"#, plan_id)
                .fetch_one(&mut *tx)
                .await?;
        if keys > 0 {
            return Ok(PlanDeletion::InUse(u64::try_from(keys).unwrap_or(0)));
        }
        let before = plans_in(&mut *tx, Some(name)).await?.pop();
        sqlx::query!("DELETE FROM plans WHERE id = $1", plan_id).execute(&mut *tx).await?;
        audit::insert_audit(
            &mut tx,
            &[audit.change(before.map(|b| b.plan.audit_json()), None)],
            self.database_clock,
        )
        .await?;
        tx.commit().await?;
        Ok(PlanDeletion::Deleted)
    }

    async fn assign_plan(
        &self,
        key: &KeyId,
        plan: Option<&PlanName>,
        audit: AuditEvent,
    ) -> Result<bool, StorageError> {
        let mut tx = self.pool.begin().await?;
        // The key's current plan, locked (a concurrent assignment of the same key waits, so `before` is exact).
        let before = sqlx::query_scalar!(
            r#"SELECT p.name FROM key_plans k JOIN plans p ON p.id = k.plan_id WHERE k.key_id = $1
               FOR UPDATE OF k"#,
            key.as_str()
        )
        .fetch_optional(&mut *tx)
        .await?;
        match plan {
            None => {
                sqlx::query!("DELETE FROM key_plans WHERE key_id = $1", key.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
            Some(plan) => {
                // FOR KEY SHARE on the plan: a concurrent delete waits, and then sees the key on it.
                let assigned = sqlx::query_scalar!(
                    r#"WITH p AS (SELECT id FROM plans WHERE name = $2 FOR KEY SHARE)
                       INSERT INTO key_plans (key_id, plan_id) SELECT $1, p.id FROM p
                       ON CONFLICT (key_id) DO UPDATE SET plan_id = EXCLUDED.plan_id, updated_at = now()
                       RETURNING 1 AS "one!""#,
                    key.as_str(),
                    plan.as_str()
                )
                .fetch_optional(&mut *tx)
                .await?;
                if assigned.is_none() {
                    return Ok(false);
                }
            }
        }
        let json = |p: Option<&str>| serde_json::json!({ "plan": p });
        let audit = audit.change(Some(json(before.as_deref())), Some(json(plan.map(PlanName::as_str))));
        audit::insert_audit(&mut tx, &[audit], self.database_clock).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn create_caller(&self, record: &CallerRecord, audit: AuditEvent) -> Result<(), StorageError> {
        let mut tx = self.pool.begin().await?;
        audit::insert_caller(&mut tx, record).await?;
        audit::insert_audit(
            &mut tx,
            &[audit.change(None, Some(record.caller.audit_json()))],
            self.database_clock,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn update_caller<F>(
        &self,
        id: CallerId,
        apply: F,
    ) -> Result<Option<Result<CallerRecord, Rejection>>, StorageError>
    where
        F: FnOnce(&CallerRecord) -> Result<Option<(CallerRecord, AuditEvent)>, Rejection> + Send,
    {
        let mut tx = self.pool.begin().await?;
        let Some(current) = audit::caller_for_update(&mut tx, id).await? else {
            return Ok(None);
        };
        let (next, event) = match apply(&current) {
            Ok(Some(change)) => change,
            Ok(None) => return Ok(Some(Ok(current))),
            Err(rejection) => return Ok(Some(Err(rejection))),
        };
        audit::update_caller(&mut tx, &next, event.at).await?;
        let event = event.change(Some(current.caller.audit_json()), Some(next.caller.audit_json()));
        audit::insert_audit(&mut tx, &[event], self.database_clock).await?;
        tx.commit().await?;
        Ok(Some(Ok(next)))
    }

    async fn callers(&self) -> Result<Vec<CallerRecord>, StorageError> {
        on_live_connection(|| audit::all_callers(&self.pool)).await
    }

    async fn audit_events(&self, filter: &AuditFilter, limit: u32) -> Result<Vec<AuditEvent>, StorageError> {
        on_live_connection(|| audit::audit_events(&self.pool, filter, limit)).await
    }

    async fn account_keys(
        &self,
        after: Option<&AccountKey>,
        limit: u32,
    ) -> Result<Vec<AccountKey>, StorageError> {
        // Key ids are never empty: ("", "") sorts before every account.
        let (key_id, unit) = after.map_or(("", ""), |a| (a.key_id.as_str(), a.unit.as_str()));
        let rows = sqlx::query!(
            r#"SELECT key_id, unit FROM accounts WHERE (key_id, unit) > ($1, $2)
               ORDER BY key_id, unit LIMIT $3"#,
            key_id,
            unit,
            i64::from(limit)
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(|r| account_key(r.key_id, r.unit)).collect()
    }

    async fn exclusively<J>(&self, name: &'static str, job: J) -> Result<Option<J::Output>, StorageError>
    where
        J: Future + Send,
        J::Output: Send,
    {
        // A connection of its own, out of the pool: the session lock lives and dies with it (closed when this
        // returns, or when the process does), and is never left on a pooled connection.
        let mut conn = self.pool.acquire().await?.detach();
        let locked = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_lock(hashtext('allowance.' || $1::text)) AS "locked!""#,
            name
        )
        .fetch_one(&mut conn)
        .await?;
        if !locked {
            return Ok(None);
        }
        let out = job.await;
        // Closing the session releases the lock; an error here changes nothing.
        let _ = sqlx::Connection::close(conn).await;
        Ok(Some(out))
    }

    async fn history_partitions(&self) -> Result<Vec<HistoryPartition>, StorageError> {
        history::partitions(&self.pool).await
    }

    async fn create_history_partitions(
        &self,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<String>, StorageError> {
        history::create(&self.pool, from, to).await
    }

    async fn drop_history_partition(
        &self,
        name: &str,
        export_dir: Option<&std::path::Path>,
    ) -> Result<PartitionDrop, StorageError> {
        history::drop_partition(&self.pool, name, export_dir).await
    }

    async fn longest_spending_period(&self) -> Result<Option<chrono::TimeDelta>, StorageError> {
        history::longest_spending_period(&self.pool).await
    }

    async fn accounts_written_before(
        &self,
        before: Timestamp,
        after: Option<&AccountKey>,
        limit: u32,
    ) -> Result<Vec<AccountKey>, StorageError> {
        history::accounts_written_before(&self.pool, before, after, limit).await
    }

    async fn delete_audit_events_before(&self, before: Timestamp) -> Result<u64, StorageError> {
        history::delete_audit_events_before(&self.pool, before).await
    }

    fn pool_stats(&self) -> Option<PoolStats> {
        Some(PoolStats {
            max: self.pool.options().get_max_connections(),
            open: self.pool.size(),
            idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
            waiting: self.waiting.load(Ordering::Relaxed),
        })
    }

    async fn ready(&self) -> Result<(), StorageError> {
        // sqlx's own bookkeeping table, so not checked at compile time.
        let applied: Option<i64> = on_live_connection(|| async {
            match sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await
            {
                Ok(applied) => Ok::<_, StorageError>(applied),
                // undefined_table: reachable, but never migrated.
                Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42P01") => {
                    Ok(None)
                }
                Err(e) => Err(e.into()),
            }
        })
        .await?;
        let needed = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        if applied.is_none_or(|v| v < needed) {
            return Err(StorageError::NotMigrated { applied, needed });
        }
        Ok(())
    }
}

impl PgStore {
    /// Plans with their limits and key counts: one, or all by name.
    async fn plans(&self, name: Option<&PlanName>) -> Result<Vec<PlanInfo>, StorageError> {
        on_live_connection(|| plans_in(&self.pool, name)).await
    }
}

/// Plans with their limits and key counts: one, or all by name.
async fn plans_in<'e>(
    db: impl sqlx::PgExecutor<'e>,
    name: Option<&PlanName>,
) -> Result<Vec<PlanInfo>, StorageError> {
    let rows = sqlx::query!(
        r#"SELECT p.name, l.unit AS "unit?", l.name AS "limit_name?", l.period AS "period?",
                      l.amount AS "amount?", l.burst,
                      (SELECT count(*) FROM key_plans k WHERE k.plan_id = p.id) AS "keys!"
               FROM plans p LEFT JOIN plan_limits l ON l.plan_id = p.id
               WHERE $1::text IS NULL OR p.name = $1
               ORDER BY p.name, l.unit, l.name"#,
        name.map(PlanName::as_str)
    )
    .fetch_all(db)
    .await?;
    let mut plans: Vec<(String, u64, PlanLimits)> = Vec::new();
    for r in rows {
        if plans.last().is_none_or(|p| p.0 != r.name) {
            plans.push((r.name.clone(), u64::try_from(r.keys).unwrap_or(0), Vec::new()));
        }
        if let (Some(unit), Some(limit_name), Some(period), Some(amount)) =
            (r.unit, r.limit_name, r.period, r.amount)
        {
            let unit = parse_stored(Unit::parse(unit))?;
            let spec =
                stored_limit(StoredLimit { name: limit_name, period, amount: Some(amount), burst: r.burst })?;
            plans.last_mut().expect("pushed above").2.push((unit, spec));
        }
    }
    plans
        .into_iter()
        .map(|(name, keys, limits)| {
            let plan = parse_stored(Plan::new(parse_stored(PlanName::parse(name))?, limits))?;
            Ok(PlanInfo { plan, keys })
        })
        .collect()
}

/// A plan's limits as read, before validation.
type PlanLimits = Vec<(Unit, LimitSpec)>;

fn far_future() -> Timestamp {
    chrono::DateTime::from_timestamp(253_402_300_799, 0).expect("9999-12-31 is representable")
}

/// `accounts.updated_at` of an account no batch has written yet (the epoch, so that it never raises a
/// batch's `now`; see `Ledger::open`).
const NEVER_WRITTEN: Timestamp = chrono::DateTime::UNIX_EPOCH;

/// A limit as stored in `accounts.limits`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct StoredLimit {
    name: String,
    period: String,
    amount: Option<i64>,
    /// Set for a rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    burst: Option<i64>,
}

/// One period's totals as stored in `accounts.totals`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct StoredTotals {
    p: String,
    #[serde(flatten)]
    totals: Totals,
}

fn stored_limit(l: StoredLimit) -> Result<LimitSpec, StorageError> {
    let period: Period = l.period.parse().map_err(StorageError::Corrupt)?;
    let spec = parse_stored(LimitSpec::new(parse_stored(LimitName::parse(l.name))?, period, l.amount))?;
    match l.burst {
        Some(burst) => parse_stored(spec.with_burst(burst)),
        None => Ok(spec),
    }
}

struct AccountRow {
    id: i64,
    key_id: String,
    unit: String,
    limits: Json<Vec<StoredLimit>>,
    totals: Json<Vec<StoredTotals>>,
    plan: Option<String>,
    plan_limits: Option<Json<Vec<StoredLimit>>>,
    updated_at: Timestamp,
    /// The database's clock when the row was read (`None` for an account not in the database yet).
    db_now: Option<Timestamp>,
}

impl AccountRow {
    fn fresh(key: &AccountKey) -> Self {
        AccountRow {
            id: 0,
            key_id: key.key_id.as_str().to_owned(),
            unit: key.unit.as_str().to_owned(),
            limits: Json(Vec::new()),
            totals: Json(Vec::new()),
            plan: None,
            plan_limits: None,
            updated_at: NEVER_WRITTEN,
            db_now: None,
        }
    }

    fn into_domain(self) -> Result<(i64, Account), StorageError> {
        let mut account = Account::new(account_key(self.key_id, self.unit)?);
        for l in self.limits.0 {
            let spec = stored_limit(l)?;
            account.limits.insert(spec.name.clone(), spec);
        }
        for t in self.totals.0 {
            account.totals.insert(t.p.parse().map_err(StorageError::Corrupt)?, t.totals);
        }
        account.as_of = (self.updated_at > NEVER_WRITTEN).then_some(self.updated_at);
        account.plan = self.plan.map(|p| parse_stored(PlanName::parse(p))).transpose()?;
        account.plan_limits = self
            .plan_limits
            .map(|l| l.0)
            .unwrap_or_default()
            .into_iter()
            .map(stored_limit)
            .collect::<Result<_, _>>()?;
        Ok((self.id, account))
    }
}

fn limits_json(a: &Account) -> serde_json::Value {
    let limits: Vec<StoredLimit> = a
        .limits
        .values()
        .map(|l| StoredLimit {
            name: l.name.to_string(),
            period: l.period.to_string(),
            amount: l.amount,
            burst: l.burst,
        })
        .collect();
    serde_json::to_value(limits).expect("limits serialise")
}

fn totals_json(a: &Account) -> serde_json::Value {
    let totals: Vec<StoredTotals> =
        a.totals.iter().map(|(p, t)| StoredTotals { p: p.to_string(), totals: *t }).collect();
    serde_json::to_value(totals).expect("totals serialise")
}

/// A transaction with every account it charges: `keys` in position order, the first row's metadata.
struct TxRow {
    transaction_id: String,
    keys: Vec<String>,
    unit: String,
    amount: i64,
    held_amount: i64,
    state: i16,
    created_at: Timestamp,
    expires_at: Option<Timestamp>,
    committed_at: Option<Timestamp>,
    reversed_at: Option<Timestamp>,
    committed_late: bool,
    metadata: serde_json::Value,
    /// The instant a reader sees the row at (reads only; see [`Store::get_transaction`]).
    read_at: Option<Timestamp>,
}

impl TxRow {
    fn into_domain_read(self, now: Timestamp) -> Result<(Transaction, Timestamp), StorageError> {
        let at = self.read_at.unwrap_or(now);
        Ok((self.into_domain()?, at))
    }

    fn into_domain(self) -> Result<Transaction, StorageError> {
        let metadata: std::collections::BTreeMap<String, String> = serde_json::from_value(self.metadata)
            .map_err(|e| StorageError::Corrupt(format!("metadata: {e}")))?;
        let accounts = self
            .keys
            .into_iter()
            .map(|k| account_key(k, self.unit.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        if accounts.is_empty() {
            return Err(StorageError::Corrupt(format!("transaction {} has no key", self.transaction_id)));
        }
        Ok(Transaction {
            id: parse_stored(TransactionId::parse(self.transaction_id))?,
            accounts,
            amount: self.amount,
            held_amount: self.held_amount,
            state: TxState::from_code(self.state)
                .ok_or_else(|| StorageError::Corrupt(format!("state {}", self.state)))?,
            created_at: self.created_at,
            expires_at: self.expires_at,
            committed_at: self.committed_at,
            reversed_at: self.reversed_at,
            committed_late: self.committed_late,
            metadata: parse_stored(Metadata::parse(metadata))?,
        })
    }
}

fn parse_stored<T>(r: Result<T, crate::domain::InvalidArgument>) -> Result<T, StorageError> {
    r.map_err(|e| StorageError::Corrupt(e.to_string()))
}

fn account_key(key_id: String, unit: String) -> Result<AccountKey, StorageError> {
    Ok(AccountKey::new(parse_stored(KeyId::parse(key_id))?, parse_stored(Unit::parse(unit))?))
}

fn to_i128(d: Decimal) -> Result<i128, StorageError> {
    d.to_i128()
        .filter(|_| d.fract().is_zero())
        .ok_or_else(|| StorageError::Corrupt(format!("total {d} is not a whole number")))
}

fn key_columns(accounts: &[AccountKey]) -> (Vec<String>, Vec<String>) {
    accounts.iter().map(|a| (a.key_id.as_str().to_owned(), a.unit.as_str().to_owned())).unzip()
}

/// `SELECT … FOR UPDATE` of the accounts and of the owners of `ids`, all in key order in one statement, then
/// the same for accounts created because they were missing.
async fn lock_accounts(
    tx: &mut PgTx<'_, Postgres>,
    accounts: &[AccountKey],
    ids: &[TransactionId],
) -> Result<Vec<AccountRow>, sqlx::Error> {
    let mut rows = select_accounts(tx, accounts, ids, true).await?;
    let found: HashSet<(&str, &str)> = rows.iter().map(|r| (r.key_id.as_str(), r.unit.as_str())).collect();
    let missing: Vec<AccountKey> =
        accounts.iter().filter(|a| !found.contains(&(a.key_id.as_str(), a.unit.as_str()))).cloned().collect();
    if missing.is_empty() {
        return Ok(rows);
    }
    let (keys, units) = key_columns(&missing);
    sqlx::query!(
        r#"INSERT INTO accounts (key_id, unit, updated_at)
           SELECT k.key_id, k.unit, $3 FROM UNNEST($1::text[], $2::text[]) AS k(key_id, unit) ORDER BY 1, 2
           ON CONFLICT (key_id, unit) DO NOTHING"#,
        &keys,
        &units,
        NEVER_WRITTEN,
    )
    .execute(&mut **tx)
    .await?;
    rows.extend(select_accounts(tx, &missing, &[], true).await?);
    Ok(rows)
}

/// The accounts as they stand, without locks; missing ones are fresh.
async fn read_accounts(
    tx: &mut PgTx<'_, Postgres>,
    accounts: &[AccountKey],
    ids: &[TransactionId],
) -> Result<Vec<AccountRow>, sqlx::Error> {
    let mut rows = select_accounts(tx, accounts, ids, false).await?;
    let found: HashSet<(String, String)> = rows.iter().map(|r| (r.key_id.clone(), r.unit.clone())).collect();
    for key in accounts {
        if !found.contains(&(key.key_id.as_str().to_owned(), key.unit.as_str().to_owned())) {
            let mut fresh = AccountRow::fresh(key);
            // A key with no account in this unit yet may still be on a plan.
            let plan = sqlx::query!(
                r#"SELECT p.name,
                          (SELECT COALESCE(jsonb_agg(jsonb_build_object('name', l.name, 'period', l.period,
                                                                        'amount', l.amount, 'burst', l.burst)), '[]')
                           FROM plan_limits l WHERE l.plan_id = p.id AND l.unit = $2) AS "limits!: Json<Vec<StoredLimit>>"
                   FROM key_plans k JOIN plans p ON p.id = k.plan_id WHERE k.key_id = $1"#,
                key.key_id.as_str(),
                key.unit.as_str()
            )
            .fetch_optional(&mut **tx)
            .await?;
            if let Some(plan) = plan {
                fresh.plan = Some(plan.name);
                fresh.plan_limits = Some(plan.limits);
            }
            rows.push(fresh);
        }
    }
    Ok(rows)
}

/// The accounts named by key, and those charged by the transactions `ids`, in key order, each with its key's
/// plan and that plan's limits in the account's unit.
async fn select_accounts(
    tx: &mut PgTx<'_, Postgres>,
    accounts: &[AccountKey],
    ids: &[TransactionId],
    for_update: bool,
) -> Result<Vec<AccountRow>, sqlx::Error> {
    let (keys, units) = key_columns(accounts);
    let ids: Vec<String> = ids.iter().map(|i| i.as_str().to_owned()).collect();
    // The locks are taken in the materialised CTE, in id order (one global order: no deadlocks between
    // batches); the plan lookups join outside it. Every lookup is written so that its only plan is an index
    // condition: accounts by `key_id = ANY(…)`, transactions by their primary key, the locked rows by
    // `id = ANY(…)`, a key's plan by a one-table subquery on its primary key. A join with the key list (or
    // with key_plans), or `ORDER BY key_id`, let a generic plan made on tables analysed while empty walk a
    // whole index per batch once they had grown (see PLAN_SETTINGS).
    if for_update {
        sqlx::query_as!(
            AccountRow,
            r#"WITH ids AS MATERIALIZED (
                   -- Serialises every batch naming one of these transaction ids until it commits, in hash
                   -- order: the primary key includes the partition key, so it no longer keeps an id unique
                   -- across partitions. A batch that inserts a new id holds its lock from here, before the
                   -- load looks the id up, to its commit.
                   SELECT count(pg_advisory_xact_lock(h.h)) AS n
                   FROM (SELECT DISTINCT hashtextextended(i, 0) AS h FROM UNNEST($3::text[]) i ORDER BY 1) h
               ), locked AS MATERIALIZED (
                   SELECT id, key_id, unit, limits, totals, updated_at FROM accounts
                   WHERE (SELECT n FROM ids) >= 0 AND id = ANY(ARRAY(
                       SELECT a.id FROM accounts a
                       WHERE a.key_id = ANY($1) AND a.unit = ANY($2)
                         AND (a.key_id, a.unit) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))
                       UNION
                       SELECT t.account_id FROM transactions t
                       WHERE t.transaction_id = ANY($3) AND t.position = ANY('{0,1,2,3,4,5,6,7}'::int2[])))
                   ORDER BY id
                   FOR UPDATE)
               SELECT l.id AS "id!", l.key_id AS "key_id!", l.unit AS "unit!",
                      l.limits AS "limits!: Json<Vec<StoredLimit>>", l.totals AS "totals!: Json<Vec<StoredTotals>>",
                      p.name AS "plan?",
                      (SELECT jsonb_agg(jsonb_build_object('name', pl.name, 'period', pl.period, 'amount', pl.amount, 'burst', pl.burst))
                       FROM plan_limits pl WHERE pl.plan_id = p.id AND pl.unit = l.unit)
                        AS "plan_limits?: Json<Vec<StoredLimit>>",
                      l.updated_at AS "updated_at!", clock_timestamp() AS "db_now?"
               FROM locked l
               LEFT JOIN plans p ON p.id = (SELECT kp.plan_id FROM key_plans kp WHERE kp.key_id = l.key_id)"#,
            &keys,
            &units,
            &ids
        )
        .fetch_all(&mut **tx)
        .await
    } else {
        sqlx::query_as!(
            AccountRow,
            r#"SELECT l.id AS "id!", l.key_id AS "key_id!", l.unit AS "unit!",
                      l.limits AS "limits!: Json<Vec<StoredLimit>>", l.totals AS "totals!: Json<Vec<StoredTotals>>",
                      p.name AS "plan?",
                      (SELECT jsonb_agg(jsonb_build_object('name', pl.name, 'period', pl.period, 'amount', pl.amount, 'burst', pl.burst))
                       FROM plan_limits pl WHERE pl.plan_id = p.id AND pl.unit = l.unit)
                        AS "plan_limits?: Json<Vec<StoredLimit>>",
                      l.updated_at AS "updated_at!", clock_timestamp() AS "db_now?"
               FROM accounts l
               LEFT JOIN plans p ON p.id = (SELECT kp.plan_id FROM key_plans kp WHERE kp.key_id = l.key_id)
               WHERE l.id = ANY(ARRAY(
                   SELECT a.id FROM accounts a
                   WHERE a.key_id = ANY($1) AND a.unit = ANY($2)
                     AND (a.key_id, a.unit) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))
                   UNION
                   SELECT t.account_id FROM transactions t
                   WHERE t.transaction_id = ANY($3) AND t.position = ANY('{0,1,2,3,4,5,6,7}'::int2[])))"#,
            &keys,
            &units,
            &ids
        )
        .fetch_all(&mut **tx)
        .await
    }
}

/// One row of the load statement: a named transaction (kind 1), an expiring hold (kind 2), the sums leaving
/// one aging range (kind 3) or the sums of a period whose totals are missing (kind 4).
struct LoadRow {
    kind: i16,
    i: Option<i64>,
    transaction_id: Option<String>,
    keys: Option<Vec<String>>,
    account_id: Option<i64>,
    unit: Option<String>,
    amount: Option<i64>,
    held_amount: Option<i64>,
    state: Option<i16>,
    created_at: Option<Timestamp>,
    expires_at: Option<Timestamp>,
    committed_at: Option<Timestamp>,
    reversed_at: Option<Timestamp>,
    committed_late: Option<bool>,
    metadata: Option<serde_json::Value>,
    sum_committed: Option<Decimal>,
    sum_held: Option<Decimal>,
}

impl LoadRow {
    fn into_tx(self) -> Result<Transaction, StorageError> {
        let missing = || StorageError::Corrupt("incomplete transaction row".into());
        TxRow {
            transaction_id: self.transaction_id.ok_or_else(missing)?,
            keys: self.keys.ok_or_else(missing)?,
            unit: self.unit.ok_or_else(missing)?,
            amount: self.amount.ok_or_else(missing)?,
            held_amount: self.held_amount.ok_or_else(missing)?,
            state: self.state.ok_or_else(missing)?,
            created_at: self.created_at.ok_or_else(missing)?,
            expires_at: self.expires_at,
            committed_at: self.committed_at,
            reversed_at: self.reversed_at,
            committed_late: self.committed_late.ok_or_else(missing)?,
            metadata: self.metadata.ok_or_else(missing)?,
            read_at: None,
        }
        .into_domain()
    }

    /// A hold of one of the batch's accounts (`owners`: the accounts by row id).
    fn into_expiring(self, owners: &HashMap<i64, &AccountKey>) -> Result<ExpiringHold, StorageError> {
        let missing = || StorageError::Corrupt("incomplete hold row".into());
        let owner = self.account_id.and_then(|id| owners.get(&id)).ok_or_else(missing)?;
        Ok(ExpiringHold {
            id: parse_stored(TransactionId::parse(self.transaction_id.ok_or_else(missing)?))?,
            account: (*owner).clone(),
            created_at: self.created_at.ok_or_else(missing)?,
            expires_at: self.expires_at.ok_or_else(missing)?,
            amount: self.amount.ok_or_else(missing)?,
        })
    }

    fn sums(&self) -> Result<(i128, i128), StorageError> {
        Ok((to_i128(self.sum_committed.unwrap_or_default())?, to_i128(self.sum_held.unwrap_or_default())?))
    }
}

/// Loads, in one statement, what a ledger needs besides the accounts: the named transactions, the expiring
/// holds, the sums that age out of each rolling period and the sums of periods that have no totals yet —
/// with `recount`, of every tracked period (reconciliation compares them with the running totals: the
/// same sums as a newly applied period gets, from the same statement). Returns the accounts' row ids by key,
/// for writing back.
async fn load(
    tx: &mut PgTx<'_, Postgres>,
    rows: Vec<AccountRow>,
    ids: &[TransactionId],
    also: &[(AccountKey, Period)],
    now: Timestamp,
    recount: bool,
    look_behind: bool,
) -> Result<(HashMap<AccountKey, i64>, Loaded, Stored), Attempt> {
    let mut account_ids = HashMap::with_capacity(rows.len());
    let mut loaded = Loaded { also: also.to_vec(), ..Loaded::default() };
    // Each account's expiry cursor: its holds expiring by its last write have been released (see the
    // migration 20261204000001). Fresh accounts of a read (id 0) have no rows to find. A repair looks
    // behind the cursors too: a hold found there is one the cursor's promise missed (`StaleHold`).
    let (mut row_ids, mut released_to) = (Vec::new(), Vec::new());
    for row in rows {
        if row.id != 0 {
            row_ids.push(row.id);
            released_to.push(if look_behind { NEVER_WRITTEN } else { row.updated_at });
        }
        let (id, account) = row.into_domain()?;
        account_ids.insert(account.key.clone(), id);
        loaded.accounts.push(account);
    }
    let named: Vec<String> = ids.iter().map(|i| i.as_str().to_owned()).collect();
    let mut ranges = Vec::new();
    let (mut range_ids, mut afters, mut uptos) = (Vec::new(), Vec::new(), Vec::new());
    let mut missing = Vec::new();
    let (mut missing_ids, mut froms) = (Vec::new(), Vec::new());
    for account in &loaded.accounts {
        let row_id = account_ids[&account.key];
        for range in account.aging_ranges(now) {
            ranges.push((account.key.clone(), range.period));
            range_ids.push(row_id);
            afters.push(range.after);
            uptos.push(range.upto);
        }
        let tracked = Loaded::tracked(account, also);
        let fresh = account.missing_periods(&tracked);
        let summed: Vec<Period> = if recount { tracked.into_iter().collect() } else { fresh.clone() };
        for period in summed {
            let from = period.counts_from(now);
            missing.push((account.key.clone(), period, period.start_at(now), fresh.contains(&period)));
            missing_ids.push(row_id);
            froms.push(from);
        }
    }
    // Each branch's per-row ranges of `created_at` also as one scalar range over the batch: Postgres prunes
    // the partitions outside it as the statement starts. The per-row ranges prune only as each row is probed,
    // after a scan of every partition was set up for the branch (executor start-up is about a third of
    // Postgres's CPU for a lone reservation). Null (every partition pruned) when a branch has no rows.
    let holds_after = released_to.iter().min().and_then(|t| t.checked_sub_signed(MAX_HOLD_TTL));
    let (aging_after, aging_upto) = (afters.iter().min().copied(), uptos.iter().max().copied());
    let fresh_from = froms.iter().min().copied();
    let rows = sqlx::query_as!(
        LoadRow,
        r#"SELECT 1::int2 AS "kind!", NULL::int8 AS "i?", t.transaction_id AS "transaction_id?",
                  (SELECT array_agg((SELECT a2.key_id::text FROM accounts a2 WHERE a2.id = t2.account_id)
                                    ORDER BY t2.position)
                   FROM transactions t2
                   WHERE t2.transaction_id = t.transaction_id AND t2.created_at = t.created_at) AS "keys?",
                  NULL::int8 AS "account_id?",
                  (SELECT a.unit FROM accounts a WHERE a.id = t.account_id) AS "unit?", t.amount AS "amount?",
                  t.held_amount AS "held_amount?", t.state AS "state?", t.created_at AS "created_at?",
                  t.expires_at AS "expires_at?", t.committed_at AS "committed_at?",
                  t.reversed_at AS "reversed_at?", t.committed_late AS "committed_late?",
                  t.metadata AS "metadata?", NULL::numeric AS "sum_committed?", NULL::numeric AS "sum_held?"
           FROM transactions t
           WHERE t.transaction_id = ANY($1) AND t.position = 0
           UNION ALL
           SELECT 2::int2, h.position::int8, h.transaction_id, NULL, h.account_id, NULL, h.amount,
                  h.held_amount, h.state, h.created_at, h.expires_at, NULL, NULL, NULL, NULL, NULL::numeric,
                  NULL::numeric
           FROM UNNEST($2::bigint[], $9::timestamptz[]) AS c(account_id, released_to)
           CROSS JOIN LATERAL (
               SELECT t.* FROM transactions t
               -- Only holds expiring after the account's cursor. A hold expires after it was created, and at
               -- most MAX_HOLD_TTL after: the bounds on created_at only prune partitions.
               -- OFFSET 0 keeps the subquery a probe per account (never merged into a join that walks the
               -- whole index in account order).
               WHERE t.account_id = c.account_id AND t.expires_at > c.released_to AND t.expires_at <= $3
                 AND t.created_at < $3 AND t.created_at > c.released_to - $10::int8 * interval '1 second'
                 AND t.created_at > $11 AND t.state = 1
               OFFSET 0) h
           UNION ALL
           SELECT 3::int2, r.i, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                  s.committed, s.held
           FROM UNNEST($4::bigint[], $5::timestamptz[], $6::timestamptz[])
                WITH ORDINALITY AS r(account_id, after, upto, i)
           CROSS JOIN LATERAL (
               SELECT COALESCE(SUM(t.amount) FILTER (WHERE t.state = 2), 0) AS committed,
                      COALESCE(SUM(t.amount) FILTER (WHERE t.state = 1 AND t.expires_at > $3), 0) AS held
               FROM transactions t
               WHERE t.account_id = r.account_id AND t.created_at > r.after AND t.created_at <= r.upto
                 AND t.created_at > $12 AND t.created_at <= $13
               HAVING count(*) > 0) s
           UNION ALL
           SELECT 4::int2, m.i, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                  s.committed, s.held
           FROM UNNEST($7::bigint[], $8::timestamptz[]) WITH ORDINALITY AS m(account_id, from_, i)
           CROSS JOIN LATERAL (
               SELECT COALESCE(SUM(t.amount) FILTER (WHERE t.state = 2), 0) AS committed,
                      COALESCE(SUM(t.amount) FILTER (WHERE t.state = 1 AND t.expires_at > $3), 0) AS held
               FROM transactions t
               WHERE t.account_id = m.account_id AND t.created_at >= m.from_ AND t.created_at >= $14
               HAVING count(*) > 0) s"#,
        &named,
        &row_ids,
        now,
        &range_ids,
        &afters,
        &uptos,
        &missing_ids,
        &froms,
        &released_to,
        MAX_HOLD_TTL.num_seconds(),
        holds_after,
        aging_after,
        aging_upto,
        fresh_from,
    )
    .fetch_all(&mut **tx)
    .await?;
    let owners: HashMap<i64, &AccountKey> = account_ids.iter().map(|(key, id)| (*id, key)).collect();
    let mut fresh: HashMap<usize, (i128, i128)> = HashMap::new();
    let mut stored = Stored::default();
    for row in rows {
        match row.kind {
            1 => {
                let tx = row.into_tx()?;
                if tx.state == TxState::Held {
                    stored.held.insert(tx.id.clone());
                }
                // The lock statement ran before this one: a transaction committed in between (a commit or
                // reverse racing its own reserve) may charge an account this batch did not lock. Run again.
                if tx.accounts.iter().any(|a| !account_ids.contains_key(a)) {
                    return Err(Attempt::Retry);
                }
                loaded.transactions.push(tx);
            }
            2 => {
                let first = row.i == Some(0);
                let hold = row.into_expiring(&owners)?;
                if first {
                    stored.expiring_first.insert(hold.id.clone(), hold.account.clone());
                }
                loaded.expiring.push(hold);
            }
            3 => {
                let (key, period) = row
                    .i
                    .and_then(|i| usize::try_from(i - 1).ok())
                    .and_then(|i| ranges.get(i))
                    .cloned()
                    .ok_or_else(|| StorageError::Corrupt(format!("aging range {:?}", row.i)))?;
                let (committed, held) = row.sums()?;
                loaded.aged.push((key, AgedOut { period, committed, held }));
            }
            _ => {
                let i = row.i.and_then(|i| usize::try_from(i - 1).ok()).filter(|i| *i < missing.len());
                let i = i.ok_or_else(|| StorageError::Corrupt(format!("missing period {:?}", row.i)))?;
                fresh.insert(i, row.sums()?);
            }
        }
    }
    for (i, (key, period, since, is_fresh)) in missing.into_iter().enumerate() {
        let (committed, held) = fresh.remove(&i).unwrap_or_default();
        let totals = Totals { committed, held, since };
        if recount {
            loaded.recounted.push((key.clone(), period, totals));
        }
        if is_fresh {
            loaded.fresh.push((key, period, totals));
        }
    }
    // Every hold a batch releases as expired is one of these (see `Ledger::open`).
    stored.expiring_range = created_range(loaded.expiring.iter().map(|h| h.created_at));
    Ok((account_ids, loaded, stored))
}

/// What the save needs to know of the rows as they were loaded, beyond what the ledger keeps.
#[derive(Default)]
struct Stored {
    /// Named transactions stored as HELD (the ledger may since have marked them expired).
    held: HashSet<TransactionId>,
    /// The first key's account of each releasing hold whose first key is in the batch: where it is counted.
    expiring_first: HashMap<TransactionId, AccountKey>,
    /// The range of `created_at` of the expiring holds: the partitions their release updates.
    expiring_range: (Option<Timestamp>, Option<Timestamp>),
}

/// Writes a batch's changes in one statement. Returns false when a new transaction id was taken meanwhile by
/// another batch: the caller rolls back and retries, and the retry sees the id as existing.
async fn save(
    tx: &mut PgTx<'_, Postgres>,
    account_ids: &HashMap<AccountKey, i64>,
    stored: &Stored,
    changes: Changes,
    now: Timestamp,
) -> Result<bool, Attempt> {
    // Only batches that changed limits or reversed something have events: no extra round trip otherwise.
    audit::insert_audit(tx, &changes.audit, false).await?;
    if changes.inserted.is_empty()
        && changes.updated.is_empty()
        && changes.accounts.is_empty()
        && changes.expired.is_empty()
    {
        return Ok(true);
    }
    // One row per account charged.
    let mut new = TxColumns::default();
    let (mut positions, mut owners, mut held_amounts, mut created, mut expires, mut metadata) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t in &changes.inserted {
        for (position, account) in t.accounts.iter().enumerate() {
            new.push(t);
            positions.push(i16::try_from(position).unwrap_or(i16::MAX));
            owners.push(account_ids[account]);
            held_amounts.push(t.held_amount);
            created.push(t.created_at);
            expires.push(t.expires_at);
            let entries = if position == 0 { t.metadata.entries().clone() } else { Default::default() };
            metadata.push(serde_json::to_value(entries).unwrap_or_default());
        }
    }
    let mut upd = TxColumns::default();
    changes.updated.iter().for_each(|t| upd.push(t));
    let (expired_ids, expired_owners): (Vec<String>, Vec<i64>) =
        changes.expired.iter().map(|(id, account)| (id.as_str().to_owned(), account_ids[account])).unzip();
    // The range of `created_at` of the rows each UPDATE changes: Postgres prunes the partitions outside it when
    // the statement starts, instead of probing every partition's primary key for every id.
    let updated_range = created_range(changes.updated.iter().map(|t| t.created_at));
    let expired_range = stored.expiring_range;
    // Per account row: the new limits and totals (None: unchanged), the latest expiry of the holds placed on
    // it, and the change in its count of open holds (on the first key of each).
    let mut writes: HashMap<i64, AccountWrite> = HashMap::new();
    for a in &changes.accounts {
        let w = writes.entry(account_ids[&a.key]).or_default();
        w.limits = Some(limits_json(a));
        w.totals = Some(totals_json(a));
    }
    for t in &changes.inserted {
        if let Some(expires) = t.expires_at {
            for account in &t.accounts {
                let w = writes.entry(account_ids[account]).or_default();
                w.holds_until = w.holds_until.max(Some(expires));
            }
        }
        if t.state == TxState::Held {
            writes.entry(account_ids[&t.accounts[0]]).or_default().opened += 1;
        }
    }
    for t in &changes.updated {
        if stored.held.contains(&t.id) && t.state != TxState::Held {
            writes.entry(account_ids[&t.accounts[0]]).or_default().opened -= 1;
        }
    }
    // A stale hold's share is not counted off (see `Changes::stale`).
    for (id, account) in changes.expired.iter().filter(|share| !changes.stale.contains(share)) {
        if stored.expiring_first.get(id) == Some(account) {
            writes.entry(account_ids[account]).or_default().opened -= 1;
        }
    }
    let mut ids = Vec::with_capacity(writes.len());
    let (mut limits, mut totals, mut holds_until, mut opened) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (id, w) in writes {
        ids.push(id);
        limits.push(w.limits);
        totals.push(w.totals);
        holds_until.push(w.holds_until);
        opened.push(w.opened);
    }
    let inserted = sqlx::query_scalar!(
        r#"WITH ins AS (
               INSERT INTO transactions (transaction_id, position, account_id, amount, held_amount, state,
                                         created_at, expires_at, committed_at, reversed_at, committed_late,
                                         metadata)
               SELECT * FROM UNNEST($1::text[], $2::int2[], $3::bigint[], $4::bigint[], $5::bigint[],
                                    $6::int2[], $7::timestamptz[], $8::timestamptz[], $9::timestamptz[],
                                    $10::timestamptz[], $11::bool[], $12::jsonb[])
               -- Ids are unique across partitions by the advisory locks of `select_accounts`; this only
               -- guards the (transaction_id, position, created_at) key.
               ON CONFLICT DO NOTHING
               RETURNING 1
           ), upd AS (
               UPDATE transactions t
               SET amount = u.amount, state = u.state, committed_at = u.committed_at,
                   reversed_at = u.reversed_at, committed_late = u.late
               FROM UNNEST($13::text[], $14::bigint[], $15::int2[], $16::timestamptz[], $17::timestamptz[],
                           $18::bool[]) AS u(id, amount, state, committed_at, reversed_at, late)
               WHERE t.transaction_id = ANY($13) AND t.transaction_id = u.id
                 AND t.created_at >= $27 AND t.created_at <= $28
           ), exp AS (
               UPDATE transactions t SET state = 4
               FROM UNNEST($19::text[], $20::bigint[]) AS e(id, account_id)
               -- `+ 0`: the account is matched as a filter, not as a join column, so that no plan walks an
               -- index in account order to merge with the list (only the primary key finds these rows).
               WHERE t.transaction_id = ANY($19) AND t.transaction_id = e.id AND t.account_id + 0 = e.account_id
                 AND t.state = 1 AND t.created_at >= $29 AND t.created_at <= $30
           ), acc AS (
               -- `updated_at` is also the account's expiry cursor: this batch released every hold of it
               -- expiring by `now`. Never below zero: a count that drifted must not fail the batch.
               UPDATE accounts a
               SET limits = COALESCE(u.limits, a.limits), totals = COALESCE(u.totals, a.totals), updated_at = $24,
                   holds_until = GREATEST(a.holds_until, u.holds_until),
                   open_holds = GREATEST(a.open_holds + u.opened, 0)
               FROM UNNEST($21::bigint[], $22::jsonb[], $23::jsonb[], $25::timestamptz[], $26::int4[])
                    AS u(id, limits, totals, holds_until, opened)
               WHERE a.id = ANY($21) AND a.id = u.id
           )
           -- Each UPDATE finds its rows by `= ANY(…)` on an index (a plan-proof path; see PLAN_SETTINGS)
           -- and takes their new values from the UNNEST join.
           -- Every data-modifying CTE runs to completion whether or not it is read.
           SELECT count(*) AS "inserted!" FROM ins"#,
        &new.ids,
        &positions,
        &owners,
        &new.amounts,
        &held_amounts,
        &new.states,
        &created,
        &expires as &[Option<Timestamp>],
        &new.committed_at as &[Option<Timestamp>],
        &new.reversed_at as &[Option<Timestamp>],
        &new.late,
        &metadata,
        &upd.ids,
        &upd.amounts,
        &upd.states,
        &upd.committed_at as &[Option<Timestamp>],
        &upd.reversed_at as &[Option<Timestamp>],
        &upd.late,
        &expired_ids,
        &expired_owners,
        &ids,
        &limits as &[Option<serde_json::Value>],
        &totals as &[Option<serde_json::Value>],
        now,
        &holds_until as &[Option<Timestamp>],
        &opened,
        updated_range.0,
        updated_range.1,
        expired_range.0,
        expired_range.1,
    )
    .fetch_one(&mut **tx)
    .await?;
    Ok(inserted == new.ids.len() as i64)
}

/// The earliest and latest of `created`; nulls (no rows, which prunes every partition) when it is empty.
fn created_range(created: impl Iterator<Item = Timestamp>) -> (Option<Timestamp>, Option<Timestamp>) {
    created.fold((None, None), |(lo, hi), at| {
        (Some(lo.map_or(at, |lo: Timestamp| lo.min(at))), Some(hi.map_or(at, |hi: Timestamp| hi.max(at))))
    })
}

/// What a batch writes to one account row.
#[derive(Default)]
struct AccountWrite {
    limits: Option<serde_json::Value>,
    totals: Option<serde_json::Value>,
    holds_until: Option<Timestamp>,
    opened: i32,
}

/// The mutable columns of transactions, as parallel arrays for UNNEST.
#[derive(Default)]
struct TxColumns {
    ids: Vec<String>,
    amounts: Vec<i64>,
    states: Vec<i16>,
    committed_at: Vec<Option<Timestamp>>,
    reversed_at: Vec<Option<Timestamp>>,
    late: Vec<bool>,
}

impl TxColumns {
    fn push(&mut self, t: &Transaction) {
        self.ids.push(t.id.as_str().to_owned());
        self.amounts.push(t.amount);
        self.states.push(t.state.code());
        self.committed_at.push(t.committed_at);
        self.reversed_at.push(t.reversed_at);
        self.late.push(t.committed_late);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_range_covers_every_row_and_prunes_all_when_empty() {
        let t = |s: i64| Timestamp::from_timestamp(1_900_000_000 + s, 0).unwrap();
        assert_eq!(created_range([t(5), t(-3), t(9)].into_iter()), (Some(t(-3)), Some(t(9))));
        assert_eq!(created_range([t(5)].into_iter()), (Some(t(5)), Some(t(5))));
        assert_eq!(created_range(std::iter::empty()), (None, None));
    }
}
