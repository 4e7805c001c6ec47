//! The application: turns validated requests into batches over the store, with the clock and the defaults.
//! It owns the transaction boundaries (one store batch per call of [`Allowance::execute`]).

use std::sync::Arc;

pub use batcher::BatchConfig;
use batcher::Batcher;

use crate::clock::Clock;
use crate::domain::{
    AccountKey, Amount, Committed, InvalidArgument, Limit, Rejection, Reserve, ReserveOutcome, Reversed,
    Transaction, TransactionId, Window, WindowUsage,
};
use crate::storage::{Access, Cursor, StorageError, Store};

mod batcher;
mod metrics;

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
    Reserve(Reserve),
    Commit {
        transaction_id: TransactionId,
        amount: Option<Amount>,
    },
    Reverse {
        transaction_id: TransactionId,
    },
    /// Sets (`Some`) or removes (`None`) the limit of one window.
    SetLimit {
        account: AccountKey,
        window: Window,
        limit: Option<Limit>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Reserved(ReserveOutcome),
    Committed(Committed),
    Reversed(Reversed),
    Limit(WindowUsage),
}

/// Most transactions returned by one listing page.
pub const MAX_PAGE_SIZE: u32 = 1000;
pub const DEFAULT_PAGE_SIZE: u32 = 100;

pub struct Allowance<S> {
    store: Arc<S>,
    clock: Arc<dyn Clock>,
    /// Group commit in front of [`Allowance::execute`]; `None` runs every call as its own batch.
    batcher: Option<Batcher>,
}

impl<S> Clone for Allowance<S> {
    fn clone(&self) -> Self {
        Self { store: self.store.clone(), clock: self.clock.clone(), batcher: self.batcher.clone() }
    }
}

impl<S: Store> Allowance<S> {
    /// Every call is its own batch (one database transaction).
    pub fn new(store: Arc<S>, clock: Arc<dyn Clock>) -> Self {
        Self { store, clock, batcher: None }
    }

    /// Coalesces concurrent reserves, commits, reverses and limit changes into shared batches. Must be called
    /// inside a Tokio runtime: it starts the workers.
    pub fn with_batching(mut self, config: BatchConfig) -> Self {
        let unbatched = Self { batcher: None, ..self.clone() };
        self.batcher = Some(Batcher::start(unbatched, config));
        self
    }

    pub fn store(&self) -> &S {
        &self.store
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
        for op in &operations {
            match op {
                Operation::Reserve(r) => {
                    accounts.push(r.account.clone());
                    ids.push(r.transaction_id.clone());
                }
                Operation::SetLimit { account, .. } => accounts.push(account.clone()),
                Operation::Commit { transaction_id, .. } | Operation::Reverse { transaction_id } => {
                    ids.push(transaction_id.clone())
                }
            }
        }
        let now = self.clock.now();
        let out = self
            .store
            .with_ledger(Access::Write, &accounts, &ids, now, |ledger| {
                operations
                    .iter()
                    .map(|op| match op.clone() {
                        Operation::Reserve(r) => ledger.reserve(r).map(Outcome::Reserved),
                        Operation::Commit { transaction_id, amount } => {
                            ledger.commit(&transaction_id, amount).map(Outcome::Committed)
                        }
                        Operation::Reverse { transaction_id } => {
                            ledger.reverse(&transaction_id).map(Outcome::Reversed)
                        }
                        Operation::SetLimit { account, window, limit } => {
                            Ok(Outcome::Limit(ledger.set_limit(&account, window, limit)))
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .inspect_err(metrics::storage_error)?;
        metrics::batch(&operations, &out.value, out.expired_holds);
        Ok(out.value)
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
    ) -> Result<Committed, Error> {
        match self.execute_one(Operation::Commit { transaction_id, amount }).await? {
            Outcome::Committed(c) => Ok(c),
            other => unreachable!("commit answered {other:?}"),
        }
    }

    pub async fn reverse(&self, transaction_id: TransactionId) -> Result<Reversed, Error> {
        match self.execute_one(Operation::Reverse { transaction_id }).await? {
            Outcome::Reversed(r) => Ok(r),
            other => unreachable!("reverse answered {other:?}"),
        }
    }

    pub async fn set_limit(
        &self,
        account: AccountKey,
        window: Window,
        limit: Option<Limit>,
    ) -> Result<WindowUsage, Error> {
        match self.execute_one(Operation::SetLimit { account, window, limit }).await? {
            Outcome::Limit(u) => Ok(u),
            other => unreachable!("set limit answered {other:?}"),
        }
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
            .with_ledger(Access::Write, &accounts, &[], now, |_| ())
            .await
            .inspect_err(metrics::storage_error)?;
        metrics::expired(out.expired_holds);
        Ok(out.expired_holds)
    }

    pub async fn open_holds(&self) -> Result<u64, Error> {
        Ok(self.store.open_holds(self.clock.now()).await.inspect_err(metrics::storage_error)?)
    }

    /// Usage of all four windows as of now; reads a snapshot and takes no locks.
    #[tracing::instrument(name = "app.get_limits", skip_all)]
    pub async fn get_limits(&self, account: AccountKey) -> Result<Vec<WindowUsage>, Error> {
        let now = self.clock.now();
        let out = self
            .store
            .with_ledger(Access::Read, std::slice::from_ref(&account), &[], now, |ledger| {
                ledger.account(&account).all_usage()
            })
            .await
            .inspect_err(metrics::storage_error)?;
        Ok(out.value)
    }

    #[tracing::instrument(name = "app.get_transaction", skip_all)]
    pub async fn get_transaction(&self, id: TransactionId) -> Result<Transaction, Error> {
        let now = self.clock.now();
        match self.store.get_transaction(&id).await.inspect_err(metrics::storage_error)? {
            Some(t) => Ok(t.as_of(now)),
            None => Err(Rejection::NotFound(id).into()),
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
        let page = self
            .store
            .list_transactions(&account, cursor.as_ref(), page_size)
            .await
            .inspect_err(metrics::storage_error)?;
        let next = (page.len() == page_size as usize).then(|| {
            let last = page.last().expect("a full page is not empty");
            Cursor { created_at: last.created_at, transaction_id: last.id.clone() }
        });
        Ok((page.into_iter().map(|t| t.as_of(now)).collect(), next))
    }
}
