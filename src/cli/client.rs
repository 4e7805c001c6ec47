//! The operator's client commands: each is one gRPC call to a running server.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use tonic::transport::{Channel, Endpoint};

use super::output::{self, Format};
use super::{Command, EXIT_DENIED, EXIT_ERROR};
use crate::config::parse_duration;
use crate::domain::Window;
use crate::grpc::pb::{self, spending_limits_client::SpendingLimitsClient};

#[derive(Debug, Clone, Args)]
pub struct ClientOptions {
    /// Server address: http://host:port, or host:port.
    #[arg(long, env = "ALLOWANCE_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Give up on the call after this long, e.g. 5s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct Account {
    /// The key (an API key, an account).
    #[arg(long)]
    pub key: String,
    /// The unit; empty means the server's default unit.
    #[arg(long, default_value = "")]
    pub unit: String,
}

#[derive(Debug, Subcommand)]
pub enum LimitsCommand {
    /// Usage of all four windows.
    #[command(after_help = "Example:\n  allowance limits get --key acct-42 --unit usd")]
    Get {
        #[command(flatten)]
        account: Account,
        #[command(flatten)]
        client: ClientOptions,
    },
    /// Set one window's limit (spent + held may reach it exactly).
    #[command(
        after_help = "Example:\n  allowance limits set --key acct-42 --unit usd --window daily --limit 1000"
    )]
    Set {
        #[command(flatten)]
        account: Account,
        /// daily, weekly, monthly or annual.
        #[arg(long)]
        window: Window,
        #[arg(long, allow_negative_numbers = true)]
        limit: i64,
        #[command(flatten)]
        client: ClientOptions,
    },
    /// Remove one window's limit; spending is still tracked.
    #[command(after_help = "Example:\n  allowance limits remove --key acct-42 --window daily")]
    Remove {
        #[command(flatten)]
        account: Account,
        #[arg(long)]
        window: Window,
        #[command(flatten)]
        client: ClientOptions,
    },
}

#[derive(Debug, Args)]
pub struct ReserveArgs {
    #[command(flatten)]
    pub account: Account,
    /// Your id for this transfer; retrying with the same id is safe.
    #[arg(long = "tx")]
    pub transaction_id: String,
    #[arg(long, allow_negative_numbers = true)]
    pub amount: i64,
    /// How long the hold lasts (1s to 30d), e.g. 10m; default: the server's.
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Record as committed at once, for transfers that settle immediately.
    #[arg(long)]
    pub commit: bool,
    /// Metadata entries, key=value (repeatable).
    #[arg(long = "meta", value_parser = parse_meta)]
    pub metadata: Vec<(String, String)>,
    #[command(flatten)]
    pub client: ClientOptions,
}

#[derive(Debug, Args)]
pub struct CommitArgs {
    #[arg(long = "tx")]
    pub transaction_id: String,
    /// Final amount, at most the held amount; default: the held amount.
    #[arg(long, allow_negative_numbers = true)]
    pub amount: Option<i64>,
    #[command(flatten)]
    pub client: ClientOptions,
}

#[derive(Debug, Args)]
pub struct ReverseArgs {
    #[arg(long = "tx")]
    pub transaction_id: String,
    #[command(flatten)]
    pub client: ClientOptions,
}

