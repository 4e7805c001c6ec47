//! Every SQL statement of the service. Statements are set-based: a batch of any size costs the same round trips.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction as PgTx};

use super::{Access, BatchOutput, Cursor, PoolStats, StorageError, Store, sorted_unique};
use crate::domain::{
    Account, AccountKey, AgedOut, Changes, KeyId, Ledger, Loaded, Metadata, Timestamp, Transaction,
    TransactionId, TxState, Unit, Window, WindowTotals,
};

/// Embedded migrations, the same files `sqlx migrate run` applies.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How often a batch is retried after a deadlock, a serialization failure or a transaction id taken by a
/// concurrent batch of another account.
const MAX_ATTEMPTS: u32 = 5;

/// Connections are replaced this often. Postgres caches a generic plan per prepared statement and connection;
/// one built while the tables were nearly empty (a fresh database) hash-joins over whole indexes and would be
/// kept after the tables have grown. Seen in the benchmark: four fifths of the throughput lost until the
/// connections were replaced. Planning every execution instead (`plan_cache_mode = force_custom_plan`) is
/// robust but doubled the latency of a reservation at low load.
pub const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Tasks waiting in `begin` for a connection.
    waiting: Arc<AtomicU64>,
}

impl From<sqlx::Error> for StorageError {
    fn from(e: sqlx::Error) -> Self {
        StorageError::Unavailable(Arc::new(e))
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
        Self { pool, waiting: Arc::default() }
    }

    async fn begin(&self) -> Result<PgTx<'static, Postgres>, sqlx::Error> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let tx = self.pool.begin().await;
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

    /// Pool settings of the service: a bounded wait for a connection, and connections replaced every
    /// [`CONNECTION_LIFETIME`].
    pub fn pool_options(max_connections: u32) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .max_lifetime(CONNECTION_LIFETIME)
    }

    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StorageError> {
        let pool = Self::pool_options(max_connections).connect_with(Self::connect_options(url)?).await?;
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
        now: Timestamp,
        apply: &mut F,
    ) -> Result<BatchOutput<R>, Attempt>
    where
        F: FnMut(&mut Ledger) -> R,
    {
        let mut tx = self.begin().await?;
        let rows = match access {
            Access::Write => lock_accounts(&mut tx, accounts, ids, now).await?,
            Access::Read => {
                sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .execute(&mut *tx)
                    .await?;
                read_accounts(&mut tx, accounts, ids, now).await?
            }
        };
        let (account_ids, loaded) = load(&mut tx, rows, ids, now).await?;
        let mut ledger = Ledger::open(now, loaded);
        let value = apply(&mut ledger);
        let changes = ledger.into_changes();
        let expired_holds = changes.expired_holds;
        if access == Access::Write {
            if !save(&mut tx, &account_ids, changes, now).await? {
                return Err(Attempt::Retry);
            }
            tx.commit().await?;
        }
        Ok(BatchOutput { value, expired_holds })
    }
}

