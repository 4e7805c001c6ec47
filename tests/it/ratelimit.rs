//! Request rate limits over gRPC: CheckRate under two replicas, and Envoy's protocol driven with Envoy's own
//! client types (envoy-types): rule matching, per-tenant limits from plans, overrides, hits_addend, shadow
//! mode, headers, a rule changed while serving, and UNAVAILABLE while the database is down.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use allowance::clock::ManualClock;
use allowance::grpc::pb::{
    self, admin_service_client::AdminServiceClient, rate_limit_service_client::RateLimitServiceClient,
};
use allowance::storage::postgres::PgStore;
use chrono::TimeDelta;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient as EnvoyClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use sqlx::PgPool;
use tokio::task::JoinSet;

use crate::helpers::{Proxy, TestServer, channel, epoch, second_pool, upstream};

fn rolling(seconds: i64) -> pb::Period {
    pb::Period { kind: Some(pb::period::Kind::Rolling(prost_types::Duration { seconds, nanos: 0 })) }
}

fn rate(name: &str, amount: i64, seconds: i64, burst: i64) -> pb::Limit {
    pb::Limit { name: name.into(), period: Some(rolling(seconds)), amount: Some(amount), burst: Some(burst) }
}

async fn put_limit(ch: &tonic::transport::Channel, key: &str, limit: pb::Limit) {
    allowance::grpc::pb::spending_limits_client::SpendingLimitsClient::new(ch.clone())
        .put_limit(pb::PutLimitRequest { key_id: key.into(), unit: "requests".into(), limit: Some(limit) })
        .await
        .unwrap();
}

