//! Proto <-> domain. Decoding validates: what comes out of here is a domain value or INVALID_ARGUMENT.

use chrono::TimeDelta;

use super::pb;
use crate::domain::rules::{KeyTemplate, PatternEntry, Rule};
use crate::domain::{
    AccountKey, AuditEvent, CalendarUnit, Caller, Exceeded, HoldTtl, InvalidArgument, KeyId, LimitName,
    LimitSource, LimitSpec, LimitUsage, MAX_KEYS_PER_RESERVATION, Period, Plan, PlanName, RetryAfter, Scope,
    Timestamp, Transaction, TxState, Unit, Window, WindowUsage,
};
use crate::storage::PlanInfo;

pub fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

pub fn duration(d: TimeDelta) -> prost_types::Duration {
    prost_types::Duration { seconds: d.num_seconds(), nanos: d.subsec_nanos() }
}

/// A proto Duration as a TimeDelta, or `None` when it is not a valid one.
fn delta(d: &prost_types::Duration) -> Option<TimeDelta> {
    if !(-999_999_999..=999_999_999).contains(&d.nanos)
        || (d.seconds > 0 && d.nanos < 0)
        || (d.seconds < 0 && d.nanos > 0)
    {
        return None;
    }
    TimeDelta::try_seconds(d.seconds).and_then(|s| s.checked_add(&TimeDelta::nanoseconds(d.nanos.into())))
}

/// A proto Timestamp as an instant; `None` outside what Postgres and chrono can hold.
fn instant(t: &prost_types::Timestamp) -> Option<Timestamp> {
    let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    chrono::DateTime::from_timestamp(t.seconds, nanos)
}

pub fn hold_ttl(d: Option<&prost_types::Duration>, default: HoldTtl) -> Result<HoldTtl, InvalidArgument> {
    let Some(d) = d else { return Ok(default) };
    HoldTtl::parse(delta(d).ok_or_else(|| InvalidArgument::new("hold_ttl", "is not a valid duration"))?)
}

pub fn window(value: i32) -> Result<Window, InvalidArgument> {
    match pb::Window::try_from(value) {
        Ok(pb::Window::Daily) => Ok(Window::Daily),
        Ok(pb::Window::Weekly) => Ok(Window::Weekly),
        Ok(pb::Window::Monthly) => Ok(Window::Monthly),
        Ok(pb::Window::Annual) => Ok(Window::Annual),
        Ok(pb::Window::Unspecified) => Err(InvalidArgument::new("window", "must be specified")),
        Err(_) => Err(InvalidArgument::new("window", format!("unknown value {value}"))),
    }
}

pub fn window_to_pb(w: Window) -> pb::Window {
    match w {
        Window::Daily => pb::Window::Daily,
        Window::Weekly => pb::Window::Weekly,
        Window::Monthly => pb::Window::Monthly,
        Window::Annual => pb::Window::Annual,
    }
}

/// An account from the request's key and unit; an empty unit is the server's default.
pub fn account(key_id: String, unit: String, default_unit: &Unit) -> Result<AccountKey, InvalidArgument> {
    let unit = if unit.is_empty() { default_unit.clone() } else { Unit::parse(unit)? };
    Ok(AccountKey::new(KeyId::parse(key_id)?, unit))
}

/// The accounts a reservation charges: `key_id`, then `additional_key_ids`, all in one unit, none repeated.
pub fn reservation_accounts(
    key_id: String,
    additional: Vec<String>,
    unit: String,
    default_unit: &Unit,
) -> Result<Vec<AccountKey>, InvalidArgument> {
    let first = account(key_id, unit, default_unit)?;
    if additional.len() + 1 > MAX_KEYS_PER_RESERVATION {
        return Err(InvalidArgument::new(
            "additional_key_ids",
            format!(
                "at most {} additional keys ({MAX_KEYS_PER_RESERVATION} in all), got {}",
                MAX_KEYS_PER_RESERVATION - 1,
                additional.len()
            ),
        ));
    }
    let mut accounts = vec![first];
    for key in additional {
        let key = KeyId::parse(key).map_err(|e| InvalidArgument::new("additional_key_ids", e.reason))?;
        if accounts.iter().any(|a| a.key_id == key) {
            return Err(InvalidArgument::new("additional_key_ids", format!("key {key} is named twice")));
        }
        accounts.push(AccountKey::new(key, accounts[0].unit.clone()));
    }
    Ok(accounts)
}

