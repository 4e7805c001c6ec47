//! Where state lives. [`postgres::PgStore`] owns every SQL statement; [`memory::MemoryStore`] keeps the same
//! contract in memory, so one test body can run against both.

use std::future::Future;

use chrono::TimeDelta;

use crate::domain::rate::RateBook;
use crate::domain::rules::Rule;
use crate::domain::{
    AccountKey, Actor, AuditEvent, AuditFilter, CallerId, CallerRecord, Counted, KeyId, Ledger, LimitName,
    Period, Plan, PlanName, Rejection, StaleHold, Timestamp, Transaction, TransactionId,
};

pub mod memory;
pub mod postgres;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// The database could not be reached or failed the statement; worth retrying.
    #[error("database unavailable")]
    Unavailable(#[source] std::sync::Arc<sqlx::Error>),
    /// Concurrent batches kept conflicting; worth retrying later.
    #[error("too much contention on the same keys")]
    Contended,
    /// A stored value does not fit the domain (a bug or a hand edit).
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    /// Writing an export of history failed (the directory, the disk).
    #[error("export failed: {0}")]
    Export(String),
    /// The database is reachable but not migrated to what this binary needs.
    #[error("{}", not_migrated(*.applied, *.needed))]
    NotMigrated { applied: Option<i64>, needed: i64 },
}

fn not_migrated(applied: Option<i64>, needed: i64) -> String {
    match applied {
        None => format!(
            "the database is not migrated (this binary needs migration {needed}): run allowance migrate"
        ),
        Some(v) => {
            format!("the database is migrated to {v}, this binary needs {needed}: run allowance migrate")
        }
    }
}

impl StorageError {
    /// The database refused a statement for what it contained (data out of range, a constraint): one
    /// operation of a batch may be the cause, so running them one by one finds it. Not so when the server or
    /// the connection is in trouble (shut down, restarting, out of resources): the batch as a whole failed.
    pub fn statement_refused(&self) -> bool {
        match self {
            StorageError::Unavailable(e) => {
                e.as_database_error().is_some_and(|d| refused_statement(d.code().as_deref()))
            }
            StorageError::Contended
            | StorageError::Corrupt(_)
            | StorageError::Export(_)
            | StorageError::NotMigrated { .. } => false,
        }
    }
}

/// Whether a SQLSTATE is about the statement rather than the server: classes 08 (connection exception),
/// 53 (insufficient resources), 57 (operator intervention: shutdown, cancel, restart), 58 (system error)
/// and XX (internal error) are the server's.
fn refused_statement(code: Option<&str>) -> bool {
    let class = code.map_or("", |c| c.get(..2).unwrap_or(c));
    !matches!(class, "08" | "53" | "57" | "58" | "XX")
}

/// Locks taken by [`Store::with_ledger`], and whether it recounts totals from history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Lock the accounts (creating missing ones) and write the changes back.
    Write,
    /// A consistent snapshot, no locks, nothing written: for reads of usage.
    Read,
    /// As `Read`, and every tracked period of every account is also summed from history
    /// ([`Loaded::recounted`](crate::domain::Loaded)): reconciliation's check, which blocks no one.
    Check,
    /// As `Write`, with the recount of `Check`: reconciliation's repair, under the accounts' row locks. It
    /// also loads the holds behind each account's expiry cursor, which the ledger releases
    /// ([`StaleHold`](crate::domain::StaleHold)).
    Repair,
}

impl Access {
    /// Takes the accounts' row locks and writes the batch's changes back.
    pub fn writes(self) -> bool {
        matches!(self, Access::Write | Access::Repair)
    }

    /// Sums every tracked period from history besides refreshing the running totals.
    pub fn recounts(self) -> bool {
        matches!(self, Access::Check | Access::Repair)
    }
}

/// Names of jobs that run on one replica at a time ([`Store::exclusively`]).
pub const RECONCILE_JOB: &str = "reconcile";
/// Creating partitions ahead and dropping old ones ([`crate::app::Retention`]).
pub const HISTORY_JOB: &str = "history";

