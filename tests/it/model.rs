//! Model-based property test: random sequences of reserve / commit / reverse / limit changes / clock moves go
//! through the real app and storage, and through an obviously-correct model that keeps a plain list of
//! transactions and sums it per window on every question. Any difference in a decision, an error, a
//! transaction or a usage figure fails the case.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use allowance::app::{Allowance, Error, Operation, Outcome};
use allowance::clock::{Clock, ManualClock};
use allowance::domain::{
    AccountKey, Amount, HoldTtl, KeyId, Limit, Metadata, Rejection, Reserve, ReserveOutcome, Timestamp,
    TransactionId, TxState, Unit, Window,
};
use allowance::storage::Store;
use allowance::storage::memory::MemoryStore;
use allowance::storage::postgres::PgStore;
use chrono::TimeDelta;
use proptest::prelude::*;

use crate::helpers::epoch;

const KEYS: usize = 2;
const TX_IDS: usize = 8;

#[derive(Debug, Clone)]
enum Op {
    Reserve { key: usize, tx: usize, amount: i64, ttl_secs: i64, commit: bool },
    Commit { tx: usize, amount: Option<i64> },
    Reverse { tx: usize },
    SetLimit { key: usize, window: Window, limit: Option<i64> },
    Advance(TimeDelta),
    GetTransaction { tx: usize },
}

fn amount() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => 1i64..=400,
        1 => Just(i64::MAX),
        1 => (i64::MAX - 1000)..=i64::MAX,
    ]
}

fn window() -> impl Strategy<Value = Window> {
    prop::sample::select(Window::ALL.to_vec())
}

fn advance() -> impl Strategy<Value = TimeDelta> {
    let exact = Window::ALL.iter().flat_map(|w| {
        let l = w.length();
        [l, l - TimeDelta::microseconds(1), l + TimeDelta::microseconds(1)]
    });
    prop_oneof![
        4 => prop::sample::select(vec![
            TimeDelta::microseconds(1),
            TimeDelta::seconds(1),
            TimeDelta::minutes(10),
            TimeDelta::minutes(15),
            TimeDelta::hours(6),
            TimeDelta::hours(23),
        ]),
        2 => prop::sample::select(exact.collect::<Vec<_>>()),
        1 => (1i64..40 * 86_400).prop_map(TimeDelta::seconds),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..KEYS, 0..TX_IDS, amount(), prop_oneof![Just(900i64), 1i64..=3 * 86_400], any::<bool>())
            .prop_map(|(key, tx, amount, ttl_secs, commit)| Op::Reserve { key, tx, amount, ttl_secs, commit }),
        3 => (0..TX_IDS, prop::option::of(prop_oneof![1i64..=450, Just(i64::MAX)]))
            .prop_map(|(tx, amount)| Op::Commit { tx, amount }),
        2 => (0..TX_IDS).prop_map(|tx| Op::Reverse { tx }),
        2 => (0..KEYS, window(), prop::option::of(prop_oneof![0i64..=1200, Just(i64::MAX)]))
            .prop_map(|(key, window, limit)| Op::SetLimit { key, window, limit }),
        3 => advance().prop_map(Op::Advance),
        1 => (0..TX_IDS).prop_map(|tx| Op::GetTransaction { tx }),
    ]
}

/// The reference: every transaction in a list, usage summed from scratch.
#[derive(Default)]
struct Model {
    txs: BTreeMap<usize, ModelTx>,
    limits: HashMap<usize, [Option<i64>; 4]>,
}

#[derive(Debug, Clone)]
struct ModelTx {
    key: usize,
    amount: i64,
    held_amount: i64,
    state: TxState,
    created_at: Timestamp,
    expires_at: Option<Timestamp>,
    late: bool,
}

impl ModelTx {
    fn state_at(&self, now: Timestamp) -> TxState {
        match self.expires_at {
            Some(e) if self.state == TxState::Held && e <= now => TxState::Expired,
            _ => self.state,
        }
    }
}

/// What a call returned, reduced to what the model can predict.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Allowed { state: TxState, amount: i64, usage: Vec<(Window, i64, i128, i128)> },
    Denied { exceeded: Vec<Window>, usage: Vec<(Window, i64, i128, i128)> },
    Tx { state: TxState, amount: i64, late: bool },
    Limit,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
}

