//! Every request decoder, fuzzed: random bytes and random field values for every request message of
//! `allowance.v1` (both services) go through decoding, our conversion and validation and the app. Whatever
//! comes in: no panic, no driver or SQL text in a message, and never INTERNAL (gRPC's status table keeps it
//! for broken invariants) — nor UNKNOWN (a panic) or UNAVAILABLE (bad input reaching the database as if it
//! were an outage, so that a client retries for ever).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use allowance::app::Allowance;
use allowance::clock::ManualClock;
use allowance::grpc::pb::admin_service_server::AdminService as _;
use allowance::grpc::pb::rate_limit_service_server::RateLimitService as _;
use allowance::grpc::pb::spending_limits_server::SpendingLimits as _;
use allowance::grpc::{self, AdminService, RateLimitService, SpendingLimitsService, pb};
use allowance::storage::Store;
use allowance::storage::memory::MemoryStore;
use allowance::storage::postgres::PgStore;
use proptest::prelude::*;
use prost::Message;
use tonic::{Code, Request, Status};

use crate::helpers::{TestServer, defaults, epoch};

/// The services without a transport, as the server runs them (authentication off: anonymous, confined to
/// nothing, so every method is reachable).
struct Services<S> {
    limits: SpendingLimitsService<S>,
    admin: AdminService<S>,
    rates: RateLimitService<S>,
}

impl<S: Store> Services<S> {
    fn new(store: S) -> Self {
        let app = Allowance::new(Arc::new(store), Arc::new(ManualClock::new(epoch())));
        Self {
            limits: SpendingLimitsService::new(app.clone(), defaults()),
            admin: AdminService::new(app.clone(), defaults().unit),
            rates: RateLimitService::new(app, defaults()),
        }
    }
}

/// One request of every method: the variant, its message type, its path and the service method.
macro_rules! requests {
    ($($variant:ident($ty:ty) = $path:literal via $service:ident.$method:ident),* $(,)?) => {
        #[derive(Debug, Clone)]
        enum Req { $($variant($ty)),* }

        const PATHS: &[&str] = &[$($path),*];

        impl Req {
            fn path(&self) -> &'static str {
                match self { $(Req::$variant(_) => $path),* }
            }

            fn encode(&self) -> Vec<u8> {
                match self { $(Req::$variant(m) => m.encode_to_vec()),* }
            }

            /// Decodes `bytes` as the request of `path`, as the server's codec does.
            fn decode(path: &str, bytes: &[u8]) -> Result<Req, prost::DecodeError> {
                match path {
                    $($path => <$ty>::decode(bytes).map(Req::$variant),)*
                    other => panic!("no request type for {other}"),
                }
            }

            async fn call<S: Store>(self, s: &Services<S>) -> Result<(), Status> {
                match self { $(Req::$variant(m) => s.$service.$method(Request::new(m)).await.map(drop)),* }
            }
        }
    };
}