/// One partition of the transaction history (a range of `created_at`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPartition {
    pub name: String,
    /// Inclusive; `None`: from the beginning of time (or the default partition).
    pub from: Option<Timestamp>,
    /// Exclusive; `None`: the default partition, which takes every row outside the others.
    pub to: Option<Timestamp>,
    pub is_default: bool,
    /// Detached from the history by a retention run that did not finish (export or drop pending): the next
    /// run finishes it.
    pub detached: bool,
    /// The planner's estimate (-1 before the first ANALYZE).
    pub rows_estimate: i64,
}

/// What [`Store::drop_history_partition`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionDrop {
    /// Gone, with how many rows it held and the CSV file they were exported to.
    Dropped {
        rows: u64,
        exported: Option<std::path::PathBuf>,
    },
    /// Kept: it still holds open holds.
    OpenHolds(u64),
    /// Kept: the default partition is never dropped.
    Default,
    NotFound,
}

/// What one run of a batch returned, with what the refresh found along the way.
#[derive(Debug)]
pub struct BatchOutput<R> {
    pub value: R,
    pub expired_holds: u64,
    /// The instant the batch decided at: the clock, raised to its accounts' last write (`Ledger::open`).
    pub now: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    pub max: u32,
    pub open: u32,
    pub idle: u32,
    /// Tasks waiting for a connection.
    pub waiting: u64,
}

/// Position in a listing, newest first: the last transaction of the previous page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: Timestamp,
    pub transaction_id: TransactionId,
}