async fn check(
    c: &mut RateLimitServiceClient<tonic::transport::Channel>,
    key: &str,
    cost: Option<i64>,
) -> pb::CheckRateResponse {
    c.check_rate(pb::CheckRateRequest {
        key_id: key.into(),
        unit: "requests".into(),
        cost,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn check_rate_answers_remaining_retry_and_reset_and_refuses_a_cost_above_the_burst(pool: PgPool) {
    let clock = ManualClock::new(epoch());
    let s = TestServer::on(&pool, &clock).await;
    let ch = channel(s.addr).await;
    put_limit(&ch, "k", rate("api", 10, 60, 5)).await;
    let mut c = RateLimitServiceClient::new(ch.clone());
    for i in 0..5 {
        let r = check(&mut c, "k", None).await;
        assert!(r.allowed, "request {i}");
        assert_eq!(r.limits[0].remaining, 4 - i);
    }
    let denied = check(&mut c, "k", None).await;
    assert!(!denied.allowed);
    // 10 per minute: one every 6 s.
    assert_eq!(denied.retry_after, Some(prost_types::Duration { seconds: 6, nanos: 0 }));
    assert_eq!(denied.limits[0].reset_after, Some(prost_types::Duration { seconds: 30, nanos: 0 }));
    let peek = check(&mut c, "k", Some(0)).await;
    assert!(peek.allowed && peek.limits[0].remaining == 0, "cost 0 checks without counting");
    let too_big = check(&mut c, "k", Some(6)).await;
    assert!(!too_big.allowed && too_big.limits[0].cost_exceeds_burst && too_big.retry_after.is_none());
    clock.advance(TimeDelta::seconds(6));
    assert!(check(&mut c, "k", None).await.allowed);
    assert!(!check(&mut c, "k", None).await.allowed);
    // A key without rate limits is not limited; spending limits are not rate limits.
    assert!(check(&mut c, "other", None).await.allowed);
    let bad = c
        .check_rate(pb::CheckRateRequest { key_id: "k".into(), cost: Some(-1), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    s.stop().await.unwrap();
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn two_replicas_together_never_admit_more_than_the_limit(pool: PgPool) {
    // The clock stands still: nothing refills, so exactly the burst is admitted per key.
    let clock = ManualClock::new(epoch());
    let a = TestServer::on(&pool, &clock).await;
    // A second replica, on a pool of its own.
    let b = TestServer::start(PgStore::new(second_pool(&pool, 8).await), Arc::new(clock.clone())).await;
    let ch = channel(a.addr).await;
    put_limit(&ch, "hot", rate("api", 100, 3600, 100)).await;
    for k in 0..20 {
        put_limit(&ch, &format!("k{k}"), rate("api", 7, 3600, 7)).await;
    }
    let mut tasks = JoinSet::new();
    for client in 0..64 {
        let addr = if client % 2 == 0 { a.addr } else { b.addr };
        tasks.spawn(async move {
            let mut c = RateLimitServiceClient::new(channel(addr).await);
            let mut admitted: HashMap<String, u32> = HashMap::new();
            for i in 0..12 {
                let key = if i % 2 == 0 { "hot".to_owned() } else { format!("k{}", (client + i) % 20) };
                if check(&mut c, &key, None).await.allowed {
                    *admitted.entry(key).or_default() += 1;
                }
            }
            admitted
        });
    }
    let mut total: HashMap<String, u32> = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        for (k, n) in r.unwrap() {
            *total.entry(k).or_default() += n;
        }
    }
    // 64 × 6 = 384 tries on the hot key; 64 × 6 = 384 spread over 20 keys (about 19 each).
    assert_eq!(total["hot"], 100);
    for k in 0..20 {
        assert_eq!(total.get(&format!("k{k}")).copied().unwrap_or(0), 7, "k{k}");
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| rate_limit_descriptor::Entry { key: k.to_string(), value: v.to_string() })
            .collect(),
        ..Default::default()
    }
}

async fn should(
    c: &mut EnvoyClient<tonic::transport::Channel>,
    descriptors: Vec<RateLimitDescriptor>,
) -> RateLimitResponse {
    c.should_rate_limit(RateLimitRequest { domain: "edge".into(), descriptors, hits_addend: 0 })
        .await
        .unwrap()
        .into_inner()
}

fn headers(r: &RateLimitResponse) -> HashMap<String, String> {
    r.response_headers_to_add.iter().map(|h| (h.key.clone(), h.value.clone())).collect()
}

fn rule(
    name: &str,
    pattern: &[(&str, Option<&str>)],
    template: &str,
    default: Option<pb::Limit>,
    shadow: bool,
) -> pb::PutRateLimitRuleRequest {
    pb::PutRateLimitRuleRequest {
        rule: Some(pb::RateLimitRule {
            name: name.into(),
            domain: "edge".into(),
            pattern: pattern
                .iter()
                .map(|(k, v)| pb::DescriptorPattern { key: k.to_string(), value: v.map(str::to_owned) })
                .collect(),
            key_template: template.into(),
            unit: "requests".into(),
            limit_name: "api".into(),
            default_limit: default,
            shadow,
        }),
    }
}

fn code(r: &RateLimitResponse) -> Code {
    Code::try_from(r.overall_code).unwrap()
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn envoy_should_rate_limit_with_rules_from_the_database(pool: PgPool) {
    let clock = ManualClock::new(epoch());
    let s = TestServer::on(&pool, &clock).await;
    let ch = channel(s.addr).await;
    let mut admin = AdminServiceClient::new(ch.clone());
    admin
        .put_rate_limit_rule(rule(
            "per-key",
            &[("api_key", None)],
            "key/{api_key}",
            Some(rate("x", 3, 60, 3)),
            false,
        ))
        .await
        .unwrap();
    admin
        .put_rate_limit_rule(rule(
            "vip",
            &[("api_key", Some("vip"))],
            "vip",
            Some(rate("x", 100, 60, 100)),
            false,
        ))
        .await
        .unwrap();
    admin
        .put_rate_limit_rule(rule("paths", &[("path", None)], "path{path}", Some(rate("x", 1, 60, 1)), true))
        .await
        .unwrap();
    // A tenant on a plan gets the plan's limit of the rule's name, not the rule's default.
    allowance::grpc::pb::spending_limits_client::SpendingLimitsClient::new(ch.clone())
        .put_plan(pb::PutPlanRequest {
            name: "pro".into(),
            limits: vec![pb::PlanLimit {
                unit: "requests".into(),
                name: "api".into(),
                period: Some(rolling(60)),
                amount: 5,
                burst: Some(5),
            }],
        })
        .await
        .unwrap();
    allowance::grpc::pb::spending_limits_client::SpendingLimitsClient::new(ch.clone())
        .assign_plan(pb::AssignPlanRequest { key_id: "key/pro-1".into(), plan: "pro".into() })
        .await
        .unwrap();
    let mut envoy = EnvoyClient::new(ch.clone());

    for _ in 0..3 {
        assert_eq!(code(&should(&mut envoy, vec![descriptor(&[("api_key", "k1")])]).await), Code::Ok);
    }
    let over = should(&mut envoy, vec![descriptor(&[("api_key", "k1")])]).await;
    assert_eq!(code(&over), Code::OverLimit);
    let st = &over.statuses[0];
    assert_eq!((Code::try_from(st.code).unwrap(), st.limit_remaining), (Code::OverLimit, 0));
    let current = st.current_limit.as_ref().unwrap();
    assert_eq!((current.name.as_str(), current.requests_per_unit), ("per-key", 3));
    let h = headers(&over);
    assert_eq!(h["RateLimit-Limit"], "3");
    assert_eq!(h["RateLimit-Remaining"], "0");
    assert_eq!(h["RateLimit-Reset"], "60");
    assert_eq!(h["Retry-After"], "20", "3 a minute: one every 20 s");

    // A descriptor's hits_addend of 0 checks without counting.
    clock.advance(TimeDelta::seconds(20));
    let mut peek = descriptor(&[("api_key", "k1")]);
    peek.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 0 });
    let peeked = should(&mut envoy, vec![peek]).await;
    assert_eq!((code(&peeked), peeked.statuses[0].limit_remaining), (Code::Ok, 1));
    assert_eq!(code(&should(&mut envoy, vec![descriptor(&[("api_key", "k1")])]).await), Code::Ok);
    assert_eq!(code(&should(&mut envoy, vec![descriptor(&[("api_key", "k1")])]).await), Code::OverLimit);

    // The most specific rule wins; the plan's limit applies to its tenant.
    for _ in 0..10 {
        assert_eq!(code(&should(&mut envoy, vec![descriptor(&[("api_key", "vip")])]).await), Code::Ok);
    }
    let pro: Vec<Code> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(code(&should(&mut envoy, vec![descriptor(&[("api_key", "pro-1")])]).await));
        }
        v
    };
    assert_eq!(pro, [Code::Ok, Code::Ok, Code::Ok, Code::Ok, Code::Ok, Code::OverLimit]);

    // Shadow mode counts and reports, never denies; an unmatched descriptor is not limited.
    for _ in 0..3 {
        let r = should(&mut envoy, vec![descriptor(&[("path", "/pay")]), descriptor(&[("user", "u")])]).await;
        assert_eq!(code(&r), Code::Ok);
        assert!(r.statuses[1].current_limit.is_none());
    }

    // A descriptor's own limit overrides: MONTH is a real calendar month.
    let mut monthly = descriptor(&[("api_key", "m1")]);
    monthly.limit = Some(rate_limit_descriptor::RateLimitOverride { requests_per_unit: 2, unit: 5 });
    for want in [Code::Ok, Code::Ok, Code::OverLimit] {
        let r = should(&mut envoy, vec![monthly.clone()]).await;
        assert_eq!(code(&r), want);
    }
    let r = should(&mut envoy, vec![monthly.clone()]).await;
    // epoch() + 20 s is 2030-01-01T00:00:20Z: January has 31 days.
    assert_eq!(r.statuses[0].duration_until_reset.as_ref().unwrap().seconds, 31 * 86_400 - 20);
    assert_eq!(r.statuses[0].current_limit.as_ref().unwrap().unit, 5);
    assert_eq!(headers(&r)["Retry-After"], (31 * 86_400 - 20).to_string());

    // A request no wait would admit (hits above the burst) is over the limit with no Retry-After: "0" would
    // have the client retry at once, for ever. Beside a descriptor that admits, it still drives the headers.
    let mut huge = descriptor(&[("api_key", "k4")]);
    huge.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 4 });
    let never = should(&mut envoy, vec![descriptor(&[("api_key", "vip")]), huge]).await;
    assert_eq!(code(&never), Code::OverLimit);
    let h = headers(&never);
    assert!(!h.contains_key("Retry-After"), "{h:?}");
    assert_eq!((h["RateLimit-Limit"].as_str(), h["RateLimit-Remaining"].as_str()), ("3", "3"));

    // Denied requests count against none of their descriptors.
    let both =
        should(&mut envoy, vec![descriptor(&[("api_key", "k2")]), descriptor(&[("api_key", "k1")])]).await;
    assert_eq!(code(&both), Code::OverLimit);
    let k2 = should(&mut envoy, vec![descriptor(&[("api_key", "k2")])]).await;
    assert_eq!(k2.statuses[0].limit_remaining, 2, "k2's first counted hit: the denied request counted none");

    // A rule changed while serving applies at once.
    admin
        .put_rate_limit_rule(rule(
            "per-key",
            &[("api_key", None)],
            "key/{api_key}",
            Some(rate("x", 1, 60, 1)),
            false,
        ))
        .await
        .unwrap();
    assert_eq!(code(&should(&mut envoy, vec![descriptor(&[("api_key", "k3")])]).await), Code::Ok);
    assert_eq!(code(&should(&mut envoy, vec![descriptor(&[("api_key", "k3")])]).await), Code::OverLimit);
    admin.delete_rate_limit_rule(pb::DeleteRateLimitRuleRequest { name: "per-key".into() }).await.unwrap();
    assert_eq!(code(&should(&mut envoy, vec![descriptor(&[("api_key", "k3")])]).await), Code::Ok);
    let gone = admin
        .delete_rate_limit_rule(pb::DeleteRateLimitRuleRequest { name: "per-key".into() })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);

    let bad = admin
        .put_rate_limit_rule(rule("bad", &[("api_key", None)], "{user}", None, false))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("key_template"), "{}", bad.message());
    let empty = envoy.should_rate_limit(RateLimitRequest::default()).await.unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    let many = RateLimitRequest {
        domain: "edge".into(),
        descriptors: vec![descriptor(&[("api_key", "k9")]); 65],
        hits_addend: 0,
    };
    let flood = envoy.should_rate_limit(many).await.unwrap_err();
    assert_eq!((flood.code(), flood.message().contains("descriptors")), (tonic::Code::InvalidArgument, true));
    s.stop().await.unwrap();
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn envoy_is_answered_unavailable_while_the_database_is_down(pool: PgPool) {
    let clock = ManualClock::new(epoch());
    let proxy = Proxy::start(upstream(&pool)).await;
    let s = TestServer::start(PgStore::new(proxy.pool_for(&pool)), Arc::new(clock)).await;
    let ch = channel(s.addr).await;
    AdminServiceClient::new(ch.clone())
        .put_rate_limit_rule(rule(
            "per-key",
            &[("api_key", None)],
            "{api_key}",
            Some(rate("x", 5, 60, 5)),
            false,
        ))
        .await
        .unwrap();
    let mut envoy = EnvoyClient::new(ch.clone());
    assert_eq!(code(&should(&mut envoy, vec![descriptor(&[("api_key", "k")])]).await), Code::Ok);
    proxy.set_up(false);
    let down = envoy
        .should_rate_limit(RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![descriptor(&[("api_key", "k")])],
            hits_addend: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(down.code(), tonic::Code::Unavailable, "the gateway's failure mode applies");
    proxy.set_up(true);
    let mut ok = false;
    for _ in 0..100 {
        if let Ok(r) = envoy
            .should_rate_limit(RateLimitRequest {
                domain: "edge".into(),
                descriptors: vec![descriptor(&[("api_key", "k")])],
                hits_addend: 0,
            })
            .await
        {
            ok = code(&r.into_inner()) == Code::Ok;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "answers again once the database is back");
    s.stop().await.unwrap();
}

/// A state stored before refills were bounded may lie past year 9999 (a burst of a billion at 1 per 400 days):
/// its key is still checked, and so are the other keys of its batch.
#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn a_state_far_in_the_future_is_read_and_decided(pool: PgPool) {
    let clock = ManualClock::new(epoch());
    let s = TestServer::on(&pool, &clock).await;
    let ch = channel(s.addr).await;
    // Refused when set now.
    let refused = allowance::grpc::pb::spending_limits_client::SpendingLimitsClient::new(ch.clone())
        .put_limit(pb::PutLimitRequest {
            key_id: "wedged".into(),
            unit: "requests".into(),
            limit: Some(rate("api", 1, 400 * 86_400, 1_000_000_000)),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("36525 days"), "{}", refused.message());
    // As stored by an earlier release, whose arithmetic saturated at chrono's last instant.
    put_limit(&ch, "wedged", rate("api", 1, 400 * 86_400, 10)).await;
    sqlx::query(
        "UPDATE accounts SET limits = jsonb_set(limits, '{0,burst}', '1000000000') WHERE key_id = 'wedged'",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO rate_states (key_id, unit, name, tat)
         VALUES ('wedged', 'requests', 'api', '262142-12-31 23:59:59.999999+00')",
    )
    .execute(&pool)
    .await
    .unwrap();
    put_limit(&ch, "fine", rate("api", 10, 60, 10)).await;
    let mut c = RateLimitServiceClient::new(ch.clone());
    // Answered (not UNAVAILABLE) with the limit's decision; what it decides is that absurd limit's business.
    let answered = check(&mut c, "wedged", None).await;
    assert_eq!(answered.limits.len(), 1);
    let tat: String = sqlx::query_scalar("SELECT tat::text FROM rate_states WHERE key_id = 'wedged'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(tat.starts_with("9999-12-31") || tat.starts_with("262142-"), "{tat}");
    // Both keys in one request, so in one batch: the sound key is decided too.
    let both = c
        .check_rate(pb::CheckRateRequest {
            key_id: "fine".into(),
            unit: "requests".into(),
            additional_key_ids: vec!["wedged".into()],
            cost: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(both.limits.len(), 2);
    assert!(check(&mut c, "fine", None).await.allowed);
    s.stop().await.unwrap();
}
