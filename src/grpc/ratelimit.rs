//! Rate limits over gRPC: our `allowance.v1.RateLimitService` (CheckRate) and Envoy's
//! `envoy.service.ratelimit.v3.RateLimitService` (ShouldRateLimit), both deciding through the same app call.

use chrono::TimeDelta;
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use envoy_types::pb::envoy::service::ratelimit::v3 as rls;
use envoy_types::pb::envoy::r#type::v3::RateLimitUnit;
use rls::rate_limit_response::{Code, DescriptorStatus, RateLimit, rate_limit::Unit as RlsUnit};
use tonic::{Request, Response, Status};

use super::auth::{actor, check_keys};
use super::convert;
use super::pb::{self, rate_limit_service_server};
use super::service::Defaults;
use crate::app::{Allowance, Error, count_decision};
use crate::domain::rate::{LimitDecision, RateItem, Selection};
use crate::domain::{
    AccountKey, CalendarUnit, InvalidArgument, LimitName, LimitSpec, MAX_RATE, Period, Timestamp,
};
use crate::storage::Store;

/// Most descriptors one ShouldRateLimit request may carry (Envoy sends one per matching rate-limit action).
const MAX_DESCRIPTORS: usize = 64;

fn invalid(e: InvalidArgument) -> Status {
    Error::from(e).into()
}

fn duration(d: TimeDelta) -> prost_types::Duration {
    convert::duration(d)
}

fn envoy_duration(d: TimeDelta) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration { seconds: d.num_seconds(), nanos: d.subsec_nanos() }
}

/// Whole seconds, rounded up: what HTTP headers carry.
fn ceil_seconds(d: TimeDelta) -> i64 {
    let us = d.num_microseconds().unwrap_or(i64::MAX).max(0);
    us / 1_000_000 + i64::from(us % 1_000_000 != 0)
}

pub struct RateLimitService<S> {
    app: Allowance<S>,
    defaults: Defaults,
}

impl<S: Store> RateLimitService<S> {
    pub fn new(app: Allowance<S>, defaults: Defaults) -> Self {
        Self { app, defaults }
    }
}

fn status(account: &AccountKey, d: &LimitDecision) -> pb::RateLimitStatus {
    pb::RateLimitStatus {
        key_id: account.key_id.to_string(),
        name: d.limit.name.to_string(),
        period: Some(convert::period_to_pb(&d.limit.period)),
        limit: d.limit.amount.unwrap_or(0),
        burst: d.limit.burst.unwrap_or(0),
        source: convert::source_to_pb(d.source).into(),
        allowed: d.decision.allowed,
        remaining: d.decision.remaining,
        retry_after: d.decision.retry_after.map(duration),
        reset_after: Some(duration(d.decision.reset_after)),
        cost_exceeds_burst: d.decision.exceeds_burst,
    }
}

