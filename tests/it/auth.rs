//! Callers and scopes over gRPC against the real server with authentication on: every RPC against every kind
//! of credential, revocation on a second replica, rotation, the audit trail and request ids.

use std::sync::Arc;
use std::time::{Duration, Instant};

use allowance::app::Allowance;
use allowance::clock::ManualClock;
use allowance::domain::{Actor, CallerName, KeyPrefixes, Scope, parse_scopes};
use allowance::grpc::pb::{
    self, admin_service_client::AdminServiceClient, rate_limit_service_client::RateLimitServiceClient,
    spending_limits_client::SpendingLimitsClient,
};
use allowance::storage::postgres::PgStore;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient as EnvoyClient;
use sqlx::PgPool;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::helpers::{TestServer, channel, epoch};

const REFRESH: Duration = Duration::from_millis(100);
const KEY: &str = "tenant-a/k";

/// A request from `credential` with the request id `id`.
fn with_id<T>(credential: &str, msg: T, id: &str) -> tonic::Request<T> {
    let mut r = req(msg, Some(credential));
    r.metadata_mut().insert("x-request-id", id.parse().unwrap());
    r
}

fn req<T>(msg: T, credential: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(c) = credential {
        r.metadata_mut().insert("authorization", format!("Bearer {c}").parse().unwrap());
    }
    r
}

/// The first admin, made against the database as `allowance callers create --database-url` does.
async fn bootstrap(pool: &PgPool, clock: &ManualClock, scopes: &[Scope], prefixes: &[&str]) -> String {
    let app = Allowance::new(Arc::new(PgStore::new(pool.clone())), Arc::new(clock.clone()));
    let prefixes = KeyPrefixes::parse(prefixes.iter().map(|p| p.to_string()).collect()).unwrap();
    let by = Actor::anonymous("test-bootstrap", "");
    let issued = app
        .create_caller(
            CallerName::parse("root").unwrap(),
            parse_scopes(scopes.iter().copied()).unwrap(),
            prefixes,
            &by,
        )
        .await
        .unwrap();
    issued.credential
}

