use std::time::Duration;

use metrics::gauge;
use tokio::net::TcpListener;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::layer::ObserveLayer;
use super::pb::spending_limits_server::SpendingLimitsServer;
use super::{Defaults, SpendingLimitsService, pb};
use crate::app::Allowance;
use crate::storage::Store;

/// The fully qualified name of the service, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "allowance.v1.SpendingLimits";
/// A health name that is SERVING while the process runs, whatever the database does: for liveness probes,
/// so that a database outage does not get every replica restarted.
pub const LIVENESS: &str = "liveness";

/// The longest a readiness check may take before it counts as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// How the server stops.
#[derive(Debug, Clone, Copy)]
pub struct Lifecycle {
    /// How often readiness (database reachable and migrated) is checked for grpc.health.v1.
    pub health_interval: Duration,
    /// After shutdown begins: how long health reads NOT_SERVING while calls are still taken, so that load
    /// balancers stop sending before the listener closes.
    pub drain_delay: Duration,
    /// After the listener closes: the most time in-flight calls get to finish.
    pub grace: Duration,
    /// How often holds that expired on untouched keys are released (and the open-holds gauge refreshed).
    pub sweep_interval: Duration,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            health_interval: Duration::from_secs(1),
            drain_delay: Duration::ZERO,
            grace: Duration::from_secs(20),
            sweep_interval: Duration::from_secs(15),
        }
    }
}

/// The gRPC server: SpendingLimits, grpc.health.v1 and reflection on one port.
pub struct Server<S> {
    pub app: Allowance<S>,
    pub defaults: Defaults,
    pub lifecycle: Lifecycle,
    /// TLS (and mTLS) on the gRPC port; `None` serves plaintext HTTP/2.
    pub tls: Option<crate::tls::ServerTls>,
}

impl<S: Store> Server<S> {
    /// Serves on `listener` until `shutdown` is cancelled, then: health turns NOT_SERVING, calls are still
    /// served for the drain delay, the listener closes and in-flight calls get up to the grace period.
    /// Health reads NOT_SERVING until the store is first found ready, and follows it while running.
    pub async fn run(self, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (reporter, health_service) = tonic_health::server::health_reporter();
        set_health(&reporter, ServingStatus::NotServing).await;
        reporter.set_service_status(LIVENESS, ServingStatus::Serving).await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let Lifecycle { health_interval, drain_delay, grace, sweep_interval } = self.lifecycle;
        // Background loops stop with this token, once the server has stopped serving.
        let stopped = CancellationToken::new();
        let watcher =
            tokio::spawn(watch_health(self.app.clone(), reporter.clone(), health_interval, shutdown.clone()));
        let sweeper = tokio::spawn(sweep(self.app.clone(), sweep_interval, stopped.clone()));
        let service = SpendingLimitsService::new(self.app, self.defaults);
        let signal = {
            let shutdown = shutdown.clone();
            let reporter = reporter.clone();
            async move {
                shutdown.cancelled().await;
                set_health(&reporter, ServingStatus::NotServing).await;
                tracing::info!(?drain_delay, "shutting down: health is NOT_SERVING");
                tokio::time::sleep(drain_delay).await;
                tracing::info!(?grace, "closing the listener; waiting for in-flight calls");
            }
        };
        let router = tonic::transport::Server::builder()
            .layer(ObserveLayer)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(SpendingLimitsServer::new(service));
        // TCP_NODELAY on every accepted connection (the TLS listener sets it too): without it a response
        // written in two pieces waits for the client's delayed ACK (40 ms on Linux) — seen as 50 ms pairs
        // once responses grew past one write. `Server::tcp_nodelay` does not apply to a listener of our own.
        let serve = match self.tls {
            None => Either::Left(router.serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                signal,
            )),
            Some(tls) => Either::Right(router.serve_with_incoming_shutdown(tls.incoming(listener), signal)),
        };
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(drain_delay + grace).await;
        };
        let result = tokio::select! {
            result = serve => result.map_err(anyhow::Error::from),
            () = deadline => {
                tracing::warn!("grace period over: abandoning calls still in flight");
                Ok(())
            }
        };
        shutdown.cancel();
        stopped.cancel();
        // The loops may be waiting on an unreachable database: they must not hold shutdown past the grace.
        watcher.abort();
        sweeper.abort();
        result
    }
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

async fn watch_health<S: Store>(
    app: Allowance<S>,
    reporter: HealthReporter,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut last = None;
    loop {
        // Bounded: a database that stopped answering must not hold health at SERVING for the pool's whole
        // connect timeout.
        let check = tokio::time::timeout(interval.max(READY_TIMEOUT), app.store().ready()).await;
        let status = match check {
            Ok(Ok(())) => ServingStatus::Serving,
            failed => {
                if last != Some(ServingStatus::NotServing) {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "the readiness check timed out".to_owned(),
                    };
                    tracing::warn!(%error, "not ready: reporting NOT_SERVING");
                }
                ServingStatus::NotServing
            }
        };
        // Once shutdown has begun, health stays NOT_SERVING.
        if shutdown.is_cancelled() {
            return;
        }
        gauge!("allowance_ready").set(if status == ServingStatus::Serving { 1.0 } else { 0.0 });
        if let Some(stats) = app.store().pool_stats() {
            gauge!("allowance_db_pool_connections", "state" => "idle").set(f64::from(stats.idle));
            gauge!("allowance_db_pool_connections", "state" => "in_use")
                .set(f64::from(stats.open.saturating_sub(stats.idle)));
            gauge!("allowance_db_pool_max_connections").set(f64::from(stats.max));
            gauge!("allowance_db_pool_waiting").set(stats.waiting as f64);
        }
        if last != Some(status) {
            if status == ServingStatus::Serving {
                tracing::info!("ready: reporting SERVING");
            }
            set_health(&reporter, status).await;
            last = Some(status);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Releases expired holds of untouched keys and refreshes the open-holds gauge.
async fn sweep<S: Store>(app: Allowance<S>, interval: Duration, stopped: CancellationToken) {
    loop {
        match app.sweep_expired(100).await {
            Ok(n) if n > 0 => tracing::debug!(released = n, "released expired holds"),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "sweeping expired holds failed"),
        }
        if let Ok(n) = app.open_holds().await {
            gauge!("allowance_open_holds").set(n as f64);
        }
        tokio::select! {
            _ = stopped.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
