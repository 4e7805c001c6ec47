//! Group commit: operations from concurrent callers are coalesced into one database transaction.
//!
//! A few workers share one queue. A worker takes the first waiting operation, then everything else already
//! queued (up to `max_batch`), and runs them as one batch. An idle server therefore never waits for a batch to
//! fill — a lone request goes out at once — while under load, requests queue behind busy workers and batches
//! grow by themselves. Operations keep their arrival order within a batch.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Allowance, Error, Operation, Outcome};
use crate::domain::Rejection;
use crate::storage::{StorageError, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Batches that may run at once, each on its own connection.
    pub workers: usize,
    /// Most operations in one batch.
    pub max_batch: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { workers: 4, max_batch: 128 }
    }
}

type Reply = Result<Result<Outcome, Rejection>, Error>;

struct Job {
    operation: Operation,
    reply: oneshot::Sender<Reply>,
}

/// The queue in front of the workers. Dropping every handle lets the workers finish what is queued and stop.
#[derive(Clone)]
pub(super) struct Batcher {
    queue: mpsc::Sender<Job>,
}

impl Batcher {
    pub(super) fn start<S: Store>(app: Allowance<S>, config: BatchConfig) -> Self {
        // Bounded: under overload, callers wait here rather than memory growing without end.
        let (queue, jobs) = mpsc::channel(config.max_batch * config.workers.max(1) * 4);
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..config.workers.max(1) {
            tokio::spawn(work(app.clone(), jobs.clone(), config.max_batch.max(1)));
        }
        Self { queue }
    }

    pub(super) async fn submit(&self, operation: Operation) -> Reply {
        let (reply, answer) = oneshot::channel();
        if self.queue.send(Job { operation, reply }).await.is_err() {
            return Err(Error::ShuttingDown);
        }
        answer.await.unwrap_or(Err(Error::ShuttingDown))
    }
}

async fn work<S: Store>(app: Allowance<S>, jobs: Arc<Mutex<mpsc::Receiver<Job>>>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        {
            let mut jobs = jobs.lock().await;
            match jobs.recv().await {
                Some(job) => batch.push(job),
                None => return,
            }
            while batch.len() < max_batch {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        run(&app, &mut batch).await;
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
        // A statement the database refused (not a lost connection) might be one operation's doing: run each
        // alone, so only that one fails.
        Err(Error::Storage(StorageError::Unavailable(e)))
            if batch.len() > 1 && matches!(*e, sqlx::Error::Database(_)) =>
        {
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
