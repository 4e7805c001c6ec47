//! History partitioned by month, and retention: the migration on a populated database, rows landing in the
//! right partitions, ids unique across partitions, old partitions exported and dropped (never below the
//! floor, never with open holds), one replica at a time.

use std::sync::Arc;

use allowance::app::{Allowance, Error, RetentionSettings};
use allowance::clock::{Clock, ManualClock};
use allowance::domain::{
    AccountKey, Amount, HoldTtl, KeyId, LimitName, LimitSpec, Metadata, Period, Rejection, Reserve,
    ReserveOutcome, TransactionId, Unit,
};
use allowance::storage::postgres::PgStore;
use allowance::storage::{HISTORY_JOB, Store};
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use sqlx::PgPool;

use crate::helpers::actor;

const BEFORE: [&str; 5] = [
    include_str!("../../migrations/20261122000001_ledger.sql"),
    include_str!("../../migrations/20261122000002_transactions_statistics.sql"),
    include_str!("../../migrations/20261201000001_limits_as_data.sql"),
    include_str!("../../migrations/20261202000001_callers_and_audit.sql"),
    include_str!("../../migrations/20261202000002_rate_limits.sql"),
];
const PARTITIONED: &str = include_str!("../../migrations/20261203000001_partitioned_history.sql");
const HOT_COMMITS: &str = include_str!("../../migrations/20261204000001_hot_commits.sql");
/// The account columns of HOT_COMMITS, so that today's binary can write the schema as it was before
/// partitioning; HOT_COMMITS recomputes them from the rows when it runs.
const HOT_COMMITS_COLUMNS: &str = "ALTER TABLE accounts ADD COLUMN holds_until timestamptz,
                                   ADD COLUMN open_holds integer NOT NULL DEFAULT 0";

fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
}

pub fn account(key: &str) -> AccountKey {
    AccountKey::new(KeyId::parse(key).unwrap(), Unit::parse("usd").unwrap())
}

pub fn reserve(key: &str, id: &str, amount: i64, commit: bool) -> Reserve {
    Reserve {
        transaction_id: TransactionId::parse(id).unwrap(),
        accounts: vec![account(key)],
        amount: Amount::parse("amount", amount).unwrap(),
        hold_ttl: HoldTtl::parse(TimeDelta::minutes(15)).unwrap(),
        commit,
        metadata: Metadata::default(),
    }
}

fn app(pool: &PgPool, clock: &ManualClock) -> Allowance<PgStore> {
    Allowance::new(Arc::new(PgStore::new(pool.clone())), Arc::new(clock.clone()))
}

pub async fn allowed(app: &Allowance<PgStore>, r: Reserve) -> bool {
    match app.reserve(r).await.unwrap() {
        ReserveOutcome::Allowed { replayed, .. } => !replayed,
        ReserveOutcome::Denied { .. } => panic!("denied"),
    }
}

async fn replayed(app: &Allowance<PgStore>, r: Reserve) -> bool {
    matches!(app.reserve(r).await.unwrap(), ReserveOutcome::Allowed { replayed: true, .. })
}

async fn refused_as_existing(app: &Allowance<PgStore>, r: Reserve) -> bool {
    matches!(app.reserve(r).await, Err(Error::Rejected(Rejection::AlreadyExists(_))))
}

