//! How client commands print answers: a readable table, or JSON with lower-case enum names and RFC 3339 times.

use serde_json::{Value, json};

use crate::grpc::pb;

/// Writes one line of a command's output (see `outln!`): if the reader has gone, the command ends here, with
/// the status a shell gives a command ended by SIGPIPE (141: never 0, which could hide a denial's 3 or
/// reconcile's 4 from `set -o pipefail`); any other failure to write is an error exit.
pub(super) fn write_line(line: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(line).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("error: writing the output: {e}");
        std::process::exit(1);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

impl Format {
    pub fn of(json: bool) -> Self {
        if json { Format::Json } else { Format::Table }
    }
}

fn window_name(w: i32) -> &'static str {
    match pb::Window::try_from(w) {
        Ok(pb::Window::Daily) => "daily",
        Ok(pb::Window::Weekly) => "weekly",
        Ok(pb::Window::Monthly) => "monthly",
        Ok(pb::Window::Annual) => "annual",
        _ => "unspecified",
    }
}

fn state_name(s: i32) -> &'static str {
    match pb::TransactionState::try_from(s) {
        Ok(pb::TransactionState::Held) => "held",
        Ok(pb::TransactionState::Committed) => "committed",
        Ok(pb::TransactionState::Reversed) => "reversed",
        Ok(pb::TransactionState::Expired) => "expired",
        _ => "unspecified",
    }
}

fn time(t: Option<&prost_types::Timestamp>) -> Option<String> {
    let t = t?;
    chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

fn calendar_unit_name(u: i32) -> &'static str {
    match pb::CalendarUnit::try_from(u) {
        Ok(pb::CalendarUnit::Day) => "day",
        Ok(pb::CalendarUnit::Week) => "week",
        Ok(pb::CalendarUnit::Month) => "month",
        Ok(pb::CalendarUnit::Year) => "year",
        _ => "unspecified",
    }
}

fn source_name(s: i32) -> &'static str {
    match pb::LimitSource::try_from(s) {
        Ok(pb::LimitSource::Key) => "key",
        Ok(pb::LimitSource::Plan) => "plan",
        _ => "unspecified",
    }
}

/// Whole seconds of a duration, rounded up: waiting that long is always enough.
fn ceil_seconds(d: &prost_types::Duration) -> i64 {
    d.seconds + i64::from(d.nanos > 0)
}

fn human_duration(d: &prost_types::Duration) -> String {
    crate::domain::span_text(ceil_seconds(d))
}

/// The calendar's time zone, or UTC when the name is empty or unknown here.
fn zone_of(c: &pb::CalendarPeriod) -> chrono_tz::Tz {
    c.time_zone.parse().unwrap_or(chrono_tz::UTC)
}

/// `rolling 1d`, or `calendar 1 month from 2000-01-01T00:00:00+01:00 in Europe/Paris` (the anchor in its zone).
fn period_text(p: Option<&pb::Period>) -> String {
    match p.and_then(|p| p.kind.as_ref()) {
        Some(pb::period::Kind::Rolling(d)) => format!("rolling {}", human_duration(d)),
        Some(pb::period::Kind::Calendar(c)) => {
            let count = c.count.max(1);
            let unit = calendar_unit_name(c.unit);
            let plural = if count == 1 { "" } else { "s" };
            let anchor = c
                .anchor
                .as_ref()
                .and_then(|t| {
                    chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
                })
                .map(|t| t.with_timezone(&zone_of(c)).format("%Y-%m-%dT%H:%M:%S%:z").to_string())
                .unwrap_or_else(|| "?".into());
            let zone = if c.time_zone.is_empty() { "UTC" } else { &c.time_zone };
            format!("calendar {count} {unit}{plural} from {anchor} in {zone}")
        }
        None => "-".to_owned(),
    }
}