requests! {
    Reserve(pb::ReserveSpendingRequest) = "/allowance.v1.SpendingLimits/ReserveSpending" via limits.reserve_spending,
    Commit(pb::CommitRequest) = "/allowance.v1.SpendingLimits/Commit" via limits.commit,
    Reverse(pb::ReverseRequest) = "/allowance.v1.SpendingLimits/Reverse" via limits.reverse,
    GetLimits(pb::GetLimitsRequest) = "/allowance.v1.SpendingLimits/GetLimits" via limits.get_limits,
    SetLimit(pb::SetLimitRequest) = "/allowance.v1.SpendingLimits/SetLimit" via limits.set_limit,
    RemoveLimit(pb::RemoveLimitRequest) = "/allowance.v1.SpendingLimits/RemoveLimit" via limits.remove_limit,
    GetTransaction(pb::GetTransactionRequest) = "/allowance.v1.SpendingLimits/GetTransaction" via limits.get_transaction,
    ListTransactions(pb::ListTransactionsRequest) = "/allowance.v1.SpendingLimits/ListTransactions" via limits.list_transactions,
    PutLimit(pb::PutLimitRequest) = "/allowance.v1.SpendingLimits/PutLimit" via limits.put_limit,
    DeleteLimit(pb::DeleteLimitRequest) = "/allowance.v1.SpendingLimits/DeleteLimit" via limits.delete_limit,
    PutPlan(pb::PutPlanRequest) = "/allowance.v1.SpendingLimits/PutPlan" via limits.put_plan,
    GetPlan(pb::GetPlanRequest) = "/allowance.v1.SpendingLimits/GetPlan" via limits.get_plan,
    ListPlans(pb::ListPlansRequest) = "/allowance.v1.SpendingLimits/ListPlans" via limits.list_plans,
    DeletePlan(pb::DeletePlanRequest) = "/allowance.v1.SpendingLimits/DeletePlan" via limits.delete_plan,
    AssignPlan(pb::AssignPlanRequest) = "/allowance.v1.SpendingLimits/AssignPlan" via limits.assign_plan,
    CreateCaller(pb::CreateCallerRequest) = "/allowance.v1.AdminService/CreateCaller" via admin.create_caller,
    ListCallers(pb::ListCallersRequest) = "/allowance.v1.AdminService/ListCallers" via admin.list_callers,
    RotateCaller(pb::RotateCallerRequest) = "/allowance.v1.AdminService/RotateCaller" via admin.rotate_caller,
    RevokeCaller(pb::RevokeCallerRequest) = "/allowance.v1.AdminService/RevokeCaller" via admin.revoke_caller,
    ListAuditEvents(pb::ListAuditEventsRequest) = "/allowance.v1.AdminService/ListAuditEvents" via admin.list_audit_events,
    PutRule(pb::PutRateLimitRuleRequest) = "/allowance.v1.AdminService/PutRateLimitRule" via admin.put_rate_limit_rule,
    ListRules(pb::ListRateLimitRulesRequest) = "/allowance.v1.AdminService/ListRateLimitRules" via admin.list_rate_limit_rules,
    DeleteRule(pb::DeleteRateLimitRuleRequest) = "/allowance.v1.AdminService/DeleteRateLimitRule" via admin.delete_rate_limit_rule,
    CheckRate(pb::CheckRateRequest) = "/allowance.v1.RateLimitService/CheckRate" via rates.check_rate,
}

/// Text a driver or the database would put in an error; none may reach a client.
const LEAKS: &[&str] = &[
    "sqlx",
    "SQLSTATE",
    "error returned from database",
    "syntax error at or near",
    "PoolTimedOut",
    "pool timed out",
    "violates",
    "out of range for type",
    "panicked",
    "internal error",
];

/// An answer a client may get for a request it made up: anything but a fault of ours.
fn check_answer(what: &str, result: &Result<(), Status>) -> Result<(), TestCaseError> {
    let Err(status) = result else { return Ok(()) };
    prop_assert!(
        !matches!(status.code(), Code::Internal | Code::Unknown | Code::Unavailable | Code::DataLoss),
        "{what}: answered {:?}: {}",
        status.code(),
        status.message()
    );
    for leak in LEAKS {
        prop_assert!(!status.message().contains(leak), "{what}: {leak:?} in {:?}", status.message());
    }
    Ok(())
}

/// Bytes that do not decode are answered by the codec; the rest goes through the service.
async fn check_bytes<S: Store>(s: &Services<S>, path: &str, bytes: &[u8]) -> Result<(), TestCaseError> {
    match Req::decode(path, bytes) {
        Err(e) => {
            let status = grpc::codec::undecodable(&e);
            prop_assert_eq!(status.code(), Code::InvalidArgument);
            check_answer(path, &Err(status))
        }
        Ok(req) => check_answer(path, &req.call(s).await),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Random field values: plausible ones (so that requests reach deep: existing keys, transactions, plans) mixed
// with hostile ones.

fn text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(vec!["", "k", "k2", "t1", "t2", "usd", "daily", "free", "Europe/Paris"])
            .prop_map(str::to_owned),
        2 => "[a-z0-9._-]{1,12}",
        2 => any::<String>(),
        1 => "[\\x00-\\x1f\\x7f]{1,4}",
        1 => "[a-z]{120,300}",
        1 => Just("\u{202e}\u{feff}\u{0}x".to_owned()),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<i64> {
    prop_oneof![
        Just(0),
        Just(-1),
        Just(i64::MIN),
        Just(i64::MAX),
        Just(i64::MAX - 1),
        1..1_000i64,
        any::<i64>(),
    ]
    .boxed()
}

fn small_int() -> BoxedStrategy<i32> {
    prop_oneof![0..6i32, Just(-1), Just(i32::MIN), Just(i32::MAX), any::<i32>()].boxed()
}

fn duration() -> BoxedStrategy<Option<prost_types::Duration>> {
    let seconds = prop_oneof![1..100_000i64, Just(0), Just(86_400 * 400 + 1), number()];
    let nanos = prop_oneof![Just(0), 0..1_000_000_000i32, any::<i32>()];
    prop::option::of((seconds, nanos).prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }))
        .boxed()
}

