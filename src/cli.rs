//! The `allowance` command line: the server and the operator's tools in one binary.

use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::app::Allowance;
use crate::clock::SystemClock;
use crate::config::{DatabaseConfig, LogFormat, ServeConfig};
use crate::grpc::{Defaults, Server};
use crate::storage::postgres::PgStore;

#[derive(Debug, Parser)]
#[command(name = "allowance", version, about = "Atomic spending limits over gRPC and Postgres")]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "ALLOWANCE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API (SpendingLimits, grpc.health.v1, reflection).
    ///
    /// Example: DATABASE_URL=postgres://localhost/allowance allowance serve --migrate
    Serve(ServeConfig),
    /// Apply pending database migrations, then exit.
    ///
    /// Example: DATABASE_URL=postgres://localhost/allowance allowance migrate
    Migrate(DatabaseConfig),
}

pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(config) => serve(config).await,
        Command::Migrate(db) => {
            let store = PgStore::connect(&db.database_url, 1).await.context("connecting to the database")?;
            store.migrate().await.context("applying migrations")?;
            tracing::info!("migrations applied");
            Ok(())
        }
    }
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(config.database.db_pool_size)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_lazy(&config.database.database_url)
        .context("DATABASE_URL is not a valid Postgres URL")?;
    let store = PgStore::new(pool);
    if config.migrate {
        store.migrate().await.context("applying migrations")?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "serving allowance.v1.SpendingLimits");
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    let server = Server {
        app: Allowance::new(Arc::new(store.clone()), Arc::new(SystemClock)),
        defaults: Defaults { unit: config.default_unit, hold_ttl: config.default_hold_ttl },
        health_interval: config.health_interval,
    };
    server.run(listener, shutdown).await?;
    store.pool().close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
    shutdown.cancel();
}
