//! Databases for tests that cannot use `#[sqlx::test]` (sync proptest runners), dropped when done.

use allowance::storage::postgres::MIGRATOR;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

/// A migrated database of its own on the server of `DATABASE_URL`, dropped when this is dropped (also when
/// the test panics), so that runs do not leave databases behind.
pub struct TestDatabase {
    pub pool: PgPool,
    name: String,
    admin: PgConnectOptions,
}

impl TestDatabase {
    pub async fn create(name: &str) -> Self {
        let url = std::env::var("DATABASE_URL").expect("DATABASE_URL must name a Postgres server for tests");
        let admin: PgConnectOptions = url.parse().expect("DATABASE_URL");
        let name =
            format!("allowance_test_{name}_{}_{}", std::process::id(), chrono::Utc::now().timestamp_micros());
        let mut conn = PgConnection::connect_with(&admin).await.expect("connect to DATABASE_URL");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(admin.clone().database(&name))
            .await
            .unwrap();
        MIGRATOR.run(&pool).await.unwrap();
        Self { pool, name, admin }
    }

    /// The database's URL, for processes of their own (the shipped binary).
    pub fn url(&self) -> String {
        let url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
        let (server, _) = url.rsplit_once('/').expect("DATABASE_URL names a database");
        format!("{server}/{}", self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // On a thread of its own with its own runtime: drop may run inside or outside a runtime.
        // The pool's connections belong to the test's runtime, which may not be running now: they are not
        // closed from here, FORCE ends them.
        let (name, admin) = (self.name.clone(), self.admin.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect_with(&admin).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await?;
                anyhow::Ok(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}: {dropped:?}", self.name);
        }
    }
}