impl Model {
    fn usage(&self, key: usize, w: Window, now: Timestamp) -> (i128, i128) {
        let mut spent = 0i128;
        let mut held = 0i128;
        for t in self.txs.values().filter(|t| t.key == key) {
            if t.created_at <= now - w.length() || t.created_at > now {
                continue;
            }
            match t.state_at(now) {
                TxState::Committed => spent += i128::from(t.amount),
                TxState::Held => held += i128::from(t.amount),
                _ => {}
            }
        }
        (spent, held)
    }

    fn limited_usage(&self, key: usize, now: Timestamp) -> Vec<(Window, i64, i128, i128)> {
        let limits = self.limits.get(&key).copied().unwrap_or_default();
        Window::ALL
            .into_iter()
            .filter_map(|w| {
                let limit = limits[w.index()]?;
                let (s, h) = self.usage(key, w, now);
                Some((w, limit, s, h))
            })
            .collect()
    }

    fn apply(&mut self, op: &Op, now: Timestamp) -> Option<Seen> {
        Some(match *op {
            Op::Reserve { key, tx, amount, ttl_secs, commit } => {
                if let Some(t) = self.txs.get(&tx) {
                    if t.key != key || t.held_amount != amount {
                        return Some(Seen::AlreadyExists);
                    }
                    return Some(Seen::Allowed {
                        state: t.state_at(now),
                        amount: t.amount,
                        usage: self.limited_usage(key, now),
                    });
                }
                let usage = self.limited_usage(key, now);
                let exceeded: Vec<Window> = usage
                    .iter()
                    .filter(|(_, limit, s, h)| s + h + i128::from(amount) > i128::from(*limit))
                    .map(|u| u.0)
                    .collect();
                if !exceeded.is_empty() {
                    return Some(Seen::Denied { exceeded, usage });
                }
                let state = if commit { TxState::Committed } else { TxState::Held };
                self.txs.insert(
                    tx,
                    ModelTx {
                        key,
                        amount,
                        held_amount: amount,
                        state,
                        created_at: now,
                        expires_at: (!commit).then(|| now + TimeDelta::seconds(ttl_secs)),
                        late: false,
                    },
                );
                Seen::Allowed { state, amount, usage: self.limited_usage(key, now) }
            }
            Op::Commit { tx, amount } => {
                let Some(t) = self.txs.get_mut(&tx) else { return Some(Seen::NotFound) };
                let final_amount = amount.unwrap_or(t.held_amount);
                match t.state_at(now) {
                    TxState::Committed if amount.is_none() || final_amount == t.amount => {}
                    TxState::Committed | TxState::Reversed => return Some(Seen::FailedPrecondition),
                    _ if final_amount > t.held_amount => return Some(Seen::FailedPrecondition),
                    s => {
                        t.late = s == TxState::Expired;
                        t.state = TxState::Committed;
                        t.amount = final_amount;
                    }
                }
                Seen::Tx { state: t.state, amount: t.amount, late: t.late }
            }
            Op::Reverse { tx } => {
                let Some(t) = self.txs.get_mut(&tx) else { return Some(Seen::NotFound) };
                t.state = TxState::Reversed;
                Seen::Tx { state: t.state, amount: t.amount, late: t.late }
            }
            Op::SetLimit { key, window, limit } => {
                self.limits.entry(key).or_default()[window.index()] = limit;
                Seen::Limit
            }
            Op::GetTransaction { tx } => match self.txs.get(&tx) {
                Some(t) => Seen::Tx { state: t.state_at(now), amount: t.amount, late: t.late },
                None => Seen::NotFound,
            },
            Op::Advance(_) => return None,
        })
    }
}

/// Names unique to one case, so cases can share a database.
struct Names {
    prefix: String,
}

impl Names {
    fn new() -> Self {
        static CASE: AtomicU64 = AtomicU64::new(0);
        let n = CASE.fetch_add(1, Ordering::Relaxed);
        Self { prefix: format!("{}-{}-{n}", std::process::id(), chrono::Utc::now().timestamp_micros()) }
    }

