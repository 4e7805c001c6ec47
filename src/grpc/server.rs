use std::time::Duration;

use metrics::{counter, gauge};
use tokio::net::TcpListener;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::admin::AdminService;
use super::auth::AuthLayer;
use super::layer::ObserveLayer;
use super::pb::admin_service_server::AdminServiceServer;
use super::pb::rate_limit_service_server::RateLimitServiceServer;
use super::pb::spending_limits_server::SpendingLimitsServer;
use super::{Defaults, SpendingLimitsService, pb};
use super::{EnvoyRateLimitService, RateLimitService};
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
    /// How often the rules of Envoy's protocol are re-read: the longest a rule change takes to apply here.
    pub rules_refresh: Duration,
    /// How often every account's totals are checked against the ledger (on one replica at a time; report
    /// only, never repaired); `None`: never.
    pub reconcile_interval: Option<Duration>,
    /// How often partitions are created ahead and old history dropped (on one replica at a time, with the
    /// app's [`RetentionSettings`](crate::app::RetentionSettings)); `None`: never.
    pub history_interval: Option<Duration>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            health_interval: Duration::from_secs(1),
            drain_delay: Duration::ZERO,
            grace: Duration::from_secs(20),
            sweep_interval: Duration::from_secs(15),
            rules_refresh: Duration::from_secs(2),
            reconcile_interval: Some(Duration::from_secs(3600)),
            history_interval: Some(Duration::from_secs(3600)),
        }
    }
}

/// Whether calls must present a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authentication {
    /// Every call is anonymous and may do anything: for development and tests only.
    Off,
    /// Every call but health and reflection presents a credential, checked against a copy of the callers
    /// table re-read every `refresh`: a revocation takes effect on this replica within that time.
    On { refresh: Duration },
}

/// The gRPC server: SpendingLimits, AdminService, grpc.health.v1 and reflection on one port.
pub struct Server<S> {
    pub app: Allowance<S>,
    pub defaults: Defaults,
    pub lifecycle: Lifecycle,
    pub auth: Authentication,
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
        // v1 and v1alpha: grpcurl speaks v1, Python's grpcio-reflection and older tools only v1alpha.
        let reflection_builder = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(pb::ENVOY_RLS_DESCRIPTOR_SET)
        };
        let reflection = reflection_builder().build_v1()?;
        let reflection_v1alpha = reflection_builder().build_v1alpha()?;
        let Lifecycle {
            health_interval,
            drain_delay,
            grace,
            sweep_interval,
            rules_refresh,
            reconcile_interval,
            history_interval,
        } = self.lifecycle;
        // Background loops stop with this token, once the server has stopped serving.
        let stopped = CancellationToken::new();
        // With authentication on, a replica is ready only once it can check credentials.
        let credentials = (self.auth != Authentication::Off).then(|| self.app.caller_cache());
        let watcher = tokio::spawn(watch_health(
            self.app.clone(),
            credentials,
            reporter.clone(),
            health_interval,
            shutdown.clone(),
        ));
        let sweeper = tokio::spawn(sweep(self.app.clone(), sweep_interval, stopped.clone()));
        let reconciler = reconcile_interval
            .map(|every| tokio::spawn(reconcile(self.app.clone(), every, shutdown.clone())));
        let historian =
            history_interval.map(|every| tokio::spawn(history(self.app.clone(), every, shutdown.clone())));
        let (auth_layer, refresher) = match self.auth {
            Authentication::Off => {
                tracing::warn!("authentication is OFF: any client that reaches the port may do anything");
                (AuthLayer::new(None), None)
            }
            Authentication::On { refresh } => {
                let task = tokio::spawn(refresh_callers(self.app.clone(), refresh, stopped.clone()));
                (AuthLayer::new(Some(self.app.caller_cache())), Some(task))
            }
        };
        let rules = tokio::spawn(refresh_rules(self.app.clone(), rules_refresh, stopped.clone()));
        let admin = AdminService::new(self.app.clone(), self.defaults.unit.clone());
        let rate_limits = RateLimitService::new(self.app.clone(), self.defaults.clone());
        let envoy = EnvoyRateLimitService::new(self.app.clone());
        let service = SpendingLimitsService::new(self.app, self.defaults);
        let signal = {
            let shutdown = shutdown.clone();
            let reporter = reporter.clone();
            async move {
                shutdown.cancelled().await;
                set_health(&reporter, ServingStatus::NotServing).await;
                tracing::info!(?drain_delay, "shutting down: health is NOT_SERVING");
                tokio::time::sleep(drain_delay).await;
                // Health Watch streams (a load balancer watching) have seen NOT_SERVING during the drain; end
                // them now, or each would hold its connection — and so the shutdown — for the whole grace
                // period. Removing a status drops its sender: a stream delivers what it has not yet seen,
                // then ends.
                let mut reporter = reporter;
                for service in ["", SERVICE_NAME, LIVENESS] {
                    reporter.clear_service_status(service).await;
                }
                tracing::info!(?grace, "closing the listener; waiting for in-flight calls");
            }
        };
        let router = tonic::transport::Server::builder()
            // Outermost first: every call gets its request id and span, then authentication.
            .layer(tower::ServiceBuilder::new().layer(ObserveLayer).layer(auth_layer))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(SpendingLimitsServer::new(service))
            .add_service(AdminServiceServer::new(admin))
            .add_service(RateLimitServiceServer::new(rate_limits))
            .add_service(
                envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer::new(
                    envoy,
                ),
            );
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
        rules.abort();
        if let Some(reconciler) = reconciler {
            reconciler.abort();
        }
        if let Some(historian) = historian {
            historian.abort();
        }
        if let Some(refresher) = refresher {
            refresher.abort();
        }
        result
    }
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