/// `{"kind": "rolling", "seconds": 86400}` or
/// `{"kind": "calendar", "unit": "month", "count": 1, "anchor": "…Z", "time_zone": "Europe/Paris"}`.
fn period_json(p: Option<&pb::Period>) -> Value {
    match p.and_then(|p| p.kind.as_ref()) {
        Some(pb::period::Kind::Rolling(d)) => json!({ "kind": "rolling", "seconds": d.seconds }),
        Some(pb::period::Kind::Calendar(c)) => json!({
            "kind": "calendar",
            "unit": calendar_unit_name(c.unit),
            "count": c.count.max(1),
            "anchor": time(c.anchor.as_ref()),
            "time_zone": if c.time_zone.is_empty() { "UTC" } else { &c.time_zone },
        }),
        None => Value::Null,
    }
}

fn limit_usage_json(u: &pb::LimitUsage) -> Value {
    json!({
        "key_id": u.key_id,
        "name": u.name,
        "period": period_json(u.period.as_ref()),
        "limit": u.limit,
        "spent": u.spent,
        "held": u.held,
        "remaining": u.remaining,
        "source": source_name(u.source),
        "period_start": time(u.period_start.as_ref()),
        "resets_at": time(u.resets_at.as_ref()),
    })
}

/// A key's own limit as set; `limit` is null for an explicit "unlimited".
fn key_limit_json(l: &pb::Limit) -> Value {
    let mut v = json!({ "name": l.name, "period": period_json(l.period.as_ref()), "limit": l.amount });
    if let Some(burst) = l.burst {
        v["burst"] = json!(burst);
    }
    v
}

/// A rate limit as set (it has no spending usage): in the limits table, its burst in the source column.
fn rate_row(l: &pb::Limit) -> Vec<String> {
    let dash = || "-".to_owned();
    vec![
        l.name.clone(),
        period_text(l.period.as_ref()),
        opt(l.amount),
        dash(),
        dash(),
        dash(),
        format!("key (rate, burst {})", l.burst.unwrap_or(0)),
        dash(),
    ]
}

fn retry_json(d: Option<&prost_types::Duration>) -> (Value, Value) {
    match d {
        Some(d) => (json!(ceil_seconds(d)), json!(human_duration(d))),
        None => (Value::Null, Value::Null),
    }
}

fn exceeded_json(e: &pb::ExceededLimit) -> Value {
    let (seconds, text) = retry_json(e.retry_after.as_ref());
    json!({
        "key_id": e.key_id,
        "name": e.name,
        "period": period_json(e.period.as_ref()),
        "limit": e.limit,
        "spent": e.spent,
        "held": e.held,
        "retry_after_seconds": seconds,
        "retry_after": text,
    })
}

fn plan_json(p: &pb::Plan) -> Value {
    json!({
        "name": p.name,
        "key_count": p.key_count,
        "limits": p.limits.iter().map(|l| {
            let mut v = json!({
                "unit": l.unit,
                "name": l.name,
                "period": period_json(l.period.as_ref()),
                "limit": l.amount,
            });
            if let Some(burst) = l.burst {
                v["burst"] = json!(burst);
            }
            v
        }).collect::<Vec<_>>(),
    })
}

fn usage_json(u: &pb::WindowUsage) -> Value {
    json!({
        "window": window_name(u.window),
        "limit": u.limit,
        "spent": u.spent,
        "held": u.held,
        "remaining": u.remaining,
    })
}

fn transaction_json(t: &pb::Transaction) -> Value {
    json!({
        "transaction_id": t.transaction_id,
        "key_id": t.key_id,
        "unit": t.unit,
        "amount": t.amount,
        "held_amount": t.held_amount,
        "state": state_name(t.state),
        "committed_late": t.committed_late,
        "created_at": time(t.created_at.as_ref()),
        "expires_at": time(t.expires_at.as_ref()),
        "committed_at": time(t.committed_at.as_ref()),
        "reversed_at": time(t.reversed_at.as_ref()),
        "metadata": t.metadata,
        "key_ids": t.key_ids,
    })
}

/// JSON, for other client modules.
pub fn print_value(v: &Value) {
    print_json(v)
}

/// A table, for other client modules.
pub fn print_rows(header: &[&str], rows: &[Vec<String>]) {
    print_table(header, rows)
}

pub fn period_value(p: Option<&pb::Period>) -> Value {
    period_json(p)
}

pub fn period_label(p: Option<&pb::Period>) -> String {
    period_text(p)
}

