//! The operator's client commands: each is one gRPC call to a running server.

use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use clap::{ArgGroup, Args, Subcommand};
use tonic::transport::Channel;

use super::output::{self, Format};
use super::{Command, EXIT_DENIED, EXIT_ERROR};
use crate::config::parse_duration;
use crate::domain::Window;
use crate::grpc::pb::{self, spending_limits_client::SpendingLimitsClient};
use crate::telemetry::causes;

#[derive(Debug, Clone, Args)]
pub struct ClientOptions {
    /// Server address: http://host:port, or host:port; https://host:port for TLS.
    #[arg(long, env = "ALLOWANCE_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    #[command(flatten)]
    pub tls: super::tls::ClientTlsArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Give up on the call after this long, e.g. 5s.
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// The caller's credential, `<caller id>:<secret>`, sent as `authorization: Bearer …`. Prefer the
    /// environment variable: a flag shows in the process list.
    #[arg(long, env = "ALLOWANCE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(<redacted>)")
    }
}

/// Adds the caller's credential to every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type AuthorizedChannel = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

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
    /// Usage of all four windows and of every limit that applies to the key (its own and its plan's).
    #[command(after_help = "Example:\n  allowance limits get --key acct-42 --unit usd")]
    Get {
        #[command(flatten)]
        account: Account,
        #[command(flatten)]
        client: ClientOptions,
    },
    /// Set one limit of the key: a round-1 window (--window), or any named limit over a rolling or calendar
    /// period (--name). Spent + held may reach the limit exactly.
    #[command(after_help = SET_HELP)]
    Set(SetArgs),
    /// Remove one of the key's own limits: a window (spending is still tracked), or a named limit (its plan's
    /// limit of that name, if any, applies again).
    #[command(after_help = "Examples:\n  allowance limits remove --key acct-42 --window daily\n  \
                            allowance limits remove --key acct-42 --unit requests --name monthly-quota")]
    Remove(RemoveArgs),
}

const SET_HELP: &str = "\
A calendar period resets at every COUNT x UNIT from --anchor, in --tz (default UTC). --anchor is an RFC 3339
time, or a local date or date-time read in --tz (2026-01-31, 2026-01-31T09:00); by default it is local midnight
on 2000-01-01 (weeks: Monday 2000-01-03), so months start on the 1st and weeks on Monday at local midnight.

Examples:
  allowance limits set --key acct-42 --unit usd --window daily --limit 1000
  allowance limits set --key acct-42 --unit usd --name burst --rolling 1h --limit 200
  allowance limits set --key acct-42 --unit requests --name monthly --calendar month --tz Europe/Paris --limit 10000
  allowance limits set --key acct-42 --name billing --calendar month --anchor 2026-01-15 --tz America/New_York --limit 500
  allowance limits set --key acct-42 --unit usd --name daily --rolling 1d --unlimited   # lifts the plan's daily
  allowance limits set --key acct-42 --unit requests --name api --rolling 1m --limit 300 --burst 50   # a rate limit";

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["window", "name"])))]
#[command(group(ArgGroup::new("period").args(["rolling", "calendar"])))]
#[command(group(ArgGroup::new("amount").required(true).args(["limit", "unlimited"])))]
pub struct SetArgs {
    #[command(flatten)]
    pub account: Account,
    /// A round-1 window: daily, weekly, monthly or annual (the rolling limit named after it).
    #[arg(long, conflicts_with_all = ["period", "unlimited"])]
    pub window: Option<Window>,
    /// The limit's name (1 to 64 of A-Z a-z 0-9 _ - .); setting it again replaces it.
    #[arg(long, requires = "period")]
    pub name: Option<String>,
    /// A rolling period: spend counts while younger than this, e.g. 1h, 1d, 30d.
    #[arg(long, value_parser = parse_duration)]
    pub rolling: Option<Duration>,
    /// A calendar period of this unit: day, week, month or year.
    #[arg(long, value_name = "UNIT", value_parser = parse_calendar_unit)]
    pub calendar: Option<pb::CalendarUnit>,
    // `requires` alone would not do: clap lets a requirement go when it conflicts with a present argument
    // (--calendar with --rolling or --window), so the conflicts are spelled out.
    /// How many calendar units one period spans (default 1).
    #[arg(long, requires = "calendar", conflicts_with_all = ["rolling", "window"],
          value_parser = clap::value_parser!(u32).range(1..))]
    pub count: Option<u32>,
    /// When one calendar period starts: RFC 3339, or a local date[-time] in --tz.
    #[arg(long, requires = "calendar", conflicts_with_all = ["rolling", "window"], value_parser = parse_anchor)]
    pub anchor: Option<Anchor>,
    /// The calendar period's IANA time zone, e.g. Europe/Paris (default UTC).
    #[arg(long, value_name = "ZONE", requires = "calendar", conflicts_with_all = ["rolling", "window"])]
    pub tz: Option<String>,
    /// The most that spent + held may reach (0 blocks all spending).
    #[arg(long, allow_negative_numbers = true)]
    pub limit: Option<i64>,
    /// No limit: lifts the key's plan's limit of the same name (with --name only).
    #[arg(long)]
    pub unlimited: bool,
    /// Makes it a request rate limit: --limit per period, at most this many at once (checked by
    /// `allowance ratelimit check` and Envoy's protocol, never by spending). With --name only.
    #[arg(long, requires = "name", conflicts_with_all = ["window", "unlimited"])]
    pub burst: Option<i64>,
    #[command(flatten)]
    pub client: ClientOptions,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["window", "name"])))]
