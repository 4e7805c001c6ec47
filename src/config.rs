//! Configuration: flags, each with an environment variable and a default. Values are validated while parsing,
//! so a bad value stops start-up with a message naming it.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::domain::{HoldTtl, Unit};

#[derive(Debug, Clone, Args)]
pub struct DatabaseConfig {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Most connections the pool opens.
    #[arg(long, env = "ALLOWANCE_DB_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_pool_size: u32,
}

#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    #[command(flatten)]
    pub database: DatabaseConfig,
    /// Address the gRPC server listens on.
    #[arg(long, env = "ALLOWANCE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub tls: crate::tls::ServerTlsArgs,
    /// Hold TTL when a reservation does not set one (1s to 30d), e.g. 15m, 90s, 1h.
    #[arg(long, env = "ALLOWANCE_DEFAULT_HOLD_TTL", default_value = "15m", value_parser = parse_hold_ttl)]
    pub default_hold_ttl: HoldTtl,
    /// Unit used when a request leaves it empty.
    #[arg(long, env = "ALLOWANCE_DEFAULT_UNIT", default_value = "default", value_parser = parse_unit)]
    pub default_unit: Unit,
    /// Apply pending migrations before serving.
    #[arg(long, env = "ALLOWANCE_MIGRATE")]
    pub migrate: bool,
    /// How often database readiness is checked for grpc.health.v1, e.g. 1s.
    #[arg(long, env = "ALLOWANCE_HEALTH_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub health_interval: Duration,
    /// Address of the Prometheus metrics endpoint (path /metrics).
    #[arg(long, env = "ALLOWANCE_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    pub metrics_listen: SocketAddr,
    /// On SIGTERM/SIGINT: how long health reads NOT_SERVING while calls are still served, so load balancers
    /// stop routing here before the listener closes.
    #[arg(long, env = "ALLOWANCE_SHUTDOWN_DRAIN", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_drain: Duration,
    /// On SIGTERM/SIGINT: the most time in-flight calls get to finish once the listener has closed.
    #[arg(long, env = "ALLOWANCE_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Batches (database transactions) that may run at once; each uses one connection.
    #[arg(long, env = "ALLOWANCE_BATCH_WORKERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub batch_workers: u16,
    /// Most operations coalesced into one batch; 1 turns group commit off.
    #[arg(long, env = "ALLOWANCE_BATCH_MAX", default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub batch_max: u16,
    /// How often holds that expired on keys nobody has called since are released.
    #[arg(long, env = "ALLOWANCE_SWEEP_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub sweep_interval: Duration,
    /// How often every account's running totals and hold bookkeeping are checked against the ledger, on one
    /// replica at a time (report only: a log line per divergence and the allowance_reconcile_divergences
    /// gauge); 0 turns it off.
    #[arg(long, env = "ALLOWANCE_RECONCILE_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    pub reconcile_interval: Duration,
    /// How often partitions of the transaction history are created ahead and old ones dropped, on one
    /// replica at a time; 0 turns the job off.
    #[arg(long, env = "ALLOWANCE_HISTORY_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    pub history_interval: Duration,
    #[command(flatten)]
    pub history: HistoryConfig,
    /// Serve without authentication: any client that reaches the port may do anything. For local
    /// development only; logs a warning at start-up.
    #[arg(long, env = "ALLOWANCE_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// How often the callers table is re-read: the longest a revocation (or a caller created on another
    /// replica) takes to apply here.
    #[arg(long, env = "ALLOWANCE_AUTH_REFRESH", default_value = "2s", value_parser = parse_duration)]
    pub auth_refresh: Duration,
    /// How often the rules of Envoy's rate-limit protocol are re-read: the longest a rule change made on
    /// another replica takes to apply here.
    #[arg(long, env = "ALLOWANCE_RULES_REFRESH", default_value = "2s", value_parser = parse_duration)]
    pub rules_refresh: Duration,
    /// Rate-limit batches that may run at once (each on its own connection, committing asynchronously).
    #[arg(long, env = "ALLOWANCE_RATE_WORKERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub rate_workers: u16,
    /// After this long without a successful re-read (the database unreachable), calls are refused with
    /// UNAVAILABLE rather than checked against a copy that may miss revocations.
    #[arg(long, env = "ALLOWANCE_AUTH_MAX_STALENESS", default_value = "30s", value_parser = parse_duration)]
    pub auth_max_staleness: Duration,
}

