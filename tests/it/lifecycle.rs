//! How the server starts, follows its database and stops.

use std::sync::Arc;
use std::time::Duration;

use allowance::clock::ManualClock;
use allowance::grpc::pb::Window;
use allowance::storage::postgres::PgStore;
use sqlx::{Connection, PgPool};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::grpc::wait_for_health;
use crate::helpers::call::{reserve, set_limit};
use crate::helpers::{Proxy, TestServer, channel, epoch, lifecycle, upstream};

const SERVICE: &str = "allowance.v1.SpendingLimits";

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn an_in_flight_reservation_completes_during_shutdown(pool: PgPool) {
    let clock = ManualClock::new(epoch());
    let mut lc = lifecycle();
    lc.drain_delay = Duration::from_millis(400);
    let s = TestServer::start_with(PgStore::new(pool.clone()), Arc::new(clock), lc).await;
    let mut c = s.client.clone();
    set_limit(&mut c, "k", Window::Daily, 1000).await;
    let mut health = HealthClient::new(channel(s.addr).await);
    assert_eq!(wait_for_health(&mut health, SERVICE, ServingStatus::Serving).await, ServingStatus::Serving);

    // Hold the account's row lock from outside, so the reservation stays in flight.
    let mut blocker = sqlx::PgConnection::connect_with(&pool.connect_options()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE key_id = 'k' FOR UPDATE").execute(&mut blocker).await.unwrap();
    let mut in_flight = c.clone();
    let call = tokio::spawn(async move { reserve(&mut in_flight, "k", "t1", 100).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!call.is_finished());

    let addr = s.addr;
    s.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let status =
        health.check(tonic_health::pb::HealthCheckRequest { service: SERVICE.into() }).await.unwrap();
    assert_eq!(status.into_inner().status(), ServingStatus::NotServing, "health turns first");

    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "new connections are refused after the drain"
    );
    assert!(!call.is_finished(), "still waiting on the lock");

    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), call).await.unwrap().unwrap();
    assert!(response.allowed, "the in-flight call completed");
    s.stop().await.unwrap();
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM transactions WHERE transaction_id = 't1'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(recorded, 1);
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn health_follows_the_database_down_and_back_up_without_a_restart(pool: PgPool) {
    let proxy = Proxy::start(upstream(&pool)).await;
    let clock = ManualClock::new(epoch());
    let s = TestServer::start(PgStore::new(proxy.pool_for(&pool)), Arc::new(clock)).await;
    let mut c = s.client.clone();
    let mut health = HealthClient::new(channel(s.addr).await);
    assert_eq!(wait_for_health(&mut health, SERVICE, ServingStatus::Serving).await, ServingStatus::Serving);
    assert!(reserve(&mut c, "k", "before", 1).await.allowed);

    proxy.set_up(false);
    assert_eq!(
        wait_for_health(&mut health, SERVICE, ServingStatus::NotServing).await,
        ServingStatus::NotServing
    );
    let liveness =
        health.check(tonic_health::pb::HealthCheckRequest { service: "liveness".into() }).await.unwrap();
    assert_eq!(
        liveness.into_inner().status(),
        ServingStatus::Serving,
        "liveness does not follow the database"
    );
    let e = c.reserve_spending(crate::helpers::call::reserve_req("k", "during", 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);

    proxy.set_up(true);
    assert_eq!(wait_for_health(&mut health, SERVICE, ServingStatus::Serving).await, ServingStatus::Serving);
    assert!(reserve(&mut c, "k", "after", 1).await.allowed);
}

/// A client watching health (grpc.health.v1 Watch, e.g. a load balancer) sees NOT_SERVING during the drain,
/// then its stream ends: an open Watch stream does not hold the server for the whole grace period.
#[tokio::test]
async fn health_watch_streams_end_after_the_drain_and_do_not_hold_shutdown() {
    use allowance::storage::memory::MemoryStore;

    let mut lc = lifecycle();
    lc.drain_delay = Duration::from_millis(300);
    lc.grace = Duration::from_secs(60);
    let s = TestServer::start_with(MemoryStore::new(), Arc::new(ManualClock::new(epoch())), lc).await;
    let mut health = HealthClient::new(channel(s.addr).await);
    assert_eq!(wait_for_health(&mut health, SERVICE, ServingStatus::Serving).await, ServingStatus::Serving);
    let mut streams = Vec::new();
    for service in ["", SERVICE, "liveness"] {
        let request = tonic_health::pb::HealthCheckRequest { service: service.into() };
        let mut stream = health.watch(request).await.unwrap().into_inner();
        assert_eq!(stream.message().await.unwrap().unwrap().status(), ServingStatus::Serving);
        streams.push(stream);
    }

    let started = std::time::Instant::now();
    s.begin_shutdown();
    for (i, stream) in streams.iter_mut().take(2).enumerate() {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap();
        assert_eq!(next.unwrap().status(), ServingStatus::NotServing, "stream {i} sees the drain");
    }
    for stream in &mut streams {
        let end = tokio::time::timeout(Duration::from_secs(30), stream.message()).await;
        assert!(matches!(end, Ok(Ok(None))), "the stream ends with the drain: {end:?}");
    }
    tokio::time::timeout(Duration::from_secs(30), s.stop())
        .await
        .expect("the server stops long before its 60 s grace period")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(30));
}