pub struct RemoveArgs {
    #[command(flatten)]
    pub account: Account,
    /// A round-1 window: daily, weekly, monthly or annual.
    #[arg(long)]
    pub window: Option<Window>,
    /// The name of one of the key's own limits; NOT_FOUND (exit 1) when it has none of that name.
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub client: ClientOptions,
}

#[derive(Debug, Subcommand)]
pub enum PlansCommand {
    /// Create or replace a plan: a named set of limits per unit. Every key on it sees the change at once.
    #[command(after_help = PLAN_LIMIT_HELP)]
    Put {
        /// The plan's name (1 to 64 of A-Z a-z 0-9 _ - .).
        #[arg(long)]
        name: String,
        /// One limit of the plan, [UNIT:]NAME:PERIOD:AMOUNT (repeatable; see below).
        #[arg(long = "limit", value_name = "SPEC", value_parser = parse_plan_limit)]
        limits: Vec<PlanLimitArg>,
        #[command(flatten)]
        client: ClientOptions,
    },
    /// One plan: its limits and how many keys are on it.
    #[command(after_help = "Example:\n  allowance plans get --name free --json")]
    Get {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        client: ClientOptions,
    },
    /// Every plan.
    #[command(after_help = "Example:\n  allowance plans list")]
    List {
        #[command(flatten)]
        client: ClientOptions,
    },
    /// Delete a plan; refused (FAILED_PRECONDITION, exit 1) while keys are on it.
    #[command(after_help = "Example:\n  allowance plans delete --name free")]
    Delete {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        client: ClientOptions,
    },
    /// Put a key (in every unit) on a plan, or on none.
    #[command(after_help = "Examples:\n  allowance plans assign --key acct-42 --plan pro\n  \
                            allowance plans assign --key acct-42 --none")]
    Assign(AssignArgs),
}

const PLAN_LIMIT_HELP: &str = "\
--limit [UNIT:]NAME:PERIOD:AMOUNT[:burst=N]
  UNIT     omitted: the server's default unit
  PERIOD   rolling=DURATION                     e.g. rolling=1d, rolling=90m
           calendar=[COUNT]UNIT[@ANCHOR][/ZONE] e.g. calendar=month, calendar=3months/Europe/Paris,
                                                     calendar=1month@2026-01-31T00:00:00Z/Europe/Paris
  burst=N  makes it a request rate limit: AMOUNT per PERIOD, at most N at once
  ANCHOR   RFC 3339, or a local date[-time] in ZONE (2026-01-31, 2026-01-31T09:00); default: local
           midnight on 2000-01-01 (weeks: Monday 2000-01-03). ZONE: an IANA time zone, default UTC.