pub trait Store: Send + Sync + 'static {
    /// Loads `accounts`, the named `transactions` and the accounts that own them (with [`Access::Write`]:
    /// under the accounts' row locks, taken in key order; missing accounts are created), opens a [`Ledger`] at
    /// `now`, runs `apply` and, for writes, stores its changes and commits. A named transaction that does not
    /// exist is simply absent from the ledger. `apply` runs again from scratch if the batch had to be retried (a transaction id taken
    /// concurrently by another account, a deadlock); only the last run's result is returned.
    ///
    /// `also` names periods whose totals the batch needs besides those of the accounts' limits (a limit about
    /// to be set, a round-1 window to report): missing totals are summed from history once.
    fn with_ledger<R, F>(
        &self,
        access: Access,
        accounts: &[AccountKey],
        transactions: &[TransactionId],
        also: &[(AccountKey, Period)],
        now: Timestamp,
        apply: F,
    ) -> impl Future<Output = Result<BatchOutput<R>, StorageError>> + Send
    where
        R: Send,
        F: FnMut(&mut Ledger) -> R + Send;

    /// A transaction, and the instant a reader should see it at: `now`, or the database's clock where it
    /// decides (as batches do), so that every replica shows a hold expired at the same instant.
    fn get_transaction(
        &self,
        id: &TransactionId,
        now: Timestamp,
    ) -> impl Future<Output = Result<Option<(Transaction, Timestamp)>, StorageError>> + Send;

    /// Transactions of one account, newest first, after `cursor`, and the instant to see them at (as for
    /// [`Store::get_transaction`]).
    fn list_transactions(
        &self,
        account: &AccountKey,
        cursor: Option<&Cursor>,
        limit: u32,
        now: Timestamp,
    ) -> impl Future<Output = Result<(Vec<Transaction>, Timestamp), StorageError>> + Send;

    /// Accounts with holds past their expiry that no refresh has released yet, at most `limit`.
    fn accounts_with_expired_holds(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<AccountKey>, StorageError>> + Send;

    /// Holds neither committed, reversed nor released; a hold past its expiry counts until a batch of its
    /// key (or the sweeper) releases it.
    fn open_holds(&self) -> impl Future<Output = Result<u64, StorageError>> + Send;

    /// The open holds behind the expiry cursors of `accounts`, and the accounts whose hold bookkeeping differs
    /// from their rows (reconciliation; reads only, one statement over every row of each account).
    fn check_holds(
        &self,
        accounts: &[AccountKey],
    ) -> impl Future<Output = Result<HoldCheck, StorageError>> + Send;

    /// Sets the hold bookkeeping of the accounts among `accounts` that differ to what their rows say, under
    /// the accounts' row locks, recording a `totals.repair` audit event per account (by `by`, at `now`).
    /// Returns what it found.
    fn repair_hold_bookkeeping(
        &self,
        accounts: &[AccountKey],
        by: &Actor,
        now: Timestamp,
    ) -> impl Future<Output = Result<Vec<HoldBookkeeping>, StorageError>> + Send;

    /// What still counts in `period` of `account` at `now` among transactions created at or after `from`: its
    /// open holds, and for rolling periods its committed spend oldest first, at most `max_committed` rows.
    fn counted(
        &self,
        account: &AccountKey,
        period: &Period,
        from: Timestamp,
        now: Timestamp,
        max_committed: u32,
    ) -> impl Future<Output = Result<Counted, StorageError>> + Send;

    /// Creates or replaces a plan and its limits; keys on it see the new limits from their next call. Writes
    /// `audit`, with the plan before and after, in the same transaction.
    fn put_plan(
        &self,
        plan: &Plan,
        audit: AuditEvent,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    fn get_plan(
        &self,
        name: &PlanName,
    ) -> impl Future<Output = Result<Option<PlanInfo>, StorageError>> + Send;

    fn list_plans(&self) -> impl Future<Output = Result<Vec<PlanInfo>, StorageError>> + Send;

    /// Deletes a plan that no key is on, writing `audit` (with the plan deleted) when it does.
    fn delete_plan(
        &self,
        name: &PlanName,
        audit: AuditEvent,
    ) -> impl Future<Output = Result<PlanDeletion, StorageError>> + Send;

    /// Puts a key on a plan (`None`: on none), writing `audit` with the plans before and after. Returns false
    /// (and writes nothing) when the plan does not exist.
    fn assign_plan(
        &self,
        key: &KeyId,
        plan: Option<&PlanName>,
        audit: AuditEvent,
    ) -> impl Future<Output = Result<bool, StorageError>> + Send;

    /// Stores a new caller and its audit event.
    fn create_caller(
        &self,
        record: &CallerRecord,
        audit: AuditEvent,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Changes a caller under its row lock: `apply` gets it as stored and returns the new record with its
    /// audit event, `None` for no change, or a rejection. `Ok(None)`: no caller has this id.
    fn update_caller<F>(
        &self,
        id: CallerId,
        apply: F,
    ) -> impl Future<Output = Result<Option<Result<CallerRecord, Rejection>>, StorageError>> + Send
    where
        F: FnOnce(&CallerRecord) -> Result<Option<(CallerRecord, AuditEvent)>, Rejection> + Send;

    /// Every caller, revoked ones included, oldest first: what authentication caches.
    fn callers(&self) -> impl Future<Output = Result<Vec<CallerRecord>, StorageError>> + Send;

    /// Audit events matching `filter`, newest first, at most `limit`.
    fn audit_events(
        &self,
        filter: &AuditFilter,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<AuditEvent>, StorageError>> + Send;

    /// Loads the rate limits and locked rate states of `accounts` into a [`RateBook`] at `now` (`None`: the
    /// database's clock, read in the same statement), runs `apply` and writes the states it changed. `apply`
    /// runs again from scratch if the batch had to be retried.
    fn with_rates<R, F>(
        &self,
        accounts: &[AccountKey],
        now: Option<Timestamp>,
        apply: F,
    ) -> impl Future<Output = Result<R, StorageError>> + Send
    where
        R: Send,
        F: FnMut(&mut RateBook) -> R + Send;

    /// Every rate-limit rule.
    fn rate_rules(&self) -> impl Future<Output = Result<Vec<Rule>, StorageError>> + Send;

    /// Creates or replaces a rule by name, writing `audit` with the rule before and after.
    fn put_rate_rule(
        &self,
        rule: &Rule,
        audit: AuditEvent,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Deletes a rule; false when there was none of that name (and nothing is written).
    fn delete_rate_rule(
        &self,
        name: &LimitName,
        audit: AuditEvent,
    ) -> impl Future<Output = Result<bool, StorageError>> + Send;
    /// Accounts in key order after `after` (from the first when `None`), at most `limit`: for walking every
    /// account in pages.
    fn account_keys(
        &self,
        after: Option<&AccountKey>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<AccountKey>, StorageError>> + Send;

    /// Runs `job` unless a job of the same name runs elsewhere (another replica, or here): `Ok(None)` then.
    /// Postgres holds a session advisory lock on a connection of its own for the run, so the lock goes with
    /// the connection if the process dies.
    fn exclusively<J>(
        &self,
        name: &'static str,
        job: J,
    ) -> impl Future<Output = Result<Option<J::Output>, StorageError>> + Send
    where
        J: Future + Send,
        J::Output: Send;

    /// The partitions of the transaction history, oldest first (the default one last), with any left
    /// detached by an unfinished retention run.
    fn history_partitions(&self) -> impl Future<Output = Result<Vec<HistoryPartition>, StorageError>> + Send;

    /// Creates the monthly (UTC) partitions that `[from, to)` needs and no partition covers yet, moving any
    /// rows of their ranges out of the default partition. Returns the names created.
    fn create_history_partitions(
        &self,
        from: Timestamp,
        to: Timestamp,
    ) -> impl Future<Output = Result<Vec<String>, StorageError>> + Send;

    /// Detaches the partition `name` (unless it holds open holds, or is the default), writes its rows as CSV
    /// to `<export_dir>/<name>.csv` when given (through `<name>.csv.partial`, synced, then renamed), and drops
    /// it. A partition left detached by an earlier run is exported and dropped the same way.
    fn drop_history_partition(
        &self,
        name: &str,
        export_dir: Option<&std::path::Path>,
    ) -> impl Future<Output = Result<PartitionDrop, StorageError>> + Send;

    /// The longest span of any spending limit (a key's own or a plan's; rate limits keep no history).
    fn longest_spending_period(&self)
    -> impl Future<Output = Result<Option<TimeDelta>, StorageError>> + Send;

    /// Accounts with running totals that no batch has written since `before`, in key order after `after`, at
    /// most `limit`: those a refresh must age before history they may still subtract is dropped.
    fn accounts_written_before(
        &self,
        before: Timestamp,
        after: Option<&AccountKey>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<AccountKey>, StorageError>> + Send;

    /// Deletes audit events older than `before`, a batch at a time; returns how many.
    fn delete_audit_events_before(
        &self,
        before: Timestamp,
    ) -> impl Future<Output = Result<u64, StorageError>> + Send;

    /// Connection pool figures, where there is a pool.
    fn pool_stats(&self) -> Option<PoolStats> {
        None
    }

    /// Ready to serve: reachable and fully migrated.
    fn ready(&self) -> impl Future<Output = Result<(), StorageError>> + Send;
}

/// An account whose hold bookkeeping differs from its rows (found by reconciliation): the count of its open
/// holds (those whose first key it is), or the latest expiry the sweeper looks for, which must cover every
/// open hold expiring after the account's cursor (its last write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldBookkeeping {
    pub account: AccountKey,
    /// `open_holds` as counted on the account.
    pub open_holds: i32,
    /// Its open holds in the rows.
    pub open_hold_rows: i32,
    /// `holds_until` as kept on the account (`None`: no hold since it was last retired).
    pub holds_until: Option<Timestamp>,
    /// The latest expiry among its open holds that expire after its cursor.
    pub latest_expiry_after_cursor: Option<Timestamp>,
    /// The account's last write.
    pub cursor: Timestamp,
}

impl HoldBookkeeping {
    /// `holds_until` raised to cover every open hold after the cursor.
    pub fn repaired_holds_until(&self) -> Option<Timestamp> {
        self.holds_until.max(self.latest_expiry_after_cursor)
    }
}

/// What [`Store::check_holds`] found wrong with some accounts' holds, in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HoldCheck {
    /// Open holds behind their account's expiry cursor.
    pub stale: Vec<StaleHold>,
    /// Accounts whose count of open holds or latest hold expiry differs from their rows.
    pub bookkeeping: Vec<HoldBookkeeping>,
}

/// A plan as stored, with how many keys are on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanInfo {
    pub plan: Plan,
    pub keys: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanDeletion {
    Deleted,
    NotFound,
    /// Keys are still on it: move them first.
    InUse(u64),
}

/// Keys sorted and deduplicated: every batch locks accounts in the same order.
pub(crate) fn sorted_unique<T: Ord + Clone>(items: &[T]) -> Vec<T> {
    let mut v = items.to_vec();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_server_going_away_is_not_a_statement_refused() {
        for server in ["57P01", "57P02", "57P03", "57014", "08006", "08003", "53300", "58000", "XX000"] {
            assert!(!super::refused_statement(Some(server)), "{server}");
        }
        for statement in ["22003", "23505", "42601", "22P02", "0A000"] {
            assert!(super::refused_statement(Some(statement)), "{statement}");
        }
    }
}
