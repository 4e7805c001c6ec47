//! End-to-end: the real server in-process on 127.0.0.1:0, a generated tonic client, a database per test.

use allowance::clock::ManualClock;
use allowance::grpc::pb::{self, TransactionState, Window};
use chrono::TimeDelta;
use sqlx::PgPool;
use tonic::Code;

use crate::helpers::call::{self, commit, reserve, reserve_req, reverse, set_limit, usage};
use crate::helpers::{TestServer, epoch};

async fn start(pool: &PgPool) -> (TestServer, ManualClock) {
    let clock = ManualClock::new(epoch());
    (TestServer::on(pool, &clock).await, clock)
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn reserve_allows_up_to_the_limit_exactly_and_denies_past_it(pool: PgPool) {
    let (s, _clock) = start(&pool).await;
    let mut c = s.client.clone();
    set_limit(&mut c, "k", Window::Daily, 1000).await;

    let r = reserve(&mut c, "k", "t1", 600).await;
    assert!(r.allowed);
    let tx = r.transaction.unwrap();
    assert_eq!(
        (tx.state(), tx.amount, tx.key_id.as_str(), tx.unit.as_str()),
        (TransactionState::Held, 600, "k", "usd")
    );
    assert_eq!(r.usage.len(), 1, "usage lists only windows with a limit");
    assert_eq!((r.usage[0].spent, r.usage[0].held, r.usage[0].remaining), (0, 600, Some(400)));

    let denied = reserve(&mut c, "k", "t2", 401).await;
    assert!(!denied.allowed);
    assert_eq!(denied.exceeded, vec![Window::Daily as i32]);
    assert!(denied.transaction.is_none());
    assert_eq!(denied.usage[0].held, 600, "a denial records nothing");
    assert_eq!(call::get(&mut c, "t2").await.unwrap_err().code(), Code::NotFound);

    let exact = reserve(&mut c, "k", "t3", 400).await;
    assert!(exact.allowed, "reaching the limit exactly is allowed");
    assert_eq!(exact.usage[0].remaining, Some(0));
    assert!(!reserve(&mut c, "k", "t4", 1).await.allowed);
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn a_denial_names_every_exceeded_window(pool: PgPool) {
    let (s, _clock) = start(&pool).await;
    let mut c = s.client.clone();
    set_limit(&mut c, "k", Window::Daily, 100).await;
    set_limit(&mut c, "k", Window::Weekly, 150).await;
    set_limit(&mut c, "k", Window::Annual, 10_000).await;
    let r = reserve(&mut c, "k", "t1", 200).await;
    assert!(!r.allowed);
    assert_eq!(r.exceeded, vec![Window::Daily as i32, Window::Weekly as i32]);
    assert_eq!(r.usage.len(), 3);
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn unlimited_spending_is_recorded_and_a_later_limit_sees_it(pool: PgPool) {
    let (s, _clock) = start(&pool).await;
    let mut c = s.client.clone();
    let r = reserve(&mut c, "k", "t1", 700).await;
    assert!(r.allowed);
    assert!(r.usage.is_empty());
    commit(&mut c, "t1", None).await.unwrap();
    set_limit(&mut c, "k", Window::Monthly, 1000).await;
    assert_eq!(usage(&mut c, "k", Window::Monthly).await, (700, 0, Some(300)));
    assert!(!reserve(&mut c, "k", "t2", 301).await.allowed);
    // RemoveLimit: unlimited again, usage still tracked.
    c.remove_limit(pb::RemoveLimitRequest {
        key_id: "k".into(),
        unit: "usd".into(),
        window: Window::Monthly.into(),
    })
    .await
    .unwrap();
    assert!(reserve(&mut c, "k", "t2", 301).await.allowed);
    assert_eq!(usage(&mut c, "k", Window::Monthly).await, (700, 301, None));
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn get_limits_reports_all_four_windows(pool: PgPool) {
    let (s, _clock) = start(&pool).await;
    let mut c = s.client.clone();
    set_limit(&mut c, "k", Window::Weekly, 50).await;
    let r = c
        .get_limits(pb::GetLimitsRequest { key_id: "k".into(), unit: "usd".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.key_id.as_str(), r.unit.as_str()), ("k", "usd"));
    let windows: Vec<i32> = r.usage.iter().map(|u| u.window).collect();
    assert_eq!(windows, vec![1, 2, 3, 4]);
    assert_eq!(r.usage[1].limit, Some(50));
    assert_eq!(r.usage[0].limit, None);
    assert_eq!(r.usage[0].remaining, None);
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn spend_leaves_each_window_when_it_rolls_past(pool: PgPool) {
    let (s, clock) = start(&pool).await;
    let mut c = s.client.clone();
    for w in [Window::Daily, Window::Weekly, Window::Monthly, Window::Annual] {
        set_limit(&mut c, "k", w, 1000).await;
    }
    let mut r = reserve_req("k", "t1", 1000);
    r.commit = true;
    let r = c.reserve_spending(r).await.unwrap().into_inner();
    assert_eq!(r.transaction.unwrap().state(), TransactionState::Committed);

    clock.advance(TimeDelta::hours(24) - TimeDelta::microseconds(1));
    assert_eq!(usage(&mut c, "k", Window::Daily).await.0, 1000, "still inside the last 24 hours");
    clock.advance(TimeDelta::microseconds(1));
    assert_eq!(usage(&mut c, "k", Window::Daily).await.0, 0, "out of the daily window at exactly 24h");
    assert_eq!(usage(&mut c, "k", Window::Weekly).await.0, 1000);
    assert!(!reserve(&mut c, "k", "t2", 1).await.allowed, "the weekly limit still binds");

    clock.set(epoch() + TimeDelta::days(7));
    assert_eq!(usage(&mut c, "k", Window::Weekly).await.0, 0);
    clock.set(epoch() + TimeDelta::days(30));
    assert_eq!(usage(&mut c, "k", Window::Monthly).await.0, 0);
    assert_eq!(usage(&mut c, "k", Window::Annual).await.0, 1000);
    clock.set(epoch() + TimeDelta::days(365));
    assert_eq!(usage(&mut c, "k", Window::Annual).await.0, 0);
    assert!(reserve(&mut c, "k", "t3", 1000).await.allowed);
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn an_expired_hold_stops_counting_at_its_expiry_instant(pool: PgPool) {
    let (s, clock) = start(&pool).await;
    let mut c = s.client.clone();
    set_limit(&mut c, "k", Window::Daily, 100).await;
    let mut r = reserve_req("k", "t1", 100);
    r.hold_ttl = Some(prost_types::Duration { seconds: 60, nanos: 0 });
    let tx = c.reserve_spending(r).await.unwrap().into_inner().transaction.unwrap();
    assert_eq!(tx.expires_at.unwrap().seconds, tx.created_at.unwrap().seconds + 60);

    clock.advance(TimeDelta::seconds(60) - TimeDelta::microseconds(1));
    assert_eq!(usage(&mut c, "k", Window::Daily).await, (0, 100, Some(0)));
    clock.advance(TimeDelta::microseconds(1));
    // No write has happened since: reads see the expiry at once.
    assert_eq!(usage(&mut c, "k", Window::Daily).await, (0, 0, Some(100)));
    assert_eq!(call::get(&mut c, "t1").await.unwrap().state(), TransactionState::Expired);
    assert!(reserve(&mut c, "k", "t2", 100).await.allowed, "the capacity is free again");
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn the_default_hold_ttl_is_fifteen_minutes(pool: PgPool) {
    let (s, clock) = start(&pool).await;
    let mut c = s.client.clone();
    let tx = reserve(&mut c, "k", "t1", 5).await.transaction.unwrap();
    assert_eq!(tx.expires_at.unwrap().seconds - tx.created_at.unwrap().seconds, 900);
    clock.advance(TimeDelta::minutes(15));
    assert_eq!(usage(&mut c, "k", Window::Daily).await.1, 0);
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn a_partial_commit_releases_the_rest_at_once(pool: PgPool) {
    let (s, _clock) = start(&pool).await;
    let mut c = s.client.clone();
    set_limit(&mut c, "k", Window::Daily, 100).await;
    reserve(&mut c, "k", "t1", 100).await;
    let tx = commit(&mut c, "t1", Some(60)).await.unwrap();
    assert_eq!((tx.state(), tx.amount, tx.held_amount), (TransactionState::Committed, 60, 100));
    assert!(tx.committed_at.is_some());
    assert_eq!(usage(&mut c, "k", Window::Daily).await, (60, 0, Some(40)));
    assert!(reserve(&mut c, "k", "t2", 40).await.allowed);

    // Idempotent with the same amount, and with no amount; another amount is refused.
    assert_eq!(commit(&mut c, "t1", Some(60)).await.unwrap(), tx);
    assert_eq!(commit(&mut c, "t1", None).await.unwrap(), tx);
    assert_eq!(commit(&mut c, "t1", Some(50)).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(usage(&mut c, "k", Window::Daily).await, (60, 40, Some(0)));
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn commit_above_the_held_amount_or_after_reverse_is_refused(pool: PgPool) {
    let (s, _clock) = start(&pool).await;
    let mut c = s.client.clone();
    reserve(&mut c, "k", "t1", 100).await;
    let e = commit(&mut c, "t1", Some(101)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("exceeds the held amount"), "{}", e.message());
    assert_eq!(call::get(&mut c, "t1").await.unwrap().state(), TransactionState::Held, "nothing half-done");
    reverse(&mut c, "t1").await.unwrap();
    assert_eq!(commit(&mut c, "t1", None).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(commit(&mut c, "nope", None).await.unwrap_err().code(), Code::NotFound);
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn committing_an_expired_hold_records_the_spend_late(pool: PgPool) {
    let (s, clock) = start(&pool).await;
    let mut c = s.client.clone();
    set_limit(&mut c, "k", Window::Daily, 100).await;
    reserve(&mut c, "k", "t1", 80).await;
    clock.advance(TimeDelta::minutes(20));
    assert_eq!(usage(&mut c, "k", Window::Daily).await, (0, 0, Some(100)));
    let tx = commit(&mut c, "t1", None).await.unwrap();
    assert_eq!((tx.state(), tx.amount, tx.committed_late), (TransactionState::Committed, 80, true));
    assert_eq!(usage(&mut c, "k", Window::Daily).await, (80, 0, Some(20)), "the money moved: it counts");
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn reverse_releases_a_hold_or_refunds_a_spend_and_keeps_history(pool: PgPool) {
    let (s, _clock) = start(&pool).await;
    let mut c = s.client.clone();
    set_limit(&mut c, "k", Window::Daily, 100).await;
    reserve(&mut c, "k", "held", 30).await;
    reserve(&mut c, "k", "spent", 70).await;
    commit(&mut c, "spent", None).await.unwrap();
    assert_eq!(usage(&mut c, "k", Window::Daily).await, (70, 30, Some(0)));

    let r = reverse(&mut c, "held").await.unwrap();
    assert_eq!(r.state(), TransactionState::Reversed);
    assert!(r.reversed_at.is_some());
    assert_eq!(usage(&mut c, "k", Window::Daily).await, (70, 0, Some(30)));
    let r = reverse(&mut c, "spent").await.unwrap();
    assert_eq!(usage(&mut c, "k", Window::Daily).await, (0, 0, Some(100)));
    assert_eq!(reverse(&mut c, "spent").await.unwrap(), r, "reverse is idempotent");
    assert_eq!(usage(&mut c, "k", Window::Daily).await, (0, 0, Some(100)));

    let e = reverse(&mut c, "never-reserved").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Nothing is deleted: both transactions keep their history.
    let list = c
        .list_transactions(pb::ListTransactionsRequest {
            key_id: "k".into(),
            unit: "usd".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.transactions.len(), 2);
    assert!(list.transactions.iter().all(|t| t.state() == TransactionState::Reversed));
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn reverse_by_id_touches_only_its_own_key(pool: PgPool) {
    let (s, _clock) = start(&pool).await;
    let mut c = s.client.clone();
    reserve(&mut c, "a", "ta", 10).await;
    reserve(&mut c, "b", "tb", 20).await;
    reverse(&mut c, "ta").await.unwrap();
    assert_eq!(usage(&mut c, "a", Window::Daily).await.1, 0);
    assert_eq!(usage(&mut c, "b", Window::Daily).await.1, 20);
    assert_eq!(call::get(&mut c, "tb").await.unwrap().state(), TransactionState::Held);
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn a_retried_reservation_returns_the_same_transaction_and_holds_once(pool: PgPool) {
    let (s, _clock) = start(&pool).await;
    let mut c = s.client.clone();
    set_limit(&mut c, "k", Window::Daily, 100).await;
    let first = reserve(&mut c, "k", "t1", 60).await;
    let again = reserve(&mut c, "k", "t1", 60).await;
    assert!(again.allowed);
    assert_eq!(again.transaction, first.transaction);
    assert_eq!(usage(&mut c, "k", Window::Daily).await.1, 60, "held once");

    for (key, unit, amount) in [("k", "usd", 61), ("other", "usd", 60), ("k", "eur", 60)] {
        let mut r = reserve_req(key, "t1", amount);
        r.unit = unit.into();
        let e = c.reserve_spending(r).await.unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{key} {unit} {amount}");
    }
    assert_eq!(usage(&mut c, "k", Window::Daily).await.1, 60);
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn amounts_up_to_i64_max_never_overflow_or_brick_a_key(pool: PgPool) {
    let (s, _clock) = start(&pool).await;
    let mut c = s.client.clone();
    let max = i64::MAX;
    set_limit(&mut c, "k", Window::Daily, max).await;
    assert!(reserve(&mut c, "k", "t1", max).await.allowed);
    let denied = reserve(&mut c, "k", "t2", max).await;
    assert!(!denied.allowed);
    assert_eq!(denied.usage[0].held, max);
    assert!(!reserve(&mut c, "k", "t3", 1).await.allowed);
    reverse(&mut c, "t1").await.unwrap();
    assert!(reserve(&mut c, "k", "t4", 1).await.allowed, "the key is usable again");

    // Unlimited: totals beyond i64::MAX are recorded exactly and reported saturated.
    assert!(reserve(&mut c, "u", "u1", max).await.allowed);
    assert!(reserve(&mut c, "u", "u2", max).await.allowed);
    assert_eq!(usage(&mut c, "u", Window::Daily).await, (0, max, None));
    set_limit(&mut c, "u", Window::Daily, 10).await;
    assert_eq!(usage(&mut c, "u", Window::Daily).await, (0, max, Some(0)));
    assert!(!reserve(&mut c, "u", "u3", 1).await.allowed);
    reverse(&mut c, "u1").await.unwrap();
    reverse(&mut c, "u2").await.unwrap();
    assert_eq!(usage(&mut c, "u", Window::Daily).await, (0, 0, Some(10)));
    assert!(reserve(&mut c, "u", "u4", 10).await.allowed);
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn bad_input_is_invalid_argument_naming_the_field(pool: PgPool) {
    let (s, _clock) = start(&pool).await;
    let mut c = s.client.clone();
    let long = "x".repeat(129);
    let ttl = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
    let cases: Vec<(&str, pb::ReserveSpendingRequest)> = vec![
        ("amount", reserve_req("k", "t", 0)),
        ("amount", reserve_req("k", "t", -5)),
        ("key_id", reserve_req("", "t", 1)),
        ("key_id", reserve_req(&long, "t", 1)),
        ("transaction_id", reserve_req("k", "", 1)),
        ("transaction_id", reserve_req("k", &long, 1)),
        ("unit", pb::ReserveSpendingRequest { unit: long.clone(), ..reserve_req("k", "t", 1) }),
        ("hold_ttl", pb::ReserveSpendingRequest { hold_ttl: ttl(0), ..reserve_req("k", "t", 1) }),
        (
            "hold_ttl",
            pb::ReserveSpendingRequest { hold_ttl: ttl(30 * 86_400 + 1), ..reserve_req("k", "t", 1) },
        ),
        ("hold_ttl", pb::ReserveSpendingRequest { hold_ttl: ttl(-1), ..reserve_req("k", "t", 1) }),
        (
            "metadata",
            pb::ReserveSpendingRequest {
                metadata: (0..17).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..reserve_req("k", "t", 1)
            },
        ),
        (
            "metadata",
            pb::ReserveSpendingRequest {
                metadata: [("k".to_string(), "v".repeat(513))].into(),
                ..reserve_req("k", "t", 1)
            },
        ),
    ];
    for (field, req) in cases {
        let e = c.reserve_spending(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{req:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    let set =
        |window: i32, limit| pb::SetLimitRequest { key_id: "k".into(), unit: "usd".into(), window, limit };
    for (field, req) in [("limit", set(1, -1)), ("window", set(0, 5)), ("window", set(9, 5))] {
        let e = c.set_limit(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{}", e.message());
    }
    let e = c.commit(pb::CommitRequest { transaction_id: "t".into(), amount: Some(0) }).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().starts_with("amount"));
    let e = c.reverse(pb::ReverseRequest { transaction_id: String::new() }).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().starts_with("transaction_id"));
    let e = c
        .list_transactions(pb::ListTransactionsRequest {
            key_id: "k".into(),
            page_token: "junk".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().starts_with("page_token"));
    // Nothing was recorded by any of them.
    assert_eq!(usage(&mut c, "k", Window::Daily).await, (0, 0, None));
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn an_empty_unit_is_the_default_unit_and_units_are_separate(pool: PgPool) {
    let (s, _clock) = start(&pool).await;
    let mut c = s.client.clone();
    let mut r = reserve_req("k", "t1", 5);
    r.unit = String::new();
    let tx = c.reserve_spending(r).await.unwrap().into_inner().transaction.unwrap();
    assert_eq!(tx.unit, "usd");
    let mut r = reserve_req("k", "t2", 7);
    r.unit = "eur".into();
    c.reserve_spending(r).await.unwrap();
    assert_eq!(usage(&mut c, "k", Window::Daily).await.1, 5);
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn transactions_list_newest_first_in_pages_with_their_metadata(pool: PgPool) {
    let (s, clock) = start(&pool).await;
    let mut c = s.client.clone();
    for i in 0..5 {
        let mut r = reserve_req("k", &format!("t{i}"), 1);
        r.metadata = [("order".to_string(), i.to_string())].into();
        c.reserve_spending(r).await.unwrap();
        clock.advance(TimeDelta::seconds(1));
    }
    reserve(&mut c, "other", "x", 1).await;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_transactions(pb::ListTransactionsRequest {
                key_id: "k".into(),
                unit: "usd".into(),
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.transactions.len() <= 2);
        seen.extend(page.transactions.into_iter().map(|t| (t.transaction_id, t.metadata["order"].clone())));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let ids: Vec<&str> = seen.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["t4", "t3", "t2", "t1", "t0"]);
    assert!(seen.iter().all(|(id, order)| id[1..] == *order));
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn health_is_serving_on_a_migrated_database_and_reflection_lists_the_service(pool: PgPool) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let (s, _clock) = start(&pool).await;
    let mut health = HealthClient::new(crate::helpers::channel(s.addr).await);
    let status = wait_for_health(&mut health, "allowance.v1.SpendingLimits", ServingStatus::Serving).await;
    assert_eq!(status, ServingStatus::Serving);
    let overall = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(overall.status(), ServingStatus::Serving);

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(crate::helpers::channel(s.addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses =
        reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in ["allowance.v1.SpendingLimits", "envoy.service.ratelimit.v3.RateLimitService"] {
        assert!(names.contains(&service.to_string()), "{service} not in {names:?}");
    }

    // What grpcurl asks next: the file that defines the service, with its dependencies.
    use prost::Message;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "envoy.service.ratelimit.v3.RateLimitService".into(),
        )),
    };
    let mut responses =
        reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap().name().to_owned())
        .collect();
    assert!(names.contains(&"envoy/service/ratelimit/v3/rls.proto".to_string()), "{names:?}");
}

#[sqlx::test(migrations = false)]
async fn health_is_not_serving_on_an_unmigrated_database(pool: PgPool) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let (s, _clock) = start(&pool).await;
    let mut health = HealthClient::new(crate::helpers::channel(s.addr).await);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let r = health.check(HealthCheckRequest { service: "allowance.v1.SpendingLimits".into() }).await.unwrap();
    assert_eq!(r.into_inner().status(), ServingStatus::NotServing);

    allowance::storage::postgres::MIGRATOR.run(&pool).await.unwrap();
    let status = wait_for_health(&mut health, "allowance.v1.SpendingLimits", ServingStatus::Serving).await;
    assert_eq!(status, ServingStatus::Serving, "serving once migrated, without a restart");
}

pub async fn wait_for_health(
    health: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
    service: &str,
    want: tonic_health::pb::health_check_response::ServingStatus,
) -> tonic_health::pb::health_check_response::ServingStatus {
    let mut last = None;
    for _ in 0..100 {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
            .await
            .unwrap()
            .into_inner();
        if r.status() == want {
            return want;
        }
        last = Some(r.status());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    last.unwrap()
}

#[tokio::test]
async fn database_trouble_is_unavailable_and_leaks_nothing() {
    use std::sync::Arc;
    // Nothing listens on port 1: every statement fails to connect.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_millis(500))
        .connect_lazy("postgres://user:secret@127.0.0.1:1/nowhere")
        .unwrap();
    let clock = ManualClock::new(epoch());
    let s = TestServer::start(allowance::storage::postgres::PgStore::new(pool), Arc::new(clock)).await;
    let mut c = s.client.clone();
    let e = c.reserve_spending(reserve_req("k", "t", 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let e2 = commit(&mut c, "t", None).await.unwrap_err();
    assert_eq!(e2.code(), Code::Unavailable);
    for m in [e.message(), e2.message()] {
        let lower = m.to_lowercase();
        for leak in ["sql", "postgres", "secret", "127.0.0.1", "connection refused", "pool"] {
            assert!(!lower.contains(leak), "{m}");
        }
    }
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn the_server_stops_cleanly_when_told_to(pool: PgPool) {
    let (s, _clock) = start(&pool).await;
    let mut c = s.client.clone();
    assert!(reserve(&mut c, "k", "t1", 1).await.allowed);
    let addr = s.addr;
    s.stop().await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the port is closed after shutdown");
}