Example:
  allowance plans put --name free \\
    --limit usd:daily:rolling=1d:100 \\
    --limit usd:burst:rolling=1h:20 \\
    --limit requests:monthly:calendar=month/Europe/Paris:1000 \\
    --limit requests:api:rolling=1m:20:burst=5";

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["plan", "none"])))]
pub struct AssignArgs {
    /// The key (an API key, an account).
    #[arg(long)]
    pub key: String,
    /// The plan to put the key on; INVALID_ARGUMENT (exit 1) when it does not exist.
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub plan: Option<String>,
    /// Take the key off any plan.
    #[arg(long)]
    pub none: bool,
    #[command(flatten)]
    pub client: ClientOptions,
}

/// When a calendar period starts, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// An instant (RFC 3339 with an offset).
    At(DateTime<Utc>),
    /// A wall-clock time in the period's time zone.
    Local(NaiveDateTime),
}

/// A period as given on the command line; turned into the request's at call time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeriodArg {
    Rolling(Duration),
    Calendar { unit: pb::CalendarUnit, count: Option<u32>, anchor: Option<Anchor>, zone: Option<String> },
}

/// One `--limit` of `plans put`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanLimitArg {
    pub unit: String,
    pub name: String,
    pub period: PeriodArg,
    pub amount: i64,
    /// Set for a rate limit.
    pub burst: Option<i64>,
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
    #[arg(long, value_parser = parse_duration, conflicts_with = "commit")]
    pub ttl: Option<Duration>,
    /// Record as committed at once, for transfers that settle immediately.
    #[arg(long)]
    pub commit: bool,
    /// Metadata entries, key=value (repeatable).
    #[arg(long = "meta", value_parser = parse_meta)]
    pub metadata: Vec<(String, String)>,
    /// Another key charged along with --key, in the same unit (a card's user, its organisation): allowed only
    /// if every limit of every key allows it (repeatable, at most 7).
    #[arg(long = "also-key", value_name = "KEY")]
    pub also_keys: Vec<String>,
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
        /// Transactions per page.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i32).range(1..=1000))]
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

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be more than 0s".into()),
        d => Ok(d),
    }
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

/// `day`, `week`, `month` or `year` (or their plurals).
fn parse_calendar_unit(s: &str) -> Result<pb::CalendarUnit, String> {
    let lower = s.trim().to_ascii_lowercase();
    match lower.strip_suffix('s').unwrap_or(&lower) {
        "day" => Ok(pb::CalendarUnit::Day),
        "week" => Ok(pb::CalendarUnit::Week),
        "month" => Ok(pb::CalendarUnit::Month),
        "year" => Ok(pb::CalendarUnit::Year),
        _ => Err(format!("unknown calendar unit {s:?}: expected day, week, month or year")),
    }
}

/// RFC 3339 (`2026-01-31T00:00:00Z`, `2026-01-31T00:00:00+01:00`), or a local `2026-01-31[T09:00[:00]]`.
fn parse_anchor(s: &str) -> Result<Anchor, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Anchor::At(t.to_utc()));
    }
    for format in ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Ok(Anchor::Local(t));
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(Anchor::Local(d.and_time(NaiveTime::MIN)));
    }
    Err(format!(
        "expected an RFC 3339 time (2026-01-31T00:00:00Z) or a local date or date-time in the time zone \
         (2026-01-31, 2026-01-31T09:00), got {s:?}"
    ))
}

/// `[COUNT]UNIT[@ANCHOR][/ZONE]`, as in `3months@2026-01-31/Europe/Paris`.
fn parse_calendar_spec(s: &str) -> Result<PeriodArg, String> {
    let (rest, zone) = match s.split_once('/') {
        Some((_, "")) => return Err(format!("calendar={s}: empty time zone after '/'")),
        Some((rest, zone)) => (rest, Some(zone.to_owned())),
        None => (s, None),
    };
    let (count_unit, anchor) = match rest.split_once('@') {
        Some((count_unit, anchor)) => (count_unit, Some(parse_anchor(anchor)?)),
        None => (rest, None),
    };
    let digits = count_unit.len() - count_unit.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let count = match &count_unit[..digits] {
        "" => None,
        n => match n.parse::<u32>() {
            Ok(0) => return Err(format!("calendar={s}: the count must be at least 1")),
            Ok(count) => Some(count),
            Err(e) => return Err(format!("calendar={s}: count {n}: {e}")),
        },
    };
    let unit = parse_calendar_unit(&count_unit[digits..]).map_err(|e| format!("calendar={s}: {e}"))?;
    Ok(PeriodArg::Calendar { unit, count, anchor, zone })
}

