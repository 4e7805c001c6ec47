//! The application: turns validated requests into batches over the store, with the clock and the defaults.
//! It owns the transaction boundaries (one store batch per call of [`Allowance::execute`]).

use std::sync::Arc;

pub use batcher::BatchConfig;
use batcher::Batcher;

use crate::clock::Clock;
use crate::domain::{
    AccountKey, Actor, Amount, AuditAction, AuditEvent, Committed, Counted, InvalidArgument, KeyId, Ledger,
    Limit, LimitName, LimitSpec, LimitUsage, Period, Plan, PlanName, Rejection, Reserve, ReserveOutcome,
    Reversed, Transaction, TransactionId, TxState, Window, WindowUsage, retry_after,
};
use crate::storage::{Access, Cursor, PlanDeletion, PlanInfo, StorageError, Store};

mod batcher;
mod callers;
mod metrics;
mod rates;

pub use rates::{RateBatchConfig, RuleCache, count_decision};
mod reconcile;
mod retention;

pub use callers::{CallerCache, DEFAULT_AUDIT_PAGE, IssuedCredential, MAX_AUDIT_PAGE};
pub use reconcile::Reconciliation;
pub use retention::{Dropped, RETENTION_MARGIN, RetentionReport, RetentionSettings, format_retention};

pub use metrics::describe as describe_metrics;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidArgument(#[from] InvalidArgument),
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The service is stopping and takes no new operations.
    #[error("shutting down")]
    ShuttingDown,
    /// A bug: the operation's batch failed unexpectedly (it was logged).
    #[error("internal error")]
    Internal,
}

/// One operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// The caller's key prefixes are checked at the edge, where the keys are named.
    Reserve(Reserve),
    /// A transaction outside `by`'s key prefixes is NOT_FOUND, as if it did not exist.
    Commit { transaction_id: TransactionId, amount: Option<Amount>, by: Actor },
    /// As commit; audited.
    Reverse { transaction_id: TransactionId, by: Actor },
    /// Round 1: sets (`Some`) or removes (`None`) the rolling limit named after a window. Audited.
    SetLimit { account: AccountKey, window: Window, limit: Option<Limit>, by: Actor },
    /// Sets a key's own limit, replacing one of the same name. Audited.
    PutLimit { account: AccountKey, spec: LimitSpec, by: Actor },
    /// Removes a key's own limit. Audited.
    RemoveLimit { account: AccountKey, name: LimitName, by: Actor },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Reserved(ReserveOutcome),
    Committed(Committed),
    Reversed(Reversed),
    /// A round-1 window after [`Operation::SetLimit`].
    Limit(WindowUsage),
    /// The limit's usage after [`Operation::PutLimit`]; `None` when it sets no amount (unlimited).
    LimitPut(Option<LimitUsage>),
    /// Whether [`Operation::RemoveLimit`] found a limit to remove.
    LimitRemoved(bool),
}

/// Usage of one account: every effective limit, the round-1 windows and the key's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountUsage {
    pub limits: Vec<LimitUsage>,
    pub windows: Vec<WindowUsage>,
    pub plan: Option<PlanName>,
    /// The key's own limits as set, including explicit "unlimited" overrides.
    pub own: Vec<LimitSpec>,
}

/// Most committed transactions read to work out one `retry_after`; past that the answer is the period's
/// horizon (a safe upper bound).
const RETRY_SCAN_ROWS: u32 = 1000;

/// Most transactions returned by one listing page.
pub const MAX_PAGE_SIZE: u32 = 1000;
pub const DEFAULT_PAGE_SIZE: u32 = 100;

pub struct Allowance<S> {
    store: Arc<S>,
    clock: Arc<dyn Clock>,
    /// Group commit in front of [`Allowance::execute`]; `None` runs every call as its own batch.
    batcher: Option<Batcher>,
    callers: Arc<CallerCache>,
    /// Group commit of rate checks; `None` runs every check as its own batch.
    rate_batcher: Option<rates::RateBatcher>,
    rules: Arc<RuleCache>,
    /// What the periodic history job does (partitions ahead, retention, audit retention).
    history: Arc<RetentionSettings>,
}

impl<S> Clone for Allowance<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            clock: self.clock.clone(),
            batcher: self.batcher.clone(),
            callers: self.callers.clone(),
            rate_batcher: self.rate_batcher.clone(),
            rules: self.rules.clone(),
            history: self.history.clone(),
        }
    }
}