fn print_json(v: &Value) {
    outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Columns padded to their widest cell, counted in characters as `format!` pads (keys and units may be
/// any UTF-8: `ключ`, `€`).
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        outln!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn opt(v: Option<i64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn print_usage_table(usage: &[pb::WindowUsage]) {
    let rows: Vec<Vec<String>> = usage
        .iter()
        .map(|u| {
            vec![
                window_name(u.window).to_owned(),
                opt(u.limit),
                u.spent.to_string(),
                u.held.to_string(),
                opt(u.remaining),
            ]
        })
        .collect();
    print_table(&["WINDOW", "LIMIT", "SPENT", "HELD", "REMAINING"], &rows);
}

/// Every key charged, key_id first, comma-separated.
fn keys_cell(t: &pb::Transaction) -> String {
    if t.key_ids.is_empty() { t.key_id.clone() } else { t.key_ids.join(",") }
}

fn transaction_row(t: &pb::Transaction) -> Vec<String> {
    vec![
        t.transaction_id.clone(),
        keys_cell(t),
        t.unit.clone(),
        t.amount.to_string(),
        state_name(t.state).to_owned() + if t.committed_late { " (late)" } else { "" },
        time(t.created_at.as_ref()).unwrap_or_default(),
        time(t.expires_at.as_ref()).unwrap_or_else(|| "-".into()),
    ]
}

const TX_HEADER: &[&str] = &["TRANSACTION", "KEY", "UNIT", "AMOUNT", "STATE", "CREATED", "EXPIRES"];

fn limit_usage_row(u: &pb::LimitUsage, with_key: bool) -> Vec<String> {
    let mut row = if with_key { vec![u.key_id.clone()] } else { vec![] };
    row.extend([
        u.name.clone(),
        period_text(u.period.as_ref()),
        u.limit.to_string(),
        u.spent.to_string(),
        u.held.to_string(),
        u.remaining.to_string(),
        source_name(u.source).to_owned(),
        time(u.resets_at.as_ref()).unwrap_or_else(|| "-".into()),
    ]);
    row
}

const LIMIT_HEADER: &[&str] =
    &["NAME", "PERIOD", "LIMIT", "SPENT", "HELD", "REMAINING", "SOURCE", "RESETS_AT"];

fn print_limit_usage_table(usage: &[pb::LimitUsage], with_key: bool) {
    let header: Vec<&str> = if with_key { [&["KEY"], LIMIT_HEADER].concat() } else { LIMIT_HEADER.to_vec() };
    let rows: Vec<Vec<String>> = usage.iter().map(|u| limit_usage_row(u, with_key)).collect();
    print_table(&header, &rows);
}

/// A key's own "unlimited" override, as a row of the limits table.
fn unlimited_row(l: &pb::Limit) -> Vec<String> {
    let dash = || "-".to_owned();
    vec![
        l.name.clone(),
        period_text(l.period.as_ref()),
        "unlimited".into(),
        dash(),
        dash(),
        dash(),
        "key".into(),
        dash(),
    ]
}

pub fn limits(format: Format, r: &pb::GetLimitsResponse) {
    match format {
        Format::Json => print_json(&json!({
            "key_id": r.key_id,
            "unit": r.unit,
            "usage": r.usage.iter().map(usage_json).collect::<Vec<_>>(),
            "plan": (!r.plan.is_empty()).then_some(&r.plan),
            "limits": r.limits.iter().map(limit_usage_json).collect::<Vec<_>>(),
            "key_limits": r.key_limits.iter().map(key_limit_json).collect::<Vec<_>>(),
        })),
        Format::Table => {
            outln!("key {} unit {}", r.key_id, r.unit);
            print_usage_table(&r.usage);
            if r.plan.is_empty() && r.limits.is_empty() && r.key_limits.is_empty() {
                return;
            }
            outln!("plan {}", if r.plan.is_empty() { "-" } else { &r.plan });
            // Every limit that applies, then the key's "unlimited" overrides (the rest of key_limits are
            // the rows whose source is key).
            let mut rows: Vec<Vec<String>> = r.limits.iter().map(|u| limit_usage_row(u, false)).collect();
            rows.extend(r.key_limits.iter().filter(|l| l.amount.is_none()).map(unlimited_row));
            rows.extend(
                r.key_limits.iter().filter(|l| l.amount.is_some() && l.burst.is_some()).map(rate_row),
            );
            print_table(LIMIT_HEADER, &rows);
        }
    }
}

/// After `limits set --name`: the limit's usage, or (for `--unlimited`, which has none) the limit as set.
pub fn limit_put(format: Format, key: &str, limit: &pb::Limit, usage: Option<&pb::LimitUsage>) {
    match (format, usage) {
        (Format::Json, Some(u)) => print_json(&limit_usage_json(u)),
        (Format::Json, None) => print_json(&json!({
            "key_id": key,
            "name": limit.name,
            "period": period_json(limit.period.as_ref()),
            "limit": limit.amount,
            "spent": null,
            "held": null,
            "remaining": null,
            "source": "key",
            "period_start": null,
            "resets_at": null,
            "burst": limit.burst,
        })),
        (Format::Table, Some(u)) => print_limit_usage_table(std::slice::from_ref(u), false),
        (Format::Table, None) if limit.burst.is_some() => print_table(LIMIT_HEADER, &[rate_row(limit)]),
        (Format::Table, None) => print_table(LIMIT_HEADER, &[unlimited_row(limit)]),
    }
}

pub fn limit_deleted(format: Format, key: &str, name: &str) {
    match format {
        Format::Json => print_json(&json!({ "key_id": key, "name": name, "removed": true })),
        Format::Table => outln!("removed limit {name} of key {key}"),
    }
}

fn plan_rows(p: &pb::Plan) -> Vec<Vec<String>> {
    p.limits
        .iter()
        .map(|l| {
            let limit = match l.burst {
                Some(burst) => format!("{} (rate, burst {burst})", l.amount),
                None => l.amount.to_string(),
            };
            vec![l.unit.clone(), l.name.clone(), period_text(l.period.as_ref()), limit]
        })
        .collect()
}

pub fn plan(format: Format, p: Option<&pb::Plan>) {
    let Some(p) = p else { return };
    match format {
        Format::Json => print_json(&plan_json(p)),
        Format::Table => {
            outln!("plan {} keys {}", p.name, p.key_count);
            print_table(&["UNIT", "NAME", "PERIOD", "LIMIT"], &plan_rows(p));
        }
    }
}

pub fn plans(format: Format, plans: &[pb::Plan]) {
    match format {
        Format::Json => print_json(&json!({ "plans": plans.iter().map(plan_json).collect::<Vec<_>>() })),
        Format::Table => {
            let rows: Vec<Vec<String>> = plans
                .iter()
                .flat_map(|p| {
                    let head = [p.name.clone(), p.key_count.to_string()];
                    let limits = plan_rows(p);
                    if limits.is_empty() {
                        vec![[head.to_vec(), vec!["-".into(); 4]].concat()]
                    } else {
                        limits.into_iter().map(|l| [head.to_vec(), l].concat()).collect()
                    }
                })
                .collect();
            print_table(&["PLAN", "KEYS", "UNIT", "NAME", "PERIOD", "LIMIT"], &rows);
        }
    }
}

pub fn plan_deleted(format: Format, name: &str) {
    match format {
        Format::Json => print_json(&json!({ "name": name, "deleted": true })),
        Format::Table => outln!("deleted plan {name}"),
    }
}

pub fn plan_assigned(format: Format, key: &str, plan: Option<&str>) {
    match format {
        Format::Json => print_json(&json!({ "key_id": key, "plan": plan })),
        Format::Table => outln!("key {key} plan {}", plan.unwrap_or("-")),
    }
}

pub fn usage(format: Format, usage: &[pb::WindowUsage]) {
    match format {
        Format::Json => match usage {
            [one] => print_json(&usage_json(one)),
            many => print_json(&Value::Array(many.iter().map(usage_json).collect())),
        },
        Format::Table => print_usage_table(usage),
    }
}

/// The exceeded limits of a denial in the order they are named: the first key's round-1 windows in window
/// order (as round 1 printed them), then the rest as the server lists them.
fn exceeded_in_order<'a>(key: &str, r: &'a pb::ReserveSpendingResponse) -> Vec<&'a pb::ExceededLimit> {
    const WINDOWS: [&str; 4] = ["daily", "weekly", "monthly", "annual"];
    let rank = |e: &pb::ExceededLimit| match WINDOWS.iter().position(|w| *w == e.name) {
        Some(i) if e.key_id == key => i,
        _ => WINDOWS.len(),
    };
    let mut out: Vec<&pb::ExceededLimit> = r.exceeded_limits.iter().collect();
    out.sort_by_key(|e| rank(e));
    out
}

pub fn reservation(format: Format, key: &str, r: &pb::ReserveSpendingResponse) {
    match format {
        Format::Json => {
            let (seconds, text) = retry_json(r.retry_after.as_ref());
            print_json(&json!({
                "allowed": r.allowed,
                "exceeded": r.exceeded.iter().map(|w| window_name(*w)).collect::<Vec<_>>(),
                "usage": r.usage.iter().map(usage_json).collect::<Vec<_>>(),
                "transaction": r.transaction.as_ref().map(transaction_json),
                "exceeded_limits": r.exceeded_limits.iter().map(exceeded_json).collect::<Vec<_>>(),
                "limits": r.limits.iter().map(limit_usage_json).collect::<Vec<_>>(),
                "retry_after_seconds": seconds,
                "retry_after": text,
            }))
        }
        Format::Table => {
            let several_keys = r.limits.iter().any(|u| u.key_id != key);
            if r.allowed {
                outln!("allowed");
            } else {
                let exceeded = exceeded_in_order(key, r);
                let names: Vec<String> = if exceeded.is_empty() {
                    r.exceeded.iter().map(|w| window_name(*w).to_owned()).collect()
                } else {
                    exceeded
                        .iter()
                        .map(|e| {
                            if e.key_id == key {
                                e.name.clone()
                            } else {
                                format!("{} of key {}", e.name, e.key_id)
                            }
                        })
                        .collect()
                };
                outln!("denied: exceeds {}", names.join(", "));
                let rows: Vec<Vec<String>> = exceeded
                    .iter()
                    .map(|e| {
                        vec![
                            e.key_id.clone(),
                            e.name.clone(),
                            period_text(e.period.as_ref()),
                            e.limit.to_string(),
                            e.spent.to_string(),
                            e.held.to_string(),
                            e.retry_after.as_ref().map_or_else(|| "never".to_owned(), human_duration),
                        ]
                    })
                    .collect();
                if !rows.is_empty() {
                    print_table(&["KEY", "NAME", "PERIOD", "LIMIT", "SPENT", "HELD", "RETRY_AFTER"], &rows);
                    match &r.retry_after {
                        Some(d) => outln!("retry after {}", human_duration(d)),
                        None => outln!("retry after never: the amount alone exceeds a limit"),
                    }
                }
            }
            if let Some(t) = &r.transaction {
                print_table(TX_HEADER, &[transaction_row(t)]);
            }
            if !r.usage.is_empty() {
                print_usage_table(&r.usage);
            }
            if !r.limits.is_empty() {
                print_limit_usage_table(&r.limits, several_keys);
            }
        }
    }
}

pub fn transaction(format: Format, t: Option<&pb::Transaction>) {
    let Some(t) = t else { return };
    match format {
        Format::Json => print_json(&transaction_json(t)),
        Format::Table => print_table(TX_HEADER, &[transaction_row(t)]),
    }
}

pub fn transactions(format: Format, r: &pb::ListTransactionsResponse) {
    match format {
        Format::Json => print_json(&json!({
            "transactions": r.transactions.iter().map(transaction_json).collect::<Vec<_>>(),
            "next_page_token": r.next_page_token,
        })),
        Format::Table => {
            let rows: Vec<Vec<String>> = r.transactions.iter().map(transaction_row).collect();
            print_table(TX_HEADER, &rows);
            if !r.next_page_token.is_empty() {
                outln!("next page: --page-token {}", r.next_page_token);
            }
        }
    }
}

pub fn health(format: Format, status: &str) {
    match format {
        Format::Json => print_json(&json!({ "status": status })),
        Format::Table => outln!("{status}"),
    }
}

fn scope_name(s: i32) -> &'static str {
    match pb::Scope::try_from(s) {
        Ok(pb::Scope::Spend) => "spend",
        Ok(pb::Scope::Read) => "read",
        Ok(pb::Scope::Admin) => "admin",
        Ok(pb::Scope::Ratelimit) => "ratelimit",
        _ => "unspecified",
    }
}

