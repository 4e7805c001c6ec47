//! Logs, traces and metrics. Logs go to stderr as text or JSON; spans are exported over OTLP only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (nothing is attempted otherwise); metrics are served for Prometheus.

use std::net::SocketAddr;

use anyhow::Context;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// What must be flushed before the process exits.
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops span export.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("flushing traces failed: {e}");
        }
    }
}

/// Installs the global subscriber. `default_level` applies when `RUST_LOG` is unset.
pub fn init(format: LogFormat, default_level: &str) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // W3C trace context is read from incoming requests whether or not spans are exported.
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default();
    let provider = if endpoint.trim().is_empty() {
        None
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .context("building the OTLP span exporter")?;
        let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "allowance".into());
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
        Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
    };
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("allowance")));
    tracing_subscriber::registry().with(filter).with(logs).with(otel).try_init()?;
    Ok(Telemetry { provider })
}

/// An error and its causes, each once, e.g. "transport error: invalid peer certificate: UnknownIssuer" (sqlx
/// repeats a database error's text as its source): for messages and logs.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.ends_with(&s_text) {
            text = format!("{text}: {s_text}");
        }
        source = s.source();
    }
    text
}

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Serves `/metrics` on `listen` and describes every metric.
pub fn install_metrics(listen: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("allowance_batch_size".into()), BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("allowance_rate_batch_size".into()), BATCH_BUCKETS)?
        .install()
        .with_context(|| format!("serving metrics on {listen}"))?;
    describe();
    register_at_zero();
    gauge!("allowance_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(())
}

/// Counters and gauges start at zero with every label value they can take, so dashboards and alerts see them
/// from the first scrape (a `rate()` over a series that appears late misses its first increments).
/// Histograms appear with their first observation.
fn register_at_zero() {
    for outcome in ["allowed", "denied", "replayed"] {
        counter!("allowance_reservations_total", "outcome" => outcome).absolute(0);
    }
    for window in crate::domain::Window::ALL {
        counter!("allowance_reservations_exceeded_total", "window" => window.as_str()).absolute(0);
    }
    for late in ["true", "false"] {
        counter!("allowance_commits_total", "late" => late).absolute(0);
    }
    for from in ["held", "committed", "expired", "reversed"] {
        counter!("allowance_reverses_total", "from" => from).absolute(0);
    }
    for kind in ["unavailable", "contended", "corrupt", "export"] {
        counter!("allowance_db_errors_total", "kind" => kind).absolute(0);
    }
    counter!("allowance_holds_expired_total").absolute(0);
    for result in ["ok", "error"] {
        counter!("allowance_reconcile_runs_total", "result" => result).absolute(0);
    }
    counter!("allowance_history_partitions_created_total").absolute(0);
    counter!("allowance_history_partitions_dropped_total").absolute(0);
    for reason in crate::domain::AuthFailure::REASONS {
        counter!("allowance_auth_failures_total", "reason" => reason).absolute(0);
    }
    gauge!("allowance_auth_callers").set(0.0);
    gauge!("allowance_auth_cache_age_seconds").set(0.0);
    gauge!("allowance_open_holds").set(0.0);
    gauge!("allowance_ready").set(0.0);
    gauge!("allowance_db_pool_waiting").set(0.0);
    gauge!("allowance_db_pool_max_connections").set(0.0);
    for state in ["idle", "in_use"] {
        gauge!("allowance_db_pool_connections", "state" => state).set(0.0);
    }
}

/// Descriptions of every metric the service records.
pub fn describe() {
    crate::app::describe_metrics();
    crate::tls::describe_metrics();
    describe_histogram!(
        "allowance_grpc_request_duration_seconds",
        metrics::Unit::Seconds,
        "gRPC request latency by method and status code."
    );
    describe_gauge!("allowance_open_holds", "Holds not yet committed, reversed or expired.");
    describe_gauge!("allowance_db_pool_connections", "Database connections by state (idle, in_use).");
    describe_gauge!("allowance_db_pool_max_connections", "Most connections the pool may open.");
    describe_gauge!("allowance_db_pool_waiting", "Tasks waiting for a database connection.");
    describe_counter!(
        "allowance_db_errors_total",
        "Database failures by kind (unavailable, contended, corrupt, export)."
    );
    describe_gauge!(
        "allowance_ready",
        "1 while the database is reachable and migrated and the credential cache is fresh, else 0."
    );
    describe_counter!(
        "allowance_auth_failures_total",
        "Calls refused by authentication or authorisation, by reason (never by caller, key or secret)."
    );
    describe_gauge!(
        "allowance_auth_callers",
        "Callers (revoked ones included) in this replica's credential cache."
    );
    describe_gauge!(
        "allowance_auth_cache_age_seconds",
        "Seconds since this replica last re-read the callers table."
    );
    describe_gauge!("allowance_build_info", "The running version.");
    describe_gauge!(
        "allowance_reconcile_divergences",
        "Periods whose running totals differed from the ledger at the last reconciliation this replica ran \
         (ALLOWANCE_RECONCILE_INTERVAL; one replica at a time: aggregate with max)."
    );
    describe_counter!(
        "allowance_reconcile_runs_total",
        "Reconciliations this replica ran, by result (ok, error); rounds another replica ran are not counted."
    );
}