pub fn period(p: Option<pb::Period>, now: Timestamp) -> Result<Period, InvalidArgument> {
    match p.and_then(|p| p.kind) {
        None => Err(InvalidArgument::new("period", "must be rolling or calendar")),
        Some(pb::period::Kind::Rolling(d)) => {
            let length =
                delta(&d).ok_or_else(|| InvalidArgument::new("period.rolling", "is not a valid duration"))?;
            Period::rolling(length)
        }
        Some(pb::period::Kind::Calendar(c)) => {
            let unit = match pb::CalendarUnit::try_from(c.unit) {
                Ok(pb::CalendarUnit::Day) => CalendarUnit::Day,
                Ok(pb::CalendarUnit::Week) => CalendarUnit::Week,
                Ok(pb::CalendarUnit::Month) => CalendarUnit::Month,
                Ok(pb::CalendarUnit::Year) => CalendarUnit::Year,
                Ok(pb::CalendarUnit::Unspecified) => {
                    return Err(InvalidArgument::new("period.calendar.unit", "must be specified"));
                }
                Err(_) => {
                    return Err(InvalidArgument::new(
                        "period.calendar.unit",
                        format!("unknown value {}", c.unit),
                    ));
                }
            };
            // Range-checked here too, although `Period::calendar` also wants it within 100 years of now: every
            // instant of a request that reaches SQL (the anchor is stored in the period's text and its
            // boundaries become `since`) is checked at the edge.
            let anchor = c
                .anchor
                .as_ref()
                .ok_or_else(|| InvalidArgument::new("period.calendar.anchor", "is required"))
                .and_then(|a| stored_instant(a, "period.calendar.anchor"))?;
            let zone = if c.time_zone.is_empty() { "UTC" } else { &c.time_zone };
            Period::calendar(unit, c.count.max(1), anchor, zone, now)
        }
    }
}

pub fn period_to_pb(p: &Period) -> pb::Period {
    let kind = match p {
        Period::Rolling(length) => pb::period::Kind::Rolling(duration(*length)),
        Period::Calendar(c) => pb::period::Kind::Calendar(pb::CalendarPeriod {
            unit: match c.unit {
                CalendarUnit::Day => pb::CalendarUnit::Day,
                CalendarUnit::Week => pb::CalendarUnit::Week,
                CalendarUnit::Month => pb::CalendarUnit::Month,
                CalendarUnit::Year => pb::CalendarUnit::Year,
            }
            .into(),
            count: c.count,
            anchor: Some(timestamp(c.anchor)),
            time_zone: c.zone.name().to_owned(),
        }),
    };
    pb::Period { kind: Some(kind) }
}

/// A limit of a request, its errors named under `field` (`limit`, `limits[3]`).
pub fn limit(l: Option<pb::Limit>, field: &str, now: Timestamp) -> Result<LimitSpec, InvalidArgument> {
    let l = l.ok_or_else(|| InvalidArgument::new(field.to_owned(), "is required"))?;
    let name = LimitName::parse(l.name).map_err(|e| e.within(field))?;
    let period = period(l.period, now).map_err(|e| e.within(field))?;
    let spec = LimitSpec::new(name, period, l.amount).map_err(|e| e.within(field))?;
    match l.burst {
        Some(burst) => spec.with_burst(burst).and_then(LimitSpec::check_refill).map_err(|e| e.within(field)),
        None => Ok(spec),
    }
}

pub fn limit_to_pb(l: &LimitSpec) -> pb::Limit {
    pb::Limit {
        name: l.name.to_string(),
        period: Some(period_to_pb(&l.period)),
        amount: l.amount,
        burst: l.burst,
    }
}

