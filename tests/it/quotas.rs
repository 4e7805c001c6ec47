//! Quotas over gRPC: named limits of every period kind, plans and overrides, multi-key reservations (also
//! under two replicas and 64 clients), retry_after, and the INVALID_ARGUMENT table for bad input.

use allowance::clock::ManualClock;
use allowance::grpc::pb;
use prost_types::{Duration, Timestamp};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tonic::Code;

use crate::helpers::call::{Client, reserve, reserve_req};
use crate::helpers::{TestServer, actor, epoch, second_pool};

pub(crate) fn rolling(secs: i64) -> pb::Period {
    pb::Period { kind: Some(pb::period::Kind::Rolling(Duration { seconds: secs, nanos: 0 })) }
}

pub(crate) fn calendar(unit: pb::CalendarUnit, anchor: &str, zone: &str) -> pb::Period {
    let t = chrono::DateTime::parse_from_rfc3339(anchor).unwrap();
    pb::Period {
        kind: Some(pb::period::Kind::Calendar(pb::CalendarPeriod {
            unit: unit.into(),
            count: 1,
            anchor: Some(Timestamp { seconds: t.timestamp(), nanos: 0 }),
            time_zone: zone.into(),
        })),
    }
}

pub(crate) fn limit(name: &str, period: pb::Period, amount: Option<i64>) -> pb::Limit {
    pb::Limit { name: name.into(), period: Some(period), amount, burst: None }
}

pub(crate) async fn put_limit(
    c: &mut Client,
    key: &str,
    l: pb::Limit,
) -> Result<pb::PutLimitResponse, tonic::Status> {
    c.put_limit(pb::PutLimitRequest { key_id: key.into(), unit: "usd".into(), limit: Some(l) })
        .await
        .map(|r| r.into_inner())
}

pub(crate) async fn limits(c: &mut Client, key: &str) -> pb::GetLimitsResponse {
    c.get_limits(pb::GetLimitsRequest { key_id: key.into(), unit: "usd".into() }).await.unwrap().into_inner()
}

pub(crate) fn plan_limit(name: &str, period: pb::Period, amount: i64) -> pb::PlanLimit {
    pb::PlanLimit { unit: "usd".into(), name: name.into(), period: Some(period), amount, burst: None }
}

fn clock_seconds(clock: &ManualClock) -> i64 {
    use allowance::clock::Clock;
    clock.now().timestamp()
}