fn caller_json(c: &pb::Caller) -> Value {
    json!({
        "id": c.id,
        "name": c.name,
        "scopes": c.scopes.iter().map(|s| scope_name(*s)).collect::<Vec<_>>(),
        "key_prefixes": c.key_prefixes,
        "created_at": time(c.create_time.as_ref()),
        "rotated_at": time(c.rotate_time.as_ref()),
        "revoked_at": time(c.revoke_time.as_ref()),
        "has_previous_secret": c.has_previous_secret,
    })
}

fn caller_row(c: &pb::Caller) -> Vec<String> {
    let state = match (&c.revoke_time, c.has_previous_secret) {
        (Some(_), _) => "revoked",
        (None, true) => "rotating",
        (None, false) => "active",
    };
    let prefixes = if c.key_prefixes.is_empty() { "*".to_owned() } else { c.key_prefixes.join(",") };
    vec![
        c.id.clone(),
        c.name.clone(),
        c.scopes.iter().map(|s| scope_name(*s)).collect::<Vec<_>>().join(","),
        prefixes,
        state.to_owned(),
        time(c.create_time.as_ref()).unwrap_or_default(),
    ]
}

const CALLER_HEADER: [&str; 6] = ["ID", "NAME", "SCOPES", "KEY PREFIXES", "STATE", "CREATED"];