fn timestamp() -> BoxedStrategy<Option<prost_types::Timestamp>> {
    let seconds = prop_oneof![
        Just(1_893_456_000i64),
        1_800_000_000..2_000_000_000i64,
        Just(-62_135_596_801),
        Just(253_402_300_800),
        Just(-220_000_000_000_000),
        number(),
    ];
    let nanos = prop_oneof![Just(0), 0..1_000_000_000i32, any::<i32>()];
    prop::option::of((seconds, nanos).prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }))
        .boxed()
}

fn period() -> BoxedStrategy<Option<pb::Period>> {
    let calendar = (small_int(), prop_oneof![Just(0u32), 1..15u32, any::<u32>()], timestamp(), text())
        .prop_map(|(unit, count, anchor, time_zone)| {
            pb::period::Kind::Calendar(pb::CalendarPeriod { unit, count, anchor, time_zone })
        });
    let rolling = duration().prop_map(|d| pb::period::Kind::Rolling(d.unwrap_or_default()));
    prop::option::of(prop::option::of(prop_oneof![rolling, calendar]).prop_map(|kind| pb::Period { kind }))
        .boxed()
}

fn limit() -> BoxedStrategy<Option<pb::Limit>> {
    prop::option::of(
        (text(), period(), prop::option::of(number()), prop::option::of(number()))
            .prop_map(|(name, period, amount, burst)| pb::Limit { name, period, amount, burst }),
    )
    .boxed()
}

fn metadata() -> BoxedStrategy<HashMap<String, String>> {
    prop_oneof![
        4 => prop::collection::hash_map(text(), text(), 0..4),
        1 => (0..3usize).prop_map(|n| (0..[20, 65, 300][n]).map(|i| (format!("k{i}"), "v".to_owned())).collect()),
    ]
    .boxed()
}

fn page_token() -> BoxedStrategy<String> {
    prop_oneof![
        text(),
        (any::<i64>(), text()).prop_map(|(micros, id)| format!("v1.{micros}.{id}")),
        Just("v1.-220000000000000000.x".to_owned()),
        any::<i64>().prop_map(|id| format!("a1.{id}")),
    ]
    .boxed()
}

fn caller_id() -> BoxedStrategy<String> {
    prop_oneof![text(), Just("6f1c2a4e-8d0b-4c1e-9a57-2f4b6d8e0a13".to_owned())].boxed()
}

