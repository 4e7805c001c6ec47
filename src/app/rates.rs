//! Rate checks: coalesced per shard of accounts into one database transaction, where every check of a key
//! is applied in order to that key's state in memory and the state is written once (one row update per key
//! and limit per batch, however many hits it had).
//!
//! Also the rules of Envoy's protocol: cached like the callers, re-read every refresh interval.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use metrics::{counter, histogram};
use tokio::sync::{mpsc, oneshot};

use super::{Allowance, Error, metrics as app_metrics};
use crate::domain::rate::{RateItem, RateOutcome};
use crate::domain::rules::Rule;
use crate::domain::{Actor, AuditAction, AuditEvent, LimitName, Rejection};
use crate::storage::Store;

/// How rate checks are batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateBatchConfig {
    pub workers: usize,
    pub max_batch: usize,
}

impl Default for RateBatchConfig {
    fn default() -> Self {
        Self { workers: 2, max_batch: 256 }
    }
}

type Reply = Result<RateOutcome, Error>;

struct Job {
    items: Vec<RateItem>,
    reply: oneshot::Sender<Reply>,
}

#[derive(Clone)]
pub(super) struct RateBatcher {
    shards: Arc<[mpsc::Sender<Job>]>,
    hasher: RandomState,
}

impl RateBatcher {
    pub(super) fn start<S: Store>(app: Allowance<S>, config: RateBatchConfig) -> Self {
        let max_batch = config.max_batch.max(1);
        let shards = (0..config.workers.max(1))
            .map(|_| {
                let (queue, jobs) = mpsc::channel(max_batch * 8);
                tokio::spawn(work(app.clone(), jobs, max_batch));
                queue
            })
            .collect();
        Self { shards, hasher: RandomState::new() }
    }

    async fn submit(&self, items: Vec<RateItem>) -> Reply {
        // By the first account: every check of a key lands on one worker, where its hits coalesce.
        let shard = (self.hasher.hash_one(&items[0].account) % self.shards.len() as u64) as usize;
        let (reply, answer) = oneshot::channel();
        if self.shards[shard].send(Job { items, reply }).await.is_err() {
            return Err(Error::ShuttingDown);
        }
        answer.await.unwrap_or(Err(Error::Internal))
    }
}

async fn work<S: Store>(app: Allowance<S>, mut jobs: mpsc::Receiver<Job>, max_batch: usize) {
    while let Some(job) = jobs.recv().await {
        let mut batch = vec![job];
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let app = app.clone();
        // Its own task: a panicking batch fails its callers only.
        if let Err(e) = tokio::spawn(async move {
            let checks: Vec<Vec<RateItem>> = batch.iter_mut().map(|j| std::mem::take(&mut j.items)).collect();
            let result = app.check_rates_now(&checks).await;
            match result {
                Ok(outcomes) => {
                    for (job, outcome) in batch.into_iter().zip(outcomes) {
                        let _ = job.reply.send(Ok(outcome));
                    }
                }
                Err(e) => {
                    for job in batch {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                }
            }
        })
        .await
        {
            tracing::error!(error = %e, "a rate batch panicked; its checks failed");
        }
    }
}

/// The rules every replica matches Envoy's descriptors against.
pub struct RuleCache {
    rules: RwLock<(Arc<Vec<Rule>>, Option<Instant>)>,
}

impl Default for RuleCache {
    fn default() -> Self {
        Self { rules: RwLock::new((Arc::new(Vec::new()), None)) }
    }
}

impl RuleCache {
    pub fn get(&self) -> (Arc<Vec<Rule>>, Option<Instant>) {
        let guard = self.rules.read().unwrap_or_else(|e| e.into_inner());
        (guard.0.clone(), guard.1)
    }

    fn set(&self, rules: Vec<Rule>, at: Instant) {
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = (Arc::new(rules), Some(at));
    }
}

impl<S: Store> Allowance<S> {
    /// Checks (and, if admitted, counts) one request against the rate limits its items select, atomically:
    /// admitted only if every non-shadow limit admits it, and then counted by every limit.
    pub async fn check_rate(&self, items: Vec<RateItem>) -> Result<RateOutcome, Error> {
        if items.is_empty() {
            return Ok(RateOutcome { allowed: true, items: Vec::new() });
        }
        match &self.rate_batcher {
            Some(batcher) => batcher.submit(items).await,
            None => Ok(self.check_rates_now(&[items]).await?.remove(0)),
        }
    }

    /// One batch of checks, in order, in one database transaction.
    #[tracing::instrument(name = "app.check_rates", skip_all, fields(checks = checks.len()))]
    async fn check_rates_now(&self, checks: &[Vec<RateItem>]) -> Result<Vec<RateOutcome>, Error> {
        histogram!("allowance_rate_batch_size").record(checks.len() as f64);
        let accounts: Vec<_> = checks.iter().flatten().map(|i| i.account.clone()).collect();
        // The database's clock, unless a test drives the clock.
        let now = (!self.clock.is_wall_clock()).then(|| self.clock.now());
        let outcomes = self
            .store
            .with_rates(&accounts, now, |book| checks.iter().map(|c| book.check(c)).collect::<Vec<_>>())
            .await
            .inspect_err(app_metrics::storage_error)?;
        Ok(outcomes)
    }

    /// The rules as last read, and when that read began (`None`: never read).
    pub fn rules_with_age(&self) -> (Arc<Vec<Rule>>, Option<Instant>) {
        self.rules.get()
    }

    /// Re-reads the rules into this replica's cache.
    pub async fn refresh_rules(&self) -> Result<usize, Error> {
        let started = Instant::now();
        let rules = self.store.rate_rules().await.inspect_err(app_metrics::storage_error)?;
        let n = rules.len();
        self.rules.set(rules, started);
        Ok(n)
    }

    pub async fn put_rule(&self, rule: Rule, by: &Actor) -> Result<(), Error> {
        let audit = AuditEvent::new(by, self.clock.now(), AuditAction::RulePut, rule.name.as_str());
        self.store.put_rate_rule(&rule, audit).await.inspect_err(app_metrics::storage_error)?;
        // Applies here at once; elsewhere at the next refresh.
        self.refresh_rules().await?;
        Ok(())
    }

    pub async fn delete_rule(&self, name: LimitName, by: &Actor) -> Result<(), Error> {
        let audit = AuditEvent::new(by, self.clock.now(), AuditAction::RuleDelete, name.as_str());
        if !self.store.delete_rate_rule(&name, audit).await.inspect_err(app_metrics::storage_error)? {
            return Err(Rejection::RuleNotFound(name).into());
        }
        self.refresh_rules().await?;
        Ok(())
    }

    pub async fn list_rules(&self) -> Result<Vec<Rule>, Error> {
        Ok(self.store.rate_rules().await.inspect_err(app_metrics::storage_error)?)
    }
}

/// Counts one limit's decision: per rule (or `check_rate`) and limit name, never per key.
pub fn count_decision(rule: &str, limit: &LimitName, allowed: bool, shadow: bool) {
    let outcome = match (allowed, shadow) {
        (true, _) => "allowed",
        (false, false) => "denied",
        (false, true) => "shadow_denied",
    };
    counter!("allowance_rate_checks_total", "rule" => rule.to_owned(), "limit" => limit.to_string(), "outcome" => outcome)
        .increment(1);
}
