//! `allowance serve` and `allowance migrate`.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::app::{Allowance, BatchConfig, RateBatchConfig};
use crate::clock::SystemClock;
use crate::config::{DatabaseConfig, ServeConfig};
use crate::grpc::{Authentication, Defaults, Lifecycle, Server};
use crate::storage::postgres::PgStore;

pub async fn migrate(db: DatabaseConfig) -> anyhow::Result<()> {
    let store = PgStore::connect(&db.database_url, 1).await.context("connecting to the database")?;
    store.migrate().await.context("applying migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg).context("invalid configuration")?;
    let tls = crate::tls::ServerTls::from_args(&config.tls).context("TLS")?;
    let options = PgStore::serving_options(&config.database.database_url)
        .context("DATABASE_URL is not a valid Postgres URL")?;
    // Lazy: the server starts (NOT_SERVING) while the database is down, and becomes ready when it is up.
    let pool = PgStore::pool_options(config.database.db_pool_size).connect_lazy_with(options);
    // Rate-limit batches commit asynchronously, on connections of their own (see PgStore::rate_options).
    let rate_pool = PgStore::pool_options(config.rate_workers.into())
        .connect_lazy_with(PgStore::rate_options(&config.database.database_url)?);
    let history =
        config.history.settings(false, true).map_err(anyhow::Error::msg).context("invalid configuration")?;
    let store = PgStore::new(pool).with_rate_pool(rate_pool).with_database_clock();
    if config.migrate {
        store.migrate().await.context("applying migrations")?;
    }
    crate::telemetry::install_metrics(config.metrics_listen)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        metrics = %config.metrics_listen,
        "serving allowance.v1.SpendingLimits"
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    let batching = BatchConfig { workers: config.batch_workers.into(), max_batch: config.batch_max.into() };
    let server = Server {
        app: Allowance::new(Arc::new(store.clone()), Arc::new(SystemClock))
            .with_callers_max_age(config.auth_max_staleness)
            .with_history(history)
            .with_batching(batching)
            .with_rate_batching(RateBatchConfig { workers: config.rate_workers.into(), max_batch: 512 }),
        defaults: Defaults { unit: config.default_unit, hold_ttl: config.default_hold_ttl },
        lifecycle: Lifecycle {
            health_interval: config.health_interval,
            drain_delay: config.shutdown_drain,
            grace: config.shutdown_grace,
            sweep_interval: config.sweep_interval,
            rules_refresh: config.rules_refresh,
            reconcile_interval: (!config.reconcile_interval.is_zero()).then_some(config.reconcile_interval),
            history_interval: (!config.history_interval.is_zero()).then_some(config.history_interval),
        },
        auth: if config.insecure_no_auth {
            Authentication::Off
        } else {
            Authentication::On { refresh: config.auth_refresh }
        },
        tls,
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