fn request() -> impl Strategy<Value = Req> {
    let strategies: Vec<BoxedStrategy<Req>> = vec![
        (
            text(),
            text(),
            number(),
            text(),
            duration(),
            any::<bool>(),
            metadata(),
            prop::collection::vec(text(), 0..10),
        )
            .prop_map(
                |(key_id, transaction_id, amount, unit, hold_ttl, commit, metadata, additional_key_ids)| {
                    Req::Reserve(pb::ReserveSpendingRequest {
                        key_id,
                        transaction_id,
                        amount,
                        unit,
                        hold_ttl,
                        commit,
                        metadata,
                        additional_key_ids,
                    })
                },
            )
            .boxed(),
        (text(), prop::option::of(number()))
            .prop_map(|(transaction_id, amount)| Req::Commit(pb::CommitRequest { transaction_id, amount }))
            .boxed(),
        text().prop_map(|transaction_id| Req::Reverse(pb::ReverseRequest { transaction_id })).boxed(),
        (text(), text())
            .prop_map(|(key_id, unit)| Req::GetLimits(pb::GetLimitsRequest { key_id, unit }))
            .boxed(),
        (text(), text(), small_int(), number())
            .prop_map(|(key_id, unit, window, limit)| {
                Req::SetLimit(pb::SetLimitRequest { key_id, unit, window, limit })
            })
            .boxed(),
        (text(), text(), small_int())
            .prop_map(|(key_id, unit, window)| {
                Req::RemoveLimit(pb::RemoveLimitRequest { key_id, unit, window })
            })
            .boxed(),
        text()
            .prop_map(|transaction_id| Req::GetTransaction(pb::GetTransactionRequest { transaction_id }))
            .boxed(),
        (text(), text(), small_int(), page_token())
            .prop_map(|(key_id, unit, page_size, page_token)| {
                Req::ListTransactions(pb::ListTransactionsRequest { key_id, unit, page_size, page_token })
            })
            .boxed(),
        (text(), text(), limit())
            .prop_map(|(key_id, unit, limit)| Req::PutLimit(pb::PutLimitRequest { key_id, unit, limit }))
            .boxed(),
        (text(), text(), text())
            .prop_map(|(key_id, unit, name)| Req::DeleteLimit(pb::DeleteLimitRequest { key_id, unit, name }))
            .boxed(),
        (
            text(),
            prop::collection::vec(
                (text(), text(), period(), number(), prop::option::of(number())).prop_map(
                    |(unit, name, period, amount, burst)| pb::PlanLimit { unit, name, period, amount, burst },
                ),
                0..6,
            ),
        )
            .prop_map(|(name, limits)| Req::PutPlan(pb::PutPlanRequest { name, limits }))
            .boxed(),
        text().prop_map(|name| Req::GetPlan(pb::GetPlanRequest { name })).boxed(),
        Just(Req::ListPlans(pb::ListPlansRequest {})).boxed(),
        text().prop_map(|name| Req::DeletePlan(pb::DeletePlanRequest { name })).boxed(),
        (text(), text())
            .prop_map(|(key_id, plan)| Req::AssignPlan(pb::AssignPlanRequest { key_id, plan }))
            .boxed(),
        (text(), prop::collection::vec(small_int(), 0..5), prop::collection::vec(text(), 0..20))
            .prop_map(|(name, scopes, key_prefixes)| {
                Req::CreateCaller(pb::CreateCallerRequest { name, scopes, key_prefixes })
            })
            .boxed(),
        Just(Req::ListCallers(pb::ListCallersRequest {})).boxed(),
        caller_id().prop_map(|id| Req::RotateCaller(pb::RotateCallerRequest { id })).boxed(),
        (caller_id(), any::<bool>())
            .prop_map(|(id, previous_secret_only)| {
                Req::RevokeCaller(pb::RevokeCallerRequest { id, previous_secret_only })
            })
            .boxed(),
        (text(), caller_id(), timestamp(), timestamp(), small_int(), page_token())
            .prop_map(|(key_id, caller_id, start_time, end_time, page_size, page_token)| {
                Req::ListAuditEvents(pb::ListAuditEventsRequest {
                    key_id,
                    caller_id,
                    start_time,
                    end_time,
                    page_size,
                    page_token,
                })
            })
            .boxed(),
        (
            text(),
            prop::collection::vec(text(), 0..10),
            text(),
            prop::option::of(number()),
            prop::collection::vec(text(), 0..5),
        )
            .prop_map(|(key_id, additional_key_ids, unit, cost, limit_names)| {
                Req::CheckRate(pb::CheckRateRequest { key_id, additional_key_ids, unit, cost, limit_names })
            })
            .boxed(),
        prop::option::of(
            (
                (text(), text(), prop::collection::vec((text(), prop::option::of(text())), 0..20)),
                (text(), text(), text(), limit(), any::<bool>()),
            )
                .prop_map(
                    |((name, domain, pattern), (key_template, unit, limit_name, default_limit, shadow))| {
                        pb::RateLimitRule {
                            name,
                            domain,
                            pattern: pattern
                                .into_iter()
                                .map(|(key, value)| pb::DescriptorPattern { key, value })
                                .collect(),
                            key_template,
                            unit,
                            limit_name,
                            default_limit,
                            shadow,
                        }
                    },
                ),
        )
        .prop_map(|rule| Req::PutRule(pb::PutRateLimitRuleRequest { rule }))
        .boxed(),
        Just(Req::ListRules(pb::ListRateLimitRulesRequest {})).boxed(),
        text().prop_map(|name| Req::DeleteRule(pb::DeleteRateLimitRuleRequest { name })).boxed(),
    ];
    proptest::strategy::Union::new(strategies)
}

