//! How client commands print answers: a readable table, or JSON with lower-case enum names and RFC 3339 times.

use serde_json::{Value, json};

use crate::grpc::pb;

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
    })
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Columns padded to their widest cell.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
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

fn transaction_row(t: &pb::Transaction) -> Vec<String> {
    vec![
        t.transaction_id.clone(),
        t.key_id.clone(),
        t.unit.clone(),
        t.amount.to_string(),
        state_name(t.state).to_owned() + if t.committed_late { " (late)" } else { "" },
        time(t.created_at.as_ref()).unwrap_or_default(),
        time(t.expires_at.as_ref()).unwrap_or_else(|| "-".into()),
    ]
}

const TX_HEADER: &[&str] = &["TRANSACTION", "KEY", "UNIT", "AMOUNT", "STATE", "CREATED", "EXPIRES"];

pub fn limits(format: Format, r: &pb::GetLimitsResponse) {
    match format {
        Format::Json => print_json(&json!({
            "key_id": r.key_id,
            "unit": r.unit,
            "usage": r.usage.iter().map(usage_json).collect::<Vec<_>>(),
        })),
        Format::Table => {
            println!("key {} unit {}", r.key_id, r.unit);
            print_usage_table(&r.usage);
        }
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

pub fn reservation(format: Format, r: &pb::ReserveSpendingResponse) {
    match format {
        Format::Json => print_json(&json!({
            "allowed": r.allowed,
            "exceeded": r.exceeded.iter().map(|w| window_name(*w)).collect::<Vec<_>>(),
            "usage": r.usage.iter().map(usage_json).collect::<Vec<_>>(),
            "transaction": r.transaction.as_ref().map(transaction_json),
        })),
        Format::Table => {
            if r.allowed {
                println!("allowed");
            } else {
                let exceeded: Vec<&str> = r.exceeded.iter().map(|w| window_name(*w)).collect();
                println!("denied: exceeds {}", exceeded.join(", "));
            }
            if let Some(t) = &r.transaction {
                print_table(TX_HEADER, &[transaction_row(t)]);
            }
            if !r.usage.is_empty() {
                print_usage_table(&r.usage);
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
                println!("next page: --page-token {}", r.next_page_token);
            }
        }
    }
}

pub fn health(format: Format, status: &str) {
    match format {
        Format::Json => print_json(&json!({ "status": status })),
        Format::Table => println!("{status}"),
    }
}
