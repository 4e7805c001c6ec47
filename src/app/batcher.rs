//! Group commit: operations from concurrent callers are coalesced into one database transaction.
//!
//! Operations are sharded by account over a few workers, each with its own queue. A worker takes the first
//! waiting operation, then everything else already queued for it (up to `max_batch`), and runs them as one
//! batch. An idle server therefore never waits for a batch to fill — a lone request goes out at once — while
//! under load, requests queue behind a busy worker and batches grow by themselves. Operations keep their
//! arrival order within a shard.
//!
//! Sharding by account matters: two batches of one replica never lock the same account, so they never wait
//! on each other's row locks (with one shared queue, concurrent batches of dozens of keys collided often and
//! ran one after the other). A commit or reverse names only a transaction; the worker of its account is
//! found from the transactions this replica has seen, else from a hash of the id (still correct, as the
//! database locks decide; only possibly slower).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::{Allowance, Error, Operation, Outcome};
use crate::domain::{AccountKey, Rejection, ReserveOutcome, TransactionId};
use crate::storage::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Batches that may run at once, each on its own connection and its own share of the accounts.
    pub workers: usize,
    /// Most operations in one batch.
    pub max_batch: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { workers: 2, max_batch: 128 }
    }
}

/// Transactions remembered per generation of the owner cache; two generations are kept.
const OWNERS_PER_GENERATION: usize = 32 * 1024;

type Reply = Result<Result<Outcome, Rejection>, Error>;

struct Job {
    operation: Operation,
    reply: oneshot::Sender<Reply>,
}

/// The queues in front of the workers. Dropping every handle lets the workers finish what is queued and stop.
#[derive(Clone)]
pub(super) struct Batcher {
    shards: Arc<[mpsc::Sender<Job>]>,
    owners: Arc<Mutex<Owners>>,
    hasher: RandomState,
}

impl Batcher {
    pub(super) fn start<S: Store>(app: Allowance<S>, config: BatchConfig) -> Self {
        let max_batch = config.max_batch.max(1);
        let shards = (0..config.workers.max(1))
            .map(|_| {
                // Bounded: under overload, callers wait here rather than memory growing without end.
                let (queue, jobs) = mpsc::channel(max_batch * 8);
                tokio::spawn(work(app.clone(), jobs, max_batch));
                queue
            })
            .collect();
        Self { shards, owners: Arc::default(), hasher: RandomState::new() }
    }

    pub(super) async fn submit(&self, operation: Operation) -> Reply {
        let shard = self.shard_of(&operation);
        // Only a reservation teaches the cache a transaction's owner.
        let owner = match &operation {
            Operation::Reserve(r) => Some((r.transaction_id.clone(), r.accounts[0].clone())),
            _ => None,
        };
        let (reply, answer) = oneshot::channel();
        if self.shards[shard].send(Job { operation, reply }).await.is_err() {
            return Err(Error::ShuttingDown);
        }
        // Workers answer every job they take, even while stopping; no answer means the batch panicked.
        let result = answer.await.unwrap_or(Err(Error::Internal));
        if let (Some((id, account)), Ok(Ok(Outcome::Reserved(ReserveOutcome::Allowed { .. })))) =
            (owner, &result)
        {
            self.lock_owners().insert(id, account);
        }
        result
    }

    fn shard_of(&self, operation: &Operation) -> usize {
        let hash = match operation {
            // A reservation of several keys goes with its first, most specific, key (a card, not its
            // organisation): shared keys are locked in key order by every batch, so any routing is correct.
            Operation::Reserve(r) => self.hasher.hash_one(&r.accounts[0]),
            Operation::SetLimit { account, .. }
            | Operation::PutLimit { account, .. }
            | Operation::RemoveLimit { account, .. } => self.hasher.hash_one(account),
            Operation::Commit { transaction_id, .. } | Operation::Reverse { transaction_id, .. } => {
                match self.lock_owners().get(transaction_id) {
                    Some(account) => self.hasher.hash_one(&account),
                    None => self.hasher.hash_one(transaction_id),
                }
            }
        };
        (hash % self.shards.len() as u64) as usize
    }

    fn lock_owners(&self) -> std::sync::MutexGuard<'_, Owners> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Which account owns a transaction, for the transactions reserved through this replica lately. The mapping
/// never changes once made, so a cached entry is never stale. Bounded: two generations, the older dropped
/// whole when the newer fills.
#[derive(Default)]
struct Owners {
    current: HashMap<TransactionId, AccountKey>,
    previous: HashMap<TransactionId, AccountKey>,
}

impl Owners {
    fn insert(&mut self, id: TransactionId, account: AccountKey) {
        if self.current.len() >= OWNERS_PER_GENERATION {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(id, account);
    }

    fn get(&self, id: &TransactionId) -> Option<AccountKey> {
        self.current.get(id).or_else(|| self.previous.get(id)).cloned()
    }
}

async fn work<S: Store>(app: Allowance<S>, mut jobs: mpsc::Receiver<Job>, max_batch: usize) {
    while let Some(job) = jobs.recv().await {
        let mut batch = Vec::with_capacity(max_batch);
        batch.push(job);
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // In a task of its own, so that a bug panicking in one batch fails that batch's callers (their reply
        // is dropped) and not every later call routed to this worker.
        let app = app.clone();
        if let Err(e) = tokio::spawn(async move { run(&app, &mut batch).await }).await {
            tracing::error!(error = %e, "a batch panicked; its operations failed");
        }
    }
}

async fn run<S: Store>(app: &Allowance<S>, batch: &mut Vec<Job>) {
    let operations: Vec<Operation> = batch.iter().map(|j| j.operation.clone()).collect();
    match app.execute(operations).await {
        Ok(results) => {
            for (job, result) in batch.drain(..).zip(results) {
                let _ = job.reply.send(Ok(result));
            }
        }
        // A statement the database refused (not a lost connection, nor a server shutting down or restarting)
        // might be one operation's doing: run each alone, so only that one fails.
        Err(Error::Storage(e)) if batch.len() > 1 && e.statement_refused() => {
            tracing::warn!(size = batch.len(), "batch failed; running its operations one by one");
            for job in batch.drain(..) {
                let result = app.execute(vec![job.operation]).await.map(|mut r| r.remove(0));
                let _ = job.reply.send(result);
            }
        }
        Err(e) => {
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{KeyId, Unit};

    fn account(k: &str) -> AccountKey {
        AccountKey::new(KeyId::parse(k).unwrap(), Unit::parse("usd").unwrap())
    }

    #[test]
    fn owners_stay_bounded_and_remember_the_latest() {
        let mut owners = Owners::default();
        for i in 0..(3 * OWNERS_PER_GENERATION) {
            owners.insert(TransactionId::parse(format!("t{i}")).unwrap(), account("k"));
        }
        assert!(owners.current.len() + owners.previous.len() <= 2 * OWNERS_PER_GENERATION);
        let last = TransactionId::parse(format!("t{}", 3 * OWNERS_PER_GENERATION - 1)).unwrap();
        assert_eq!(owners.get(&last), Some(account("k")));
        assert_eq!(owners.get(&TransactionId::parse("t0").unwrap()), None);
    }
}
