//! Databases for tests that cannot use `#[sqlx::test]` (sync proptest runners).

use allowance::storage::postgres::MIGRATOR;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

/// A new, migrated database on the server of `DATABASE_URL`.
pub async fn migrated_pool(name: &str) -> PgPool {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL must name a Postgres server for tests");
    let options: PgConnectOptions = url.parse().expect("DATABASE_URL");
    let db =
        format!("allowance_test_{name}_{}_{}", std::process::id(), chrono::Utc::now().timestamp_micros());
    let mut admin = PgConnection::connect_with(&options).await.expect("connect to DATABASE_URL");
    sqlx::query(&format!("CREATE DATABASE {db}")).execute(&mut admin).await.unwrap();
    let pool = PgPoolOptions::new().max_connections(8).connect_with(options.database(&db)).await.unwrap();
    MIGRATOR.run(&pool).await.unwrap();
    pool
}