/// Polls until `credential` is accepted (Ok) or refused as unauthenticated (Err), or `deadline` passes.
async fn wait_for(ch: &Channel, credential: &str, accepted: bool, deadline: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let r = AdminServiceClient::new(ch.clone())
            .list_callers(req(pb::ListCallersRequest {}, Some(credential)))
            .await;
        let is_accepted = match &r {
            Ok(_) => true,
            Err(s) if s.code() == Code::Unauthenticated => false,
            // Before the replica's first read of the callers table.
            Err(s) if s.code() == Code::Unavailable && accepted => false,
            Err(s) => panic!("unexpected {s:?}"),
        };
        if is_accepted == accepted {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < deadline,
            "credential still {} after {deadline:?}",
            if accepted { "refused" } else { "accepted" }
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn create(
    ch: &Channel,
    admin: &str,
    name: &str,
    scopes: &[pb::Scope],
    prefixes: &[&str],
) -> pb::CreateCallerResponse {
    AdminServiceClient::new(ch.clone())
        .create_caller(req(
            pb::CreateCallerRequest {
                name: name.into(),
                scopes: scopes.iter().map(|s| *s as i32).collect(),
                key_prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            },
            Some(admin),
        ))
        .await
        .unwrap()
        .into_inner()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    ReserveSpending,
    Commit,
    Reverse,
    GetLimits,
    GetTransaction,
    ListTransactions,
    SetLimit,
    RemoveLimit,
    PutLimit,
    DeleteLimit,
    PutPlan,
    GetPlan,
    ListPlans,
    DeletePlan,
    AssignPlan,
    CreateCaller,
    ListCallers,
    RotateCaller,
    RevokeCaller,
    ListAuditEvents,
    PutRateLimitRule,
    ListRateLimitRules,
    DeleteRateLimitRule,
    CheckRate,
    ShouldRateLimit,
}

impl Rpc {
    const ALL: [Rpc; 25] = [
        Rpc::ReserveSpending,
        Rpc::Commit,
        Rpc::Reverse,
        Rpc::GetLimits,
        Rpc::GetTransaction,
        Rpc::ListTransactions,
        Rpc::SetLimit,
        Rpc::RemoveLimit,
        Rpc::PutLimit,
        Rpc::DeleteLimit,
        Rpc::PutPlan,
        Rpc::GetPlan,
        Rpc::ListPlans,
        Rpc::DeletePlan,
        Rpc::AssignPlan,
        Rpc::CreateCaller,
        Rpc::ListCallers,
        Rpc::RotateCaller,
        Rpc::RevokeCaller,
        Rpc::ListAuditEvents,
        Rpc::PutRateLimitRule,
        Rpc::ListRateLimitRules,
        Rpc::DeleteRateLimitRule,
        Rpc::CheckRate,
        Rpc::ShouldRateLimit,
    ];

    fn scope(self) -> pb::Scope {
        use Rpc::*;
        match self {
            ReserveSpending | Commit | Reverse => pb::Scope::Spend,
            GetLimits | GetTransaction | ListTransactions => pb::Scope::Read,
            CheckRate | ShouldRateLimit => pb::Scope::Ratelimit,
            _ => pb::Scope::Admin,
        }
    }

    /// How a caller holding every scope but confined to another tenant's keys is answered.
    fn other_tenant(self) -> Code {
        use Rpc::*;
        match self {
            // Named by transaction id: as if it did not exist.
            Commit | Reverse | GetTransaction => Code::NotFound,
            // Plans are read by every tenant.
            GetPlan | ListPlans => Code::Ok,
            _ => Code::PermissionDenied,
        }
    }
}

/// What the right-scope calls act on, set up by the root caller.
struct Targets {
    rotate_victim: String,
    revoke_victim: String,
}

async fn invoke(ch: &Channel, rpc: Rpc, cred: Option<&str>, t: &Targets) -> Result<(), Status> {
    let mut s = SpendingLimitsClient::new(ch.clone());
    let mut a = AdminServiceClient::new(ch.clone());
    let tx = |id: &str| id.to_owned();
    let limit = pb::Limit {
        name: "lim".into(),
        amount: Some(10),
        period: Some(pb::Period {
            kind: Some(pb::period::Kind::Rolling(prost_types::Duration { seconds: 60, nanos: 0 })),
        }),
        burst: None,
    };
    match rpc {
        Rpc::ReserveSpending => s.reserve_spending(req(reserve(KEY, "tx-new"), cred)).await.map(drop),
        Rpc::Commit => s
            .commit(req(pb::CommitRequest { transaction_id: tx("tx-commit"), amount: None }, cred))
            .await
            .map(drop),
        Rpc::Reverse => {
            s.reverse(req(pb::ReverseRequest { transaction_id: tx("tx-reverse") }, cred)).await.map(drop)
        }
        Rpc::GetLimits => s
            .get_limits(req(pb::GetLimitsRequest { key_id: KEY.into(), unit: "usd".into() }, cred))
            .await
            .map(drop),
        Rpc::GetTransaction => s
            .get_transaction(req(pb::GetTransactionRequest { transaction_id: tx("tx-get") }, cred))
            .await
            .map(drop),
        Rpc::ListTransactions => s
            .list_transactions(req(
                pb::ListTransactionsRequest { key_id: KEY.into(), unit: "usd".into(), ..Default::default() },
                cred,
            ))
            .await
            .map(drop),
        Rpc::SetLimit => s
            .set_limit(req(
                pb::SetLimitRequest {
                    key_id: KEY.into(),
                    unit: "usd".into(),
                    window: pb::Window::Daily.into(),
                    limit: 500,
                },
                cred,
            ))
            .await
            .map(drop),
        Rpc::RemoveLimit => s
            .remove_limit(req(
                pb::RemoveLimitRequest {
                    key_id: KEY.into(),
                    unit: "usd".into(),
                    window: pb::Window::Daily.into(),
                },
                cred,
            ))
            .await
            .map(drop),
        Rpc::PutLimit => s
            .put_limit(req(
                pb::PutLimitRequest { key_id: KEY.into(), unit: "usd".into(), limit: Some(limit) },
                cred,
            ))
            .await
            .map(drop),
        Rpc::DeleteLimit => s
            .delete_limit(req(
                pb::DeleteLimitRequest { key_id: KEY.into(), unit: "usd".into(), name: "lim".into() },
                cred,
            ))
            .await
            .map(drop),
        Rpc::PutPlan => s.put_plan(req(plan("p-new"), cred)).await.map(drop),
        Rpc::GetPlan => s.get_plan(req(pb::GetPlanRequest { name: "p-keep".into() }, cred)).await.map(drop),
        Rpc::ListPlans => s.list_plans(req(pb::ListPlansRequest {}, cred)).await.map(drop),
        Rpc::DeletePlan => {
            s.delete_plan(req(pb::DeletePlanRequest { name: "p-del".into() }, cred)).await.map(drop)
        }
        Rpc::AssignPlan => s
            .assign_plan(req(pb::AssignPlanRequest { key_id: KEY.into(), plan: "p-keep".into() }, cred))
            .await
            .map(drop),
        Rpc::CreateCaller => a
            .create_caller(req(
                pb::CreateCallerRequest {
                    name: "new".into(),
                    scopes: vec![pb::Scope::Read.into()],
                    key_prefixes: vec![],
                },
                cred,
            ))
            .await
            .map(drop),
        Rpc::ListCallers => a.list_callers(req(pb::ListCallersRequest {}, cred)).await.map(drop),
        Rpc::RotateCaller => a
            .rotate_caller(req(pb::RotateCallerRequest { id: t.rotate_victim.clone() }, cred))
            .await
            .map(drop),
        Rpc::RevokeCaller => a
            .revoke_caller(req(
                pb::RevokeCallerRequest { id: t.revoke_victim.clone(), previous_secret_only: false },
                cred,
            ))
            .await
            .map(drop),
        Rpc::ListAuditEvents => {
            a.list_audit_events(req(pb::ListAuditEventsRequest::default(), cred)).await.map(drop)
        }
        Rpc::PutRateLimitRule => a.put_rate_limit_rule(req(matrix_rule("new-rule"), cred)).await.map(drop),
        Rpc::ListRateLimitRules => {
            a.list_rate_limit_rules(req(pb::ListRateLimitRulesRequest {}, cred)).await.map(drop)
        }
        Rpc::DeleteRateLimitRule => a
            .delete_rate_limit_rule(req(pb::DeleteRateLimitRuleRequest { name: "doomed".into() }, cred))
            .await
            .map(drop),
        Rpc::CheckRate => RateLimitServiceClient::new(ch.clone())
            .check_rate(req(pb::CheckRateRequest { key_id: KEY.into(), ..Default::default() }, cred))
            .await
            .map(drop),
        Rpc::ShouldRateLimit => {
            let descriptor = RateLimitDescriptor {
                entries: vec![rate_limit_descriptor::Entry { key: "api_key".into(), value: "k".into() }],
                ..Default::default()
            };
            let request =
                RateLimitRequest { domain: "matrix".into(), descriptors: vec![descriptor], hits_addend: 0 };
            EnvoyClient::new(ch.clone()).should_rate_limit(req(request, cred)).await.map(drop)
        }
    }
}

fn reserve(key: &str, tx: &str) -> pb::ReserveSpendingRequest {
    pb::ReserveSpendingRequest {
        key_id: key.into(),
        unit: "usd".into(),
        transaction_id: tx.into(),
        amount: 5,
        ..Default::default()
    }
}

/// A rule counting domain `matrix`'s api_key descriptors against tenant A's keys.
fn matrix_rule(name: &str) -> pb::PutRateLimitRuleRequest {
    pb::PutRateLimitRuleRequest {
        rule: Some(pb::RateLimitRule {
            name: name.into(),
            domain: "matrix".into(),
            pattern: vec![pb::DescriptorPattern { key: "api_key".into(), value: None }],
            key_template: "tenant-a/{api_key}".into(),
            unit: "requests".into(),
            limit_name: "api".into(),
            default_limit: None,
            shadow: false,
        }),
    }
}

fn plan(name: &str) -> pb::PutPlanRequest {
    pb::PutPlanRequest {
        name: name.into(),
        limits: vec![pb::PlanLimit {
            unit: "usd".into(),
            name: "daily".into(),
            amount: 100,
            period: Some(pb::Period {
                kind: Some(pb::period::Kind::Rolling(prost_types::Duration { seconds: 86_400, nanos: 0 })),
            }),
            burst: None,
        }],
    }
}

fn others(scope: pb::Scope) -> Vec<pb::Scope> {
    ALL_SCOPES.into_iter().filter(|s| *s != scope).collect()
}

const ALL_SCOPES: [pb::Scope; 4] =
    [pb::Scope::Spend, pb::Scope::Read, pb::Scope::Admin, pb::Scope::Ratelimit];

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn every_rpc_against_every_kind_of_credential(pool: PgPool) {
    let clock = ManualClock::new(epoch());
    let root = bootstrap(&pool, &clock, &[Scope::Spend, Scope::Read, Scope::Admin], &[]).await;
    let server = TestServer::authenticated(&pool, &clock, REFRESH).await;
    let ch = channel(server.addr).await;
    wait_for(&ch, &root, true, Duration::from_secs(5)).await;

    // What the calls act on.
    let mut s = SpendingLimitsClient::new(ch.clone());
    for id in ["tx-commit", "tx-reverse", "tx-get"] {
        assert!(s.reserve_spending(req(reserve(KEY, id), Some(&root))).await.unwrap().into_inner().allowed);
    }
    s.put_plan(req(plan("p-keep"), Some(&root))).await.unwrap();
    let mut admin = AdminServiceClient::new(ch.clone());
    admin.put_rate_limit_rule(req(matrix_rule("matrix"), Some(&root))).await.unwrap();
    admin.put_rate_limit_rule(req(matrix_rule("doomed"), Some(&root))).await.unwrap();
    s.put_plan(req(plan("p-del"), Some(&root))).await.unwrap();
    let targets = Targets {
        rotate_victim: create(&ch, &root, "rotate-me", &[pb::Scope::Read], &[]).await.caller.unwrap().id,
        revoke_victim: create(&ch, &root, "revoke-me", &[pb::Scope::Read], &[]).await.caller.unwrap().id,
    };
    let revoked = create(&ch, &root, "revoked", &ALL_SCOPES, &[]).await;
    AdminServiceClient::new(ch.clone())
        .revoke_caller(req(
            pb::RevokeCallerRequest { id: revoked.caller.unwrap().id, previous_secret_only: false },
            Some(&root),
        ))
        .await
        .unwrap();
    let other_tenant = create(&ch, &root, "tenant-b", &ALL_SCOPES, &["tenant-b/"]).await.credential;
    let root_id = root.split(':').next().unwrap();
    let wrong_secret = format!("{root_id}:{}", "0".repeat(64));
    let mut secrets = vec![root.clone(), revoked.credential.clone(), other_tenant.clone()];

    for rpc in Rpc::ALL {
        let scope = rpc.scope();
        let missing = create(&ch, &root, "missing", &others(scope), &[]).await.credential;
        let right = create(&ch, &root, "right", &[scope], &[]).await.credential;
        secrets.extend([missing.clone(), right.clone()]);
        let cases: [(&str, Option<&str>, Code); 5] = [
            ("no credential", None, Code::Unauthenticated),
            ("wrong secret", Some(&wrong_secret), Code::Unauthenticated),
            ("revoked", Some(&revoked.credential), Code::Unauthenticated),
            ("missing scope", Some(&missing), Code::PermissionDenied),
            ("other tenant", Some(&other_tenant), rpc.other_tenant()),
        ];
        for (case, cred, want) in cases {
            let got = invoke(&ch, rpc, cred, &targets).await;
            let code = got.as_ref().map_or_else(Status::code, |_| Code::Ok);
            assert_eq!(code, want, "{rpc:?} with {case}: {got:?}");
            if let Err(status) = &got {
                for secret in &secrets {
                    let secret = secret.split(':').nth(1).unwrap();
                    assert!(!status.message().contains(secret), "{rpc:?} with {case} leaks a secret");
                }
                if case == "missing scope" {
                    let name = scope.as_str_name().trim_start_matches("SCOPE_").to_lowercase();
                    assert!(status.message().contains(&format!("`{name}`")), "{rpc:?}: {}", status.message());
                }
            }
        }
        // Nothing a refused call named changed: the transactions are as set up.
        if matches!(rpc, Rpc::Commit | Rpc::Reverse) {
            let id = if rpc == Rpc::Commit { "tx-commit" } else { "tx-reverse" };
            let t = s
                .get_transaction(req(pb::GetTransactionRequest { transaction_id: id.into() }, Some(&root)))
                .await
                .unwrap();
            assert_eq!(t.into_inner().state(), pb::TransactionState::Held, "{rpc:?}");
        }
        let got = invoke(&ch, rpc, Some(&right), &targets).await;
        assert!(got.is_ok(), "{rpc:?} with the right scope: {got:?}");
    }

    // Probes need no credential.
    let health = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await;
    assert!(health.is_ok());
    server.stop().await.unwrap();
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn a_revocation_reaches_a_second_replica_within_its_refresh_interval(pool: PgPool) {
    let clock = ManualClock::new(epoch());
    let root = bootstrap(&pool, &clock, &[Scope::Admin], &[]).await;
    let a = TestServer::authenticated(&pool, &clock, REFRESH).await;
    let b = TestServer::authenticated(&pool, &clock, REFRESH).await;
    let (cha, chb) = (channel(a.addr).await, channel(b.addr).await);
    wait_for(&cha, &root, true, Duration::from_secs(5)).await;
    wait_for(&chb, &root, true, Duration::from_secs(5)).await;

    // Made on replica A: usable there at once, and on B after B's next refresh.
    let svc = create(&cha, &root, "svc", &[pb::Scope::Admin], &[]).await;
    wait_for(&cha, &svc.credential, true, Duration::ZERO).await;
    wait_for(&chb, &svc.credential, true, REFRESH * 10).await;

    AdminServiceClient::new(cha.clone())
        .revoke_caller(req(
            pb::RevokeCallerRequest { id: svc.caller.unwrap().id, previous_secret_only: false },
            Some(&root),
        ))
        .await
        .unwrap();
    wait_for(&cha, &svc.credential, false, Duration::ZERO).await;
    // The documented bound is the refresh interval (plus the re-read itself); generous here for a busy machine.
    wait_for(&chb, &svc.credential, false, REFRESH * 10).await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn a_rotation_keeps_both_secrets_until_the_previous_one_is_revoked(pool: PgPool) {
    let clock = ManualClock::new(epoch());
    let root = bootstrap(&pool, &clock, &[Scope::Admin], &[]).await;
    let server = TestServer::authenticated(&pool, &clock, REFRESH).await;
    let ch = channel(server.addr).await;
    wait_for(&ch, &root, true, Duration::from_secs(5)).await;
    let old = create(&ch, &root, "svc", &[pb::Scope::Admin], &[]).await;
    let id = old.caller.unwrap().id;
    let mut admin = AdminServiceClient::new(ch.clone());

    let rotated = admin
        .rotate_caller(req(pb::RotateCallerRequest { id: id.clone() }, Some(&root)))
        .await
        .unwrap()
        .into_inner();
    assert!(rotated.caller.unwrap().has_previous_secret);
    assert_ne!(rotated.credential, old.credential);
    assert!(rotated.credential.starts_with(&id));
    wait_for(&ch, &old.credential, true, Duration::ZERO).await;
    wait_for(&ch, &rotated.credential, true, Duration::ZERO).await;

    // A second rotation would leave three secrets alive: refused until the previous one is revoked.
    let again =
        admin.rotate_caller(req(pb::RotateCallerRequest { id: id.clone() }, Some(&root))).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);

    admin
        .revoke_caller(req(
            pb::RevokeCallerRequest { id: id.clone(), previous_secret_only: true },
            Some(&rotated.credential),
        ))
        .await
        .unwrap();
    wait_for(&ch, &old.credential, false, Duration::ZERO).await;
    wait_for(&ch, &rotated.credential, true, Duration::ZERO).await;

    let unknown = uuid::Uuid::new_v4().to_string();
    let missing =
        admin.rotate_caller(req(pb::RotateCallerRequest { id: unknown }, Some(&root))).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let bad = admin
        .rotate_caller(req(pb::RotateCallerRequest { id: "nope".into() }, Some(&root)))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    server.stop().await.unwrap();
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn changes_are_audited_with_who_when_the_request_id_and_the_values(pool: PgPool) {
    let clock = ManualClock::new(epoch());
    let root = bootstrap(&pool, &clock, &[Scope::Admin, Scope::Spend], &[]).await;
    let server = TestServer::authenticated(&pool, &clock, REFRESH).await;
    let ch = channel(server.addr).await;
    wait_for(&ch, &root, true, Duration::from_secs(5)).await;
    let root_id = root.split(':').next().unwrap().to_owned();
    let mut s = SpendingLimitsClient::new(ch.clone());

    let set = s
        .set_limit(with_id(
            &root,
            pb::SetLimitRequest {
                key_id: "k".into(),
                unit: "usd".into(),
                window: pb::Window::Daily.into(),
                limit: 100,
            },
            "req-set",
        ))
        .await
        .unwrap();
    assert_eq!(set.metadata().get("x-request-id").unwrap(), "req-set", "the request id comes back");
    s.set_limit(with_id(
        &root,
        pb::SetLimitRequest {
            key_id: "k".into(),
            unit: "usd".into(),
            window: pb::Window::Daily.into(),
            limit: 200,
        },
        "req-raise",
    ))
    .await
    .unwrap();
    s.reserve_spending(req(reserve("k", "t1"), Some(&root))).await.unwrap();
    s.reverse(with_id(&root, pb::ReverseRequest { transaction_id: "t1".into() }, "req-reverse"))
        .await
        .unwrap();
    s.put_plan(with_id(&root, plan("free"), "req-plan")).await.unwrap();
    s.assign_plan(with_id(
        &root,
        pb::AssignPlanRequest { key_id: "k".into(), plan: "free".into() },
        "req-assign",
    ))
    .await
    .unwrap();
    // A refused call is not a change.
    let refused = s.reverse(req(pb::ReverseRequest { transaction_id: "t1".into() }, None)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.metadata().get("x-request-id").is_some(), "errors carry a request id too");

    let mut admin = AdminServiceClient::new(ch.clone());
    let events = admin
        .list_audit_events(req(
            pb::ListAuditEventsRequest { key_id: "k".into(), ..Default::default() },
            Some(&root),
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    let summary: Vec<(&str, &str, &str, &str)> = events
        .iter()
        .map(|e| (e.action.as_str(), e.request_id.as_str(), e.before_json.as_str(), e.after_json.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("plan.assign", "req-assign", r#"{"plan":null}"#, r#"{"plan":"free"}"#),
            (
                "transaction.reverse",
                "req-reverse",
                r#"{"amount":5,"state":"held"}"#,
                r#"{"amount":5,"state":"reversed"}"#
            ),
            (
                "limit.put",
                "req-raise",
                r#"{"amount":100,"name":"daily","period":"rolling 86400s"}"#,
                r#"{"amount":200,"name":"daily","period":"rolling 86400s"}"#
            ),
            ("limit.put", "req-set", "", r#"{"amount":100,"name":"daily","period":"rolling 86400s"}"#),
        ],
        "newest first, only the key's"
    );
    assert!(events.iter().all(|e| e.caller_id == root_id && e.caller_name == "root"));
    assert_eq!(events[0].time, Some(allowance::grpc::convert::timestamp(epoch())));

    // By caller, paged: the plan change is there too; the bootstrap (no caller) is not.
    let page = admin
        .list_audit_events(req(
            pb::ListAuditEventsRequest { caller_id: root_id.clone(), page_size: 3, ..Default::default() },
            Some(&root),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 3);
    let rest = admin
        .list_audit_events(req(
            pb::ListAuditEventsRequest {
                caller_id: root_id,
                page_size: 3,
                page_token: page.next_page_token,
                ..Default::default()
            },
            Some(&root),
        ))
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<&str> = page.events.iter().chain(&rest.events).map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["plan.assign", "plan.put", "transaction.reverse", "limit.put", "limit.put"]);
    assert!(rest.next_page_token.is_empty());

    // Time filters are checked before they reach SQL.
    let far = admin
        .list_audit_events(req(
            pb::ListAuditEventsRequest {
                start_time: Some(prost_types::Timestamp { seconds: i64::MAX / 2, nanos: 0 }),
                ..Default::default()
            },
            Some(&root),
        ))
        .await
        .unwrap_err();
    assert_eq!((far.code(), far.message().contains("start_time")), (Code::InvalidArgument, true));
    let later = admin
        .list_audit_events(req(
            pb::ListAuditEventsRequest {
                start_time: Some(allowance::grpc::convert::timestamp(
                    epoch() + chrono::TimeDelta::seconds(1),
                )),
                ..Default::default()
            },
            Some(&root),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(later.events.is_empty());
    server.stop().await.unwrap();
}
