//! `allowance ratelimit check` and `allowance rules …`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::EXIT_DENIED;
use super::client::{ClientOptions, PeriodArg, authorized, parse_period};
use super::output::{self, Format};
use crate::grpc::pb::{
    self, admin_service_client::AdminServiceClient, rate_limit_service_client::RateLimitServiceClient,
};

#[derive(Debug, Subcommand)]
pub enum RatelimitCommand {
    /// Check (and, if admitted, count) one request against the key's rate limits. Exit 3 when denied.
    #[command(after_help = "Examples:\n  allowance ratelimit check --key acct-42 --unit requests\n  \
                            allowance ratelimit check --key acct-42 --unit requests --cost 5 --limit api\n  \
                            allowance ratelimit check --key acct-42 --unit requests --cost 0   # peek, count nothing")]
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[arg(long)]
    pub key: String,
    /// Further keys checked with it, atomically (repeatable).
    #[arg(long = "also-key", value_name = "KEY")]
    pub also_keys: Vec<String>,
    /// The unit; empty means the server's default unit.
    #[arg(long, default_value = "")]
    pub unit: String,
    /// What the request costs (default 1; 0 checks without counting).
    #[arg(long)]
    pub cost: Option<i64>,
    /// Only this limit (repeatable; default: every rate limit of the keys).
    #[arg(long = "limit", value_name = "NAME")]
    pub limits: Vec<String>,
    #[command(flatten)]
    pub client: ClientOptions,
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Create or replace a rule mapping Envoy descriptors of a domain to a key's rate limit.
    #[command(after_help = RULE_HELP)]
    Put(Box<PutRuleArgs>),
    /// Every rule.
    List {
        #[command(flatten)]
        client: ClientOptions,
    },
    /// Delete a rule; NOT_FOUND (exit 1) when there is none of that name.
    Delete {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        client: ClientOptions,
    },
}

const RULE_HELP: &str = "\
A descriptor matches when its entries match the --match entries in order and in full: KEY=VALUE matches that
value, KEY alone any value. Of the matching rules the one with the most exact values wins. The key counted is
--key-template with {ENTRY KEY} replaced by that entry's value ({domain} by the domain); the key's rate limit
named --limit-name (its own, or its plan's) applies, else --rate per --per (with --burst, default the rate).

Examples:
  allowance rules put --name per-api-key --domain edge --match api_key --key-template '{api_key}' \\
    --unit requests --limit-name api --rate 20 --per rolling=1m
  allowance rules put --name pay-path --domain edge --match api_key --match path=/v1/pay \\
    --key-template '{api_key}/pay' --unit requests --limit-name pay --rate 1000 --per calendar=month --shadow";

#[derive(Debug, Args)]
pub struct PutRuleArgs {
    /// The rule's name (1 to 64 of A-Z a-z 0-9 _ - .); labels the metrics.
    #[arg(long)]
    pub name: String,
    /// Envoy's rate-limit domain.
    #[arg(long)]
    pub domain: String,
    /// One descriptor entry: KEY=VALUE, or KEY for any value (repeatable, in order).
    #[arg(long = "match", value_name = "ENTRY", required = true)]
    pub pattern: Vec<String>,
    /// The key counted, e.g. 'tenant/{api_key}'.
    #[arg(long)]
    pub key_template: String,
    /// The unit of the key's rate limit; empty means the server's default unit.
    #[arg(long, default_value = "")]
    pub unit: String,
    /// The name of the key's rate limit (own or from its plan) that applies.
    #[arg(long)]
    pub limit_name: String,
    /// The default limit, for keys with no limit of that name: requests per --per.
    #[arg(long, requires = "per")]
    pub rate: Option<i64>,
    /// The default limit's period: rolling=DURATION or calendar=UNIT[/ZONE].
    #[arg(long, requires = "rate", value_parser = parse_period)]
    pub per: Option<PeriodArg>,
    /// The default limit's burst (default: the rate).
    #[arg(long, requires = "rate")]
    pub burst: Option<i64>,
    /// Count and report, never deny.
    #[arg(long)]
    pub shadow: bool,
    #[command(flatten)]
    pub client: ClientOptions,
}

fn duration_json(d: Option<&prost_types::Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(d.seconds as f64 + f64::from(d.nanos) / 1e9))
}

fn print_check(format: Format, r: &pb::CheckRateResponse) {
    match format {
        Format::Json => output::print_value(&json!({
            "allowed": r.allowed,
            "retry_after_seconds": duration_json(r.retry_after.as_ref()),
            "limits": r.limits.iter().map(|l| json!({
                "key_id": l.key_id,
                "name": l.name,
                "limit": l.limit,
                "burst": l.burst,
                "allowed": l.allowed,
                "remaining": l.remaining,
                "retry_after_seconds": duration_json(l.retry_after.as_ref()),
                "reset_after_seconds": duration_json(l.reset_after.as_ref()),
                "cost_exceeds_burst": l.cost_exceeds_burst,
            })).collect::<Vec<_>>(),
        })),
        Format::Table => {
            if r.limits.is_empty() {
                // Allowed because nothing limits it: say so, so that a misspelt --limit is noticed.
                outln!(
                    "allowed: no rate limit applies (the key has none of those asked for, or none at all)"
                );
                return;
            }
            outln!("{}", if r.allowed { "allowed" } else { "denied" });
            let secs = |d: Option<&prost_types::Duration>| {
                d.map_or_else(
                    || "-".to_owned(),
                    |d| format!("{:.3}s", d.seconds as f64 + f64::from(d.nanos) / 1e9),
                )
            };
            let rows: Vec<Vec<String>> = r
                .limits
                .iter()
                .map(|l| {
                    vec![
                        l.key_id.clone(),
                        l.name.clone(),
                        l.limit.to_string(),
                        l.burst.to_string(),
                        if l.cost_exceeds_burst { "cost > burst".into() } else { l.allowed.to_string() },
                        l.remaining.to_string(),
                        secs(l.retry_after.as_ref()),
                        secs(l.reset_after.as_ref()),
                    ]
                })
                .collect();
            output::print_rows(
                &["KEY", "LIMIT", "RATE", "BURST", "ALLOWED", "REMAINING", "RETRY AFTER", "RESET AFTER"],
                &rows,
            );
        }
    }
}

