//! No plan cliff: every statement of the serving path is planned once per connection (generic plans, see
//! `PLAN_SETTINGS`), so a plan made while the tables were empty must still find rows by index once they have
//! grown a hundredfold without being analysed again — as on a fresh database, or in a new partition, before
//! autovacuum catches up. Shown without timing: Postgres counts the index entries and rows each scan read.

use std::sync::Arc;

use allowance::clock::{Clock, ManualClock};
use allowance::grpc::pb;
use allowance::grpc::pb::rate_limit_service_client::RateLimitServiceClient;
use allowance::storage::postgres::{PLAN_SETTINGS, PgStore};
use chrono::TimeDelta;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::call::{commit, reserve, reserve_req, reverse, set_limit};
use crate::helpers::{TestServer, channel, epoch};
use crate::quotas::{limit, limits, put_limit, rolling};

/// The big tables: everything the serving path finds by key. `transactions` is partitioned: its rows and
/// index entries are counted under each partition's own name (`transactions_YYYYMM`, `_legacy`, `_default`).
const TABLES: &str = "'accounts', 'rate_states', 'key_plans'";
const PARTITIONS: &str = r"relname LIKE 'transactions\_%'";

/// Every kind of call the serving path makes, on keys named with `round`.
async fn every_call(server: &TestServer, round: &str, clock: &ManualClock) {
    let mut c = server.client.clone();
    let mut rates = RateLimitServiceClient::new(channel(server.addr).await);
    let (k1, k2) = (format!("{round}-a"), format!("{round}-b"));
    set_limit(&mut c, &k1, pb::Window::Daily, 1_000).await;
    set_limit(&mut c, &k2, pb::Window::Daily, 1_000).await;
    assert!(reserve(&mut c, &k1, &format!("{round}-t1"), 10).await.allowed);
    assert!(reserve(&mut c, &k2, &format!("{round}-t2"), 10).await.allowed);
    let mut two = reserve_req(&k1, &format!("{round}-t3"), 5);
    two.additional_key_ids = vec![k2.clone()];
    assert!(c.reserve_spending(two).await.unwrap().into_inner().allowed);
    commit(&mut c, &format!("{round}-t1"), Some(7)).await.unwrap();
    reverse(&mut c, &format!("{round}-t2")).await.unwrap();
    // Time passes: the rolling day ages, holds expire and are settled by the next batch of their keys.
    clock.advance(TimeDelta::hours(2));
    assert!(reserve(&mut c, &k1, &format!("{round}-t4"), 1).await.allowed);
    // A period new to the key is summed from its history.
    put_limit(&mut c, &k1, limit("hourly", rolling(3600), Some(100))).await.unwrap();
    assert!(reserve(&mut c, &k1, &format!("{round}-t5"), 1).await.allowed);
    limits(&mut c, &k1).await;
    let get = pb::GetTransactionRequest { transaction_id: format!("{round}-t3") };
    c.get_transaction(get).await.unwrap();
    let list = pb::ListTransactionsRequest { key_id: k1.clone(), page_size: 10, ..Default::default() };
    c.list_transactions(list).await.unwrap();
    let rate = limit("per-second", rolling(1), Some(100));
    put_limit(&mut c, &k2, pb::Limit { burst: Some(100), ..rate }).await.unwrap();
    let check = pb::CheckRateRequest { key_id: k2.clone(), ..Default::default() };
    assert!(rates.check_rate(check.clone()).await.unwrap().into_inner().allowed);
    assert!(rates.check_rate(check).await.unwrap().into_inner().allowed);
}

/// The serving connection sends its counters when idle, at most once a second: ask it to, now.
async fn flush_counters(serving: &PgPool) {
    sqlx::query("SELECT pg_stat_force_next_flush()").execute(serving).await.unwrap();
    sqlx::query("SELECT 1").execute(serving).await.unwrap();
}

/// Index entries and heap rows read by scans of the big tables since the counters were reset.
async fn rows_read(pool: &PgPool) -> i64 {
    let q = format!(
        "SELECT (SELECT COALESCE(sum(idx_tup_read), 0) FROM pg_stat_user_indexes
                 WHERE relname IN ({TABLES}) OR {PARTITIONS})::int8
              + (SELECT COALESCE(sum(seq_tup_read), 0) FROM pg_stat_user_tables
                 WHERE relname IN ({TABLES}) OR {PARTITIONS})::int8"
    );
    sqlx::query_scalar(&q).fetch_one(pool).await.unwrap()
}