/// `[UNIT:]NAME:PERIOD:AMOUNT`, PERIOD being `rolling=DURATION` or `calendar=[COUNT]UNIT[@ANCHOR][/ZONE]`.
/// The period is found by its `rolling=` / `calendar=` prefix, so an anchor's colons need no quoting and a
/// unit may itself hold colons.
fn parse_plan_limit(s: &str) -> Result<PlanLimitArg, String> {
    const SYNTAX: &str = "expected [UNIT:]NAME:PERIOD:AMOUNT[:burst=N], PERIOD being rolling=DURATION or \
                          calendar=[COUNT]UNIT[@ANCHOR][/ZONE], e.g. usd:daily:rolling=1d:100";
    let mut parts: Vec<&str> = s.split(':').collect();
    let burst = match parts.last().and_then(|p| p.strip_prefix("burst=")) {
        Some(b) => {
            let burst =
                b.parse::<i64>().map_err(|_| format!("burst={b} is not a whole number ({SYNTAX})"))?;
            parts.pop();
            Some(burst)
        }
        None => None,
    };
    let at = parts
        .iter()
        .position(|p| p.starts_with("rolling=") || p.starts_with("calendar="))
        .filter(|&i| i >= 1 && i + 1 < parts.len())
        .ok_or_else(|| format!("{SYNTAX}; got {s:?}"))?;
    let name = parts[at - 1].to_owned();
    let unit = parts[..at - 1].join(":");
    let period = parts[at..parts.len() - 1].join(":");
    let amount_text = parts[parts.len() - 1];
    let amount = amount_text
        .parse::<i64>()
        .map_err(|_| format!("amount {amount_text:?} is not a whole number ({SYNTAX})"))?;
    let period = parse_period(&period)?;
    Ok(PlanLimitArg { unit, name, period, amount, burst })
}

/// `rolling=DURATION` or `calendar=[COUNT]UNIT[@ANCHOR][/ZONE]`.
pub(super) fn parse_period(period: &str) -> Result<PeriodArg, String> {
    if let Some(d) = period.strip_prefix("rolling=") {
        Ok(PeriodArg::Rolling(parse_duration(d).map_err(|e| format!("rolling={d}: {e}"))?))
    } else if let Some(c) = period.strip_prefix("calendar=") {
        parse_calendar_spec(c)
    } else {
        Err(format!("expected rolling=DURATION or calendar=[COUNT]UNIT[@ANCHOR][/ZONE], got {period:?}"))
    }
}

/// The default anchor: local midnight on 2000-01-01 in the zone (Monday 2000-01-03 for weeks), so that
/// months start on the 1st and weeks on Monday. A zone unknown here is left for the server to reject (it
/// names the field); the anchor is then read in UTC.
fn default_anchor(unit: pb::CalendarUnit) -> NaiveDateTime {
    let day = if unit == pb::CalendarUnit::Week { 3 } else { 1 };
    NaiveDate::from_ymd_opt(2000, 1, day).expect("a valid date").and_time(NaiveTime::MIN)
}

/// A wall-clock time in `zone` as an instant; an ambiguous time (DST ends) is its earlier instant.
fn localize(local: NaiveDateTime, zone: &str) -> Result<DateTime<Utc>, String> {
    let Ok(tz) = zone.parse::<chrono_tz::Tz>() else { return Ok(local.and_utc()) };
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => Ok(t.to_utc()),
        LocalResult::None => Err(format!("{local} does not exist in {zone} (a daylight saving time gap)")),
    }
}