    fn account(&self, key: usize) -> AccountKey {
        AccountKey::new(
            KeyId::parse(format!("{}-key{key}", self.prefix)).unwrap(),
            Unit::parse("usd").unwrap(),
        )
    }

    fn tx(&self, tx: usize) -> TransactionId {
        TransactionId::parse(format!("{}-tx{tx}", self.prefix)).unwrap()
    }
}

fn seen_usage(u: &[allowance::domain::WindowUsage]) -> Vec<(Window, i64, i128, i128)> {
    u.iter().map(|u| (u.window, u.limit.unwrap(), u.spent, u.held)).collect()
}

fn seen_error(e: Error) -> Seen {
    match e {
        Error::Rejected(Rejection::NotFound(_)) => Seen::NotFound,
        Error::Rejected(Rejection::AlreadyExists(_)) => Seen::AlreadyExists,
        Error::Rejected(Rejection::FailedPrecondition(_)) => Seen::FailedPrecondition,
        other => panic!("unexpected error {other:?}"),
    }
}

async fn apply<S: Store>(app: &Allowance<S>, names: &Names, op: &Op) -> Option<Seen> {
    if let Op::GetTransaction { tx } = *op {
        let seen = app.get_transaction(names.tx(tx)).await.map(|t| Seen::Tx {
            state: t.state,
            amount: t.amount,
            late: t.committed_late,
        });
        return Some(seen.unwrap_or_else(seen_error));
    }
    let operation = operation(names, op)?;
    let mut results = app.execute(vec![operation]).await.expect("the store is available");
    Some(seen_outcome(results.remove(0)))
}