async fn watch_health<S: Store>(
    app: Allowance<S>,
    credentials: Option<std::sync::Arc<crate::app::CallerCache>>,
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
            Ok(Ok(())) if credentials.as_ref().is_some_and(|c| !c.is_fresh()) => {
                // Not at start-up, where the first read is simply still to come.
                if last == Some(ServingStatus::Serving) {
                    tracing::warn!(
                        "not ready: the credentials are too old to check calls; reporting NOT_SERVING"
                    );
                }
                ServingStatus::NotServing
            }
            Ok(Ok(())) => ServingStatus::Serving,
            failed => {
                if last != Some(ServingStatus::NotServing) {
                    let error = match failed {
                        // With its causes: "database unavailable" alone does not say what failed.
                        Ok(Err(e)) => crate::telemetry::causes(&e),
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

/// Every `interval`, checks every account's running totals and hold bookkeeping against the ledger — on one
/// replica at a time (a database advisory lock; a replica that finds it taken skips the round) — and reports
/// what diverges: an ERROR line per diverging period, stale hold or account whose bookkeeping diverges, and
/// their number in the gauge `allowance_reconcile_divergences`. It never repairs:
/// a divergence is a bug or a hand edit to look at (`allowance reconcile --repair` fixes it). Stops when
/// shutdown begins.
async fn reconcile<S: Store>(app: Allowance<S>, interval: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let started = std::time::Instant::now();
        let run = app.store().exclusively(crate::storage::RECONCILE_JOB, app.reconcile(None));
        let report = tokio::select! {
            _ = shutdown.cancelled() => return,
            report = run => report,
        };
        match report {
            Ok(Some(Ok(report))) => {
                for d in &report.divergences {
                    tracing::error!(
                        key = %d.account.key_id,
                        unit = %d.account.unit,
                        period = %d.period,
                        running_committed = %d.running.committed,
                        running_held = %d.running.held,
                        ledger_committed = %d.ledger.committed,
                        ledger_held = %d.ledger.held,
                        "running totals diverge from the ledger (allowance reconcile --repair fixes them)"
                    );
                }
                for h in &report.stale_holds {
                    tracing::error!(
                        key = %h.account.key_id,
                        unit = %h.account.unit,
                        transaction_id = %h.transaction_id,
                        expires_at = %h.expires_at,
                        last_write = %h.cursor,
                        "a hold expired before its account's last write and was never released \
                         (allowance reconcile --repair releases it)"
                    );
                }
                for b in &report.hold_bookkeeping {
                    tracing::error!(
                        key = %b.account.key_id,
                        unit = %b.account.unit,
                        open_holds = b.open_holds,
                        open_hold_rows = b.open_hold_rows,
                        holds_until = ?b.holds_until,
                        latest_open_expiry = ?b.latest_expiry_after_cursor,
                        "an account's hold bookkeeping diverges from its rows (allowance reconcile --repair fixes it)"
                    );
                }
                let found =
                    report.divergences.len() + report.stale_holds.len() + report.hold_bookkeeping.len();
                gauge!("allowance_reconcile_divergences").set(found as f64);
                counter!("allowance_reconcile_runs_total", "result" => "ok").increment(1);
                tracing::info!(
                    accounts = report.accounts,
                    divergences = report.divergences.len(),
                    stale_holds = report.stale_holds.len(),
                    hold_bookkeeping = report.hold_bookkeeping.len(),
                    elapsed = ?started.elapsed(),
                    "reconciled running totals with the ledger"
                );
            }
            Ok(None) => tracing::debug!("reconciliation runs on another replica; skipped"),
            Ok(Some(Err(e))) => {
                counter!("allowance_reconcile_runs_total", "result" => "error").increment(1);
                tracing::warn!(error = %e, "reconciliation failed; trying again next round");
            }
            Err(e) => {
                counter!("allowance_reconcile_runs_total", "result" => "error").increment(1);
                tracing::warn!(error = %e, "reconciliation failed; trying again next round");
            }
        }
    }
}

/// At start and then every `interval`, creates history partitions ahead and drops those past retention —
/// on one replica at a time (the advisory lock of [`Store::exclusively`]; a replica that finds it taken
/// skips the round). A failed run logs a warning and is tried again next round. Stops when shutdown begins.
async fn history<S: Store>(app: Allowance<S>, interval: Duration, shutdown: CancellationToken) {
    loop {
        let settings = app.history_settings().clone();
        let run = app.store().exclusively(crate::storage::HISTORY_JOB, app.retention(&settings, false));
        let report = tokio::select! {
            _ = shutdown.cancelled() => return,
            report = run => report,
        };
        match report {
            Ok(Some(Ok(report))) => tracing::info!(
                created = ?report.created,
                dropped = ?report.dropped.iter().map(|d| &d.name).collect::<Vec<_>>(),
                kept = ?report.kept,
                audit_deleted = report.audit_deleted,
                "history partitions and retention done"
            ),
            Ok(None) => tracing::debug!("the history job runs on another replica; skipped"),
            Ok(Some(Err(e))) => tracing::warn!(error = %e, "history job failed; trying again next round"),
            Err(e) => tracing::warn!(error = %e, "history job failed; trying again next round"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Re-reads the callers table every `interval`, so that revocations and new callers made on other replicas
/// take effect here. A failed read keeps the last copy, which authentication trusts only up to its maximum
/// age.
async fn refresh_callers<S: Store>(app: Allowance<S>, interval: Duration, stopped: CancellationToken) {
    let mut failing = false;
    let mut last_ok = std::time::Instant::now();
    loop {
        match app.refresh_callers().await {
            Ok(n) => {
                if failing {
                    tracing::info!(callers = n, "credentials re-read");
                }
                failing = false;
                last_ok = std::time::Instant::now();
                gauge!("allowance_auth_callers").set(n as f64);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "re-reading credentials failed; keeping the last copy");
                }
                failing = true;
            }
        }
        gauge!("allowance_auth_cache_age_seconds").set(last_ok.elapsed().as_secs_f64());
        tokio::select! {
            _ = stopped.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Re-reads the rate-limit rules every `interval`; a failed read keeps the last ones (checks need the database
/// anyway, and answer UNAVAILABLE without it).
async fn refresh_rules<S: Store>(app: Allowance<S>, interval: Duration, stopped: CancellationToken) {
    let mut failing = false;
    loop {
        match app.refresh_rules().await {
            Ok(_) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "re-reading rate-limit rules failed; keeping the last ones");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = stopped.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