pub fn limit_usage(u: &LimitUsage) -> pb::LimitUsage {
    pb::LimitUsage {
        key_id: u.account.key_id.to_string(),
        name: u.name.to_string(),
        period: Some(period_to_pb(&u.period)),
        limit: u.limit.unwrap_or(i64::MAX),
        spent: saturate(u.spent),
        held: saturate(u.held),
        remaining: u.remaining().map(saturate).unwrap_or(i64::MAX),
        source: match u.source {
            Some(LimitSource::Key) => pb::LimitSource::Key,
            Some(LimitSource::Plan) => pb::LimitSource::Plan,
            None => pb::LimitSource::Unspecified,
        }
        .into(),
        period_start: u.period_start.map(timestamp),
        resets_at: u.resets_at.map(timestamp),
    }
}

pub fn exceeded(e: &Exceeded) -> pb::ExceededLimit {
    let u = limit_usage(&e.usage);
    pb::ExceededLimit {
        key_id: u.key_id,
        name: u.name,
        period: u.period,
        limit: u.limit,
        spent: u.spent,
        held: u.held,
        retry_after: match e.retry_after {
            Some(RetryAfter::After(d)) => Some(duration(d)),
            Some(RetryAfter::Never) | None => None,
        },
    }
}

/// The longest retry_after of a denial's limits, or `None` when one of them can never fit.
pub fn overall_retry_after(exceeded: &[Exceeded]) -> Option<prost_types::Duration> {
    let mut longest = TimeDelta::zero();
    for e in exceeded {
        match e.retry_after {
            Some(RetryAfter::After(d)) => longest = longest.max(d),
            Some(RetryAfter::Never) | None => return None,
        }
    }
    Some(duration(longest))
}

/// A plan from a request.
pub fn plan(
    name: String,
    limits: Vec<pb::PlanLimit>,
    default_unit: &Unit,
    now: Timestamp,
) -> Result<Plan, InvalidArgument> {
    let name = PlanName::parse(name).map_err(|e| InvalidArgument::new("name", e.reason))?;
    let mut specs = Vec::with_capacity(limits.len());
    for (i, l) in limits.into_iter().enumerate() {
        let field = format!("limits[{i}]");
        let unit = if l.unit.is_empty() {
            default_unit.clone()
        } else {
            Unit::parse(l.unit).map_err(|e| e.within(&field))?
        };
        let spec = limit(
            Some(pb::Limit { name: l.name, period: l.period, amount: Some(l.amount), burst: l.burst }),
            &field,
            now,
        )?;
        specs.push((unit, spec));
    }
    Plan::new(name, specs)
}

pub fn plan_to_pb(p: PlanInfo) -> pb::Plan {
    let limits = p
        .plan
        .limits
        .iter()
        .flat_map(|(unit, specs)| {
            specs.iter().map(move |s| pb::PlanLimit {
                unit: unit.to_string(),
                name: s.name.to_string(),
                period: Some(period_to_pb(&s.period)),
                amount: s.amount.unwrap_or(i64::MAX),
                burst: s.burst,
            })
        })
        .collect();
    pb::Plan { name: p.plan.name.to_string(), limits, key_count: p.keys }
}