/// A caller just created or rotated, with its credential: the only time the secret is ever shown.
pub fn caller_issued(format: Format, c: Option<&pb::Caller>, credential: &str, what: &str) {
    match format {
        Format::Json => print_json(&json!({ "caller": c.map(caller_json), "credential": credential })),
        Format::Table => {
            if let Some(c) = c {
                print_table(&CALLER_HEADER, &[caller_row(c)]);
            }
            outln!("\ncaller {what}; its credential (shown once, store it now):\n{credential}");
        }
    }
}

pub fn callers(format: Format, callers: &[pb::Caller]) {
    match format {
        Format::Json => print_json(&Value::Array(callers.iter().map(caller_json).collect())),
        Format::Table => print_table(&CALLER_HEADER, &callers.iter().map(caller_row).collect::<Vec<_>>()),
    }
}

pub fn audit_events(format: Format, r: &pb::ListAuditEventsResponse) {
    let parse =
        |s: &str| if s.is_empty() { Value::Null } else { serde_json::from_str(s).unwrap_or(Value::Null) };
    match format {
        Format::Json => print_json(&json!({
            "events": r.events.iter().map(|e| json!({
                "id": e.id,
                "time": time(e.time.as_ref()),
                "caller_id": e.caller_id,
                "caller_name": e.caller_name,
                "request_id": e.request_id,
                "action": e.action,
                "key_id": e.key_id,
                "unit": e.unit,
                "subject": e.subject,
                "before": parse(&e.before_json),
                "after": parse(&e.after_json),
            })).collect::<Vec<_>>(),
            "next_page_token": r.next_page_token,
        })),
        Format::Table => {
            let rows: Vec<Vec<String>> = r
                .events
                .iter()
                .map(|e| {
                    let dash = |s: &str| if s.is_empty() { "-".to_owned() } else { s.to_owned() };
                    vec![
                        e.id.to_string(),
                        time(e.time.as_ref()).unwrap_or_default(),
                        e.caller_name.clone(),
                        e.action.clone(),
                        dash(&e.key_id),
                        e.subject.clone(),
                        dash(&e.before_json),
                        dash(&e.after_json),
                    ]
                })
                .collect();
            print_table(&["ID", "TIME", "CALLER", "ACTION", "KEY", "SUBJECT", "BEFORE", "AFTER"], &rows);
            if !r.next_page_token.is_empty() {
                outln!("next page: --page-token {}", r.next_page_token);
            }
        }
    }
}
