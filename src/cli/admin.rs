//! `allowance callers …` and `allowance audit …`: who may call, and what changed.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand, ValueEnum};

use super::client::{ClientOptions, authorized};
use super::output::{self, Format};
use crate::app::Allowance;
use crate::clock::SystemClock;
use crate::domain::{Actor, CallerName, KeyPrefixes, Scope, parse_scopes};
use crate::grpc::convert;
use crate::grpc::pb::{self, admin_service_client::AdminServiceClient};
use crate::storage::Store;
use crate::storage::postgres::PgStore;
use crate::telemetry::causes;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScopeArg {
    Spend,
    Read,
    Admin,
    Ratelimit,
}

impl ScopeArg {
    fn domain(self) -> Scope {
        match self {
            ScopeArg::Spend => Scope::Spend,
            ScopeArg::Read => Scope::Read,
            ScopeArg::Admin => Scope::Admin,
            ScopeArg::Ratelimit => Scope::RateLimit,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum CallersCommand {
    /// Create a caller and print its credential `<id>:<secret>` (shown once: only a hash is kept).
    #[command(after_help = CREATE_HELP)]
    Create(CreateArgs),
    /// Every caller with its scopes, key prefixes and state. No secrets.
    #[command(after_help = "Example:\n  allowance callers list --json")]
    List {
        #[command(flatten)]
        client: ClientOptions,
    },
    /// Issue a new secret; the old one keeps working until `callers revoke --previous-secret`.
    #[command(after_help = "Example:\n  allowance callers rotate --id 1b4e28ba-2fa1-11d2-883f-0016d3cca427")]
    Rotate {
        /// The caller's id (the part of its credential before the colon).
        #[arg(long)]
        id: String,
        #[command(flatten)]
        client: ClientOptions,
    },
    /// Revoke a caller for good, or with --previous-secret only the secret its last rotation replaced.
    #[command(
        after_help = "Examples:\n  allowance callers revoke --id 1b4e28ba-2fa1-11d2-883f-0016d3cca427\n  \
                            allowance callers revoke --id 1b4e28ba-2fa1-11d2-883f-0016d3cca427 --previous-secret"
    )]
    Revoke {
        #[arg(long)]
        id: String,
        /// Only end a rotation: the secret before the last rotation stops working, the caller stays.
        #[arg(long)]
        previous_secret: bool,
        #[command(flatten)]
        client: ClientOptions,
    },
}

const CREATE_HELP: &str = "\
Scopes: spend (ReserveSpending, Commit, Reverse), read (GetLimits, GetTransaction, ListTransactions),
admin (limits, plans, callers, audit, Envoy's rules), ratelimit (CheckRate and Envoy's ShouldRateLimit). A caller
with --key-prefix may only touch keys starting with one of its prefixes (a tenant).

The first admin credential is made against the database itself, as no caller exists yet to ask the server:
  allowance callers create --name ops --scopes admin,read,spend --database-url \"$DATABASE_URL\"

Examples:
  allowance callers create --name payments-api --scopes spend,read
  allowance callers create --name acme-gateway --scopes spend,read --key-prefix acme/ --json";

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A name for people (not unique), e.g. the service that will use the credential.
    #[arg(long)]
    pub name: String,
    /// Comma-separated scopes.
    #[arg(long, value_enum, value_delimiter = ',', required = true)]
    pub scopes: Vec<ScopeArg>,
    /// Confine the caller to keys starting with this prefix (repeatable; default: every key).
    #[arg(long = "key-prefix", value_name = "PREFIX")]
    pub key_prefixes: Vec<String>,
    /// Write to this database directly instead of calling a server: for the first admin credential. The
    /// database must be migrated.
    #[arg(long, value_name = "URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[command(flatten)]
    pub client: ClientOptions,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Changes of limits, plans and callers, and reversals, newest first.
    #[command(after_help = "Examples:\n  allowance audit list --key acct-42\n  \
                            allowance audit list --caller 1b4e28ba-2fa1-11d2-883f-0016d3cca427 --since 2026-12-01T00:00:00Z --json")]
    List {
        /// Only events about this key.
        #[arg(long)]
        key: Option<String>,
        /// Only events by this caller id.
        #[arg(long)]
        caller: Option<String>,
        /// Only events at or after this RFC 3339 time.
        #[arg(long, value_parser = parse_time)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only events before this RFC 3339 time.
        #[arg(long, value_parser = parse_time)]
        until: Option<chrono::DateTime<chrono::Utc>>,
        /// Events per page.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i32).range(1..=1000))]
        page_size: i32,
        /// The next_page_token of the previous page.
        #[arg(long, default_value = "")]
        page_token: String,
        #[command(flatten)]
        client: ClientOptions,
    },
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.to_utc())
        .map_err(|e| format!("{e} (expected RFC 3339, e.g. 2026-12-01T00:00:00Z)"))
}