pub async fn check(command: RatelimitCommand) -> Result<ExitCode, tonic::Status> {
    let RatelimitCommand::Check(args) = command;
    let r = RateLimitServiceClient::new(authorized(&args.client).await?)
        .check_rate(pb::CheckRateRequest {
            key_id: args.key,
            additional_key_ids: args.also_keys,
            unit: args.unit,
            cost: args.cost,
            limit_names: args.limits,
        })
        .await?
        .into_inner();
    print_check(Format::of(args.client.json), &r);
    Ok(if r.allowed { ExitCode::SUCCESS } else { ExitCode::from(EXIT_DENIED) })
}

fn rule_json(r: &pb::RateLimitRule) -> Value {
    json!({
        "name": r.name,
        "domain": r.domain,
        "pattern": r.pattern.iter().map(|p| json!({"key": p.key, "value": p.value})).collect::<Vec<_>>(),
        "key_template": r.key_template,
        "unit": r.unit,
        "limit_name": r.limit_name,
        "default": r.default_limit.as_ref().map(|l| json!({
            "amount": l.amount, "burst": l.burst, "period": output::period_value(l.period.as_ref()),
        })),
        "shadow": r.shadow,
    })
}

fn print_rules(format: Format, rules: &[pb::RateLimitRule]) {
    match format {
        Format::Json => output::print_value(&Value::Array(rules.iter().map(rule_json).collect())),
        Format::Table => {
            let rows: Vec<Vec<String>> = rules
                .iter()
                .map(|r| {
                    let pattern: Vec<String> = r
                        .pattern
                        .iter()
                        .map(|p| p.value.as_ref().map_or_else(|| p.key.clone(), |v| format!("{}={v}", p.key)))
                        .collect();
                    let default = r.default_limit.as_ref().map_or_else(
                        || "-".to_owned(),
                        |l| {
                            format!(
                                "{} per {} burst {}",
                                l.amount.unwrap_or(0),
                                output::period_label(l.period.as_ref()),
                                l.burst.unwrap_or(0)
                            )
                        },
                    );
                    vec![
                        r.name.clone(),
                        r.domain.clone(),
                        pattern.join(","),
                        r.key_template.clone(),
                        r.unit.clone(),
                        r.limit_name.clone(),
                        default,
                        if r.shadow { "shadow".into() } else { "enforce".into() },
                    ]
                })
                .collect();
            output::print_rows(
                &["RULE", "DOMAIN", "MATCH", "KEY", "UNIT", "LIMIT", "DEFAULT", "MODE"],
                &rows,
            );
        }
    }
}

pub async fn rules(command: RulesCommand) -> Result<ExitCode, tonic::Status> {
    match command {
        RulesCommand::Put(a) => {
            let pattern = a
                .pattern
                .iter()
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => pb::DescriptorPattern { key: k.to_owned(), value: Some(v.to_owned()) },
                    None => pb::DescriptorPattern { key: p.clone(), value: None },
                })
                .collect();
            let default_limit = match (a.rate, &a.per) {
                (Some(rate), Some(per)) => Some(pb::Limit {
                    name: a.limit_name.clone(),
                    period: Some(per.to_pb("--per")?),
                    amount: Some(rate),
                    burst: Some(a.burst.unwrap_or(rate.max(1))),
                }),
                _ => None,
            };
            let rule = pb::RateLimitRule {
                name: a.name,
                domain: a.domain,
                pattern,
                key_template: a.key_template,
                unit: a.unit,
                limit_name: a.limit_name,
                default_limit,
                shadow: a.shadow,
            };
            let r = AdminServiceClient::new(authorized(&a.client).await?)
                .put_rate_limit_rule(pb::PutRateLimitRuleRequest { rule: Some(rule) })
                .await?
                .into_inner();
            print_rules(Format::of(a.client.json), r.rule.as_slice());
        }
        RulesCommand::List { client } => {
            let r = AdminServiceClient::new(authorized(&client).await?)
                .list_rate_limit_rules(pb::ListRateLimitRulesRequest {})
                .await?
                .into_inner();
            print_rules(Format::of(client.json), &r.rules);
        }
        RulesCommand::Delete { name, client } => {
            AdminServiceClient::new(authorized(&client).await?)
                .delete_rate_limit_rule(pb::DeleteRateLimitRuleRequest { name: name.clone() })
                .await?;
            match Format::of(client.json) {
                Format::Json => output::print_value(&json!({ "deleted": name })),
                Format::Table => outln!("rule {name} deleted"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