/// A request's encoding, mutated: bytes overwritten, the end cut off or garbage appended.
fn mangled() -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    (
        request(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(req, writes, cut, tail)| {
            let mut bytes = req.encode();
            for (at, byte) in writes {
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
            }
            if cut % 4 == 0 {
                bytes.truncate(usize::from(cut) % (bytes.len() + 1));
            }
            bytes.extend(tail);
            (req.path(), bytes)
        })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn every_request_type_of_the_contract_is_fuzzed() {
    let fds = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
    let methods: BTreeSet<String> = fds
        .file
        .iter()
        .filter(|f| f.package() == "allowance.v1")
        .flat_map(|f| {
            f.service.iter().flat_map(move |s| {
                s.method.iter().map(move |m| format!("/{}.{}/{}", f.package(), s.name(), m.name()))
            })
        })
        .collect();
    let fuzzed: BTreeSet<String> = PATHS.iter().map(|p| p.to_string()).collect();
    assert_eq!(methods, fuzzed, "a method of allowance.v1 is not fuzzed here (or no longer exists)");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Sequences of random requests against one store, so that later ones meet what earlier ones made.
    #[test]
    fn random_field_values_are_answered_without_a_fault(reqs in prop::collection::vec(request(), 1..8)) {
        let rt = runtime();
        let s = Services::new(MemoryStore::new());
        for req in reqs {
            let path = req.path();
            let encoded = req.encode();
            rt.block_on(check_bytes(&s, path, &encoded))?;
        }
    }

    #[test]
    fn random_bytes_are_answered_without_a_fault(
        path in prop::sample::select(PATHS),
        bytes in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let s = Services::new(MemoryStore::new());
        runtime().block_on(check_bytes(&s, path, &bytes))?;
    }

    #[test]
    fn mangled_requests_are_answered_without_a_fault((path, bytes) in mangled()) {
        let s = Services::new(MemoryStore::new());
        runtime().block_on(check_bytes(&s, path, &bytes))?;
    }
}

/// A sample through the real server (HTTP/2, the codec, the layers): what a client on the wire gets.
#[test]
fn a_sample_through_the_server_is_answered_without_a_fault() {
    let rt = runtime();
    let server = rt.block_on(TestServer::start(MemoryStore::new(), Arc::new(ManualClock::new(epoch()))));
    let mut runner =
        proptest::test_runner::TestRunner::new(ProptestConfig { cases: 64, ..ProptestConfig::default() });
    let strategy = prop_oneof![
        request().prop_map(|r| (r.path(), r.encode())),
        mangled(),
        (prop::sample::select(PATHS), prop::collection::vec(any::<u8>(), 0..64)),
    ];
    let result = runner.run(&strategy, |(path, bytes)| {
        let answer = rt.block_on(crate::helpers::raw::call(server.addr, path, bytes)).map(drop);
        check_answer(path, &answer)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The same on Postgres, where bad input that slipped through would fail as a database error: fewer cases.
#[test]
fn random_field_values_on_postgres_are_answered_without_a_fault() {
    let rt = runtime();
    let db = rt.block_on(crate::db::TestDatabase::create("fuzz"));
    let s = Services::new(PgStore::new(db.pool.clone()));
    let mut runner =
        proptest::test_runner::TestRunner::new(ProptestConfig { cases: 48, ..ProptestConfig::default() });
    let result = runner.run(&prop::collection::vec(request(), 1..8), |reqs| {
        for req in reqs {
            let path = req.path();
            rt.block_on(check_bytes(&s, path, &req.encode()))?;
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
