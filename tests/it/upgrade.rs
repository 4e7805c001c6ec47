//! The quota-model migration on a populated round-1 database: every window limit becomes a named rolling
//! limit, its totals keep counting exactly what they counted, and transactions keep working.

use std::sync::Arc;

use allowance::app::Allowance;
use allowance::clock::ManualClock;
use allowance::domain::{
    AccountKey, Amount, HoldTtl, KeyId, Metadata, Reserve, ReserveOutcome, TransactionId, Unit, Window,
};
use allowance::storage::postgres::PgStore;
use chrono::TimeDelta;
use sqlx::PgPool;

use crate::helpers::epoch;

const ROUND_1: [&str; 2] = [
    include_str!("../../migrations/20261122000001_ledger.sql"),
    include_str!("../../migrations/20261122000002_transactions_statistics.sql"),
];
const QUOTAS: &str = include_str!("../../migrations/20261201000001_limits_as_data.sql");
/// Migrations after the quota model: applied too, for the current binary.
const LATER: [&str; 4] = [
    include_str!("../../migrations/20261202000001_callers_and_audit.sql"),
    include_str!("../../migrations/20261202000002_rate_limits.sql"),
    include_str!("../../migrations/20261203000001_partitioned_history.sql"),
    include_str!("../../migrations/20261204000001_hot_commits.sql"),
];

#[sqlx::test(migrations = false)]
async fn round_1_accounts_keep_their_limits_and_totals(pool: PgPool) {
    for m in ROUND_1 {
        sqlx::raw_sql(m).execute(&pool).await.unwrap();
    }
    let now = epoch();
    // One key with a daily limit: 300 committed an hour ago, 50 held half an hour ago, 200 committed two days
    // ago (in the week, not the day). The totals are what round 1 kept for them.
    let day = |d: i64| now - TimeDelta::days(d);
    sqlx::query(
        "INSERT INTO accounts (key_id, unit, limit_daily, limit_annual,
                               committed_daily, committed_weekly, committed_monthly, committed_annual,
                               held_daily, held_weekly, held_monthly, held_annual,
                               aged_daily, aged_weekly, aged_monthly, aged_annual)
         VALUES ('k', 'usd', 1000, 5000, 300, 500, 500, 500, 50, 50, 50, 50, $1, $2, $3, $4)",
    )
    .bind(day(1))
    .bind(day(7))
    .bind(day(30))
    .bind(day(365))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO transactions (transaction_id, account_id, amount, held_amount, state, created_at, expires_at,
                                   committed_at, metadata)
         SELECT t.id, a.id, t.amount, t.amount, t.state, t.created_at, t.expires_at, t.committed_at, '{\"o\":\"1\"}'
         FROM accounts a,
              (VALUES ('t1', 300::bigint, 2::int2, $1::timestamptz, NULL::timestamptz, $1::timestamptz),
                      ('t2', 50, 1, $2, $3, NULL),
                      ('t3', 200, 2, $4, NULL, $4)) AS t(id, amount, state, created_at, expires_at, committed_at)",
    )
    .bind(now - TimeDelta::hours(1))
    .bind(now - TimeDelta::minutes(30))
    .bind(now + TimeDelta::minutes(30))
    .bind(day(2))
    .execute(&pool)
    .await
    .unwrap();

    sqlx::raw_sql(QUOTAS).execute(&pool).await.unwrap();
    for m in LATER {
        sqlx::raw_sql(m).execute(&pool).await.unwrap();
    }

    let clock = ManualClock::new(now);
    let app = Allowance::new(Arc::new(PgStore::new(pool.clone())), Arc::new(clock.clone()));
    let account = AccountKey::new(KeyId::parse("k").unwrap(), Unit::parse("usd").unwrap());
    let usage = app.get_limits(account.clone()).await.unwrap();
    let names: Vec<(&str, Option<i64>, i128, i128)> =
        usage.limits.iter().map(|u| (u.name.as_str(), u.limit, u.spent, u.held)).collect();
    assert_eq!(names, [("annual", Some(5000), 500, 50), ("daily", Some(1000), 300, 50)]);
    let weekly = usage.windows.iter().find(|w| w.window == Window::Weekly).unwrap();
    assert_eq!((weekly.limit, weekly.spent, weekly.held), (None, 500, 50));

    let reserve = |id: &str, amount| Reserve {
        transaction_id: TransactionId::parse(id).unwrap(),
        accounts: vec![account.clone()],
        amount: Amount::parse("amount", amount).unwrap(),
        hold_ttl: HoldTtl::parse(TimeDelta::minutes(15)).unwrap(),
        commit: false,
        metadata: Metadata::default(),
    };
    assert!(matches!(app.reserve(reserve("t4", 651)).await.unwrap(), ReserveOutcome::Denied { .. }));
    assert!(matches!(app.reserve(reserve("t5", 650)).await.unwrap(), ReserveOutcome::Allowed { .. }));
    let committed =
        app.commit(TransactionId::parse("t2").unwrap(), None, crate::helpers::actor()).await.unwrap();
    assert_eq!(committed.transaction.accounts, std::slice::from_ref(&account));
    assert_eq!(committed.transaction.metadata.entries()["o"], "1");
    // The day ages out the round-1 spend as before.
    clock.advance(TimeDelta::hours(23));
    let daily = app
        .get_limits(account)
        .await
        .unwrap()
        .limits
        .into_iter()
        .find(|u| u.name.as_str() == "daily")
        .unwrap();
    assert_eq!((daily.spent, daily.held), (50, 0), "t1 has left the day, t5's hold expired, t2 (50) remains");
}
