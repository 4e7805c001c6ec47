//! The `allowance` command line: the server and the operator's tools in one binary.
//!
//! Exit codes: 0 success; 1 error (the gRPC status and message go to stderr; also a health probe that is not
//! SERVING); 2 bad usage; 3 a reservation or rate check that was denied; 4 `reconcile` found divergences it did
//! not repair.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{DatabaseConfig, LogFormat, ServeConfig};

/// `println!` for a command's output: a reader that went away (`allowance audit list | head -n 1`) ends the
/// command quietly with status 141, as Unix tools end, where `println!` would panic. (Restoring SIGPIPE's
/// default instead would also end a command on a write to a closed socket: a TLS handshake refused by the
/// server did.)
macro_rules! outln {
    () => {
        $crate::cli::output::write_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write_line(format_args!($($arg)*))
    };
}

mod admin;
mod bench;
mod client;
mod history;
mod output;
mod ratelimit;
mod reconcile;
mod serve;
mod tls;

pub use client::{ClientOptions, HealthArgs, LimitsCommand, PlansCommand, ReserveArgs, TxCommand};

pub const EXIT_ERROR: u8 = 1;
pub const EXIT_DENIED: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "allowance",
    version,
    about = "Atomic spending limits over gRPC and Postgres",
    after_help = "Exit codes: 0 success, 1 error (gRPC status on stderr), 2 bad usage, 3 reservation or rate \
                  check denied, 4 reconcile found divergences.\n\n\
                  Every call but health needs a credential: --token or ALLOWANCE_TOKEN (<caller id>:<secret>).\n\n\
                  Example:\n  allowance serve --migrate            # with DATABASE_URL set\n  \
                  allowance limits set --key acct-42 --window daily --limit 1000\n  \
                  allowance plans put --name free --limit usd:daily:rolling=1d:100\n  \
                  allowance reserve --key acct-42 --tx tr-1 --amount 300"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "ALLOWANCE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API (SpendingLimits, grpc.health.v1, reflection) and Prometheus metrics.
    #[command(
        after_help = "Example:\n  DATABASE_URL=postgres://localhost/allowance allowance serve --migrate"
    )]
    Serve(Box<ServeConfig>),
    /// Apply pending database migrations, then exit.
    #[command(after_help = "Example:\n  DATABASE_URL=postgres://localhost/allowance allowance migrate")]
    Migrate(DatabaseConfig),
    /// Read or change a key's limits.
    #[command(subcommand)]
    Limits(LimitsCommand),
    /// Manage plans (named sets of limits that keys are put on).
    #[command(subcommand)]
    Plans(PlansCommand),
    /// Reserve spending: check every limit of the key (and of --also-key keys) and hold the amount, or be
    /// denied (exit code 3) with every exceeded limit and how long until a retry could fit.
    #[command(
        after_help = "Examples:\n  allowance reserve --key acct-42 --tx tr-1 --amount 300 --ttl 10m\n  \
                            allowance reserve --key acct-42 --tx tr-2 --amount 50 --commit --meta order=981\n  \
                            allowance reserve --key card-7 --also-key user-3 --also-key org-1 --tx tr-3 --amount 20"
    )]
    Reserve(ReserveArgs),
    /// Commit a hold for its final amount (default: the held amount).
    #[command(after_help = "Example:\n  allowance commit --tx tr-1 --amount 250")]
    Commit(client::CommitArgs),
    /// Reverse a transaction: release its hold or refund its spend.
    #[command(after_help = "Example:\n  allowance reverse --tx tr-1")]
    Reverse(client::ReverseArgs),
    /// Show transactions.
    #[command(subcommand)]
    Tx(TxCommand),
    /// Manage callers: who may call, with which scopes, on which keys.
    #[command(subcommand)]
    Callers(admin::CallersCommand),
    /// Read the audit trail of changes.
    #[command(subcommand)]
    Audit(admin::AuditCommand),
    /// Manage the rules of Envoy's rate-limit protocol (descriptors to keys and rate limits).
    #[command(subcommand)]
    Rules(ratelimit::RulesCommand),
    /// Check request rate limits (RateLimitService.CheckRate).
    #[command(subcommand)]
    Ratelimit(ratelimit::RatelimitCommand),
    /// Probe grpc.health.v1: exit 0 only when SERVING. For containers and scripts.
    #[command(after_help = "Example:\n  allowance health --addr http://127.0.0.1:50051 && echo ready")]
    Health(HealthArgs),
    /// Recompute every account's running totals from its transactions and report (or --repair) those that
    /// differ. Talks to the database directly.
    #[command(after_help = reconcile::HELP)]
    Reconcile(reconcile::ReconcileArgs),
    /// The partitions of the transaction history (talks to the database directly).
    #[command(subcommand)]
    Partitions(history::PartitionsCommand),
    /// Drop history older than the retention, exported first if asked (talks to the database directly).
    #[command(subcommand)]
    Retention(history::RetentionCommand),
    /// Drive a running server with load and report operations/s, latency percentiles and errors.
    Bench(bench::BenchArgs),
}

impl Command {
    /// The log level when RUST_LOG is unset: the server tells what it does, the tools stay quiet.
    fn default_log_level(&self) -> &'static str {
        match self {
            Command::Serve(_) | Command::Migrate(_) => "info",
            _ => "warn",
        }
    }
}

pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = match crate::telemetry::init(cli.log_format, cli.command.default_log_level()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: setting up telemetry: {e:#}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let code = match cli.command {
        Command::Serve(config) => report(serve::serve(*config).await),
        Command::Migrate(db) => report(serve::migrate(db).await),
        Command::Bench(args) => report(bench::run(args).await),
        Command::Partitions(command) => report(history::partitions(command).await),
        Command::Retention(command) => report(history::retention(command).await),
        Command::Reconcile(args) => match reconcile::run(args).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {}", crate::telemetry::causes(e.as_ref()));
                ExitCode::from(EXIT_ERROR)
            }
        },
        other => client::run(other).await,
    };
    telemetry.shutdown();
    code
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::telemetry::causes(e.as_ref()));
            ExitCode::from(EXIT_ERROR)
        }
    }
}