/// Totals above i64::MAX (possible on an unlimited key) are reported as i64::MAX.
fn saturate(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

pub fn usage(u: &WindowUsage) -> pb::WindowUsage {
    pb::WindowUsage {
        window: window_to_pb(u.window).into(),
        limit: u.limit,
        spent: saturate(u.spent),
        held: saturate(u.held),
        remaining: u.remaining().map(saturate),
    }
}

pub fn state(s: TxState) -> pb::TransactionState {
    match s {
        TxState::Held => pb::TransactionState::Held,
        TxState::Committed => pb::TransactionState::Committed,
        TxState::Reversed => pb::TransactionState::Reversed,
        TxState::Expired => pb::TransactionState::Expired,
    }
}

pub fn transaction(t: Transaction) -> pb::Transaction {
    let key_ids: Vec<String> = t.accounts.iter().map(|a| a.key_id.to_string()).collect();
    let primary = t.primary().clone();
    pb::Transaction {
        key_ids,
        transaction_id: t.id.into_string(),
        key_id: primary.key_id.into_string(),
        unit: primary.unit.into_string(),
        amount: t.amount,
        state: state(t.state).into(),
        created_at: Some(timestamp(t.created_at)),
        expires_at: t.expires_at.map(timestamp),
        committed_at: t.committed_at.map(timestamp),
        reversed_at: t.reversed_at.map(timestamp),
        metadata: t.metadata.into_entries().into_iter().collect(),
        held_amount: t.held_amount,
        committed_late: t.committed_late,
    }
}

/// A listing's page size: 0 means `default`; the app caps it.
pub fn page_size(value: i32, default: u32) -> Result<u32, InvalidArgument> {
    match value {
        0 => Ok(default),
        n => u32::try_from(n).map_err(|_| InvalidArgument::new("page_size", "must not be negative")),
    }
}

/// Earliest and latest instants accepted from a client where they reach SQL: Postgres stores years 4713 BC
/// to 294276 AD, chrono more; a request outside years 1 to 9999 is bad input, not a database error.
pub fn storable(t: Timestamp) -> bool {
    (1..=9999).contains(&chrono::Datelike::year(&t))
}

/// A client's instant that will reach SQL, range-checked.
pub fn stored_instant(t: &prost_types::Timestamp, field: &'static str) -> Result<Timestamp, InvalidArgument> {
    instant(t)
        .filter(|t| storable(*t))
        .ok_or_else(|| InvalidArgument::new(field, "is not a valid time between years 1 and 9999"))
}

fn optional_timestamp(t: Option<Timestamp>) -> Option<prost_types::Timestamp> {
    t.map(timestamp)
}

pub fn scope_to_pb(scope: Scope) -> pb::Scope {
    match scope {
        Scope::Spend => pb::Scope::Spend,
        Scope::Read => pb::Scope::Read,
        Scope::Admin => pb::Scope::Admin,
        Scope::RateLimit => pb::Scope::Ratelimit,
    }
}

pub fn source_to_pb(source: Option<LimitSource>) -> pb::LimitSource {
    match source {
        Some(LimitSource::Key) => pb::LimitSource::Key,
        Some(LimitSource::Plan) => pb::LimitSource::Plan,
        None => pb::LimitSource::Unspecified,
    }
}

pub fn rule(
    r: Option<pb::RateLimitRule>,
    default_unit: &Unit,
    now: Timestamp,
) -> Result<Rule, InvalidArgument> {
    let r = r.ok_or_else(|| InvalidArgument::new("rule", "is required"))?;
    let within = |e: InvalidArgument| e.within("rule");
    let name = LimitName::parse(r.name).map_err(|e| InvalidArgument::new("rule.name", e.reason))?;
    let limit_name =
        LimitName::parse(r.limit_name).map_err(|e| InvalidArgument::new("rule.limit_name", e.reason))?;
    let unit = if r.unit.is_empty() { default_unit.clone() } else { Unit::parse(r.unit).map_err(within)? };
    let pattern: Vec<PatternEntry> =
        r.pattern.into_iter().map(|p| PatternEntry { key: p.key, value: p.value }).collect();
    let default = match r.default_limit {
        None => None,
        Some(mut l) => {
            l.name = limit_name.to_string();
            if l.burst.is_none() || l.amount.is_none() {
                return Err(InvalidArgument::new(
                    "rule.default_limit",
                    "needs an amount and a burst (a rate limit)",
                ));
            }
            Some(limit(Some(l), "rule.default_limit", now)?)
        }
    };
    Rule {
        name,
        domain: r.domain,
        key_template: KeyTemplate::parse(r.key_template, &pattern).map_err(within)?,
        pattern,
        unit,
        limit_name,
        default,
        shadow: r.shadow,
    }
    .check()
    .map_err(within)
}

pub fn rule_to_pb(r: &Rule) -> pb::RateLimitRule {
    pb::RateLimitRule {
        name: r.name.to_string(),
        domain: r.domain.clone(),
        pattern: r
            .pattern
            .iter()
            .map(|p| pb::DescriptorPattern { key: p.key.clone(), value: p.value.clone() })
            .collect(),
        key_template: r.key_template.to_string(),
        unit: r.unit.to_string(),
        limit_name: r.limit_name.to_string(),
        default_limit: r.default.as_ref().map(limit_to_pb),
        shadow: r.shadow,
    }
}

pub fn caller(c: &Caller) -> pb::Caller {
    pb::Caller {
        id: c.id.to_string(),
        name: c.name.as_str().to_owned(),
        scopes: c.scopes.iter().map(|s| scope_to_pb(*s).into()).collect(),
        key_prefixes: c.key_prefixes.as_slice().to_vec(),
        create_time: Some(timestamp(c.created_at)),
        rotate_time: optional_timestamp(c.rotated_at),
        revoke_time: optional_timestamp(c.revoked_at),
        has_previous_secret: c.has_previous_secret,
    }
}

pub fn audit_event(e: &AuditEvent) -> pb::AuditEvent {
    let json = |v: &Option<serde_json::Value>| v.as_ref().map(|v| v.to_string()).unwrap_or_default();
    pb::AuditEvent {
        id: e.id,
        time: Some(timestamp(e.at)),
        caller_id: e.caller_id.map(|id| id.to_string()).unwrap_or_default(),
        caller_name: e.caller_name.clone(),
        request_id: e.request_id.clone(),
        action: e.action.as_str().to_owned(),
        key_id: e.key_id.clone().unwrap_or_default(),
        unit: e.unit.clone().unwrap_or_default(),
        subject: e.subject.clone(),
        before_json: json(&e.before),
        after_json: json(&e.after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_defaults_when_unset_and_is_bounded() {
        let default = HoldTtl::parse(TimeDelta::minutes(15)).unwrap();
        assert_eq!(hold_ttl(None, default).unwrap(), default);
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(hold_ttl(Some(&d(1, 0)), default).unwrap().get(), TimeDelta::seconds(1));
        assert!(hold_ttl(Some(&d(0, 999_999_999)), default).is_err());
        assert!(hold_ttl(Some(&d(-5, 0)), default).is_err());
        assert!(hold_ttl(Some(&d(i64::MAX, 0)), default).is_err());
        assert!(hold_ttl(Some(&d(5, 2_000_000_000)), default).is_err());
        assert_eq!(hold_ttl(Some(&d(0, 0)), default).unwrap_err().field, "hold_ttl");
    }

    #[test]
    fn windows_decode_and_reject_unspecified() {
        assert_eq!(window(2).unwrap(), Window::Weekly);
        assert_eq!(window(0).unwrap_err().field, "window");
        assert_eq!(window(99).unwrap_err().field, "window");
    }

    #[test]
    fn request_instants_outside_what_postgres_stores_are_invalid_arguments() {
        let ts = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        let now = chrono::DateTime::from_timestamp(1_893_456_000, 0).unwrap();
        for bad in [
            ts(i64::MAX, 0),
            ts(i64::MIN, 0),
            ts(-62_135_596_801, 0), // 0000-12-31T23:59:59Z, year 0
            ts(253_402_300_800, 0), // 10000-01-01T00:00:00Z
            ts(0, -1),
            ts(0, 1_000_000_000),
        ] {
            assert_eq!(stored_instant(&bad, "start_time").unwrap_err().field, "start_time", "{bad:?}");
            let calendar = pb::Period {
                kind: Some(pb::period::Kind::Calendar(pb::CalendarPeriod {
                    unit: pb::CalendarUnit::Day.into(),
                    count: 1,
                    anchor: Some(bad),
                    time_zone: "UTC".into(),
                })),
            };
            assert_eq!(period(Some(calendar), now).unwrap_err().field, "period.calendar.anchor", "{bad:?}");
        }
        assert!(stored_instant(&ts(-62_135_596_800, 0), "t").is_ok(), "0001-01-01T00:00:00Z");
        assert!(
            stored_instant(&ts(253_402_300_799, 999_999_999), "t").is_ok(),
            "9999-12-31T23:59:59.999999999Z"
        );
    }

    #[test]
    fn usage_saturates_huge_totals() {
        let u = WindowUsage { window: Window::Daily, limit: None, spent: i128::from(i64::MAX) * 2, held: 0 };
        let pb = usage(&u);
        assert_eq!(pb.spent, i64::MAX);
        assert_eq!(pb.remaining, None);
    }
}