#[derive(Debug, Subcommand)]
pub enum TxCommand {
    /// One transaction.
    #[command(after_help = "Example:\n  allowance tx get --tx tr-1 --json")]
    Get {
        #[arg(long = "tx")]
        transaction_id: String,
        #[command(flatten)]
        client: ClientOptions,
    },
    /// A key's transactions, newest first.
    #[command(after_help = "Example:\n  allowance tx list --key acct-42 --page-size 20")]
    List {
        #[command(flatten)]
        account: Account,
        /// Transactions per page (1 to 1000).
        #[arg(long, default_value_t = 100)]
        page_size: i32,
        /// Continue from a previous page's next_page_token.
        #[arg(long, default_value = "")]
        page_token: String,
        #[command(flatten)]
        client: ClientOptions,
    },
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The health service name to check: empty for the server as a whole, `allowance.v1.SpendingLimits`, or
    /// `liveness` (serving while the process runs, whatever the database does).
    #[arg(long, default_value = "")]
    pub service: String,
    #[command(flatten)]
    pub client: ClientOptions,
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

fn window_pb(w: Window) -> i32 {
    crate::grpc::convert::window_to_pb(w).into()
}

/// `host:port` means plain HTTP/2, as grpcurl takes it.
pub fn endpoint_uri(addr: &str) -> String {
    if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") }
}

async fn connect(options: &ClientOptions) -> Result<Channel, tonic::Status> {
    let endpoint = Endpoint::from_shared(endpoint_uri(&options.addr))
        .map_err(|e| tonic::Status::invalid_argument(format!("--addr {}: {e}", options.addr)))?
        .connect_timeout(options.timeout.min(Duration::from_secs(5)))
        .timeout(options.timeout);
    endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot reach {}: {e}", options.addr)))
}

async fn spending(options: &ClientOptions) -> Result<SpendingLimitsClient<Channel>, tonic::Status> {
    Ok(SpendingLimitsClient::new(connect(options).await?))
}

/// Runs a client command; prints the answer, or the status on stderr.
pub async fn run(command: Command) -> ExitCode {
    match call(command).await {
        Ok(code) => code,
        Err(status) => {
            eprintln!("error: {}: {}", crate::grpc::code_name(status.code()), status.message());
            ExitCode::from(EXIT_ERROR)
        }
    }
}

async fn call(command: Command) -> Result<ExitCode, tonic::Status> {
    match command {
        Command::Limits(LimitsCommand::Get { account, client }) => {
            let r = spending(&client)
                .await?
                .get_limits(pb::GetLimitsRequest { key_id: account.key, unit: account.unit })
                .await?
                .into_inner();
            output::limits(Format::of(client.json), &r);
        }
        Command::Limits(LimitsCommand::Set { account, window, limit, client }) => {
            let r = spending(&client)
                .await?
                .set_limit(pb::SetLimitRequest {
                    key_id: account.key,
                    unit: account.unit,
                    window: window_pb(window),
                    limit,
                })
                .await?
                .into_inner();
            output::usage(Format::of(client.json), r.usage.as_slice());
        }
        Command::Limits(LimitsCommand::Remove { account, window, client }) => {
            let r = spending(&client)
                .await?
                .remove_limit(pb::RemoveLimitRequest {
                    key_id: account.key,
                    unit: account.unit,
                    window: window_pb(window),
                })
                .await?
                .into_inner();
            output::usage(Format::of(client.json), r.usage.as_slice());
        }
        Command::Reserve(args) => {
            let hold_ttl = args
                .ttl
                .map(prost_types::Duration::try_from)
                .transpose()
                .map_err(|e| tonic::Status::invalid_argument(format!("--ttl: {e}")))?;
            let r = spending(&args.client)
                .await?
                .reserve_spending(pb::ReserveSpendingRequest {
                    key_id: args.account.key,
                    transaction_id: args.transaction_id,
                    amount: args.amount,
                    unit: args.account.unit,
                    hold_ttl,
                    commit: args.commit,
                    metadata: args.metadata.into_iter().collect(),
                    additional_key_ids: vec![],
                })
                .await?
                .into_inner();
            output::reservation(Format::of(args.client.json), &r);
            if !r.allowed {
                return Ok(ExitCode::from(EXIT_DENIED));
            }
        }
        Command::Commit(args) => {
            let r = spending(&args.client)
                .await?
                .commit(pb::CommitRequest { transaction_id: args.transaction_id, amount: args.amount })
                .await?
                .into_inner();
            output::transaction(Format::of(args.client.json), r.transaction.as_ref());
        }
        Command::Reverse(args) => {
            let r = spending(&args.client)
                .await?
                .reverse(pb::ReverseRequest { transaction_id: args.transaction_id })
                .await?
                .into_inner();
            output::transaction(Format::of(args.client.json), r.transaction.as_ref());
        }
        Command::Tx(TxCommand::Get { transaction_id, client }) => {
            let t = spending(&client)
                .await?
                .get_transaction(pb::GetTransactionRequest { transaction_id })
                .await?
                .into_inner();
            output::transaction(Format::of(client.json), Some(&t));
        }
        Command::Tx(TxCommand::List { account, page_size, page_token, client }) => {
            let r = spending(&client)
                .await?
                .list_transactions(pb::ListTransactionsRequest {
                    key_id: account.key,
                    unit: account.unit,
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            output::transactions(Format::of(client.json), &r);
        }
        Command::Health(args) => {
            use tonic_health::pb::health_check_response::ServingStatus;
            let channel = connect(&args.client).await?;
            let r = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest { service: args.service })
                .await?
                .into_inner();
            let status = r.status();
            output::health(Format::of(args.client.json), status.as_str_name());
            if status != ServingStatus::Serving {
                return Ok(ExitCode::from(EXIT_ERROR));
            }
        }
        Command::Serve(_) | Command::Migrate(_) | Command::Bench(_) => unreachable!("not a client command"),
    }
    Ok(ExitCode::SUCCESS)
}
