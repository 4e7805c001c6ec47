//! Two replicas on one database, many concurrent clients: no interleaving may let spend exceed a limit.

use allowance::clock::ManualClock;
use allowance::grpc::pb::{TransactionState, Window};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tonic::Code;

use crate::helpers::call::{self, Client, commit, reserve, reverse, set_limit, usage};
use crate::helpers::{TestServer, epoch, second_pool};

/// Two servers, each with its own pool on the same database, and a client of each.
async fn two_replicas(pool: &PgPool) -> (TestServer, TestServer, [Client; 2]) {
    let clock = ManualClock::new(epoch());
    let a = TestServer::on(&second_pool(pool, 16).await, &clock).await;
    let b = TestServer::on(&second_pool(pool, 16).await, &clock).await;
    let clients = [a.client.clone(), b.client.clone()];
    (a, b, clients)
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn sixty_four_concurrent_reserves_on_two_replicas_allow_exactly_the_limit(pool: PgPool) {
    let (_a, _b, clients) = two_replicas(&pool).await;
    let mut c = clients[0].clone();
    set_limit(&mut c, "hot", Window::Daily, 1000).await;
    let mut tasks = JoinSet::new();
    for i in 0..64 {
        let mut c = clients[i % 2].clone();
        tasks.spawn(async move { reserve(&mut c, "hot", &format!("t{i}"), 100).await.allowed });
    }
    let allowed = tasks.join_all().await.into_iter().filter(|a| *a).count();
    assert_eq!(allowed, 10);
    let (spent, held, remaining) = usage(&mut c, "hot", Window::Daily).await;
    assert_eq!((spent + held, remaining), (1000, Some(0)));
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn concurrent_commits_and_reverses_never_let_spend_exceed_the_limit(pool: PgPool) {
    let (_a, _b, clients) = two_replicas(&pool).await;
    let mut c = clients[0].clone();
    set_limit(&mut c, "hot", Window::Daily, 1000).await;
    let mut tasks = JoinSet::new();
    for i in 0..64 {
        let mut c = clients[i % 2].clone();
        tasks.spawn(async move {
            let tx = format!("t{i}");
            if !reserve(&mut c, "hot", &tx, 100).await.allowed {
                return 0;
            }
            // A third settle for less, a third fail, a third stay held.
            match i % 3 {
                0 => commit(&mut c, &tx, Some(60)).await.unwrap().amount,
                1 => {
                    assert_eq!(reverse(&mut c, &tx).await.unwrap().state(), TransactionState::Reversed);
                    0
                }
                _ => 100,
            }
        });
    }
    // A watcher samples usage while the clients run: it must never see more than the limit.
    let mut watcher = clients[1].clone();
    let watch = tokio::spawn(async move {
        for _ in 0..50 {
            let (spent, held, _) = usage(&mut watcher, "hot", Window::Daily).await;
            assert!(spent + held <= 1000, "saw {spent} + {held}");
            tokio::task::yield_now().await;
        }
    });
    let counted: i64 = tasks.join_all().await.into_iter().sum();
    watch.await.unwrap();
    let (spent, held, _) = usage(&mut c, "hot", Window::Daily).await;
    assert_eq!(spent + held, counted, "usage is exactly what the outcomes say");
    assert!(counted <= 1000);

    // Every allowed transaction is in the state its client left it.
    let list = c
        .list_transactions(allowance::grpc::pb::ListTransactionsRequest {
            key_id: "hot".into(),
            unit: "usd".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let recorded: i64 = list
        .transactions
        .iter()
        .filter(|t| matches!(t.state(), TransactionState::Held | TransactionState::Committed))
        .map(|t| t.amount)
        .sum();
    assert_eq!(recorded, counted);
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn one_transaction_id_raced_by_many_keys_is_taken_exactly_once(pool: PgPool) {
    let (_a, _b, clients) = two_replicas(&pool).await;
    let mut tasks = JoinSet::new();
    for i in 0..16 {
        let mut c = clients[i % 2].clone();
        tasks.spawn(async move {
            c.reserve_spending(call::reserve_req(&format!("key{i}"), "shared", 10))
                .await
                .map(|r| r.into_inner())
        });
    }
    let results = tasks.join_all().await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    assert!(results.iter().filter_map(|r| r.as_ref().err()).all(|e| e.code() == Code::AlreadyExists));
    let mut c = clients[0].clone();
    let owner = call::get(&mut c, "shared").await.unwrap().key_id;
    for i in 0..16 {
        let key = format!("key{i}");
        let held = usage(&mut c, &key, Window::Daily).await.1;
        assert_eq!(held, if key == owner { 10 } else { 0 }, "{key}");
    }
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn concurrent_retries_of_one_reservation_hold_once(pool: PgPool) {
    let (_a, _b, clients) = two_replicas(&pool).await;
    let mut tasks = JoinSet::new();
    for i in 0..16 {
        let mut c = clients[i % 2].clone();
        tasks.spawn(async move { reserve(&mut c, "k", "same", 10).await });
    }
    let results = tasks.join_all().await;
    assert!(results.iter().all(|r| r.allowed));
    assert!(results.windows(2).all(|p| p[0].transaction == p[1].transaction));
    let mut c = clients[0].clone();
    assert_eq!(usage(&mut c, "k", Window::Daily).await.1, 10);
}