async fn admin(
    options: &ClientOptions,
) -> Result<AdminServiceClient<super::client::AuthorizedChannel>, tonic::Status> {
    Ok(AdminServiceClient::new(authorized(options).await?))
}

pub async fn callers(command: CallersCommand) -> Result<ExitCode, tonic::Status> {
    match command {
        CallersCommand::Create(args) if args.database_url.is_some() => create_in_database(args).await,
        CallersCommand::Create(CreateArgs { name, scopes, key_prefixes, client, .. }) => {
            let scopes = scopes.iter().map(|s| convert::scope_to_pb(s.domain()).into()).collect();
            let r = admin(&client)
                .await?
                .create_caller(pb::CreateCallerRequest { name, scopes, key_prefixes })
                .await?
                .into_inner();
            output::caller_issued(Format::of(client.json), r.caller.as_ref(), &r.credential, "created");
            Ok(ExitCode::SUCCESS)
        }
        CallersCommand::List { client } => {
            let r = admin(&client).await?.list_callers(pb::ListCallersRequest {}).await?.into_inner();
            output::callers(Format::of(client.json), &r.callers);
            Ok(ExitCode::SUCCESS)
        }
        CallersCommand::Rotate { id, client } => {
            let r = admin(&client).await?.rotate_caller(pb::RotateCallerRequest { id }).await?.into_inner();
            output::caller_issued(Format::of(client.json), r.caller.as_ref(), &r.credential, "rotated");
            Ok(ExitCode::SUCCESS)
        }
        CallersCommand::Revoke { id, previous_secret, client } => {
            let r = admin(&client)
                .await?
                .revoke_caller(pb::RevokeCallerRequest { id, previous_secret_only: previous_secret })
                .await?
                .into_inner();
            output::callers(Format::of(client.json), r.caller.as_slice());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The bootstrap path: no caller exists yet to ask the server, so the credential is written to the database
/// (with its audit event, by `cli:database`).
async fn create_in_database(args: CreateArgs) -> Result<ExitCode, tonic::Status> {
    let invalid = |e: crate::domain::InvalidArgument| tonic::Status::invalid_argument(e.to_string());
    let name = CallerName::parse(args.name).map_err(invalid)?;
    let scopes = parse_scopes(args.scopes.iter().map(|s| s.domain())).map_err(invalid)?;
    let prefixes = KeyPrefixes::parse(args.key_prefixes).map_err(invalid)?;
    let url = args.database_url.unwrap_or_default();
    let store = PgStore::connect(&url, 1)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot reach the database: {}", causes(&e))))?;
    store.ready().await.map_err(|e| {
        tonic::Status::failed_precondition(format!("the database is not ready: {}", causes(&e)))
    })?;
    let app = Allowance::new(Arc::new(store), Arc::new(SystemClock));
    let by = Actor::anonymous("cli:database", uuid::Uuid::new_v4().to_string());
    let issued = app.create_caller(name, scopes, prefixes, &by).await.map_err(tonic::Status::from)?;
    let caller = convert::caller(&issued.caller);
    output::caller_issued(Format::of(args.client.json), Some(&caller), &issued.credential, "created");
    Ok(ExitCode::SUCCESS)
}

pub async fn audit(command: AuditCommand) -> Result<ExitCode, tonic::Status> {
    let AuditCommand::List { key, caller, since, until, page_size, page_token, client } = command;
    let r = admin(&client)
        .await?
        .list_audit_events(pb::ListAuditEventsRequest {
            key_id: key.unwrap_or_default(),
            caller_id: caller.unwrap_or_default(),
            start_time: since.map(convert::timestamp),
            end_time: until.map(convert::timestamp),
            page_size,
            page_token,
        })
        .await?
        .into_inner();
    output::audit_events(Format::of(client.json), &r);
    Ok(ExitCode::SUCCESS)
}
