//! One clock: two replicas whose own clocks differ by a day decide every window at the database's clock.

use std::sync::Arc;

use allowance::clock::Clock;
use allowance::domain::Timestamp;
use allowance::grpc::pb;
use allowance::storage::postgres::PgStore;
use chrono::TimeDelta;
use sqlx::PgPool;

use crate::helpers::call::{get, reserve, reserve_req, set_limit};
use crate::helpers::{TestServer, second_pool};
use crate::quotas::{calendar, limit, limits, plan_limit, put_limit, rolling};

/// The real time moved by a fixed offset: a replica whose clock is wrong.
struct Skewed(TimeDelta);

impl Clock for Skewed {
    fn now(&self) -> Timestamp {
        allowance::clock::SystemClock.now() + self.0
    }
}

async fn replica(pool: &PgPool, skew: TimeDelta) -> TestServer {
    let store = PgStore::new(second_pool(pool, 4).await).with_database_clock();
    TestServer::start(store, Arc::new(Skewed(skew))).await
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn replicas_a_day_apart_agree_on_every_window(pool: PgPool) {
    let behind = replica(&pool, TimeDelta::zero()).await;
    let ahead = replica(&pool, TimeDelta::days(1)).await;
    let (mut a, mut b) = (behind.client.clone(), ahead.client.clone());
    set_limit(&mut a, "k", pb::Window::Daily, 100).await;
    let today = limit("today", calendar(pb::CalendarUnit::Day, "2000-01-01T00:00:00Z", "UTC"), Some(150));
    put_limit(&mut a, "k", today).await.unwrap();

    assert!(reserve(&mut a, "k", "t1", 60).await.allowed);
    // A day ahead by its own clock, the replica would see t1 aged out of the rolling day and count from a
    // new calendar day: it must not.
    let denied = reserve(&mut b, "k", "t2", 60).await;
    assert!(!denied.allowed, "the second replica decides at the database's clock: 120 > 100");
    assert!(reserve(&mut b, "k", "t3", 40).await.allowed);
    assert!(!reserve(&mut a, "k", "t4", 1).await.allowed, "both replicas see 100 held of the daily 100");

    // Holds expire by the database's clock too: 15 minutes, not a day, from now.
    let usage = limits(&mut b, "k").await;
    let daily = usage.limits.iter().find(|l| l.name == "daily").unwrap();
    assert_eq!((daily.held, daily.remaining), (100, 0));
    let today = usage.limits.iter().find(|l| l.name == "today").unwrap();
    // The calendar day is the database's today (by its own clock the replica would report tomorrow's).
    let until_reset = today.resets_at.as_ref().unwrap().seconds - chrono::Utc::now().timestamp();
    assert!((0..=86_400 + 5).contains(&until_reset), "resets in {until_reset} s");
    assert_eq!(today.held, 100);
    behind.stop().await.unwrap();
    ahead.stop().await.unwrap();
}

/// A replica a day behind still finds expired holds to sweep at the database's clock; the open-holds count
/// drops once the sweep has released them.
#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn a_replica_behind_sweeps_expired_holds_at_the_database_clock(pool: PgPool) {
    use allowance::storage::{Access, Store};

    let server = replica(&pool, TimeDelta::zero()).await;
    let mut c = server.client.clone();
    set_limit(&mut c, "k", pb::Window::Daily, 100).await;
    let short = pb::ReserveSpendingRequest {
        hold_ttl: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
        ..reserve_req("k", "t1", 10)
    };
    assert!(c.reserve_spending(short).await.unwrap().into_inner().allowed);
    assert!(reserve(&mut c, "k", "t2", 10).await.allowed);
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;

    let day_behind = allowance::clock::SystemClock.now() - TimeDelta::days(1);
    // Without the database's clock the replica's own decides: a day behind, nothing has expired yet.
    let own_clock = PgStore::new(pool.clone());
    assert!(own_clock.accounts_with_expired_holds(day_behind, 10).await.unwrap().is_empty());
    assert_eq!(own_clock.open_holds().await.unwrap(), 2, "t1 is not released yet");

    let one_clock = PgStore::new(pool.clone()).with_database_clock();
    let expired = one_clock.accounts_with_expired_holds(day_behind, 10).await.unwrap();
    assert_eq!(expired.iter().map(|a| a.key_id.as_str()).collect::<Vec<_>>(), ["k"]);
    let out = one_clock.with_ledger(Access::Write, &expired, &[], &[], day_behind, |_| ()).await.unwrap();
    assert_eq!(out.expired_holds, 1);
    assert_eq!(one_clock.open_holds().await.unwrap(), 1, "t2 is open, t1 released");
    assert!(one_clock.accounts_with_expired_holds(day_behind, 10).await.unwrap().is_empty());
    server.stop().await.unwrap();
}

/// Reads see holds at the database's clock too, and changes made outside a batch (here a plan) are audited
/// at it: a replica a day ahead shows a 15-minute hold as held, not expired, and stamps no audit event a day
/// ahead.
#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn a_replica_ahead_reads_and_audits_at_the_database_clock(pool: PgPool) {
    let ahead = replica(&pool, TimeDelta::days(1)).await;
    let mut c = ahead.client.clone();
    set_limit(&mut c, "k", pb::Window::Daily, 100).await;
    assert!(reserve(&mut c, "k", "t1", 10).await.allowed);

    let one = get(&mut c, "t1").await.unwrap();
    assert_eq!(one.state(), pb::TransactionState::Held, "GetTransaction at the replica's clock says expired");
    let list = pb::ListTransactionsRequest { key_id: "k".into(), page_size: 10, ..Default::default() };
    let page = c.list_transactions(list).await.unwrap().into_inner();
    assert_eq!(page.transactions.len(), 1);
    assert_eq!(page.transactions[0].state(), pb::TransactionState::Held, "ListTransactions too");

    c.put_plan(pb::PutPlanRequest {
        name: "free".into(),
        limits: vec![plan_limit("daily", rolling(86_400), 100)],
    })
    .await
    .unwrap();
    let offsets: Vec<(String, f64)> =
        sqlx::query_as("SELECT action, extract(epoch FROM at - now())::float8 FROM audit_events ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(offsets.iter().any(|(action, _)| action == "plan.put"), "{offsets:?}");
    for (action, offset) in &offsets {
        assert!(offset.abs() < 600.0, "{action} audited {offset} s away from the database's clock");
    }
    ahead.stop().await.unwrap();
}