/// Where the reads were, for the failure message: each index and table of the big tables with its count.
async fn reads_by_relation(pool: &PgPool) -> String {
    let q = format!(
        "SELECT string_agg(name || ': ' || n, E'\\n' ORDER BY n DESC) FROM (
             SELECT indexrelname::text AS name, idx_tup_read AS n FROM pg_stat_user_indexes
             WHERE (relname IN ({TABLES}) OR {PARTITIONS}) AND idx_tup_read > 0
             UNION ALL
             SELECT relname::text || ' (scanned)', seq_tup_read FROM pg_stat_user_tables
             WHERE (relname IN ({TABLES}) OR {PARTITIONS}) AND seq_tup_read > 0) r"
    );
    sqlx::query_scalar::<_, Option<String>>(&q).fetch_one(pool).await.unwrap().unwrap_or_default()
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn plans_made_on_empty_tables_still_find_rows_by_index_after_growth(pool: PgPool) {
    // New, empty partitions for the month the grown history lies in and the month the calls run in, as the
    // service creates them ahead of time: plans are made while they are empty.
    for (name, from, to) in [
        ("transactions_202912", "2029-12-01", "2030-01-01"),
        ("transactions_203001", "2030-01-01", "2030-02-01"),
    ] {
        sqlx::query("SELECT transactions_create_partition($1, $2::timestamptz, $3::timestamptz)")
            .bind(name)
            .bind(from)
            .bind(to)
            .execute(&pool)
            .await
            .unwrap();
    }
    let partitions: Vec<String> =
        sqlx::query_scalar("SELECT name FROM transactions_partitions").fetch_all(&pool).await.unwrap();
    // Statistics frozen as a fresh database has them: analysed empty, and no autovacuum to refresh them
    // (a partitioned table holds no storage parameters: its partitions do).
    let tables = ["accounts", "rate_states", "key_plans", "plans", "plan_limits"];
    for table in tables.iter().copied().chain(partitions.iter().map(String::as_str)) {
        sqlx::query(&format!("ALTER TABLE {table} SET (autovacuum_enabled = off)"))
            .execute(&pool)
            .await
            .unwrap();
    }
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();

    // One serving connection: every statement is planned once, now, on the empty tables.
    let options: PgConnectOptions = (*pool.connect_options()).clone().options(PLAN_SETTINGS);
    let serving = PgPoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
    let clock = ManualClock::new(epoch());
    let server = TestServer::start(PgStore::new(serving.clone()), Arc::new(clock.clone())).await;
    every_call(&server, "empty", &clock).await;

    // A hundredfold growth, not analysed: 20,000 accounts (half on a plan) with 200,000 transactions and
    // 20,000 rate-limit states.
    let grow = [
        "INSERT INTO plans (name) VALUES ('grown')",
        "INSERT INTO accounts (key_id, unit, updated_at)
             SELECT 'grown-' || g, '', $1 FROM generate_series(1, 20000) g",
        "INSERT INTO key_plans (key_id, plan_id)
             SELECT 'grown-' || g, (SELECT id FROM plans WHERE name = 'grown') FROM generate_series(1, 20000, 2) g",
        "INSERT INTO transactions (transaction_id, account_id, amount, held_amount, state, created_at, committed_at)
             SELECT 'grown-' || g, a.id, 1, 1, 2, $1 - g * interval '1 second', $1 - g * interval '1 second'
             FROM generate_series(1, 200000) g JOIN accounts a ON a.key_id = 'grown-' || (g % 20000 + 1)",
        "INSERT INTO rate_states (key_id, unit, name, tat)
             SELECT 'grown-' || g, '', 'r', $1 FROM generate_series(1, 20000) g",
    ];
    for statement in grow {
        let q = sqlx::query(statement);
        let q = if statement.contains("$1") { q.bind(clock.now()) } else { q };
        q.execute(&pool).await.unwrap();
    }
    let grown: String = sqlx::query_scalar(
        "SELECT tableoid::regclass::text FROM transactions WHERE transaction_id = 'grown-1'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        ["transactions_202912", "transactions_203001"].contains(&grown.as_str()),
        "the history grew in {grown}, not a partition analysed while empty"
    );
    flush_counters(&serving).await;
    sqlx::query("SELECT pg_stat_reset()").execute(&pool).await.unwrap();
    let before = rows_read(&pool).await;

    every_call(&server, "grown", &clock).await;
    flush_counters(&serving).await;
    let read = rows_read(&pool).await - before;
    // The calls above touch a few dozen rows; a single walk of a grown index reads 20,000 or more.
    assert!(
        read < 2_000,
        "the second round read {read} index entries and rows: a plan walks a whole table\n{}",
        reads_by_relation(&pool).await
    );
    server.stop().await.unwrap();
}