fn assert_invalid(r: Result<impl std::fmt::Debug, tonic::Status>, field: &str) {
    let status = r.expect_err("must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with(field), "{:?} should name {field}", status.message());
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn a_calendar_month_from_the_31st_reports_its_period_and_resets(pool: PgPool) {
    let clock =
        ManualClock::new(chrono::DateTime::parse_from_rfc3339("2030-02-10T12:00:00Z").unwrap().to_utc());
    let server = TestServer::on(&pool, &clock).await;
    let mut c = server.client.clone();
    let month = calendar(pb::CalendarUnit::Month, "2030-01-31T00:00:00+01:00", "Europe/Paris");
    let put = put_limit(&mut c, "k", limit("invoice", month, Some(100))).await.unwrap();
    let usage = put.usage.unwrap();
    // Paris midnight on Jan 31, then on the last day of February.
    assert_eq!(usage.period_start.unwrap().seconds, 1_896_044_400);
    assert_eq!(usage.resets_at.unwrap().seconds, 1_898_463_600);
    assert!(reserve(&mut c, "k", "t1", 100).await.allowed);
    let denied = reserve(&mut c, "k", "t2", 1).await;
    assert!(!denied.allowed);
    let e = &denied.exceeded_limits[0];
    assert_eq!((e.key_id.as_str(), e.name.as_str(), e.limit, e.held), ("k", "invoice", 100, 100));
    // The hold (15 minutes) expires before the month ends: that is when 1 more fits.
    assert_eq!(e.retry_after.unwrap().seconds, 900);
    assert_eq!(denied.retry_after.unwrap().seconds, 900);
    // Committed spend stays until the boundary.
    c.commit(pb::CommitRequest { transaction_id: "t1".into(), amount: None }).await.unwrap();
    let denied = reserve(&mut c, "k", "t3", 1).await;
    let now = clock_seconds(&clock);
    assert_eq!(denied.exceeded_limits[0].retry_after.unwrap().seconds, 1_898_463_600 - now);
    // An amount above the limit never fits: no retry_after.
    let never = reserve(&mut c, "k", "t4", 101).await;
    assert!(never.exceeded_limits[0].retry_after.is_none());
    assert!(never.retry_after.is_none());
    clock.set(chrono::DateTime::from_timestamp(1_898_463_600, 0).unwrap());
    assert!(reserve(&mut c, "k", "t5", 100).await.allowed, "the new period starts from zero");
    let l = limits(&mut c, "k").await;
    assert_eq!(l.limits[0].spent + l.limits[0].held, 100);
    assert_eq!(l.limits[0].period_start.unwrap().seconds, 1_898_463_600);
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn a_limit_set_later_sees_the_spend_already_recorded(pool: PgPool) {
    let clock = ManualClock::new(epoch());
    let server = TestServer::on(&pool, &clock).await;
    let mut c = server.client.clone();
    let committed = pb::ReserveSpendingRequest { commit: true, ..reserve_req("k", "t1", 70) };
    assert!(c.reserve_spending(committed).await.unwrap().into_inner().allowed);
    clock.advance(chrono::TimeDelta::hours(2));
    put_limit(&mut c, "k", limit("burst", rolling(3600), Some(100))).await.unwrap();
    put_limit(&mut c, "k", limit("day", rolling(86_400), Some(100))).await.unwrap();
    let denied = reserve(&mut c, "k", "t2", 40).await;
    let names: Vec<&str> = denied.exceeded_limits.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["day"], "the hour no longer counts the spend; the day does");
    let l = limits(&mut c, "k").await;
    let day = l.limits.iter().find(|u| u.name == "day").unwrap();
    assert_eq!((day.spent, day.remaining), (70, 30));
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn plans_apply_to_their_keys_at_once_and_own_limits_override_them(pool: PgPool) {
    let clock = ManualClock::new(epoch());
    let server = TestServer::on(&pool, &clock).await;
    let mut c = server.client.clone();
    let free = c
        .put_plan(pb::PutPlanRequest {
            name: "free".into(),
            limits: vec![plan_limit("daily", rolling(86_400), 100)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(free.plan.unwrap().key_count, 0);
    for key in ["a", "b"] {
        c.assign_plan(pb::AssignPlanRequest { key_id: key.into(), plan: "free".into() }).await.unwrap();
    }
    assert!(!reserve(&mut c, "a", "t1", 101).await.allowed);
    assert_eq!(limits(&mut c, "a").await.plan, "free");
    // Raising the plan raises every key on it, without touching them.
    c.put_plan(pb::PutPlanRequest {
        name: "free".into(),
        limits: vec![plan_limit("daily", rolling(86_400), 200)],
    })
    .await
    .unwrap();
    assert!(reserve(&mut c, "a", "t2", 150).await.allowed);
    assert!(reserve(&mut c, "b", "t3", 150).await.allowed);
    // b lifts the plan's limit with an explicit unlimited; a gets a tighter one of its own.
    put_limit(&mut c, "b", limit("daily", rolling(86_400), None)).await.unwrap();
    assert!(reserve(&mut c, "b", "t4", 10_000).await.allowed);
    put_limit(&mut c, "a", limit("daily", rolling(86_400), Some(160))).await.unwrap();
    let denied = reserve(&mut c, "a", "t5", 20).await;
    assert_eq!(denied.exceeded_limits[0].limit, 160);
    let l = limits(&mut c, "a").await;
    assert_eq!(l.limits[0].source, pb::LimitSource::Key as i32);
    assert_eq!(l.key_limits.len(), 1);
    // Removing the own limit brings the plan's back.
    c.delete_limit(pb::DeleteLimitRequest { key_id: "a".into(), unit: "usd".into(), name: "daily".into() })
        .await
        .unwrap();
    assert_eq!(limits(&mut c, "a").await.limits[0].source, pb::LimitSource::Plan as i32);
    let gone = c
        .delete_limit(pb::DeleteLimitRequest { key_id: "a".into(), unit: "usd".into(), name: "daily".into() })
        .await;
    assert_eq!(gone.unwrap_err().code(), Code::NotFound);
    // A plan with keys on it cannot be deleted; once they leave, it can.
    let busy = c.delete_plan(pb::DeletePlanRequest { name: "free".into() }).await.unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition);
    for key in ["a", "b"] {
        c.assign_plan(pb::AssignPlanRequest { key_id: key.into(), plan: String::new() }).await.unwrap();
    }
    c.delete_plan(pb::DeletePlanRequest { name: "free".into() }).await.unwrap();
    let missing = c.get_plan(pb::GetPlanRequest { name: "free".into() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_invalid(
        c.assign_plan(pb::AssignPlanRequest { key_id: "a".into(), plan: "free".into() }).await,
        "plan",
    );
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn a_multi_key_reservation_holds_on_every_key_and_is_denied_by_any(pool: PgPool) {
    let clock = ManualClock::new(epoch());
    let server = TestServer::on(&pool, &clock).await;
    let mut c = server.client.clone();
    put_limit(&mut c, "org", limit("daily", rolling(86_400), Some(150))).await.unwrap();
    put_limit(&mut c, "user", limit("daily", rolling(86_400), Some(1000))).await.unwrap();
    let req = |tx: &str, amount| pb::ReserveSpendingRequest {
        additional_key_ids: vec!["org".into()],
        ..reserve_req("user", tx, amount)
    };
    let ok = c.reserve_spending(req("t1", 100)).await.unwrap().into_inner();
    assert!(ok.allowed);
    assert_eq!(ok.transaction.unwrap().key_ids, ["user", "org"]);
    let denied = c.reserve_spending(req("t2", 100)).await.unwrap().into_inner();
    let keys: Vec<&str> = denied.exceeded_limits.iter().map(|e| e.key_id.as_str()).collect();
    assert_eq!(keys, ["org"]);
    assert_eq!(limits(&mut c, "user").await.limits[0].held, 100, "a denial holds nothing on any key");
    c.commit(pb::CommitRequest { transaction_id: "t1".into(), amount: Some(40) }).await.unwrap();
    for key in ["user", "org"] {
        let l = limits(&mut c, key).await.limits.remove(0);
        assert_eq!((l.spent, l.held), (40, 0), "{key}");
    }
    c.reverse(pb::ReverseRequest { transaction_id: "t1".into() }).await.unwrap();
    assert_eq!(limits(&mut c, "org").await.limits[0].spent, 0);
    // The refund is in every charged key's audit trail, once: a repeated reverse changes nothing.
    c.reverse(pb::ReverseRequest { transaction_id: "t1".into() }).await.unwrap();
    let audited: Vec<String> = sqlx::query_scalar(
        "SELECT key_id FROM audit_events WHERE action = 'transaction.reverse' AND subject = 't1' ORDER BY key_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(audited, ["org", "user"]);
    // A retry with the keys in another order is the same reservation (a client may build the list from a
    // set): it is answered with the transaction as it stands, keys in their first order.
    let reordered = pb::ReserveSpendingRequest {
        additional_key_ids: vec!["user".into()],
        ..reserve_req("org", "t1", 100)
    };
    let replayed = c.reserve_spending(reordered).await.unwrap().into_inner().transaction.unwrap();
    assert_eq!((replayed.key_id.as_str(), replayed.state()), ("user", pb::TransactionState::Reversed));
    // Another key set is a different reservation.
    let other = pb::ReserveSpendingRequest {
        additional_key_ids: vec!["user".into(), "third".into()],
        ..reserve_req("org", "t1", 100)
    };
    assert_eq!(c.reserve_spending(other).await.unwrap_err().code(), Code::AlreadyExists);
    let listed = c
        .list_transactions(pb::ListTransactionsRequest {
            key_id: "org".into(),
            unit: "usd".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.transactions.len(), 1, "the org lists the transaction it was charged in");
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn bad_input_is_invalid_argument_naming_the_field(pool: PgPool) {
    let clock = ManualClock::new(epoch());
    let server = TestServer::on(&pool, &clock).await;
    let mut c = server.client.clone();
    let day = || rolling(86_400);
    assert_invalid(put_limit(&mut c, "k", limit("x", rolling(0), Some(1))).await, "limit.period.rolling");
    assert_invalid(
        put_limit(&mut c, "k", limit("x", rolling(401 * 86_400), Some(1))).await,
        "limit.period.rolling",
    );
    let mars = calendar(pb::CalendarUnit::Month, "2030-01-01T00:00:00Z", "Mars/Olympus_Mons");
    assert_invalid(
        put_limit(&mut c, "k", limit("x", mars, Some(1))).await,
        "limit.period.calendar.time_zone",
    );
    let far = calendar(pb::CalendarUnit::Month, "2200-01-01T00:00:00Z", "UTC");
    assert_invalid(put_limit(&mut c, "k", limit("x", far, Some(1))).await, "limit.period.calendar.anchor");
    let unspecified = calendar(pb::CalendarUnit::Unspecified, "2030-01-01T00:00:00Z", "UTC");
    assert_invalid(
        put_limit(&mut c, "k", limit("x", unspecified, Some(1))).await,
        "limit.period.calendar.unit",
    );
    let no_period = pb::Limit { name: "x".into(), period: None, amount: Some(1), burst: None };
    assert_invalid(put_limit(&mut c, "k", no_period).await, "limit.period");
    assert_invalid(put_limit(&mut c, "k", limit("has space", day(), Some(1))).await, "limit.name");
    assert_invalid(put_limit(&mut c, "k", limit("x", day(), Some(-1))).await, "limit.amount");
    for i in 0..32 {
        put_limit(&mut c, "k", limit(&format!("l{i}"), day(), Some(1))).await.unwrap();
    }
    assert_invalid(put_limit(&mut c, "k", limit("l32", day(), Some(1))).await, "name");
    put_limit(&mut c, "k", limit("l0", day(), Some(2))).await.expect("replacing one is fine at the bound");

    let dup = vec![plan_limit("d", day(), 1), plan_limit("d", rolling(60), 2)];
    assert_invalid(c.put_plan(pb::PutPlanRequest { name: "p".into(), limits: dup }).await, "limits[1].name");
    assert_invalid(c.put_plan(pb::PutPlanRequest { name: "bad name".into(), limits: vec![] }).await, "name");
    let zone = vec![plan_limit("d", calendar(pb::CalendarUnit::Day, "2030-01-01T00:00:00Z", "Nowhere"), 1)];
    assert_invalid(
        c.put_plan(pb::PutPlanRequest { name: "p".into(), limits: zone }).await,
        "limits[0].period",
    );

    let nine = pb::ReserveSpendingRequest {
        additional_key_ids: (1..9).map(|i| format!("k{i}")).collect(),
        ..reserve_req("k0", "t", 1)
    };
    assert_invalid(c.reserve_spending(nine).await, "additional_key_ids");
    let repeated =
        pb::ReserveSpendingRequest { additional_key_ids: vec!["k0".into()], ..reserve_req("k0", "t", 1) };
    assert_invalid(c.reserve_spending(repeated).await, "additional_key_ids");
    let empty =
        pb::ReserveSpendingRequest { additional_key_ids: vec![String::new()], ..reserve_req("k0", "t", 1) };
    assert_invalid(c.reserve_spending(empty).await, "additional_key_ids");
}

/// Users share one organisation key; 64 clients on two replicas reserve for (user, org) and (org, user) in
/// both orders, commit for less or reverse. No limit of any key is ever exceeded, no call fails, and the
/// totals equal what the outcomes say.
#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn overlapping_multi_key_reservations_on_two_replicas_respect_every_limit(pool: PgPool) {
    let clock = ManualClock::new(epoch());
    let a = TestServer::on(&second_pool(&pool, 16).await, &clock).await;
    let b = TestServer::on(&second_pool(&pool, 16).await, &clock).await;
    let clients = [a.client.clone(), b.client.clone()];
    let mut c = clients[0].clone();
    let users = 8;
    put_limit(&mut c, "org", limit("daily", rolling(86_400), Some(3000))).await.unwrap();
    let month = calendar(pb::CalendarUnit::Month, "2030-01-01T00:00:00-08:00", "America/Los_Angeles");
    put_limit(&mut c, "org", limit("monthly", month, Some(2500))).await.unwrap();
    for u in 0..users {
        put_limit(&mut c, &format!("user{u}"), limit("daily", rolling(86_400), Some(500))).await.unwrap();
    }
    let mut tasks = JoinSet::new();
    for i in 0..64usize {
        let mut c = clients[i % 2].clone();
        tasks.spawn(async move {
            let mut counted = vec![0i64; users + 1];
            for round in 0..4 {
                let user = format!("user{}", (i + round) % users);
                let tx = format!("t{i}-{round}");
                let req = if i % 2 == 0 {
                    pb::ReserveSpendingRequest {
                        additional_key_ids: vec!["org".into()],
                        ..reserve_req(&user, &tx, 100)
                    }
                } else {
                    pb::ReserveSpendingRequest {
                        additional_key_ids: vec![user.clone()],
                        ..reserve_req("org", &tx, 100)
                    }
                };
                let r =
                    c.reserve_spending(req).await.expect("no call fails, no deadlock surfaces").into_inner();
                if !r.allowed {
                    continue;
                }
                let amount = match (i + round) % 3 {
                    0 => {
                        c.commit(pb::CommitRequest { transaction_id: tx, amount: Some(60) })
                            .await
                            .unwrap()
                            .into_inner()
                            .transaction
                            .unwrap()
                            .amount
                    }
                    1 => {
                        c.reverse(pb::ReverseRequest { transaction_id: tx }).await.unwrap();
                        0
                    }
                    _ => 100,
                };
                counted[(i + round) % users] += amount;
                counted[users] += amount;
            }
            counted
        });
    }
    let mut expected = vec![0i64; users + 1];
    for counted in tasks.join_all().await {
        for (e, c) in expected.iter_mut().zip(counted) {
            *e += c;
        }
    }
    for (u, want) in expected.iter().take(users).enumerate() {
        let l = limits(&mut c, &format!("user{u}")).await.limits.remove(0);
        assert_eq!(l.spent + l.held, *want, "user{u}");
        assert!(l.spent + l.held <= 500);
    }
    let org = limits(&mut c, "org").await;
    for l in &org.limits {
        assert_eq!(l.spent + l.held, expected[users], "org {}", l.name);
        assert!(l.spent + l.held <= l.limit, "org {} exceeded", l.name);
    }
    assert!(expected[users] > 0);
}

/// Removing an own limit that overrode a plan's makes the plan's limit apply within the same batch, with the
/// spend already counted (its totals were kept all along).
#[tokio::test]
async fn removing_an_override_applies_the_plan_limit_within_the_same_batch() {
    use std::sync::Arc;

    use allowance::app::{Allowance, Operation, Outcome};
    use allowance::domain::{
        AccountKey, Amount, CalendarUnit, HoldTtl, KeyId, LimitName, LimitSpec, Metadata, Period, Plan,
        PlanName, Reserve, ReserveOutcome, TransactionId, Unit,
    };
    use allowance::storage::memory::MemoryStore;

    let clock = ManualClock::new(epoch());
    let app = Allowance::new(Arc::new(MemoryStore::new()), Arc::new(clock));
    let usd = Unit::parse("usd").unwrap();
    let key = AccountKey::new(KeyId::parse("k").unwrap(), usd.clone());
    let day = Period::calendar(CalendarUnit::Day, 1, epoch(), "UTC", epoch()).unwrap();
    let daily = LimitName::parse("daily").unwrap();
    let plan = Plan::new(
        PlanName::parse("free").unwrap(),
        vec![(usd, LimitSpec::new(daily.clone(), day, Some(100)).unwrap())],
    )
    .unwrap();
    app.put_plan(plan, &actor()).await.unwrap();
    app.assign_plan(key.key_id.clone(), Some(PlanName::parse("free").unwrap()), &actor()).await.unwrap();
    app.put_limit(key.clone(), LimitSpec::new(daily.clone(), day, None).unwrap(), actor()).await.unwrap();
    let reserve = |id: &str, amount| {
        Operation::Reserve(Reserve {
            transaction_id: TransactionId::parse(id).unwrap(),
            accounts: vec![key.clone()],
            amount: Amount::parse("amount", amount).unwrap(),
            hold_ttl: HoldTtl::parse(chrono::TimeDelta::minutes(15)).unwrap(),
            commit: true,
            metadata: Metadata::default(),
        })
    };
    app.execute(vec![reserve("t1", 500)]).await.unwrap();
    let results = app
        .execute(vec![
            Operation::RemoveLimit { account: key.clone(), name: daily, by: actor() },
            reserve("t2", 90),
        ])
        .await
        .unwrap();
    let Ok(Outcome::Reserved(ReserveOutcome::Denied { exceeded, .. })) = &results[1] else {
        panic!("the plan's 100 applies again, with 500 already spent: {results:?}");
    };
    assert_eq!(exceeded[0].usage.spent, 500);
}

/// Two replicas whose clocks straddle a calendar boundary: the one behind cannot spend against the period
/// the other has already moved the key into without it counting (time never runs backwards for a key).
#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn a_replica_with_a_lagging_clock_cannot_spend_uncounted(pool: PgPool) {
    let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().to_utc();
    let ahead = ManualClock::new(at("2030-01-02T00:00:00.010Z"));
    let behind = ManualClock::new(at("2030-01-01T23:59:59.995Z"));
    let a = TestServer::on(&second_pool(&pool, 4).await, &ahead).await;
    let b = TestServer::on(&second_pool(&pool, 4).await, &behind).await;
    let (mut ca, mut cb) = (a.client.clone(), b.client.clone());
    let day = calendar(pb::CalendarUnit::Day, "2030-01-01T00:00:00Z", "UTC");
    put_limit(&mut ca, "k", limit("daily", day, Some(100))).await.unwrap();
    let commit =
        |tx: &str, amount| pb::ReserveSpendingRequest { commit: true, ..reserve_req("k", tx, amount) };
    assert!(ca.reserve_spending(commit("t1", 10)).await.unwrap().into_inner().allowed);
    let mut allowed = 0;
    for i in 0..3 {
        let r = cb.reserve_spending(commit(&format!("b{i}"), 90)).await.unwrap().into_inner();
        allowed += i64::from(r.allowed) * 90;
    }
    assert_eq!(allowed, 90, "the lagging replica decides at the key's own time: 10 + 90 fits, no more");
    let l = limits(&mut ca, "k").await.limits.remove(0);
    assert_eq!(l.spent, 100, "every allowed spend counts");
}