/// Runs one case; returns a description of the first difference.
async fn check<S: Store>(store: S, ops: &[Op]) -> Result<(), String> {
    let clock = ManualClock::new(epoch());
    let app = Allowance::new(Arc::new(store), Arc::new(clock.clone()));
    let names = Names::new();
    let mut model = Model::default();
    for (i, op) in ops.iter().enumerate() {
        if let Op::Advance(by) = op {
            clock.advance(*by);
        }
        let now = clock.now();
        let expected = model.apply(op, now);
        let actual = apply(&app, &names, op).await;
        if expected != actual {
            return Err(format!("step {i} {op:?}: model {expected:?}, service {actual:?}"));
        }
        for key in 0..KEYS {
            let usage = app.get_limits(names.account(key)).await.map_err(|e| e.to_string())?;
            for u in usage {
                let (spent, held) = model.usage(key, u.window, now);
                if (u.spent, u.held) != (spent, held) {
                    return Err(format!(
                        "step {i} {op:?}: key {key} {:?} usage: model spent {spent} held {held}, service spent {} held {}",
                        u.window, u.spent, u.held
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The operation a step stands for, if it is one a batch can carry.
fn operation(names: &Names, op: &Op) -> Option<Operation> {
    Some(match *op {
        Op::Reserve { key, tx, amount, ttl_secs, commit } => Operation::Reserve(Reserve {
            transaction_id: names.tx(tx),
            account: names.account(key),
            amount: Amount::parse("amount", amount).unwrap(),
            hold_ttl: HoldTtl::parse(TimeDelta::seconds(ttl_secs)).unwrap(),
            commit,
            metadata: Metadata::default(),
        }),
        Op::Commit { tx, amount } => Operation::Commit {
            transaction_id: names.tx(tx),
            amount: amount.map(|a| Amount::parse("amount", a).unwrap()),
        },
        Op::Reverse { tx } => Operation::Reverse { transaction_id: names.tx(tx) },
        Op::SetLimit { key, window, limit } => Operation::SetLimit {
            account: names.account(key),
            window,
            limit: limit.map(|l| Limit::parse(l).unwrap()),
        },
        Op::Advance(_) | Op::GetTransaction { .. } => return None,
    })
}

fn seen_outcome(r: Result<Outcome, Rejection>) -> Seen {
    match r {
        Ok(Outcome::Reserved(ReserveOutcome::Allowed { transaction, usage, .. })) => {
            Seen::Allowed { state: transaction.state, amount: transaction.amount, usage: seen_usage(&usage) }
        }
        Ok(Outcome::Reserved(ReserveOutcome::Denied { exceeded, usage })) => {
            Seen::Denied { exceeded, usage: seen_usage(&usage) }
        }
        Ok(Outcome::Committed(c)) => {
            Seen::Tx { state: c.transaction.state, amount: c.transaction.amount, late: c.late }
        }
        Ok(Outcome::Reversed(r)) => Seen::Tx {
            state: r.transaction.state,
            amount: r.transaction.amount,
            late: r.transaction.committed_late,
        },
        Ok(Outcome::Limit(_)) => Seen::Limit,
        Err(e) => seen_error(Error::Rejected(e)),
    }
}

/// Runs the same steps as batches (everything between two clock moves in one batch) on `batched` and one
/// operation at a time on `single`; every result and the final usage and transactions must be identical.
async fn check_batching<S: Store>(batched: S, single: S, ops: &[Op]) -> Result<(), String> {
    let clock = ManualClock::new(epoch());
    let batched = Allowance::new(Arc::new(batched), Arc::new(clock.clone()));
    let single = Allowance::new(Arc::new(single), Arc::new(clock.clone()));
    let (nb, ns) = (Names::new(), Names::new());
    for chunk in ops.split(|op| matches!(op, Op::Advance(_))) {
        let in_batch: Vec<Operation> = chunk.iter().filter_map(|op| operation(&nb, op)).collect();
        let got = batched.execute(in_batch).await.map_err(|e| e.to_string())?;
        let mut want = Vec::new();
        for op in chunk.iter().filter_map(|op| operation(&ns, op)) {
            want.extend(single.execute(vec![op]).await.map_err(|e| e.to_string())?);
        }
        let got: Vec<Seen> = got.into_iter().map(seen_outcome).collect();
        let want: Vec<Seen> = want.into_iter().map(seen_outcome).collect();
        if got != want {
            return Err(format!("batch {chunk:?}: batched {got:?}, one by one {want:?}"));
        }
        clock.advance(TimeDelta::hours(7));
    }
    for key in 0..KEYS {
        let b = batched.get_limits(nb.account(key)).await.map_err(|e| e.to_string())?;
        let s = single.get_limits(ns.account(key)).await.map_err(|e| e.to_string())?;
        if b != s {
            return Err(format!("key {key}: batched usage {b:?}, one by one {s:?}"));
        }
    }
    for tx in 0..TX_IDS {
        let b = batched.get_transaction(nb.tx(tx)).await.map(|t| (t.state, t.amount, t.expires_at)).ok();
        let s = single.get_transaction(ns.tx(tx)).await.map(|t| (t.state, t.amount, t.expires_at)).ok();
        if b != s {
            return Err(format!("tx {tx}: batched {b:?}, one by one {s:?}"));
        }
    }
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn memory_store_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let result = runtime().block_on(check(MemoryStore::new(), &ops));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn batched_and_unbatched_execution_agree_in_memory(ops in prop::collection::vec(op(), 1..60)) {
        let result = runtime().block_on(check_batching(MemoryStore::new(), MemoryStore::new(), &ops));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}

#[test]
fn batched_and_unbatched_execution_agree_on_postgres() {
    let rt = runtime();
    let pool = rt.block_on(crate::db::migrated_pool("batching"));
    let mut runner =
        proptest::test_runner::TestRunner::new(ProptestConfig { cases: 32, ..ProptestConfig::default() });
    let result = runner.run(&prop::collection::vec(op(), 1..40), |ops| {
        let result =
            rt.block_on(check_batching(PgStore::new(pool.clone()), PgStore::new(pool.clone()), &ops));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The same sequences against Postgres: fewer cases, each a full round trip per step.
#[test]
fn postgres_store_matches_the_model() {
    let rt = runtime();
    let pool = rt.block_on(crate::db::migrated_pool("model"));
    let config = ProptestConfig {
        cases: std::env::var("MODEL_PG_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&prop::collection::vec(op(), 1..40), |ops| {
        let result = rt.block_on(check(PgStore::new(pool.clone()), &ops));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