impl ServeConfig {
    /// Checks across settings that no single parser can see.
    pub fn validate(&self) -> Result<(), String> {
        if u32::from(self.batch_workers) > self.database.db_pool_size {
            return Err(format!(
                "ALLOWANCE_BATCH_WORKERS ({}) must not exceed ALLOWANCE_DB_POOL_SIZE ({}): each batch holds a connection",
                self.batch_workers, self.database.db_pool_size
            ));
        }
        if self.listen == self.metrics_listen {
            return Err(format!("ALLOWANCE_LISTEN and ALLOWANCE_METRICS_LISTEN are both {}", self.listen));
        }
        self.tls.validate()?;
        if self.health_interval.is_zero()
            || self.sweep_interval.is_zero()
            || self.auth_refresh.is_zero()
            || self.rules_refresh.is_zero()
        {
            return Err(
                "ALLOWANCE_HEALTH_INTERVAL, ALLOWANCE_SWEEP_INTERVAL, ALLOWANCE_AUTH_REFRESH and ALLOWANCE_RULES_REFRESH must be positive".into()
            );
        }
        if self.auth_max_staleness <= self.auth_refresh {
            return Err(format!(
                "ALLOWANCE_AUTH_MAX_STALENESS ({:?}) must be longer than ALLOWANCE_AUTH_REFRESH ({:?})",
                self.auth_max_staleness, self.auth_refresh
            ));
        }
        Ok(())
    }
}

/// Retention of history: shared by `allowance serve` and `allowance retention run`.
#[derive(Debug, Clone, Args)]
pub struct HistoryConfig {
    /// How long transactions are kept, e.g. 430d. Never less than the longest spending period configured
    /// plus the longest hold (30d) plus a day: the service raises a shorter one to that floor with a
    /// warning; `allowance retention run` refuses it.
    #[arg(long, env = "ALLOWANCE_RETENTION", default_value = "430d", value_parser = parse_duration)]
    pub retention: Duration,
    /// Months of partitions created ahead of the current one.
    #[arg(long = "partitions-ahead", env = "ALLOWANCE_PARTITIONS_AHEAD", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=24))]
    pub partitions_ahead: u32,
    /// Directory where each partition is written as CSV (<partition>.csv) before it is dropped.
    #[arg(long, env = "ALLOWANCE_EXPORT_DIR", value_name = "DIR")]
    pub export_dir: Option<std::path::PathBuf>,
    /// How long audit events are kept, e.g. 730d; 0 keeps them for ever.
    #[arg(long, env = "ALLOWANCE_AUDIT_RETENTION", default_value = "0s", value_parser = parse_duration)]
    pub audit_retention: Duration,
}

impl HistoryConfig {
    /// The settings of a run; `strict`: refuse a retention below the floor instead of raising it;
    /// `make_export_dir`: make the export directory if missing (as `mkdir -p` would; not for a dry run, which
    /// makes nothing). A file of that name is an error either way.
    pub fn settings(
        &self,
        strict: bool,
        make_export_dir: bool,
    ) -> Result<crate::app::RetentionSettings, String> {
        let delta = |d: Duration| chrono::TimeDelta::from_std(d).map_err(|e| e.to_string());
        if let Some(dir) = &self.export_dir {
            let usable = match make_export_dir {
                true => std::fs::create_dir_all(dir),
                false if dir.exists() && !dir.is_dir() => Err(std::io::ErrorKind::NotADirectory.into()),
                false => Ok(()),
            };
            usable.map_err(|e| {
                format!("ALLOWANCE_EXPORT_DIR {}: cannot use it as a directory: {e}", dir.display())
            })?;
        }
        Ok(crate::app::RetentionSettings {
            retention: delta(self.retention)?,
            ahead_months: self.partitions_ahead,
            export_dir: self.export_dir.clone(),
            audit_retention: (!self.audit_retention.is_zero())
                .then(|| delta(self.audit_retention))
                .transpose()?,
            strict,
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A duration as humantime writes it (`90s`, `15m`, `1h 30m`, `30d`), but never in months or years: their
/// lengths vary, and humantime would read `1y` as 365 days and 6 hours.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let mut units = s.split(|c: char| !c.is_ascii_alphabetic());
    if let Some(u) = units.find(|u| matches!(*u, "y" | "year" | "years" | "M" | "month" | "months")) {
        return Err(format!(
            "{s:?}: months and years vary in length; give days (e.g. 365d), or use a calendar period (got {u:?})"
        ));
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 90s, 15m, 1h)"))
}

fn parse_hold_ttl(s: &str) -> Result<HoldTtl, String> {
    let d = parse_duration(s)?;
    let d = chrono::TimeDelta::from_std(d).map_err(|e| e.to_string())?;
    HoldTtl::parse(d).map_err(|e| e.reason)
}

fn parse_unit(s: &str) -> Result<Unit, String> {
    Unit::parse(s).map_err(|e| e.reason)
}