/// How long a copy of the callers table may go without a successful refresh before authentication refuses.
pub const DEFAULT_CALLERS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(30);

impl<S: Store> Allowance<S> {
    /// Every call is its own batch (one database transaction).
    pub fn new(store: Arc<S>, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            clock,
            batcher: None,
            callers: Arc::new(CallerCache::new(DEFAULT_CALLERS_MAX_AGE)),
            rate_batcher: None,
            rules: Arc::default(),
            history: Arc::default(),
        }
    }

    /// Settings of the periodic history job ([`Allowance::retention`]).
    pub fn with_history(mut self, settings: RetentionSettings) -> Self {
        self.history = Arc::new(settings);
        self
    }

    pub fn history_settings(&self) -> &RetentionSettings {
        &self.history
    }

    /// Authentication refuses once its copy of the callers is older than `max_age` (no refresh succeeded).
    pub fn with_callers_max_age(mut self, max_age: std::time::Duration) -> Self {
        self.callers = Arc::new(CallerCache::new(max_age));
        self
    }

    /// Coalesces concurrent reserves, commits, reverses and limit changes into shared batches. Must be called
    /// inside a Tokio runtime: it starts the workers.
    pub fn with_batching(mut self, config: BatchConfig) -> Self {
        let unbatched = Self { batcher: None, ..self.clone() };
        self.batcher = Some(Batcher::start(unbatched, config));
        self.with_rate_batching(RateBatchConfig::default())
    }

    /// Coalesces concurrent rate checks into shared batches (see `rates.rs`). Inside a Tokio runtime.
    pub fn with_rate_batching(mut self, config: RateBatchConfig) -> Self {
        let unbatched = Self { rate_batcher: None, ..self.clone() };
        self.rate_batcher = Some(rates::RateBatcher::start(unbatched, config));
        self
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// The service's clock reading, for validating request values against the current time.
    pub fn now(&self) -> crate::domain::Timestamp {
        self.clock.now()
    }

    /// Runs a batch atomically, in order: each operation sees the effects of those before it, and each gets its
    /// own result — one rejected operation does not fail the others. A storage failure fails them all.
    #[tracing::instrument(name = "app.execute", skip_all, fields(operations = operations.len()))]
    pub async fn execute(
        &self,
        operations: Vec<Operation>,
    ) -> Result<Vec<Result<Outcome, Rejection>>, Error> {
        let mut accounts = Vec::new();
        let mut ids = Vec::new();
        let mut also = Vec::new();
        for op in &operations {
            match op {
                Operation::Reserve(r) => {
                    accounts.extend(r.accounts.iter().cloned());
                    ids.push(r.transaction_id.clone());
                }
                Operation::SetLimit { account, window, .. } => {
                    accounts.push(account.clone());
                    also.push((account.clone(), Period::Rolling(window.length())));
                }
                Operation::PutLimit { account, spec, .. } => {
                    accounts.push(account.clone());
                    // A rate limit keeps no spending totals.
                    if !spec.is_rate() {
                        also.push((account.clone(), spec.period));
                    }
                }
                Operation::RemoveLimit { account, .. } => accounts.push(account.clone()),
                Operation::Commit { transaction_id, .. } | Operation::Reverse { transaction_id, .. } => {
                    ids.push(transaction_id.clone())
                }
            }
        }
        let now = self.clock.now();
        let out = self
            .store
            .with_ledger(Access::Write, &accounts, &ids, &also, now, |ledger| {
                operations
                    .iter()
                    .map(|op| match op.clone() {
                        Operation::Reserve(r) => ledger.reserve(r).map(Outcome::Reserved),
                        Operation::Commit { transaction_id, amount, by } => {
                            visible(ledger, &transaction_id, &by)?;
                            ledger.commit(&transaction_id, amount).map(Outcome::Committed)
                        }
                        Operation::Reverse { transaction_id, by } => {
                            visible(ledger, &transaction_id, &by)?;
                            let reversed = ledger.reverse(&transaction_id)?;
                            let t = &reversed.transaction;
                            let state = |state: TxState| {
                                serde_json::json!({ "state": state.as_str(), "amount": t.amount })
                            };
                            // One event per key charged, so that every key's trail shows the refund or release
                            // of its totals; none for a repeated reverse, which changed nothing.
                            if reversed.from != TxState::Reversed {
                                for account in &t.accounts {
                                    let event = AuditEvent::new(
                                        &by,
                                        ledger.now(),
                                        AuditAction::TransactionReverse,
                                        t.id.as_str(),
                                    )
                                    .on(&account.key_id, Some(&account.unit))
                                    .change(Some(state(reversed.from)), Some(state(t.state)));
                                    ledger.record(event);
                                }
                            }
                            Ok(Outcome::Reversed(reversed))
                        }
                        Operation::SetLimit { account, window, limit, by } => {
                            let spec = LimitSpec::of_window(window, limit.map(Limit::get));
                            let name = spec.name.clone();
                            let before = own_limit(ledger, &account, &name);
                            match limit {
                                Some(_) => ledger.put_limit(&account, spec)?,
                                None => {
                                    ledger.remove_limit(&account, &name);
                                    None
                                }
                            };
                            audit_limit(ledger, &by, &account, &name, before);
                            Ok(Outcome::Limit(ledger.account(&account).window_usage(window)))
                        }
                        Operation::PutLimit { account, spec, by } => {
                            let name = spec.name.clone();
                            let before = own_limit(ledger, &account, &name);
                            let usage = ledger.put_limit(&account, spec)?;
                            audit_limit(ledger, &by, &account, &name, before);
                            Ok(Outcome::LimitPut(usage))
                        }
                        Operation::RemoveLimit { account, name, by } => {
                            let before = own_limit(ledger, &account, &name);
                            let removed = ledger.remove_limit(&account, &name);
                            audit_limit(ledger, &by, &account, &name, before);
                            Ok(Outcome::LimitRemoved(removed))
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .inspect_err(metrics::storage_error)?;
        metrics::batch(&operations, &out.value, out.expired_holds);
        // Worked out at the instant the batch decided at, which may be later than this replica's clock.
        let now = out.now;
        let mut results = out.value;
        for (op, result) in operations.iter().zip(&mut results) {
            if let (Operation::Reserve(r), Ok(Outcome::Reserved(ReserveOutcome::Denied { exceeded, .. }))) =
                (op, result)
            {
                for e in exceeded {
                    // Best effort: the batch has committed, so a failed look-up must not fail its
                    // operations; the denial then goes out without a retry_after.
                    e.retry_after = match self.retry_after(&e.usage, r.amount.get(), now).await {
                        Ok(retry) => Some(retry),
                        Err(error) => {
                            tracing::warn!(%error, "could not work out retry_after for a denial");
                            None
                        }
                    };
                }
            }
        }
        Ok(results)
    }

    /// When a denied reservation of `amount` would first fit under one limit if nothing else happened. Reads
    /// what still counts in the period (after the batch, so a retry of the same batch sees the same).
    async fn retry_after(
        &self,
        usage: &LimitUsage,
        amount: i64,
        now: crate::domain::Timestamp,
    ) -> Result<crate::domain::RetryAfter, Error> {
        let limit = usage.limit.unwrap_or(i64::MAX);
        if i128::from(amount) > i128::from(limit) {
            return Ok(crate::domain::RetryAfter::Never);
        }
        let from = usage.period.counts_from(now);
        let counted: Counted = self
            .store
            .counted(&usage.account, &usage.period, from, now, RETRY_SCAN_ROWS)
            .await
            .inspect_err(metrics::storage_error)?;
        Ok(retry_after(&usage.period, usage.spent + usage.held, limit, amount, now, &counted))
    }

    async fn execute_one(&self, operation: Operation) -> Result<Outcome, Error> {
        if let Some(batcher) = &self.batcher {
            return Ok(batcher.submit(operation).await??);
        }
        let mut results = self.execute(vec![operation]).await?;
        Ok(results.pop().expect("one result per operation")?)
    }

    pub async fn reserve(&self, request: Reserve) -> Result<ReserveOutcome, Error> {
        match self.execute_one(Operation::Reserve(request)).await? {
            Outcome::Reserved(r) => Ok(r),
            other => unreachable!("reserve answered {other:?}"),
        }
    }

    pub async fn commit(
        &self,
        transaction_id: TransactionId,
        amount: Option<Amount>,
        by: Actor,
    ) -> Result<Committed, Error> {
        match self.execute_one(Operation::Commit { transaction_id, amount, by }).await? {
            Outcome::Committed(c) => Ok(c),
            other => unreachable!("commit answered {other:?}"),
        }
    }

    pub async fn reverse(&self, transaction_id: TransactionId, by: Actor) -> Result<Reversed, Error> {
        match self.execute_one(Operation::Reverse { transaction_id, by }).await? {
            Outcome::Reversed(r) => Ok(r),
            other => unreachable!("reverse answered {other:?}"),
        }
    }

    pub async fn set_limit(
        &self,
        account: AccountKey,
        window: Window,
        limit: Option<Limit>,
        by: Actor,
    ) -> Result<WindowUsage, Error> {
        match self.execute_one(Operation::SetLimit { account, window, limit, by }).await? {
            Outcome::Limit(u) => Ok(u),
            other => unreachable!("set limit answered {other:?}"),
        }
    }

    /// Sets a key's own limit. Returns its usage, `None` for an explicit "unlimited".
    pub async fn put_limit(
        &self,
        account: AccountKey,
        spec: LimitSpec,
        by: Actor,
    ) -> Result<Option<LimitUsage>, Error> {
        match self.execute_one(Operation::PutLimit { account, spec, by }).await? {
            Outcome::LimitPut(u) => Ok(u),
            other => unreachable!("put limit answered {other:?}"),
        }
    }

    /// Removes a key's own limit; `NOT_FOUND`-worthy when it had none of that name.
    pub async fn remove_limit(&self, account: AccountKey, name: LimitName, by: Actor) -> Result<bool, Error> {
        match self.execute_one(Operation::RemoveLimit { account, name, by }).await? {
            Outcome::LimitRemoved(found) => Ok(found),
            other => unreachable!("remove limit answered {other:?}"),
        }
    }

    pub async fn put_plan(&self, plan: Plan, by: &Actor) -> Result<PlanInfo, Error> {
        let audit = AuditEvent::new(by, self.clock.now(), AuditAction::PlanPut, plan.name.as_str());
        self.store.put_plan(&plan, audit).await.inspect_err(metrics::storage_error)?;
        self.get_plan(plan.name).await
    }

    pub async fn get_plan(&self, name: PlanName) -> Result<PlanInfo, Error> {
        match self.store.get_plan(&name).await.inspect_err(metrics::storage_error)? {
            Some(p) => Ok(p),
            None => Err(Rejection::PlanNotFound(name).into()),
        }
    }

    pub async fn list_plans(&self) -> Result<Vec<PlanInfo>, Error> {
        Ok(self.store.list_plans().await.inspect_err(metrics::storage_error)?)
    }

    pub async fn delete_plan(&self, name: PlanName, by: &Actor) -> Result<(), Error> {
        let audit = AuditEvent::new(by, self.clock.now(), AuditAction::PlanDelete, name.as_str());
        match self.store.delete_plan(&name, audit).await.inspect_err(metrics::storage_error)? {
            PlanDeletion::Deleted => Ok(()),
            PlanDeletion::NotFound => Err(Rejection::PlanNotFound(name).into()),
            PlanDeletion::InUse(keys) => Err(Rejection::FailedPrecondition(format!(
                "plan {name} still has {keys} key(s) on it; move them to another plan first"
            ))
            .into()),
        }
    }

    /// Puts a key on a plan, or on none.
    pub async fn assign_plan(&self, key: KeyId, plan: Option<PlanName>, by: &Actor) -> Result<(), Error> {
        let audit =
            AuditEvent::new(by, self.clock.now(), AuditAction::PlanAssign, key.as_str()).on(&key, None);
        if self.store.assign_plan(&key, plan.as_ref(), audit).await.inspect_err(metrics::storage_error)? {
            return Ok(());
        }
        let name = plan.map(|p| p.to_string()).unwrap_or_default();
        Err(InvalidArgument::new("plan", format!("no plan is named {name:?}")).into())
    }

    /// Releases holds that expired on accounts no call has touched since, so that their state and the
    /// expiry count do not wait for the next call. Returns how many were released.
    #[tracing::instrument(name = "app.sweep_expired", skip_all)]
    pub async fn sweep_expired(&self, max_accounts: u32) -> Result<u64, Error> {
        let now = self.clock.now();
        let accounts = self
            .store
            .accounts_with_expired_holds(now, max_accounts)
            .await
            .inspect_err(metrics::storage_error)?;
        if accounts.is_empty() {
            return Ok(0);
        }
        let out = self
            .store
            .with_ledger(Access::Write, &accounts, &[], &[], now, |_| ())
            .await
            .inspect_err(metrics::storage_error)?;
        metrics::expired(out.expired_holds);
        Ok(out.expired_holds)
    }

    pub async fn open_holds(&self) -> Result<u64, Error> {
        Ok(self.store.open_holds().await.inspect_err(metrics::storage_error)?)
    }

    /// Usage of every limit of an account and of the four round-1 windows as of now; reads a snapshot and
    /// takes no locks.
    #[tracing::instrument(name = "app.get_limits", skip_all)]
    pub async fn get_limits(&self, account: AccountKey) -> Result<AccountUsage, Error> {
        let now = self.clock.now();
        let also: Vec<(AccountKey, Period)> =
            Window::ALL.iter().map(|w| (account.clone(), Period::Rolling(w.length()))).collect();
        let out = self
            .store
            .with_ledger(Access::Read, std::slice::from_ref(&account), &[], &also, now, |ledger| {
                let a = ledger.account(&account);
                AccountUsage {
                    // The instant the snapshot was read at (the database's clock, or raised to the
                    // account's last write), not this replica's reading.
                    limits: a.limit_usage(ledger.now()),
                    windows: a.all_windows(),
                    plan: a.plan.clone(),
                    own: a.limits.values().cloned().collect(),
                }
            })
            .await
            .inspect_err(metrics::storage_error)?;
        Ok(out.value)
    }

    /// A transaction outside `by`'s key prefixes is NOT_FOUND, as if it did not exist.
    #[tracing::instrument(name = "app.get_transaction", skip_all)]
    pub async fn get_transaction(&self, id: TransactionId, by: &Actor) -> Result<Transaction, Error> {
        let now = self.clock.now();
        match self.store.get_transaction(&id, now).await.inspect_err(metrics::storage_error)? {
            Some((t, at)) if t.accounts.iter().all(|a| by.may_touch(&a.key_id)) => Ok(t.as_of(at)),
            _ => Err(Rejection::NotFound(id).into()),
        }
    }

    /// One page of an account's transactions, newest first, and the cursor of the next page if there may be one.
    #[tracing::instrument(name = "app.list_transactions", skip_all)]
    pub async fn list_transactions(
        &self,
        account: AccountKey,
        cursor: Option<Cursor>,
        page_size: u32,
    ) -> Result<(Vec<Transaction>, Option<Cursor>), Error> {
        let page_size = page_size.clamp(1, MAX_PAGE_SIZE);
        let now = self.clock.now();
        let (page, at) = self
            .store
            .list_transactions(&account, cursor.as_ref(), page_size, now)
            .await
            .inspect_err(metrics::storage_error)?;
        let next = (page.len() == page_size as usize).then(|| {
            let last = page.last().expect("a full page is not empty");
            Cursor { created_at: last.created_at, transaction_id: last.id.clone() }
        });
        Ok((page.into_iter().map(|t| t.as_of(at)).collect(), next))
    }
}

/// A transaction the actor may not touch is answered as if it did not exist: a tenant must not learn that
/// another tenant's transaction id is taken.
fn visible(ledger: &Ledger, id: &TransactionId, by: &Actor) -> Result<(), Rejection> {
    match ledger.find(id) {
        Some(t) if !t.accounts.iter().all(|a| by.may_touch(&a.key_id)) => {
            Err(Rejection::NotFound(id.clone()))
        }
        _ => Ok(()),
    }
}

fn own_limit(ledger: &Ledger, account: &AccountKey, name: &LimitName) -> Option<serde_json::Value> {
    ledger.account(account).limits.get(name).map(LimitSpec::audit_json)
}

/// Records a change of an account's own limit, if there was one.
fn audit_limit(
    ledger: &mut Ledger,
    by: &Actor,
    account: &AccountKey,
    name: &LimitName,
    before: Option<serde_json::Value>,
) {
    let after = own_limit(ledger, account, name);
    if before == after {
        return;
    }
    let action = if after.is_some() { AuditAction::LimitPut } else { AuditAction::LimitDelete };
    let event = AuditEvent::new(by, ledger.now(), action, name.as_str())
        .on(&account.key_id, Some(&account.unit))
        .change(before, after);
    ledger.record(event);
}