impl PeriodArg {
    pub(super) fn to_pb(&self, what: &str) -> Result<pb::Period, tonic::Status> {
        let kind = match self {
            PeriodArg::Rolling(d) => pb::period::Kind::Rolling(
                prost_types::Duration::try_from(*d)
                    .map_err(|e| tonic::Status::invalid_argument(format!("{what}: {e}")))?,
            ),
            PeriodArg::Calendar { unit, count, anchor, zone } => {
                let zone = zone.clone().unwrap_or_default();
                let anchor = match anchor {
                    Some(Anchor::At(t)) => Ok(*t),
                    Some(Anchor::Local(local)) => localize(*local, &zone),
                    None => localize(default_anchor(*unit), &zone),
                }
                .map_err(|e| tonic::Status::invalid_argument(format!("{what}: anchor {e}")))?;
                pb::period::Kind::Calendar(pb::CalendarPeriod {
                    unit: (*unit).into(),
                    count: count.unwrap_or(1),
                    anchor: Some(prost_types::Timestamp {
                        seconds: anchor.timestamp(),
                        nanos: anchor.timestamp_subsec_nanos() as i32,
                    }),
                    time_zone: zone,
                })
            }
        };
        Ok(pb::Period { kind: Some(kind) })
    }
}

impl SetArgs {
    fn period(&self) -> Option<PeriodArg> {
        if let Some(d) = self.rolling {
            return Some(PeriodArg::Rolling(d));
        }
        self.calendar.map(|unit| PeriodArg::Calendar {
            unit,
            count: self.count,
            anchor: self.anchor,
            zone: self.tz.clone(),
        })
    }
}

fn window_pb(w: Window) -> i32 {
    crate::grpc::convert::window_to_pb(w).into()
}

/// `host:port` means plain HTTP/2, as grpcurl takes it.
pub fn endpoint_uri(addr: &str) -> String {
    if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") }
}

async fn connect(options: &ClientOptions) -> Result<Channel, tonic::Status> {
    let endpoint = super::tls::endpoint(&options.addr, &options.tls)
        .map_err(tonic::Status::invalid_argument)?
        .connect_timeout(options.timeout.min(Duration::from_secs(5)))
        .timeout(options.timeout);
    endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot reach {}: {}", options.addr, causes(&e))))
}

/// A channel that sends `--token` (or `ALLOWANCE_TOKEN`) with every call.
pub async fn authorized(options: &ClientOptions) -> Result<AuthorizedChannel, tonic::Status> {
    let bearer = Bearer::new(options.token.as_deref())?;
    Ok(tonic::service::interceptor::InterceptedService::new(connect(options).await?, bearer))
}

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Self, tonic::Status> {
        let value = match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => None,
            // The message never repeats the token.
            Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| {
                tonic::Status::invalid_argument(
                    "--token/ALLOWANCE_TOKEN is not a credential (<caller id>:<secret>)",
                )
            })?),
        };
        Ok(Self(value))
    }
}

async fn spending(options: &ClientOptions) -> Result<SpendingLimitsClient<AuthorizedChannel>, tonic::Status> {
    Ok(SpendingLimitsClient::new(authorized(options).await?))
}