/// The partition holding a transaction's row.
async fn partition_of(pool: &PgPool, id: &str) -> String {
    sqlx::query_scalar("SELECT tableoid::regclass::text FROM transactions WHERE transaction_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn put_limit(app: &Allowance<PgStore>, key: &str, days: i64, amount: i64) {
    let spec = LimitSpec::new(
        LimitName::parse("limit").unwrap(),
        Period::rolling(TimeDelta::days(days)).unwrap(),
        Some(amount),
    )
    .unwrap();
    app.put_limit(account(key), spec, actor()).await.unwrap();
}

async fn spent(app: &Allowance<PgStore>, key: &str) -> i128 {
    let usage = app.get_limits(account(key)).await.unwrap();
    usage.limits.iter().find(|l| l.name.as_str() == "limit").unwrap().spent
}

#[sqlx::test(migrations = false)]
async fn the_migration_keeps_every_row_total_and_id_of_a_populated_database(pool: PgPool) {
    for m in BEFORE.iter().chain([&HOT_COMMITS_COLUMNS]) {
        sqlx::raw_sql(m).execute(&pool).await.unwrap();
    }
    let clock = ManualClock::new(at(2026, 11, 20, 12));
    let before = app(&pool, &clock);
    put_limit(&before, "k", 30, 1_000).await;
    for i in 0..50 {
        assert!(allowed(&before, reserve("k", &format!("t{i}"), 10, true)).await);
        clock.advance(TimeDelta::hours(1));
    }
    assert!(allowed(&before, reserve("k", "held", 7, false)).await);
    sqlx::raw_sql(PARTITIONED).execute(&pool).await.unwrap();
    sqlx::raw_sql("UPDATE accounts SET holds_until = NULL, open_holds = 0").execute(&pool).await.unwrap();
    sqlx::raw_sql(HOT_COMMITS).execute(&pool).await.unwrap();
    let open_holds = || sqlx::query_scalar::<_, i64>("SELECT sum(open_holds) FROM accounts").fetch_one(&pool);
    assert_eq!(open_holds().await.unwrap(), 1, "counted from the rows by the migration");

    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM transactions").fetch_one(&pool).await.unwrap();
    assert_eq!(rows, 51);
    assert_eq!(partition_of(&pool, "t0").await, "transactions_legacy");
    let after = app(&pool, &clock);
    assert_eq!(spent(&after, "k").await, 500);
    // Idempotency across the migration: the same request is a replay, a different one is refused.
    assert!(replayed(&after, reserve("k", "t3", 10, true)).await);
    assert!(refused_as_existing(&after, reserve("k", "t3", 11, true)).await);
    after.commit(TransactionId::parse("held").unwrap(), None, actor()).await.unwrap();
    assert_eq!(spent(&after, "k").await, 507);
    assert_eq!(open_holds().await.unwrap(), 0);
    assert!(after.reconcile(None).await.unwrap().is_consistent());
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn rows_land_in_their_month_and_an_id_stays_unique_across_partitions(pool: PgPool) {
    let clock = ManualClock::new(at(2030, 1, 10, 0));
    let app = app(&pool, &clock);
    // No partition covers 2030 yet: the row goes to the default partition, and moves when one is made.
    assert!(allowed(&app, reserve("k", "early", 5, true)).await);
    assert_eq!(partition_of(&pool, "early").await, "transactions_default");
    let created = app.create_partitions(2).await.unwrap();
    assert_eq!(created, ["transactions_203001", "transactions_203002", "transactions_203003"]);
    assert_eq!(partition_of(&pool, "early").await, "transactions_203001");
    assert!(app.create_partitions(2).await.unwrap().is_empty(), "a second run creates nothing");

    clock.set(at(2030, 1, 31, 23) + TimeDelta::minutes(59));
    assert!(allowed(&app, reserve("k", "january", 5, true)).await);
    clock.set(at(2030, 2, 1, 0) + TimeDelta::seconds(1));
    assert!(allowed(&app, reserve("k", "february", 5, true)).await);
    assert_eq!(partition_of(&pool, "january").await, "transactions_203001");
    assert_eq!(partition_of(&pool, "february").await, "transactions_203002");

    // The id's first use is in January: in February it is still a replay, or refused if different.
    assert!(replayed(&app, reserve("k", "january", 5, true)).await);
    assert!(refused_as_existing(&app, reserve("k", "january", 6, true)).await);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM transactions WHERE transaction_id = 'january'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

/// Two batches reserving one new id at once, at different instants (so in different partitions): one wins.
#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn concurrent_reservations_of_one_id_in_two_partitions_record_it_once(pool: PgPool) {
    let january = ManualClock::new(at(2030, 1, 31, 23));
    let february = ManualClock::new(at(2030, 2, 1, 1));
    app(&pool, &january).create_partitions(2).await.unwrap();
    for round in 0..20 {
        let id = format!("race-{round}");
        let one = app(&pool, &january);
        let two = app(&pool, &february);
        let (a, b) =
            tokio::join!(one.reserve(reserve("a", &id, 5, true)), two.reserve(reserve("b", &id, 5, true)));
        let wins = [a, b]
            .into_iter()
            .filter(|r| matches!(r, Ok(ReserveOutcome::Allowed { replayed: false, .. })))
            .count();
        assert_eq!(wins, 1, "round {round}");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM transactions WHERE transaction_id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(rows, 1, "round {round}");
    }
}

/// One batch settling rows of two partitions: holds placed either side of a month boundary expire together,
/// and the batch that releases them updates both rows (the save prunes partitions by the range of its rows'
/// `created_at`, which must cover both); a commit of last month's hold updates its row in the older partition.
#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn one_batch_settles_holds_of_two_months(pool: PgPool) {
    let clock = ManualClock::new(at(2030, 1, 31, 23) + TimeDelta::minutes(55));
    let app = app(&pool, &clock);
    app.create_partitions(2).await.unwrap();
    put_limit(&app, "k", 1, 1_000).await;
    assert!(allowed(&app, reserve("k", "january", 10, false)).await);
    assert!(allowed(&app, reserve("k", "kept", 10, false)).await);
    clock.set(at(2030, 2, 1, 0) + TimeDelta::minutes(1));
    assert!(allowed(&app, reserve("k", "february", 10, false)).await);
    assert_eq!(partition_of(&pool, "january").await, "transactions_203001");
    assert_eq!(partition_of(&pool, "february").await, "transactions_203002");
    app.commit(id("kept"), Some(Amount::parse("amount", 4).unwrap()), actor()).await.unwrap();

    clock.set(at(2030, 2, 1, 0) + TimeDelta::minutes(20));
    assert!(allowed(&app, reserve("k", "after", 1, true)).await);
    let states: Vec<(String, i16)> = sqlx::query_as(
        "SELECT transaction_id, state FROM transactions WHERE transaction_id <> 'after' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let expected = [("february", 4), ("january", 4), ("kept", 2)].map(|(id, s)| (id.to_owned(), s));
    assert_eq!(states, expected, "both holds expired in their own partitions, the commit recorded");
    assert_eq!(held(&app, "k").await, 0);
    assert_eq!(spent(&app, "k").await, 5);
    assert_eq!(app.open_holds().await.unwrap(), 0);
    assert!(app.reconcile(None).await.unwrap().is_consistent());
}

fn settings(days: i64, export: Option<&std::path::Path>) -> RetentionSettings {
    RetentionSettings {
        retention: TimeDelta::days(days),
        ahead_months: 2,
        export_dir: export.map(Into::into),
        audit_retention: None,
        strict: true,
    }
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn retention_exports_and_drops_old_partitions_but_never_below_the_floor_or_with_open_holds(
    pool: PgPool,
) {
    let clock = ManualClock::new(at(2028, 1, 5, 0));
    let app = app(&pool, &clock);
    app.create_partitions(2).await.unwrap();
    put_limit(&app, "k", 30, 1_000_000).await;
    for i in 0..3 {
        assert!(allowed(&app, reserve("k", &format!("old-{i}"), 100, true)).await);
    }
    clock.set(at(2028, 2, 5, 0));
    // A hold nobody commits, reverses or sweeps: its partition must stay.
    assert!(allowed(&app, reserve("other", "open", 1, false)).await);
    clock.set(at(2028, 3, 5, 0));
    assert!(allowed(&app, reserve("k", "recent", 100, true)).await);
    // "k" is idle from here: its 30-day totals still count "recent" and age it out on the next refresh.
    clock.set(at(2030, 3, 1, 0));

    // The floor: the longest period (30 days) + the longest hold (30 days) + a day.
    assert_eq!(app.retention_floor().await.unwrap(), TimeDelta::days(61));
    let refused = app.retention(&settings(60, None), false).await.unwrap_err();
    assert!(refused.to_string().contains("below the floor of 61d"), "{refused}");
    let lenient = RetentionSettings { strict: false, ..settings(1, None) };
    assert_eq!(app.retention(&lenient, true).await.unwrap().retention, TimeDelta::days(61));

    let dry = app.retention(&settings(430, None), true).await.unwrap();
    let names: Vec<&str> = dry.dropped.iter().map(|d| d.name.as_str()).collect();
    assert!(names.contains(&"transactions_202801") && names.contains(&"transactions_202802"), "{names:?}");
    assert_eq!(partition_of(&pool, "old-0").await, "transactions_202801", "a dry run drops nothing");

    let dir = tempfile::tempdir().unwrap();
    let report = app.retention(&settings(430, Some(dir.path())), false).await.unwrap();
    let dropped: Vec<(&str, i64)> = report.dropped.iter().map(|d| (d.name.as_str(), d.rows)).collect();
    assert!(dropped.contains(&("transactions_202801", 3)), "{dropped:?}");
    assert!(!dropped.iter().any(|(n, _)| *n == "transactions_202802"));
    assert_eq!(report.kept, [("transactions_202802".to_owned(), "1 open hold(s)".to_owned())]);
    assert!(report.refreshed_accounts >= 1);
    let csv = std::fs::read_to_string(dir.path().join("transactions_202801.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3, "a header and the three rows:\n{csv}");
    assert!(csv.starts_with("transaction_id,"));
    assert!(!dir.path().join("transactions_202801.csv.partial").exists());
    let names: Vec<String> = app.partitions().await.unwrap().into_iter().map(|p| p.name).collect();
    assert!(!names.contains(&"transactions_202801".to_owned()), "{names:?}");
    assert!(names.contains(&"transactions_default".to_owned()));

    // The idle account's totals aged past the dropped rows before they went: nothing counts now, and the
    // ledger agrees.
    assert_eq!(spent(&app, "k").await, 0);
    assert!(app.reconcile(None).await.unwrap().is_consistent());
    // After its partition is dropped, an id is unknown (and may be used again).
    assert!(app.get_transaction(TransactionId::parse("old-0").unwrap(), &actor()).await.is_err());
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn the_history_job_runs_on_one_replica_at_a_time(pool: PgPool) {
    let one = PgStore::new(crate::helpers::second_pool(&pool, 2).await);
    let two = app(&crate::helpers::second_pool(&pool, 2).await, &ManualClock::new(at(2030, 1, 1, 0)));
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let (finish, finished) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn(async move {
        one.exclusively(HISTORY_JOB, async move {
            started_tx.send(()).unwrap();
            finished.await.unwrap();
        })
        .await
    });
    started.await.unwrap();
    let settings = settings(430, None);
    let run = two.store().exclusively(HISTORY_JOB, two.retention(&settings, false)).await.unwrap();
    assert!(run.is_none(), "kept out while another replica runs the job");
    finish.send(()).unwrap();
    first.await.unwrap().unwrap();
    let run = two.store().exclusively(HISTORY_JOB, two.retention(&settings, false)).await.unwrap();
    assert!(run.unwrap().unwrap().created.contains(&"transactions_203001".to_owned()));
}

fn id(s: &str) -> TransactionId {
    TransactionId::parse(s).unwrap()
}

/// Commits, reverses and expiries change a transaction's row in place (HOT updates): no index names a
/// column they change, and the partition's pages keep room for the new version (fillfactor). Postgres's own
/// counters show it; with the old partial index of open holds (`WHERE state = 1`) none of them was.
///
/// Few enough rows that every version (16 inserted, 15 updated, about 130 bytes each) fits in the
/// partition's first page without pruning: a HOT update needs room on its page, and whether Postgres may
/// prune the dead versions in time depends on the snapshots of every backend on the server (a CI run of 40
/// rows once saw 39 of 40 updates HOT). Room is what the design provides; pruning is not its to promise.
#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn settling_a_transaction_rewrites_no_index(pool: PgPool) {
    // One connection, so that its statistics can be flushed on demand.
    let serving = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let clock = ManualClock::new(at(2027, 3, 10, 0));
    let app = app(&serving, &clock);
    app.create_partitions(1).await.unwrap();
    put_limit(&app, "k", 1, 1_000_000).await;
    for i in 0..15 {
        assert!(allowed(&app, reserve("k", &format!("t{i}"), 10, false)).await);
    }
    for i in 0..5 {
        app.commit(id(&format!("t{i}")), None, actor()).await.unwrap();
    }
    for i in 5..10 {
        app.reverse(id(&format!("t{i}")), actor()).await.unwrap();
    }
    // The last five expire, and the next call of the key releases them.
    clock.advance(TimeDelta::minutes(16));
    assert!(allowed(&app, reserve("k", "after", 10, true)).await);
    assert_eq!(spent(&app, "k").await, 5 * 10 + 10);
    sqlx::query("SELECT pg_stat_force_next_flush()").execute(&serving).await.unwrap();
    serving.close().await;

    let (updated, hot): (i64, i64) = sqlx::query_as(
        "SELECT sum(n_tup_upd)::int8, sum(n_tup_hot_upd)::int8 FROM pg_stat_user_tables
         WHERE relname LIKE 'transactions\\_%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(updated, 15, "5 commits, 5 reverses, 5 expiries");
    assert_eq!(hot, updated, "every settlement a HOT update");
    let open: i64 =
        sqlx::query_scalar("SELECT sum(open_holds)::int8 FROM accounts").fetch_one(&pool).await.unwrap();
    assert_eq!(open, 0);
}

/// The sweeper finds idle accounts with expired holds through each account's expiry cursor, releases them,
/// and forgets accounts whose holds were all settled, so that it does not look at them again.
#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn the_sweeper_releases_expired_holds_and_forgets_settled_accounts(pool: PgPool) {
    let clock = ManualClock::new(at(2027, 3, 10, 0));
    let app = app(&pool, &clock);
    for key in ["settled", "expiring"] {
        put_limit(&app, key, 1, 1_000).await;
    }
    assert!(allowed(&app, reserve("settled", "s1", 10, false)).await);
    assert!(allowed(&app, reserve("expiring", "e1", 10, false)).await);
    clock.advance(TimeDelta::minutes(5));
    assert!(allowed(&app, reserve("expiring", "e2", 10, false)).await);
    app.commit(id("s1"), None, actor()).await.unwrap();
    assert_eq!(app.open_holds().await.unwrap(), 2);
    let holds_until = |key: &'static str| {
        sqlx::query_scalar::<_, Option<DateTime<Utc>>>("SELECT holds_until FROM accounts WHERE key_id = $1")
            .bind(key)
            .fetch_one(&pool)
    };

    // Before any expiry nothing is found, and "settled" (written when s1 was committed, before s1's expiry)
    // is still a candidate.
    let store = PgStore::new(pool.clone());
    clock.advance(TimeDelta::minutes(5));
    assert!(store.accounts_with_expired_holds(clock.now(), 10).await.unwrap().is_empty());
    assert!(holds_until("settled").await.unwrap().is_some());
    // e1 and s1 have expired (15 minutes), e2 not yet: only "expiring" has a hold to release, and "settled"
    // is forgotten.
    clock.advance(TimeDelta::minutes(6));
    let found = store.accounts_with_expired_holds(clock.now(), 10).await.unwrap();
    assert_eq!(found, [account("expiring")]);
    assert_eq!(holds_until("settled").await.unwrap(), None);
    assert_eq!(app.sweep_expired(10).await.unwrap(), 1);
    assert_eq!(app.open_holds().await.unwrap(), 1, "e2");
    assert_eq!(held(&app, "expiring").await, 10);
    clock.advance(TimeDelta::minutes(5));
    assert_eq!(store.accounts_with_expired_holds(clock.now(), 10).await.unwrap(), [account("expiring")]);
    assert_eq!(app.sweep_expired(10).await.unwrap(), 1);
    assert_eq!(app.open_holds().await.unwrap(), 0);
    assert_eq!(held(&app, "expiring").await, 0);
    assert!(store.accounts_with_expired_holds(clock.now(), 10).await.unwrap().is_empty());
    // Released by a batch after its last hold's expiry: nothing is left to look at either.
    let candidates: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts WHERE updated_at < holds_until")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(candidates, 0);
}

async fn held(app: &Allowance<PgStore>, key: &str) -> i128 {
    let usage = app.get_limits(account(key)).await.unwrap();
    usage.limits.iter().find(|l| l.name.as_str() == "limit").unwrap().held
}

/// The expiry cursor at its edges: a hold expiring a microsecond after its account's last write is still
/// released at its expiry, and a hold placed by a replica whose clock is behind (the batch decides at the
/// account's last write instead) expires after the cursor, so it is released too.
#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn holds_are_released_at_expiry_whatever_the_accounts_last_write(pool: PgPool) {
    let start = at(2027, 3, 10, 0);
    let clock = ManualClock::new(start);
    let app = app(&pool, &clock);
    put_limit(&app, "k", 1, 1_000).await;
    assert!(allowed(&app, reserve("k", "h1", 10, false)).await);
    clock.set(start + TimeDelta::minutes(15) - TimeDelta::microseconds(1));
    assert!(allowed(&app, reserve("k", "h2", 10, false)).await);
    assert_eq!(held(&app, "k").await, 20);
    clock.set(start + TimeDelta::minutes(15));
    assert!(allowed(&app, reserve("k", "c1", 10, true)).await);
    assert_eq!(held(&app, "k").await, 10, "h1 released at its expiry");
    // A replica fourteen minutes behind: its batch decides at the account's last write, so h3 expires at
    // start + 30 min, after the cursor.
    clock.set(start + TimeDelta::minutes(1));
    assert!(allowed(&app, reserve("k", "h3", 10, false)).await);
    assert_eq!(held(&app, "k").await, 20);
    clock.set(start + TimeDelta::minutes(30));
    assert!(allowed(&app, reserve("k", "c2", 10, true)).await);
    assert_eq!(held(&app, "k").await, 0, "h2 and h3 released");
    assert_eq!(app.open_holds().await.unwrap(), 0);
}

/// Holds placed, settled and left to expire by two replicas at once while both sweep in a tight loop: the
/// per-account bookkeeping always matches the rows — each account's count of open holds equals its HELD rows,
/// and no unreleased hold lies at or behind its account's expiry cursor — and once everything has expired and
/// been swept, nothing is left open.
#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn two_replicas_placing_settling_and_sweeping_keep_the_hold_bookkeeping_exact(pool: PgPool) {
    use allowance::clock::SystemClock;
    let replica =
        |p: PgPool| Allowance::new(Arc::new(PgStore::new(p).with_database_clock()), Arc::new(SystemClock));
    let replicas = [
        replica(crate::helpers::second_pool(&pool, 4).await),
        replica(crate::helpers::second_pool(&pool, 4).await),
    ];
    let keys: Vec<String> = (0..4).map(|k| format!("k{k}")).collect();
    for key in &keys {
        put_limit(&replicas[0], key, 1, 1_000_000_000).await;
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut tasks = Vec::new();
    for (r, app) in replicas.iter().enumerate() {
        for worker in 0..3 {
            let (app, keys) = (app.clone(), keys.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while std::time::Instant::now() < until {
                    let name = format!("r{r}-w{worker}-{i}");
                    let mut r = reserve(&keys[(i as usize + worker) % keys.len()], &name, 1, false);
                    r.hold_ttl = HoldTtl::parse(TimeDelta::seconds(1)).unwrap();
                    if i % 3 == 1 {
                        // Two keys: the hold is counted on its first.
                        r.accounts.push(account(&keys[(i as usize + worker + 1) % keys.len()]));
                    }
                    app.reserve(r).await.unwrap();
                    match i % 3 {
                        0 => drop(app.commit(id(&name), None, actor()).await.unwrap()),
                        1 => drop(app.reverse(id(&name), actor()).await.unwrap()),
                        _ => {} // left to expire
                    }
                    i += 1;
                }
            }));
        }
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            while std::time::Instant::now() < until {
                app.sweep_expired(100).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let check = || async {
        sqlx::query_as::<_, (i64, i64, i64)>(
            "SELECT (SELECT COALESCE(sum(open_holds), 0)::int8 FROM accounts),
                    (SELECT count(*) FROM transactions WHERE state = 1 AND position = 0),
                    (SELECT count(*) FROM transactions t JOIN accounts a ON a.id = t.account_id
                     WHERE t.state = 1 AND t.expires_at <= a.updated_at)",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let (counted, rows, behind) = check().await;
    assert_eq!((counted, behind), (rows, 0), "counted {counted}, rows {rows}, behind a cursor {behind}");
    assert!(rows > 0, "some holds were left to expire");

    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    while replicas[0].sweep_expired(100).await.unwrap() > 0 {}
    assert_eq!(check().await, (0, 0, 0), "every hold expired and released");
    for key in &keys {
        assert_eq!(held(&replicas[1], key).await, 0);
    }
}
