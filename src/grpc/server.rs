use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::pb::spending_limits_server::SpendingLimitsServer;
use super::{Defaults, SpendingLimitsService, pb};
use crate::app::Allowance;
use crate::storage::Store;

/// The fully qualified name of the service, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "allowance.v1.SpendingLimits";

/// The gRPC server: SpendingLimits, grpc.health.v1 and reflection on one port.
pub struct Server<S> {
    pub app: Allowance<S>,
    pub defaults: Defaults,
    /// How often readiness (database reachable and migrated) is checked for the health service.
    pub health_interval: Duration,
}

impl<S: Store> Server<S> {
    /// Serves on `listener` until `shutdown` is cancelled. Health reads NOT_SERVING until the store is first
    /// found ready, follows the store while running, and turns NOT_SERVING as soon as shutdown begins.
    pub async fn run(self, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (reporter, health_service) = tonic_health::server::health_reporter();
        set_health(&reporter, ServingStatus::NotServing).await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let store = self.app.clone();
        let watcher =
            tokio::spawn(watch_health(store, reporter.clone(), self.health_interval, shutdown.clone()));
        let service = SpendingLimitsService::new(self.app, self.defaults);
        let signal = {
            let shutdown = shutdown.clone();
            let reporter = reporter.clone();
            async move {
                shutdown.cancelled().await;
                set_health(&reporter, ServingStatus::NotServing).await;
            }
        };
        let result = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(SpendingLimitsServer::new(service))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
            .await;
        shutdown.cancel();
        let _ = watcher.await;
        Ok(result?)
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
        let status = match app.store().ready().await {
            Ok(()) => ServingStatus::Serving,
            Err(e) => {
                if last != Some(ServingStatus::NotServing) {
                    tracing::warn!(error = %e, "not ready: reporting NOT_SERVING");
                }
                ServingStatus::NotServing
            }
        };
        if shutdown.is_cancelled() {
            return;
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