#[tonic::async_trait]
impl<S: Store> rate_limit_service_server::RateLimitService for RateLimitService<S> {
    #[tracing::instrument(name = "grpc.check_rate", skip_all)]
    async fn check_rate(
        &self,
        request: Request<pb::CheckRateRequest>,
    ) -> Result<Response<pb::CheckRateResponse>, Status> {
        let by = actor(&request);
        let r = request.into_inner();
        let accounts =
            convert::reservation_accounts(r.key_id, r.additional_key_ids, r.unit, &self.defaults.unit)
                .map_err(invalid)?;
        let cost = r.cost.unwrap_or(1);
        if !(0..=MAX_RATE).contains(&cost) {
            return Err(invalid(InvalidArgument::new("cost", format!("must be between 0 and {MAX_RATE}"))));
        }
        let names = r
            .limit_names
            .into_iter()
            .enumerate()
            .map(|(i, n)| {
                LimitName::parse(n).map_err(|e| InvalidArgument::new(format!("limit_names[{i}]"), e.reason))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        check_keys(&by, accounts.iter().map(|a| &a.key_id))?;
        let names = (!names.is_empty()).then_some(names);
        let items: Vec<RateItem> = accounts
            .iter()
            .map(|account| RateItem {
                account: account.clone(),
                selection: Selection::All { names: names.clone() },
                cost,
                shadow: false,
            })
            .collect();
        let outcome = self.app.check_rate(items.clone()).await?;
        let mut limits = Vec::new();
        for (item, decisions) in items.iter().zip(&outcome.items) {
            for d in decisions {
                count_decision("check_rate", &d.limit.name, d.decision.allowed, false);
                limits.push(status(&item.account, d));
            }
        }
        let retry_after = outcome.retry_after(&vec![false; items.len()]).map(duration);
        Ok(Response::new(pb::CheckRateResponse { allowed: outcome.allowed, limits, retry_after }))
    }
}

/// Envoy's rate-limit service, with rules from the database.
pub struct EnvoyRateLimitService<S> {
    app: Allowance<S>,
}

impl<S: Store> EnvoyRateLimitService<S> {
    pub fn new(app: Allowance<S>) -> Self {
        Self { app }
    }
}

/// A descriptor's own limit: SECOND to DAY are rolling (GCRA, burst = the limit), WEEK to YEAR calendar
/// periods in UTC (weeks from Monday, months from the 1st, years from January 1st).
fn override_limit(
    o: &RateLimitOverride,
    name: &LimitName,
    now: Timestamp,
    field: &str,
) -> Result<LimitSpec, InvalidArgument> {
    let bad = |reason: &str| InvalidArgument::new(format!("{field}.limit"), reason.to_owned());
    let amount = i64::from(o.requests_per_unit);
    let rolling = |seconds| Period::Rolling(TimeDelta::seconds(seconds));
    let calendar = |unit, anchor: &str| {
        Period::calendar(unit, 1, anchor.parse().expect("a valid anchor"), "UTC", now)
            .map_err(|e| bad(&e.reason))
    };
    let period = match RateLimitUnit::try_from(o.unit) {
        Ok(RateLimitUnit::Second) => rolling(1),
        Ok(RateLimitUnit::Minute) => rolling(60),
        Ok(RateLimitUnit::Hour) => rolling(3600),
        Ok(RateLimitUnit::Day) => rolling(86_400),
        Ok(RateLimitUnit::Month) => calendar(CalendarUnit::Month, "2000-01-01T00:00:00Z")?,
        Ok(RateLimitUnit::Year) => calendar(CalendarUnit::Year, "2000-01-01T00:00:00Z")?,
        _ if o.unit == 7 => calendar(CalendarUnit::Week, "2000-01-03T00:00:00Z")?,
        _ => return Err(bad("has an unknown unit")),
    };
    let spec = LimitSpec::new(name.clone(), period, Some(amount)).map_err(|e| e.within(field))?;
    spec.with_burst(amount.max(1)).map_err(|e| e.within(field))
}

/// How Envoy names a period, where it can.
fn envoy_unit(period: &Period) -> RlsUnit {
    match period {
        Period::Rolling(d) => match d.num_seconds() {
            1 => RlsUnit::Second,
            60 => RlsUnit::Minute,
            3600 => RlsUnit::Hour,
            86_400 => RlsUnit::Day,
            _ => RlsUnit::Unknown,
        },
        Period::Calendar(c) if c.count == 1 => match c.unit {
            CalendarUnit::Day => RlsUnit::Day,
            CalendarUnit::Week => RlsUnit::Week,
            CalendarUnit::Month => RlsUnit::Month,
            CalendarUnit::Year => RlsUnit::Year,
        },
        Period::Calendar(_) => RlsUnit::Unknown,
    }
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue { key: key.to_owned(), value, ..Default::default() }
}

#[tonic::async_trait]
impl<S: Store> rls::rate_limit_service_server::RateLimitService for EnvoyRateLimitService<S> {
    #[tracing::instrument(name = "grpc.should_rate_limit", skip_all)]
    async fn should_rate_limit(
        &self,
        request: Request<rls::RateLimitRequest>,
    ) -> Result<Response<rls::RateLimitResponse>, Status> {
        let by = actor(&request);
        let r = request.into_inner();
        if r.domain.is_empty() {
            return Err(invalid(InvalidArgument::new("domain", "must not be empty")));
        }
        if r.descriptors.len() > MAX_DESCRIPTORS {
            return Err(invalid(InvalidArgument::new(
                "descriptors",
                format!("at most {MAX_DESCRIPTORS} per request, got {}", r.descriptors.len()),
            )));
        }
        let (rules, loaded) = self.app.rules_with_age();
        if loaded.is_none() {
            // Never read: answering OK for everything would fail open without anyone choosing to.
            return Err(Status::unavailable("the rate-limit rules could not be read yet; retry later"));
        }
        let now = self.app.now();
        // Envoy sends 0 when a request does not set hits_addend, meaning 1 (as its reference service reads it);
        // a descriptor's own hits_addend of 0 checks without counting.
        let request_cost = i64::from(r.hits_addend.max(1));
        let mut items = Vec::new();
        let mut matched = Vec::with_capacity(r.descriptors.len());
        for (i, d) in r.descriptors.iter().enumerate() {
            let field = format!("descriptors[{i}]");
            if d.is_negative_hits {
                return Err(invalid(InvalidArgument::new(
                    format!("{field}.is_negative_hits"),
                    "refunding hits is not supported",
                )));
            }
            let entries: Vec<(String, String)> =
                d.entries.iter().map(|e| (e.key.clone(), e.value.clone())).collect();
            let Some(rule) = crate::domain::rules::select(&rules, &r.domain, &entries) else {
                matched.push(None);
                continue;
            };
            let key = rule.key_template.render(&r.domain, &entries).map_err(|e| invalid(e.within(&field)))?;
            let cost = match &d.hits_addend {
                Some(h) => i64::try_from(h.value).ok().filter(|c| *c <= MAX_RATE).ok_or_else(|| {
                    invalid(InvalidArgument::new(
                        format!("{field}.hits_addend"),
                        format!("must be at most {MAX_RATE}"),
                    ))
                })?,
                None => request_cost,
            };
            let replace = d
                .limit
                .as_ref()
                .map(|o| override_limit(o, &rule.limit_name, now, &field))
                .transpose()
                .map_err(invalid)?;
            matched.push(Some((rule.clone(), items.len())));
            items.push(RateItem {
                account: AccountKey::new(key, rule.unit.clone()),
                selection: Selection::Named {
                    name: rule.limit_name.clone(),
                    fallback: rule.default.clone(),
                    replace,
                },
                cost,
                shadow: rule.shadow,
            });
        }
        // A gateway confined to a tenant's keys counts only against them.
        check_keys(&by, items.iter().map(|i| &i.account.key_id))?;
        let outcome = self.app.check_rate(items).await?;
        let mut statuses = Vec::with_capacity(matched.len());
        let mut overall = Code::Ok;
        // The limit nearest its end drives the response headers: one that denies before any that admits.
        let mut tightest: Option<(&LimitDecision, bool)> = None;
        // When a denied request would first be admitted: the longest wait of the denying limits, or never.
        let mut retry_after = Some(TimeDelta::zero());
        for m in &matched {
            let Some((rule, index)) = m else {
                statuses.push(DescriptorStatus { code: Code::Ok.into(), ..Default::default() });
                continue;
            };
            let Some(d) = outcome.items[*index].first() else {
                // The key has no limit of that name and the rule no default: not limited.
                statuses.push(DescriptorStatus { code: Code::Ok.into(), ..Default::default() });
                continue;
            };
            count_decision(rule.name.as_str(), &d.limit.name, d.decision.allowed, rule.shadow);
            let over = !d.decision.allowed && !rule.shadow;
            if over {
                overall = Code::OverLimit;
                retry_after = retry_after.zip(d.decision.retry_after).map(|(a, b)| a.max(b));
            }
            if tightest
                .is_none_or(|(t, t_over)| (!over, d.decision.remaining) < (!t_over, t.decision.remaining))
            {
                tightest = Some((d, over));
            }
            statuses.push(DescriptorStatus {
                code: if over { Code::OverLimit } else { Code::Ok }.into(),
                current_limit: Some(RateLimit {
                    name: rule.name.to_string(),
                    requests_per_unit: u32::try_from(d.limit.amount.unwrap_or(0)).unwrap_or(u32::MAX),
                    unit: envoy_unit(&d.limit.period).into(),
                }),
                limit_remaining: u32::try_from(d.decision.remaining).unwrap_or(u32::MAX),
                duration_until_reset: Some(envoy_duration(d.decision.reset_after)),
                ..Default::default()
            });
        }
        let mut headers = Vec::new();
        if let Some((d, _)) = tightest {
            headers.push(header("RateLimit-Limit", d.limit.amount.unwrap_or(0).to_string()));
            headers.push(header("RateLimit-Remaining", d.decision.remaining.to_string()));
            headers.push(header("RateLimit-Reset", ceil_seconds(d.decision.reset_after).to_string()));
        }
        // No Retry-After for a request no wait would admit (its cost exceeds a burst, or a limit is 0): a
        // client told "0" would retry at once, for ever.
        if let (Code::OverLimit, Some(wait)) = (overall, retry_after) {
            headers.push(header("Retry-After", ceil_seconds(wait).to_string()));
        }
        Ok(Response::new(rls::RateLimitResponse {
            overall_code: overall.into(),
            statuses,
            response_headers_to_add: headers,
            ..Default::default()
        }))
    }
}