impl Store for PgStore {
    async fn with_ledger<R, F>(
        &self,
        access: Access,
        accounts: &[AccountKey],
        transactions: &[TransactionId],
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
            match self.attempt(access, &accounts, transactions, now, &mut apply).await {
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

    async fn get_transaction(&self, id: &TransactionId) -> Result<Option<Transaction>, StorageError> {
        let row = sqlx::query_as!(
            TxRow,
            r#"SELECT t.transaction_id, a.key_id, a.unit, t.amount, t.held_amount, t.state, t.created_at,
                      t.expires_at, t.committed_at, t.reversed_at, t.committed_late, t.metadata
               FROM transactions t JOIN accounts a ON a.id = t.account_id
               WHERE t.transaction_id = $1"#,
            id.as_str()
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(TxRow::into_domain).transpose()
    }

    async fn list_transactions(
        &self,
        account: &AccountKey,
        cursor: Option<&Cursor>,
        limit: u32,
    ) -> Result<Vec<Transaction>, StorageError> {
        // Without a cursor, start past any representable instant: one query plan for every page.
        let (before, before_id) = match cursor {
            Some(c) => (c.created_at, c.transaction_id.as_str()),
            None => (far_future(), ""),
        };
        let rows = sqlx::query_as!(
            TxRow,
            r#"SELECT t.transaction_id, a.key_id, a.unit, t.amount, t.held_amount, t.state, t.created_at,
                      t.expires_at, t.committed_at, t.reversed_at, t.committed_late, t.metadata
               FROM accounts a JOIN transactions t ON t.account_id = a.id
               WHERE a.key_id = $1 AND a.unit = $2
                 AND (t.created_at < $3 OR (t.created_at = $3 AND t.transaction_id < $4))
               ORDER BY t.created_at DESC, t.transaction_id DESC
               LIMIT $5"#,
            account.key_id.as_str(),
            account.unit.as_str(),
            before,
            before_id,
            i64::from(limit),
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(TxRow::into_domain).collect()
    }

    async fn accounts_with_expired_holds(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> Result<Vec<AccountKey>, StorageError> {
        let rows = sqlx::query!(
            r#"SELECT a.key_id, a.unit FROM accounts a
               WHERE a.id IN (SELECT DISTINCT t.account_id FROM transactions t
                              WHERE t.state = 1 AND t.expires_at <= $1 LIMIT $2)"#,
            now,
            i64::from(limit)
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(|r| account_key(r.key_id, r.unit)).collect()
    }

    async fn open_holds(&self, now: Timestamp) -> Result<u64, StorageError> {
        let n = sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM transactions WHERE state = 1 AND expires_at > $1"#,
            now
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
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
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await?;
        let expected = MIGRATOR.iter().map(|m| m.version).max();
        if applied < expected {
            return Err(StorageError::Corrupt(format!(
                "database is migrated to {applied:?}, this binary needs {expected:?}"
            )));
        }
        Ok(())
    }
}

fn far_future() -> Timestamp {
    chrono::DateTime::from_timestamp(253_402_300_799, 0).expect("9999-12-31 is representable")
}

struct AccountRow {
    id: i64,
    key_id: String,
    unit: String,
    limit_daily: Option<i64>,
    limit_weekly: Option<i64>,
    limit_monthly: Option<i64>,
    limit_annual: Option<i64>,
    committed_daily: Decimal,
    committed_weekly: Decimal,
    committed_monthly: Decimal,
    committed_annual: Decimal,
    held_daily: Decimal,
    held_weekly: Decimal,
    held_monthly: Decimal,
    held_annual: Decimal,
    aged_daily: Timestamp,
    aged_weekly: Timestamp,
    aged_monthly: Timestamp,
    aged_annual: Timestamp,
}

impl AccountRow {
    fn into_domain(self) -> Result<(i64, Account), StorageError> {
        let totals = |committed: Decimal, held: Decimal, aged_through| {
            Ok::<_, StorageError>(WindowTotals {
                committed: to_i128(committed)?,
                held: to_i128(held)?,
                aged_through,
            })
        };
        let account = Account {
            key: account_key(self.key_id, self.unit)?,
            limits: [self.limit_daily, self.limit_weekly, self.limit_monthly, self.limit_annual],
            windows: [
                totals(self.committed_daily, self.held_daily, self.aged_daily)?,
                totals(self.committed_weekly, self.held_weekly, self.aged_weekly)?,
                totals(self.committed_monthly, self.held_monthly, self.aged_monthly)?,
                totals(self.committed_annual, self.held_annual, self.aged_annual)?,
            ],
        };
        Ok((self.id, account))
    }
}

struct TxRow {
    transaction_id: String,
    key_id: String,
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
}

impl TxRow {
    fn into_domain(self) -> Result<Transaction, StorageError> {
        let metadata: std::collections::BTreeMap<String, String> = serde_json::from_value(self.metadata)
            .map_err(|e| StorageError::Corrupt(format!("metadata: {e}")))?;
        Ok(Transaction {
            id: parse_stored(TransactionId::parse(self.transaction_id))?,
            account: account_key(self.key_id, self.unit)?,
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

fn to_decimal(v: i128) -> Result<Decimal, StorageError> {
    Decimal::try_from_i128_with_scale(v, 0)
        .map_err(|_| StorageError::Corrupt(format!("total {v} exceeds 96 bits")))
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
    now: Timestamp,
) -> Result<Vec<AccountRow>, sqlx::Error> {
    let mut rows = select_accounts(tx, accounts, ids, true).await?;
    let found: HashSet<(&str, &str)> = rows.iter().map(|r| (r.key_id.as_str(), r.unit.as_str())).collect();
    let missing: Vec<AccountKey> =
        accounts.iter().filter(|a| !found.contains(&(a.key_id.as_str(), a.unit.as_str()))).cloned().collect();
    if missing.is_empty() {
        return Ok(rows);
    }
    let (keys, units) = key_columns(&missing);
    let aged = |w: Window| vec![now - w.length(); missing.len()];
    sqlx::query!(
        r#"INSERT INTO accounts (key_id, unit, aged_daily, aged_weekly, aged_monthly, aged_annual)
           SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                                $5::timestamptz[], $6::timestamptz[]) AS n(k, u, d, w, m, a)
           ORDER BY k, u
           ON CONFLICT (key_id, unit) DO NOTHING"#,
        &keys,
        &units,
        &aged(Window::Daily),
        &aged(Window::Weekly),
        &aged(Window::Monthly),
        &aged(Window::Annual),
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
    now: Timestamp,
) -> Result<Vec<AccountRow>, sqlx::Error> {
    let mut rows = select_accounts(tx, accounts, ids, false).await?;
    let found: HashSet<(String, String)> = rows.iter().map(|r| (r.key_id.clone(), r.unit.clone())).collect();
    for key in accounts {
        if !found.contains(&(key.key_id.as_str().to_owned(), key.unit.as_str().to_owned())) {
            rows.push(fresh_row(key, now));
        }
    }
    Ok(rows)
}

fn fresh_row(key: &AccountKey, now: Timestamp) -> AccountRow {
    let a = Account::new(key.clone(), now);
    AccountRow {
        id: 0,
        key_id: key.key_id.as_str().to_owned(),
        unit: key.unit.as_str().to_owned(),
        limit_daily: None,
        limit_weekly: None,
        limit_monthly: None,
        limit_annual: None,
        committed_daily: Decimal::ZERO,
        committed_weekly: Decimal::ZERO,
        committed_monthly: Decimal::ZERO,
        committed_annual: Decimal::ZERO,
        held_daily: Decimal::ZERO,
        held_weekly: Decimal::ZERO,
        held_monthly: Decimal::ZERO,
        held_annual: Decimal::ZERO,
        aged_daily: a.windows[0].aged_through,
        aged_weekly: a.windows[1].aged_through,
        aged_monthly: a.windows[2].aged_through,
        aged_annual: a.windows[3].aged_through,
    }
}

/// The accounts named by key, and those owning the transactions `ids`, in key order.
async fn select_accounts(
    tx: &mut PgTx<'_, Postgres>,
    accounts: &[AccountKey],
    ids: &[TransactionId],
    for_update: bool,
) -> Result<Vec<AccountRow>, sqlx::Error> {
    let (keys, units) = key_columns(accounts);
    let ids: Vec<String> = ids.iter().map(|i| i.as_str().to_owned()).collect();
    // The id subquery is a semi-join on the primary key, so the lock step stays one index probe per account.
    if for_update {
        sqlx::query_as!(
            AccountRow,
            r#"SELECT id, key_id, unit, limit_daily, limit_weekly, limit_monthly, limit_annual,
                      committed_daily, committed_weekly, committed_monthly, committed_annual,
                      held_daily, held_weekly, held_monthly, held_annual,
                      aged_daily, aged_weekly, aged_monthly, aged_annual
               FROM accounts
               WHERE id IN (SELECT a.id FROM accounts a
                            JOIN UNNEST($1::text[], $2::text[]) AS k(key_id, unit)
                              ON a.key_id = k.key_id AND a.unit = k.unit
                            UNION
                            SELECT t.account_id FROM transactions t WHERE t.transaction_id = ANY($3))
               ORDER BY key_id, unit
               FOR UPDATE"#,
            &keys,
            &units,
            &ids
        )
        .fetch_all(&mut **tx)
        .await
    } else {
        sqlx::query_as!(
            AccountRow,
            r#"SELECT id, key_id, unit, limit_daily, limit_weekly, limit_monthly, limit_annual,
                      committed_daily, committed_weekly, committed_monthly, committed_annual,
                      held_daily, held_weekly, held_monthly, held_annual,
                      aged_daily, aged_weekly, aged_monthly, aged_annual
               FROM accounts
               WHERE id IN (SELECT a.id FROM accounts a
                            JOIN UNNEST($1::text[], $2::text[]) AS k(key_id, unit)
                              ON a.key_id = k.key_id AND a.unit = k.unit
                            UNION
                            SELECT t.account_id FROM transactions t WHERE t.transaction_id = ANY($3))"#,
            &keys,
            &units,
            &ids
        )
        .fetch_all(&mut **tx)
        .await
    }
}

/// One row of the load statement: a named transaction (kind 1), an expiring hold (kind 2) or the sums leaving
/// one aging range (kind 3).
struct LoadRow {
    kind: i16,
    i: Option<i64>,
    transaction_id: Option<String>,
    key_id: Option<String>,
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
            key_id: self.key_id.ok_or_else(missing)?,
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
        }
        .into_domain()
    }
}

/// Loads, in one statement, what a ledger needs besides the accounts: the named transactions, the expiring
/// holds and the sums that age out of each window. Returns the accounts' row ids by key, for writing back.
async fn load(
    tx: &mut PgTx<'_, Postgres>,
    rows: Vec<AccountRow>,
    ids: &[TransactionId],
    now: Timestamp,
) -> Result<(HashMap<AccountKey, i64>, Loaded), Attempt> {
    let mut account_ids = HashMap::with_capacity(rows.len());
    let mut loaded = Loaded::default();
    for row in rows {
        let (id, account) = row.into_domain()?;
        account_ids.insert(account.key.clone(), id);
        loaded.accounts.push(account);
    }
    // Fresh accounts of a read (id 0) have no rows to find.
    let row_ids: Vec<i64> = account_ids.values().copied().filter(|id| *id != 0).collect();
    let named: Vec<String> = ids.iter().map(|i| i.as_str().to_owned()).collect();
    let mut ranges = Vec::new();
    let (mut range_ids, mut afters, mut uptos) = (Vec::new(), Vec::new(), Vec::new());
    for account in &loaded.accounts {
        let row_id = account_ids[&account.key];
        for range in account.aging_ranges(now).filter(|_| row_id != 0) {
            ranges.push((account.key.clone(), range.window));
            range_ids.push(row_id);
            afters.push(range.after);
            uptos.push(range.upto);
        }
    }
    let rows = sqlx::query_as!(
        LoadRow,
        r#"SELECT 1::int2 AS "kind!", NULL::int8 AS "i?", t.transaction_id AS "transaction_id?",
                  a.key_id AS "key_id?", a.unit AS "unit?", t.amount AS "amount?",
                  t.held_amount AS "held_amount?", t.state AS "state?", t.created_at AS "created_at?",
                  t.expires_at AS "expires_at?", t.committed_at AS "committed_at?",
                  t.reversed_at AS "reversed_at?", t.committed_late AS "committed_late?",
                  t.metadata AS "metadata?", NULL::numeric AS "sum_committed?", NULL::numeric AS "sum_held?"
           FROM transactions t JOIN accounts a ON a.id = t.account_id
           WHERE t.transaction_id = ANY($1)
           UNION ALL
           SELECT 2::int2, NULL::int8, t.transaction_id, a.key_id, a.unit, t.amount, t.held_amount, t.state,
                  t.created_at, t.expires_at, t.committed_at, t.reversed_at, t.committed_late, t.metadata,
                  NULL::numeric, NULL::numeric
           FROM transactions t JOIN accounts a ON a.id = t.account_id
           WHERE t.account_id = ANY($2) AND t.state = 1 AND t.expires_at <= $3
           UNION ALL
           SELECT 3::int2, r.i, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                  COALESCE(SUM(t.amount) FILTER (WHERE t.state = 2), 0),
                  COALESCE(SUM(t.amount) FILTER (WHERE t.state = 1 AND t.expires_at > $3), 0)
           FROM UNNEST($4::bigint[], $5::timestamptz[], $6::timestamptz[])
                WITH ORDINALITY AS r(account_id, after, upto, i)
           JOIN transactions t
             ON t.account_id = r.account_id AND t.created_at > r.after AND t.created_at <= r.upto
           GROUP BY r.i"#,
        &named,
        &row_ids,
        now,
        &range_ids,
        &afters,
        &uptos,
    )
    .fetch_all(&mut **tx)
    .await?;
    for row in rows {
        match row.kind {
            1 => loaded.transactions.push(row.into_tx()?),
            2 => loaded.expiring.push(row.into_tx()?),
            _ => {
                let (key, window) = row
                    .i
                    .and_then(|i| usize::try_from(i - 1).ok())
                    .and_then(|i| ranges.get(i))
                    .cloned()
                    .ok_or_else(|| StorageError::Corrupt(format!("aging range {:?}", row.i)))?;
                let sum = |d: Option<Decimal>| to_i128(d.unwrap_or_default());
                let out = AgedOut { window, committed: sum(row.sum_committed)?, held: sum(row.sum_held)? };
                loaded.aged.push((key, out));
            }
        }
    }
    Ok((account_ids, loaded))
}

/// Writes a batch's changes in one statement. Returns false when a new transaction id was taken meanwhile by
/// another account's batch: the caller rolls back and retries, and the retry sees the id as existing.
async fn save(
    tx: &mut PgTx<'_, Postgres>,
    account_ids: &HashMap<AccountKey, i64>,
    changes: Changes,
    now: Timestamp,
) -> Result<bool, Attempt> {
    if changes.inserted.is_empty() && changes.updated.is_empty() && changes.accounts.is_empty() {
        return Ok(true);
    }
    let n = changes.inserted.len();
    let mut new = TxColumns::with_capacity(n);
    let mut owners = Vec::with_capacity(n);
    let mut held_amounts = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut expires = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    for t in &changes.inserted {
        new.push(t);
        owners.push(account_ids[&t.account]);
        held_amounts.push(t.held_amount);
        created.push(t.created_at);
        expires.push(t.expires_at);
        metadata.push(serde_json::to_value(t.metadata.entries()).unwrap_or_default());
    }
    let mut upd = TxColumns::with_capacity(changes.updated.len());
    changes.updated.iter().for_each(|t| upd.push(t));

    let mut ids = Vec::new();
    let mut limits: [Vec<Option<i64>>; 4] = Default::default();
    let mut committed: [Vec<Decimal>; 4] = Default::default();
    let mut held: [Vec<Decimal>; 4] = Default::default();
    let mut aged: [Vec<Timestamp>; 4] = Default::default();
    for a in &changes.accounts {
        ids.push(account_ids[&a.key]);
        for w in Window::ALL {
            let i = w.index();
            limits[i].push(a.limits[i]);
            committed[i].push(to_decimal(a.windows[i].committed)?);
            held[i].push(to_decimal(a.windows[i].held)?);
            aged[i].push(a.windows[i].aged_through);
        }
    }
    let inserted = sqlx::query_scalar!(
        r#"WITH ins AS (
               INSERT INTO transactions (transaction_id, account_id, amount, held_amount, state, created_at,
                                         expires_at, committed_at, reversed_at, committed_late, metadata)
               SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::int2[],
                                    $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::timestamptz[],
                                    $10::bool[], $11::jsonb[])
               ON CONFLICT (transaction_id) DO NOTHING
               RETURNING 1
           ), upd AS (
               UPDATE transactions t
               SET amount = u.amount, state = u.state, committed_at = u.committed_at,
                   reversed_at = u.reversed_at, committed_late = u.late
               FROM UNNEST($12::text[], $13::bigint[], $14::int2[], $15::timestamptz[], $16::timestamptz[],
                           $17::bool[]) AS u(id, amount, state, committed_at, reversed_at, late)
               WHERE t.transaction_id = u.id
           ), acc AS (
               UPDATE accounts a
               SET limit_daily = u.ld, limit_weekly = u.lw, limit_monthly = u.lm, limit_annual = u.la,
                   committed_daily = u.cd, committed_weekly = u.cw, committed_monthly = u.cm,
                   committed_annual = u.ca,
                   held_daily = u.hd, held_weekly = u.hw, held_monthly = u.hm, held_annual = u.ha,
                   aged_daily = u.ad, aged_weekly = u.aw, aged_monthly = u.am, aged_annual = u.aa,
                   updated_at = $35
               FROM UNNEST($18::bigint[],
                           $19::bigint[], $20::bigint[], $21::bigint[], $22::bigint[],
                           $23::numeric[], $24::numeric[], $25::numeric[], $26::numeric[],
                           $27::numeric[], $28::numeric[], $29::numeric[], $30::numeric[],
                           $31::timestamptz[], $32::timestamptz[], $33::timestamptz[], $34::timestamptz[])
                    AS u(id, ld, lw, lm, la, cd, cw, cm, ca, hd, hw, hm, ha, ad, aw, am, aa)
               WHERE a.id = u.id
           )
           -- Every data-modifying CTE runs to completion whether or not it is read.
           SELECT count(*) AS "inserted!" FROM ins"#,
        &new.ids,
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
        &ids,
        &limits[0] as &[Option<i64>],
        &limits[1] as &[Option<i64>],
        &limits[2] as &[Option<i64>],
        &limits[3] as &[Option<i64>],
        &committed[0],
        &committed[1],
        &committed[2],
        &committed[3],
        &held[0],
        &held[1],
        &held[2],
        &held[3],
        &aged[0],
        &aged[1],
        &aged[2],
        &aged[3],
        now,
    )
    .fetch_one(&mut **tx)
    .await?;
    Ok(inserted == n as i64)
}

/// The mutable columns of transactions, as parallel arrays for UNNEST.
struct TxColumns {
    ids: Vec<String>,
    amounts: Vec<i64>,
    states: Vec<i16>,
    committed_at: Vec<Option<Timestamp>>,
    reversed_at: Vec<Option<Timestamp>>,
    late: Vec<bool>,
}

impl TxColumns {
    fn with_capacity(n: usize) -> Self {
        Self {
            ids: Vec::with_capacity(n),
            amounts: Vec::with_capacity(n),
            states: Vec::with_capacity(n),
            committed_at: Vec::with_capacity(n),
            reversed_at: Vec::with_capacity(n),
            late: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, t: &Transaction) {
        self.ids.push(t.id.as_str().to_owned());
        self.amounts.push(t.amount);
        self.states.push(t.state.code());
        self.committed_at.push(t.committed_at);
        self.reversed_at.push(t.reversed_at);
        self.late.push(t.committed_late);
    }
}