/// Runs a client command; prints the answer, or the status on stderr.
pub async fn run(command: Command) -> ExitCode {
    match call(command).await {
        Ok(code) => code,
        Err(status) => {
            // A call that failed below gRPC (e.g. a TLS handshake the server refused) says why only in its
            // sources.
            let why =
                std::error::Error::source(&status).map(|e| format!(" ({})", causes(e))).unwrap_or_default();
            eprintln!("error: {}: {}{why}", crate::grpc::code_name(status.code()), status.message());
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
        Command::Limits(LimitsCommand::Set(args)) => {
            let period = args.period();
            let burst = args.burst;
            let SetArgs { account, window, name, limit, client, .. } = args;
            let mut spending = spending(&client).await?;
            match (window, name, period) {
                (Some(window), _, _) => {
                    // clap requires --limit with --window (--unlimited conflicts with it).
                    let limit = limit.unwrap_or_default();
                    let r = spending
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
                (None, Some(name), Some(period)) => {
                    let limit = pb::Limit {
                        name,
                        period: Some(period.to_pb("--rolling/--calendar")?),
                        amount: limit,
                        burst,
                    };
                    let r = spending
                        .put_limit(pb::PutLimitRequest {
                            key_id: account.key.clone(),
                            unit: account.unit,
                            limit: Some(limit.clone()),
                        })
                        .await?
                        .into_inner();
                    output::limit_put(Format::of(client.json), &account.key, &limit, r.usage.as_ref());
                }
                _ => unreachable!("clap requires --window, or --name with --rolling or --calendar"),
            }
        }
        Command::Limits(LimitsCommand::Remove(RemoveArgs { account, window, name, client })) => {
            let mut spending = spending(&client).await?;
            match (window, name) {
                (Some(window), _) => {
                    let r = spending
                        .remove_limit(pb::RemoveLimitRequest {
                            key_id: account.key,
                            unit: account.unit,
                            window: window_pb(window),
                        })
                        .await?
                        .into_inner();
                    output::usage(Format::of(client.json), r.usage.as_slice());
                }
                (None, Some(name)) => {
                    spending
                        .delete_limit(pb::DeleteLimitRequest {
                            key_id: account.key.clone(),
                            unit: account.unit,
                            name: name.clone(),
                        })
                        .await?;
                    output::limit_deleted(Format::of(client.json), &account.key, &name);
                }
                (None, None) => unreachable!("clap requires --window or --name"),
            }
        }
        Command::Plans(PlansCommand::Put { name, limits, client }) => {
            let limits = limits
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    Ok(pb::PlanLimit {
                        unit: l.unit.clone(),
                        name: l.name.clone(),
                        period: Some(l.period.to_pb(&format!("--limit #{}", i + 1))?),
                        amount: l.amount,
                        burst: l.burst,
                    })
                })
                .collect::<Result<Vec<_>, tonic::Status>>()?;
            let r =
                spending(&client).await?.put_plan(pb::PutPlanRequest { name, limits }).await?.into_inner();
            output::plan(Format::of(client.json), r.plan.as_ref());
        }
        Command::Plans(PlansCommand::Get { name, client }) => {
            let r = spending(&client).await?.get_plan(pb::GetPlanRequest { name }).await?.into_inner();
            output::plan(Format::of(client.json), r.plan.as_ref());
        }
        Command::Plans(PlansCommand::List { client }) => {
            let r = spending(&client).await?.list_plans(pb::ListPlansRequest {}).await?.into_inner();
            output::plans(Format::of(client.json), &r.plans);
        }
        Command::Plans(PlansCommand::Delete { name, client }) => {
            spending(&client).await?.delete_plan(pb::DeletePlanRequest { name: name.clone() }).await?;
            output::plan_deleted(Format::of(client.json), &name);
        }
        Command::Plans(PlansCommand::Assign(AssignArgs { key, plan, none: _, client })) => {
            spending(&client)
                .await?
                .assign_plan(pb::AssignPlanRequest {
                    key_id: key.clone(),
                    plan: plan.clone().unwrap_or_default(),
                })
                .await?;
            output::plan_assigned(Format::of(client.json), &key, plan.as_deref());
        }
        Command::Reserve(args) => {
            let hold_ttl = args
                .ttl
                .map(prost_types::Duration::try_from)
                .transpose()
                .map_err(|e| tonic::Status::invalid_argument(format!("--ttl: {e}")))?;
            let mut metadata = std::collections::HashMap::new();
            for (key, value) in args.metadata {
                if metadata.contains_key(&key) {
                    return Err(tonic::Status::invalid_argument(format!(
                        "--meta: the key {key:?} is given twice"
                    )));
                }
                metadata.insert(key, value);
            }
            let key_id = args.account.key;
            let r = spending(&args.client)
                .await?
                .reserve_spending(pb::ReserveSpendingRequest {
                    key_id: key_id.clone(),
                    transaction_id: args.transaction_id,
                    amount: args.amount,
                    unit: args.account.unit,
                    hold_ttl,
                    commit: args.commit,
                    metadata,
                    additional_key_ids: args.also_keys,
                })
                .await?
                .into_inner();
            output::reservation(Format::of(args.client.json), &key_id, &r);
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
        Command::Callers(command) => return super::admin::callers(command).await,
        Command::Rules(command) => return super::ratelimit::rules(command).await,
        Command::Ratelimit(command) => return super::ratelimit::check(command).await,
        Command::Audit(command) => return super::admin::audit(command).await,
        Command::Serve(_)
        | Command::Migrate(_)
        | Command::Bench(_)
        | Command::Reconcile(_)
        | Command::Partitions(_)
        | Command::Retention(_) => {
            unreachable!("not a client command")
        }
    }
    Ok(ExitCode::SUCCESS)
}
